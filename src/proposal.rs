//! The PBFT value: the txs a primary proposes for the next height, its
//! canonical encoding, and the checks every backup makes before preparing
//! it (DESIGN.md §3: replicas re-validate every tx of a proposal).
//!
//! The empty value is PBFT's null request (a gap filled by a new-view); it
//! becomes an empty block. A primary never proposes an empty tx list.

use crate::block::{Block, BuilderConfig};
use crate::consensus::pbft::Proof;
use crate::consensus::wire::{proof_from, proof_to, WireLimits};
use crate::event::{Event, Limits};
use crate::ingest::verify::{verify_events, VerifyPolicy};
use crate::mempool::Mempool;
use crate::reject::RejectReason;
use crate::{proto, Hash32};
use foldhash::{HashSet, HashSetExt};
use prost::Message;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub timestamp_ms: u64,
    pub txs: Vec<Arc<Event>>,
    pub tx_hashes: Vec<Hash32>,
    /// Proofs of misbehaviour to commit (each quarantines its culprit).
    pub evidence: Vec<Proof>,
}

/// Most proofs one proposal carries.
pub const MAX_EVIDENCE: usize = 16;

/// Proofs carry pre-prepares without values and replica ids checked later.
const EVIDENCE_LIMITS: WireLimits = WireLimits { n: 1 << 16, max_value_bytes: 0, window: 1 };

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProposalError {
    #[error("undecodable proposal: {0}")]
    Decode(String),
    #[error("proposal is not canonically encoded")]
    NotCanonical,
    #[error("tx {index}: {detail}")]
    Tx { index: usize, detail: String },
    #[error("empty proposal (a primary proposes at least one tx or proof)")]
    Empty,
    #[error("{txs} txs / {bytes} bytes exceed the block limits ({max_txs} txs / {max_bytes} bytes)")]
    TooLarge { txs: usize, bytes: usize, max_txs: usize, max_bytes: usize },
    #[error("tx {0} appears twice")]
    Duplicate(usize),
    #[error("timestamp {ts} is more than {skew_ms} ms ahead of this validator's clock ({now})")]
    TimeAhead { ts: u64, now: u64, skew_ms: u64 },
    #[error("tx {index} fails verification ({reason}): {detail}")]
    Invalid { index: usize, reason: RejectReason, detail: String },
}

/// Canonical encoding of a proposal (`proto::Proposal`).
pub fn encode(timestamp_ms: u64, txs: &[Arc<Event>]) -> Vec<u8> {
    encode_with(timestamp_ms, txs, &[])
}

pub fn encode_with(timestamp_ms: u64, txs: &[Arc<Event>], evidence: &[Proof]) -> Vec<u8> {
    let evidence: Vec<proto::PbftEvidence> = evidence.iter().map(proof_to).collect();
    encode_proposal(timestamp_ms, txs.iter().map(|t| &**t), &evidence)
}

/// The `proto::Proposal` encoding, byte for byte (values are hashed: it
/// must be canonical), writing the txs straight from the events.
fn encode_proposal<'a>(
    timestamp_ms: u64,
    txs: impl Iterator<Item = &'a Event> + Clone,
    evidence: &[proto::PbftEvidence],
) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, message, WireType};
    let len = if timestamp_ms != 0 { key_len(1) + encoded_len_varint(timestamp_ms) } else { 0 }
        + txs.clone().map(|t| t.tx_field_len(2)).sum::<usize>()
        + evidence.iter().map(|e| message::encoded_len(3, e)).sum::<usize>();
    let mut buf = Vec::with_capacity(len);
    if timestamp_ms != 0 {
        encode_key(1, WireType::Varint, &mut buf);
        encode_varint(timestamp_ms, &mut buf);
    }
    for t in txs {
        t.encode_tx_field(2, &mut buf);
    }
    for e in evidence {
        message::encode(3, e, &mut buf);
    }
    debug_assert_eq!(buf.len(), len);
    buf
}

