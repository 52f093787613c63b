//! Chain snapshots: how a fresh validator joins without replaying the chain.
//!
//! # What vouches for a snapshot
//! Every PBFT checkpoint signs, besides the chained digest of the committed
//! values, the application's digest after that height ([`app_digest`]):
//! SHA-256 over the block hash (which covers the state root) and the
//! reputation. A stable checkpoint (q signatures) therefore vouches for one
//! block header and one reputation table; the state's entries are checked
//! against the header's state root. Nothing in a snapshot is trusted because
//! of who sent it.
//!
//! # Making snapshots
//! Every `consensus.snapshot_interval` blocks (a multiple of the checkpoint
//! interval) the core records the state, header and reputation at that
//! height; once the checkpoint there is stable, the runtime adds its proof
//! and keeps the encoded [`proto::ChainSnapshot`] as `snapshot.bin`, which it
//! serves to peers.
//!
//! # Joining
//! A validator whose block store is empty (fresh, or its disk was wiped)
//! asks every peer for its newest snapshot after genesis ([`Join`]), pulls
//! it chunk by chunk from one peer, verifies it ([`verify`]), keeps it as
//! `blocks.base` (the block store then starts above it) and catches up with
//! the blocks above it through the usual fetches. If no peer has one (a
//! young chain), or none arrives within the join timeout, it catches up from
//! height 1.

use crate::protocol::block::BlockHeader;
use crate::protocol::consensus::pbft::{Auth, Checkpoint, EpochAuth, Params, Replica, Rid, Seq, Signed};
use crate::protocol::consensus::wire::{self, WireLimits};
use crate::protocol::crypto::PublicKey;
use crate::protocol::reconfig;
use crate::protocol::reputation::Reputation;
use crate::protocol::state::{State, StateConfig};
use crate::{proto, sha256, Hash32};
use prost::Message as _;
use std::collections::BTreeSet;

/// The snapshot a validator started from, in its data dir (the block
/// store sits on its block).
pub const BASE_FILE: &str = "blocks.base";
/// The newest complete snapshot, served to joining validators.
pub const SERVED_FILE: &str = "snapshot.bin";

/// Bytes per transfer chunk (well under the QUIC frame limit).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest snapshot a joining validator accepts (chunks × CHUNK_BYTES).
pub const MAX_CHUNKS: u32 = 4096;

/// The application digest a checkpoint signs (see the module docs and
/// `PbftCheckpoint.app` in the proto).
pub fn app_digest(block_hash: &Hash32, rep: &Reputation) -> Hash32 {
    let mut v = b"cybermesh.app.v1".to_vec();
    v.extend_from_slice(block_hash);
    for s in rep.scores() {
        v.extend_from_slice(&s.to_be_bytes());
    }
    let q: Vec<Rid> = rep.quarantined().collect();
    v.extend_from_slice(&(q.len() as u32).to_be_bytes());
    for r in q {
        v.extend_from_slice(&(r as u32).to_be_bytes());
    }
    sha256(&v)
}

/// A snapshot taken at execution, waiting for its checkpoint's proof: the
/// chain part (`chain.state` empty) and the state's entries, still shared
/// with the live state (taking it costs the core thread no copy; see
/// `state::kv`). [`encode`] copies and sorts them, on the snapshot writer.
#[derive(Debug)]
pub struct Recorded {
    pub chain: proto::ChainSnapshot,
    pub state: crate::protocol::state::Pending,
}

impl Recorded {
    pub fn height(&self) -> u64 {
        self.chain.header.as_ref().map_or(0, |h| h.height)
    }
}

pub fn record(header: &BlockHeader, state: &State, rep: &Reputation) -> Recorded {
    Recorded {
        chain: proto::ChainSnapshot {
            header: Some(crate::protocol::block::header_to_proto(header)),
            state: None,
            reputation: rep.scores().to_vec(),
            quarantined: rep.quarantined().map(|r| r as u32).collect(),
            proof: vec![],
        },
        state: state.snapshot_pending(header.hash()),
    }
}

