//! Mempool: admitted transactions waiting for a block, FIFO by admission.
//!
//! Bounded by count and bytes; when full, `has_room` is false and the core
//! stops draining the verify rings, so backpressure reaches the source. An
//! admitted transaction leaves only by commit (of any validator's block), or
//! when another tx with its nonce commits (with a verdict): nothing is
//! dropped silently.

use crate::protocol::event::Event;
use crate::Hash32;
use foldhash::{HashMap, HashMapExt};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A transaction that passed verification, with its precomputed hash.
#[derive(Debug, Clone)]
pub struct VerifiedTx {
    pub event: Arc<Event>,
    /// SHA-256 of the signed bytes.
    pub tx_hash: Hash32,
    /// When the validator admitted it (ms), for latency metrics.
    pub received_ms: u64,
    /// Its Kafka message, if any (see `ingest::SourcePos`).
    pub pos: Option<crate::protocol::source::SourcePos>,
}

#[derive(Debug, Clone, Copy)]
pub struct MempoolConfig {
    pub max_txs: usize,
    pub max_bytes: usize,
}

impl Default for MempoolConfig {
    fn default() -> Self {
        MempoolConfig { max_txs: 1000, max_bytes: 10 * 1024 * 1024 }
    }
}

/// Outcome of an admission attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Added,
    /// This very tx (same tx hash) is already here: dropped as a duplicate.
    Duplicate,
    /// No room: the caller keeps the tx and retries later (backpressure).
    Full,
}

/// Admitted txs, by identity (the tx hash, never the payload: two alerts
/// with equal payloads are two txs). Txs sharing a nonce are all kept: which
/// of them commits is for the ordered chain to say, and the others then
/// leave with a `replayed_nonce` verdict every validator agrees on
/// ([`Mempool::remove_nonce_losers`]).
pub struct Mempool {
    cfg: MempoolConfig,
    /// Admission number -> tx not yet in a proposal (FIFO).
    pending: BTreeMap<u64, VerifiedTx>,
    /// Admission number -> tx in a proposal not yet committed.
    proposed: BTreeMap<u64, VerifiedTx>,
    by_hash: HashMap<Hash32, u64>,
    /// Nonce -> the first tx admitted with it.
    by_nonce: HashMap<[u8; 16], u64>,
    /// Nonce -> further txs with that nonce (a producer reusing one; rare,
    /// so the common case costs no allocation).
    nonce_twins: HashMap<[u8; 16], Vec<u64>>,
    bytes: usize,
    pending_bytes: usize,
    next: u64,
}

