//! Append-only file of checksummed records: the mechanism under the block
//! store and the consensus log.
//!
//! Format: an 8-byte magic, then records
//! `u32 LE len | u32 LE crc32c(len LE bytes ‖ payload) | payload`.
//! Appends are one `write` per group and one `fdatasync`.
//!
//! Recovery on open: a record running past the end of the file, a last record
//! with a bad checksum, or a tail of zeros is a torn write from a crash and is
//! truncated (it was never acknowledged). A bad record with valid data after
//! it is corruption: opening fails rather than drop durable records.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const HEADER: u64 = 8;
/// Largest record accepted.
pub const MAX_RECORD: u32 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: wrong file type (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: corrupt record {index} at offset {offset}: {detail}; refusing to truncate durable records, restore this node from its peers")]
    Corrupt { path: PathBuf, offset: u64, index: usize, detail: String },
}

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    pub records: usize,
    pub truncated_bytes: u64,
}

pub struct FramedFile {
    path: PathBuf,
    file: File,
    end: u64,
    /// The append buffer, kept between appends: a fresh one per append
    /// (records of a megabyte) cost page faults and page zeroing on every
    /// block (~5% of a backup's core thread in a max-rate profile).
    buf: Vec<u8>,
}

/// Largest append buffer kept for the next append (bounds the memory a
/// one-off large append leaves behind).
const KEEP_BUFFER: usize = 32 * 1024 * 1024;

fn crc(len: u32, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), payload)
}

impl FramedFile {
    /// Opens or creates `path`; calls `visit(offset, payload)` for every
    /// intact record in order (an `Err` from it is corruption).
    pub fn open(
        path: &Path,
        magic: &[u8; 8],
        mut visit: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(FramedFile, Scan), FramedError> {
        let path = path.to_path_buf();
        let io = |source| FramedError::Io { path: path.clone(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let mut len = file.metadata().map_err(io)?.len();
        if len < magic.len() as u64 {
            // New, or crashed while writing the magic.
            file.set_len(0).map_err(io)?;
            file.write_all_at(magic, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            if let Some(parent) = path.parent() {
                File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
            }
            len = magic.len() as u64;
        }
        let mut data = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.read_to_end(&mut data).map_err(io)?;
        if &data[..8] != magic {
            return Err(FramedError::BadMagic { path });
        }
        let mut off = magic.len() as u64;
        let mut records = 0;
        let mut torn = false;
        while off < len {
            let rest = len - off;
            if rest < HEADER {
                torn = true;
                break;
            }
            let o = off as usize;
            let rlen = u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
            let rcrc = u32::from_le_bytes(data[o + 4..o + 8].try_into().expect("4 bytes"));
            if rlen > MAX_RECORD || HEADER + rlen as u64 > rest {
                torn = true;
                break;
            }
            let payload = &data[o + 8..o + 8 + rlen as usize];
            // Last record, or only zeros from here on (a write whose data never
            // reached the disk): a torn tail, not corruption.
            let is_last = off + HEADER + rlen as u64 == len || data[o..].iter().all(|&b| b == 0);
            if crc(rlen, payload) != rcrc {
                if is_last {
                    torn = true;
                    break;
                }
                return Err(FramedError::Corrupt {
                    path,
                    offset: off,
                    index: records,
                    detail: "checksum mismatch".into(),
                });
            }
            if let Err(detail) = visit(off, payload) {
                return Err(FramedError::Corrupt { path, offset: off, index: records, detail });
            }
            records += 1;
            off += HEADER + rlen as u64;
        }
        let truncated = len - off;
        if torn {
            tracing::warn!(path = %path.display(), offset = off, bytes = truncated, "truncating a torn tail left by a crash");
            file.set_len(off).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok((FramedFile { path, file, end: off, buf: Vec::new() }, Scan { records, truncated_bytes: truncated }))
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
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let (mut fresh, _) = FramedFile::open(&tmp, magic, |_, _| Ok(()))?;
        fresh.append(payloads)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
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
        for it in items {
            let start = buf.len();
            offsets.push(self.end + start as u64);
            buf.extend_from_slice(&[0u8; HEADER as usize]);
            encode(it, &mut buf);
            let len = buf.len() - start - HEADER as usize;
            assert!(len <= MAX_RECORD as usize, "record of {len} bytes exceeds MAX_RECORD");
            let len = len as u32;
            let c = crc(len, &buf[start + HEADER as usize..]);
            buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
            buf[start + 4..start + 8].copy_from_slice(&c.to_le_bytes());
        }
        let io = |source| FramedError::Io { path: self.path.clone(), source };
        let written = self.file.write_all_at(&buf, self.end).and_then(|()| self.file.sync_data());
        let n = buf.len() as u64;
        if buf.capacity() <= KEEP_BUFFER {
            self.buf = buf;
        }
        written.map_err(io)?;
        self.end += n;
        Ok(offsets)
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
            return Err(FramedError::Corrupt {
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
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
