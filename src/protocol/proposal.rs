//! The PBFT value: the txs a primary proposes for the next height, named
//! by hash, its canonical encoding, and the checks every backup makes
//! before preparing it (DESIGN.md §3: replicas re-validate every tx).
//!
//! A value names each tx by a [`TxRef`] (64 bytes) instead of carrying it:
//! every validator receives every tx from the source, so the bodies cross
//! the network once, not once per backup, and the consensus log and view
//! changes stay small. A backup resolves the refs against the txs its own
//! shards verified and fetches the rest (`node`, `TxFetch`).
//!
//! The empty value is PBFT's null request (a gap filled by a new-view); it
//! becomes an empty block. A primary never proposes an empty tx list.

use crate::protocol::block::{Block, BuilderConfig};
use crate::protocol::consensus::pbft::{Proof, Rid, View};
use crate::protocol::consensus::wire::{proof_from, proof_to, WireLimits};
use crate::protocol::event::Event;
use crate::protocol::mempool::Mempool;
use crate::protocol::reject::RejectReason;
use crate::protocol::verify::{verify_events, VerifyPolicy};
use crate::{proto, sha256, Hash32};
use foldhash::{HashSet, HashSetExt};
use prost::Message;
use std::sync::Arc;

/// Who proposed a value and in which view. Part of the value, so that the
/// block header (view, proposer) is the same on every validator: a value
/// committed in view v at some replicas reaches the others re-proposed by
/// the new-view of v+1, under a certificate of that later view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Origin {
    pub view: View,
    pub proposer: Rid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// None for PBFT's null value (an empty block).
    pub origin: Option<Origin>,
    pub timestamp_ms: u64,
    pub txs: Vec<Arc<Event>>,
    pub tx_hashes: Vec<Hash32>,
    /// Proofs of misbehaviour to commit (each quarantines its culprit).
    pub evidence: Vec<Proof>,
}

/// How a value names a tx: its hash (SHA-256 of the signed bytes, the id
/// the state and the tx root use) and SHA-256 of its signature. The tx
/// hash alone would not do: a producer can sign the same bytes twice with
/// different (valid) signatures, and validators must store the same block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxRef {
    pub tx_hash: Hash32,
    pub sig_hash: Hash32,
}

/// Bytes per tx in a value.
pub const TX_REF_BYTES: usize = 64;

impl TxRef {
    pub fn of(event: &Event, tx_hash: Hash32) -> TxRef {
        TxRef { tx_hash, sig_hash: sha256(&event.signature) }
    }
    /// `event` is the very tx this names (its tx hash already compared).
    pub fn names(&self, event: &Event) -> bool {
        sha256(&event.signature) == self.sig_hash
    }
}

/// A decoded value, its txs not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub origin: Option<Origin>,
    pub timestamp_ms: u64,
    pub refs: Vec<TxRef>,
    pub evidence: Vec<Proof>,
}

impl Named {
    /// The proposal, given the bodies of `refs` in order (each checked by
    /// the caller against its ref).
    pub fn resolve(self, txs: Vec<Arc<Event>>) -> Proposal {
        assert_eq!(txs.len(), self.refs.len(), "one body per ref");
        let tx_hashes = self.refs.iter().map(|r| r.tx_hash).collect();
        Proposal { origin: self.origin, timestamp_ms: self.timestamp_ms, txs, tx_hashes, evidence: self.evidence }
    }
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
    #[error("the value says view {claimed_view} by validator {claimed_proposer}, but validator {from} proposed it in view {view}")]
    Origin { claimed_view: View, claimed_proposer: Rid, view: View, from: Rid },
    #[error("tx {index} fails verification ({reason}): {detail}")]
    Invalid { index: usize, reason: RejectReason, detail: String },
}

/// Canonical encoding of a proposal of `txs` (with their hashes).
pub fn encode(origin: Origin, timestamp_ms: u64, txs: &[Arc<Event>], tx_hashes: &[Hash32]) -> Vec<u8> {
    encode_with(origin, timestamp_ms, txs, tx_hashes, &[])
}

pub fn encode_with(
    origin: Origin,
    timestamp_ms: u64,
    txs: &[Arc<Event>],
    tx_hashes: &[Hash32],
    evidence: &[Proof],
) -> Vec<u8> {
    assert_eq!(txs.len(), tx_hashes.len(), "one hash per tx");
    let refs: Vec<TxRef> = txs.iter().zip(tx_hashes).map(|(t, h)| TxRef::of(t, *h)).collect();
    encode_refs(origin, timestamp_ms, &refs, evidence)
}

