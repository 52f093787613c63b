//! Deterministic state machine: executes committed transactions and keeps a
//! Merkle state root.
//!
//! No clocks, I/O or randomness here: the block timestamp is passed in, and
//! every validator that executes the same blocks reaches the same root.
//! Signatures are not checked again (the verify shards did, once).
//!
//! State keys (first byte is the table):
//! * `a` + anomaly id (16)   → `u64 BE height || tx_hash || AnomalyPayload`
//! * `e` + evidence id (16)  → `u64 BE height || tx_hash || EvidencePayload`
//! * `p` + policy_id (UTF-8) → `u64 BE height || tx_hash || PolicyPayload` (latest wins)
//! * `n` + u64 BE height     → the nonces consumed by that block,
//!   `(nonce (16) || u64 BE timestamp_ms || tx_hash (32))*` in tx order
//!   (replay protection and tx identity; deleted once all are past the TTL)
//! * `r` + producer key (32) → `u64 BE accepted || u64 BE rejected ||
//!   u64 BE tokens (thousandths) || u64 BE block timestamp_ms they were counted at`
//! * `c` + id (16)           → `u64 BE height || tx_hash || content_hash` of a
//!   reconfiguration tx that was applied
//! * `vcurrent`              → the current epoch (`reconfig::Epoch`); absent: epoch 0,
//!   the genesis set (`StateConfig::chain`)
//! * `vnext`                 → the scheduled epoch, its set and `from_height`
//!   (the switch height); at most one
//!
//! # Identity and verdicts
//! A tx is its hash (of the signed bytes: domain, timestamp, nonce, id,
//! content hash), never its payload. A tx ordered again after it committed
//! (a Byzantine primary, or a race across a view change) executes once: the
//! repeat gets [`TxStatus::Repeat`], changes nothing and counts against no
//! one. Every refusal here is a receipt every validator computes alike,
//! including the per-producer rate limit: a token bucket charged against
//! block timestamps, so it does not depend on when a validator saw the tx.

pub mod kv;
pub mod merkle;
pub mod spread;

use crate::protocol::event::{parse_payload, Event, Payload, TxKind};
use crate::protocol::reconfig;
use crate::protocol::reject::RejectReason;
use crate::{proto, sha256, Hash32};
use foldhash::{HashMap, HashMapExt};
use kv::Kv;
use merkle::SparseMerkleTree;
use std::collections::BTreeSet;

/// One consumed nonce in a block's `n` entry: nonce (16) || u64 BE
/// timestamp || tx hash (32).
const NONCE_ENTRY: usize = 56;
/// A producer's `r` record: accepted, rejected, tokens, counted-at.
const PRODUCER_RECORD: usize = 32;
/// Token-bucket units per tx (integer arithmetic: every validator agrees).
const MILLI: u64 = 1000;

#[derive(Debug, Clone)]
pub struct StateConfig {
    /// A tx this much older than its block is expired. Its nonce is remembered
    /// at least this long after its timestamp (until every nonce its block
    /// consumed is past it), so a replay within the TTL is always refused.
    pub nonce_ttl_ms: u64,
    /// A tx may be at most this far ahead of the block timestamp.
    pub future_skew_ms: u64,
    /// Per-producer token bucket (MEMPOOL_RATE_PER_SECOND): tokens added
    /// per second of block time; 0 disables the limit.
    pub rate_per_second: u32,
    /// Bucket size (MEMPOOL_RATE_BURST); 0 means one second's worth.
    pub rate_burst: u32,
    /// What reconfiguration txs are judged against; None refuses them
    /// (a single validator, tests).
    pub chain: Option<std::sync::Arc<reconfig::ChainRules>>,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            nonce_ttl_ms: 15 * 60_000,
            future_skew_ms: 5 * 60_000,
            rate_per_second: 0,
            rate_burst: 0,
            chain: None,
        }
    }
}

impl StateConfig {
    fn bucket_milli(&self) -> u64 {
        let burst = if self.rate_burst == 0 { self.rate_per_second } else { self.rate_burst };
        burst as u64 * MILLI
    }
}

/// The `reason` of a block outcome's `TxRejection` for a [`TxStatus::Repeat`]:
/// not applied again, not counted against its producer, no DLQ record.
pub const REPEAT_REASON: &str = "repeat";

/// Result of one transaction. Rejected transactions stay in the block (the
/// block is valid) and count against their producer; those refused for
/// their content (not replayed or expired) consume their nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Applied,
    Rejected(RejectReason),
    /// This very tx (same hash) is already committed: executed once, the
    /// repeat changes nothing and is not counted against its producer.
    Repeat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub tx_hash: Hash32,
    pub status: TxStatus,
}

/// What executing a block did; `undo` rolls it back.
#[derive(Debug)]
pub struct Executed {
    pub state_root: Hash32,
    pub receipts: Vec<Receipt>,
    pub undo: Undo,
}

/// Previous values of the keys a block changed, plus the height before it.
#[derive(Debug, Default)]
pub struct Undo {
    prev: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    height: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("snapshot root mismatch: snapshot says {expected}, its entries hash to {actual}")]
    RootMismatch { expected: String, actual: String },
    #[error("snapshot is malformed: {0}")]
    Malformed(String),
}

pub struct State {
    cfg: StateConfig,
    /// Hashed, not ordered: execution only looks keys up (a B-tree of
    /// ~10^6 keys cost a few hundred ns of key comparisons per look-up);
    /// the one ordered walk, the snapshot, sorts. Randomly keyed hashes:
    /// producers choose the keys. Sharded, copy-on-write (`kv`).
    kv: Kv,
    tree: SparseMerkleTree,
    nonces: NonceIndex,
    height: u64,
}

/// State keys of the current and the scheduled epoch.
pub const CURRENT_EPOCH_KEY: &[u8] = b"vcurrent";
pub const NEXT_EPOCH_KEY: &[u8] = b"vnext";

/// State key of epoch `e`'s record (`e` ≥ 1; epoch 0 is the genesis set):
/// every epoch stays, so the set that certified any height can be looked up.
pub fn epoch_key(e: u64) -> Vec<u8> {
    [&b"epoch"[..], &e.to_be_bytes()].concat()
}

