//! An in-memory [`Disk`] that fails the way disks do, for the whole-node
//! simulator: a crash keeps each file's synced prefix and a random part of
//! what was written after it (a torn tail, possibly ending in garbage);
//! bits flip at rest; the disk fills up (ENOSPC); a sync fails (EIO, and
//! nothing since the last good sync is durable). Every fault is counted, so
//! a test can show each class did happen over the seeds run.

use crate::edges::storage::{Disk, DiskFile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How often each fault strikes (probabilities per operation or per crash).
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFaults {
    /// At a crash, per file with unsynced writes: part of them survives.
    pub torn_tail: f64,
    /// A surviving torn part ends in garbage (a sector half written).
    pub torn_garbage: f64,
    /// Per sync: it fails.
    pub sync_fails: f64,
    /// Bytes the disk holds (None: unbounded); writes past it fail ENOSPC.
    pub capacity_bytes: Option<u64>,
}

/// Faults that happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Crashes that lost unsynced writes.
    pub lost_unsynced: u64,
    pub torn_tails: u64,
    pub torn_garbage: u64,
    pub bit_flips: u64,
    pub disk_full: u64,
    pub sync_failed: u64,
    pub wipes: u64,
}

#[derive(Debug, Clone, Default)]
struct SimFile {
    /// What a crash keeps.
    durable: Vec<u8>,
    /// What reads see.
    data: Vec<u8>,
}

struct Inner {
    /// Files by inode: a handle follows its file across renames, as on a
    /// POSIX file system.
    files: BTreeMap<u64, SimFile>,
    names: BTreeMap<PathBuf, u64>,
    next_inode: u64,
    faults: DiskFaults,
    rng: StdRng,
    counts: FaultCounts,
    /// Bumped at every crash: handles from before it fail (the process that
    /// held them is gone).
    epoch: u64,
}

impl Inner {
    fn used_bytes(&self) -> u64 {
        self.names.values().map(|i| &self.files[i]).map(|f| f.data.len().max(f.durable.len()) as u64).sum()
    }
}

/// A simulated disk (cheap to clone: one disk, many handles).
#[derive(Clone)]
pub struct SimDisk(Arc<Mutex<Inner>>);

fn crashed() -> io::Error {
    io::Error::other("simulated disk: the process holding this file crashed")
}

impl SimDisk {
    pub fn new(seed: u64, faults: DiskFaults) -> SimDisk {
        SimDisk(Arc::new(Mutex::new(Inner {
            files: BTreeMap::new(),
            names: BTreeMap::new(),
            next_inode: 0,
            faults,
            rng: StdRng::seed_from_u64(seed),
            counts: FaultCounts::default(),
            epoch: 0,
        })))
    }

    /// Bytes held now (the larger of written and synced, per file).
    pub fn used_bytes(&self) -> u64 {
        self.0.lock().unwrap().used_bytes()
    }

    pub fn counts(&self) -> FaultCounts {
        self.0.lock().unwrap().counts
    }

    pub fn set_faults(&self, faults: DiskFaults) {
        self.0.lock().unwrap().faults = faults;
    }

    /// The process crashed: every file falls back to what was synced, plus
    /// (sometimes) a torn part of what was written after it.
    pub fn crash(&self) {
        let mut g = self.0.lock().unwrap();
        let inner = &mut *g;
        inner.epoch += 1;
        let faults = inner.faults;
        for f in inner.files.values_mut() {
            if f.data == f.durable {
                continue;
            }
            inner.counts.lost_unsynced += 1;
            let mut kept = f.durable.clone();
            // An append after the synced prefix: part of it may have reached the platter.
            if f.data.len() > f.durable.len() && f.data.starts_with(&f.durable) && inner.rng.gen_bool(faults.torn_tail)
            {
                let extra = &f.data[f.durable.len()..];
                let n = inner.rng.gen_range(1..=extra.len());
                kept.extend_from_slice(&extra[..n]);
                inner.counts.torn_tails += 1;
                if inner.rng.gen_bool(faults.torn_garbage) {
                    let from = kept.len() - n.min(inner.rng.gen_range(1..=16));
                    for b in &mut kept[from..] {
                        *b = inner.rng.gen();
                    }
                    inner.counts.torn_garbage += 1;
                }
            }
            f.durable = kept.clone();
            f.data = kept;
        }
    }

