//! Input events: the signed envelope, its exact signed bytes, decoding with
//! size limits, and the typed payloads inside.

use crate::protocol::crypto::{self, PublicKey, Signature};
use crate::protocol::reject::RejectReason;
use crate::{proto, sha256, Hash32};
use prost::Message;

/// The kinds of input event; each has its topic and signing domain. The
/// first three are the AI service's alerts; a reconfiguration changes the
/// validator set (`protocol::reconfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TxKind {
    Anomaly,
    Evidence,
    Policy,
    Reconfiguration,
}

impl TxKind {
    pub const ALL: [TxKind; 4] = [TxKind::Anomaly, TxKind::Evidence, TxKind::Policy, TxKind::Reconfiguration];

    /// Signing domain, bound into the signed bytes.
    pub fn domain(self) -> &'static str {
        match self {
            TxKind::Anomaly => "ai.anomaly.v1",
            TxKind::Evidence => "ai.evidence.v1",
            TxKind::Policy => "ai.policy.v1",
            TxKind::Reconfiguration => "cybermesh.reconfiguration.v1",
        }
    }
    /// Kafka topic it arrives on.
    pub fn topic(self) -> &'static str {
        match self {
            TxKind::Anomaly => "ai.anomalies.v1",
            TxKind::Evidence => "ai.evidence.v1",
            TxKind::Policy => "ai.policy.v1",
            TxKind::Reconfiguration => "control.reconfiguration.v1",
        }
    }
    /// Tag byte on the direct source (1, 2, 3, 4).
    pub fn tag(self) -> u8 {
        match self {
            TxKind::Anomaly => 1,
            TxKind::Evidence => 2,
            TxKind::Policy => 3,
            TxKind::Reconfiguration => 4,
        }
    }
    pub fn from_tag(t: u8) -> Option<TxKind> {
        match t {
            1 => Some(TxKind::Anomaly),
            2 => Some(TxKind::Evidence),
            3 => Some(TxKind::Policy),
            4 => Some(TxKind::Reconfiguration),
            _ => None,
        }
    }
    /// The kind of event a Kafka topic carries, from its name (containing
    /// `anomal`, `evidence`, `policy` or `reconfig`).
    pub fn from_topic(topic: &str) -> Option<TxKind> {
        if topic.contains("reconfig") {
            Some(TxKind::Reconfiguration)
        } else if topic.contains("anomal") {
            Some(TxKind::Anomaly)
        } else if topic.contains("evidence") {
            Some(TxKind::Evidence)
        } else if topic.contains("policy") {
            Some(TxKind::Policy)
        } else {
            None
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TxKind::Anomaly => "anomaly",
            TxKind::Evidence => "evidence",
            TxKind::Policy => "policy",
            TxKind::Reconfiguration => "reconfiguration",
        }
    }
    fn to_proto(self) -> proto::TxKind {
        match self {
            TxKind::Anomaly => proto::TxKind::Anomaly,
            TxKind::Evidence => proto::TxKind::Evidence,
            TxKind::Policy => proto::TxKind::Policy,
            TxKind::Reconfiguration => proto::TxKind::Reconfiguration,
        }
    }
    fn from_proto(k: i32) -> Option<TxKind> {
        match proto::TxKind::try_from(k).ok()? {
            proto::TxKind::Anomaly => Some(TxKind::Anomaly),
            proto::TxKind::Evidence => Some(TxKind::Evidence),
            proto::TxKind::Policy => Some(TxKind::Policy),
            proto::TxKind::Reconfiguration => Some(TxKind::Reconfiguration),
            proto::TxKind::Unspecified => None,
        }
    }
}

/// Size limits on input (all configurable, see `config::LimitsConfig`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest encoded event accepted (bytes).
    pub max_event_bytes: usize,
    /// Largest payload accepted (bytes).
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_event_bytes: 65_536, max_payload_bytes: 61_440 }
    }
}

/// A decoded input event: fixed-size fields already checked for length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: TxKind,
    pub id: [u8; 16],
    pub payload: Vec<u8>,
    pub content_hash: Hash32,
    pub nonce: [u8; 16],
    pub timestamp_ms: u64,
    pub producer: PublicKey,
    pub signature: Signature,
}

