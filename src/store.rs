//! Block store: the local source of truth for committed blocks.
//!
//! # Format (`blocks.dat`)
//! An 8-byte magic `CMBLKS01`, then one record per block, in height order
//! starting at 1:
//! ```text
//! u32 LE len | u32 LE crc32c(len LE bytes || payload) | payload (len bytes: protobuf `Block`)
//! ```
//! Appends are written with one `write` per group and made durable with one
//! `fdatasync` (group commit); a block is committed only after that returns.
//!
//! # Recovery
//! On open the file is scanned. A record that runs past the end of the file,
//! or whose checksum fails while it is the last record, is a torn tail from a
//! crash mid-append, and so is a tail of zeros: it is truncated (never acknowledged, so nothing committed
//! is lost). A bad record with data after it is corruption: opening fails
//! rather than dropping durable blocks. The height index lives in memory.

use crate::block::{Block, BlockHeader};
use crate::event::Limits;
use crate::{proto, Hash32};
use prost::Message;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CMBLKS01";
const RECORD_HEADER: u64 = 8;
/// Largest record accepted (a block is at most a few MiB).
pub const MAX_RECORD: u32 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("block store {path}: not a block store (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("block store {path}: corrupt record at offset {offset} (after height {height}): {detail}; refusing to truncate durable blocks, restore this node from its peers")]
    Corrupt { path: PathBuf, offset: u64, height: u64, detail: String },
    #[error("block store: append of height {got} after {have}")]
    OutOfOrder { got: u64, have: u64 },
    #[error("block store: block {height} does not link to the stored block {prev}")]
    BadLink { height: u64, prev: u64 },
}

/// What opening the store found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub blocks: u64,
    pub truncated_bytes: u64,
}

pub struct BlockStore {
    path: PathBuf,
    file: File,
    /// Offset of the record of height h at index h-1.
    index: Vec<u64>,
    end: u64,
    last: Option<BlockHeader>,
    limits: Limits,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HeaderOnly {
    #[prost(message, optional, tag = "1")]
    header: Option<proto::BlockHeader>,
}

fn crc(len: u32, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), payload)
}

