//! PBFT messages from peers: decoding with bounds, and round trip.
#![no_main]
use cybermesh::consensus::wire::{decode, encode, WireLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let l = WireLimits { n: 7, max_value_bytes: 1 << 20, window: 64 };
    if let Ok(m) = decode(data, &l) {
        assert_eq!(decode(&encode(&m), &l).expect("re-decodes"), m);
    }
});