/// What the block store keeps of a committed value: the Proposal without
/// its txs (they are in the block), i.e. just its timestamp; empty for null.
pub fn stored_form(value: &[u8]) -> Vec<u8> {
    if value.is_empty() {
        return vec![];
    }
    // Field 2 (the txs) is skipped unparsed.
    proto::ProposalStored::decode(value).unwrap_or_default().encode_to_vec()
}

/// The proofs in a stored form (for replaying quarantines at startup).
pub fn stored_evidence(stored: &[u8]) -> Vec<Proof> {
    let s = proto::ProposalStored::decode(stored).unwrap_or_default();
    s.evidence.into_iter().filter_map(|e| proof_from(e, &EVIDENCE_LIMITS).ok()).collect()
}

/// The value a stored block was ordered as, from its txs and the stored
/// form (blocks stored before it was kept: the header's timestamp).
pub fn value_of_block(b: &Block, stored: Option<&[u8]>) -> Vec<u8> {
    let (timestamp_ms, evidence) = match stored {
        Some([]) => return vec![], // a null block
        Some(s) => match proto::ProposalStored::decode(s) {
            Ok(p) => (p.timestamp_ms, p.evidence),
            Err(_) => (b.header.timestamp_ms, vec![]),
        },
        None if b.txs.is_empty() => return vec![],
        None => (b.header.timestamp_ms, vec![]),
    };
    encode_proposal(timestamp_ms, b.txs.iter().map(|t| &**t), &evidence)
}

/// Decodes a value; refuses any encoding other than the canonical one, so
/// that a stored block always re-encodes to the exact value PBFT ordered.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Proposal, ProposalError> {
    let p = proto::Proposal::decode(bytes).map_err(|e| ProposalError::Decode(e.to_string()))?;
    let timestamp_ms = p.timestamp_ms;
    let mut txs = Vec::with_capacity(p.txs.len());
    for (index, t) in p.txs.into_iter().enumerate() {
        let ev = Event::from_tx_proto(t, limits)
            .map_err(|(r, d)| ProposalError::Tx { index, detail: format!("{r}: {d}") })?;
        txs.push(Arc::new(ev));
    }
    if p.evidence.len() > MAX_EVIDENCE {
        return Err(ProposalError::Decode(format!("{} proofs exceed {MAX_EVIDENCE}", p.evidence.len())));
    }
    let evidence = p
        .evidence
        .into_iter()
        .map(|e| proof_from(e, &EVIDENCE_LIMITS))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProposalError::Decode(format!("evidence: {e}")))?;
    if encode_with(timestamp_ms, &txs, &evidence) != bytes {
        return Err(ProposalError::NotCanonical);
    }
    let tx_hashes = txs.iter().map(|t| t.tx_hash()).collect();
    Ok(Proposal { timestamp_ms, txs, tx_hashes, evidence })
}

/// What a backup checks a proposal against.
pub struct CheckContext<'a> {
    pub limits: &'a Limits,
    pub builder: &'a BuilderConfig,
    pub policy: &'a VerifyPolicy,
    /// Txs this validator verified itself (no second signature check).
    pub mempool: &'a Mempool,
    pub now_ms: u64,
    pub skew_ms: u64,
}

