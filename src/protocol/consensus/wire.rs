//! PBFT messages on the wire (protobuf `PbftMessage`, one per QUIC frame),
//! and the Ed25519 `Auth` the validator uses.
//!
//! Decoding never panics and bounds everything a peer controls: replica ids
//! below N, digests of 32 bytes, signatures of at most 64 bytes, values and
//! lists within the limits. Signatures are checked by the replica, not here.

use super::genesis::ReadyAttestation;
use super::pbft::*;
use crate::protocol::crypto::{self, PublicKey, SigningKey};
use crate::{proto, Hash32};
use prost::Message as _;
use std::sync::Arc;

/// Ed25519 signatures by the validator's key; verification against the
/// configured validator keys (replica id = index in the sorted validator set).
#[derive(Clone)]
pub struct Ed25519Auth {
    key: SigningKey,
    /// The key this validator rotates to (`node.next_key_file`): it signs
    /// with it from the epoch whose set names it.
    next: Option<SigningKey>,
    keys: Arc<Vec<PublicKey>>,
    epoch: u64,
}

impl Ed25519Auth {
    pub fn new(key: SigningKey, keys: Vec<PublicKey>) -> Self {
        Ed25519Auth { key, next: None, keys: Arc::new(keys), epoch: 0 }
    }

    /// The same, able to sign with `next` once a set names it.
    pub fn with_next_key(mut self, next: Option<SigningKey>) -> Self {
        self.next = next;
        self
    }
}

impl Auth for Ed25519Auth {
    fn sign(&self, bytes: &[u8]) -> Vec<u8> {
        crypto::sign(&self.key, &in_epoch(self.epoch, bytes)).to_vec()
    }
    fn verify(&self, signer: Rid, bytes: &[u8], sig: &[u8]) -> bool {
        let (Some(k), Ok(sig)) = (self.keys.get(signer), <&[u8; 64]>::try_from(sig)) else { return false };
        crypto::verify_one(k, &in_epoch(self.epoch, bytes), sig).is_ok()
    }
}

