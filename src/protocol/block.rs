//! Blocks: header, hashing, the block builder's policy, and validation.
//!
//! Block hash = SHA-256 of the fixed-layout header bytes:
//! `"cybermesh.block.v1" || u64 BE height || u64 BE view || u64 BE timestamp_ms
//!  || previous_hash || tx_root || state_root || proposer (32) || u32 BE tx_count`.
//! `tx_root` is the binary Merkle root (RFC 6962 style: leaves
//! `SHA-256(0x00 || tx_hash)`, nodes `SHA-256(0x01 || l || r)`, an odd node is
//! promoted) of the tx hashes in block order; zero for an empty block.

use crate::protocol::event::{Event, Limits};
use crate::{proto, Hash32};
use prost::Message;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHeader {
    pub height: u64,
    pub view: u64,
    pub timestamp_ms: u64,
    pub previous_hash: Hash32,
    pub tx_root: Hash32,
    pub state_root: Hash32,
    pub proposer: [u8; 32],
    pub tx_count: u32,
}

impl BlockHeader {
    pub fn hash(&self) -> Hash32 {
        let mut h = Sha256::new();
        h.update(b"cybermesh.block.v1");
        h.update(self.height.to_be_bytes());
        h.update(self.view.to_be_bytes());
        h.update(self.timestamp_ms.to_be_bytes());
        h.update(self.previous_hash);
        h.update(self.tx_root);
        h.update(self.state_root);
        h.update(self.proposer);
        h.update(self.tx_count.to_be_bytes());
        h.finalize().into()
    }
}

/// A block with its transactions (tx hashes kept alongside, never recomputed
/// on the hot path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub header: BlockHeader,
    pub txs: Vec<Arc<Event>>,
    pub tx_hashes: Vec<Hash32>,
}

/// Binary Merkle root of tx hashes.
pub fn tx_root(hashes: &[Hash32]) -> Hash32 {
    if hashes.is_empty() {
        return [0; 32];
    }
    let mut level: Vec<Hash32> = hashes
        .iter()
        .map(|h| {
            let mut d = Sha256::new();
            d.update([0u8]);
            d.update(h);
            d.finalize().into()
        })
        .collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|c| match c {
                [l, r] => {
                    let mut d = Sha256::new();
                    d.update([1u8]);
                    d.update(l);
                    d.update(r);
                    d.finalize().into()
                }
                [x] => *x,
                _ => unreachable!(),
            })
            .collect();
    }
    level[0]
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("block does not decode: {0}")]
    Decode(String),
    #[error("height {got} does not follow {parent}")]
    Height { got: u64, parent: u64 },
    #[error("previous hash does not match the parent block")]
    PreviousHash,
    #[error("tx_count {header} but {actual} transactions")]
    TxCount { header: u32, actual: usize },
    #[error("tx_root does not match the transactions")]
    TxRoot,
    #[error("{0} transactions exceed the limit of {1}")]
    TooManyTxs(usize, usize),
    #[error("{0} bytes of transactions exceed the limit of {1}")]
    TooLarge(usize, usize),
    #[error("timestamp {got} is before the parent's {parent}")]
    Timestamp { got: u64, parent: u64 },
    #[error("transaction {index} is invalid: {detail}")]
    Tx { index: usize, detail: String },
}

/// Builder policy (manual: BLOCK_MAX_TXS, BLOCK_MAX_BYTES, BLOCK_BUILD_INTERVAL,
/// BLOCK_MIN_MEMPOOL_TXS; BLOCK_MIN_INTERVAL).
#[derive(Debug, Clone, Copy)]
pub struct BuilderConfig {
    pub max_txs: usize,
    pub max_bytes: usize,
    pub build_interval: Duration,
    pub min_txs: usize,
    /// The shortest gap between two blocks of an idle pipeline (a full
    /// block is still cut at once). Every block costs each validator fixed
    /// work (fsyncs, vote signatures, a Merkle root); without a floor, a
    /// moderate load makes a block per round trip, and four validators on
    /// two cores spend on blocks what the load's txs needed.
    pub min_interval: Duration,
}

