//! Frames from peers (PBFT messages and genesis attestations): decoding with
//! bounds, and round trip.
#![no_main]
use cybermesh::consensus::wire::{decode, decode_frame, encode, encode_genesis, Frame, WireLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let l = WireLimits { n: 7, max_value_bytes: 1 << 20, window: 64 };
    if let Ok(m) = decode(data, &l) {
        assert_eq!(decode(&encode(&m), &l).expect("re-decodes"), m);
    }
    match decode_frame(data, &l) {
        Ok(Frame::Pbft(m)) => assert_eq!(decode(&encode(&m), &l).expect("re-decodes"), m),
        Ok(Frame::Genesis(a)) => assert_eq!(decode_frame(&encode_genesis(&a), &l), Ok(Frame::Genesis(a))),
        Err(_) => {}
    }
});
