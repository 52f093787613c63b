//! PBFT values from a primary: canonical decoding never panics, and what
//! decodes re-encodes to the same bytes.
#![no_main]
use cybermesh::proposal::{decode, encode_refs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode(data, 4096) {
        assert_eq!(encode_refs(p.timestamp_ms, &p.refs, &p.evidence), data);
    }
});
