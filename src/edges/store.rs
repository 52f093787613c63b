//! Block store: the local source of truth for committed blocks.
//!
//! # Format (segment files `blocks-<first height, 12 digits>.dat`)
//! The chain is cut into segment files so that pruning deletes whole files.
//! Each is an 8-byte magic `CMBLKS01`, then one record per block, in height
//! order starting at the height in its name:
//! ```text
//! u32 LE len | u32 LE crc32c(len LE bytes || payload) | payload (len bytes: protobuf `Block`)
//! ```
//! (the framing of `crate::edges::framed`). Appends are written with one `write` per
//! group and made durable with one `fdatasync` (group commit); a block is
//! committed only after that returns. A group goes whole into one segment;
//! a new segment starts once the last one holds `segment_bytes`. A store of
//! an older version (one `blocks.dat`) is renamed to its first segment.
//!
//! # Base and retained range
//! The store sits on a *base*: the header of a chain snapshot kept in
//! `blocks.base` (see `crate::protocol::snapshot`) — the one a validator
//! joined from, or a newer one it moved to before pruning. Recovery starts
//! from the base and replays the blocks above it. Blocks at or below the
//! base may be kept too (the segment holding the base's block, or blocks not
//! pruned yet): the stored block at the base's height must hash to it.
//! Pruning ([`BlockStore::prune_through`]) deletes whole segments at or below
//! the base, never the last one; what is left starts at [`BlockStore::lowest`].
//!
//! # Recovery
//! `crate::edges::framed` truncates a torn tail (never acknowledged, so nothing
//! committed is lost) and refuses corruption; on top, the store checks that
//! the blocks form one chain (heights continue across segments, previous
//! hashes link, the first stored block sits at or below the base's next
//! height). The height index lives in memory.

use crate::edges::framed::{FramedError, FramedFile, Mode};
use crate::edges::storage::Disk;
use crate::protocol::block::{header_from_proto, Block, BlockHeader};
use crate::protocol::event::Limits;
use crate::{proto, Hash32};
use prost::Message;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"CMBLKS01";
/// The single file of stores written before segments.
const LEGACY_FILE: &str = "blocks.dat";
/// Default size at which a new segment starts.
pub const SEGMENT_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

/// The path of the segment whose first block is `first`.
pub fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("blocks-{first:012}.dat"))
}