/// The `proto::Proposal` encoding, byte for byte (values are hashed: it
/// must be canonical).
pub fn encode_refs(origin: Origin, timestamp_ms: u64, refs: &[TxRef], evidence: &[Proof]) -> Vec<u8> {
    let mut tx_refs = Vec::with_capacity(refs.len() * TX_REF_BYTES);
    for r in refs {
        tx_refs.extend_from_slice(&r.tx_hash);
        tx_refs.extend_from_slice(&r.sig_hash);
    }
    proto::Proposal {
        timestamp_ms,
        evidence: evidence.iter().map(proof_to).collect(),
        tx_refs,
        view: origin.view,
        proposer: origin.proposer as u32,
    }
    .encode_to_vec()
}

/// What the block store keeps of a committed value: the Proposal without
/// its tx refs (the block has the txs), i.e. its timestamp and proofs;
/// empty for null.
pub fn stored_form(value: &[u8]) -> Vec<u8> {
    if value.is_empty() {
        return vec![];
    }
    // Field 4 (the refs) is skipped unparsed.
    proto::ProposalStored::decode(value).unwrap_or_default().encode_to_vec()
}

/// The proofs in a stored form (for replaying quarantines at startup).
pub fn stored_evidence(stored: &[u8]) -> Vec<Proof> {
    proofs(proto::ProposalStored::decode(stored).unwrap_or_default().evidence)
}

fn proofs(evidence: Vec<proto::PbftEvidence>) -> Vec<Proof> {
    evidence.into_iter().filter_map(|e| proof_from(e, &EVIDENCE_LIMITS).ok()).collect()
}

/// The value a stored block was ordered as, from its txs and the stored
/// form (blocks stored before it was kept: the header's timestamp).
pub fn value_of_block(b: &Block, stored: Option<&[u8]>) -> Vec<u8> {
    // Blocks stored without the stored form: one validator, proposer 0.
    let legacy = Origin { view: b.header.view, proposer: 0 };
    let (origin, timestamp_ms, evidence) = match stored {
        Some([]) => return vec![], // a null block
        Some(s) => match proto::ProposalStored::decode(s) {
            Ok(p) => {
                let origin = Origin { view: p.view, proposer: p.proposer as Rid };
                (origin, p.timestamp_ms, proofs(p.evidence))
            }
            Err(_) => (legacy, b.header.timestamp_ms, vec![]),
        },
        None if b.txs.is_empty() => return vec![],
        None => (legacy, b.header.timestamp_ms, vec![]),
    };
    encode_with(origin, timestamp_ms, &b.txs, &b.tx_hashes, &evidence)
}

/// Decodes a value; refuses any encoding other than the canonical one, so
/// that a stored block always re-encodes to the exact value PBFT ordered.
/// At most `max_txs` refs (a bound before anything is allocated per ref).
pub fn decode(bytes: &[u8], max_txs: usize) -> Result<Named, ProposalError> {
    let p = proto::Proposal::decode(bytes).map_err(|e| ProposalError::Decode(e.to_string()))?;
    if p.tx_refs.len() % TX_REF_BYTES != 0 {
        return Err(ProposalError::Decode(format!(
            "{} bytes of tx refs is not a whole number of refs",
            p.tx_refs.len()
        )));
    }
    let count = p.tx_refs.len() / TX_REF_BYTES;
    if count > max_txs {
        return Err(ProposalError::Decode(format!("{count} txs exceed the block limit of {max_txs}")));
    }
    if p.evidence.len() > MAX_EVIDENCE {
        return Err(ProposalError::Decode(format!("{} proofs exceed {MAX_EVIDENCE}", p.evidence.len())));
    }
    let refs: Vec<TxRef> = p
        .tx_refs
        .chunks_exact(TX_REF_BYTES)
        .map(|c| TxRef {
            tx_hash: c[..32].try_into().expect("32 bytes"),
            sig_hash: c[32..].try_into().expect("32 bytes"),
        })
        .collect();
    let evidence = p
        .evidence
        .into_iter()
        .map(|e| proof_from(e, &EVIDENCE_LIMITS))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProposalError::Decode(format!("evidence: {e}")))?;
    let origin = Origin { view: p.view, proposer: p.proposer as Rid };
    if encode_refs(origin, p.timestamp_ms, &refs, &evidence) != bytes {
        return Err(ProposalError::NotCanonical);
    }
    let origin = (!bytes.is_empty()).then_some(origin);
    Ok(Named { origin, timestamp_ms: p.timestamp_ms, refs, evidence })
}

