//! The consensus log: a replica's durable records (`pbft::Record`) in a
//! checksummed append-only file (`crate::edges::framed`), written with one fdatasync
//! per batch before the sends that depend on them, and read back by
//! `Replica::recover` after a restart.

use crate::edges::framed::{FramedError, FramedFile, Mode, Scan};
use crate::protocol::consensus::pbft::Record;
use crate::protocol::consensus::wire::{decode_record, encode_record, encode_record_into, WireLimits};
use std::path::Path;

const MAGIC: &[u8; 8] = b"CMPBFT01";

pub struct ConsensusLog {
    file: FramedFile,
}

impl ConsensusLog {
    /// Opens `dir/consensus.log`, returning the records in order.
    pub fn open(dir: &Path, limits: &WireLimits) -> Result<(ConsensusLog, Vec<Record>, Scan), FramedError> {
        Self::open_in(dir, limits, Mode::Recover)
    }

    /// `open` in the given mode (`ReadOnly`, `Repair`: `cybermesh store check`).
    pub fn open_in(
        dir: &Path,
        limits: &WireLimits,
        mode: Mode,
    ) -> Result<(ConsensusLog, Vec<Record>, Scan), FramedError> {
        Self::open_on(crate::edges::storage::os(), dir, limits, mode)
    }

    /// `open_in` on `disk` (the simulator's, or the OS's).
    pub fn open_on(
        disk: std::sync::Arc<dyn crate::edges::storage::Disk>,
        dir: &Path,
        limits: &WireLimits,
        mode: Mode,
    ) -> Result<(ConsensusLog, Vec<Record>, Scan), FramedError> {
        let mut records = Vec::new();
        let (file, scan) = FramedFile::open_on(disk, &dir.join("consensus.log"), MAGIC, mode, |_, payload| {
            records.push(decode_record(payload, limits).map_err(|e| e.to_string())?);
            Ok(())
        })?;
        Ok((ConsensusLog { file }, records, scan))
    }

    /// Bytes on disk.
    pub fn len(&self) -> u64 {
        self.file.len()
    }
    pub fn is_empty(&self) -> bool {
        self.file.is_empty()
    }

    /// Replaces the log by `records` (the replica's `durable_records` at a
    /// stable checkpoint), atomically.
    pub fn compact(&mut self, records: &[Record]) -> Result<(), FramedError> {
        let enc: Vec<Vec<u8>> = records.iter().map(encode_record).collect();
        self.file.rewrite(MAGIC, enc.iter().map(|e| e.as_slice()))
    }

    /// Makes `records` durable (one write, one fdatasync).
    pub fn append(&mut self, records: &[Record]) -> Result<(), FramedError> {
        if records.is_empty() {
            return Ok(());
        }
        self.file.append_encoded(records, encode_record_into)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::consensus::pbft::*;
    use std::sync::Arc;

    #[test]
    fn records_survive_reopen_and_a_torn_tail() {
        let l = WireLimits { n: 4, max_value_bytes: 1 << 20, window: 16 };
        let dir = tempfile::tempdir().unwrap();
        let value: Value = Arc::new(b"v".to_vec());
        let pp = Signed {
            body: PrePrepare { view: 2, seq: 7, digest: crate::sha256(&value), value },
            from: 2,
            sig: vec![1; 64],
        };
        let vote = Signed {
            body: Vote { phase: Phase::Prepare, view: 2, seq: 7, digest: pp.body.digest },
            from: 1,
            sig: vec![2; 64],
        };
        let recs = vec![
            Record::View { view: 2, changing: false, excluded: Some(vec![1]) },
            Record::PrePrepare(pp.clone()),
            Record::Vote(vote.clone()),
            Record::Prepared(PreparedCert { pre_prepare: pp.clone(), prepares: vec![vote] }),
            Record::NewView(Signed {
                body: NewView { view: 2, view_changes: vec![], pre_prepares: vec![pp] },
                from: 2,
                sig: vec![4; 64],
            }),
            Record::Stable {
                seq: 4,
                proof: vec![Signed {
                    body: Checkpoint { seq: 4, state: [9; 32], app: [8; 32] },
                    from: 3,
                    sig: vec![3; 64],
                }],
            },
            Record::Epoch { epoch: 1, base: 16 },
        ];
        {
            let (mut log, got, _) = ConsensusLog::open(dir.path(), &l).unwrap();
            assert!(got.is_empty());
            log.append(&recs[..2]).unwrap();
            log.append(&recs[2..]).unwrap();
        }
        let (_, got, scan) = ConsensusLog::open(dir.path(), &l).unwrap();
        assert_eq!(got, recs);
        assert_eq!(scan.truncated_bytes, 0);
        // A crash mid-append leaves a torn tail: the intact prefix survives.
        let p = dir.path().join("consensus.log");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let (_, got, scan) = ConsensusLog::open(dir.path(), &l).unwrap();
        assert_eq!(got, recs[..recs.len() - 1].to_vec());
        assert!(scan.truncated_bytes > 0);
    }

    #[test]
    fn compaction_replaces_the_records_and_appends_continue() {
        let l = WireLimits { n: 4, max_value_bytes: 1 << 20, window: 16 };
        let dir = tempfile::tempdir().unwrap();
        let view = |v| Record::View { view: v, changing: false, excluded: None };
        let (mut log, _, _) = ConsensusLog::open(dir.path(), &l).unwrap();
        log.append(&(0..100).map(view).collect::<Vec<_>>()).unwrap();
        let before = log.len();
        log.compact(&[view(99)]).unwrap();
        assert!(log.len() < before);
        log.append(&[view(100)]).unwrap();
        drop(log);
        let (_, got, _) = ConsensusLog::open(dir.path(), &l).unwrap();
        assert_eq!(got, vec![view(99), view(100)]);
        assert!(!dir.path().join("consensus.compact").exists());
    }

    #[test]
    fn every_damaged_field_of_every_record_is_refused_unless_it_is_the_last() {
        let l = WireLimits { n: 4, max_value_bytes: 1 << 20, window: 16 };
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<Record> =
            (0..4).map(|v| Record::View { view: v * 1000, changing: v % 2 == 1, excluded: Some(vec![]) }).collect();
        {
            let (mut log, _, _) = ConsensusLog::open(dir.path(), &l).unwrap();
            log.append(&recs[..1]).unwrap();
            log.append(&recs[1..]).unwrap();
        }
        let lens: Vec<usize> = recs.iter().map(|r| encode_record(r).len()).collect();
        let offsets: Vec<usize> = lens.iter().scan(8, |at, len| Some(std::mem::replace(at, *at + 8 + len))).collect();
        let path = dir.path().join("consensus.log");
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file.len(), offsets[3] + 8 + lens[3]);
        crate::edges::framed::tests::check_every_damage(&path, &file, &offsets, &lens, &|mode| {
            ConsensusLog::open_in(dir.path(), &l, mode).map(|(_, got, scan)| {
                assert_eq!(got, recs[..got.len()].to_vec(), "a prefix survives");
                (got.len(), scan)
            })
        });
    }
}