impl Default for BuilderConfig {
    fn default() -> Self {
        BuilderConfig {
            max_txs: 500,
            max_bytes: 4 * 1024 * 1024,
            build_interval: Duration::from_millis(500),
            min_txs: 1,
            // Measured (docs/performance.md, 2026-12-07): at half the
            // devnet's maximum, 20 ms cut the blocks per second by 2.4x and
            // the commit latency's p99 by 3.5-4x, for +5 ms at the median.
            min_interval: Duration::from_millis(20),
        }
    }
}

impl BuilderConfig {
    /// Whether to cut a block now: at least `min_txs` must wait, and then a
    /// full block is cut at once, as is any block while none of this
    /// primary's blocks is in flight (`pipeline_idle`: nothing to batch
    /// behind, so waiting would only add latency) once `min_interval` has
    /// passed since the last block; otherwise once `build_interval` has
    /// passed. The interval thus paces a busy pipeline, and blocks grow
    /// with the load.
    pub fn should_build(
        &self,
        pending_txs: usize,
        pending_bytes: usize,
        now_ms: u64,
        last_block_ms: u64,
        pipeline_idle: bool,
    ) -> bool {
        if pending_txs == 0 || pending_txs < self.min_txs {
            return false;
        }
        let since_ms = now_ms.saturating_sub(last_block_ms);
        (pipeline_idle && since_ms >= self.min_interval.as_millis() as u64)
            || pending_txs >= self.max_txs
            || pending_bytes >= self.max_bytes
            || since_ms >= self.build_interval.as_millis() as u64
    }

    /// When the next block is due if nothing fills one first.
    pub fn next_deadline_ms(&self, last_block_ms: u64, pipeline_idle: bool) -> u64 {
        let gap = if pipeline_idle { self.min_interval } else { self.build_interval };
        last_block_ms + gap.min(self.build_interval).as_millis() as u64
    }
}

pub fn header_to_proto(h: &BlockHeader) -> proto::BlockHeader {
    proto::BlockHeader {
        height: h.height,
        view: h.view,
        timestamp_ms: h.timestamp_ms,
        previous_hash: h.previous_hash.to_vec(),
        tx_root: h.tx_root.to_vec(),
        state_root: h.state_root.to_vec(),
        proposer: h.proposer.to_vec(),
        tx_count: h.tx_count,
    }
}

/// `None` if a hash field is not 32 bytes.
pub fn header_from_proto(h: proto::BlockHeader) -> Option<BlockHeader> {
    Some(BlockHeader {
        height: h.height,
        view: h.view,
        timestamp_ms: h.timestamp_ms,
        previous_hash: h.previous_hash.try_into().ok()?,
        tx_root: h.tx_root.try_into().ok()?,
        state_root: h.state_root.try_into().ok()?,
        proposer: h.proposer.try_into().ok()?,
        tx_count: h.tx_count,
    })
}

impl Block {
    pub fn hash(&self) -> Hash32 {
        self.header.hash()
    }

    pub fn tx_bytes(&self) -> usize {
        self.txs.iter().map(|t| t.size()).sum()
    }

