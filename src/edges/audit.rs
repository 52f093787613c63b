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

use ring::hmac;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;

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
    #[error("audit log line {line}: {why}")]
    Bad { line: u64, why: String },
}

/// Appends records, continuing the chain of an existing file.
pub struct AuditLog {
    out: std::io::BufWriter<std::fs::File>,
    key: hmac::Key,
    seq: u64,
    prev: String,
    path: String,
}

impl AuditLog {
    /// Opens (or creates) `path`; an existing file must verify with `key`
    /// (a tampered log is not silently extended).
    pub fn open(path: &Path, key: hmac::Key) -> Result<AuditLog, AuditError> {
        let p = path.display().to_string();
        let (seq, prev) = match std::fs::File::open(path) {
            Ok(_) => verify(path, &key)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, GENESIS_PREV.to_string()),
            Err(e) => return Err(AuditError::Io { path: p, source: e }),
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| AuditError::Io { path: p.clone(), source: e })?;
        Ok(AuditLog { out: std::io::BufWriter::new(f), key, seq, prev, path: p })
    }

    /// Appends one record (buffered: `flush` makes it reach the file).
    pub fn record(&mut self, ts_ms: u64, event: &str, fields: serde_json::Value) -> Result<(), AuditError> {
        let b = Body { seq: self.seq + 1, ts_ms, event, fields, prev: std::mem::take(&mut self.prev) };
        let (line, mac) = line_of(&self.key, &b);
        self.out.write_all(line.as_bytes()).map_err(|e| AuditError::Io { path: self.path.clone(), source: e })?;
        self.seq += 1;
        self.prev = mac;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), AuditError> {
        self.out.flush().map_err(|e| AuditError::Io { path: self.path.clone(), source: e })
    }
}

/// Checks every line of `path`; returns the number of records and the last
/// mac, or the first bad line and why.
pub fn verify(path: &Path, key: &hmac::Key) -> Result<(u64, String), AuditError> {
    let f = std::fs::File::open(path).map_err(|e| AuditError::Io { path: path.display().to_string(), source: e })?;
    let mut prev = GENESIS_PREV.to_string();
    let mut n = 0u64;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let no = i as u64 + 1;
        let bad = |why: String| AuditError::Bad { line: no, why };
        let line = line.map_err(|e| bad(e.to_string()))?;
        let l: Line = serde_json::from_str(&line).map_err(|e| bad(format!("not an audit record: {e}")))?;
        if l.seq != n + 1 {
            return Err(bad(format!("sequence {} where {} was expected (a line is missing or moved)", l.seq, n + 1)));
        }
        if l.prev != prev {
            return Err(bad("does not chain to the line before it (a line was removed or changed)".into()));
        }
        let body = Body { seq: l.seq, ts_ms: l.ts_ms, event: &l.event, fields: l.fields, prev: l.prev };
        let (expected, mac) = line_of(key, &body);
        if expected.trim_end() != line || mac != l.mac {
            return Err(bad("MAC does not match: the line was edited (or the key is wrong)".into()));
        }
        prev = mac;
        n += 1;
    }
    Ok((n, prev))
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
        assert_eq!(verify(&p, &key_from("00ff")).unwrap().0, 5);
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
}
