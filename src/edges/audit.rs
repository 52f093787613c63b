//! Audit log: consensus events as JSON lines, each authenticated with
//! HMAC-SHA256 and chained to the one before, so a deleted, reordered or
//! edited line is detected (`cybermesh audit verify FILE`).
//!
//! Line format (keys in this order):
//! `{"seq":N,"ts_ms":T,"event":"commit","fields":{…},"prev":"<hex>","mac":"<hex>"}`
//! where `mac = HMAC-SHA256(key, the line up to and excluding ,"mac":…)`
//! (that is, the JSON of seq, ts_ms, event, fields and prev) and `prev` is
//! the previous line's `mac` (64 zeros for the first). Events: `start`
//! (config hash), `proposal`, `commit`, `view_change`, `quarantine`,
//! `misbehaviour`. The key is `AUDIT_SIGNING_KEY` (hex-decoded when it is
//! hex, else its bytes).
//!
//! # Segments
//! At `AUDIT_LOG_MAX_BYTES` the active file (`audit.jsonl`) is synced and
//! renamed to `audit.<seq of its first record, 12 digits>.jsonl`; records
//! go on in a new active file, the first chained to the last of the
//! segment. The oldest segments beyond `AUDIT_LOG_KEEP` are deleted (0
//! keeps all). `cybermesh audit verify DIR` (or the active file) checks
//! every segment and the active file as one chain; if older segments were
//! deleted, the chain is verified from the first record kept.

use ring::hmac;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Serialize, Deserialize)]
struct Body<'a> {
    seq: u64,
    ts_ms: u64,
    event: &'a str,
    fields: serde_json::Value,
    prev: String,
}

#[derive(Deserialize)]
struct Line {
    seq: u64,
    ts_ms: u64,
    event: String,
    fields: serde_json::Value,
    prev: String,
    mac: String,
}

pub fn key_from(secret: &str) -> hmac::Key {
    let bytes = hex::decode(secret.trim()).unwrap_or_else(|_| secret.as_bytes().to_vec());
    hmac::Key::new(hmac::HMAC_SHA256, &bytes)
}

fn body_json(b: &Body<'_>) -> String {
    serde_json::to_string(b).expect("JSON of plain values")
}

fn line_of(key: &hmac::Key, b: &Body<'_>) -> (String, String) {
    let body = body_json(b);
    let mac = hex::encode(hmac::sign(key, body.as_bytes()).as_ref());
    // `body` ends with '}': the mac goes in as the last key.
    (format!("{},\"mac\":\"{mac}\"}}\n", &body[..body.len() - 1]), mac)
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("audit log {path} line {line}: {why}")]
    Bad { path: String, line: u64, why: String },
}

/// When the active file is closed into a segment, and how many segments
/// are kept (0: all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation { max_bytes: 64 * 1024 * 1024, keep: 16 }
    }
}

/// The closed segment of the log whose active file is `active`, starting
/// at record `first_seq`: `<stem>.<first_seq, 12 digits>.jsonl` beside it.
pub fn segment_path(active: &Path, first_seq: u64) -> PathBuf {
    active.with_file_name(format!("{}.{first_seq:012}.jsonl", stem(active)))
}

fn stem(active: &Path) -> String {
    active.file_stem().map_or_else(|| "audit".into(), |s| s.to_string_lossy().into_owned())
}

