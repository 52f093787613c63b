//! The README's wire-contract test vector: a producer in another language
//! must reproduce these bytes exactly.

use cybermesh::proto;
use cybermesh::protocol::crypto;
use cybermesh::protocol::event::{Event, TxKind};
use prost::Message;

fn vector() -> (crypto::SigningKey, Event) {
    let seed: [u8; 32] = core::array::from_fn(|i| i as u8);
    let key = crypto::SigningKey::from_bytes(&seed);
    let payload = proto::AnomalyPayload {
        anomaly_type: "ddos".into(),
        severity: 7,
        confidence: 0.9,
        source: "203.0.113.7".into(),
        description: String::new(),
        features: vec![],
    }
    .encode_to_vec();
    let id = *uuid::Uuid::parse_str("00112233-4455-6677-8899-aabbccddeeff").unwrap().as_bytes();
    let ev = Event::sign(TxKind::Anomaly, &key, id, payload, 1_764_115_200_000, [0xde, 0xad, 0xbe, 0xef]);
    (key, ev)
}

const PUBKEY: &str = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8";
const PAYLOAD: &str = "0a0464646f73100719cdccccccccccec3f220b3230332e302e3131332e37";
const SIGNED_BYTES: &str = "0d61692e616e6f6d616c792e76310000019abd75b8000000019abd75b80003a107bfdeadbeef00112233445566778899aabbccddeefff7ae8247b7582a528dfd413c8da4271d96a759af9515e25c180a759ae12101ac";
const SIGNATURE: &str = "fad456a8169bf26a67a3dfcafacf5f33f63e098e2ee350c640829aa98a5eae83661759cf232ec6ba8c7ef5b8d40be48afdab04b546a5337e2572f67b24b7ac0d";

#[test]
fn test_vector_matches_the_readme() {
    let (key, ev) = vector();
    let got_pk = hex::encode(crypto::public_key(&key));
    let got_payload = hex::encode(&ev.payload);
    let got_signed = hex::encode(ev.signed_bytes());
    let got_sig = hex::encode(ev.signature);
    assert_eq!(got_pk, PUBKEY);
    assert_eq!(got_payload, PAYLOAD);
    assert_eq!(got_signed, SIGNED_BYTES);
    assert_eq!(got_sig, SIGNATURE);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for v in [PUBKEY, PAYLOAD, SIGNED_BYTES, SIGNATURE] {
        assert!(readme.contains(v), "README.md lacks {v}");
    }
    // And the signature verifies under the accept rule.
    crypto::verify_one(&crypto::public_key(&key), &ev.signed_bytes(), &ev.signature).unwrap();
}