/// The canonical bytes of a recorded snapshot (state entries in key order):
/// exactly `ChainSnapshot::encode_to_vec` of it, written from the shared
/// entries without copying them (a state of 2.4 M entries is 160 MB; its
/// copy into `StateEntry`s doubled the writer's memory and time, on cores
/// the validators share).
pub fn encode(rec: Recorded) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let Recorded { chain, state } = rec;
    // Sorted by the keys' first 8 bytes held inline (zero-padded, so their
    // order is the keys' order wherever they differ), the keys themselves
    // read only on a tie: comparing through the pointers missed the cache
    // on every step.
    let prefix = |k: &[u8]| {
        let mut p = [0u8; 8];
        let n = k.len().min(8);
        p[..n].copy_from_slice(&k[..n]);
        u64::from_be_bytes(p)
    };
    let mut entries: Vec<(u64, &Vec<u8>, &Vec<u8>)> = state.entries.iter().map(|(k, v)| (prefix(k), k, v)).collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    let entry_len = |k: &Vec<u8>, v: &Vec<u8>| {
        prost::encoding::bytes::encoded_len(1, k) * usize::from(!k.is_empty())
            + prost::encoding::bytes::encoded_len(2, v) * usize::from(!v.is_empty())
    };
    let head = proto::StateSnapshot {
        height: state.height,
        state_root: state.state_root.to_vec(),
        block_hash: state.block_hash.to_vec(),
        entries: vec![],
    };
    let mut state_len = head.encoded_len();
    for (_, k, v) in &entries {
        let l = entry_len(k, v);
        state_len += key_len(4) + encoded_len_varint(l as u64) + l;
    }
    // Fields in number order, as prost writes them: the header (1), the
    // state (2), then the rest.
    let before = proto::ChainSnapshot { header: chain.header, ..Default::default() };
    let after = proto::ChainSnapshot { header: None, state: None, ..chain };
    let total =
        before.encoded_len() + key_len(2) + encoded_len_varint(state_len as u64) + state_len + after.encoded_len();
    let mut out = Vec::with_capacity(total);
    before.encode(&mut out).expect("sized");
    encode_key(2, WireType::LengthDelimited, &mut out);
    encode_varint(state_len as u64, &mut out);
    head.encode(&mut out).expect("sized");
    for (_, k, v) in &entries {
        encode_key(4, WireType::LengthDelimited, &mut out);
        encode_varint(entry_len(k, v) as u64, &mut out);
        if !k.is_empty() {
            prost::encoding::bytes::encode(1, *k, &mut out);
        }
        if !v.is_empty() {
            prost::encoding::bytes::encode(2, *v, &mut out);
        }
    }
    after.encode(&mut out).expect("sized");
    debug_assert_eq!(out.len(), total);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot does not decode: {0}")]
    Decode(String),
    #[error("snapshot checkpoint proof: {0}")]
    Proof(String),
    #[error("snapshot content does not match its checkpoint: {0}")]
    Mismatch(String),
}

/// A verified snapshot, ready to start from.
pub struct Verified<A: Auth + Clone> {
    pub header: BlockHeader,
    pub state: State,
    pub reputation: Reputation,
    /// Positioned at the snapshot's stable checkpoint.
    pub replica: Replica<A>,
}

/// Reputation settings to rebuild with (from the validator's config).
#[derive(Debug, Clone, Copy)]
pub struct ReputationConfig {
    pub floor: Option<f64>,
    pub quarantine: bool,
}