/// State key of the set change that made epoch `e` (its payload, with the
/// previous set's signatures): the epoch's certificate. From genesis, each
/// one proves the next set (`reconfig::check`), so a snapshot proves the
/// set that signed its checkpoint (`snapshot::verify`).
pub fn epoch_change_key(e: u64) -> Vec<u8> {
    [&b"epochchange"[..], &e.to_be_bytes()].concat()
}

fn current_epoch(record: Option<&[u8]>, cfg: &StateConfig) -> Option<reconfig::Epoch> {
    match record {
        Some(v) => reconfig::Epoch::decode(v),
        None => cfg.chain.as_ref().map(|c| reconfig::Epoch { epoch: 0, from_height: 0, validators: c.genesis.clone() }),
    }
}

/// The epoch a reconfiguration executed at `height` schedules, or why not:
/// one change at a time, judged against the current epoch's set
/// (`reconfig::check`), switching at the first checkpoint at least one
/// checkpoint interval later.
fn schedule(
    b: &Batch<'_>,
    cfg: &StateConfig,
    height: u64,
    rc: &reconfig::Reconfiguration,
) -> Result<reconfig::Epoch, String> {
    let rules = cfg.chain.as_ref().ok_or("this chain takes no reconfigurations")?;
    if b.get(NEXT_EPOCH_KEY).is_some() {
        return Err("a change is already scheduled".into());
    }
    let now = current_epoch(b.get(CURRENT_EPOCH_KEY).map(Vec::as_slice), cfg)
        .ok_or("the current epoch record is malformed")?;
    let validators = reconfig::check(rc, &rules.chain, now.epoch, &now.validators).map_err(|e| e.to_string())?;
    Ok(reconfig::Epoch {
        epoch: now.epoch + 1,
        from_height: reconfig::switch_height(height, rules.checkpoint_interval, rules.window),
        validators,
    })
}

/// Shards of the nonce map (one entry per tx). One map doubled at the same
/// tx count on every validator, and its rehash, with the kernel zeroing the
/// new table, stalled every core thread at once (loadgen at 14,500 tx/s:
/// hundreds of ms of commit latency at 57k, 115k and 229k txs). The shards
/// are sized by [`spread::Spread`], so they double one at a time.
const NONCE_SHARDS: usize = 256;

type NonceShard = HashMap<[u8; 16], (u64, Hash32)>;

/// The `n` entries, indexed (rebuilt from them on restore).
struct NonceIndex {
    /// Nonces remembered (replay protection) → the height that consumed
    /// them and the tx that did, in shards placed by `spread`. Membership
    /// only, so iteration order (HashMap's is random) never matters.
    by_nonce: Box<[NonceShard]>,
    spread: spread::Spread,
    /// `n` entries by (newest timestamp in it, height): pruned in this order.
    blocks: BTreeSet<(u64, u64)>,
}

impl Default for NonceIndex {
    fn default() -> Self {
        NonceIndex {
            by_nonce: (0..NONCE_SHARDS).map(|_| NonceShard::new()).collect(),
            spread: spread::Spread::new(NONCE_SHARDS),
            blocks: BTreeSet::new(),
        }
    }
}

/// A nonce's 64-bit placement hash, from its 4 random bytes and its
/// timestamp (a producer that picks its random bytes badly only brings back
/// one larger map).
fn nonce_hash(nonce: &[u8; 16]) -> u64 {
    let h = u64::from_le_bytes(nonce[8..16].try_into().expect("8 bytes"))
        ^ u64::from_le_bytes(nonce[..8].try_into().expect("8 bytes")).rotate_left(29);
    h.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl NonceIndex {
    fn shard(&self, nonce: &[u8; 16]) -> &NonceShard {
        &self.by_nonce[self.spread.shard(nonce_hash(nonce))]
    }

    fn shard_mut(&mut self, nonce: &[u8; 16]) -> &mut NonceShard {
        let i = self.spread.shard(nonce_hash(nonce));
        &mut self.by_nonce[i]
    }

    fn contains(&self, nonce: &[u8; 16]) -> bool {
        self.shard(nonce).contains_key(nonce)
    }

    fn owner(&self, nonce: &[u8; 16]) -> Option<&Hash32> {
        self.shard(nonce).get(nonce).map(|(_, h)| h)
    }

    fn insert(&mut self, nonce: [u8; 16], height: u64, tx: Hash32) {
        self.shard_mut(&nonce).insert(nonce, (height, tx));
    }

    /// Adds block `height`'s `n` entry.
    fn add_block(&mut self, height: u64, value: &[u8]) {
        let mut newest = 0;
        for (n, ts, tx) in nonce_entries(value) {
            self.insert(n, height, tx);
            newest = newest.max(ts);
        }
        self.blocks.insert((newest, height));
    }

    /// Removes block `height`'s `n` entry.
    fn remove_block(&mut self, height: u64, value: &[u8]) {
        let mut newest = 0;
        for (n, ts, _) in nonce_entries(value) {
            let shard = self.shard_mut(&n);
            if shard.get(&n).is_some_and(|(h, _)| *h == height) {
                shard.remove(&n);
            }
            newest = newest.max(ts);
        }
        self.blocks.remove(&(newest, height));
    }

    /// The oldest block whose nonces are all older than `horizon`, if any.
    fn expired(&self, horizon: u64) -> Option<u64> {
        self.blocks.first().filter(|(newest, _)| *newest < horizon).map(|(_, h)| *h)
    }
}

/// Nonces live one state entry per block, not one per tx: a tx then costs
/// one Merkle update (its record) instead of three (record, nonce, and the
/// nonce's deletion after the TTL), and Merkle hashing is most of execution.
fn nonce_block_key(height: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'n');
    k.extend_from_slice(&height.to_be_bytes());
    k
}

fn nonce_entries(value: &[u8]) -> impl Iterator<Item = ([u8; 16], u64, Hash32)> + '_ {
    value.chunks_exact(NONCE_ENTRY).map(|e| {
        (
            e[..16].try_into().expect("16 bytes"),
            u64::from_be_bytes(e[16..24].try_into().expect("8 bytes")),
            e[24..].try_into().expect("32 bytes"),
        )
    })
}

