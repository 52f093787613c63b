//! Block store: the local source of truth for committed blocks.
//!
//! # Format (`blocks.dat`)
//! An 8-byte magic `CMBLKS01`, then one record per block, in height order
//! starting at 1 — or, for a validator that joined from a snapshot, right
//! above the snapshot's block (its header is the store's *base*, kept with
//! the snapshot in `blocks.base`; see `crate::protocol::snapshot`):
//! ```text
//! u32 LE len | u32 LE crc32c(len LE bytes || payload) | payload (len bytes: protobuf `Block`)
//! ```
//! (the framing of `crate::edges::framed`). Appends are written with one `write` per
//! group and made durable with one `fdatasync` (group commit); a block is
//! committed only after that returns.
//!
//! # Recovery
//! `crate::edges::framed` truncates a torn tail (never acknowledged, so nothing
//! committed is lost) and refuses corruption; on top, the store checks that
//! the blocks form one chain (heights from 1, previous hashes linking). The
//! height index lives in memory.

use crate::edges::framed::{FramedError, FramedFile, Mode};
use crate::protocol::block::{header_from_proto, Block, BlockHeader};
use crate::protocol::event::Limits;
use crate::{proto, Hash32};
use prost::Message;
use std::path::Path;

const MAGIC: &[u8; 8] = b"CMBLKS01";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block store: {0}")]
    Log(#[from] FramedError),
    #[error("block store: append of height {got} after {have}")]
    OutOfOrder { got: u64, have: u64 },
    #[error("block store: block {height} does not link to the stored block {prev}")]
    BadLink { height: u64, prev: u64 },
}

/// What opening the store found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub blocks: u64,
    /// Bytes cut after the last block kept (or, read-only, that a start
    /// would cut).
    pub truncated_bytes: u64,
    /// Intact blocks after a corrupt one that a repair dropped.
    pub dropped_blocks: u64,
}

pub struct BlockStore {
    log: FramedFile,
    /// Offset of the record of height base+i+1 at index i.
    index: Vec<u64>,
    /// Header of the block the store starts above (a snapshot's), if any.
    base: Option<BlockHeader>,
    last: Option<BlockHeader>,
    limits: Limits,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HeaderOnly {
    #[prost(message, optional, tag = "1")]
    header: Option<proto::BlockHeader>,
}

impl BlockStore {
    /// Opens (or creates) `dir/blocks.dat`, recovering from a torn tail and
    /// checking that the stored blocks form one chain.
    pub fn open(dir: &Path, limits: Limits) -> Result<(BlockStore, Recovery), StoreError> {
        Self::open_above(dir, limits, None)
    }

    /// Like `open`, for a store whose first block sits on `base` (the header
    /// of the snapshot the validator started from).
    pub fn open_above(
        dir: &Path,
        limits: Limits,
        base: Option<BlockHeader>,
    ) -> Result<(BlockStore, Recovery), StoreError> {
        Self::open_in(dir, limits, base, Mode::Recover)
    }

    /// `open_above` in the given mode: `ReadOnly` and `Repair` for
    /// `cybermesh store check`.
    pub fn open_in(
        dir: &Path,
        limits: Limits,
        base: Option<BlockHeader>,
        mode: Mode,
    ) -> Result<(BlockStore, Recovery), StoreError> {
        Self::open_on(crate::edges::storage::os(), dir, limits, base, mode)
    }

    /// `open_in` on `disk` (the simulator's, or the OS's).
    pub fn open_on(
        disk: std::sync::Arc<dyn crate::edges::storage::Disk>,
        dir: &Path,
        limits: Limits,
        base: Option<BlockHeader>,
        mode: Mode,
    ) -> Result<(BlockStore, Recovery), StoreError> {
        let mut index = Vec::new();
        let mut last: Option<BlockHeader> = base.clone();
        let base_height = base.as_ref().map_or(0, |b| b.height);
        let (mut log, scan) = FramedFile::open_on(disk, &dir.join("blocks.dat"), MAGIC, mode, |off, payload| {
            let h = HeaderOnly::decode(payload)
                .ok()
                .and_then(|h| h.header)
                .and_then(header_from_proto)
                .ok_or("record does not decode as a block")?;
            let want = base_height + index.len() as u64 + 1;
            if h.height != want {
                return Err(format!("height {} where {want} was expected", h.height));
            }
            if h.previous_hash != last.as_ref().map_or([0u8; 32], |p| p.hash()) {
                return Err("previous_hash does not link".into());
            }
            index.push(off);
            last = Some(h);
            Ok(())
        })?;
        log.drop_cached_after_sync();
        let rec = Recovery {
            blocks: index.len() as u64,
            truncated_bytes: scan.truncated_bytes,
            dropped_blocks: scan.dropped_records as u64,
        };
        Ok((BlockStore { log, index, base, last, limits }, rec))
    }