fn header_from_proto(h: proto::BlockHeader) -> Option<BlockHeader> {
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

impl BlockStore {
    /// Opens (or creates) `dir/blocks.dat`, recovering from a torn tail.
    pub fn open(dir: &Path, limits: Limits) -> Result<(BlockStore, Recovery), StoreError> {
        let path = dir.join("blocks.dat");
        let io = |source| StoreError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let mut len = file.metadata().map_err(io)?.len();
        if len < MAGIC.len() as u64 {
            // New, or crashed while writing the magic.
            file.set_len(0).map_err(io)?;
            file.write_all_at(MAGIC, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            if let Some(parent) = path.parent() {
                File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
            }
            len = MAGIC.len() as u64;
        }
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0).map_err(io)?;
        if &magic != MAGIC {
            return Err(StoreError::BadMagic { path });
        }
        // Sequential scan of the records.
        let mut data = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.read_to_end(&mut data).map_err(io)?;
        let mut off = MAGIC.len() as u64;
        let mut index = Vec::new();
        let mut last: Option<BlockHeader> = None;
        let corrupt = |offset: u64, height: u64, detail: String| StoreError::Corrupt {
            path: path.clone(),
            offset,
            height,
            detail,
        };
        let mut torn = false;
        while off < len {
            let rest = len - off;
            if rest < RECORD_HEADER {
                torn = true;
                break;
            }
            let o = off as usize;
            let rlen = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
            let rcrc = u32::from_le_bytes(data[o + 4..o + 8].try_into().unwrap());
            if rlen > MAX_RECORD || RECORD_HEADER + rlen as u64 > rest {
                torn = true;
                break;
            }
            let payload = &data[o + 8..o + 8 + rlen as usize];
            // Last record, or only zeros from here on (a write whose data never
            // reached the disk): a torn tail, not corruption.
            let is_last = off + RECORD_HEADER + rlen as u64 == len || data[o..].iter().all(|&b| b == 0);
            if crc(rlen, payload) != rcrc {
                if is_last {
                    torn = true;
                    break;
                }
                return Err(corrupt(off, index.len() as u64, "checksum mismatch".into()));
            }
            let h = HeaderOnly::decode(payload)
                .ok()
                .and_then(|h| h.header)
                .and_then(header_from_proto)
                .ok_or_else(|| corrupt(off, index.len() as u64, "record does not decode as a block".into()))?;
            let want = index.len() as u64 + 1;
            if h.height != want {
                return Err(corrupt(off, index.len() as u64, format!("height {} where {want} was expected", h.height)));
            }
            if h.previous_hash != last.as_ref().map_or([0u8; 32], |p| p.hash()) {
                return Err(corrupt(off, index.len() as u64, "previous_hash does not link".into()));
            }
            index.push(off);
            last = Some(h);
            off += RECORD_HEADER + rlen as u64;
        }
        let truncated = len - off;
        if torn {
            tracing::warn!(path = %path.display(), offset = off, bytes = truncated, "block store: truncating torn tail left by a crash");
            file.set_len(off).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        let rec = Recovery { blocks: index.len() as u64, truncated_bytes: truncated };
        Ok((BlockStore { path, file, index, end: off, last, limits }, rec))
    }

    /// Height of the last durable block (0: empty).
    pub fn height(&self) -> u64 {
        self.index.len() as u64
    }

    pub fn last_header(&self) -> Option<&BlockHeader> {
        self.last.as_ref()
    }

    pub fn last_hash(&self) -> Hash32 {
        self.last.as_ref().map_or([0; 32], |h| h.hash())
    }

    /// Appends blocks (consecutive heights) and makes them durable with one
    /// fdatasync. On error the store must be reopened (recovery truncates).
    pub fn append(&mut self, blocks: &[(&Block, Option<proto::CommitCertificate>)]) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        let mut offsets = Vec::with_capacity(blocks.len());
        let mut prev = self.last.clone();
        for (b, cert) in blocks {
            let have = prev.as_ref().map_or(0, |h| h.height);
            if b.header.height != have + 1 {
                return Err(StoreError::OutOfOrder { got: b.header.height, have });
            }
            if b.header.previous_hash != prev.as_ref().map_or([0; 32], |h| h.hash()) {
                return Err(StoreError::BadLink { height: b.header.height, prev: have });
            }
            let payload = b.to_proto(cert.clone()).encode_to_vec();
            let len = payload.len() as u32;
            offsets.push(self.end + buf.len() as u64);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc(len, &payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            prev = Some(b.header.clone());
        }
        let io = |source| StoreError::Io { path: self.path.clone(), source };
        self.file.write_all_at(&buf, self.end).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.end += buf.len() as u64;
        self.index.extend(offsets);
        self.last = prev;
        Ok(())
    }

    /// Raw protobuf bytes of block `height`.
    pub fn read_raw(&self, height: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if height == 0 || height > self.height() {
            return Ok(None);
        }
        let off = self.index[(height - 1) as usize];
        let io = |source| StoreError::Io { path: self.path.clone(), source };
        let mut hdr = [0u8; 8];
        self.file.read_exact_at(&mut hdr, off).map_err(io)?;
        let len = u32::from_le_bytes(hdr[..4].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.file.read_exact_at(&mut payload, off + RECORD_HEADER).map_err(io)?;
        if crc(len, &payload) != u32::from_le_bytes(hdr[4..].try_into().unwrap()) {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                offset: off,
                height: height - 1,
                detail: "checksum mismatch on read".into(),
            });
        }
        Ok(Some(payload))
    }

    /// Block `height` with its commit certificate, if stored.
    pub fn read(&self, height: u64) -> Result<Option<(Block, Option<proto::CommitCertificate>)>, StoreError> {
        let Some(raw) = self.read_raw(height)? else {
            return Ok(None);
        };
        let corrupt = |d: String| StoreError::Corrupt {
            path: self.path.clone(),
            offset: self.index[(height - 1) as usize],
            height: height - 1,
            detail: d,
        };
        let mut p = proto::Block::decode(&raw[..]).map_err(|e| corrupt(e.to_string()))?;
        let cert = p.certificate.take();
        let b = Block::from_proto(p, &self.limits).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some((b, cert)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{tx_root, BlockHeader};
    use crate::crypto;
    use crate::event::{sample_anomaly_payload, Event, TxKind};
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
            assert_eq!(r, Recovery { blocks: 0, truncated_bytes: 0 });
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
        assert_eq!(r, Recovery { blocks: 3, truncated_bytes: 100 });
    }

    #[test]
    fn corruption_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(3);
        {
            let (mut s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
            s.append(&blocks.iter().map(|b| (b, None)).collect::<Vec<_>>()).unwrap();
        }
        let p = dir.path().join("blocks.dat");
        let mut full = std::fs::read(&p).unwrap();
        full[30] ^= 0xff; // inside block 1's payload
        std::fs::write(&p, &full).unwrap();
        let err = BlockStore::open(dir.path(), Limits::default()).err().expect("must refuse");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("refusing to truncate"));
    }
}