/// A proto3 `bytes` field (left out when empty, as prost does).
fn put_bytes(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
    if !b.is_empty() {
        prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
        prost::encoding::encode_varint(b.len() as u64, buf);
        buf.extend_from_slice(b);
    }
}

fn bytes_len(tag: u32, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(n as u64) + n
    }
}

/// Length of the signed bytes for a domain of `d` bytes.
pub const fn signed_len(d: usize) -> usize {
    1 + d + 8 + 16 + 16 + 32
}

/// Writes the exact bytes a producer signs (README "Wire contract"):
/// `u8 len(domain) || domain || u64 BE timestamp_ms || nonce || id || content_hash`.
pub fn write_signed_bytes(
    out: &mut Vec<u8>,
    domain: &str,
    timestamp_ms: u64,
    nonce: &[u8; 16],
    id: &[u8; 16],
    content_hash: &Hash32,
) {
    debug_assert!(domain.len() < 256);
    out.reserve(signed_len(domain.len()));
    out.push(domain.len() as u8);
    out.extend_from_slice(domain.as_bytes());
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(id);
    out.extend_from_slice(content_hash);
}

impl Event {
    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(signed_len(self.kind.domain().len()));
        write_signed_bytes(&mut v, self.kind.domain(), self.timestamp_ms, &self.nonce, &self.id, &self.content_hash);
        v
    }

    /// Transaction hash: SHA-256 of the signed bytes. Two envelopes with the
    /// same signed bytes are the same transaction, whatever their signature.
    pub fn tx_hash(&self) -> Hash32 {
        sha256(&self.signed_bytes())
    }

    /// Nonce timestamp (first 8 bytes, big-endian).
    pub fn nonce_timestamp_ms(&self) -> u64 {
        u64::from_be_bytes(self.nonce[..8].try_into().expect("8 bytes"))
    }

    /// Approximate memory/wire size, for mempool and block byte limits.
    pub fn size(&self) -> usize {
        self.payload.len() + 16 + 32 + 16 + 8 + 32 + 64 + 16
    }

    /// Decodes the wire envelope (`SignedEvent`, wire-identical to the three
    /// input messages). Never panics; every failure is a DLQ reason.
    pub fn decode(kind: TxKind, bytes: &[u8], limits: &Limits) -> Result<Event, (RejectReason, String)> {
        if bytes.len() > limits.max_event_bytes {
            return Err((
                RejectReason::Oversized,
                format!("event is {} bytes, limit {}", bytes.len(), limits.max_event_bytes),
            ));
        }
        let m = proto::SignedEvent::decode(bytes).map_err(|e| (RejectReason::Malformed, e.to_string()))?;
        Self::from_proto(kind, m, limits)
    }

    pub fn from_proto(kind: TxKind, m: proto::SignedEvent, limits: &Limits) -> Result<Event, (RejectReason, String)> {
        fn fixed<const N: usize>(name: &str, v: Vec<u8>) -> Result<[u8; N], (RejectReason, String)> {
            let len = v.len();
            v.try_into().map_err(|_| (RejectReason::Malformed, format!("{name} must be {N} bytes, got {len}")))
        }
        if m.payload.len() > limits.max_payload_bytes {
            return Err((
                RejectReason::Oversized,
                format!("payload is {} bytes, limit {}", m.payload.len(), limits.max_payload_bytes),
            ));
        }
        Ok(Event {
            kind,
            id: fixed("id", m.id)?,
            payload: m.payload,
            content_hash: fixed("content_hash", m.content_hash)?,
            nonce: fixed("nonce", m.nonce)?,
            timestamp_ms: m.timestamp_ms,
            producer: fixed("producer_pubkey", m.producer_pubkey)?,
            signature: fixed("signature", m.signature)?,
        })
    }

    pub fn to_proto(&self) -> proto::SignedEvent {
        proto::SignedEvent {
            id: self.id.to_vec(),
            payload: self.payload.clone(),
            content_hash: self.content_hash.to_vec(),
            nonce: self.nonce.to_vec(),
            timestamp_ms: self.timestamp_ms,
            producer_pubkey: self.producer.to_vec(),
            signature: self.signature.to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    pub fn to_tx_proto(&self) -> proto::Transaction {
        proto::Transaction { kind: self.kind.to_proto() as i32, event: Some(self.to_proto()) }
    }

    /// Appends this event as field `tag` of type `Transaction`: exactly the
    /// bytes prost writes for `to_tx_proto()`, without building that message
    /// (seven allocations and copies per tx on the core thread's hot path:
    /// proposals, the block store, value digests).
    pub fn encode_tx_field(&self, tag: u32, buf: &mut Vec<u8>) {
        use prost::encoding::{encode_key, encode_varint, WireType};
        let (event_len, tx_len) = self.tx_lens();
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(tx_len as u64, buf);
        encode_key(1, WireType::Varint, buf);
        encode_varint(self.kind.to_proto() as i32 as u64, buf);
        encode_key(2, WireType::LengthDelimited, buf);
        encode_varint(event_len as u64, buf);
        put_bytes(1, &self.id, buf);
        put_bytes(2, &self.payload, buf);
        put_bytes(3, &self.content_hash, buf);
        put_bytes(4, &self.nonce, buf);
        if self.timestamp_ms != 0 {
            encode_key(5, WireType::Varint, buf);
            encode_varint(self.timestamp_ms, buf);
        }
        put_bytes(6, &self.producer, buf);
        put_bytes(7, &self.signature, buf);
    }

    /// Bytes `encode_tx_field(tag, _)` appends.
    pub fn tx_field_len(&self, tag: u32) -> usize {
        let tx_len = self.tx_lens().1;
        prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(tx_len as u64) + tx_len
    }

    /// (SignedEvent message length, Transaction message length).
    fn tx_lens(&self) -> (usize, usize) {
        use prost::encoding::{encoded_len_varint, key_len};
        let ts = if self.timestamp_ms != 0 { key_len(5) + encoded_len_varint(self.timestamp_ms) } else { 0 };
        let event = bytes_len(1, self.id.len())
            + bytes_len(2, self.payload.len())
            + bytes_len(3, self.content_hash.len())
            + bytes_len(4, self.nonce.len())
            + ts
            + bytes_len(6, self.producer.len())
            + bytes_len(7, self.signature.len());
        let kind = key_len(1) + encoded_len_varint(self.kind.to_proto() as i32 as u64);
        (event, kind + key_len(2) + encoded_len_varint(event as u64) + event)
    }

    /// Decodes a stored transaction (block store, peers).
    pub fn from_tx_proto(t: proto::Transaction, limits: &Limits) -> Result<Event, (RejectReason, String)> {
        let kind =
            TxKind::from_proto(t.kind).ok_or((RejectReason::Malformed, format!("unknown tx kind {}", t.kind)))?;
        let ev = t.event.ok_or((RejectReason::Malformed, "transaction without event".to_string()))?;
        Self::from_proto(kind, ev, limits)
    }

    /// Builds and signs an event (producers, loadgen, tests).
    pub fn sign(
        kind: TxKind,
        key: &crypto::SigningKey,
        id: [u8; 16],
        payload: Vec<u8>,
        timestamp_ms: u64,
        nonce_random: [u8; 4],
    ) -> Event {
        let producer = crypto::public_key(key);
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&timestamp_ms.to_be_bytes());
        nonce[8..12].copy_from_slice(&producer[..4]);
        nonce[12..].copy_from_slice(&nonce_random);
        let mut ev = Event {
            kind,
            id,
            content_hash: sha256(&payload),
            payload,
            nonce,
            timestamp_ms,
            producer,
            signature: [0; 64],
        };
        ev.signature = crypto::sign(key, &ev.signed_bytes());
        ev
    }
}