fn producer_key(producer: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'r');
    k.extend_from_slice(producer);
    k
}

fn be(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

/// One producer's `r` record, as a block's execution updates it.
#[derive(Debug, Clone, Copy)]
struct ProducerRecord {
    accepted: u64,
    rejected: u64,
    tokens_milli: u64,
    counted_at_ms: u64,
}

impl ProducerRecord {
    fn parse(v: Option<&Vec<u8>>, cfg: &StateConfig, now_ms: u64) -> Self {
        match v {
            Some(v) if v.len() >= PRODUCER_RECORD => ProducerRecord {
                accepted: be(&v[..8]),
                rejected: be(&v[8..16]),
                tokens_milli: be(&v[16..24]),
                counted_at_ms: be(&v[24..32]),
            },
            // A producer not seen yet starts with a full bucket.
            _ => ProducerRecord { accepted: 0, rejected: 0, tokens_milli: cfg.bucket_milli(), counted_at_ms: now_ms },
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(PRODUCER_RECORD);
        for x in [self.accepted, self.rejected, self.tokens_milli, self.counted_at_ms] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v
    }

    /// Takes one token at block time `now_ms` (refilled since the last
    /// count); false when the bucket is empty. Always true with no limit.
    fn take_token(&mut self, cfg: &StateConfig, now_ms: u64) -> bool {
        if cfg.rate_per_second == 0 {
            return true;
        }
        let elapsed_ms = now_ms.saturating_sub(self.counted_at_ms);
        // tokens/s × ms = thousandths of a token.
        let refill = elapsed_ms.saturating_mul(cfg.rate_per_second as u64);
        self.tokens_milli = self.tokens_milli.saturating_add(refill).min(cfg.bucket_milli());
        self.counted_at_ms = self.counted_at_ms.max(now_ms);
        if self.tokens_milli >= MILLI {
            self.tokens_milli -= MILLI;
            true
        } else {
            false
        }
    }
}

/// An applied tx's entry: `u64 BE height ‖ tx_hash ‖ content_hash` (72
/// bytes). The payload itself lives once, in the block at that height; the
/// signed `content_hash` (= SHA-256 of the payload, checked before the
/// signature) commits to it. Holding the payload here too cost a copy, a
/// SHA-256 of it on the core thread and its bytes in memory and in every
/// snapshot, per tx (at 4 KB payloads: 9% of a validator's samples, and
/// the state grew by 4 KB a tx).
pub const RECORD_LEN: usize = 8 + 32 + 32;

fn record(height: u64, tx_hash: &Hash32, content_hash: &Hash32) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_LEN);
    v.extend_from_slice(&height.to_be_bytes());
    v.extend_from_slice(tx_hash);
    v.extend_from_slice(content_hash);
    v
}

/// Per key a block wrote: its value before the block, and the hash of its
/// newest value (`None`: deleted), hashed as it is written so the tree
/// update needs no second look-up.
type Written = HashMap<Vec<u8>, (Option<Vec<u8>>, Option<Hash32>)>;

/// Writes of one block, applied to `kv` as they happen and to the tree once.
struct Batch<'a> {
    kv: &'a mut Kv,
    undo: Written,
}

impl Batch<'_> {
    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        let h = sha256(&v);
        let old = self.kv.insert(k.clone(), v);
        self.undo.entry(k).or_insert((old, None)).1 = Some(h);
    }
    fn delete(&mut self, k: &[u8]) {
        if let Some(old) = self.kv.remove(k) {
            self.undo.entry(k.to_vec()).or_insert((Some(old), None)).1 = None;
        }
    }
    fn get(&self, k: &[u8]) -> Option<&Vec<u8>> {
        self.kv.get(k)
    }
}

impl State {
    pub fn new(cfg: StateConfig) -> Self {
        State { cfg, kv: Kv::default(), tree: SparseMerkleTree::new(), nonces: NonceIndex::default(), height: 0 }
    }