    /// The disk is replaced by an empty one (a dead drive swapped, or a
    /// data dir deleted): every file is gone; its fault counts stay.
    pub fn wipe(&self) {
        let mut g = self.0.lock().unwrap();
        g.epoch += 1;
        g.files.clear();
        g.names.clear();
        g.counts.wipes += 1;
    }

    /// Flips one bit of `path` at rest (synced data, past its first
    /// `skip` bytes); false if there is nothing there to flip.
    pub fn flip_bit(&self, path: &Path, skip: usize) -> bool {
        let mut g = self.0.lock().unwrap();
        let inner = &mut *g;
        let Some(f) = inner.names.get(path).and_then(|i| inner.files.get_mut(i)) else { return false };
        if f.durable.len() <= skip || f.data.len() < f.durable.len() {
            return false;
        }
        let at = inner.rng.gen_range(skip..f.durable.len());
        let bit = 1u8 << inner.rng.gen_range(0..8);
        f.durable[at] ^= bit;
        f.data[at] ^= bit;
        inner.counts.bit_flips += 1;
        true
    }
}

/// What one file operation sees of the disk.
struct Ctx<'a> {
    f: &'a mut SimFile,
    counts: &'a mut FaultCounts,
    faults: &'a DiskFaults,
    rng: &'a mut StdRng,
    used_bytes: u64,
}

struct Handle {
    disk: Arc<Mutex<Inner>>,
    inode: u64,
    epoch: u64,
    writable: bool,
}

impl Handle {
    fn with<T>(&self, f: impl FnOnce(Ctx<'_>) -> io::Result<T>) -> io::Result<T> {
        let mut g = self.disk.lock().unwrap();
        if g.epoch != self.epoch {
            return Err(crashed());
        }
        let used_bytes = g.used_bytes();
        let inner = &mut *g;
        let file = inner.files.get_mut(&self.inode).expect("an open file's inode lives");
        f(Ctx { f: file, counts: &mut inner.counts, faults: &inner.faults, rng: &mut inner.rng, used_bytes })
    }
}

fn missing(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display()))
}

impl DiskFile for Handle {
    fn len(&self) -> io::Result<u64> {
        self.with(|c| Ok(c.f.data.len() as u64))
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|Ctx { f, .. }| {
            let (at, end) = (offset as usize, offset as usize + buf.len());
            if end > f.data.len() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
            }
            buf.copy_from_slice(&f.data[at..end]);
            Ok(())
        })
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        assert!(self.writable, "write on a file opened read-only");
        self.with(|Ctx { f, counts, faults, used_bytes: used, .. }| {
            let end = offset as usize + buf.len();
            let grows = end.saturating_sub(f.data.len()) as u64;
            if faults.capacity_bytes.is_some_and(|cap| used + grows > cap) {
                counts.disk_full += 1;
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            if f.data.len() < end {
                f.data.resize(end, 0);
            }
            f.data[offset as usize..end].copy_from_slice(buf);
            Ok(())
        })
    }
    fn sync(&mut self) -> io::Result<()> {
        self.with(|Ctx { f, counts, faults, rng, .. }| {
            if faults.sync_fails > 0.0 && rng.gen_bool(faults.sync_fails) {
                counts.sync_failed += 1;
                return Err(io::Error::from_raw_os_error(5)); // EIO
            }
            f.durable = f.data.clone();
            Ok(())
        })
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        assert!(self.writable, "set_len on a file opened read-only");
        self.with(|Ctx { f, .. }| {
            f.data.resize(len as usize, 0);
            Ok(())
        })
    }
}