/// What a backup checks a proposal against.
pub struct CheckContext<'a> {
    pub builder: &'a BuilderConfig,
    pub policy: &'a VerifyPolicy,
    /// Txs this validator verified itself (no second signature check).
    pub mempool: &'a Mempool,
    /// The checker's wall clock (the block timestamp's skew bound).
    pub wall_ms: u64,
    pub skew_ms: u64,
}

/// A fresh proposal names its own view and proposer (a value of an older
/// view reaches a replica only inside a new-view, which the replica checks).
pub fn check_origin(n: &Named, view: View, from: Rid) -> Result<(), ProposalError> {
    match n.origin {
        Some(o) if o == (Origin { view, proposer: from }) => Ok(()),
        Some(o) => Err(ProposalError::Origin { claimed_view: o.view, claimed_proposer: o.proposer, view, from }),
        None => Err(ProposalError::Empty),
    }
}

/// The checks a backup makes before it has the bodies: not empty, within
/// the tx count, not ahead of its clock, no tx named twice.
pub fn check_named(n: &Named, cx: &CheckContext) -> Result<(), ProposalError> {
    if n.refs.is_empty() && n.evidence.is_empty() {
        return Err(ProposalError::Empty);
    }
    if n.refs.len() > cx.builder.max_txs {
        return Err(ProposalError::TooLarge {
            txs: n.refs.len(),
            bytes: 0,
            max_txs: cx.builder.max_txs,
            max_bytes: cx.builder.max_bytes,
        });
    }
    if n.timestamp_ms > cx.wall_ms + cx.skew_ms {
        return Err(ProposalError::TimeAhead { ts: n.timestamp_ms, now: cx.wall_ms, skew_ms: cx.skew_ms });
    }
    let mut seen = HashSet::with_capacity(n.refs.len());
    for (i, r) in n.refs.iter().enumerate() {
        if !seen.insert(r.tx_hash) {
            return Err(ProposalError::Duplicate(i));
        }
    }
    Ok(())
}