    pub fn root(&self) -> Hash32 {
        self.tree.root()
    }
    pub fn height(&self) -> u64 {
        self.height
    }
    pub fn len(&self) -> usize {
        self.kv.len()
    }
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.kv.get(key).map(|v| v.as_slice())
    }
    pub fn has_nonce(&self, nonce: &[u8; 16]) -> bool {
        self.nonces.contains(nonce)
    }
    /// The committed tx that consumed `nonce`, while it is remembered (its
    /// TTL): the same hash means this tx is committed; another, that the
    /// nonce is used.
    pub fn nonce_owner(&self, nonce: &[u8; 16]) -> Option<&Hash32> {
        self.nonces.owner(nonce)
    }
    /// Whether this very tx is committed (within the nonce TTL; older txs
    /// are refused as expired anyway).
    pub fn is_committed(&self, nonce: &[u8; 16], tx_hash: &Hash32) -> bool {
        self.nonce_owner(nonce) == Some(tx_hash)
    }
    /// A producer's accepted and rejected txs so far (the `r` table).
    pub fn producer_totals(&self, producer: &[u8; 32]) -> (u64, u64) {
        self.kv.get(&producer_key(producer)).map_or((0, 0), |v| (be(&v[..8]), be(&v[8..16])))
    }

    /// Merkle proof for `key` against `root()`.
    pub fn prove(&self, key: &[u8]) -> merkle::Proof {
        self.tree.prove(&sha256(key))
    }

    /// Executes block `height` with timestamp `timestamp_ms`. `txs` carry
    /// their tx hashes (computed once upstream).
    pub fn execute_block(&mut self, height: u64, timestamp_ms: u64, txs: &[(&Event, Hash32)]) -> Executed {
        assert_eq!(height, self.height + 1, "blocks execute in height order");
        // Forget nonces past their TTL, a block's worth at a time once all
        // of its are: a tx that old is refused as expired anyway (that check
        // comes first), so when a nonce is forgotten changes no outcome.
        let horizon = timestamp_ms.saturating_sub(self.cfg.nonce_ttl_ms);
        let mut b = Batch { kv: &mut self.kv, undo: HashMap::with_capacity(txs.len() + 8) };
        while let Some(h) = self.nonces.expired(horizon) {
            let key = nonce_block_key(h);
            let value = b.kv.get(&key).map(Vec::as_slice).unwrap_or_default();
            self.nonces.remove_block(h, value);
            b.delete(&key);
        }
        let mut consumed = Vec::with_capacity(txs.len() * NONCE_ENTRY);
        let mut newest = 0;
        let mut receipts = Vec::with_capacity(txs.len());
        // Per-producer records, read once and written once per block (the
        // batch and the tree do not depend on the order of writes).
        let mut producers: HashMap<[u8; 32], ProducerRecord> = HashMap::new();
        for (ev, tx_hash) in txs {
            let rec = producers
                .entry(ev.producer)
                .or_insert_with(|| ProducerRecord::parse(b.get(&producer_key(&ev.producer)), &self.cfg, timestamp_ms));
            let status = Self::apply_tx(&mut b, &self.nonces, &self.cfg, rec, height, timestamp_ms, ev, tx_hash);
            let consumes = !matches!(
                status,
                TxStatus::Repeat | TxStatus::Rejected(RejectReason::ReplayedNonce | RejectReason::Expired)
            );
            if consumes {
                self.nonces.insert(ev.nonce, height, *tx_hash);
                newest = newest.max(ev.timestamp_ms);
                consumed.extend_from_slice(&ev.nonce);
                consumed.extend_from_slice(&ev.timestamp_ms.to_be_bytes());
                consumed.extend_from_slice(tx_hash);
            }
            match status {
                TxStatus::Applied => rec.accepted += 1,
                TxStatus::Rejected(_) => rec.rejected += 1,
                TxStatus::Repeat => {}
            }
            receipts.push(Receipt { tx_hash: *tx_hash, status });
        }
        for (p, rec) in producers {
            b.put(producer_key(&p), rec.encode());
        }
        if !consumed.is_empty() {
            // Its nonces are indexed already (tx by tx); now its pruning order.
            self.nonces.blocks.insert((newest, height));
            b.put(nonce_block_key(height), consumed);
        }
        // The scheduled epoch starts above its switch height: block H, the
        // last of the old set, makes it current (so H's state root, which
        // the old set certifies, names the set that orders H + 1).
        let switch = b.get(NEXT_EPOCH_KEY).and_then(|v| reconfig::Epoch::decode(v)).filter(|e| e.from_height == height);
        if let Some(next) = switch {
            b.delete(NEXT_EPOCH_KEY);
            b.put(epoch_key(next.epoch), next.encode());
            b.put(CURRENT_EPOCH_KEY.to_vec(), next.encode());
        }
        let undo_map = std::mem::take(&mut b.undo);
        let updates: Vec<merkle::Update> = undo_map.iter().map(|(k, (_, h))| (sha256(k), *h)).collect();
        self.tree.apply(updates);
        let undo = Undo { prev: undo_map.into_iter().map(|(k, (old, _))| (k, old)).collect(), height: self.height };
        self.height = height;
        Executed { state_root: self.tree.root(), receipts, undo }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_tx(
        b: &mut Batch<'_>,
        nonces: &NonceIndex,
        cfg: &StateConfig,
        producer: &mut ProducerRecord,
        height: u64,
        now: u64,
        ev: &Event,
        tx_hash: &Hash32,
    ) -> TxStatus {
        let owner = nonces.owner(&ev.nonce);
        if owner == Some(tx_hash) {
            return TxStatus::Repeat;
        }
        if ev.timestamp_ms.saturating_add(cfg.nonce_ttl_ms) <= now {
            return TxStatus::Rejected(RejectReason::Expired);
        }
        if ev.timestamp_ms > now.saturating_add(cfg.future_skew_ms) {
            return TxStatus::Rejected(RejectReason::Future);
        }
        if owner.is_some() {
            return TxStatus::Rejected(RejectReason::ReplayedNonce);
        }
        if !producer.take_token(cfg, now) {
            return TxStatus::Rejected(RejectReason::RateLimited);
        }
        let payload = match parse_payload(ev.kind, &ev.payload) {
            Ok(p) => p,
            Err(_) => return TxStatus::Rejected(RejectReason::InvalidPayload),
        };
        let key = match (ev.kind, &payload) {
            (TxKind::Anomaly, _) => [&[b'a'][..], &ev.id].concat(),
            (TxKind::Evidence, _) => [&[b'e'][..], &ev.id].concat(),
            (TxKind::Policy, Payload::Policy(p)) => [&[b'p'][..], p.policy_id.as_bytes()].concat(),
            (TxKind::Reconfiguration, _) => [&[b'c'][..], &ev.id].concat(),
            (TxKind::Policy, _) => unreachable!("parse_payload returns the kind's payload"),
        };
        if ev.kind != TxKind::Policy && b.get(&key).is_some() {
            return TxStatus::Rejected(RejectReason::DuplicateId);
        }
        if let Payload::Reconfiguration(rc) = &payload {
            match schedule(b, cfg, height, rc) {
                Ok(next) => {
                    b.put(epoch_change_key(next.epoch), ev.payload.clone());
                    b.put(NEXT_EPOCH_KEY.to_vec(), next.encode());
                }
                Err(_) => return TxStatus::Rejected(RejectReason::ReconfigurationRefused),
            }
        }
        b.put(key, record(height, tx_hash, &ev.content_hash));
        TxStatus::Applied
    }

    /// Epoch `e`'s record (0: the genesis set), if the chain reached it.
    pub fn epoch(&self, e: u64) -> Option<reconfig::Epoch> {
        match e {
            0 => current_epoch(None, &self.cfg),
            e => self.kv.get(&epoch_key(e)).and_then(|v| reconfig::Epoch::decode(v)),
        }
    }

    /// The set change that made epoch `e` (its payload), for `e` ≥ 1.
    pub fn epoch_change(&self, e: u64) -> Option<&[u8]> {
        self.kv.get(&epoch_change_key(e)).map(Vec::as_slice)
    }

    /// The current epoch: the state's record, or the genesis set (epoch 0).
    pub fn current_epoch(&self) -> Option<reconfig::Epoch> {
        current_epoch(self.kv.get(CURRENT_EPOCH_KEY).map(Vec::as_slice), &self.cfg)
    }

    /// The scheduled epoch (its set and switch height), if a change was
    /// ordered and has not taken effect.
    pub fn scheduled_epoch(&self) -> Option<reconfig::Epoch> {
        self.kv.get(NEXT_EPOCH_KEY).and_then(|v| reconfig::Epoch::decode(v))
    }

    /// Rolls back the last executed block (its proposal was abandoned).
    pub fn rollback(&mut self, undo: Undo) {
        let mut updates = Vec::with_capacity(undo.prev.len());
        for (k, old) in undo.prev {
            if k.first() == Some(&b'n') {
                let h = u64::from_be_bytes(k[1..].try_into().expect("nonce block key"));
                if let Some(v) = self.kv.get(&k) {
                    self.nonces.remove_block(h, v);
                }
                if let Some(v) = &old {
                    self.nonces.add_block(h, v);
                }
            }
            updates.push((sha256(&k), old.as_ref().map(|v| sha256(v))));
            match old {
                Some(v) => self.kv.insert(k, v),
                None => self.kv.remove(&k),
            };
        }
        self.tree.apply(updates);
        self.height = undo.height;
    }

    /// The state as a snapshot, entries in key order: every validator's
    /// snapshot of a height is byte-identical (joiners fetch chunks of it
    /// from several peers).
    pub fn snapshot(&self, block_hash: Hash32) -> proto::StateSnapshot {
        let mut s = self.snapshot_unordered(block_hash);
        sort_snapshot(&mut s);
        s
    }

    /// `snapshot` without the sort, for a caller that sorts elsewhere (the
    /// runtime, off its core thread: [`sort_snapshot`]).
    pub fn snapshot_unordered(&self, block_hash: Hash32) -> proto::StateSnapshot {
        self.snapshot_pending(block_hash).into_unordered()
    }

    /// A snapshot whose entries are still shared with this state: what the
    /// core thread takes (one reference per `kv` shard, no copy); the copy
    /// and the sort happen where [`Pending::into_proto`] is called.
    pub fn snapshot_pending(&self, block_hash: Hash32) -> Pending {
        Pending { height: self.height, state_root: self.root(), block_hash, entries: self.kv.freeze() }
    }

    /// Restores a snapshot and re-verifies its root.
    pub fn restore(snap: &proto::StateSnapshot, cfg: StateConfig) -> Result<State, StateError> {
        let mut s = State::new(cfg);
        let mut updates = Vec::with_capacity(snap.entries.len());
        for e in &snap.entries {
            if e.key.first() == Some(&b'n') {
                let h: [u8; 8] =
                    e.key[1..].try_into().map_err(|_| StateError::Malformed("nonce block key length".into()))?;
                if e.value.is_empty() || e.value.len() % NONCE_ENTRY != 0 {
                    return Err(StateError::Malformed(format!("nonce block value of {} bytes", e.value.len())));
                }
                s.nonces.add_block(u64::from_be_bytes(h), &e.value);
            }
            updates.push((sha256(&e.key), Some(sha256(&e.value))));
            s.kv.insert(e.key.clone(), e.value.clone());
        }
        s.tree.apply(updates);
        if s.root().as_slice() != snap.state_root.as_slice() {
            return Err(StateError::RootMismatch {
                expected: hex::encode(&snap.state_root),
                actual: hex::encode(s.root()),
            });
        }
        s.height = snap.height;
        Ok(s)
    }
}

