//! Frames from peers (PBFT messages, genesis attestations, tx fetches and
//! bodies): decoding with bounds, and round trip.
#![no_main]
use cybermesh::protocol::consensus::wire::{
    decode, decode_frame, encode, encode_genesis, encode_tx_fetch, Frame, WireLimits, MAX_FETCH_TXS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let l = WireLimits { n: 7, max_value_bytes: 1 << 20, window: 64 };
    if let Ok(m) = decode(data, &l) {
        assert_eq!(decode(&encode(&m), &l).expect("re-decodes"), m);
    }
    match decode_frame(data, &l) {
        Ok(Frame::Pbft(m)) => assert_eq!(decode(&encode(&m), &l).expect("re-decodes"), m),
        Ok(Frame::Genesis(a)) => assert_eq!(decode_frame(&encode_genesis(&a), &l), Ok(Frame::Genesis(a))),
        Ok(Frame::TxFetch { seq, tx_hashes }) => {
            assert!(tx_hashes.len() <= MAX_FETCH_TXS);
            let again = decode_frame(&encode_tx_fetch(seq, &tx_hashes), &l);
            assert_eq!(again, Ok(Frame::TxFetch { seq, tx_hashes }));
        }
        Ok(Frame::TxBodies { txs, .. }) => assert!(txs.len() <= MAX_FETCH_TXS),
        Ok(_) | Err(_) => {}
    }
});