/// A payload decoded and checked against its kind's rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Anomaly(proto::AnomalyPayload),
    Evidence(proto::EvidencePayload),
    Policy(proto::PolicyPayload),
    Reconfiguration(crate::protocol::reconfig::Reconfiguration),
}

fn check_len(field: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{field} is {} bytes, limit {max}", s.len()));
    }
    Ok(())
}

/// Decodes and validates a payload. Deterministic: the state machine calls it
/// too, so every validator reaches the same verdict.
pub fn parse_payload(kind: TxKind, bytes: &[u8]) -> Result<Payload, String> {
    match kind {
        TxKind::Anomaly => {
            let p = proto::AnomalyPayload::decode(bytes).map_err(|e| e.to_string())?;
            if p.anomaly_type.is_empty() {
                return Err("anomaly_type is empty".into());
            }
            check_len("anomaly_type", &p.anomaly_type, 64)?;
            check_len("source", &p.source, 256)?;
            check_len("description", &p.description, 4096)?;
            if !(1..=10).contains(&p.severity) {
                return Err(format!("severity {} outside 1..=10", p.severity));
            }
            if !(p.confidence >= 0.0 && p.confidence <= 1.0) {
                return Err(format!("confidence {} outside 0.0..=1.0", p.confidence));
            }
            Ok(Payload::Anomaly(p))
        }
        TxKind::Evidence => {
            let p = proto::EvidencePayload::decode(bytes).map_err(|e| e.to_string())?;
            if p.anomaly_id.len() != 16 {
                return Err(format!("anomaly_id must be 16 bytes, got {}", p.anomaly_id.len()));
            }
            check_len("evidence_type", &p.evidence_type, 64)?;
            if !p.data_hash.is_empty() && p.data_hash.len() != 32 {
                return Err(format!("data_hash must be empty or 32 bytes, got {}", p.data_hash.len()));
            }
            Ok(Payload::Evidence(p))
        }
        TxKind::Policy => {
            let p = proto::PolicyPayload::decode(bytes).map_err(|e| e.to_string())?;
            if p.policy_id.is_empty() {
                return Err("policy_id is empty".into());
            }
            check_len("policy_id", &p.policy_id, 128)?;
            check_len("action", &p.action, 64)?;
            check_len("target", &p.target, 256)?;
            check_len("rule", &p.rule, 4096)?;
            Ok(Payload::Policy(p))
        }
        TxKind::Reconfiguration => {
            let p = proto::ReconfigurationPayload::decode(bytes).map_err(|e| e.to_string())?;
            Ok(Payload::Reconfiguration(crate::protocol::reconfig::Reconfiguration::from_proto(p)?))
        }
    }
}