    /// Height of the last durable block (0: empty; the base's height if
    /// nothing is stored above it).
    pub fn height(&self) -> u64 {
        self.base_height() + self.index.len() as u64
    }

    /// Height of the block the store starts above (0: from genesis).
    pub fn base_height(&self) -> u64 {
        self.base.as_ref().map_or(0, |b| b.height)
    }

    /// Starts an empty store above `base` (a snapshot's block), so the next
    /// append is `base.height + 1`. The caller keeps the base durable
    /// (`blocks.base`) before it appends.
    pub fn set_base(&mut self, base: BlockHeader) {
        assert!(self.index.is_empty() && self.base.is_none(), "a base is only set on an empty store");
        self.last = Some(base.clone());
        self.base = Some(base);
    }

    /// The header of the block the store starts above, if it joined from a snapshot.
    pub fn base(&self) -> Option<&BlockHeader> {
        self.base.as_ref()
    }

    pub fn last_header(&self) -> Option<&BlockHeader> {
        self.last.as_ref()
    }

    pub fn last_hash(&self) -> Hash32 {
        self.last.as_ref().map_or([0; 32], |h| h.hash())
    }

    /// Appends blocks (consecutive heights) and makes them durable with one
    /// fdatasync. On error the store must be reopened (recovery truncates).
    pub fn append(&mut self, blocks: &[(&Block, Option<proto::PbftCommitCert>)]) -> Result<(), StoreError> {
        let full: Vec<_> = blocks.iter().map(|(b, c)| (*b, c.clone(), None)).collect();
        self.append_with_outcomes(&full)
    }

    /// `append`, keeping each block's execution outcome with it.
    pub fn append_with_outcomes(
        &mut self,
        blocks: &[(&Block, Option<proto::PbftCommitCert>, Option<proto::BlockOutcome>)],
    ) -> Result<(), StoreError> {
        let mut prev = self.last.clone();
        for (b, _, _) in blocks {
            let have = prev.as_ref().map_or(0, |h| h.height);
            if b.header.height != have + 1 {
                return Err(StoreError::OutOfOrder { got: b.header.height, have });
            }
            if b.header.previous_hash != prev.as_ref().map_or([0; 32], |h| h.hash()) {
                return Err(StoreError::BadLink { height: b.header.height, prev: have });
            }
            prev = Some(b.header.clone());
        }
        let offsets = self.log.append_encoded(blocks, |(b, cert, outcome), buf| {
            b.encode_with_into(cert.as_ref(), outcome.as_ref(), buf)
        })?;
        self.index.extend(offsets);
        self.last = prev;
        Ok(())
    }

    /// Raw protobuf bytes of block `height`.
    pub fn read_raw(&self, height: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if height <= self.base_height() || height > self.height() {
            return Ok(None);
        }
        let i = (height - self.base_height() - 1) as usize;
        Ok(Some(self.log.read_at(self.index[i], i)?))
    }

    /// Block `height` with its PBFT commit certificate (value left out), if stored.
    pub fn read(&self, height: u64) -> Result<Option<(Block, Option<proto::PbftCommitCert>)>, StoreError> {
        Ok(self.read_full(height)?.map(|(b, c, _)| (b, c)))
    }

    /// `read`, with the block's execution outcome (if it was kept).
    #[allow(clippy::type_complexity)]
    pub fn read_full(
        &self,
        height: u64,
    ) -> Result<Option<(Block, Option<proto::PbftCommitCert>, Option<proto::BlockOutcome>)>, StoreError> {
        let Some(raw) = self.read_raw(height)? else {
            return Ok(None);
        };
        let i = (height - self.base_height() - 1) as usize;
        let corrupt = |detail: String| FramedError::BadRead {
            path: self.log.path().to_path_buf(),
            offset: self.index[i],
            index: i,
            detail,
        };
        let mut p = proto::Block::decode(&raw[..]).map_err(|e| corrupt(e.to_string()))?;
        let cert = p.consensus.take();
        let outcome = p.outcome.take();
        let b = Block::from_proto(p, &self.limits).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some((b, cert, outcome)))
    }
}

