//! Mempool: admitted transactions waiting for a block, FIFO by admission.
//!
//! Bounded by count and bytes; when full, `has_room` is false and the core
//! stops draining the verify rings, so backpressure reaches the source. An
//! admitted transaction leaves only by commit: nothing is dropped silently.

use crate::event::Event;
use crate::Hash32;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A transaction that passed verification, with its precomputed hash.
#[derive(Debug, Clone)]
pub struct VerifiedTx {
    pub event: Arc<Event>,
    /// SHA-256 of the signed bytes.
    pub tx_hash: Hash32,
    /// When the validator admitted it (ms), for latency metrics.
    pub received_ms: u64,
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
    queue: VecDeque<VerifiedTx>,
    /// content hash -> tx hash of the pending tx with that content.
    by_content: HashMap<Hash32, Hash32>,
    bytes: usize,
    /// Leading txs of `queue` taken into a block not yet committed.
    in_flight: usize,
}

impl Mempool {
    pub fn new(cfg: MempoolConfig) -> Self {
        assert!(cfg.max_txs > 0 && cfg.max_bytes > 0, "mempool limits must be positive");
        Mempool {
            cfg,
            queue: VecDeque::with_capacity(cfg.max_txs),
            by_content: HashMap::with_capacity(cfg.max_txs),
            bytes: 0,
            in_flight: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Txs not yet in a block.
    pub fn pending(&self) -> usize {
        self.queue.len() - self.in_flight
    }
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.cfg.max_txs && self.bytes < self.cfg.max_bytes
    }
    pub fn contains_content(&self, h: &Hash32) -> bool {
        self.by_content.contains_key(h)
    }

    /// Whether `tx` fits within the limits now.
    pub fn fits(&self, tx: &VerifiedTx) -> bool {
        self.queue.len() < self.cfg.max_txs && self.bytes + tx.event.size() <= self.cfg.max_bytes
    }

    pub fn admit(&mut self, tx: VerifiedTx) -> Admit {
        if self.by_content.contains_key(&tx.event.content_hash) {
            return Admit::Duplicate;
        }
        let sz = tx.event.size();
        if self.queue.len() >= self.cfg.max_txs || self.bytes + sz > self.cfg.max_bytes {
            return Admit::Full;
        }
        self.by_content.insert(tx.event.content_hash, tx.tx_hash);
        self.bytes += sz;
        self.queue.push_back(tx);
        Admit::Added
    }

    /// Takes the oldest pending txs into a block, up to the limits; they stay
    /// in the pool (counted in `len`) until `commit_in_flight`.
    pub fn take_for_block(&mut self, max_txs: usize, max_bytes: usize) -> Vec<VerifiedTx> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for tx in self.queue.iter().skip(self.in_flight) {
            let sz = tx.event.size();
            if out.len() >= max_txs || (bytes + sz > max_bytes && !out.is_empty()) {
                break;
            }
            bytes += sz;
            out.push(tx.clone());
        }
        self.in_flight += out.len();
        out
    }

    /// Removes the in-flight txs: their block is committed.
    pub fn commit_in_flight(&mut self) -> usize {
        let n = self.in_flight;
        for tx in self.queue.drain(..n) {
            self.by_content.remove(&tx.event.content_hash);
            self.bytes -= tx.event.size();
        }
        self.in_flight = 0;
        debug_assert_eq!(self.by_content.len(), self.queue.len());
        n
    }

    /// Returns in-flight txs to pending (their block was abandoned).
    pub fn abandon_in_flight(&mut self) {
        self.in_flight = 0;
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
        VerifiedTx { tx_hash: ev.tx_hash(), event: Arc::new(ev), received_ms: 0 }
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
        assert_eq!(m.commit_in_flight(), 2);
        assert_eq!(m.len(), 1);
        assert_eq!(m.admit(d.clone()), Admit::Added);
        let blk = m.take_for_block(10, 1 << 20);
        assert_eq!(blk.iter().map(|t| t.tx_hash).collect::<Vec<_>>(), vec![c.tx_hash, d.tx_hash]);
    }

    #[test]
    fn byte_limit_applies() {
        let one = tx(1);
        let sz = one.event.size();
        let mut m = Mempool::new(MempoolConfig { max_txs: 100, max_bytes: sz * 2 });
        assert_eq!(m.admit(one), Admit::Added);
        assert_eq!(m.admit(tx(2)), Admit::Added);
        assert_eq!(m.admit(tx(3)), Admit::Full);
        assert_eq!(m.bytes(), sz * 2);
        let b = m.take_for_block(10, sz);
        assert_eq!(b.len(), 1);
        m.abandon_in_flight();
        assert_eq!(m.pending(), 2);
    }
}