/// The first height of a segment file name (`None`: not a segment).
fn segment_first(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("blocks-")?.strip_suffix(".dat")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// The segment files in `dir` by first height (a legacy `blocks.dat` counts
/// as the segment right above `base_height`).
pub fn segment_files(disk: &dyn Disk, dir: &Path, base_height: u64) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> = disk
        .list(dir)?
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            match name {
                LEGACY_FILE => Some((base_height + 1, p.clone())),
                _ => segment_first(name).map(|f| (f, p.clone())),
            }
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The header of the snapshot in `dir/blocks.base` on `disk`, its
/// signatures unchecked (tools and repair; a start verifies it whole).
pub fn base_header_on(disk: &dyn Disk, dir: &Path) -> std::io::Result<Option<BlockHeader>> {
    let path = dir.join(crate::protocol::snapshot::BASE_FILE);
    let bytes = match disk.read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    let s = proto::ChainSnapshot::decode(&bytes[..]).map_err(|e| bad(&e.to_string()))?;
    s.header.and_then(header_from_proto).map(Some).ok_or_else(|| bad("no valid block header"))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block store: {0}")]
    Log(#[from] FramedError),
    #[error("block store: {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("block store: append of height {got} after {have}")]
    OutOfOrder { got: u64, have: u64 },
    #[error("block store: block {height} does not link to the stored block {prev}")]
    BadLink { height: u64, prev: u64 },
    #[error(
        "block store: {detail}. The stored chain has a hole or does not match blocks.base; restore this validator \
         from its peers (move its data directory away and start it again)"
    )]
    Shape { detail: String },
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

/// One segment file: blocks `first ..= first + offsets.len() - 1`.
struct Segment {
    first: u64,
    log: FramedFile,
    /// Offset of the record of height first+i at index i.
    offsets: Vec<u64>,
}

impl Segment {
    fn end(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }
}

pub struct BlockStore {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    /// By first height, contiguous; never empty (the last one takes appends).
    segments: VecDeque<Segment>,
    segment_bytes: u64,
    /// Header of the block the store sits on (a snapshot's), if any.
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
    /// Opens (or creates) the store in `dir`, recovering from a torn tail and
    /// checking that the stored blocks form one chain.
    pub fn open(dir: &Path, limits: Limits) -> Result<(BlockStore, Recovery), StoreError> {
        Self::open_above(dir, limits, None)
    }

    /// Like `open`, for a store that sits on `base` (the header of the
    /// snapshot in `blocks.base`).
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
        disk: Arc<dyn Disk>,
        dir: &Path,
        limits: Limits,
        base: Option<BlockHeader>,
        mode: Mode,
    ) -> Result<(BlockStore, Recovery), StoreError> {
        let base_height = base.as_ref().map_or(0, |b| b.height);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let mut files = match disk.list(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            _ => segment_files(&*disk, dir, base_height).map_err(io(dir))?,
        };
        let shape = |detail: String| StoreError::Shape { detail };
        if files.iter().any(|(_, p)| p.ends_with(LEGACY_FILE)) {
            if files.len() > 1 {
                return Err(shape(format!("{} beside segment files", dir.join(LEGACY_FILE).display())));
            }
            if mode != Mode::ReadOnly {
                let to = segment_path(dir, base_height + 1);
                disk.rename(&files[0].1, &to).map_err(io(&to))?;
                tracing::info!(to = %to.display(), "block store: blocks.dat renamed to its first segment");
                files[0].1 = to;
            }
        }
        if mode == Mode::Repair {
            // Segments wholly at or below the base are not needed (the base
            // vouches for that state): a repair removes them rather than
            // cut the chain above the base at damage among them.
            while files.len() > 1 && files[1].0 <= base_height + 1 {
                let (_, p) = files.remove(0);
                tracing::warn!(path = %p.display(), "repair: removing a segment below the base");
                disk.remove(&p).map_err(io(&p))?;
            }
        }
        if files.is_empty() {
            files.push((base_height + 1, segment_path(dir, base_height + 1)));
        }
        if files[0].0 > base_height + 1 {
            return Err(shape(format!(
                "the first stored block is {} but the store sits on height {base_height}: blocks {}..{} are missing",
                files[0].0,
                base_height + 1,
                files[0].0 - 1
            )));
        }
        let mut segments = VecDeque::new();
        let mut rec = Recovery { blocks: 0, truncated_bytes: 0, dropped_blocks: 0 };
        // The header below the next record, when it is known.
        let mut last: Option<BlockHeader> = match files[0].0 {
            1 => None,
            f if f == base_height + 1 => base.clone(),
            _ => None,
        };
        let mut files = files.into_iter().peekable();
        while let Some((first, path)) = files.next() {
            // Only the last segment takes appends: any earlier one was
            // synced whole before the next began, so damage at its end is
            // not a torn write but damage at rest (never cut on a start).
            let sealed = files.peek().is_some();
            let seg_mode = match (sealed, mode) {
                (true, Mode::Recover) => Mode::ReadOnly,
                _ => mode,
            };
            let want_first = segments.back().map_or(first, |s: &Segment| s.end());
            if first != want_first {
                let detail = format!(
                    "{} starts at height {first} but the blocks before it end at {}",
                    path.display(),
                    want_first - 1
                );
                if mode != Mode::Repair {
                    return Err(shape(detail));
                }
                // Repair cut an earlier segment: what follows it goes too.
                tracing::warn!(%detail, "repair: dropping the segments after the cut");
                for (_, p) in std::iter::once((first, path)).chain(files.by_ref()) {
                    let (_, scan) = FramedFile::open_on(disk.clone(), &p, MAGIC, Mode::ReadOnly, |_, _| Ok(()))?;
                    rec.dropped_blocks += scan.records as u64;
                    disk.remove(&p).map_err(io(&p))?;
                }
                break;
            }
            let mut offsets = Vec::new();
            let (mut log, scan) = FramedFile::open_on(disk.clone(), &path, MAGIC, seg_mode, |off, payload| {
                let h = HeaderOnly::decode(payload)
                    .ok()
                    .and_then(|h| h.header)
                    .and_then(header_from_proto)
                    .ok_or("record does not decode as a block")?;
                let want = first + offsets.len() as u64;
                if h.height != want {
                    return Err(format!("height {} where {want} was expected", h.height));
                }
                let linked = match &last {
                    Some(p) => h.previous_hash == p.hash(),
                    None => h.height != 1 || h.previous_hash == [0u8; 32],
                };
                if !linked {
                    return Err("previous_hash does not link".into());
                }
                if base.as_ref().is_some_and(|b| b.height == h.height && b.hash() != h.hash()) {
                    return Err("the block at the base's height is not the base's block".into());
                }
                offsets.push(off);
                last = Some(h);
                Ok(())
            })?;
            if sealed && mode != Mode::Repair && scan.truncated_bytes > 0 {
                return Err(StoreError::Log(FramedError::Corrupt {
                    path: path.clone(),
                    offset: log.len(),
                    index: scan.records,
                    detail: format!(
                        "the last {} bytes of a sealed segment (later segments follow it) do not form a record",
                        scan.truncated_bytes
                    ),
                    following: 0,
                }));
            }
            log.drop_cached_after_sync();
            rec.blocks += scan.records as u64;
            rec.truncated_bytes += scan.truncated_bytes;
            rec.dropped_blocks += scan.dropped_records as u64;
            segments.push_back(Segment { first, log, offsets });
        }
        let stored_end = segments.back().map_or(base_height + 1, |s| s.end());
        if stored_end <= base_height && mode == Mode::ReadOnly {
            // Reported as it is; a start would begin again on the base.
            last = base.clone();
        } else if stored_end <= base_height {
            // What is left ends below the base (a tail cut, or a repair): it
            // cannot continue above it, and the base holds its state. Start
            // again empty on the base (peers send the blocks above it).
            tracing::warn!(
                stored_end = stored_end - 1,
                base = base_height,
                "block store: the blocks kept end below the snapshot it sits on; starting again on the snapshot"
            );
            for s in segments.drain(..) {
                let p = s.log.path().to_path_buf();
                drop(s);
                disk.remove(&p).map_err(io(&p))?;
            }
            let path = segment_path(dir, base_height + 1);
            let (mut log, _) = FramedFile::open_on(disk.clone(), &path, MAGIC, Mode::Recover, |_, _| Ok(()))?;
            log.drop_cached_after_sync();
            segments.push_back(Segment { first: base_height + 1, log, offsets: vec![] });
            last = base.clone();
        }
        let store = BlockStore {
            disk,
            dir: dir.to_path_buf(),
            segments,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            base,
            last,
            limits,
        };
        Ok((store, rec))
    }

    /// A new segment starts once the last one holds this many bytes.
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes.max(1);
    }

    /// Height of the last durable block (0: empty; the base's height if
    /// nothing is stored above it).
    pub fn height(&self) -> u64 {
        self.last.as_ref().map_or(0, |h| h.height)
    }

    /// Height of the block the store sits on (0: from genesis).
    pub fn base_height(&self) -> u64 {
        self.base.as_ref().map_or(0, |b| b.height)
    }

    /// The lowest height stored (`height() + 1` if none is).
    pub fn lowest(&self) -> u64 {
        self.segments.front().map_or(self.height() + 1, |s| s.first).min(self.height() + 1)
    }

    /// Blocks stored (retained).
    pub fn stored_blocks(&self) -> u64 {
        self.height() + 1 - self.lowest()
    }

    /// The height through which segments must be pruned for the rest to
    /// fit in `bytes` (0: all fit). The last segment always stays.
    pub fn height_to_fit(&self, bytes: u64) -> u64 {
        let mut kept = 0u64;
        for (i, s) in self.segments.iter().enumerate().rev() {
            kept += s.log.len();
            if kept > bytes && i + 1 < self.segments.len() {
                return s.end() - 1;
            }
        }
        0
    }

    /// Segment files and their bytes on disk.
    pub fn segments(&self) -> (usize, u64) {
        (self.segments.len(), self.segments.iter().map(|s| s.log.len()).sum())
    }

    /// Starts an empty store above `base` (a snapshot's block), so the next
    /// append is `base.height + 1`. The caller keeps the base durable
    /// (`blocks.base`) before it appends.
    pub fn set_base(&mut self, base: BlockHeader) -> Result<(), StoreError> {
        assert!(self.stored_blocks() == 0 && self.base.is_none(), "a base is only set on an empty store");
        // The empty segment was named for height 1: start it over.
        let path = segment_path(&self.dir, base.height + 1);
        for s in self.segments.drain(..) {
            let p = s.log.path().to_path_buf();
            drop(s);
            self.disk.remove(&p).map_err(|source| StoreError::Io { path: p.clone(), source })?;
        }
        let (mut log, _) = FramedFile::open_on(self.disk.clone(), &path, MAGIC, Mode::Recover, |_, _| Ok(()))?;
        log.drop_cached_after_sync();
        self.segments.push_back(Segment { first: base.height + 1, log, offsets: vec![] });
        self.last = Some(base.clone());
        self.base = Some(base);
        Ok(())
    }

    /// Moves the store's base up to `base`, a newer snapshot the caller has
    /// already made durable as `blocks.base`: recovery then starts there and
    /// the blocks at or below it may be pruned.
    pub fn rebase(&mut self, base: BlockHeader) {
        assert!(base.height >= self.base_height() && base.height <= self.height(), "a base moves up within the store");
        if let Ok(Some(stored)) = self.read_header(base.height) {
            assert_eq!(stored.hash(), base.hash(), "the new base is the stored block at its height");
        }
        self.base = Some(base);
    }

    /// Deletes the segments whose every block is at or below `height`
    /// (which must not be above the base), never the last one. Returns the
    /// number of blocks deleted.
    pub fn prune_through(&mut self, height: u64) -> Result<u64, StoreError> {
        assert!(height <= self.base_height(), "pruning only below a base that a snapshot vouches for");
        let mut pruned = 0;
        while self.segments.len() > 1 && self.segments[0].end() <= height + 1 {
            let s = self.segments.pop_front().expect("more than one segment");
            let path = s.log.path().to_path_buf();
            pruned += s.offsets.len() as u64;
            drop(s);
            self.disk.remove(&path).map_err(|source| StoreError::Io { path, source })?;
        }
        Ok(pruned)
    }

    /// The header of the block the store sits on, if any.
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
        if blocks.is_empty() {
            return Ok(());
        }
        let tail = self.segments.back().expect("a store has a segment");
        if tail.log.len() >= self.segment_bytes && !tail.offsets.is_empty() {
            let first = self.height() + 1;
            let (mut log, _) = FramedFile::open_on(
                self.disk.clone(),
                &segment_path(&self.dir, first),
                MAGIC,
                Mode::Recover,
                |_, _| Ok(()),
            )?;
            log.drop_cached_after_sync();
            self.segments.push_back(Segment { first, log, offsets: vec![] });
        }
        let seg = self.segments.back_mut().expect("a store has a segment");
        debug_assert_eq!(
            seg.end(),
            self.last.as_ref().map_or(1, |h| h.height + 1),
            "appends continue the last segment"
        );
        let offsets = seg.log.append_encoded(blocks, |(b, cert, outcome), buf| {
            b.encode_with_into(cert.as_ref(), outcome.as_ref(), buf)
        })?;
        seg.offsets.extend(offsets);
        self.last = prev;
        Ok(())
    }

    /// The segment and index within it of a stored height.
    fn locate(&self, height: u64) -> Option<(&Segment, usize)> {
        if height < self.lowest() || height > self.height() {
            return None;
        }
        let i = self.segments.partition_point(|s| s.first <= height).checked_sub(1)?;
        let s = &self.segments[i];
        let at = (height - s.first) as usize;
        (at < s.offsets.len()).then_some((s, at))
    }

    /// Raw protobuf bytes of block `height`.
    pub fn read_raw(&self, height: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((s, i)) = self.locate(height) else { return Ok(None) };
        Ok(Some(s.log.read_at(s.offsets[i], i)?))
    }

    /// The header of stored block `height`.
    pub fn read_header(&self, height: u64) -> Result<Option<BlockHeader>, StoreError> {
        let Some(raw) = self.read_raw(height)? else { return Ok(None) };
        Ok(HeaderOnly::decode(&raw[..]).ok().and_then(|h| h.header).and_then(header_from_proto))
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
        let Some((s, i)) = self.locate(height) else { return Ok(None) };
        let raw = s.log.read_at(s.offsets[i], i)?;
        let corrupt = |detail: String| FramedError::BadRead {
            path: s.log.path().to_path_buf(),
            offset: s.offsets[i],
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

/// A read-only view of the block store for other threads (the HTTP API):
/// it indexes the segment files itself, never writes, and stops at the
/// first record not complete yet (one being appended). Callers ask only for
/// heights the core has published as durable and not pruned.
pub struct BlockStoreReader {
    dir: PathBuf,
    /// By first height.
    segments: Vec<ReaderSegment>,
    limits: Limits,
}

struct ReaderSegment {
    first: u64,
    file: std::fs::File,
    path: PathBuf,
    index: Vec<u64>,
    scanned: u64,
}

impl ReaderSegment {
    fn open(first: u64, path: PathBuf) -> std::io::Result<ReaderSegment> {
        let file = std::fs::File::open(&path)?;
        Ok(ReaderSegment { first, file, path, index: vec![], scanned: MAGIC.len() as u64 })
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
}

impl BlockStoreReader {
    pub fn open(dir: &Path, limits: Limits) -> std::io::Result<BlockStoreReader> {
        let mut r = BlockStoreReader { dir: dir.to_path_buf(), segments: vec![], limits };
        r.find_segments()?;
        Ok(r)
    }

    /// Picks up segments started since (and a legacy file renamed).
    fn find_segments(&mut self) -> std::io::Result<()> {
        let known = self.segments.last().map(|s| s.first);
        for (first, path) in segment_files(&*crate::edges::storage::os(), &self.dir, 0)? {
            if known.is_none_or(|k| first > k)
                && segment_first(&path.file_name().unwrap_or_default().to_string_lossy()).is_some()
            {
                self.segments.push(ReaderSegment::open(first, path)?);
            }
        }
        Ok(())
    }

    /// Closes the segments wholly below `lowest` (pruned by the store).
    pub fn forget_below(&mut self, lowest: u64) {
        let keep = self.segments.partition_point(|s| s.first <= lowest).saturating_sub(1);
        self.segments.drain(..keep);
    }

    /// Block `height` with its stored commit certificate, if stored.
    pub fn read(&mut self, height: u64) -> Result<Option<(Block, Option<proto::PbftCommitCert>)>, String> {
        let locate = |segs: &mut Vec<ReaderSegment>| -> Option<usize> {
            let i = segs.partition_point(|s| s.first <= height).checked_sub(1)?;
            let at = (height - segs[i].first) as usize;
            if at >= segs[i].index.len() {
                segs[i].refresh();
            }
            (at < segs[i].index.len()).then_some(i)
        };
        let i = match locate(&mut self.segments) {
            Some(i) => i,
            None if self.segments.last().is_none_or(|s| height >= s.first + s.index.len() as u64) => {
                self.find_segments().map_err(|e| format!("{}: {e}", self.dir.display()))?;
                match locate(&mut self.segments) {
                    Some(i) => i,
                    None => return Ok(None),
                }
            }
            None => return Ok(None),
        };
        let s = &self.segments[i];
        let off = s.index[(height - s.first) as usize];
        use std::os::unix::fs::FileExt;
        let mut hdr = [0u8; 8];
        s.file.read_exact_at(&mut hdr, off).map_err(|e| format!("{}: {e}", s.path.display()))?;
        let len = u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes")) as usize;
        let mut payload = vec![0u8; len];
        s.file.read_exact_at(&mut payload, off + 8).map_err(|e| format!("{}: {e}", s.path.display()))?;
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
pub(crate) mod tests {
    use super::*;
    use crate::protocol::block::{tx_root, BlockHeader};
    use crate::protocol::crypto;
    use crate::protocol::event::{sample_anomaly_payload, Event, TxKind};
    use std::sync::Arc;

    pub(crate) fn chain(n: u64) -> Vec<Block> {
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
            s.set_base(base.clone()).unwrap();
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
        let mut r = BlockStoreReader::open(dir.path(), Limits::default()).unwrap();
        assert_eq!(r.read(2).unwrap().unwrap().0, blocks[1]);
        assert!(r.read(3).unwrap().is_none());
        s.append(&[(&blocks[2], None), (&blocks[3], None)]).unwrap();
        assert_eq!(r.read(4).unwrap().unwrap().0, blocks[3]);
        assert!(r.read(0).unwrap().is_none());
    }

    /// A store of `groups` appends of `per` blocks, a new segment per group.
    fn segmented(dir: &Path, blocks: &[Block], per: usize) -> BlockStore {
        let (mut s, _) = BlockStore::open(dir, Limits::default()).unwrap();
        s.set_segment_bytes(1);
        for g in blocks.chunks(per) {
            s.append(&g.iter().map(|b| (b, None)).collect::<Vec<_>>()).unwrap();
        }
        s
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn groups_go_whole_into_segments_and_reads_cross_them_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(10);
        let s = segmented(dir.path(), &blocks, 3);
        assert_eq!(s.segments().0, 4);
        drop(s);
        assert_eq!(
            files(dir.path()),
            [
                "blocks-000000000001.dat",
                "blocks-000000000004.dat",
                "blocks-000000000007.dat",
                "blocks-000000000010.dat"
            ]
        );
        let (s, r) = BlockStore::open(dir.path(), Limits::default()).unwrap();
        assert_eq!((r.blocks, s.height(), s.lowest()), (10, 10, 1));
        let mut reader = BlockStoreReader::open(dir.path(), Limits::default()).unwrap();
        for b in &blocks {
            assert_eq!(&s.read(b.header.height).unwrap().unwrap().0, b);
            assert_eq!(&reader.read(b.header.height).unwrap().unwrap().0, b);
        }
        assert!(s.read(11).unwrap().is_none());
        assert!(reader.read(11).unwrap().is_none());
        assert_eq!(s.last_hash(), blocks[9].hash());
    }

    #[test]
    fn pruning_deletes_whole_segments_below_the_base_and_the_store_reopens_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(12);
        let mut s = segmented(dir.path(), &blocks, 3);
        let mut reader = BlockStoreReader::open(dir.path(), Limits::default()).unwrap();
        assert!(reader.read(2).unwrap().is_some());
        // Segments 1-3, 4-6, 7-9, 10-12; the base moves to 8.
        s.rebase(blocks[7].header.clone());
        assert_eq!(s.prune_through(8).unwrap(), 6, "1-6 go; 7-9 holds the base");
        assert_eq!((s.lowest(), s.height(), s.stored_blocks(), s.segments().0), (7, 12, 6, 2));
        assert!(s.read(6).unwrap().is_none());
        assert_eq!(&s.read(7).unwrap().unwrap().0, &blocks[6]);
        reader.forget_below(s.lowest());
        assert_eq!(&reader.read(12).unwrap().unwrap().0, &blocks[11]);
        drop(s);
        assert_eq!(files(dir.path()), ["blocks-000000000007.dat", "blocks-000000000010.dat"]);
        // Reopened on its base, the store keeps what is left, and appends go on.
        let (mut s, r) = BlockStore::open_above(dir.path(), Limits::default(), Some(blocks[7].header.clone())).unwrap();
        assert_eq!((r.blocks, s.lowest(), s.height(), s.base_height()), (6, 7, 12, 8));
        assert_eq!(&s.read(9).unwrap().unwrap().0, &blocks[8]);
        let other = chain(13);
        assert!(matches!(s.append(&[(&other[12], None)]), Err(StoreError::BadLink { .. })), "another chain's block 13");
        // A byte budget: the newest segments that fit in it stay.
        assert_eq!(s.height_to_fit(u64::MAX), 0);
        let (_, bytes) = s.segments();
        assert_eq!(s.height_to_fit(bytes), 0, "all fit");
        assert_eq!(s.height_to_fit(bytes - 1), 9, "7-9 must go for 10-12 to fit");
        assert_eq!(s.height_to_fit(0), 9, "the last segment stays");
        // The last segment is never deleted, even when all of it is below.
        s.rebase(blocks[11].header.clone());
        s.prune_through(12).unwrap();
        assert_eq!((s.lowest(), s.height()), (10, 12));
        drop(s);
        // Without a base, or on another block, the pruned store is refused.
        let refused = |base: Option<BlockHeader>| match BlockStore::open_above(dir.path(), Limits::default(), base) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened"),
        };
        assert!(refused(None).contains("blocks 1..9 are missing"), "{}", refused(None));
        assert!(refused(Some(other[10].header.clone())).contains("not the base's block"));
    }

    #[test]
    fn a_missing_middle_segment_is_refused_and_repair_drops_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(9);
        drop(segmented(dir.path(), &blocks, 3));
        std::fs::remove_file(segment_path(dir.path(), 4)).unwrap();
        let e = BlockStore::open(dir.path(), Limits::default()).err().unwrap().to_string();
        assert!(e.contains("starts at height 7 but the blocks before it end at 3"), "{e}");
        assert!(e.contains("restore this validator"), "{e}");
        let (s, r) = BlockStore::open_in(dir.path(), Limits::default(), None, Mode::Repair).unwrap();
        assert_eq!((s.height(), r.dropped_blocks), (3, 3));
        drop(s);
        assert_eq!(files(dir.path()), ["blocks-000000000001.dat"]);
    }

    #[test]
    fn a_repair_keeps_what_is_above_the_base_when_the_damage_is_below_it() {
        let blocks = chain(12);
        let flip = |path: &Path, at: usize| {
            let mut b = std::fs::read(path).unwrap();
            b[at] ^= 0x40;
            std::fs::write(path, b).unwrap();
        };
        // Damage in a segment wholly below the base (blocks 1-3, base 8):
        // refused at a start; a repair removes the segments below the base.
        let dir = tempfile::tempdir().unwrap();
        let mut s = segmented(dir.path(), &blocks, 3);
        s.rebase(blocks[7].header.clone());
        drop(s);
        flip(&segment_path(dir.path(), 1), 20);
        let base = Some(blocks[7].header.clone());
        assert!(BlockStore::open_above(dir.path(), Limits::default(), base.clone()).is_err());
        let (s, _) = BlockStore::open_in(dir.path(), Limits::default(), base.clone(), Mode::Repair).unwrap();
        assert_eq!((s.lowest(), s.height()), (7, 12), "1-3 and 4-6 lie wholly below the base");
        drop(s);
        let (s, _) = BlockStore::open_above(dir.path(), Limits::default(), base.clone()).unwrap();
        assert_eq!(&s.read(12).unwrap().unwrap().0, &blocks[11]);
        drop(s);
        // Damage before the base in its own segment (7-9): what is left ends
        // below the base, so the repaired store starts empty on it.
        flip(&segment_path(dir.path(), 7), 20);
        let (s, r) = BlockStore::open_in(dir.path(), Limits::default(), base.clone(), Mode::Repair).unwrap();
        assert_eq!((s.lowest(), s.height(), s.stored_blocks()), (9, 8, 0));
        assert!(r.dropped_blocks > 0);
        drop(s);
        let (mut s, _) = BlockStore::open_above(dir.path(), Limits::default(), base).unwrap();
        s.append(&[(&blocks[8], None)]).unwrap();
        assert_eq!(s.height(), 9);
    }

    #[test]
    fn damage_at_the_end_of_a_sealed_segment_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(6);
        drop(segmented(dir.path(), &blocks, 3));
        // The last byte of block 3, in the first segment: a start must not
        // cut it as if it were a torn write (blocks 4-6 follow in the next).
        let p = segment_path(dir.path(), 1);
        let mut b = std::fs::read(&p).unwrap();
        *b.last_mut().unwrap() ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = BlockStore::open(dir.path(), Limits::default()).err().unwrap().to_string();
        assert!(e.contains("corrupt record 2") && e.contains("sealed segment") && e.contains("--repair"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b, "nothing modified");
        assert!(BlockStore::open_in(dir.path(), Limits::default(), None, Mode::ReadOnly).is_err());
        let (s, r) = BlockStore::open_in(dir.path(), Limits::default(), None, Mode::Repair).unwrap();
        assert_eq!((s.height(), r.dropped_blocks), (2, 3));
    }

    #[test]
    fn a_single_file_store_of_an_older_version_becomes_its_first_segment() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(4);
        drop(segmented(dir.path(), &blocks, 4));
        std::fs::rename(segment_path(dir.path(), 1), dir.path().join("blocks.dat")).unwrap();
        let (s, _) = BlockStore::open_in(dir.path(), Limits::default(), None, Mode::ReadOnly).unwrap();
        assert_eq!(s.height(), 4);
        assert_eq!(files(dir.path()), ["blocks.dat"], "read-only renames nothing");
        drop(s);
        let (s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
        assert_eq!(&s.read(4).unwrap().unwrap().0, &blocks[3]);
        assert_eq!(files(dir.path()), ["blocks-000000000001.dat"]);
    }

    #[test]
    fn every_torn_tail_recovers_to_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = chain(3);
        {
            let (mut s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
            s.append(&blocks.iter().map(|b| (b, None)).collect::<Vec<_>>()).unwrap();
        }
        let full = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        let (s, _) = BlockStore::open(dir.path(), Limits::default()).unwrap();
        let ends: Vec<u64> =
            (1..=3).map(|h| if h < 3 { s.segments[0].offsets[h] } else { full.len() as u64 }).collect();
        drop(s);
        for cut in 0..full.len() {
            let d2 = tempfile::tempdir().unwrap();
            std::fs::write(segment_path(d2.path(), 1), &full[..cut]).unwrap();
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
        std::fs::write(segment_path(d3.path(), 1), &z).unwrap();
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
            let offsets: Vec<usize> = s.segments[0].offsets.iter().map(|&o| o as usize).collect();
            let lens = (1..=4).map(|h| s.read_raw(h).unwrap().unwrap().len()).collect::<Vec<_>>();
            (offsets, lens)
        };
        let path = segment_path(dir.path(), 1);
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