    /// `consensus`: the PBFT commit certificate, stored with the value left out.
    pub fn to_proto(&self, consensus: Option<proto::PbftCommitCert>) -> proto::Block {
        let h = &self.header;
        proto::Block {
            header: Some(header_to_proto(h)),
            txs: self.txs.iter().map(|t| t.to_tx_proto()).collect(),
            certificate: None,
            consensus,
            outcome: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(None, None)
    }

    /// The `proto::Block` encoding (as `to_proto(consensus)` with `outcome`,
    /// byte for byte), writing the txs straight from the events.
    pub fn encode_with(
        &self,
        consensus: Option<&proto::PbftCommitCert>,
        outcome: Option<&proto::BlockOutcome>,
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        self.encode_with_into(consensus, outcome, &mut buf);
        buf
    }

    /// `encode_with`, appended to `buf`.
    pub fn encode_with_into(
        &self,
        consensus: Option<&proto::PbftCommitCert>,
        outcome: Option<&proto::BlockOutcome>,
        buf: &mut Vec<u8>,
    ) {
        let header = header_to_proto(&self.header);
        let txs: usize = self.txs.iter().map(|t| t.tx_field_len(2)).sum();
        buf.reserve(
            prost::encoding::message::encoded_len(1, &header)
                + txs
                + consensus.map_or(0, |c| prost::encoding::message::encoded_len(4, c))
                + outcome.map_or(0, |o| prost::encoding::message::encoded_len(5, o)),
        );
        prost::encoding::message::encode(1, &header, buf);
        for t in &self.txs {
            t.encode_tx_field(2, buf);
        }
        if let Some(c) = consensus {
            prost::encoding::message::encode(4, c, buf);
        }
        if let Some(o) = outcome {
            prost::encoding::message::encode(5, o, buf);
        }
    }

    /// Decodes a block and checks its internal consistency (tx count, tx root).
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Block, BlockError> {
        let p = proto::Block::decode(bytes).map_err(|e| BlockError::Decode(e.to_string()))?;
        Self::from_proto(p, limits)
    }

    pub fn from_proto(p: proto::Block, limits: &Limits) -> Result<Block, BlockError> {
        let h = p.header.ok_or_else(|| BlockError::Decode("missing header".into()))?;
        let f32 = |name: &str, v: Vec<u8>| -> Result<Hash32, BlockError> {
            v.try_into().map_err(|_| BlockError::Decode(format!("{name} must be 32 bytes")))
        };
        let header = BlockHeader {
            height: h.height,
            view: h.view,
            timestamp_ms: h.timestamp_ms,
            previous_hash: f32("previous_hash", h.previous_hash)?,
            tx_root: f32("tx_root", h.tx_root)?,
            state_root: f32("state_root", h.state_root)?,
            proposer: f32("proposer", h.proposer)?,
            tx_count: h.tx_count,
        };
        let mut txs = Vec::with_capacity(p.txs.len());
        for (index, t) in p.txs.into_iter().enumerate() {
            let ev = Event::from_tx_proto(t, limits)
                .map_err(|(r, d)| BlockError::Tx { index, detail: format!("{r}: {d}") })?;
            txs.push(Arc::new(ev));
        }
        let tx_hashes: Vec<Hash32> = txs.iter().map(|t| t.tx_hash()).collect();
        let b = Block { header, txs, tx_hashes };
        if b.header.tx_count as usize != b.txs.len() {
            return Err(BlockError::TxCount { header: b.header.tx_count, actual: b.txs.len() });
        }
        if tx_root(&b.tx_hashes) != b.header.tx_root {
            return Err(BlockError::TxRoot);
        }
        Ok(b)
    }

    /// Checks the block against its parent and the builder limits.
    pub fn validate(&self, parent: Option<&BlockHeader>, cfg: &BuilderConfig) -> Result<(), BlockError> {
        let (ph, phash, pts) = match parent {
            Some(p) => (p.height, p.hash(), p.timestamp_ms),
            None => (0, [0u8; 32], 0),
        };
        if self.header.height != ph + 1 {
            return Err(BlockError::Height { got: self.header.height, parent: ph });
        }
        if self.header.previous_hash != phash {
            return Err(BlockError::PreviousHash);
        }
        if self.header.timestamp_ms < pts {
            return Err(BlockError::Timestamp { got: self.header.timestamp_ms, parent: pts });
        }
        if self.txs.len() > cfg.max_txs {
            return Err(BlockError::TooManyTxs(self.txs.len(), cfg.max_txs));
        }
        let bytes = self.tx_bytes();
        if bytes > cfg.max_bytes {
            return Err(BlockError::TooLarge(bytes, cfg.max_bytes));
        }
        if self.header.tx_count as usize != self.txs.len() {
            return Err(BlockError::TxCount { header: self.header.tx_count, actual: self.txs.len() });
        }
        if tx_root(&self.tx_hashes) != self.header.tx_root {
            return Err(BlockError::TxRoot);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::crypto;
    use crate::protocol::event::{sample_anomaly_payload, TxKind};

    pub(crate) fn make_block(parent: Option<&BlockHeader>, n: usize) -> Block {
        let k = crypto::generate_key();
        let txs: Vec<Arc<Event>> = (0..n)
            .map(|i| {
                Arc::new(Event::sign(
                    TxKind::Anomaly,
                    &k,
                    [i as u8; 16],
                    sample_anomaly_payload(i as u64, 300),
                    10,
                    [i as u8; 4],
                ))
            })
            .collect();
        let tx_hashes: Vec<Hash32> = txs.iter().map(|t| t.tx_hash()).collect();
        let header = BlockHeader {
            height: parent.map_or(1, |p| p.height + 1),
            view: 0,
            timestamp_ms: 100,
            previous_hash: parent.map_or([0; 32], |p| p.hash()),
            tx_root: tx_root(&tx_hashes),
            state_root: [9; 32],
            proposer: crypto::public_key(&k),
            tx_count: n as u32,
        };
        Block { header, txs, tx_hashes }
    }

    #[test]
    fn block_encoding_is_prosts_with_and_without_certificate_and_outcome() {
        let b = make_block(None, 5);
        let cert = proto::PbftCommitCert { pre_prepare: None, commits: vec![proto::PbftVote::default()] };
        let outcome = proto::BlockOutcome { rejected: vec![proto::TxRejection::default()], producers: vec![] };
        for (c, o) in [(None, None), (Some(&cert), None), (Some(&cert), Some(&outcome)), (None, Some(&outcome))] {
            let mut p = b.to_proto(c.cloned());
            p.outcome = o.cloned();
            assert_eq!(b.encode_with(c, o), p.encode_to_vec());
        }
        let empty = make_block(None, 0);
        assert_eq!(empty.encode(), empty.to_proto(None).encode_to_vec());
    }

    #[test]
    fn encode_decode_validate() {
        let b1 = make_block(None, 3);
        let bytes = b1.encode();
        let back = Block::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(back, b1);
        assert_eq!(back.hash(), b1.hash());
        b1.validate(None, &BuilderConfig::default()).unwrap();
        let b2 = make_block(Some(&b1.header), 2);
        b2.validate(Some(&b1.header), &BuilderConfig::default()).unwrap();
        assert_eq!(b2.validate(None, &BuilderConfig::default()), Err(BlockError::Height { got: 2, parent: 0 }));
        let mut bad = b2.clone();
        bad.txs.pop();
        bad.tx_hashes.pop();
        assert!(matches!(bad.validate(Some(&b1.header), &BuilderConfig::default()), Err(BlockError::TxCount { .. })));
        let mut bad = b2.clone();
        bad.tx_hashes.swap(0, 1);
        assert_eq!(bad.validate(Some(&b1.header), &BuilderConfig::default()), Err(BlockError::TxRoot));
        let small = BuilderConfig { max_txs: 1, ..Default::default() };
        assert_eq!(b2.validate(Some(&b1.header), &small), Err(BlockError::TooManyTxs(2, 1)));
    }

    #[test]
    fn tx_root_shapes_and_builder_policy() {
        let h = |i: u8| [i; 32];
        assert_eq!(tx_root(&[]), [0; 32]);
        assert_ne!(tx_root(&[h(1), h(2)]), tx_root(&[h(2), h(1)]));
        assert_ne!(tx_root(&[h(1), h(2), h(3)]), tx_root(&[h(1), h(2)]));
        let c = BuilderConfig::default();
        assert!(!c.should_build(0, 0, 10_000, 0, false));
        assert!(!c.should_build(0, 0, 10_000, 0, true), "nothing to propose");
        assert!(c.should_build(500, 0, 1, 0, false), "full block is cut at once");
        assert!(!c.should_build(10, 0, 499, 0, false));
        assert!(c.should_build(10, 0, 499, 0, true), "an idle pipeline does not wait");
        assert!(c.should_build(10, 0, 500, 0, false));
        let c2 = BuilderConfig { min_txs: 5, ..c };
        assert!(!c2.should_build(4, 0, 10_000, 0, false));
        assert!(!c2.should_build(4, 0, 10_000, 0, true), "min_txs holds either way");
        let c3 = BuilderConfig { min_interval: Duration::from_millis(20), ..c };
        assert!(!c3.should_build(10, 0, 119, 100, true), "an idle pipeline waits out the floor");
        assert!(c3.should_build(10, 0, 120, 100, true));
        assert!(c3.should_build(500, 0, 101, 100, true), "a full block does not wait");
        assert_eq!((c3.next_deadline_ms(100, true), c3.next_deadline_ms(100, false)), (120, 600));
        let c0 = BuilderConfig { min_interval: Duration::ZERO, ..c };
        assert!(c0.should_build(1, 0, 100, 100, true), "no floor: an idle pipeline builds at once");
        assert_eq!(c0.next_deadline_ms(100, true), 100);
    }
}
