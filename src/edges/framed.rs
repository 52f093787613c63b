//! Append-only file of checksummed records: the mechanism under the block
//! store and the consensus log.
//!
//! Format: an 8-byte magic, then records
//! `u32 LE len | u32 LE crc32c(len LE bytes ‖ payload) | payload`.
//! Appends are one `write` per group and one `fdatasync`.
//!
//! # Torn tail or corruption
//! A record is *damaged* when its header is partial, its length is above
//! the largest record or runs past the end of the file, or its checksum does
//! not match. What follows the damage tells a crash from corruption:
//! - nothing intact after it (only zeros, a partial record, garbage): a torn
//!   write of the last append group, which was never acknowledged; recovery
//!   truncates it;
//! - an intact record after it (found by scanning forward for a header whose
//!   checksum matches; a damaged length field loses the record boundary):
//!   durable records were damaged at rest. Opening fails with the offset and
//!   what to do, and nothing is modified; `Mode::Repair` (`cybermesh store
//!   check --repair`) cuts the file at the damage on an operator's word.
//!
//! The forward scan considers records up to `resync_cap` bytes (4× the
//! largest record read before the damage, at least 16 MiB): a file whose
//! every record after the damage is larger than that reads as torn there.
//! A crash that persisted a later page of the last append but not an earlier
//! one also reads as corruption: refusing is the safe side of that
//! ambiguity (`--repair` resolves it).

use crate::edges::storage::{Disk, DiskFile};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const HEADER: u64 = 8;
/// Largest record accepted.
pub const MAX_RECORD: u32 = 256 * 1024 * 1024;
/// Smallest record size the forward scan after damage considers.
const MIN_RESYNC_CAP: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: wrong file type (bad magic)")]
    BadMagic { path: PathBuf },
    #[error(
        "{path}: corrupt record {index} at offset {offset}: {detail}; {following} intact record(s) follow it, so this is \
         damage at rest, not a torn write. Refusing to truncate durable records: restore this validator from its \
         peers (move its data directory away and start it again), or run `cybermesh store check --repair \
         --data-dir DIR` to cut the file at offset {offset}, dropping {following} record(s)"
    )]
    Corrupt { path: PathBuf, offset: u64, index: usize, detail: String, following: usize },
    #[error("{path}: record {index} at offset {offset} is damaged: {detail}; restore this validator from its peers")]
    BadRead { path: PathBuf, offset: u64, index: usize, detail: String },
}

/// How `FramedFile::open` treats the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A validator's start: creates a missing file, truncates a torn tail,
    /// refuses corruption.
    #[default]
    Recover,
    /// `store check`: writes nothing (the file must exist); `Scan` reports
    /// the torn tail a start would truncate; corruption is refused.
    ReadOnly,
    /// `store check --repair`: like `Recover`, but a damaged record with
    /// intact records after it is cut off too, with everything after it.
    Repair,
}

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Intact records kept.
    pub records: usize,
    /// Bytes after the last record kept: cut (`Recover`, `Repair`) or that a
    /// start would cut (`ReadOnly`).
    pub truncated_bytes: u64,
    /// Intact records after a damaged one that `Repair` dropped.
    pub dropped_records: usize,
}

/// The first damaged (or refused) record and what lies after it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Damage {
    offset: u64,
    index: usize,
    detail: String,
    /// Intact records after it.
    following: usize,
    /// The record itself is intact but its reader refused it.
    refused: bool,
}

impl Damage {
    /// A torn write of the last append: nothing intact from here on.
    fn is_torn_tail(&self) -> bool {
        !self.refused && self.following == 0
    }
}

fn crc(len: u32, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), payload)
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

/// The payload length of the record at `at` if it is intact, else why not.
fn frame_at(data: &[u8], at: usize) -> Result<u32, String> {
    let rest = data.len() - at;
    if rest < HEADER as usize {
        return Err(format!("partial header ({rest} bytes)"));
    }
    let len = u32_at(data, at);
    if len > MAX_RECORD {
        return Err(format!("length field {len} is above the largest record ({MAX_RECORD})"));
    }
    if HEADER as usize + len as usize > rest {
        return Err(format!(
            "length field {len} runs past the end of the file ({} bytes left)",
            rest - HEADER as usize
        ));
    }
    let payload = &data[at + HEADER as usize..at + HEADER as usize + len as usize];
    if crc(len, payload) != u32_at(data, at + 4) {
        return Err("checksum mismatch".into());
    }
    Ok(len)
}

