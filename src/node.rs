//! The sans-I/O core of one validator: mempool, block builder and state
//! machine, driven by events (`on_txs`, `on_tick`, `on_block_durable`) with the
//! time passed in, producing outputs for the runtime to carry out. No clocks,
//! sockets or threads in here; the runtime and the tests drive it alike.
//!
//! With one validator a block commits when it is durable in the block store;
//! PBFT (next stage) slots in between "block built" and "block durable".

use crate::block::{tx_root, Block, BlockHeader, BuilderConfig};
use crate::crypto::PublicKey;
use crate::dlq::{RejectReason, Rejection};
use crate::event::Event;
use crate::ingest::verify::RateLimiter;
use crate::mempool::{Admit, Mempool, MempoolConfig, VerifiedTx};
use crate::state::{Executed, Receipt, State};
use crate::Hash32;
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub builder: BuilderConfig,
    pub mempool: MempoolConfig,
    pub rate_per_second: u32,
    pub rate_burst: u32,
    pub proposer: PublicKey,
}

/// What the runtime must do.
#[derive(Debug)]
pub enum Output {
    /// Send to the DLQ.
    Reject(Rejection),
    /// Make this block durable, then call `on_block_durable`.
    PersistBlock(Arc<Block>),
    /// The block is committed (durable): notify subscribers.
    Committed { block: Arc<Block>, receipts: Vec<Receipt> },
}

/// Counters the runtime publishes as metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct NodeStats {
    pub admitted: u64,
    pub duplicates: u64,
    pub rate_limited: u64,
    pub committed_txs: u64,
    pub committed_blocks: u64,
}

pub struct Node {
    cfg: NodeConfig,
    mempool: Mempool,
    /// Admitted by the shards but not yet fitting in the mempool.
    backlog: VecDeque<VerifiedTx>,
    rate: RateLimiter,
    state: State,
    last: Option<BlockHeader>,
    last_block_ms: u64,
    in_flight: Option<(Arc<Block>, Vec<Receipt>)>,
    stats: NodeStats,
}

impl Node {
    /// `state` must already reflect every block up to `last` (see `replay`).
    pub fn new(cfg: NodeConfig, state: State, last: Option<BlockHeader>, now_ms: u64) -> Self {
        assert_eq!(state.height(), last.as_ref().map_or(0, |h| h.height), "state and last block disagree");
        Node {
            mempool: Mempool::new(cfg.mempool),
            rate: RateLimiter::new(cfg.rate_per_second, cfg.rate_burst),
            backlog: VecDeque::new(),
            state,
            last,
            last_block_ms: now_ms,
            in_flight: None,
            stats: NodeStats::default(),
            cfg,
        }
    }

    pub fn height(&self) -> u64 {
        self.last.as_ref().map_or(0, |h| h.height)
    }
    pub fn state(&self) -> &State {
        &self.state
    }
    pub fn stats(&self) -> NodeStats {
        self.stats
    }
    pub fn mempool_len(&self) -> usize {
        self.mempool.len()
    }
    pub fn mempool_bytes(&self) -> usize {
        self.mempool.bytes()
    }
    /// False while admitted txs wait for room: stop pulling from the shards.
    pub fn has_room(&self) -> bool {
        self.backlog.is_empty() && self.mempool.has_room()
    }

    /// Txs admitted by the verify shards.
    pub fn on_txs(&mut self, now_ms: u64, txs: Vec<VerifiedTx>, out: &mut Vec<Output>) {
        for tx in txs {
            if !self.rate.allow(&tx.event.producer, now_ms) {
                self.stats.rate_limited += 1;
                out.push(Output::Reject(Rejection {
                    reason: RejectReason::RateLimited,
                    detail: format!(
                        "producer {} over {} tx/s",
                        hex::encode(tx.event.producer),
                        self.cfg.rate_per_second
                    ),
                    origin: "mempool".into(),
                    original: tx.event.encode(),
                }));
                continue;
            }
            self.backlog.push_back(tx);
        }
        self.drain_backlog();
    }

    fn drain_backlog(&mut self) {
        while let Some(tx) = self.backlog.front() {
            // Already committed (a redelivery after restart) or already pending.
            if self.state.has_nonce(&tx.event.nonce) || self.mempool.contains_content(&tx.event.content_hash) {
                self.backlog.pop_front();
                self.stats.duplicates += 1;
                continue;
            }
            if !self.mempool.fits(tx) {
                return; // admitted as soon as a block commits
            }
            let tx = self.backlog.pop_front().expect("front exists");
            let r = self.mempool.admit(tx);
            debug_assert_eq!(r, Admit::Added);
            self.stats.admitted += 1;
        }
    }