/// The first seq in a segment's name, if `path` names a segment of `stem`.
fn segment_seq(path: &Path, stem: &str) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_prefix(stem)?.strip_prefix('.')?.strip_suffix(".jsonl")?;
    (digits.len() == 12 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// The closed segments of the log whose active file is `active`, by first seq.
pub fn segments(active: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |e| AuditError::Io { path: dir.display().to_string(), source: e };
    let stem = stem(active);
    let mut out = vec![];
    for e in std::fs::read_dir(&dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        if let Some(seq) = segment_seq(&p, &stem) {
            out.push((seq, p));
        }
    }
    out.sort();
    Ok(out)
}

/// Appends records, continuing the chain of the existing files; closes the
/// active file into a segment at `Rotation::max_bytes` (the next record's
/// `prev` is the last one's `mac`, so the chain runs across segments).
pub struct AuditLog {
    out: std::io::BufWriter<std::fs::File>,
    key: hmac::Key,
    seq: u64,
    prev: String,
    path: PathBuf,
    /// Bytes in the active file, and the seq of its first record.
    bytes: u64,
    first_seq: u64,
    rotation: Rotation,
}

impl AuditLog {
    /// Opens (or creates) the log at `path` with the default rotation.
    pub fn open(path: &Path, key: hmac::Key) -> Result<AuditLog, AuditError> {
        Self::open_rotating(path, key, Rotation::default())
    }

    /// Opens (or creates) the log at `path`; the newest segment and the
    /// active file must verify with `key` (a tampered log is not silently
    /// extended).
    pub fn open_rotating(path: &Path, key: hmac::Key, rotation: Rotation) -> Result<AuditLog, AuditError> {
        let p = path.display().to_string();
        let mut tail: Option<Tail> = None;
        if let Some((_, newest)) = segments(path)?.pop() {
            tail = Some(verify_file(&newest, &key, None)?);
        }
        let bytes = match std::fs::metadata(path) {
            Ok(m) => {
                tail = Some(verify_file(path, &key, tail)?);
                m.len()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(AuditError::Io { path: p, source: e }),
        };
        let (seq, prev) = tail.map_or((0, GENESIS_PREV.to_string()), |t| (t.last_seq, t.prev));
        let first_seq = match bytes {
            0 => seq + 1,
            _ => first_record_seq(path)?.unwrap_or(seq + 1),
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| AuditError::Io { path: p.clone(), source: e })?;
        Ok(AuditLog {
            out: std::io::BufWriter::new(f),
            key,
            seq,
            prev,
            path: path.to_path_buf(),
            bytes,
            first_seq,
            rotation,
        })
    }

    fn io(&self) -> impl Fn(std::io::Error) -> AuditError + '_ {
        |e| AuditError::Io { path: self.path.display().to_string(), source: e }
    }

    /// Appends one record (buffered: `flush` makes it reach the file).
    pub fn record(&mut self, ts_ms: u64, event: &str, fields: serde_json::Value) -> Result<(), AuditError> {
        let b = Body { seq: self.seq + 1, ts_ms, event, fields, prev: std::mem::take(&mut self.prev) };
        let (line, mac) = line_of(&self.key, &b);
        self.out.write_all(line.as_bytes()).map_err(self.io())?;
        self.seq += 1;
        self.prev = mac;
        self.bytes += line.len() as u64;
        if self.bytes >= self.rotation.max_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Closes the active file into a segment (synced, renamed durably), starts
    /// a new one, and deletes the oldest segments beyond `keep`.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.out.flush().map_err(self.io())?;
        self.out.get_ref().sync_data().map_err(self.io())?;
        let closed = segment_path(&self.path, self.first_seq);
        crate::edges::storage::os().rename(&self.path, &closed).map_err(self.io())?;
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(self.io())?;
        self.out = std::io::BufWriter::new(f);
        self.bytes = 0;
        self.first_seq = self.seq + 1;
        if self.rotation.keep > 0 {
            let segs = segments(&self.path)?;
            for (_, old) in &segs[..segs.len().saturating_sub(self.rotation.keep)] {
                std::fs::remove_file(old).map_err(self.io())?;
            }
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), AuditError> {
        self.out.flush().map_err(self.io())
    }
}

/// The seq of the first record in `path`, if any.
fn first_record_seq(path: &Path) -> Result<Option<u64>, AuditError> {
    let f = std::fs::File::open(path).map_err(|e| AuditError::Io { path: path.display().to_string(), source: e })?;
    let Some(Ok(first)) = std::io::BufReader::new(f).lines().next() else { return Ok(None) };
    Ok(serde_json::from_str::<Line>(&first).ok().map(|l| l.seq))
}

/// Where a verified stretch of the chain ends (and where it began).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// The first record's seq (1 unless older segments were rotated out).
    pub first_seq: u64,
    pub last_seq: u64,
    pub prev: String,
    pub records: u64,
    pub files: usize,
}

/// Checks every line of one file. With `after` it must continue that chain;
/// without, a file that does not start at seq 1 starts from its first
/// line's `prev` (a segment whose predecessors were rotated out).
fn verify_file(path: &Path, key: &hmac::Key, after: Option<Tail>) -> Result<Tail, AuditError> {
    let name = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| AuditError::Io { path: name.clone(), source: e })?;
    let mut t =
        after.clone().unwrap_or(Tail { first_seq: 0, last_seq: 0, prev: GENESIS_PREV.into(), records: 0, files: 0 });
    t.files += 1;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let no = i as u64 + 1;
        let bad = |why: String| AuditError::Bad { path: name.clone(), line: no, why };
        let line = line.map_err(|e| bad(e.to_string()))?;
        let l: Line = serde_json::from_str(&line).map_err(|e| bad(format!("not an audit record: {e}")))?;
        if t.records == 0 && after.is_none() && l.seq > 1 {
            // The start of what is kept: chained from a removed segment.
            t.last_seq = l.seq - 1;
            t.prev = l.prev.clone();
        }
        if t.records == 0 && t.first_seq == 0 {
            t.first_seq = l.seq;
        }
        if l.seq != t.last_seq + 1 {
            return Err(bad(format!(
                "sequence {} where {} was expected (a line or a segment is missing or moved)",
                l.seq,
                t.last_seq + 1
            )));
        }
        if l.prev != t.prev {
            return Err(bad("does not chain to the record before it (a line was removed or changed)".into()));
        }
        let body = Body { seq: l.seq, ts_ms: l.ts_ms, event: &l.event, fields: l.fields, prev: l.prev };
        let (expected, mac) = line_of(key, &body);
        if expected.trim_end() != line || mac != l.mac {
            return Err(bad("MAC does not match: the line was edited (or the key is wrong)".into()));
        }
        t.prev = mac;
        t.last_seq = l.seq;
        t.records += 1;
    }
    Ok(t)
}