/// Puts a snapshot's entries in key order (see [`State::snapshot`]).
/// A state snapshot taken by [`State::snapshot_pending`].
#[derive(Debug, Clone)]
pub struct Pending {
    pub height: u64,
    pub state_root: Hash32,
    pub block_hash: Hash32,
    pub entries: kv::Frozen,
}

impl Pending {
    /// The snapshot, entries in key order (as [`State::snapshot`]).
    pub fn into_proto(self) -> proto::StateSnapshot {
        let mut s = self.into_unordered();
        sort_snapshot(&mut s);
        s
    }

    fn into_unordered(self) -> proto::StateSnapshot {
        proto::StateSnapshot {
            height: self.height,
            state_root: self.state_root.to_vec(),
            block_hash: self.block_hash.to_vec(),
            entries: self.entries.iter().map(|(k, v)| proto::StateEntry { key: k.clone(), value: v.clone() }).collect(),
        }
    }
}

pub fn sort_snapshot(s: &mut proto::StateSnapshot) {
    s.entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::crypto;
    use crate::protocol::event::sample_anomaly_payload;
    use prost::Message;

    fn ev(k: &crypto::SigningKey, kind: TxKind, i: u64, ts: u64, payload: Vec<u8>) -> Event {
        Event::sign(kind, k, (i as u128).to_be_bytes(), payload, ts, (i as u32).to_be_bytes())
    }

    fn run(s: &mut State, h: u64, ts: u64, evs: &[Event]) -> Executed {
        let txs: Vec<(&Event, Hash32)> = evs.iter().map(|e| (e, e.tx_hash())).collect();
        s.execute_block(h, ts, &txs)
    }

    /// A chain of four validators (ids 1..=4) with a checkpoint every 8 blocks.
    fn chain_of_four() -> (Vec<crypto::SigningKey>, StateConfig) {
        let keys: Vec<crypto::SigningKey> = (0..4).map(|_| crypto::generate_key()).collect();
        let genesis = keys.iter().enumerate().map(|(i, k)| (i as u32 + 1, crypto::public_key(k))).collect();
        let rules = reconfig::ChainRules { chain: [3; 32], genesis, checkpoint_interval: 8, window: 8 };
        (keys, StateConfig { chain: Some(std::sync::Arc::new(rules)), ..StateConfig::default() })
    }

    fn change_tx(submitter: &crypto::SigningKey, i: u64, ts: u64, rc: &reconfig::Reconfiguration) -> Event {
        ev(submitter, TxKind::Reconfiguration, i, ts, rc.to_proto().encode_to_vec())
    }

    fn signed_change(
        keys: &[crypto::SigningKey],
        signers: &[usize],
        epoch: u64,
        change: reconfig::Change,
    ) -> reconfig::Reconfiguration {
        let changes = vec![change];
        let signatures =
            signers.iter().map(|&i| (i as u32 + 1, reconfig::sign(&keys[i], &[3; 32], epoch, &changes))).collect();
        reconfig::Reconfiguration { chain: [3; 32], epoch, changes, signatures }
    }

    #[test]
    fn a_reconfiguration_signed_by_a_quorum_is_scheduled_in_the_state_once_and_others_are_refused() {
        let (keys, cfg) = chain_of_four();
        let submitter = crypto::generate_key();
        let t0 = 1_700_000_000_000u64;
        let new = crypto::public_key(&crypto::generate_key());
        let add = reconfig::Change { kind: reconfig::ChangeKind::Add, id: 5, key: new };
        let mut s = State::new(cfg.clone());
        assert_eq!(s.current_epoch().map(|e| (e.epoch, e.validators.len())), Some((0, 4)), "epoch 0: the genesis set");
        assert_eq!(s.scheduled_epoch(), None);
        // Two signatures of four: q = 3, refused at execution.
        let weak = change_tx(&submitter, 1, t0, &signed_change(&keys, &[0, 1], 0, add));
        let e = run(&mut s, 1, t0 + 10, std::slice::from_ref(&weak));
        assert_eq!(e.receipts[0].status, TxStatus::Rejected(RejectReason::ReconfigurationRefused));
        assert_eq!(s.scheduled_epoch(), None);
        // Three: scheduled at the first checkpoint at least one interval on (block 3 -> 16).
        let ok = change_tx(&submitter, 2, t0, &signed_change(&keys, &[0, 2, 3], 0, add));
        let root_before = s.root();
        let e = run(&mut s, 2, t0 + 10, std::slice::from_ref(&ok));
        assert_eq!(e.receipts[0].status, TxStatus::Applied);
        assert_ne!(s.root(), root_before, "the scheduled change is in the state root");
        let next = s.scheduled_epoch().expect("scheduled");
        assert_eq!((next.epoch, next.from_height, next.validators.get(&5)), (1, 16, Some(&new)));
        assert_eq!(s.current_epoch().unwrap().epoch, 0, "nothing switches before the switch height");
        // A second change while one is scheduled is refused, even a valid one.
        let rm = reconfig::Change { kind: reconfig::ChangeKind::Remove, id: 4, key: [0; 32] };
        let rm4 = change_tx(&submitter, 3, t0, &signed_change(&keys, &[0, 1, 2], 0, rm));
        let e = run(&mut s, 3, t0 + 10, std::slice::from_ref(&rm4));
        assert_eq!(e.receipts[0].status, TxStatus::Rejected(RejectReason::ReconfigurationRefused));
        // The same tx again is a repeat; a garbled payload is invalid.
        assert_eq!(run(&mut s, 4, t0 + 10, std::slice::from_ref(&ok)).receipts[0].status, TxStatus::Repeat);
        let garbled = ev(&submitter, TxKind::Reconfiguration, 5, t0, vec![0x0a, 0x03, 1, 2, 3]);
        let e = run(&mut s, 5, t0 + 10, std::slice::from_ref(&garbled));
        assert_eq!(e.receipts[0].status, TxStatus::Rejected(RejectReason::InvalidPayload));
        // A snapshot carries the schedule; every validator computes the same root.
        let restored = State::restore(&s.snapshot([0; 32]), cfg.clone()).unwrap();
        assert_eq!(restored.scheduled_epoch(), s.scheduled_epoch());
        // Block 16 (the switch height, the old set's last) makes epoch 1
        // current; undoing it schedules it again.
        for h in 6..16 {
            run(&mut s, h, t0 + 10, &[]);
        }
        assert_eq!(s.current_epoch().unwrap().epoch, 0);
        let before = s.root();
        let e = run(&mut s, 16, t0 + 10, &[]);
        assert_eq!(s.current_epoch().as_ref(), Some(&next));
        assert_eq!(s.scheduled_epoch(), None);
        assert_eq!(s.epoch(1).as_ref(), Some(&next));
        let epochs: Vec<_> = (0..=1).filter_map(|e| s.epoch(e)).collect();
        let epoch_at = |h| reconfig::certifying(&epochs, h);
        assert_eq!(epoch_at(16).map(|e| e.epoch), Some(0), "block 16 is the old set's");
        assert_eq!(epoch_at(17).map(|e| e.epoch), Some(1));
        assert_eq!(epoch_at(1).unwrap().validators.len(), 4);
        s.rollback(e.undo);
        assert_eq!((s.root(), s.scheduled_epoch(), s.current_epoch().unwrap().epoch), (before, Some(next.clone()), 0));
        // A chain without rules (one validator) refuses any change.
        let mut single = State::new(StateConfig::default());
        let e = run(&mut single, 1, t0 + 10, std::slice::from_ref(&ok));
        assert_eq!(e.receipts[0].status, TxStatus::Rejected(RejectReason::ReconfigurationRefused));
    }

    #[test]
    fn an_applied_tx_is_recorded_by_its_height_tx_hash_and_content_hash_not_its_payload() {
        let k = crypto::generate_key();
        let t0 = 1_700_000_000_000u64;
        let a = ev(&k, TxKind::Anomaly, 1, t0, sample_anomaly_payload(1, 4000));
        let mut s = State::new(StateConfig::default());
        run(&mut s, 1, t0 + 10, &[]);
        run(&mut s, 2, t0 + 10, std::slice::from_ref(&a));
        let v = s.get(&[&[b'a'][..], &a.id].concat()).expect("the anomaly is in the state");
        assert_eq!(v.len(), RECORD_LEN);
        assert_eq!(&v[..8], &2u64.to_be_bytes());
        assert_eq!(&v[8..40], &a.tx_hash());
        assert_eq!(&v[40..], &crate::sha256(&a.payload), "the content hash commits to the payload");
    }

    #[test]
    fn deterministic_root_receipts_replay_and_ttl() {
        let k = crypto::generate_key();
        let t0 = 1_700_000_000_000u64;
        let a = ev(&k, TxKind::Anomaly, 1, t0, sample_anomaly_payload(1, 300));
        let b = ev(&k, TxKind::Anomaly, 2, t0, sample_anomaly_payload(2, 300));
        let bad = ev(&k, TxKind::Anomaly, 3, t0, vec![0xff, 0xff]);
        let pol = ev(
            &k,
            TxKind::Policy,
            4,
            t0,
            proto::PolicyPayload { policy_id: "p".into(), action: "block".into(), ..Default::default() }
                .encode_to_vec(),
        );
        let mut s1 = State::new(StateConfig::default());
        let mut s2 = State::new(StateConfig::default());
        let e1 = run(&mut s1, 1, t0 + 10, &[a.clone(), b.clone(), bad.clone(), pol.clone()]);
        let e2 = run(&mut s2, 1, t0 + 10, &[a.clone(), b.clone(), bad.clone(), pol.clone()]);
        assert_eq!(e1.state_root, e2.state_root);
        let st: Vec<_> = e1.receipts.iter().map(|r| r.status).collect();
        assert_eq!(
            st,
            vec![
                TxStatus::Applied,
                TxStatus::Applied,
                TxStatus::Rejected(RejectReason::InvalidPayload),
                TxStatus::Applied
            ]
        );
        // The same tx ordered again executes once: a repeat, not counted.
        let before = s1.producer_totals(&a.producer);
        let e = run(&mut s1, 2, t0 + 20, std::slice::from_ref(&a));
        assert_eq!(e.receipts[0].status, TxStatus::Repeat);
        assert_eq!(s1.producer_totals(&a.producer), before, "a repeat counts against no one");
        assert!(s1.is_committed(&a.nonce, &a.tx_hash()));
        // Another tx reusing the nonce is refused (and counted).
        let reuse =
            Event::sign(TxKind::Anomaly, &k, [0x55; 16], sample_anomaly_payload(5, 300), t0, 1u32.to_be_bytes());
        assert_eq!(reuse.nonce, a.nonce);
        let e = run(&mut s1, 3, t0 + 25, std::slice::from_ref(&reuse));
        assert_eq!(e.receipts[0].status, TxStatus::Rejected(RejectReason::ReplayedNonce));
        assert_eq!(s1.producer_totals(&a.producer), (before.0, before.1 + 1));
        // Same id, fresh nonce: duplicate id.
        let a2 = Event::sign(TxKind::Anomaly, &k, a.id, sample_anomaly_payload(9, 300), t0 + 5, [9; 4]);
        let e = run(&mut s1, 4, t0 + 30, &[a2]);
        assert_eq!(e.receipts[0].status, TxStatus::Rejected(RejectReason::DuplicateId));
        // After the TTL the nonce is pruned and an old tx is expired, not replayed.
        let late = t0 + StateConfig::default().nonce_ttl_ms + 1;
        assert!(s1.has_nonce(&a.nonce));
        let e = run(&mut s1, 5, late, &[]);
        assert!(!s1.has_nonce(&a.nonce));
        assert!(e.receipts.is_empty());
        let e = run(&mut s1, 6, late + 1, std::slice::from_ref(&a));
        assert_eq!(e.receipts[0].status, TxStatus::Rejected(RejectReason::Expired));
        let fut = ev(&k, TxKind::Anomaly, 77, late + 10 * 60_000, sample_anomaly_payload(77, 100));
        assert_eq!(run(&mut s1, 7, late + 2, &[fut]).receipts[0].status, TxStatus::Rejected(RejectReason::Future));
    }

    #[test]
    fn nonces_are_one_entry_per_block_and_forgotten_once_all_expire() {
        let k = crypto::generate_key();
        let t0 = 1_700_000_000_000u64;
        let ttl = StateConfig::default().nonce_ttl_ms;
        let mut s = State::new(StateConfig::default());
        let txs: Vec<Event> =
            (0..10).map(|i| ev(&k, TxKind::Anomaly, i, t0 + i * 10, sample_anomaly_payload(i, 100))).collect();
        run(&mut s, 1, t0 + 100, &txs);
        // 10 records + one nonce entry for the block + the producer's totals.
        assert_eq!(s.len(), 12);
        let entry = s.get(&nonce_block_key(1)).expect("the block's nonce entry");
        assert_eq!(entry.len(), 10 * NONCE_ENTRY);
        // The oldest nonce is past the TTL, the newest is not: all remembered.
        run(&mut s, 2, t0 + ttl + 1, &[]);
        assert!(txs.iter().all(|t| s.has_nonce(&t.nonce)));
        assert!(s.get(&nonce_block_key(1)).is_some());
        // Every one past it: the entry goes, in one Merkle update.
        let root_before = s.root();
        let pruning = run(&mut s, 3, t0 + 90 + ttl + 1, &[]);
        assert!(txs.iter().all(|t| !s.has_nonce(&t.nonce)));
        assert!(s.get(&nonce_block_key(1)).is_none());
        assert_eq!(s.len(), 11);
        // Rolling the pruning block back remembers them again.
        s.rollback(pruning.undo);
        assert_eq!(s.root(), root_before);
        assert!(txs.iter().all(|t| s.has_nonce(&t.nonce)));
        // A restored snapshot remembers exactly the same nonces.
        let r = State::restore(&s.snapshot([0; 32]), StateConfig::default()).unwrap();
        assert!(txs.iter().all(|t| r.has_nonce(&t.nonce)));
        assert_eq!(r.nonces.blocks, s.nonces.blocks);
        let mut bad = s.snapshot([0; 32]);
        let i = bad.entries.iter().position(|e| e.key.first() == Some(&b'n')).unwrap();
        bad.entries[i].value.pop();
        assert!(matches!(State::restore(&bad, StateConfig::default()), Err(StateError::Malformed(_))));
    }

    #[test]
    fn rollback_restores_root_and_nonces() {
        let k = crypto::generate_key();
        let t0 = 1_000_000u64;
        let mut s = State::new(StateConfig::default());
        run(&mut s, 1, t0, &[ev(&k, TxKind::Anomaly, 1, t0, sample_anomaly_payload(1, 100))]);
        let root1 = s.root();
        let x = ev(&k, TxKind::Anomaly, 2, t0, sample_anomaly_payload(2, 100));
        let e = run(&mut s, 2, t0 + 1, std::slice::from_ref(&x));
        assert_ne!(e.state_root, root1);
        s.rollback(e.undo);
        assert_eq!(s.root(), root1);
        assert_eq!(s.height(), 1);
        assert!(!s.has_nonce(&x.nonce));
        let again = run(&mut s, 2, t0 + 1, &[x]);
        assert_eq!(again.receipts[0].status, TxStatus::Applied);
        assert_eq!(again.state_root, e.state_root);
    }

    #[test]
    fn snapshot_restores_and_rejects_tampering() {
        let k = crypto::generate_key();
        let mut s = State::new(StateConfig::default());
        let evs: Vec<_> = (0..50).map(|i| ev(&k, TxKind::Anomaly, i, 5000, sample_anomaly_payload(i, 100))).collect();
        run(&mut s, 1, 5000, &evs);
        let snap = s.snapshot([7; 32]);
        let bytes = snap.encode_to_vec();
        let back = State::restore(&proto::StateSnapshot::decode(&bytes[..]).unwrap(), StateConfig::default()).unwrap();
        assert_eq!(back.root(), s.root());
        assert_eq!(back.height(), 1);
        assert!(back.has_nonce(&evs[3].nonce));
        // Equal states snapshot to equal bytes (peers serve chunks of them),
        // whatever order their hash maps (each randomly keyed) hold the
        // keys in: the restored copy and a second execution.
        assert!(back.snapshot([7; 32]).encode_to_vec() == bytes, "restored state snapshots differently");
        let mut again = State::new(StateConfig::default());
        run(&mut again, 1, 5000, &evs);
        assert!(again.snapshot([7; 32]).encode_to_vec() == bytes, "equal state snapshots differently");
        assert!(snap.entries.windows(2).all(|w| w[0].key < w[1].key), "entries in key order");
        let mut later = s.snapshot_unordered([7; 32]);
        sort_snapshot(&mut later);
        assert!(later == snap, "sorting an unordered snapshot gives the snapshot");
        let mut bad = snap.clone();
        bad.entries[5].value.push(0);
        assert!(matches!(State::restore(&bad, StateConfig::default()), Err(StateError::RootMismatch { .. })));
        // Proof of a key against the root.
        let key = [&[b'a'][..], &evs[0].id].concat();
        let v = sha256(s.get(&key).unwrap());
        assert!(s.prove(&key).verify(&s.root(), &sha256(&key), Some(&v)));
    }

    #[test]
    fn identical_payloads_are_distinct_txs_and_a_repeat_in_one_block_executes_once() {
        let k = crypto::generate_key();
        let t0 = 1_700_000_000_000u64;
        let p = sample_anomaly_payload(1, 300);
        let (x, y) = (ev(&k, TxKind::Anomaly, 1, t0, p.clone()), ev(&k, TxKind::Anomaly, 2, t0, p));
        let mut s = State::new(StateConfig::default());
        let e = run(&mut s, 1, t0, &[x.clone(), y.clone(), x.clone()]);
        let st: Vec<_> = e.receipts.iter().map(|r| r.status).collect();
        assert_eq!(st, vec![TxStatus::Applied, TxStatus::Applied, TxStatus::Repeat]);
        assert_eq!(s.producer_totals(&x.producer), (2, 0));
        // The nonce entry names each tx once; a restored state knows them.
        assert_eq!(s.get(&nonce_block_key(1)).unwrap().len(), 2 * NONCE_ENTRY);
        let r = State::restore(&s.snapshot([0; 32]), StateConfig::default()).unwrap();
        assert!(r.is_committed(&x.nonce, &x.tx_hash()) && r.is_committed(&y.nonce, &y.tx_hash()));
        assert!(!r.is_committed(&x.nonce, &y.tx_hash()));
    }

    #[test]
    fn the_rate_limit_is_charged_against_block_time_alike_everywhere() {
        let k = crypto::generate_key();
        let t0 = 1_700_000_000_000u64;
        let cfg = StateConfig { rate_per_second: 10, rate_burst: 2, ..StateConfig::default() };
        let evs: Vec<_> = (0..6).map(|i| ev(&k, TxKind::Anomaly, i, t0, sample_anomaly_payload(i, 50))).collect();
        let mut a = State::new(cfg.clone());
        let mut b = State::new(cfg);
        let rl = TxStatus::Rejected(RejectReason::RateLimited);
        // Burst of two, then empty at the same block time.
        let e = run(&mut a, 1, t0, &evs[..3]);
        assert_eq!(
            e.receipts.iter().map(|r| r.status).collect::<Vec<_>>(),
            vec![TxStatus::Applied, TxStatus::Applied, rl]
        );
        // 100 ms of block time at 10/s refills one token.
        let e = run(&mut a, 2, t0 + 100, &evs[3..5]);
        assert_eq!(e.receipts.iter().map(|r| r.status).collect::<Vec<_>>(), vec![TxStatus::Applied, rl]);
        assert_eq!(a.producer_totals(&evs[0].producer), (3, 2));
        // The same blocks elsewhere: the same receipts and root, whenever run.
        run(&mut b, 1, t0, &evs[..3]);
        let e = run(&mut b, 2, t0 + 100, &evs[3..5]);
        assert_eq!(e.state_root, a.root());
        // A rate-limited tx consumed its nonce: resending it is a repeat.
        let e = run(&mut a, 3, t0 + 10_000, std::slice::from_ref(&evs[2]));
        assert_eq!(e.receipts[0].status, TxStatus::Repeat);
        // No limit configured: nothing is refused.
        let mut free = State::new(StateConfig::default());
        assert!(run(&mut free, 1, t0, &evs).receipts.iter().all(|r| r.status == TxStatus::Applied));
    }
}
