//! PBFT values from a primary: canonical decoding never panics, and what
//! decodes re-encodes to the same bytes.
#![no_main]
use cybermesh::event::Limits;
use cybermesh::proposal::{decode, encode_with};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode(data, &Limits::default()) {
        assert_eq!(encode_with(p.timestamp_ms, &p.txs, &p.evidence), data);
    }
});