impl Disk for SimDisk {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn DiskFile>> {
        let mut g = self.0.lock().unwrap();
        let inode = match g.names.get(path) {
            Some(&i) => i,
            None if !writable => return Err(missing(path)),
            None => {
                // A new name is durable at once (the directory sync).
                g.next_inode += 1;
                let i = g.next_inode;
                g.files.insert(i, SimFile::default());
                g.names.insert(path.to_path_buf(), i);
                i
            }
        };
        Ok(Box::new(Handle { disk: self.0.clone(), inode, epoch: g.epoch, writable }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut g = self.0.lock().unwrap();
        let i = g.names.remove(from).ok_or_else(|| missing(from))?;
        g.names.insert(to.to_path_buf(), i);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.0.lock().unwrap().names.remove(path);
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        Ok(self.0.lock().unwrap().names.keys().filter(|p| p.parent() == Some(dir)).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::framed::{FramedFile, Mode};

    const MAGIC: &[u8; 8] = b"SIMTEST1";

    fn open(d: &SimDisk) -> (FramedFile, usize) {
        let mut n = 0;
        let (f, _) = FramedFile::open_on(Arc::new(d.clone()), Path::new("/d/f"), MAGIC, Mode::Recover, |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        (f, n)
    }

    #[test]
    fn a_crash_keeps_synced_records_and_recovery_cuts_the_torn_rest() {
        let faults = DiskFaults { torn_tail: 1.0, torn_garbage: 0.5, ..Default::default() };
        for seed in 0..50 {
            let d = SimDisk::new(seed, faults);
            let (mut f, _) = open(&d);
            f.append([&b"one"[..], b"two"]).unwrap();
            // Written, never synced: a crash mid-append.
            let mut h = d.open(Path::new("/d/f"), true).unwrap();
            let end = h.len().unwrap();
            h.write_all_at(&[7u8; 40], end).unwrap();
            d.crash();
            assert!(f.append([&b"x"[..]]).is_err(), "a handle from before the crash is dead");
            let (_, n) = open(&d);
            assert_eq!(n, 2, "seed {seed}: synced records survive, the torn write does not");
        }
    }

    #[test]
    fn a_full_disk_and_a_failed_sync_are_errors_and_lose_no_synced_record() {
        let d = SimDisk::new(1, DiskFaults { capacity_bytes: Some(64), ..Default::default() });
        let (mut f, _) = open(&d);
        f.append([&[1u8; 20][..]]).unwrap();
        let e = f.append([&[2u8; 40][..]]).unwrap_err();
        assert!(format!("{e}").contains("No space left"), "{e}");
        d.set_faults(DiskFaults { sync_fails: 1.0, ..Default::default() });
        assert!(f.append([&[3u8; 4][..]]).is_err());
        d.crash();
        d.set_faults(DiskFaults::default());
        assert_eq!(open(&d).1, 1);
        assert_eq!(d.counts().disk_full, 1);
        assert_eq!(d.counts().sync_failed, 1);
    }

    #[test]
    fn a_flipped_bit_at_rest_is_refused_or_cut_as_a_torn_last_record() {
        for seed in 0..100 {
            let d = SimDisk::new(seed, DiskFaults::default());
            let (mut f, _) = open(&d);
            f.append([&[1u8; 30][..], &[2u8; 30], &[3u8; 30]]).unwrap();
            assert!(d.flip_bit(Path::new("/d/f"), 8));
            let mut n = 0;
            let r = FramedFile::open_on(Arc::new(d.clone()), Path::new("/d/f"), MAGIC, Mode::Recover, |_, _| {
                n += 1;
                Ok(())
            });
            match r {
                Err(crate::edges::framed::FramedError::Corrupt { .. }) => {}
                Ok(_) => assert_eq!(n, 2, "seed {seed}: only damage in the last record reads as torn"),
                Err(e) => panic!("seed {seed}: {e}"),
            }
        }
    }
}