    /// Time passes: cut a block if the builder says so.
    pub fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if self.in_flight.is_some() {
            return;
        }
        if !self.cfg.builder.should_build(self.mempool.pending(), self.mempool.bytes(), now_ms, self.last_block_ms) {
            return;
        }
        let txs = self.mempool.take_for_block(self.cfg.builder.max_txs, self.cfg.builder.max_bytes);
        let height = self.height() + 1;
        let timestamp_ms = now_ms.max(self.last.as_ref().map_or(0, |h| h.timestamp_ms));
        let pairs: Vec<(&Event, Hash32)> = txs.iter().map(|t| (&*t.event, t.tx_hash)).collect();
        let Executed { state_root, receipts, undo: _ } = self.state.execute_block(height, timestamp_ms, &pairs);
        let tx_hashes: Vec<Hash32> = txs.iter().map(|t| t.tx_hash).collect();
        let header = BlockHeader {
            height,
            view: 0,
            timestamp_ms,
            previous_hash: self.last.as_ref().map_or([0; 32], |h| h.hash()),
            tx_root: tx_root(&tx_hashes),
            state_root,
            proposer: self.cfg.proposer,
            tx_count: txs.len() as u32,
        };
        let block = Arc::new(Block { header, txs: txs.into_iter().map(|t| t.event).collect(), tx_hashes });
        self.in_flight = Some((block.clone(), receipts));
        out.push(Output::PersistBlock(block));
    }

    /// The block store made block `height` durable: it is committed.
    pub fn on_block_durable(&mut self, now_ms: u64, height: u64, out: &mut Vec<Output>) {
        let (block, receipts) = self.in_flight.take().expect("a block is in flight");
        assert_eq!(block.header.height, height, "durable height is the in-flight block");
        let n = self.mempool.commit_in_flight();
        debug_assert_eq!(n, block.txs.len());
        self.last = Some(block.header.clone());
        self.last_block_ms = now_ms;
        self.stats.committed_blocks += 1;
        self.stats.committed_txs += n as u64;
        self.drain_backlog();
        out.push(Output::Committed { block, receipts });
    }

    /// When `on_tick` next has something to do (ms), if anything is pending.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        (self.in_flight.is_none() && self.mempool.pending() > 0)
            .then(|| self.cfg.builder.next_deadline_ms(self.last_block_ms))
    }
}

/// Re-executes stored blocks into `state`, checking each state root.
pub fn replay(state: &mut State, block: &Block) -> Result<(), String> {
    let pairs: Vec<(&Event, Hash32)> = block.txs.iter().map(|t| &**t).zip(block.tx_hashes.iter().copied()).collect();
    let ex = state.execute_block(block.header.height, block.header.timestamp_ms, &pairs);
    if ex.state_root != block.header.state_root {
        return Err(format!(
            "state root mismatch replaying block {}: stored {}, computed {}",
            block.header.height,
            hex::encode(block.header.state_root),
            hex::encode(ex.state_root)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto;
    use crate::event::{sample_anomaly_payload, TxKind};
    use crate::state::StateConfig;
    use std::time::Duration;

    fn vtx(k: &crypto::SigningKey, i: u64, ts: u64) -> VerifiedTx {
        let ev = Event::sign(
            TxKind::Anomaly,
            k,
            (i as u128).to_be_bytes(),
            sample_anomaly_payload(i, 300),
            ts,
            (i as u32).to_be_bytes(),
        );
        VerifiedTx { tx_hash: ev.tx_hash(), event: Arc::new(ev), received_ms: ts }
    }

    fn node(max_mempool: usize) -> Node {
        let cfg = NodeConfig {
            builder: BuilderConfig {
                max_txs: 4,
                max_bytes: 1 << 20,
                build_interval: Duration::from_millis(100),
                min_txs: 1,
            },
            mempool: MempoolConfig { max_txs: max_mempool, max_bytes: 1 << 20 },
            rate_per_second: 0,
            rate_burst: 0,
            proposer: [7; 32],
        };
        Node::new(cfg, State::new(StateConfig::default()), None, 0)
    }

    #[test]
    fn builds_persists_commits_and_backpressures() {
        let k = crypto::generate_key();
        let mut n = node(6);
        let mut out = vec![];
        n.on_txs(1000, (0..10).map(|i| vtx(&k, i, 1000)).collect(), &mut out);
        assert!(out.is_empty());
        assert_eq!(n.mempool_len(), 6);
        assert!(!n.has_room(), "4 txs wait in the backlog");
        n.on_tick(1000, &mut out); // full block (4 >= max_txs) is cut at once
        let Output::PersistBlock(b) = out.pop().unwrap() else { panic!() };
        assert_eq!(b.header.height, 1);
        assert_eq!(b.txs.len(), 4);
        n.on_tick(1001, &mut out);
        assert!(out.is_empty(), "one block in flight at a time");
        n.on_block_durable(1002, 1, &mut out);
        let Output::Committed { block, receipts } = out.pop().unwrap() else { panic!() };
        assert_eq!(block.header.height, 1);
        assert!(receipts.iter().all(|r| r.status == crate::state::TxStatus::Applied));
        assert_eq!(n.mempool_len(), 6, "backlog moved in");
        assert!(n.has_room() || n.mempool_len() == 6);
        // Drain everything: no tx lost.
        let mut total = 4;
        let mut now = 1002;
        while n.mempool_len() > 0 {
            now += 100;
            n.on_tick(now, &mut out);
            if let Some(Output::PersistBlock(b)) = out.pop() {
                total += b.txs.len();
                n.on_block_durable(now, b.header.height, &mut out);
                out.clear();
            }
        }
        assert_eq!(total, 10);
        assert_eq!(n.stats().committed_txs, 10);
    }

    #[test]
    fn redelivered_committed_tx_is_a_duplicate() {
        let k = crypto::generate_key();
        let mut n = node(10);
        let mut out = vec![];
        let t = vtx(&k, 1, 1000);
        n.on_txs(1000, vec![t.clone()], &mut out);
        n.on_tick(1200, &mut out);
        n.on_block_durable(1200, 1, &mut out);
        n.on_txs(1300, vec![t], &mut out);
        assert_eq!(n.stats().duplicates, 1);
        assert_eq!(n.mempool_len(), 0);
    }

    #[test]
    fn rate_limit_rejects_to_dlq() {
        let k = crypto::generate_key();
        let mut n = node(10);
        n.cfg.rate_per_second = 1;
        n.rate = RateLimiter::new(1, 1);
        let mut out = vec![];
        n.on_txs(1000, vec![vtx(&k, 1, 1000), vtx(&k, 2, 1000)], &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Output::Reject(r) if r.reason == RejectReason::RateLimited));
    }
}