/// Verifies the audit log at `path`: a directory (its `audit.jsonl`), an
/// active file (with every segment beside it, in order, chained), or one
/// segment alone. Returns where the chain starts and ends, or the first
/// bad line with its file and why.
pub fn verify(path: &Path, key: &hmac::Key) -> Result<Tail, AuditError> {
    let active = if path.is_dir() { path.join("audit.jsonl") } else { path.to_path_buf() };
    if segment_seq(&active, &segment_stem(&active)).is_some() {
        return verify_file(&active, key, None);
    }
    let mut files: Vec<PathBuf> = segments(&active)?.into_iter().map(|(_, p)| p).collect();
    if active.exists() || files.is_empty() {
        files.push(active);
    }
    let mut tail = None;
    for f in &files {
        tail = Some(verify_file(f, key, tail)?);
    }
    Ok(tail.expect("at least one file"))
}

/// The stem a segment file name would have (`audit` of `audit.000000000001.jsonl`).
fn segment_stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.split('.').next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(path: &Path, n: u64) {
        let mut a = AuditLog::open(path, key_from("00ff")).unwrap();
        for i in 0..n {
            a.record(1000 + i, "commit", json!({"height": i + 1, "txs": 3})).unwrap();
        }
        a.flush().unwrap();
    }

    #[test]
    fn a_chained_log_verifies_and_continues_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        write(&p, 3);
        write(&p, 2);
        assert_eq!(verify(&p, &key_from("00ff")).unwrap().records, 5);
        assert!(matches!(verify(&p, &key_from("00fe")), Err(AuditError::Bad { line: 1, .. })), "wrong key");
    }

    #[test]
    fn an_edited_a_deleted_and_a_swapped_line_are_each_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        write(&p, 5);
        let lines: Vec<String> = std::fs::read_to_string(&p).unwrap().lines().map(String::from).collect();
        let check = |ls: Vec<String>| {
            std::fs::write(&p, ls.join("\n") + "\n").unwrap();
            match verify(&p, &key_from("00ff")) {
                Err(AuditError::Bad { line, .. }) => line,
                other => panic!("tampering not detected: {other:?}"),
            }
        };
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"txs\":3", "\"txs\":4");
        assert_eq!(check(edited), 3);
        let mut deleted = lines.clone();
        deleted.remove(1);
        assert_eq!(check(deleted), 2);
        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        assert_eq!(check(swapped), 4);
        let mut truncated_mac = lines.clone();
        truncated_mac[4] = truncated_mac[4].replace("\"mac\":\"", "\"mac\":\"00");
        assert_eq!(check(truncated_mac), 5);
        // Reopening a tampered log refuses to extend it.
        assert!(AuditLog::open(&p, key_from("00ff")).is_err());
    }

    fn rotating(path: &Path, keep: usize, from: u64, n: u64) {
        let r = Rotation { max_bytes: 1024, keep };
        let mut a = AuditLog::open_rotating(path, key_from("00ff"), r).unwrap();
        for i in from..from + n {
            a.record(1000 + i, "commit", json!({"height": i + 1, "txs": 3})).unwrap();
        }
        a.flush().unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn segments_carry_the_chain_and_a_directory_verifies_as_one_log_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        rotating(&p, 0, 0, 30);
        rotating(&p, 0, 30, 30);
        let segs = segments(&p).unwrap();
        assert!(segs.len() >= 4, "{:?}", names(dir.path()));
        assert_eq!(segs[0], (1, segment_path(&p, 1)));
        // Each segment is bounded (one record past the limit at most).
        for (_, s) in &segs {
            assert!(std::fs::metadata(s).unwrap().len() < 1024 + 200);
        }
        for target in [dir.path(), p.as_path()] {
            let t = verify(target, &key_from("00ff")).unwrap();
            assert_eq!((t.first_seq, t.last_seq, t.records, t.files), (1, 60, 60, segs.len() + 1));
        }
        // One segment alone verifies from its first record.
        let t = verify(&segs[1].1, &key_from("00ff")).unwrap();
        assert_eq!((t.first_seq, t.files), (segs[1].0, 1));
        // A missing middle segment is named in the file after it.
        std::fs::remove_file(&segs[1].1).unwrap();
        match verify(dir.path(), &key_from("00ff")) {
            Err(AuditError::Bad { path, line: 1, why }) => {
                assert!(path.ends_with(&format!("audit.{:012}.jsonl", segs[2].0)), "{path}");
                assert!(why.contains("missing"), "{why}");
            }
            other => panic!("a missing segment not detected: {other:?}"),
        }
    }

    #[test]
    fn old_segments_beyond_keep_go_and_what_is_kept_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        rotating(&p, 2, 0, 80);
        let segs = segments(&p).unwrap();
        assert_eq!(segs.len(), 2, "{:?}", names(dir.path()));
        let t = verify(dir.path(), &key_from("00ff")).unwrap();
        assert_eq!((t.first_seq, t.last_seq, t.files), (segs[0].0, 80, 3));
        assert!(t.first_seq > 1);
        // An edit in a kept segment is named with its file and line.
        let text = std::fs::read_to_string(&segs[1].1).unwrap();
        std::fs::write(&segs[1].1, text.replacen("\"txs\":3", "\"txs\":4", 1)).unwrap();
        match verify(dir.path(), &key_from("00ff")) {
            Err(AuditError::Bad { path, line: 1, why }) => {
                assert!(
                    path.ends_with(&format!("audit.{:012}.jsonl", segs[1].0)) && why.contains("edited"),
                    "{path} {why}"
                )
            }
            other => panic!("an edit not detected: {other:?}"),
        }
        // And the log is not extended past it.
        assert!(AuditLog::open_rotating(&p, key_from("00ff"), Rotation { max_bytes: 1024, keep: 2 }).is_err());
    }

    #[test]
    fn a_crash_between_closing_a_segment_and_the_next_record_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        rotating(&p, 0, 0, 20);
        // As if the process died right after the rename: no active file.
        let last = segments(&p).unwrap().pop().unwrap().1;
        std::fs::remove_file(&p).ok();
        let mut a = AuditLog::open_rotating(&p, key_from("00ff"), Rotation { max_bytes: 1 << 20, keep: 0 }).unwrap();
        a.record(5000, "start", json!({})).unwrap();
        a.flush().unwrap();
        let t = verify(dir.path(), &key_from("00ff")).unwrap();
        assert_eq!((t.first_seq, t.last_seq), (1, 21), "{:?} after {}", names(dir.path()), last.display());
    }
}