/// Checks an encoded `ChainSnapshot` against its q-signed checkpoint and
/// rebuilds what the validator starts from.
pub fn verify<A: EpochAuth>(
    bytes: &[u8],
    id: Rid,
    params: &Params,
    auth: A,
    limits: &WireLimits,
    state_cfg: StateConfig,
    rep_cfg: ReputationConfig,
) -> Result<Verified<A>, SnapshotError> {
    let s = proto::ChainSnapshot::decode(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    let height = s.header.as_ref().map_or(0, |h| h.height);
    // The set that signed its checkpoint: the genesis set, or the one its
    // chain of set changes proves (then this validator's signer there).
    let (signing, epoch) = match s.state.as_ref().map(|st| signing_epoch(st, &state_cfg, height)).transpose()? {
        Some(Some((signing, epoch))) if signing.epoch > 0 => (Some(signing), Some(epoch)),
        _ => (None, None),
    };
    let (id, params, auth, limits) = match &signing {
        None => (id, params.clone(), auth, *limits),
        Some(e) => {
            let keys: Vec<PublicKey> = e.validators.values().copied().collect();
            let (id, auth) = auth
                .for_epoch(e.epoch, &keys)
                .ok_or_else(|| SnapshotError::Proof(format!("this validator is not in epoch {}'s set", e.epoch)))?;
            (id, Params { n: keys.len(), ..params.clone() }, auth, WireLimits { n: keys.len(), ..*limits })
        }
    };
    let (params, limits) = (&params, &limits);
    if s.proof.len() > params.n {
        return Err(SnapshotError::Decode(format!(
            "{} checkpoint signatures for {} validators",
            s.proof.len(),
            params.n
        )));
    }
    let proof: Vec<Signed<Checkpoint>> = s
        .proof
        .into_iter()
        .map(|c| wire::checkpoint_from(c, limits))
        .collect::<Result<_, _>>()
        .map_err(|e| SnapshotError::Decode(e.to_string()))?;
    let header = s
        .header
        .and_then(crate::protocol::block::header_from_proto)
        .ok_or_else(|| SnapshotError::Decode("missing or malformed block header".into()))?;
    let seq = header.height;
    let (replica, app) = Replica::from_stable_checkpoint(id, params.clone(), auth, seq, proof)
        .map_err(|e| SnapshotError::Proof(format!("height {seq}: {e}")))?;
    let replica = match &signing {
        Some(e) => replica.in_epoch(e.epoch, e.from_height),
        None => replica,
    };
    let reputation = Reputation::restored(params.n, rep_cfg.floor, rep_cfg.quarantine, &s.reputation, &s.quarantined)
        .ok_or_else(|| SnapshotError::Decode("reputation table does not fit the validator set".into()))?;
    if app_digest(&header.hash(), &reputation) != app {
        return Err(SnapshotError::Mismatch(format!(
            "height {seq}: header and reputation do not hash to the signed application digest"
        )));
    }
    let snap = s.state.ok_or_else(|| SnapshotError::Decode("missing state".into()))?;
    if snap.height != seq || snap.state_root != header.state_root {
        return Err(SnapshotError::Mismatch(format!("height {seq}: state is for another block")));
    }
    let state = State::restore(&snap, state_cfg).map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
    if let Some(epoch) = epoch {
        debug_assert_eq!(state.current_epoch(), Some(epoch), "read from the same entries");
    }
    Ok(Verified { header, state, reputation, replica })
}

/// The epoch whose set signed the checkpoint at `height` (the last
/// epoch starting below it), and the state's current epoch, from the
/// snapshot's entries; each epoch's set is checked against the set change
/// that made it, signed by the previous set, from genesis on (nothing of
/// it is trusted because of who sent the snapshot; the entries themselves
/// are checked against the signed state root afterwards). None for a
/// chain without set changes (one validator).
fn signing_epoch(
    st: &proto::StateSnapshot,
    cfg: &StateConfig,
    height: u64,
) -> Result<Option<(reconfig::Epoch, reconfig::Epoch)>, SnapshotError> {
    let Some(rules) = cfg.chain.as_ref() else { return Ok(None) };
    let entry = |key: &[u8]| st.entries.iter().find(|e| e.key == key).map(|e| e.value.as_slice());
    let bad = |what: String| SnapshotError::Mismatch(format!("epoch chain: {what}"));
    let current = match entry(crate::protocol::state::CURRENT_EPOCH_KEY) {
        None => return Ok(Some((genesis_epoch(rules), genesis_epoch(rules)))),
        Some(v) => reconfig::Epoch::decode(v).ok_or_else(|| bad("malformed current epoch".into()))?,
    };
    let mut epochs = vec![genesis_epoch(rules)];
    for e in 1..=current.epoch {
        let payload = entry(&crate::protocol::state::epoch_change_key(e))
            .ok_or_else(|| bad(format!("the set change of epoch {e} is missing")))?;
        let rc = proto::ReconfigurationPayload::decode(payload)
            .map_err(|e| e.to_string())
            .and_then(reconfig::Reconfiguration::from_proto)
            .map_err(|err| bad(format!("epoch {e}'s set change: {err}")))?;
        let prev = epochs.last().expect("genesis first");
        let set = reconfig::check(&rc, &rules.chain, e - 1, &prev.validators)
            .map_err(|err| bad(format!("epoch {e}'s set change: {err}")))?;
        let record = entry(&crate::protocol::state::epoch_key(e))
            .and_then(reconfig::Epoch::decode)
            .ok_or_else(|| bad(format!("epoch {e}'s record is missing")))?;
        if record.validators != set || record.epoch != e || record.from_height < prev.from_height {
            return Err(bad(format!("epoch {e}'s record is not the set its change makes")));
        }
        epochs.push(record);
    }
    if epochs.last() != Some(&current) {
        return Err(bad("the current epoch is not the last of the chain".into()));
    }
    let signing = reconfig::certifying(&epochs, height).expect("genesis first");
    Ok(Some((signing.clone(), current)))
}

fn genesis_epoch(rules: &reconfig::ChainRules) -> reconfig::Epoch {
    reconfig::Epoch { epoch: 0, from_height: 0, validators: rules.genesis.clone() }
}

/// What a joining validator verifies a snapshot with and rebuilds its
/// replica from (see `Node::start_joining`).
#[derive(Clone)]
pub struct JoinSetup<A> {
    pub me: Rid,
    pub params: Params,
    pub auth: A,
    pub wire: WireLimits,
    pub state: StateConfig,
    pub reputation: ReputationConfig,
    /// The consensus records recovered from its log: what it promised
    /// before (the snapshot's replica is recovered onto them).
    pub records: Vec<crate::protocol::consensus::pbft::Record>,
    /// How long to wait for any peer to offer a snapshot.
    pub timeout_ms: u64,
    /// This validator is not in the genesis set (a set change adds it):
    /// only a snapshot whose current set names it will do, and it never
    /// gives up to catch up from height 1 (it orders nothing before).
    pub member_only: bool,
}

/// What the joining validator does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinStep {
    /// Ask one peer (validator id) or, with `None`, every peer.
    Request(Option<u32>, proto::SnapshotRequest),
    /// A whole snapshot from `peer`: verify it; `Join::refuse` if it fails.
    Complete { peer: u32, bytes: Vec<u8> },
    /// No snapshot to be had: catch up from height 1.
    GiveUp,
}