/// Full validation of another validator's proposal. Txs already in the
/// mempool were verified on admission; the rest are verified here, in one
/// batch.
pub fn check(bytes: &[u8], cx: &CheckContext) -> Result<Proposal, ProposalError> {
    let p = decode(bytes, cx.limits)?;
    if p.txs.is_empty() && p.evidence.is_empty() {
        return Err(ProposalError::Empty);
    }
    let size: usize = p.txs.iter().map(|t| t.size()).sum();
    if p.txs.len() > cx.builder.max_txs || size > cx.builder.max_bytes {
        return Err(ProposalError::TooLarge {
            txs: p.txs.len(),
            bytes: size,
            max_txs: cx.builder.max_txs,
            max_bytes: cx.builder.max_bytes,
        });
    }
    if p.timestamp_ms > cx.now_ms + cx.skew_ms {
        return Err(ProposalError::TimeAhead { ts: p.timestamp_ms, now: cx.now_ms, skew_ms: cx.skew_ms });
    }
    let mut seen = HashSet::with_capacity(p.txs.len());
    let mut unknown: Vec<(usize, &Event)> = vec![];
    for (i, (tx, h)) in p.txs.iter().zip(&p.tx_hashes).enumerate() {
        if !seen.insert(tx.nonce) {
            return Err(ProposalError::Duplicate(i));
        }
        // The hash does not cover the signature: compare the whole event.
        if cx.mempool.get(h).is_none_or(|m| *m.event != **tx) {
            unknown.push((i, tx));
        }
    }
    if !unknown.is_empty() {
        let events: Vec<&Event> = unknown.iter().map(|(_, e)| *e).collect();
        // Skew is judged at the proposal's time: the primary saw the tx then.
        verify_events(cx.policy, &events, p.timestamp_ms).map_err(|(k, reason, detail)| ProposalError::Invalid {
            index: unknown[k].0,
            reason,
            detail,
        })?;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto;
    use crate::event::{sample_anomaly_payload, TxKind};
    use crate::mempool::{MempoolConfig, VerifiedTx};

    fn ev(k: &crypto::SigningKey, i: u64, ts: u64) -> Arc<Event> {
        let pk = crypto::public_key(k);
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&ts.to_be_bytes());
        nonce[8..12].copy_from_slice(&pk[..4]);
        nonce[12..].copy_from_slice(&(i as u32).to_be_bytes());
        Arc::new(Event::sign(TxKind::Anomaly, k, nonce, sample_anomaly_payload(i, 200), ts, (i as u32).to_be_bytes()))
    }

    struct Fixture {
        limits: Limits,
        builder: BuilderConfig,
        policy: VerifyPolicy,
        mempool: Mempool,
    }

    fn fixture(k: &crypto::SigningKey) -> Fixture {
        Fixture {
            limits: Limits::default(),
            builder: BuilderConfig { max_txs: 4, ..BuilderConfig::default() },
            policy: VerifyPolicy { producers: [crypto::public_key(k)].into_iter().collect(), skew_ms: 60_000 },
            mempool: Mempool::new(MempoolConfig::default()),
        }
    }

    fn cx(f: &Fixture, now: u64) -> CheckContext<'_> {
        CheckContext {
            limits: &f.limits,
            builder: &f.builder,
            policy: &f.policy,
            mempool: &f.mempool,
            now_ms: now,
            skew_ms: 60_000,
        }
    }

    fn bad_sig(e: &Event) -> Arc<Event> {
        let mut b = e.clone();
        b.signature[0] ^= 1;
        Arc::new(b)
    }

    #[test]
    fn round_trip_is_canonical_and_null_is_empty() {
        let k = crypto::generate_key();
        let txs: Vec<_> = (0..3).map(|i| ev(&k, i, 1000)).collect();
        let bytes = encode(1000, &txs);
        let p = decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(p.txs, txs);
        assert_eq!(p.tx_hashes[1], txs[1].tx_hash());
        assert!(decode(&[], &Limits::default()).unwrap().txs.is_empty(), "null value");
        // What the store keeps, and the value rebuilt from it.
        let stored = stored_form(&bytes);
        assert!(stored.len() < 16);
        let header = crate::block::BlockHeader {
            height: 1,
            view: 0,
            timestamp_ms: 1234, // the block's (monotonic) time may differ from the proposal's
            previous_hash: [0; 32],
            tx_root: [0; 32],
            state_root: [0; 32],
            proposer: [0; 32],
            tx_count: 3,
        };
        let tx_hashes = txs.iter().map(|t| t.tx_hash()).collect();
        let block = Block { header, txs: txs.clone(), tx_hashes };
        assert_eq!(value_of_block(&block, Some(&stored)), bytes);
        assert_eq!(stored_form(&[]), Vec::<u8>::new());
        // With a proof of misbehaviour: kept in the stored form too.
        use crate::consensus::pbft::{Phase, Signed, Vote};
        let vote = |d: u8| Signed {
            body: Vote { phase: Phase::Commit, view: 2, seq: 9, digest: [d; 32] },
            from: 3,
            sig: vec![d; 64],
        };
        let proof = Proof::Votes(vote(1), vote(2));
        let with = encode_with(1000, &txs, std::slice::from_ref(&proof));
        let p = decode(&with, &Limits::default()).unwrap();
        assert_eq!(p.evidence, vec![proof.clone()]);
        let stored = stored_form(&with);
        assert_eq!(stored_evidence(&stored), vec![proof]);
        assert_eq!(value_of_block(&block, Some(&stored)), with);
        // The same message with a field repeated is not canonical.
        let mut dup = bytes.clone();
        dup.extend_from_slice(&proto::Proposal { timestamp_ms: 1000, ..Default::default() }.encode_to_vec());
        assert_eq!(decode(&dup, &Limits::default()), Err(ProposalError::NotCanonical));
    }

    #[test]
    fn backups_refuse_invalid_proposals_with_the_reason() {
        let k = crypto::generate_key();
        let mut f = fixture(&k);
        let good: Vec<_> = (0..3).map(|i| ev(&k, i, 1000)).collect();
        assert_eq!(check(&encode(1000, &good), &cx(&f, 1000)).unwrap().txs.len(), 3);
        assert_eq!(check(&encode(1000, &[]), &cx(&f, 1000)), Err(ProposalError::Empty));
        let five: Vec<_> = (0..5).map(|i| ev(&k, i, 1000)).collect();
        assert!(matches!(check(&encode(1000, &five), &cx(&f, 1000)), Err(ProposalError::TooLarge { .. })));
        let twice = vec![good[0].clone(), good[0].clone()];
        assert_eq!(check(&encode(1000, &twice), &cx(&f, 1000)), Err(ProposalError::Duplicate(1)));
        // A clock behind the last block's is not refused: block time is kept
        // monotonic at execution instead.
        assert!(check(&encode(800, &good), &cx(&f, 1000)).is_ok());
        assert!(matches!(check(&encode(99_999, &good), &cx(&f, 1000)), Err(ProposalError::TimeAhead { .. })));
        let forged = vec![good[0].clone(), bad_sig(&good[1])];
        match check(&encode(1000, &forged), &cx(&f, 1000)) {
            Err(ProposalError::Invalid { index: 1, reason: RejectReason::BadSignature, .. }) => {}
            other => panic!("{other:?}"),
        }
        let stranger = crypto::generate_key();
        match check(&encode(1000, &[ev(&stranger, 9, 1000)]), &cx(&f, 1000)) {
            Err(ProposalError::Invalid { index: 0, reason: RejectReason::UnknownProducer, .. }) => {}
            other => panic!("{other:?}"),
        }
        // A tx the backup admitted itself is not verified again; a copy with
        // the same hash but another signature still is.
        let t = &good[2];
        f.mempool.admit(VerifiedTx { event: t.clone(), tx_hash: t.tx_hash(), received_ms: 0, pos: None });
        assert!(check(&encode(1000, &good), &cx(&f, 1000)).is_ok());
        let resigned = vec![good[0].clone(), bad_sig(t)];
        assert_eq!(resigned[1].tx_hash(), t.tx_hash());
        assert!(matches!(
            check(&encode(1000, &resigned), &cx(&f, 1000)),
            Err(ProposalError::Invalid { index: 1, reason: RejectReason::BadSignature, .. })
        ));
    }
}