/// A read-only view of `blocks.dat` for other threads (the HTTP API): it
/// indexes the file itself, never writes, and stops at the first record
/// not complete yet (one being appended). Callers ask only for heights the
/// core has published as durable.
pub struct BlockStoreReader {
    file: std::fs::File,
    path: std::path::PathBuf,
    index: Vec<u64>,
    scanned: u64,
    base: u64,
    limits: Limits,
}

impl BlockStoreReader {
    pub fn open(dir: &Path, base: u64, limits: Limits) -> std::io::Result<BlockStoreReader> {
        let path = dir.join("blocks.dat");
        let file = std::fs::File::open(&path)?;
        Ok(BlockStoreReader { file, path, index: vec![], scanned: MAGIC.len() as u64, base, limits })
    }

    fn refresh(&mut self) {
        use std::os::unix::fs::FileExt;
        let Ok(file_len) = self.file.metadata().map(|m| m.len()) else { return };
        let mut hdr = [0u8; 8];
        while self.scanned + 8 <= file_len && self.file.read_exact_at(&mut hdr, self.scanned).is_ok() {
            let len = u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes")) as u64;
            let end = self.scanned + 8 + len;
            if len == 0 || file_len < end {
                return; // not complete yet
            }
            self.index.push(self.scanned);
            self.scanned = end;
        }
    }