/// The joining validator's side of the transfer, driven by chunks and
/// time (sans-I/O). One source peer at a time, one chunk in flight.
#[derive(Debug)]
pub struct Join {
    peers: BTreeSet<u32>,
    /// Peers that answered they have none, or sent a snapshot that failed.
    out: BTreeSet<u32>,
    source: Option<Source>,
    retry_ms: u64,
    next_retry: u64,
    give_up_at: u64,
}

#[derive(Debug)]
struct Source {
    peer: u32,
    seq: Seq,
    chunks: u32,
    data: Vec<u8>,
    next: u32,
    last_progress: u64,
}

impl Join {
    /// `timeout_ms`: how long to wait for any peer to offer a snapshot.
    pub fn new(peers: impl IntoIterator<Item = u32>, now: u64, timeout_ms: u64) -> Join {
        Join {
            peers: peers.into_iter().collect(),
            out: BTreeSet::new(),
            source: None,
            retry_ms: 1000,
            next_retry: now,
            give_up_at: now.saturating_add(timeout_ms),
        }
    }

    /// When `tick` next has something to do (monotonic ms).
    pub fn poll_timeout_ms(&self) -> u64 {
        match &self.source {
            Some(s) => self.next_retry.min(s.last_progress + 5 * self.retry_ms),
            None => self.next_retry.min(self.give_up_at),
        }
    }

    pub fn source(&self) -> Option<(u32, Seq)> {
        self.source.as_ref().map(|s| (s.peer, s.seq))
    }

    fn ask(&self) -> JoinStep {
        match &self.source {
            Some(s) => JoinStep::Request(Some(s.peer), proto::SnapshotRequest { seq: s.seq, chunk: s.next }),
            None => JoinStep::Request(None, proto::SnapshotRequest { seq: 0, chunk: 0 }),
        }
    }

    /// Timers: the first request, retries, dropping a silent source, giving up.
    pub fn tick(&mut self, now: u64) -> Option<JoinStep> {
        if self.source.as_ref().is_some_and(|s| now >= s.last_progress + 5 * self.retry_ms) {
            let s = self.source.take().expect("checked");
            tracing::warn!(peer = s.peer, seq = s.seq, "snapshot source went silent; asking the others");
            self.out.insert(s.peer);
            self.give_up_at = self.give_up_at.max(now + 5 * self.retry_ms);
        }
        if self.source.is_none() && (now >= self.give_up_at || self.peers.is_subset(&self.out)) {
            return Some(JoinStep::GiveUp);
        }
        if now < self.next_retry {
            return None;
        }
        self.next_retry = now + self.retry_ms;
        Some(self.ask())
    }

