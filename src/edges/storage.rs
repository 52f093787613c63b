//! The storage seam: what the block store, the consensus log and the
//! validator's small files need of a disk, as two traits. Production runs
//! on [`OsDisk`] (`std::fs`, `fdatasync`); the whole-node simulator runs the
//! same code (the framed files, their recovery) on an in-memory disk that
//! tears unsynced writes at a crash, flips bits at rest, fills up and fails
//! syncs (`crate::sim::disk`).
//!
//! The contract both honour, and the framed files rely on:
//! - `write_at` is visible to reads at once but durable only after `sync`
//!   returns `Ok`; a crash keeps a synced prefix and may keep any part of
//!   what was written after it (a torn tail);
//! - after a failed `sync` nothing written since the last good one may be
//!   assumed durable, and the file must be reopened (no retrying: the
//!   fsyncgate lesson);
//! - `rename` and `write_atomically` are atomic and durable (the directory
//!   is synced): a crash leaves the old or the new file, never a mix.

use std::io;
use std::path::Path;
use std::sync::Arc;

/// A file opened on a [`Disk`].
#[allow(clippy::len_without_is_empty)] // a file's length is an I/O call, not a collection's
pub trait DiskFile: Send {
    /// Bytes in the file.
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset` (an error if the file ends before).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`; durable only after `sync`.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write (and `set_len`) before it durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts or extends the file; durable after `sync`.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// A hint: the synced bytes `[offset, offset + len)` will not be read
    /// soon, so their cached pages may go (a no-op where there is no cache).
    fn drop_cached(&self, _offset: u64, _len: u64) {}
    /// The whole file.
    fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut data = vec![0u8; self.len()? as usize];
        self.read_exact_at(&mut data, 0)?;
        Ok(data)
    }
}

/// A directory tree of files.
pub trait Disk: Send + Sync {
    /// Opens `path`; `writable` creates it (and its directory) if missing.
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn DiskFile>>;
    /// Atomically and durably replaces `to` by `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes `path`; a missing file is not an error.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The files directly in `dir` (`NotFound` if it does not exist).
    fn list(&self, dir: &Path) -> io::Result<Vec<std::path::PathBuf>>;
    /// Writes `bytes` to `path` so that a crash leaves the old or the new
    /// file (a temporary sibling, synced, renamed over it).
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = self.open(&tmp, true)?;
        f.set_len(0)?;
        f.write_all_at(bytes, 0)?;
        f.sync()?;
        drop(f);
        self.rename(&tmp, path)
    }
    /// The whole of `path` (`NotFound` if missing).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.open(path, false)?.read_all()
    }
}

/// Bytes a paced write lets the kernel hold dirty before it waits for them
/// to reach the disk.
const PACE_BYTES: usize = 8 << 20;

/// `Disk::write_atomically` on the OS's file system for large files written
/// in the background (chain snapshots of hundreds of MB): written in
/// `PACE_BYTES` pieces, each pushed to the disk (`sync_file_range`) and
/// dropped from the page cache before the next, so the file never sits in
/// memory as hundreds of MB of dirty pages. Flushed all at once, those
/// queued ahead of the block store's small `fdatasync`s and held commits
/// for seconds.
pub fn write_atomically_paced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    let mut at = 0usize;
    for piece in bytes.chunks(PACE_BYTES) {
        std::io::Write::write_all(&mut f, piece)?;
        // SAFETY: advisory calls on an open descriptor with in-range offsets;
        // no pointers. A failure only loses the pacing: the final sync below
        // still makes the file durable.
        unsafe {
            let fd = f.as_raw_fd();
            let flags =
                libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            libc::sync_file_range(fd, at as i64, piece.len() as i64, flags);
            libc::posix_fadvise(fd, at as i64, piece.len() as i64, libc::POSIX_FADV_DONTNEED);
        }
        at += piece.len();
    }
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsDisk;

/// The shared handle on the operating system's disk.
pub fn os() -> Arc<dyn Disk> {
    static OS: std::sync::OnceLock<Arc<dyn Disk>> = std::sync::OnceLock::new();
    OS.get_or_init(|| Arc::new(OsDisk)).clone()
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

impl DiskFile for std::fs::File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: an advice call on an open descriptor; no pointers. Its
        // result is ignored: the pages stay cached if the kernel says no.
        unsafe {
            libc::posix_fadvise(self.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED);
        }
    }
}

impl Disk for OsDisk {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn DiskFile>> {
        if writable {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
        }
        let existed = !writable || path.exists();
        let f = std::fs::OpenOptions::new().read(true).write(writable).create(writable).truncate(false).open(path)?;
        if !existed {
            sync_dir(path)?; // the new name is durable too
        }
        Ok(Box::new(f))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        sync_dir(to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
        let mut out = vec![];
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                out.push(e.path());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_write_replaces_the_file_whole_across_several_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        std::fs::write(&path, b"old").unwrap();
        let bytes: Vec<u8> = (0..PACE_BYTES * 2 + 12_345).map(|i| (i * 31 % 251) as u8).collect();
        write_atomically_paced(&path, &bytes).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert!(!path.with_extension("tmp").exists(), "the temporary file was renamed");
        write_atomically_paced(&path, b"").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }
}