/// Whether a record of `len` at `at` could be real: it fits, and what comes
/// after it is the end, a plausible header, or a torn tail (a partial header
/// or zeros). A cheap filter before the checksum.
fn plausible(data: &[u8], at: usize, len: u32, cap: u32) -> bool {
    let n = data.len();
    if len > cap || at + HEADER as usize + len as usize > n {
        return false;
    }
    let end = at + HEADER as usize + len as usize;
    if end == n || end + (HEADER as usize) > n {
        return true;
    }
    let next = u32_at(data, end);
    (next <= cap && end + HEADER as usize + next as usize <= n) || data[end..end + HEADER as usize] == [0; 8]
}

/// Offset of the first intact record starting in `from..` (the resync after
/// damage), considering records up to `cap` bytes.
fn next_intact(data: &[u8], from: usize, cap: u32) -> Option<usize> {
    (from..data.len().saturating_sub(HEADER as usize - 1))
        .find(|&at| plausible(data, at, u32_at(data, at), cap) && frame_at(data, at).is_ok())
}

/// Intact records from `at` to the end, resyncing past any further damage.
fn count_intact(data: &[u8], mut at: usize, cap: u32) -> usize {
    let mut n = 0;
    loop {
        match frame_at(data, at) {
            Ok(len) => {
                n += 1;
                at += HEADER as usize + len as usize;
                if at >= data.len() {
                    return n;
                }
            }
            Err(_) => match next_intact(data, at + 1, cap) {
                Some(next) => at = next,
                None => return n,
            },
        }
    }
}