impl Mempool {
    pub fn new(cfg: MempoolConfig) -> Self {
        assert!(cfg.max_txs > 0 && cfg.max_bytes > 0, "mempool limits must be positive");
        Mempool {
            cfg,
            pending: BTreeMap::new(),
            proposed: BTreeMap::new(),
            by_hash: HashMap::with_capacity(cfg.max_txs),
            by_nonce: HashMap::with_capacity(cfg.max_txs),
            nonce_twins: HashMap::new(),
            bytes: 0,
            pending_bytes: 0,
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Txs not yet in a proposal.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
    /// Bytes of the txs not yet in a proposal (what the next block can take).
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }
    pub fn has_room(&self) -> bool {
        self.len() < self.cfg.max_txs && self.bytes < self.cfg.max_bytes
    }
    pub fn contains(&self, tx_hash: &Hash32) -> bool {
        self.by_hash.contains_key(tx_hash)
    }
    /// The admitted (so verified) tx with this hash, if pending or proposed.
    pub fn get(&self, tx_hash: &Hash32) -> Option<&VerifiedTx> {
        let n = self.by_hash.get(tx_hash)?;
        self.pending.get(n).or_else(|| self.proposed.get(n))
    }
    /// When the oldest tx not yet proposed was admitted.
    pub fn oldest_pending_ms(&self) -> Option<u64> {
        self.pending.values().next().map(|t| t.received_ms)
    }
    /// Pending txs, oldest first.
    pub fn iter_pending(&self) -> impl Iterator<Item = &VerifiedTx> {
        self.pending.values()
    }

    /// Whether `tx` fits within the limits now.
    pub fn fits(&self, tx: &VerifiedTx) -> bool {
        self.len() < self.cfg.max_txs && self.bytes + tx.event.size() <= self.cfg.max_bytes
    }

    pub fn admit(&mut self, tx: VerifiedTx) -> Admit {
        if self.by_hash.contains_key(&tx.tx_hash) {
            return Admit::Duplicate;
        }
        if !self.fits(&tx) {
            return Admit::Full;
        }
        let n = self.next;
        self.next += 1;
        match self.by_nonce.entry(tx.event.nonce) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(n);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.nonce_twins.entry(tx.event.nonce).or_default().push(n)
            }
        }
        self.by_hash.insert(tx.tx_hash, n);
        self.bytes += tx.event.size();
        self.pending_bytes += tx.event.size();
        self.pending.insert(n, tx);
        Admit::Added
    }

    /// Takes the oldest pending txs into a proposal, up to the limits,
    /// skipping those `skip` names (e.g. in a block in flight) and any whose
    /// nonce another tx of this block already has; the skipped stay pending.
    /// The taken stay in the pool (counted in `len`) until their block commits.
    pub fn take_for_block(
        &mut self,
        max_txs: usize,
        max_bytes: usize,
        mut skip: impl FnMut(&VerifiedTx) -> bool,
    ) -> Vec<VerifiedTx> {
        let mut taken = Vec::new();
        let mut bytes = 0;
        let mut twins_seen: Option<foldhash::HashSet<[u8; 16]>> = None;
        for (&n, tx) in &self.pending {
            let sz = tx.event.size();
            if taken.len() >= max_txs || (bytes + sz > max_bytes && !taken.is_empty()) {
                break;
            }
            if skip(tx) {
                continue;
            }
            if self.nonce_twins.contains_key(&tx.event.nonce)
                && (!twins_seen.get_or_insert_with(Default::default).insert(tx.event.nonce)
                    || self.nonce_proposed(&tx.event.nonce))
            {
                continue; // one tx per nonce in flight (backups refuse two)
            }
            bytes += sz;
            taken.push(n);
        }
        let mut out = Vec::with_capacity(taken.len());
        for n in taken {
            let tx = self.pending.remove(&n).expect("pending tx");
            self.pending_bytes -= tx.event.size();
            out.push(tx.clone());
            self.proposed.insert(n, tx);
        }
        out
    }

    fn remove_number(&mut self, n: u64) -> VerifiedTx {
        let tx = match self.pending.remove(&n) {
            Some(tx) => {
                self.pending_bytes -= tx.event.size();
                tx
            }
            None => self.proposed.remove(&n).expect("indexed tx exists"),
        };
        self.by_hash.remove(&tx.tx_hash);
        self.bytes -= tx.event.size();
        let nonce = tx.event.nonce;
        if self.by_nonce.get(&nonce) == Some(&n) {
            match self.nonce_twins.get_mut(&nonce) {
                Some(t) => {
                    self.by_nonce.insert(nonce, t.remove(0));
                    if t.is_empty() {
                        self.nonce_twins.remove(&nonce);
                    }
                }
                None => {
                    self.by_nonce.remove(&nonce);
                }
            }
        } else if let Some(t) = self.nonce_twins.get_mut(&nonce) {
            t.retain(|&m| m != n);
            if t.is_empty() {
                self.nonce_twins.remove(&nonce);
            }
        }
        tx
    }

    /// Removes committed txs (any proposer's block); unknown hashes are
    /// ignored. Returns how many were present.
    pub fn remove_committed<'a>(&mut self, tx_hashes: impl IntoIterator<Item = &'a Hash32>) -> usize {
        let mut removed = 0;
        for h in tx_hashes {
            let Some(&n) = self.by_hash.get(h) else { continue };
            self.remove_number(n);
            removed += 1;
        }
        self.debug_check();
        removed
    }

    /// Removes every tx holding `nonce` but `winner` (the tx that committed
    /// it): they can never commit. Returned for their verdict.
    pub fn remove_nonce_losers(&mut self, nonce: &[u8; 16], winner: &Hash32) -> Vec<VerifiedTx> {
        let mut losers = vec![];
        while let Some(&n) = self.by_nonce.get(nonce) {
            let first_is_winner = self.get_number(n).is_some_and(|t| &t.tx_hash == winner);
            let n = if first_is_winner {
                match self.nonce_twins.get(nonce).and_then(|t| t.first()) {
                    Some(&m) => m,
                    None => break,
                }
            } else {
                n
            };
            losers.push(self.remove_number(n));
        }
        self.debug_check();
        losers
    }

    /// Whether a tx with `nonce` is in a proposal.
    fn nonce_proposed(&self, nonce: &[u8; 16]) -> bool {
        let first = self.by_nonce.get(nonce).into_iter();
        let twins = self.nonce_twins.get(nonce).into_iter().flatten();
        first.chain(twins).any(|n| self.proposed.contains_key(n))
    }

    fn get_number(&self, n: u64) -> Option<&VerifiedTx> {
        self.pending.get(&n).or_else(|| self.proposed.get(&n))
    }

    /// Every uncommitted tx becomes pending again (this validator's
    /// proposals were abandoned by a view change).
    pub fn unpropose_all(&mut self) {
        for (n, tx) in std::mem::take(&mut self.proposed) {
            self.pending_bytes += tx.event.size();
            self.pending.insert(n, tx);
        }
    }

    fn debug_check(&self) {
        debug_assert_eq!(self.by_hash.len(), self.pending.len() + self.proposed.len());
        debug_assert!(self.by_nonce.len() <= self.by_hash.len());
        debug_assert!(self.pending_bytes <= self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::crypto;
    use crate::protocol::event::{sample_anomaly_payload, TxKind};

    fn tx(i: u64) -> VerifiedTx {
        let k = crypto::generate_key();
        let ev = Event::sign(TxKind::Anomaly, &k, [i as u8; 16], sample_anomaly_payload(i, 300), 1, [0; 4]);
        VerifiedTx { tx_hash: ev.tx_hash(), event: Arc::new(ev), received_ms: 0, pos: None }
    }

    #[test]
    fn fifo_dedup_limits_and_commit() {
        let mut m = Mempool::new(MempoolConfig { max_txs: 3, max_bytes: 1 << 20 });
        let (a, b, c, d) = (tx(1), tx(2), tx(3), tx(4));
        assert_eq!(m.admit(a.clone()), Admit::Added);
        assert_eq!(m.admit(a.clone()), Admit::Duplicate);
        assert_eq!(m.admit(b.clone()), Admit::Added);
        assert_eq!(m.admit(c.clone()), Admit::Added);
        assert!(!m.has_room());
        assert_eq!(m.admit(d.clone()), Admit::Full);
        let blk = m.take_for_block(2, 1 << 20, |_| false);
        assert_eq!(blk.iter().map(|t| t.tx_hash).collect::<Vec<_>>(), vec![a.tx_hash, b.tx_hash]);
        assert_eq!(m.pending(), 1);
        assert_eq!(m.admit(a.clone()), Admit::Duplicate, "an in-flight tx stays deduplicated");
        assert_eq!(m.remove_committed(&[a.tx_hash, b.tx_hash, [9; 32]]), 2);
        assert_eq!(m.len(), 1);
        assert!(m.get(&c.tx_hash).is_some() && m.get(&a.tx_hash).is_none());
        assert_eq!(m.admit(d.clone()), Admit::Added);
        let blk = m.take_for_block(10, 1 << 20, |_| false);
        assert_eq!(blk.iter().map(|t| t.tx_hash).collect::<Vec<_>>(), vec![c.tx_hash, d.tx_hash]);
    }

    #[test]
    fn byte_limit_applies() {
        let one = tx(1);
        let (sz, one_hash) = (one.event.size(), one.tx_hash);
        let mut m = Mempool::new(MempoolConfig { max_txs: 100, max_bytes: sz * 2 });
        assert_eq!(m.admit(one), Admit::Added);
        assert_eq!(m.admit(tx(2)), Admit::Added);
        assert_eq!(m.admit(tx(3)), Admit::Full);
        assert_eq!(m.bytes(), sz * 2);
        let b = m.take_for_block(10, sz, |_| false);
        assert_eq!(b.len(), 1);
        assert_eq!((m.bytes(), m.pending_bytes()), (sz * 2, sz), "a proposed tx's bytes are not pending");
        m.unpropose_all();
        assert_eq!(m.pending_bytes(), sz * 2);
        assert_eq!(m.pending(), 2);
        // Another proposer's block commits the second tx; the first is taken next.
        let second = m.take_for_block(10, sz * 2, |_| false)[1].tx_hash;
        m.unpropose_all();
        m.remove_committed(&[second]);
        assert_eq!(m.pending(), 1);
        assert_eq!(m.take_for_block(10, sz * 2, |_| false).len(), 1);
        assert_eq!((m.pending(), m.pending_bytes()), (0, 0));
        m.remove_committed(&[one_hash]);
        assert_eq!((m.len(), m.bytes(), m.pending_bytes()), (0, 0, 0));
    }

    fn with_payload(k: &crypto::SigningKey, i: u64, payload: Vec<u8>) -> VerifiedTx {
        let mut nonce = [0u8; 16];
        nonce[12..].copy_from_slice(&(i as u32).to_be_bytes());
        let ev = Event::sign(TxKind::Anomaly, k, nonce, payload, 1, (i as u32).to_be_bytes());
        VerifiedTx { tx_hash: ev.tx_hash(), event: Arc::new(ev), received_ms: i, pos: None }
    }

    #[test]
    fn identical_payloads_under_distinct_ids_and_nonces_are_distinct_txs() {
        let k = crypto::generate_key();
        let payload = sample_anomaly_payload(7, 300);
        let txs: Vec<_> = (0..3).map(|i| with_payload(&k, i, payload.clone())).collect();
        let mut m = Mempool::new(MempoolConfig::default());
        for t in &txs {
            assert_eq!(m.admit(t.clone()), Admit::Added);
        }
        assert_eq!(m.admit(txs[1].clone()), Admit::Duplicate, "an exact resend is a duplicate");
        let b = m.take_for_block(10, 1 << 20, |_| false);
        assert_eq!(b.iter().map(|t| t.tx_hash).collect::<Vec<_>>(), txs.iter().map(|t| t.tx_hash).collect::<Vec<_>>());
    }

    #[test]
    fn txs_sharing_a_nonce_go_one_per_block_and_the_losers_leave_when_one_commits() {
        let k = crypto::generate_key();
        // Three txs, one nonce (ids differ): a producer reusing a nonce.
        let mk = |id: u8| {
            let ev = Event::sign(TxKind::Anomaly, &k, [id; 16], sample_anomaly_payload(id as u64, 100), 1, [0; 4]);
            VerifiedTx { tx_hash: ev.tx_hash(), event: Arc::new(ev), received_ms: 0, pos: None }
        };
        let (a, b, c, d) = (mk(1), mk(2), mk(3), tx(9));
        let mut m = Mempool::new(MempoolConfig::default());
        for t in [&a, &b, &c, &d] {
            assert_eq!(m.admit(t.clone()), Admit::Added);
        }
        let blk = m.take_for_block(10, 1 << 20, |_| false);
        assert_eq!(blk.iter().map(|t| t.tx_hash).collect::<Vec<_>>(), vec![a.tx_hash, d.tx_hash]);
        assert!(m.take_for_block(10, 1 << 20, |_| false).is_empty(), "its nonce is in a proposal");
        // A skipped tx stays pending.
        m.unpropose_all();
        let blk = m.take_for_block(10, 1 << 20, |t| t.tx_hash == a.tx_hash);
        assert_eq!(blk.iter().map(|t| t.tx_hash).collect::<Vec<_>>(), vec![b.tx_hash, d.tx_hash]);
        m.unpropose_all();
        // `b` commits: `a` and `c` can never commit and leave.
        let losers = m.remove_nonce_losers(&b.event.nonce, &b.tx_hash);
        let mut lost: Vec<_> = losers.iter().map(|t| t.tx_hash).collect();
        lost.sort();
        let mut want = vec![a.tx_hash, c.tx_hash];
        want.sort();
        assert_eq!(lost, want);
        assert_eq!(m.remove_committed(&[b.tx_hash]), 1);
        assert_eq!(m.len(), 1);
        assert!(m.remove_nonce_losers(&b.event.nonce, &b.tx_hash).is_empty());
        assert_eq!(m.bytes(), d.event.size());
    }
}
