//! PBFT values from a primary: canonical decoding never panics, and what
//! decodes re-encodes to the same bytes.
#![no_main]
use cybermesh::protocol::proposal::{decode, encode_refs, Origin};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode(data, 4096) {
        // Empty bytes decode as a value with no origin (view 0, proposer 0).
        let origin = p.origin.unwrap_or(Origin { view: 0, proposer: 0 });
        assert_eq!(encode_refs(origin, p.timestamp_ms, &p.refs, &p.evidence), data);
    }
});