    /// A chunk from `from`.
    pub fn on_chunk(&mut self, from: u32, c: proto::SnapshotChunk, now: u64) -> Option<JoinStep> {
        if !self.peers.contains(&from) || self.out.contains(&from) {
            return None;
        }
        if c.chunks == 0 {
            self.out.insert(from);
            return (self.source.is_none() && self.peers.is_subset(&self.out)).then_some(JoinStep::GiveUp);
        }
        let valid = c.chunks <= MAX_CHUNKS && c.chunk < c.chunks && c.data.len() <= CHUNK_BYTES && c.seq > 0;
        if !valid {
            self.out.insert(from);
            return None;
        }
        match &mut self.source {
            None if c.chunk == 0 => {
                self.source = Some(Source {
                    peer: from,
                    seq: c.seq,
                    chunks: c.chunks,
                    data: Vec::new(),
                    next: 0,
                    last_progress: now,
                });
            }
            Some(s) if s.peer == from && s.seq != c.seq && c.chunk == 0 => {
                // The peer moved on to a newer snapshot: start over with it.
                *s = Source { peer: from, seq: c.seq, chunks: c.chunks, data: Vec::new(), next: 0, last_progress: now };
            }
            Some(s) if s.peer == from && s.seq == c.seq && s.chunks == c.chunks && s.next == c.chunk => {}
            _ => return None, // another peer's offer, a duplicate or a stale chunk
        }
        let s = self.source.as_mut().expect("set above");
        s.data.extend_from_slice(&c.data);
        s.next += 1;
        s.last_progress = now;
        if s.next == s.chunks {
            let s = self.source.take().expect("set");
            return Some(JoinStep::Complete { peer: s.peer, bytes: s.data });
        }
        self.next_retry = now + self.retry_ms;
        Some(self.ask())
    }

    /// The snapshot from `peer` did not verify: try the others.
    pub fn refuse(&mut self, peer: u32, now: u64) {
        self.out.insert(peer);
        self.next_retry = now;
    }
}

