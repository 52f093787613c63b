//! Mempool: admitted transactions waiting for a block, FIFO by admission.
//!
//! Bounded by count and bytes; when full, `has_room` is false and the core
//! stops draining the verify rings, so backpressure reaches the source. An
//! admitted transaction leaves only by commit (of any validator's block):
//! nothing is dropped silently.

use crate::event::Event;
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
    pub pos: Option<crate::ingest::SourcePos>,
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
    /// Same content hash already pending: dropped as a duplicate.
    Duplicate,
    /// No room: the caller keeps the tx and retries later (backpressure).
    Full,
}

pub struct Mempool {
    cfg: MempoolConfig,
    /// Admission order -> tx. Txs below `cursor` are in a proposal not yet
    /// committed; the rest are pending.
    txs: BTreeMap<u64, VerifiedTx>,
    by_hash: HashMap<Hash32, u64>,
    /// content hash -> admission number of the tx with that content.
    by_content: HashMap<Hash32, u64>,
    bytes: usize,
    next: u64,
    cursor: u64,
    /// Txs below `cursor` still present, and their bytes.
    proposed: usize,
    proposed_bytes: usize,
}

impl Mempool {
    pub fn new(cfg: MempoolConfig) -> Self {
        assert!(cfg.max_txs > 0 && cfg.max_bytes > 0, "mempool limits must be positive");
        Mempool {
            cfg,
            txs: BTreeMap::new(),
            by_hash: HashMap::with_capacity(cfg.max_txs),
            by_content: HashMap::with_capacity(cfg.max_txs),
            bytes: 0,
            next: 0,
            cursor: 0,
            proposed: 0,
            proposed_bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.txs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Txs not yet in a proposal.
    pub fn pending(&self) -> usize {
        self.txs.len() - self.proposed
    }
    /// Bytes of the txs not yet in a proposal (what the next block can take).
    pub fn pending_bytes(&self) -> usize {
        self.bytes - self.proposed_bytes
    }
    pub fn has_room(&self) -> bool {
        self.txs.len() < self.cfg.max_txs && self.bytes < self.cfg.max_bytes
    }
    pub fn contains_content(&self, h: &Hash32) -> bool {
        self.by_content.contains_key(h)
    }
    /// The admitted (so verified) tx with this hash, if pending or proposed.
    pub fn get(&self, tx_hash: &Hash32) -> Option<&VerifiedTx> {
        self.by_hash.get(tx_hash).and_then(|n| self.txs.get(n))
    }
    /// When the oldest tx not yet proposed was admitted.
    pub fn oldest_pending_ms(&self) -> Option<u64> {
        self.txs.range(self.cursor..).next().map(|(_, t)| t.received_ms)
    }

    /// Whether `tx` fits within the limits now.
    pub fn fits(&self, tx: &VerifiedTx) -> bool {
        self.txs.len() < self.cfg.max_txs && self.bytes + tx.event.size() <= self.cfg.max_bytes
    }

    pub fn admit(&mut self, tx: VerifiedTx) -> Admit {
        if self.by_content.contains_key(&tx.event.content_hash) || self.by_hash.contains_key(&tx.tx_hash) {
            return Admit::Duplicate;
        }
        if !self.fits(&tx) {
            return Admit::Full;
        }
        let n = self.next;
        self.next += 1;
        self.by_content.insert(tx.event.content_hash, n);
        self.by_hash.insert(tx.tx_hash, n);
        self.bytes += tx.event.size();
        self.txs.insert(n, tx);
        Admit::Added
    }

    /// Takes the oldest pending txs into a proposal, up to the limits; they
    /// stay in the pool (counted in `len`) until their block commits.
    pub fn take_for_block(&mut self, max_txs: usize, max_bytes: usize) -> Vec<VerifiedTx> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut last = None;
        for (&n, tx) in self.txs.range(self.cursor..) {
            let sz = tx.event.size();
            if out.len() >= max_txs || (bytes + sz > max_bytes && !out.is_empty()) {
                break;
            }
            bytes += sz;
            out.push(tx.clone());
            last = Some(n);
        }
        if let Some(n) = last {
            self.cursor = n + 1;
            self.proposed += out.len();
            self.proposed_bytes += bytes;
        }
        out
    }

    /// Removes committed txs (any proposer's block); unknown hashes are
    /// ignored. Returns how many were present.
    pub fn remove_committed<'a>(&mut self, tx_hashes: impl IntoIterator<Item = &'a Hash32>) -> usize {
        let mut removed = 0;
        for h in tx_hashes {
            let Some(n) = self.by_hash.remove(h) else { continue };
            let tx = self.txs.remove(&n).expect("indexed tx exists");
            self.by_content.remove(&tx.event.content_hash);
            self.bytes -= tx.event.size();
            if n < self.cursor {
                self.proposed -= 1;
                self.proposed_bytes -= tx.event.size();
            }
            removed += 1;
        }
        debug_assert_eq!(self.by_content.len(), self.txs.len());
        debug_assert!(self.proposed <= self.txs.len() && self.proposed_bytes <= self.bytes);
        removed
    }

    /// Every uncommitted tx becomes pending again (this validator's
    /// proposals were abandoned by a view change).
    pub fn unpropose_all(&mut self) {
        self.cursor = 0;
        self.proposed = 0;
        self.proposed_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto;
    use crate::event::{sample_anomaly_payload, TxKind};

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
        let blk = m.take_for_block(2, 1 << 20);
        assert_eq!(blk.iter().map(|t| t.tx_hash).collect::<Vec<_>>(), vec![a.tx_hash, b.tx_hash]);
        assert_eq!(m.pending(), 1);
        assert_eq!(m.admit(a.clone()), Admit::Duplicate, "in-flight content stays deduplicated");
        assert_eq!(m.remove_committed(&[a.tx_hash, b.tx_hash, [9; 32]]), 2);
        assert_eq!(m.len(), 1);
        assert!(m.get(&c.tx_hash).is_some() && m.get(&a.tx_hash).is_none());
        assert_eq!(m.admit(d.clone()), Admit::Added);
        let blk = m.take_for_block(10, 1 << 20);
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
        let b = m.take_for_block(10, sz);
        assert_eq!(b.len(), 1);
        assert_eq!((m.bytes(), m.pending_bytes()), (sz * 2, sz), "a proposed tx's bytes are not pending");
        m.unpropose_all();
        assert_eq!(m.pending_bytes(), sz * 2);
        assert_eq!(m.pending(), 2);
        // Another proposer's block commits the second tx; the first is taken next.
        let second = m.take_for_block(10, sz * 2)[1].tx_hash;
        m.unpropose_all();
        m.remove_committed(&[second]);
        assert_eq!(m.pending(), 1);
        assert_eq!(m.take_for_block(10, sz * 2).len(), 1);
        assert_eq!((m.pending(), m.pending_bytes()), (0, 0));
        m.remove_committed(&[one_hash]);
        assert_eq!((m.len(), m.bytes(), m.pending_bytes()), (0, 0, 0));
    }
}