/// Reads the records of `data` from `start`, calling `visit` for each
/// intact one; returns the end of the last record accepted, their count, and
/// the first damage if any. Pure: the same for files and for tests.
fn scan_records(
    data: &[u8],
    start: usize,
    mut visit: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> (usize, usize, Option<Damage>) {
    let mut at = start;
    let mut records = 0;
    let mut largest = 0u32;
    while at < data.len() {
        let cap = largest.saturating_mul(4).clamp(MIN_RESYNC_CAP, MAX_RECORD);
        let (detail, resume, refused) = match frame_at(data, at) {
            Ok(len) => {
                let end = at + HEADER as usize + len as usize;
                match visit(at as u64, &data[at + HEADER as usize..end]) {
                    Ok(()) => {
                        records += 1;
                        largest = largest.max(len);
                        at = end;
                        continue;
                    }
                    // Intact but refused by the caller: what follows it
                    // starts right after it.
                    Err(detail) => (detail, Some(end), true),
                }
            }
            Err(_) if data[at..].iter().all(|&b| b == 0) => ("zeros".into(), None, false),
            Err(detail) => (detail, next_intact(data, at + 1, cap), false),
        };
        let following = resume.map_or(0, |r| if r >= data.len() { 0 } else { count_intact(data, r, cap) });
        return (at, records, Some(Damage { offset: at as u64, index: records, detail, following, refused }));
    }
    (at, records, None)
}

pub struct FramedFile {
    path: PathBuf,
    disk: Arc<dyn Disk>,
    file: Box<dyn DiskFile>,
    end: u64,
    /// The append buffer, kept between appends: a fresh one per append
    /// (records of a megabyte) cost page faults and page zeroing on every
    /// block (~5% of a backup's core thread in a max-rate profile).
    buf: Vec<u8>,
    /// Drop what each append wrote from the page cache once it is synced.
    drop_cached: bool,
}

/// Largest append buffer kept for the next append (bounds the memory a
/// one-off large record leaves behind).
const KEEP_BUFFER: usize = 32 * 1024 * 1024;

/// An append writes its buffer out once it holds this much: one `write`
/// per ~4 MiB, and a buffer of one chunk plus one record.
const WRITE_CHUNK: usize = 4 * 1024 * 1024;

impl FramedFile {
    /// Opens or creates `path`, recovering from a torn tail; calls
    /// `visit(offset, payload)` for every intact record in order (an `Err`
    /// from it is corruption).
    pub fn open(
        path: &Path,
        magic: &[u8; 8],
        visit: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(FramedFile, Scan), FramedError> {
        Self::open_with(path, magic, Mode::Recover, visit)
    }

    /// `open` in the given mode (see `Mode`).
    pub fn open_with(
        path: &Path,
        magic: &[u8; 8],
        mode: Mode,
        visit: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(FramedFile, Scan), FramedError> {
        Self::open_on(crate::edges::storage::os(), path, magic, mode, visit)
    }

    /// `open_with` on `disk` (the simulator's faulty disk, or the OS's).
    pub fn open_on(
        disk: Arc<dyn Disk>,
        path: &Path,
        magic: &[u8; 8],
        mode: Mode,
        visit: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(FramedFile, Scan), FramedError> {
        let path = path.to_path_buf();
        let io = |source| FramedError::Io { path: path.clone(), source };
        let writable = mode != Mode::ReadOnly;
        let mut file = disk.open(&path, writable).map_err(io)?;
        let len = file.len().map_err(io)?;
        if len < magic.len() as u64 {
            if !writable {
                // A start would rewrite it as an empty file.
                let f = FramedFile { path, disk, file, end: len, buf: Vec::new(), drop_cached: false };
                return Ok((f, Scan { records: 0, truncated_bytes: len, dropped_records: 0 }));
            }
            // New, or crashed while creating it: made whole elsewhere and
            // renamed in, so a crash never leaves a partial magic here (a
            // bad magic is then damage, never a torn creation).
            drop(file);
            let fresh = path.with_extension("new");
            let mut f = disk.open(&fresh, true).map_err(io)?;
            f.set_len(0).map_err(io)?;
            f.write_all_at(magic, 0).map_err(io)?;
            f.sync().map_err(io)?;
            drop(f);
            disk.rename(&fresh, &path).map_err(io)?;
            file = disk.open(&path, true).map_err(io)?;
        }
        let data = file.read_all().map_err(io)?;
        if &data[..8] != magic {
            return Err(FramedError::BadMagic { path });
        }
        let (end, records, damage) = scan_records(&data, magic.len(), visit);
        let mut dropped_records = 0;
        if let Some(d) = damage {
            if d.is_torn_tail() {
                if writable {
                    tracing::warn!(path = %path.display(), offset = d.offset, bytes = data.len() - end, detail = %d.detail, "truncating a torn tail left by a crash");
                }
            } else if mode == Mode::Repair {
                tracing::warn!(path = %path.display(), offset = d.offset, records = d.following, detail = %d.detail, "repair: cutting the file at a corrupt record");
                dropped_records = d.following;
            } else {
                let Damage { offset, index, detail, following, .. } = d;
                return Err(FramedError::Corrupt { path, offset, index, detail, following });
            }
            if writable {
                file.set_len(end as u64).map_err(io)?;
                file.sync().map_err(io)?;
            }
        }
        debug_assert!(end >= magic.len() && end <= data.len(), "the kept prefix lies inside the file");
        let scan = Scan { records, truncated_bytes: (data.len() - end) as u64, dropped_records };
        Ok((FramedFile { path, disk, file, end: end as u64, buf: Vec::new(), drop_cached: false }, scan))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the file (magic and records).
    pub fn len(&self) -> u64 {
        self.end
    }
    pub fn is_empty(&self) -> bool {
        self.end <= 8
    }

    /// Replaces the file's records by `payloads`, atomically: written to a
    /// sibling file, synced, renamed over this one, directory synced. A
    /// crash leaves the old or the new file, never a mix.
    pub fn rewrite<'a>(
        &mut self,
        magic: &[u8; 8],
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), FramedError> {
        let tmp = self.path.with_extension("compact");
        let io = |source| FramedError::Io { path: tmp.clone(), source };
        self.disk.remove(&tmp).map_err(io)?;
        let (mut fresh, _) = FramedFile::open_on(self.disk.clone(), &tmp, magic, Mode::Recover, |_, _| Ok(()))?;
        fresh.append(payloads)?;
        self.disk.rename(&tmp, &self.path).map_err(io)?;
        fresh.path = self.path.clone();
        *self = fresh;
        Ok(())
    }

    /// Appends records with one write and one fdatasync; returns their
    /// offsets. After an error the file must be reopened (recovery truncates).
    pub fn append<'a>(&mut self, payloads: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u64>, FramedError> {
        self.append_encoded(payloads, |p, buf| buf.extend_from_slice(p))
    }

    /// `append`, each record's payload written by `encode` straight into the
    /// append buffer (no intermediate copy per record).
    pub fn append_encoded<T>(
        &mut self,
        items: impl IntoIterator<Item = T>,
        mut encode: impl FnMut(T, &mut Vec<u8>),
    ) -> Result<Vec<u64>, FramedError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut offsets = Vec::new();
        let io = |source| FramedError::Io { path: self.path.clone(), source };
        // Where `buf` goes in the file: the group is written in chunks of
        // about `WRITE_CHUNK`, so the buffer stays one chunk and a record
        // long instead of growing to the whole group (a burst of 4 KB-tx
        // blocks is tens of MB, reallocated and faulted in anew each time).
        // A crash between chunks leaves a torn tail like any unsynced write.
        let mut at = self.end;
        let mut written = Ok(());
        for it in items {
            let start = buf.len();
            offsets.push(at + start as u64);
            buf.extend_from_slice(&[0u8; HEADER as usize]);
            encode(it, &mut buf);
            let len = buf.len() - start - HEADER as usize;
            assert!(len <= MAX_RECORD as usize, "record of {len} bytes exceeds MAX_RECORD");
            let len = len as u32;
            let c = crc(len, &buf[start + HEADER as usize..]);
            buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
            buf[start + 4..start + 8].copy_from_slice(&c.to_le_bytes());
            if buf.len() >= WRITE_CHUNK {
                written = self.file.write_all_at(&buf, at);
                at += buf.len() as u64;
                buf.clear();
                if written.is_err() {
                    break;
                }
            }
        }
        let written = written.and_then(|()| self.file.write_all_at(&buf, at)).and_then(|()| self.file.sync());
        at += buf.len() as u64;
        if buf.capacity() <= KEEP_BUFFER {
            self.buf = buf;
        }
        written.map_err(io)?;
        if self.drop_cached {
            self.file.drop_cached(self.end, at - self.end);
        }
        self.end = at;
        Ok(offsets)
    }

    /// Each append's bytes leave the page cache once they are durable: for a
    /// file written far more than it is read (the block store), so that its
    /// writes reuse the pages just freed instead of taking fresh memory.
    pub fn drop_cached_after_sync(&mut self) {
        self.drop_cached = true;
    }

    /// The record at `offset`, checksum verified.
    pub fn read_at(&self, offset: u64, index: usize) -> Result<Vec<u8>, FramedError> {
        let io = |source| FramedError::Io { path: self.path.clone(), source };
        let mut hdr = [0u8; 8];
        self.file.read_exact_at(&mut hdr, offset).map_err(io)?;
        let len = u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes"));
        let mut payload = vec![0u8; len as usize];
        self.file.read_exact_at(&mut payload, offset + HEADER).map_err(io)?;
        if crc(len, &payload) != u32::from_le_bytes(hdr[4..].try_into().expect("4 bytes")) {
            return Err(FramedError::BadRead {
                path: self.path.clone(),
                offset,
                index,
                detail: "checksum mismatch on read".into(),
            });
        }
        Ok(payload)
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new file
/// (cursors, genesis certificates, snapshots): a temporary file, fsync,
/// rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::edges::storage::os().write_atomically(path, bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"CMTEST01";

    /// Ways to damage one field of a record's frame at offset `at` with
    /// payload length `len` in `file` (`file.len()` = its size).
    pub(crate) fn damages(file: &[u8], at: usize, len: usize) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![];
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = file.to_vec();
            f(&mut b);
            b
        };
        let set_len = |v: u32| with(&|b: &mut Vec<u8>| b[at..at + 4].copy_from_slice(&v.to_le_bytes()));
        let past_end = (file.len() - at - HEADER as usize + 1) as u32;
        out.push(("length above the maximum".into(), set_len(MAX_RECORD + 1)));
        out.push(("length past the end".into(), set_len(past_end)));
        out.push(("length all ones".into(), set_len(u32::MAX)));
        out.push(("length + 1".into(), set_len(len as u32 + 1)));
        if len > 0 {
            out.push(("length - 1".into(), set_len(len as u32 - 1)));
        }
        for byte in 0..8 {
            out.push((format!("header byte {byte} flipped"), with(&|b: &mut Vec<u8>| b[at + byte] ^= 0x5a)));
        }
        for i in 0..len {
            out.push((
                format!("payload byte {i} flipped"),
                with(&|b: &mut Vec<u8>| b[at + HEADER as usize + i] ^= 0x01),
            ));
        }
        out
    }

    /// Checks what `open` does with each damage of each record of `file`
    /// (records at `offsets`, payload lengths `lens`), written to `path` by
    /// `open`'s caller through `reopen` (which returns the records it kept,
    /// or the error).
    pub(crate) fn check_every_damage(
        path: &Path,
        file: &[u8],
        offsets: &[usize],
        lens: &[usize],
        reopen: &dyn Fn(Mode) -> Result<(usize, Scan), FramedError>,
    ) {
        let n = offsets.len();
        for (i, (&at, &len)) in offsets.iter().zip(lens).enumerate() {
            for (what, bytes) in damages(file, at, len) {
                let case = format!("record {i} of {n}, {what}");
                let last = i + 1 == n;
                std::fs::write(path, &bytes).unwrap();
                // Read-only: nothing written either way.
                match reopen(Mode::ReadOnly) {
                    Ok((kept, scan)) => {
                        assert!(last, "{case}: a damaged record with intact ones after it read as a torn tail");
                        assert_eq!((kept, scan.truncated_bytes), (i, (bytes.len() - at) as u64), "{case}");
                    }
                    Err(FramedError::Corrupt { offset, index, following, .. }) => {
                        assert!(!last, "{case}: a damaged last record is a torn tail");
                        assert_eq!((offset, index, following), (at as u64, i, n - 1 - i), "{case}");
                    }
                    Err(e) => panic!("{case}: {e}"),
                }
                assert_eq!(std::fs::read(path).unwrap(), bytes, "{case}: read-only open modified the file");
                // A start truncates a torn tail and refuses the rest, leaving
                // the file as it was.
                match reopen(Mode::Recover) {
                    Ok((kept, _)) => {
                        assert!(last, "{case}");
                        assert_eq!(kept, i, "{case}");
                        assert_eq!(std::fs::metadata(path).unwrap().len(), at as u64, "{case}");
                    }
                    Err(e @ FramedError::Corrupt { .. }) => {
                        assert!(!last, "{case}");
                        assert!(e.to_string().contains("--repair"), "{case}: the error says what to do: {e}");
                        assert_eq!(std::fs::read(path).unwrap(), bytes, "{case}: a refused open modified the file");
                    }
                    Err(e) => panic!("{case}: {e}"),
                }
                // A repair cuts at the damage.
                std::fs::write(path, &bytes).unwrap();
                let (kept, scan) = reopen(Mode::Repair).unwrap_or_else(|e| panic!("{case}: {e}"));
                assert_eq!((kept, scan.dropped_records), (i, n - 1 - i), "{case}");
                assert_eq!(std::fs::metadata(path).unwrap().len(), at as u64, "{case}");
            }
        }
    }

    #[test]
    fn every_damaged_field_of_every_record_is_a_torn_tail_only_when_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let payloads: Vec<Vec<u8>> = [0usize, 1, 17, 40, 3]
            .iter()
            .enumerate()
            .map(|(i, &l)| (0..l).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        {
            let (mut f, _) = FramedFile::open(&path, MAGIC, |_, _| Ok(())).unwrap();
            f.append(payloads[..2].iter().map(|p| p.as_slice())).unwrap();
            f.append(payloads[2..].iter().map(|p| p.as_slice())).unwrap();
        }
        let file = std::fs::read(&path).unwrap();
        let mut offsets = vec![];
        let mut at = MAGIC.len();
        for p in &payloads {
            offsets.push(at);
            at += HEADER as usize + p.len();
        }
        let lens: Vec<usize> = payloads.iter().map(|p| p.len()).collect();
        check_every_damage(&path, &file, &offsets, &lens, &|mode| {
            let mut kept = 0;
            FramedFile::open_with(&path, MAGIC, mode, |_, _| {
                kept += 1;
                Ok(())
            })
            .map(|(_, scan)| {
                assert_eq!(scan.records, kept);
                (kept, scan)
            })
        });
    }

    /// A fresh framed file holding `records`.
    fn file_with(records: &[&[u8]]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let (mut f, _) = FramedFile::open(&path, MAGIC, |_, _| Ok(())).unwrap();
        f.append(records.iter().copied()).unwrap();
        (dir, path)
    }

    #[test]
    fn a_group_larger_than_a_write_chunk_is_written_whole_and_in_order() {
        // Records straddling chunk ends, one larger than a chunk, and appends
        // of one group and of another after it.
        let sizes = [WRITE_CHUNK - 100, 300, WRITE_CHUNK + 7, 1, 0, 2 * WRITE_CHUNK / 3, 5];
        let payloads: Vec<Vec<u8>> =
            sizes.iter().enumerate().map(|(i, &l)| (0..l).map(|j| (i * 7 + j * 13) as u8).collect()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let (mut f, _) = FramedFile::open(&path, MAGIC, |_, _| Ok(())).unwrap();
        let mut offsets = f.append(payloads[..5].iter().map(|p| p.as_slice())).unwrap();
        offsets.extend(f.append(payloads[5..].iter().map(|p| p.as_slice())).unwrap());
        for (i, (&off, p)) in offsets.iter().zip(&payloads).enumerate() {
            assert_eq!(&f.read_at(off, i).unwrap(), p, "record {i}");
        }
        drop(f);
        let mut seen = vec![];
        let (_, scan) = FramedFile::open(&path, MAGIC, |off, p| {
            seen.push((off, p.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(scan.truncated_bytes, 0);
        assert_eq!(seen, offsets.into_iter().zip(payloads).collect::<Vec<_>>());
    }

    #[test]
    fn zeros_or_a_partial_record_after_the_last_are_a_torn_tail() {
        let (_dir, path) = file_with(&[&b"abc"[..], b"defg"]);
        let good = std::fs::read(&path).unwrap();
        for tail in [vec![0u8; 100], vec![7, 0, 0], 9u32.to_le_bytes().into_iter().chain([1, 2, 3, 4, 5]).collect()] {
            let mut b = good.clone();
            b.extend_from_slice(&tail);
            std::fs::write(&path, &b).unwrap();
            let (_, scan) = FramedFile::open(&path, MAGIC, |_, _| Ok(())).unwrap();
            assert_eq!((scan.records, scan.truncated_bytes), (2, tail.len() as u64));
            assert_eq!(std::fs::read(&path).unwrap(), good);
        }
    }

    #[test]
    fn a_record_its_reader_refuses_is_corruption_even_when_last() {
        let (_dir, path) = file_with(&[&b"ok"[..], b"bad"]);
        let refuse = |_: u64, p: &[u8]| if p == b"bad" { Err("not a record".to_string()) } else { Ok(()) };
        let err = FramedFile::open(&path, MAGIC, refuse).err().expect("refused");
        assert!(matches!(err, FramedError::Corrupt { index: 1, following: 0, .. }), "{err}");
        let (_, scan) = FramedFile::open_with(&path, MAGIC, Mode::Repair, refuse).unwrap();
        assert_eq!(scan.records, 1);
    }

    #[test]
    fn read_only_open_of_a_missing_file_fails_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none");
        assert!(matches!(
            FramedFile::open_with(&path, MAGIC, Mode::ReadOnly, |_, _| Ok(())),
            Err(FramedError::Io { .. })
        ));
        assert!(!path.exists());
    }
}