/// A peer's request, answered from the encoded snapshot this validator serves.
pub fn answer(served: Option<(Seq, &[u8])>, req: &proto::SnapshotRequest) -> proto::SnapshotChunk {
    let Some((seq, bytes)) = served.filter(|(_, b)| !b.is_empty()) else {
        return proto::SnapshotChunk { seq: 0, chunk: 0, chunks: 0, data: vec![] };
    };
    let chunks = bytes.len().div_ceil(CHUNK_BYTES) as u32;
    // Asked for another one (replaced since): offer this one from the start.
    let chunk = if req.seq == seq && req.chunk < chunks { req.chunk } else { 0 };
    let start = chunk as usize * CHUNK_BYTES;
    let data = bytes[start..(start + CHUNK_BYTES).min(bytes.len())].to_vec();
    proto::SnapshotChunk { seq, chunk, chunks, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_writes_exactly_the_bytes_prost_writes_for_the_sorted_snapshot() {
        use crate::protocol::state::{kv::Kv, Pending};
        let mut kv = Kv::default();
        for i in 0u32..3000 {
            // Keys and values of several lengths (varint lengths of 1 and
            // 2 bytes), one empty value.
            kv.insert(
                crate::sha256(&i.to_be_bytes())[..(i % 32) as usize + 1].to_vec(),
                vec![i as u8; (i % 300) as usize],
            );
        }
        let held = kv.freeze();
        for i in 0u32..500 {
            kv.insert(i.to_be_bytes().to_vec(), vec![1; 5]);
            kv.remove(&crate::sha256(&(i + 1000).to_be_bytes())[..((i + 1000) % 32) as usize + 1]);
        }
        let chain = proto::ChainSnapshot {
            header: Some(proto::BlockHeader { height: 7, ..Default::default() }),
            state: None,
            reputation: vec![5, 6, 7, 8],
            quarantined: vec![2],
            proof: vec![proto::PbftCheckpoint::default()],
        };
        for entries in [held, kv.freeze()] {
            let pending = Pending { height: 7, state_root: [3; 32], block_hash: [4; 32], entries };
            let mut expected = chain.clone();
            expected.state = Some(pending.clone().into_proto());
            let bytes = encode(Recorded { chain: chain.clone(), state: pending });
            assert_eq!(bytes, expected.encode_to_vec());
        }
    }

    fn chunk(seq: u64, i: u32, n: u32, byte: u8) -> proto::SnapshotChunk {
        proto::SnapshotChunk { seq, chunk: i, chunks: n, data: vec![byte; 3] }
    }

    #[test]
    fn join_pulls_chunks_in_order_from_one_peer() {
        let mut j = Join::new([1, 2, 3], 0, 10_000);
        assert_eq!(j.tick(0), Some(JoinStep::Request(None, proto::SnapshotRequest { seq: 0, chunk: 0 })));
        assert_eq!(j.tick(10), None, "no retry before the retry interval");
        let next = j.on_chunk(2, chunk(16, 0, 3, 7), 20);
        assert_eq!(next, Some(JoinStep::Request(Some(2), proto::SnapshotRequest { seq: 16, chunk: 1 })));
        // Another peer's offer and a stale chunk change nothing.
        assert_eq!(j.on_chunk(3, chunk(24, 0, 2, 9), 21), None);
        assert_eq!(j.on_chunk(2, chunk(16, 0, 3, 7), 22), None);
        j.on_chunk(2, chunk(16, 1, 3, 8), 30);
        let done = j.on_chunk(2, chunk(16, 2, 3, 9), 40);
        assert_eq!(done, Some(JoinStep::Complete { peer: 2, bytes: vec![7, 7, 7, 8, 8, 8, 9, 9, 9] }));
    }

    #[test]
    fn join_gives_up_when_nobody_has_one_or_on_timeout_and_drops_silent_sources() {
        let none = proto::SnapshotChunk { seq: 0, chunk: 0, chunks: 0, data: vec![] };
        let mut j = Join::new([1, 2], 0, 10_000);
        j.tick(0);
        assert_eq!(j.on_chunk(1, none.clone(), 5), None);
        assert_eq!(j.on_chunk(2, none, 6), Some(JoinStep::GiveUp));

        let mut j = Join::new([1, 2], 0, 3_000);
        j.tick(0);
        assert_eq!(j.tick(3_000), Some(JoinStep::GiveUp));

        // A source that stops answering is dropped; the others are asked.
        let mut j = Join::new([1, 2], 0, 3_000);
        j.tick(0);
        j.on_chunk(1, chunk(8, 0, 4, 1), 100);
        assert_eq!(j.source(), Some((1, 8)));
        let step = j.tick(100 + 5_000);
        assert_eq!(j.source(), None);
        assert_eq!(step, Some(JoinStep::Request(None, proto::SnapshotRequest { seq: 0, chunk: 0 })));
        // An oversized offer is refused outright.
        assert_eq!(j.on_chunk(2, chunk(8, 0, MAX_CHUNKS + 1, 1), 5_200), None);
        assert_eq!(j.source(), None);
    }

    #[derive(Clone)]
    struct AnySignature;
    impl Auth for AnySignature {
        fn sign(&self, _: &[u8]) -> Vec<u8> {
            vec![0; 64]
        }
        fn verify(&self, _: Rid, _: &[u8], _: &[u8]) -> bool {
            true
        }
    }
    impl crate::protocol::consensus::pbft::EpochAuth for AnySignature {
        fn for_epoch(&self, _: u64, _: &[PublicKey]) -> Option<(Rid, Self)> {
            Some((0, AnySignature))
        }
    }

    proptest::proptest! {
        /// Whatever a peer sends, verification returns an error, never a
        /// panic (signatures pass here, so the checks behind them run).
        #[test]
        fn arbitrary_snapshots_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let limits = WireLimits { n: 4, max_value_bytes: 1 << 20, window: 16 };
            let rep = ReputationConfig { floor: Some(0.7), quarantine: true };
            let genesis = (1..=4u32).map(|i| (i, [i as u8; 32])).collect();
            let rules = reconfig::ChainRules { chain: [9; 32], genesis, checkpoint_interval: 8, window: 16 };
            let state = StateConfig { chain: Some(std::sync::Arc::new(rules)), ..StateConfig::default() };
            let _ = verify(&bytes, 0, &Params::manual_defaults(4), AnySignature, &limits, state, rep);
        }
    }

    #[test]
    fn answers_split_the_snapshot_and_restart_a_stale_request() {
        let bytes = vec![5u8; 2 * CHUNK_BYTES + 10];
        let a = answer(Some((32, &bytes)), &proto::SnapshotRequest { seq: 32, chunk: 2 });
        assert_eq!((a.seq, a.chunk, a.chunks, a.data.len()), (32, 2, 3, 10));
        let a = answer(Some((32, &bytes)), &proto::SnapshotRequest { seq: 16, chunk: 2 });
        assert_eq!((a.seq, a.chunk, a.data.len()), (32, 0, CHUNK_BYTES));
        assert_eq!(answer(None, &proto::SnapshotRequest { seq: 0, chunk: 0 }).chunks, 0);
    }
}