/// Full validation of another validator's proposal, its bodies resolved
/// (each names its ref). Txs in the mempool were verified on admission;
/// the rest (fetched from peers) are verified here, in one batch.
pub fn check(p: &Proposal, cx: &CheckContext) -> Result<(), ProposalError> {
    let size: usize = p.txs.iter().map(|t| t.size()).sum();
    if p.txs.len() > cx.builder.max_txs || size > cx.builder.max_bytes {
        return Err(ProposalError::TooLarge {
            txs: p.txs.len(),
            bytes: size,
            max_txs: cx.builder.max_txs,
            max_bytes: cx.builder.max_bytes,
        });
    }
    let mut seen = HashSet::with_capacity(p.txs.len());
    let mut unknown: Vec<(usize, &Event)> = vec![];
    for (i, (tx, h)) in p.txs.iter().zip(&p.tx_hashes).enumerate() {
        if !seen.insert(tx.nonce) {
            return Err(ProposalError::Duplicate(i));
        }
        if cx.mempool.get(h).is_none_or(|m| !Arc::ptr_eq(&m.event, tx) && *m.event != **tx) {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::crypto;
    use crate::protocol::event::{sample_anomaly_payload, TxKind};
    use crate::protocol::mempool::{MempoolConfig, VerifiedTx};

    fn ev(k: &crypto::SigningKey, i: u64, ts: u64) -> Arc<Event> {
        let pk = crypto::public_key(k);
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&ts.to_be_bytes());
        nonce[8..12].copy_from_slice(&pk[..4]);
        nonce[12..].copy_from_slice(&(i as u32).to_be_bytes());
        Arc::new(Event::sign(TxKind::Anomaly, k, nonce, sample_anomaly_payload(i, 200), ts, (i as u32).to_be_bytes()))
    }

    fn hashes(txs: &[Arc<Event>]) -> Vec<Hash32> {
        txs.iter().map(|t| t.tx_hash()).collect()
    }

    fn proposal(ts: u64, txs: &[Arc<Event>]) -> Proposal {
        Proposal { origin: Some(ORIGIN), timestamp_ms: ts, txs: txs.to_vec(), tx_hashes: hashes(txs), evidence: vec![] }
    }

    const ORIGIN: Origin = Origin { view: 3, proposer: 2 };

    fn named(ts: u64, txs: &[Arc<Event>]) -> Named {
        decode(&encode(ORIGIN, ts, txs, &hashes(txs)), 1000).unwrap()
    }

    struct Fixture {
        builder: BuilderConfig,
        policy: VerifyPolicy,
        mempool: Mempool,
    }

    fn fixture(k: &crypto::SigningKey) -> Fixture {
        Fixture {
            builder: BuilderConfig { max_txs: 4, max_bytes: 1_200, ..BuilderConfig::default() },
            policy: VerifyPolicy { producers: [crypto::public_key(k)].into_iter().collect(), skew_ms: 60_000 },
            mempool: Mempool::new(MempoolConfig::default()),
        }
    }

    fn cx(f: &Fixture, now: u64) -> CheckContext<'_> {
        CheckContext { builder: &f.builder, policy: &f.policy, mempool: &f.mempool, wall_ms: now, skew_ms: 60_000 }
    }

    fn bad_sig(e: &Event) -> Arc<Event> {
        let mut b = e.clone();
        b.signature[0] ^= 1;
        Arc::new(b)
    }

    #[test]
    fn a_fresh_proposal_must_name_its_own_view_and_proposer() {
        let k = crypto::generate_key();
        let txs: Vec<_> = (0..2).map(|i| ev(&k, i, 1000)).collect();
        let n = named(1000, &txs);
        assert_eq!(n.origin, Some(ORIGIN), "carried through the encoding");
        assert_eq!(check_origin(&n, ORIGIN.view, ORIGIN.proposer), Ok(()));
        assert!(matches!(check_origin(&n, ORIGIN.view, 1), Err(ProposalError::Origin { .. })), "another proposer");
        assert!(matches!(check_origin(&n, ORIGIN.view + 1, 2), Err(ProposalError::Origin { .. })), "an older view");
        assert!(check_origin(&decode(&[], 10).unwrap(), 0, 0).is_err(), "the null value is never fresh");
        // The stored form keeps the origin: the value rebuilt from a block is the one ordered.
        let bytes = encode(ORIGIN, 1000, &txs, &hashes(&txs));
        let stored = proto::ProposalStored::decode(&stored_form(&bytes)[..]).unwrap();
        assert_eq!((stored.view, stored.proposer), (3, 2));
    }

    #[test]
    fn round_trip_is_canonical_names_each_tx_in_64_bytes_and_null_is_empty() {
        let k = crypto::generate_key();
        let txs: Vec<_> = (0..3).map(|i| ev(&k, i, 1000)).collect();
        let bytes = encode(ORIGIN, 1000, &txs, &hashes(&txs));
        let body_bytes: usize = txs.iter().map(|t| t.size()).sum();
        assert!(bytes.len() < 3 * TX_REF_BYTES + 16, "{} bytes for {body_bytes} of bodies", bytes.len());
        let n = decode(&bytes, 1000).unwrap();
        assert_eq!(n.refs[1], TxRef::of(&txs[1], txs[1].tx_hash()));
        assert!(n.refs[1].names(&txs[1]) && !n.refs[1].names(&bad_sig(&txs[1])));
        assert_eq!(n.clone().resolve(txs.clone()), proposal(1000, &txs));
        assert!(matches!(decode(&bytes, 2), Err(ProposalError::Decode(_))), "more refs than the block limit");
        assert!(decode(&[], 1000).unwrap().refs.is_empty(), "null value");
        // Refs that are not a whole number of 64 bytes.
        let torn = proto::Proposal { timestamp_ms: 1, tx_refs: vec![0; 65], ..Default::default() }.encode_to_vec();
        assert!(matches!(decode(&torn, 1000), Err(ProposalError::Decode(_))));
        // What the store keeps, and the value rebuilt from it.
        let stored = stored_form(&bytes);
        assert!(stored.len() < 16);
        let header = crate::protocol::block::BlockHeader {
            height: 1,
            view: 0,
            timestamp_ms: 1234, // the block's (monotonic) time may differ from the proposal's
            previous_hash: [0; 32],
            tx_root: [0; 32],
            state_root: [0; 32],
            proposer: [0; 32],
            tx_count: 3,
        };
        let block = Block { header, txs: txs.clone(), tx_hashes: hashes(&txs) };
        assert_eq!(value_of_block(&block, Some(&stored)), bytes);
        assert_eq!(stored_form(&[]), Vec::<u8>::new());
        // With a proof of misbehaviour: kept in the stored form too.
        use crate::protocol::consensus::pbft::{Phase, Signed, Vote};
        let vote = |d: u8| Signed {
            body: Vote { phase: Phase::Commit, view: 2, seq: 9, digest: [d; 32] },
            from: 3,
            sig: vec![d; 64],
        };
        let proof = Proof::Votes(vote(1), vote(2));
        let with = encode_with(ORIGIN, 1000, &txs, &hashes(&txs), std::slice::from_ref(&proof));
        let n = decode(&with, 1000).unwrap();
        assert_eq!(n.evidence, vec![proof.clone()]);
        let stored = stored_form(&with);
        assert_eq!(stored_evidence(&stored), vec![proof]);
        assert_eq!(value_of_block(&block, Some(&stored)), with);
        // The same message with a field repeated is not canonical.
        let mut dup = bytes.clone();
        dup.extend_from_slice(&proto::Proposal { timestamp_ms: 1000, ..Default::default() }.encode_to_vec());
        assert_eq!(decode(&dup, 1000), Err(ProposalError::NotCanonical));
    }

    #[test]
    fn backups_refuse_invalid_proposals_with_the_reason() {
        let k = crypto::generate_key();
        let mut f = fixture(&k);
        let good: Vec<_> = (0..3).map(|i| ev(&k, i, 1000)).collect();
        assert_eq!(check_named(&named(1000, &good), &cx(&f, 1000)), Ok(()));
        assert_eq!(check(&proposal(1000, &good), &cx(&f, 1000)), Ok(()));
        assert_eq!(check_named(&named(1000, &[]), &cx(&f, 1000)), Err(ProposalError::Empty));
        let five: Vec<_> = (0..5).map(|i| ev(&k, i, 1000)).collect();
        assert!(matches!(check_named(&named(1000, &five), &cx(&f, 1000)), Err(ProposalError::TooLarge { .. })));
        // Within the count but over the bytes: known only with the bodies.
        let big: Vec<_> = (0..4).map(|i| ev(&k, i, 1000)).collect();
        assert_eq!(check_named(&named(1000, &big), &cx(&f, 1000)), Ok(()));
        assert!(matches!(check(&proposal(1000, &big), &cx(&f, 1000)), Err(ProposalError::TooLarge { .. })));
        let twice = vec![good[0].clone(), good[0].clone()];
        assert_eq!(check_named(&named(1000, &twice), &cx(&f, 1000)), Err(ProposalError::Duplicate(1)));
        // Two txs sharing a nonce (another tx hash): caught with the bodies.
        let mut twin = (*good[1]).clone();
        twin.nonce = good[0].nonce;
        let twin = Arc::new(twin);
        assert_eq!(check(&proposal(1000, &[good[0].clone(), twin]), &cx(&f, 1000)), Err(ProposalError::Duplicate(1)));
        // A clock behind the last block's is not refused: block time is kept
        // monotonic at execution instead.
        assert_eq!(check_named(&named(800, &good), &cx(&f, 1000)), Ok(()));
        assert!(matches!(check_named(&named(99_999, &good), &cx(&f, 1000)), Err(ProposalError::TimeAhead { .. })));
        let forged = vec![good[0].clone(), bad_sig(&good[1])];
        match check(&proposal(1000, &forged), &cx(&f, 1000)) {
            Err(ProposalError::Invalid { index: 1, reason: RejectReason::BadSignature, .. }) => {}
            other => panic!("{other:?}"),
        }
        let stranger = crypto::generate_key();
        match check(&proposal(1000, &[ev(&stranger, 9, 1000)]), &cx(&f, 1000)) {
            Err(ProposalError::Invalid { index: 0, reason: RejectReason::UnknownProducer, .. }) => {}
            other => panic!("{other:?}"),
        }
        // A tx the backup admitted itself is not verified again; a copy with
        // the same hash but another signature still is.
        let t = &good[2];
        f.mempool.admit(VerifiedTx { event: t.clone(), tx_hash: t.tx_hash(), received_ms: 0, pos: None });
        assert_eq!(check(&proposal(1000, &good), &cx(&f, 1000)), Ok(()));
        let resigned = vec![good[0].clone(), bad_sig(t)];
        assert_eq!(resigned[1].tx_hash(), t.tx_hash());
        assert!(matches!(
            check(&proposal(1000, &resigned), &cx(&f, 1000)),
            Err(ProposalError::Invalid { index: 1, reason: RejectReason::BadSignature, .. })
        ));
    }
}