/// A ~300-byte anomaly payload, as used by loadgen, benches and tests.
pub fn sample_anomaly_payload(i: u64, pad_to: usize) -> Vec<u8> {
    let mut p = proto::AnomalyPayload {
        anomaly_type: "ddos".into(),
        severity: 1 + (i % 10) as u32,
        confidence: 0.5 + (i % 50) as f64 / 100.0,
        source: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        description: String::new(),
        features: vec![],
    };
    let base = p.encoded_len();
    if pad_to > base + 3 {
        p.description = "x".repeat(pad_to - base - 3);
    }
    p.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The hand-written Transaction encoding is prost's, byte for byte
        /// (proposal values are hashed), for any field values, including
        /// the defaults prost leaves out (empty payload, timestamp 0).
        #[test]
        fn tx_field_encoding_matches_prost(
            kind in 0..3u8,
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            timestamp_ms in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::prelude::any::<u64>()],
            id in proptest::prelude::any::<[u8; 16]>(),
            nonce in proptest::prelude::any::<[u8; 16]>(),
            tag in 1..40u32,
        ) {
            let kind = [TxKind::Anomaly, TxKind::Evidence, TxKind::Policy][kind as usize];
            let ev = Event {
                kind, id, content_hash: sha256(&payload), payload, nonce, timestamp_ms,
                producer: [7; 32], signature: [9; 64],
            };
            let mut fast = vec![0xAA];
            ev.encode_tx_field(tag, &mut fast);
            let mut slow = vec![0xAA];
            prost::encoding::message::encode(tag, &ev.to_tx_proto(), &mut slow);
            proptest::prop_assert_eq!(&fast, &slow);
            proptest::prop_assert_eq!(ev.tx_field_len(tag), slow.len() - 1);
        }
    }

    #[test]
    fn the_three_input_messages_decode_as_signed_event() {
        let m = proto::AnomalyEvent {
            id: vec![1; 16],
            payload: vec![2; 5],
            content_hash: vec![3; 32],
            nonce: vec![4; 16],
            timestamp_ms: 99,
            producer_pubkey: vec![5; 32],
            signature: vec![6; 64],
        };
        let bytes = m.encode_to_vec();
        let s = proto::SignedEvent::decode(&bytes[..]).unwrap();
        assert_eq!(s.encode_to_vec(), bytes);
        let p = proto::PolicyEvent::decode(&bytes[..]).unwrap();
        assert_eq!(p.encode_to_vec(), bytes);
        let e = proto::EvidenceEvent::decode(&bytes[..]).unwrap();
        assert_eq!(e.encode_to_vec(), bytes);
    }

    #[test]
    fn topics_name_their_kind() {
        assert_eq!(TxKind::from_topic("ai.anomalies.v1"), Some(TxKind::Anomaly));
        assert_eq!(TxKind::from_topic("ai.evidence.v1"), Some(TxKind::Evidence));
        assert_eq!(TxKind::from_topic("ai.policy.v1"), Some(TxKind::Policy));
        assert_eq!(TxKind::from_topic("ai.other.v1"), None);
    }

    #[test]
    fn signed_bytes_layout() {
        let ev = Event {
            kind: TxKind::Policy,
            id: [0xaa; 16],
            payload: vec![],
            content_hash: [0xcc; 32],
            nonce: [0xbb; 16],
            timestamp_ms: 0x0102030405060708,
            producer: [0; 32],
            signature: [0; 64],
        };
        let b = ev.signed_bytes();
        assert_eq!(b.len(), signed_len(12));
        assert_eq!(b[0], 12);
        assert_eq!(&b[1..13], b"ai.policy.v1");
        assert_eq!(&b[13..21], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[21..37], &[0xbb; 16]);
        assert_eq!(&b[37..53], &[0xaa; 16]);
        assert_eq!(&b[53..85], &[0xcc; 32]);
    }

    #[test]
    fn decode_rejects_bad_lengths_and_sizes() {
        let limits = Limits::default();
        let key = crypto::generate_key();
        let ev = Event::sign(TxKind::Anomaly, &key, [1; 16], sample_anomaly_payload(1, 300), 1000, [0; 4]);
        let back = Event::decode(TxKind::Anomaly, &ev.encode(), &limits).unwrap();
        assert_eq!(back, ev);
        let mut p = ev.to_proto();
        p.nonce.pop();
        let e = Event::decode(TxKind::Anomaly, &p.encode_to_vec(), &limits).unwrap_err();
        assert_eq!(e.0, RejectReason::Malformed);
        assert!(e.1.contains("nonce must be 16 bytes"), "{}", e.1);
        let big = vec![0u8; limits.max_event_bytes + 1];
        assert_eq!(Event::decode(TxKind::Anomaly, &big, &limits).unwrap_err().0, RejectReason::Oversized);
        assert_eq!(Event::decode(TxKind::Anomaly, &[0xff, 0xff], &limits).unwrap_err().0, RejectReason::Malformed);
    }

    #[test]
    fn payload_rules() {
        assert!(parse_payload(TxKind::Anomaly, &sample_anomaly_payload(3, 300)).is_ok());
        let bad =
            proto::AnomalyPayload { anomaly_type: "x".into(), severity: 11, ..Default::default() }.encode_to_vec();
        assert!(parse_payload(TxKind::Anomaly, &bad).unwrap_err().contains("severity"));
        let nan =
            proto::AnomalyPayload { anomaly_type: "x".into(), severity: 1, confidence: f64::NAN, ..Default::default() }
                .encode_to_vec();
        assert!(parse_payload(TxKind::Anomaly, &nan).is_err());
        let ev = proto::EvidencePayload { anomaly_id: vec![1; 15], ..Default::default() }.encode_to_vec();
        assert!(parse_payload(TxKind::Evidence, &ev).is_err());
        let pol = proto::PolicyPayload { policy_id: "p1".into(), action: "block".into(), ..Default::default() }
            .encode_to_vec();
        assert!(parse_payload(TxKind::Policy, &pol).is_ok());
        let n = sample_anomaly_payload(7, 300).len();
        assert!((295..=305).contains(&n), "{n}");
    }
}