    /// Block `height` with its stored commit certificate, if stored.
    pub fn read(&mut self, height: u64) -> Result<Option<(Block, Option<proto::PbftCommitCert>)>, String> {
        if height <= self.base {
            return Ok(None);
        }
        let i = (height - self.base - 1) as usize;
        if i >= self.index.len() {
            self.refresh();
        }
        let Some(&off) = self.index.get(i) else { return Ok(None) };
        use std::os::unix::fs::FileExt;
        let mut hdr = [0u8; 8];
        self.file.read_exact_at(&mut hdr, off).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let len = u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes")) as usize;
        let mut payload = vec![0u8; len];
        self.file.read_exact_at(&mut payload, off + 8).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let want = u32::from_le_bytes(hdr[4..].try_into().expect("4 bytes"));
        if crc32c::crc32c_append(crc32c::crc32c(&hdr[..4]), &payload) != want {
            return Err(format!("block {height}: checksum mismatch"));
        }
        let mut p = proto::Block::decode(&payload[..]).map_err(|e| format!("block {height}: {e}"))?;
        let cert = p.consensus.take();
        let b = Block::from_proto(p, &self.limits).map_err(|e| format!("block {height}: {e}"))?;
        Ok(Some((b, cert)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::block::{tx_root, BlockHeader};
    use crate::protocol::crypto;
    use crate::protocol::event::{sample_anomaly_payload, Event, TxKind};
    use std::sync::Arc;

    fn chain(n: u64) -> Vec<Block> {
        let k = crypto::generate_key();
        let mut out: Vec<Block> = vec![];
        for h in 1..=n {
            let txs: Vec<Arc<Event>> = (0..3)
                .map(|i| {
                    Arc::new(Event::sign(
                        TxKind::Anomaly,
                        &k,
                        [(h * 3 + i) as u8; 16],
                        sample_anomaly_payload(h, 200),
                        5,
                        [i as u8; 4],
                    ))
                })
                .collect();
            let tx_hashes: Vec<Hash32> = txs.iter().map(|t| t.tx_hash()).collect();
            let header = BlockHeader {
                height: h,
                view: 0,
                timestamp_ms: h,
                previous_hash: out.last().map_or([0; 32], |b| b.hash()),
                tx_root: tx_root(&tx_hashes),
                state_root: [h as u8; 32],
                proposer: crypto::public_key(&k),
                tx_count: 3,
            };
            out.push(Block { header, txs, tx_hashes });
        }
        out
    }

    #[test]
    fn append_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(5);
        {
            let (mut s, r) = BlockStore::open(dir.path(), Limits::default()).unwrap();
            assert_eq!(r, Recovery { blocks: 0, truncated_bytes: 0, dropped_blocks: 0 });
            s.append(&[(&blocks[0], None)]).unwrap();
            s.append(&blocks[1..].iter().map(|b| (b, None)).collect::<Vec<_>>()).unwrap();
            assert!(matches!(s.append(&[(&blocks[2], None)]), Err(StoreError::OutOfOrder { .. })));
        }
        let (s, r) = BlockStore::open(dir.path(), Limits::default()).unwrap();
        assert_eq!(r.blocks, 5);
        for b in &blocks {
            assert_eq!(&s.read(b.header.height).unwrap().unwrap().0, b);
        }
        assert!(s.read(6).unwrap().is_none());
        assert_eq!(s.last_hash(), blocks[4].hash());
    }

    #[test]
    fn a_store_above_a_snapshot_starts_at_its_block_and_needs_it_to_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(6);
        let base = blocks[2].header.clone();
        {
            let (mut s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
            s.set_base(base.clone());
            assert_eq!((s.base_height(), s.height()), (3, 3));
            assert!(matches!(s.append(&[(&blocks[0], None)]), Err(StoreError::OutOfOrder { .. })));
            s.append(&blocks[3..].iter().map(|b| (b, None)).collect::<Vec<_>>()).unwrap();
        }
        let (s, r) = BlockStore::open_above(dir.path(), Limits::default(), Some(base)).unwrap();
        assert_eq!((r.blocks, s.height()), (3, 6));
        assert!(s.read(3).unwrap().is_none(), "nothing stored at or below the base");
        assert_eq!(&s.read(4).unwrap().unwrap().0, &blocks[3]);
        assert_eq!(s.last_hash(), blocks[5].hash());
        // Without its base the file does not start at height 1: refused.
        assert!(BlockStore::open(dir.path(), Limits::default()).is_err());
    }

    #[test]
    fn a_reader_sees_appended_blocks_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(4);
        let (mut s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
        s.append(&[(&blocks[0], None), (&blocks[1], None)]).unwrap();
        let mut r = BlockStoreReader::open(dir.path(), 0, Limits::default()).unwrap();
        assert_eq!(r.read(2).unwrap().unwrap().0, blocks[1]);
        assert!(r.read(3).unwrap().is_none());
        s.append(&[(&blocks[2], None), (&blocks[3], None)]).unwrap();
        assert_eq!(r.read(4).unwrap().unwrap().0, blocks[3]);
        assert!(r.read(0).unwrap().is_none());
    }

    #[test]
    fn every_torn_tail_recovers_to_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(3);
        {
            let (mut s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
            s.append(&blocks.iter().map(|b| (b, None)).collect::<Vec<_>>()).unwrap();
        }
        let full = std::fs::read(dir.path().join("blocks.dat")).unwrap();
        let (s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
        let ends: Vec<u64> = (1..=3).map(|h| if h < 3 { s.index[h] } else { full.len() as u64 }).collect();
        drop(s);
        for cut in 0..full.len() {
            let d2 = tempfile::tempdir().unwrap();
            std::fs::write(d2.path().join("blocks.dat"), &full[..cut]).unwrap();
            let (s, r) = BlockStore::open(d2.path(), Limits::default()).unwrap();
            let expect = ends.iter().filter(|&&e| e <= cut as u64).count() as u64;
            assert_eq!(r.blocks, expect, "cut at {cut}");
            assert_eq!(s.height(), expect);
            // The store is writable again after recovery.
            drop(s);
        }
        // Garbage after the last record (zeros from a lost write) is torn too.
        let d3 = tempfile::tempdir().unwrap();
        let mut z = full.clone();
        z.extend_from_slice(&[0u8; 100]);
        std::fs::write(d3.path().join("blocks.dat"), &z).unwrap();
        let (_, r) = BlockStore::open(d3.path(), Limits::default()).unwrap();
        assert_eq!(r, Recovery { blocks: 3, truncated_bytes: 100, dropped_blocks: 0 });
    }

    #[test]
    fn every_damaged_field_of_every_block_is_refused_unless_it_is_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(4);
        let (offsets, lens) = {
            let (mut s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
            s.append(&[(&blocks[0], None), (&blocks[1], None)]).unwrap();
            s.append(&[(&blocks[2], None), (&blocks[3], None)]).unwrap();
            let offsets: Vec<usize> = s.index.iter().map(|&o| o as usize).collect();
            let lens = (1..=4).map(|h| s.read_raw(h).unwrap().unwrap().len()).collect::<Vec<_>>();
            (offsets, lens)
        };
        let path = dir.path().join("blocks.dat");
        let file = std::fs::read(&path).unwrap();
        crate::edges::framed::tests::check_every_damage(
            &path,
            &file,
            &offsets,
            &lens,
            &|mode| match BlockStore::open_in(dir.path(), Limits::default(), None, mode) {
                Ok((s, r)) => {
                    assert_eq!(s.height(), r.blocks);
                    let scan = crate::edges::framed::Scan {
                        records: r.blocks as usize,
                        truncated_bytes: r.truncated_bytes,
                        dropped_records: r.dropped_blocks as usize,
                    };
                    Ok((r.blocks as usize, scan))
                }
                Err(StoreError::Log(e)) => Err(e),
                Err(e) => panic!("{e}"),
            },
        );
    }
}