impl EpochAuth for Ed25519Auth {
    fn for_epoch(&self, epoch: u64, keys: &[PublicKey]) -> Option<(Rid, Self)> {
        let mine = |k: &SigningKey| keys.iter().position(|p| *p == crypto::public_key(k)).map(|r| (r, k.clone()));
        let (rid, key) = mine(&self.key).or_else(|| self.next.as_ref().and_then(mine))?;
        let next = self.next.clone().filter(|n| crypto::public_key(n) != crypto::public_key(&key));
        Some((rid, Ed25519Auth { key, next, keys: Arc::new(keys.to_vec()), epoch }))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct WireLimits {
    pub n: usize,
    pub max_value_bytes: usize,
    /// Longest list of pre-prepares / certificates (the watermark window).
    pub window: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a PBFT message: {0}")]
    Decode(String),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("{0} out of range")]
    Range(&'static str),
}

fn digest(v: Vec<u8>) -> Result<Hash32, WireError> {
    v.try_into().map_err(|_| WireError::Range("digest length"))
}
fn rid(from: u32, l: &WireLimits) -> Result<Rid, WireError> {
    let r = from as usize;
    if r < l.n {
        Ok(r)
    } else {
        Err(WireError::Range("replica id"))
    }
}
fn sig(s: Vec<u8>) -> Result<Vec<u8>, WireError> {
    if s.len() > 64 {
        return Err(WireError::Range("signature length"));
    }
    Ok(s)
}
fn bounded<T>(v: Vec<T>, max: usize, what: &'static str) -> Result<Vec<T>, WireError> {
    if v.len() > max {
        return Err(WireError::Range(what));
    }
    Ok(v)
}

fn pp_to(p: &Signed<PrePrepare>) -> proto::PbftPrePrepare {
    proto::PbftPrePrepare {
        view: p.body.view,
        seq: p.body.seq,
        digest: p.body.digest.to_vec(),
        value: p.body.value.to_vec(),
        from: p.from as u32,
        sig: p.sig.clone(),
    }
}
fn pp_from(p: proto::PbftPrePrepare, l: &WireLimits) -> Result<Signed<PrePrepare>, WireError> {
    if p.value.len() > l.max_value_bytes {
        return Err(WireError::Range("value size"));
    }
    Ok(Signed {
        body: PrePrepare { view: p.view, seq: p.seq, digest: digest(p.digest)?, value: Arc::new(p.value) },
        from: rid(p.from, l)?,
        sig: sig(p.sig)?,
    })
}
fn vote_to(v: &Signed<Vote>) -> proto::PbftVote {
    proto::PbftVote {
        commit: v.body.phase == Phase::Commit,
        view: v.body.view,
        seq: v.body.seq,
        digest: v.body.digest.to_vec(),
        from: v.from as u32,
        sig: v.sig.clone(),
    }
}
fn vote_from(v: proto::PbftVote, l: &WireLimits) -> Result<Signed<Vote>, WireError> {
    let phase = if v.commit { Phase::Commit } else { Phase::Prepare };
    Ok(Signed {
        body: Vote { phase, view: v.view, seq: v.seq, digest: digest(v.digest)? },
        from: rid(v.from, l)?,
        sig: sig(v.sig)?,
    })
}
fn ck_to(c: &Signed<Checkpoint>) -> proto::PbftCheckpoint {
    proto::PbftCheckpoint {
        seq: c.body.seq,
        state: c.body.state.to_vec(),
        from: c.from as u32,
        sig: c.sig.clone(),
        app: c.body.app.to_vec(),
    }
}
fn ck_from(c: proto::PbftCheckpoint, l: &WireLimits) -> Result<Signed<Checkpoint>, WireError> {
    Ok(Signed {
        body: Checkpoint { seq: c.seq, state: digest(c.state)?, app: digest(c.app)? },
        from: rid(c.from, l)?,
        sig: sig(c.sig)?,
    })
}
fn vc_to(v: &Signed<ViewChange>) -> proto::PbftViewChange {
    proto::PbftViewChange {
        new_view: v.body.new_view,
        stable_seq: v.body.stable_seq,
        stable_proof: v.body.stable_proof.iter().map(ck_to).collect(),
        prepared: v.body.prepared.iter().map(cert_to).collect(),
        from: v.from as u32,
        sig: v.sig.clone(),
    }
}
fn vc_from(v: proto::PbftViewChange, l: &WireLimits) -> Result<Signed<ViewChange>, WireError> {
    let stable_proof =
        bounded(v.stable_proof, l.n, "stable proof")?.into_iter().map(|c| ck_from(c, l)).collect::<Result<_, _>>()?;
    let prepared = bounded(v.prepared, l.window, "prepared certificates")?
        .into_iter()
        .map(|c| cert_from(c, l))
        .collect::<Result<_, _>>()?;
    Ok(Signed {
        body: ViewChange { new_view: v.new_view, stable_seq: v.stable_seq, stable_proof, prepared },
        from: rid(v.from, l)?,
        sig: sig(v.sig)?,
    })
}

fn cert_to(c: &PreparedCert) -> proto::PbftPreparedCert {
    proto::PbftPreparedCert {
        pre_prepare: Some(pp_to(&c.pre_prepare)),
        prepares: c.prepares.iter().map(vote_to).collect(),
    }
}
fn cert_from(c: proto::PbftPreparedCert, l: &WireLimits) -> Result<PreparedCert, WireError> {
    Ok(PreparedCert {
        pre_prepare: pp_from(c.pre_prepare.ok_or(WireError::Missing("pre_prepare"))?, l)?,
        prepares: bounded(c.prepares, l.n, "prepares")?
            .into_iter()
            .map(|v| vote_from(v, l))
            .collect::<Result<_, _>>()?,
    })
}

/// Largest QUIC frame between validators, derived from the limits so a
/// legitimate one always fits: a new-view carries the view changes of a
/// quorum, each with up to a window of prepared proposals (values with
/// their prepare votes), plus the new primary's re-proposals, i.e.
/// (q + 1) × window values. (A fixed 64 MiB cap refused the new-views of a
/// loaded devnet with 4 KB payloads, and the cluster looped in view changes,
/// when values carried their txs.) The slack holds the other large frames:
/// a snapshot chunk, tx bodies, a tx forward (each at most ~1 MiB).
pub fn max_frame(wire: &WireLimits, q: usize) -> usize {
    let per_value = wire.max_value_bytes + wire.n * 256; // + a signed vote per validator
    (q + 1).saturating_mul(wire.window).saturating_mul(per_value).saturating_add(FRAME_SLACK_BYTES)
}

/// See `max_frame`.
pub const FRAME_SLACK_BYTES: usize = 2 << 20;

/// Encodes a durable consensus record (see `consensus::log`).
pub fn encode_record(r: &Record) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_record_into(r, &mut buf);
    buf
}

/// `encode_record`, appended to `buf`.
pub fn encode_record_into(r: &Record, buf: &mut Vec<u8>) {
    use proto::pbft_record::Rec;
    let rec = match r {
        Record::View { view, changing, excluded } => Rec::View(proto::PbftView {
            view: *view,
            changing: *changing,
            excluded: excluded.iter().flatten().map(|&r| r as u32).collect(),
            excluded_known: excluded.is_some(),
        }),
        Record::PrePrepare(p) => Rec::PrePrepare(pp_to(p)),
        Record::Vote(v) => Rec::Vote(vote_to(v)),
        Record::Prepared(c) => Rec::Prepared(cert_to(c)),
        Record::ViewChange(v) => Rec::ViewChange(vc_to(v)),
        Record::NewView(n) => Rec::NewView(nv_to(n)),
        Record::Stable { seq, proof } => {
            Rec::Stable(proto::PbftStable { seq: *seq, proof: proof.iter().map(ck_to).collect() })
        }
        Record::Epoch { epoch, base } => Rec::Epoch(proto::PbftEpoch { epoch: *epoch, base: *base }),
    };
    let rec = proto::PbftRecord { rec: Some(rec) };
    buf.reserve(rec.encoded_len());
    rec.encode_raw(buf);
}

pub fn decode_record(bytes: &[u8], l: &WireLimits) -> Result<Record, WireError> {
    use proto::pbft_record::Rec;
    let r = proto::PbftRecord::decode(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(match r.rec.ok_or(WireError::Missing("rec"))? {
        Rec::View(v) => Record::View {
            view: v.view,
            changing: v.changing,
            excluded: if v.excluded_known {
                Some(bounded(v.excluded, l.n, "excluded replicas")?.into_iter().map(|r| r as Rid).collect())
            } else {
                None
            },
        },
        Rec::PrePrepare(p) => Record::PrePrepare(pp_from(p, l)?),
        Rec::Vote(v) => Record::Vote(vote_from(v, l)?),
        Rec::Prepared(c) => Record::Prepared(cert_from(c, l)?),
        Rec::ViewChange(v) => Record::ViewChange(vc_from(v, l)?),
        Rec::NewView(n) => Record::NewView(nv_from(n, l)?),
        Rec::Stable(s) => Record::Stable {
            seq: s.seq,
            proof: bounded(s.proof, l.n, "stable proof")?
                .into_iter()
                .map(|c| ck_from(c, l))
                .collect::<Result<_, _>>()?,
        },
        Rec::Epoch(e) => Record::Epoch { epoch: e.epoch, base: e.base },
    })
}

/// A proof of misbehaviour as protobuf (carried in proposals).
pub fn proof_to(p: &Proof) -> proto::PbftEvidence {
    match p {
        Proof::PrePrepares(a, b) => {
            proto::PbftEvidence { pre_prepare_a: Some(pp_to(a)), pre_prepare_b: Some(pp_to(b)), ..Default::default() }
        }
        Proof::Votes(a, b) => {
            proto::PbftEvidence { vote_a: Some(vote_to(a)), vote_b: Some(vote_to(b)), ..Default::default() }
        }
    }
}

pub fn proof_from(e: proto::PbftEvidence, l: &WireLimits) -> Result<Proof, WireError> {
    match e {
        proto::PbftEvidence { pre_prepare_a: Some(a), pre_prepare_b: Some(b), vote_a: None, vote_b: None } => {
            Ok(Proof::PrePrepares(pp_from(a, l)?, pp_from(b, l)?))
        }
        proto::PbftEvidence { pre_prepare_a: None, pre_prepare_b: None, vote_a: Some(a), vote_b: Some(b) } => {
            Ok(Proof::Votes(vote_from(a, l)?, vote_from(b, l)?))
        }
        _ => Err(WireError::Decode("evidence must be two pre-prepares or two votes".into())),
    }
}

/// A commit certificate as protobuf (also how the block store keeps it).
pub fn commit_cert_to(c: &CommitCert) -> proto::PbftCommitCert {
    proto::PbftCommitCert { pre_prepare: Some(pp_to(&c.pre_prepare)), commits: c.commits.iter().map(vote_to).collect() }
}

pub fn commit_cert_from(c: proto::PbftCommitCert, l: &WireLimits) -> Result<CommitCert, WireError> {
    Ok(CommitCert {
        pre_prepare: pp_from(c.pre_prepare.ok_or(WireError::Missing("pre_prepare"))?, l)?,
        commits: bounded(c.commits, l.n, "commits")?.into_iter().map(|v| vote_from(v, l)).collect::<Result<_, _>>()?,
    })
}

/// Encodes a message for the wire.
pub fn encode(m: &Message) -> Vec<u8> {
    use proto::pbft_message::Msg;
    let msg = match m {
        Message::PrePrepare(p) => Msg::PrePrepare(pp_to(p)),
        Message::Vote(v) => Msg::Vote(vote_to(v)),
        Message::Checkpoint(c) => Msg::Checkpoint(ck_to(c)),
        Message::ViewChange(v) => Msg::ViewChange(vc_to(v)),
        Message::NewView(n) => Msg::NewView(nv_to(n)),
        Message::Fetch { from, from_seq } => Msg::Fetch(proto::PbftFetch { from: *from as u32, from_seq: *from_seq }),
        Message::Committed(c) => Msg::Committed(commit_cert_to(c)),
        Message::Heartbeat(h) => Msg::Heartbeat(proto::PbftHeartbeat {
            view: h.body.view,
            from: h.from as u32,
            sig: h.sig.clone(),
            executed: h.body.executed,
            epoch: h.body.epoch,
        }),
    };
    proto::PbftMessage { msg: Some(msg) }.encode_to_vec()
}

fn nv_to(n: &Signed<NewView>) -> proto::PbftNewView {
    proto::PbftNewView {
        view: n.body.view,
        view_changes: n.body.view_changes.iter().map(vc_to).collect(),
        pre_prepares: n.body.pre_prepares.iter().map(pp_to).collect(),
        from: n.from as u32,
        sig: n.sig.clone(),
    }
}

fn nv_from(n: proto::PbftNewView, l: &WireLimits) -> Result<Signed<NewView>, WireError> {
    Ok(Signed {
        body: NewView {
            view: n.view,
            view_changes: bounded(n.view_changes, l.n, "view changes")?
                .into_iter()
                .map(|v| vc_from(v, l))
                .collect::<Result<_, _>>()?,
            pre_prepares: bounded(n.pre_prepares, l.window, "pre-prepares")?
                .into_iter()
                .map(|p| pp_from(p, l))
                .collect::<Result<_, _>>()?,
        },
        from: rid(n.from, l)?,
        sig: sig(n.sig)?,
    })
}

/// Decodes and bounds a message from a peer.
pub fn decode(bytes: &[u8], l: &WireLimits) -> Result<Message, WireError> {
    from_proto(proto::PbftMessage::decode(bytes).map_err(|e| WireError::Decode(e.to_string()))?, l)
}

fn from_proto(m: proto::PbftMessage, l: &WireLimits) -> Result<Message, WireError> {
    use proto::pbft_message::Msg;
    Ok(match m.msg.ok_or(WireError::Missing("msg"))? {
        Msg::PrePrepare(p) => Message::PrePrepare(pp_from(p, l)?),
        Msg::Vote(v) => Message::Vote(vote_from(v, l)?),
        Msg::Checkpoint(c) => Message::Checkpoint(ck_from(c, l)?),
        Msg::ViewChange(v) => Message::ViewChange(vc_from(v, l)?),
        Msg::NewView(n) => Message::NewView(nv_from(n, l)?),
        Msg::Fetch(f) => Message::Fetch { from: rid(f.from, l)?, from_seq: f.from_seq },
        Msg::Committed(c) => Message::Committed(commit_cert_from(c, l)?),
        Msg::Heartbeat(h) => Message::Heartbeat(Signed {
            body: Heartbeat { view: h.view, executed: h.executed, epoch: h.epoch },
            from: rid(h.from, l)?,
            sig: sig(h.sig)?,
        }),
        Msg::GenesisReady(_)
        | Msg::SnapshotRequest(_)
        | Msg::SnapshotChunk(_)
        | Msg::TxForward(_)
        | Msg::Alive(_)
        | Msg::TxFetch(_)
        | Msg::TxBodies(_)
        | Msg::FetchPruned(_) => return Err(WireError::Decode("not a PBFT message".into())),
    })
}

/// Anything a validator sends another: PBFT, or a genesis attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Pbft(Message),
    Genesis(ReadyAttestation),
    SnapshotRequest(proto::SnapshotRequest),
    SnapshotChunk(proto::SnapshotChunk),
    /// Forwarded txs, still encoded (the core decodes them with its event
    /// limits and verifies them); at most [`MAX_FORWARD_TXS`].
    Forward(Vec<proto::Transaction>),
    /// A peer's liveness beacon (no content).
    Alive,
    /// A peer asks for the bodies of txs (by tx hash) of the value at `seq`;
    /// at most [`MAX_FETCH_TXS`].
    TxFetch {
        seq: Seq,
        tx_hashes: Vec<Hash32>,
    },
    /// Tx bodies for the value at `seq`, still encoded (the core decodes
    /// them with its event limits); at most [`MAX_FETCH_TXS`].
    TxBodies {
        seq: Seq,
        txs: Vec<proto::Transaction>,
    },
    /// The peer has pruned the blocks a fetch asked for; it stores from
    /// `lowest` on.
    FetchPruned {
        lowest: u64,
    },
}

/// Most txs one tx fetch asks for, or one bodies message carries (a block
/// holds at most `block.max_txs`, 500 by default).
pub const MAX_FETCH_TXS: usize = 4096;

/// Bytes of tx bodies (events) one bodies or forward message carries at
/// most, besides the first tx, so it fits in a frame's slack.
pub const MAX_BODIES_BYTES: usize = 1 << 20;

/// Encodes a tx fetch (see `Frame::TxFetch`).
pub fn encode_tx_fetch(seq: Seq, tx_hashes: &[Hash32]) -> Vec<u8> {
    use proto::pbft_message::Msg;
    debug_assert!(tx_hashes.len() <= MAX_FETCH_TXS);
    let f = proto::TxFetch { seq, tx_hashes: tx_hashes.iter().map(|h| h.to_vec()).collect() };
    proto::PbftMessage { msg: Some(Msg::TxFetch(f)) }.encode_to_vec()
}

/// Encodes tx bodies (see `Frame::TxBodies`), as many messages as
/// `MAX_FETCH_TXS` and `MAX_BODIES_BYTES` ask for.
pub fn encode_tx_bodies(seq: Seq, txs: &[Arc<crate::protocol::event::Event>]) -> Vec<Vec<u8>> {
    use proto::pbft_message::Msg;
    let mut frames = vec![];
    let mut chunk: Vec<proto::Transaction> = vec![];
    let mut bytes = 0;
    let mut flush = |chunk: &mut Vec<proto::Transaction>| {
        let b = proto::TxBodies { seq, txs: std::mem::take(chunk) };
        frames.push(proto::PbftMessage { msg: Some(Msg::TxBodies(b)) }.encode_to_vec());
    };
    for t in txs {
        let size = t.size();
        if !chunk.is_empty() && (chunk.len() == MAX_FETCH_TXS || bytes + size > MAX_BODIES_BYTES) {
            // (A tx is at most `Limits::max_event_bytes`, far below this.)
            flush(&mut chunk);
            bytes = 0;
        }
        bytes += size;
        chunk.push(t.to_tx_proto());
    }
    if !chunk.is_empty() {
        flush(&mut chunk);
    }
    frames
}

/// Encodes a liveness beacon (see `Frame::Alive`).
/// Encodes the answer to a fetch below what this validator stores.
pub fn encode_fetch_pruned(lowest: u64) -> Vec<u8> {
    use proto::pbft_message::Msg;
    proto::PbftMessage { msg: Some(Msg::FetchPruned(proto::FetchPruned { lowest })) }.encode_to_vec()
}

pub fn encode_alive() -> Vec<u8> {
    use proto::pbft_message::Msg;
    proto::PbftMessage { msg: Some(Msg::Alive(proto::PeerAlive {})) }.encode_to_vec()
}

/// Most txs in one forward message.
pub const MAX_FORWARD_TXS: usize = 256;

/// Encodes a tx forward (see `Frame::Forward`).
pub fn encode_forward(txs: &[Arc<crate::protocol::event::Event>]) -> Vec<u8> {
    use proto::pbft_message::Msg;
    debug_assert!(txs.len() <= MAX_FORWARD_TXS);
    let txs = txs.iter().map(|t| t.to_tx_proto()).collect();
    proto::PbftMessage { msg: Some(Msg::TxForward(proto::TxForward { txs })) }.encode_to_vec()
}

/// Snapshot transfer frames (their content is checked when the whole
/// snapshot is: against a stable checkpoint's signatures).
pub fn encode_snapshot_request(r: proto::SnapshotRequest) -> Vec<u8> {
    proto::PbftMessage { msg: Some(proto::pbft_message::Msg::SnapshotRequest(r)) }.encode_to_vec()
}
pub fn encode_snapshot_chunk(c: proto::SnapshotChunk) -> Vec<u8> {
    proto::PbftMessage { msg: Some(proto::pbft_message::Msg::SnapshotChunk(c)) }.encode_to_vec()
}

pub fn checkpoint_to(c: &Signed<Checkpoint>) -> proto::PbftCheckpoint {
    ck_to(c)
}
pub fn checkpoint_from(c: proto::PbftCheckpoint, l: &WireLimits) -> Result<Signed<Checkpoint>, WireError> {
    ck_from(c, l)
}

pub fn encode_genesis(a: &ReadyAttestation) -> Vec<u8> {
    use proto::pbft_message::Msg;
    let g = proto::GenesisReady {
        validator: a.validator,
        config_hash: a.config_hash.to_vec(),
        peer_hash: a.peer_hash.to_vec(),
        timestamp_ms: a.timestamp_ms,
        signature: a.signature.to_vec(),
    };
    proto::PbftMessage { msg: Some(Msg::GenesisReady(g)) }.encode_to_vec()
}

/// Decodes a frame from a peer (bounded like `decode`).
pub fn decode_frame(bytes: &[u8], l: &WireLimits) -> Result<Frame, WireError> {
    use proto::pbft_message::Msg;
    let m = proto::PbftMessage::decode(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    match m.msg {
        Some(Msg::GenesisReady(g)) => Ok(Frame::Genesis(ReadyAttestation {
            validator: g.validator,
            config_hash: digest(g.config_hash)?,
            peer_hash: digest(g.peer_hash)?,
            timestamp_ms: g.timestamp_ms,
            signature: g.signature.try_into().map_err(|_| WireError::Range("signature length"))?,
        })),
        Some(Msg::SnapshotRequest(r)) => Ok(Frame::SnapshotRequest(r)),
        Some(Msg::SnapshotChunk(c)) => Ok(Frame::SnapshotChunk(c)),
        Some(Msg::TxForward(f)) => Ok(Frame::Forward(bounded(f.txs, MAX_FORWARD_TXS, "forwarded txs")?)),
        Some(Msg::Alive(_)) => Ok(Frame::Alive),
        Some(Msg::TxFetch(f)) => Ok(Frame::TxFetch {
            seq: f.seq,
            tx_hashes: bounded(f.tx_hashes, MAX_FETCH_TXS, "fetched tx hashes")?
                .into_iter()
                .map(digest)
                .collect::<Result<_, _>>()?,
        }),
        Some(Msg::TxBodies(b)) => Ok(Frame::TxBodies { seq: b.seq, txs: bounded(b.txs, MAX_FETCH_TXS, "tx bodies")? }),
        Some(Msg::FetchPruned(p)) => Ok(Frame::FetchPruned { lowest: p.lowest }),
        _ => from_proto(m, l).map(Frame::Pbft),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sha256;
    use proptest::prelude::*;

    const L: WireLimits = WireLimits { n: 4, max_value_bytes: 1 << 16, window: 16 };

    fn samples() -> Vec<Message> {
        let keys: Vec<SigningKey> = (0..4u8).map(|i| SigningKey::from_bytes(&[i + 1; 32])).collect();
        let auth = Ed25519Auth::new(keys[0].clone(), keys.iter().map(crypto::public_key).collect());
        let value: Value = Arc::new(b"block".to_vec());
        let pp = PrePrepare { view: 0, seq: 1, digest: sha256(&value), value };
        let spp = Signed { sig: auth.sign(&pp_bytes(&pp)), body: pp, from: 0 };
        let vote = Vote { phase: Phase::Commit, view: 0, seq: 1, digest: spp.body.digest };
        let sv = Signed { sig: auth.sign(&vote_bytes(&vote)), body: vote, from: 0 };
        let ck = Signed { body: Checkpoint { seq: 8, state: [3; 32], app: [4; 32] }, from: 2, sig: vec![1; 64] };
        let vc = Signed {
            body: ViewChange {
                new_view: 1,
                stable_seq: 8,
                stable_proof: vec![ck.clone()],
                prepared: vec![PreparedCert { pre_prepare: spp.clone(), prepares: vec![sv.clone()] }],
            },
            from: 1,
            sig: vec![2; 64],
        };
        vec![
            Message::PrePrepare(spp.clone()),
            Message::Vote(sv.clone()),
            Message::Checkpoint(ck),
            Message::ViewChange(vc.clone()),
            Message::NewView(Signed {
                body: NewView { view: 1, view_changes: vec![vc], pre_prepares: vec![spp.clone()] },
                from: 1,
                sig: vec![4; 64],
            }),
            Message::Fetch { from: 3, from_seq: 9 },
            Message::Committed(CommitCert { pre_prepare: spp, commits: vec![sv] }),
            Message::Heartbeat(Signed {
                body: Heartbeat { view: 5, executed: 9, epoch: 2 },
                from: 1,
                sig: vec![5; 64],
            }),
        ]
    }

    #[test]
    fn the_largest_new_view_fits_the_frame_limit() {
        // A quorum of view changes, each with a full window of prepared
        // certificates of the largest values, plus a window of re-proposals.
        let big: Value = Arc::new(vec![7; L.max_value_bytes]);
        let pp = |seq| Signed {
            body: PrePrepare { view: 0, seq, digest: sha256(&big), value: big.clone() },
            from: 0,
            sig: vec![1; 64],
        };
        let vote = |seq, from| Signed {
            body: Vote { phase: Phase::Prepare, view: 0, seq, digest: sha256(&big) },
            from,
            sig: vec![2; 64],
        };
        let q = 3;
        let window = L.window as u64;
        let ck = Signed { body: Checkpoint { seq: 16, state: [3; 32], app: [4; 32] }, from: 2, sig: vec![1; 64] };
        let vc = |from| Signed {
            body: ViewChange {
                new_view: 1,
                stable_seq: 16,
                stable_proof: vec![ck.clone(); q],
                prepared: (17..17 + window)
                    .map(|s| PreparedCert { pre_prepare: pp(s), prepares: (1..L.n).map(|f| vote(s, f)).collect() })
                    .collect(),
            },
            from,
            sig: vec![3; 64],
        };
        let nv = Message::NewView(Signed {
            body: NewView {
                view: 1,
                view_changes: (0..q).map(vc).collect(),
                pre_prepares: (17..17 + window).map(pp).collect(),
            },
            from: 1,
            sig: vec![4; 64],
        });
        let bytes = encode(&nv);
        let limit = max_frame(&L, q);
        assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
        // Besides its fixed slack, the limit is not loose.
        assert!(bytes.len() > (limit - FRAME_SLACK_BYTES) * 9 / 10, "{} of {limit}", bytes.len());
        assert_eq!(decode_frame(&bytes, &L), Ok(Frame::Pbft(nv)));
    }

    #[test]
    fn tx_forwards_round_trip_and_are_bounded() {
        use crate::protocol::event::{sample_anomaly_payload, Event, TxKind};
        let k = SigningKey::from_bytes(&[9; 32]);
        let txs: Vec<Arc<Event>> = (0..3u8)
            .map(|i| {
                Arc::new(Event::sign(TxKind::Anomaly, &k, [i; 16], sample_anomaly_payload(i as u64, 50), 7, [i; 4]))
            })
            .collect();
        let Ok(Frame::Forward(back)) = decode_frame(&encode_forward(&txs), &L) else { panic!("not a forward") };
        let limits = crate::protocol::event::Limits::default();
        let back: Vec<Event> = back.into_iter().map(|t| Event::from_tx_proto(t, &limits).unwrap()).collect();
        assert!(back.iter().zip(&txs).all(|(a, b)| a == &**b));
        let many = proto::TxForward { txs: vec![txs[0].to_tx_proto(); MAX_FORWARD_TXS + 1] };
        let bytes = proto::PbftMessage { msg: Some(proto::pbft_message::Msg::TxForward(many)) }.encode_to_vec();
        assert!(matches!(decode_frame(&bytes, &L), Err(WireError::Range(_))));
        // Not a PBFT message: `decode` (PBFT only) refuses it.
        assert!(decode(&encode_forward(&txs), &L).is_err());
        assert_eq!(decode_frame(&encode_alive(), &L), Ok(Frame::Alive));
    }

    #[test]
    fn tx_fetches_and_bodies_round_trip_split_to_fit_a_frame_and_are_bounded() {
        use crate::protocol::event::{sample_anomaly_payload, Event, TxKind};
        let k = SigningKey::from_bytes(&[9; 32]);
        let hashes = vec![[1u8; 32], [2u8; 32]];
        assert_eq!(
            decode_frame(&encode_tx_fetch(7, &hashes), &L),
            Ok(Frame::TxFetch { seq: 7, tx_hashes: hashes.clone() })
        );
        let short = proto::TxFetch { seq: 7, tx_hashes: vec![vec![1; 31]] };
        let bytes = proto::PbftMessage { msg: Some(proto::pbft_message::Msg::TxFetch(short)) }.encode_to_vec();
        assert!(matches!(decode_frame(&bytes, &L), Err(WireError::Range(_))), "a hash of 31 bytes");
        let many = proto::TxFetch { seq: 7, tx_hashes: vec![vec![1; 32]; MAX_FETCH_TXS + 1] };
        let bytes = proto::PbftMessage { msg: Some(proto::pbft_message::Msg::TxFetch(many)) }.encode_to_vec();
        assert!(matches!(decode_frame(&bytes, &L), Err(WireError::Range(_))));
        // 40 txs of 60 KB: several messages, each within the frame slack.
        let txs: Vec<Arc<crate::protocol::event::Event>> = (0..40u8)
            .map(|i| {
                Arc::new(Event::sign(TxKind::Anomaly, &k, [i; 16], sample_anomaly_payload(i as u64, 60_000), 7, [i; 4]))
            })
            .collect();
        let frames = encode_tx_bodies(9, &txs);
        assert!(frames.len() >= 3, "{} frames", frames.len());
        let mut back = vec![];
        for f in &frames {
            assert!(f.len() <= FRAME_SLACK_BYTES, "{} bytes", f.len());
            let Ok(Frame::TxBodies { seq: 9, txs }) = decode_frame(f, &L) else { panic!("not bodies") };
            back.extend(txs);
        }
        let limits = crate::protocol::event::Limits::default();
        let back: Vec<Event> = back.into_iter().map(|t| Event::from_tx_proto(t, &limits).unwrap()).collect();
        assert!(back.len() == txs.len() && back.iter().zip(&txs).all(|(a, b)| a == &**b));
        assert!(encode_tx_bodies(9, &[]).is_empty());
    }

    #[test]
    fn genesis_attestations_share_the_channel() {
        let k = crate::protocol::crypto::generate_key();
        let vals: std::collections::BTreeMap<u32, crate::protocol::crypto::PublicKey> =
            [(1, crate::protocol::crypto::public_key(&k))].into_iter().collect();
        let a = crate::protocol::consensus::genesis::Ceremony::new(1, [3; 32], vals, 1000).attest(&k, 77);
        let bytes = encode_genesis(&a);
        assert_eq!(decode_frame(&bytes, &L), Ok(Frame::Genesis(a)));
        assert!(decode(&bytes, &L).is_err(), "the replica never sees one");
        for m in samples() {
            assert_eq!(decode_frame(&encode(&m), &L), Ok(Frame::Pbft(m)));
        }
    }

    #[test]
    fn every_message_round_trips_and_ed25519_auth_verifies() {
        for m in samples() {
            assert_eq!(decode(&encode(&m), &L).unwrap(), m);
        }
        let keys: Vec<SigningKey> = (0..4u8).map(|i| SigningKey::from_bytes(&[i + 1; 32])).collect();
        let pks: Vec<PublicKey> = keys.iter().map(crypto::public_key).collect();
        let a0 = Ed25519Auth::new(keys[0].clone(), pks.clone());
        let s = a0.sign(b"x");
        assert!(a0.verify(0, b"x", &s));
        assert!(!a0.verify(1, b"x", &s), "signature is bound to its signer");
        assert!(!a0.verify(9, b"x", &s));
        assert!(!a0.verify(0, b"x", &s[..63]));
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        let mut b = proto::PbftMessage {
            msg: Some(proto::pbft_message::Msg::Fetch(proto::PbftFetch { from: 4, from_seq: 1 })),
        }
        .encode_to_vec();
        assert_eq!(decode(&b, &L), Err(WireError::Range("replica id")));
        b = proto::PbftMessage {
            msg: Some(proto::pbft_message::Msg::Vote(proto::PbftVote { digest: vec![1; 31], ..Default::default() })),
        }
        .encode_to_vec();
        assert_eq!(decode(&b, &L), Err(WireError::Range("digest length")));
        let big =
            proto::PbftPrePrepare { digest: vec![0; 32], value: vec![0; L.max_value_bytes + 1], ..Default::default() };
        b = proto::PbftMessage { msg: Some(proto::pbft_message::Msg::PrePrepare(big)) }.encode_to_vec();
        assert_eq!(decode(&b, &L), Err(WireError::Range("value size")));
        assert_eq!(decode(&[], &L), Err(WireError::Missing("msg")));
    }

    proptest! {
        #[test]
        fn arbitrary_and_mutated_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), i in 0usize..4096, x in any::<u8>()) {
            let _ = decode(&bytes, &L);
            for m in samples() {
                let mut e = encode(&m);
                let p = i % e.len();
                e[p] ^= x;
                let _ = decode(&e, &L);
            }
        }
    }
}
