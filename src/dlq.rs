//! Dead-letter queue: every rejected input, with a machine-readable reason.
//!
//! Reasons have stable snake_case names (`RejectReason::as_str`): they appear
//! in DLQ records, in logs and as the `reason` label of
//! `ingest_rejected_total`. Until the Kafka DLQ topic is wired, records go to
//! a JSON-lines file in the data directory (`dlq.jsonl`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an input was rejected. The string form is part of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not a decodable event, bad field length, unknown frame tag.
    Malformed,
    /// Event or payload larger than the configured limit.
    Oversized,
    /// Producer key not in the configured producer set.
    UnknownProducer,
    /// `content_hash != SHA-256(payload)`.
    ContentHashMismatch,
    /// Nonce does not embed the event's timestamp and producer id.
    NonceMismatch,
    /// Timestamp older than now − skew tolerance.
    Stale,
    /// Timestamp newer than now + skew tolerance.
    Future,
    /// Signature fails the accept rule.
    BadSignature,
    /// Nonce already seen within its TTL.
    ReplayedNonce,
    /// Payload does not decode or breaks its kind's rules.
    InvalidPayload,
    /// Producer exceeded its token-bucket rate.
    RateLimited,
}

impl RejectReason {
    pub const ALL: [RejectReason; 11] = [
        RejectReason::Malformed,
        RejectReason::Oversized,
        RejectReason::UnknownProducer,
        RejectReason::ContentHashMismatch,
        RejectReason::NonceMismatch,
        RejectReason::Stale,
        RejectReason::Future,
        RejectReason::BadSignature,
        RejectReason::ReplayedNonce,
        RejectReason::InvalidPayload,
        RejectReason::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Oversized => "oversized",
            RejectReason::UnknownProducer => "unknown_producer",
            RejectReason::ContentHashMismatch => "content_hash_mismatch",
            RejectReason::NonceMismatch => "nonce_mismatch",
            RejectReason::Stale => "stale",
            RejectReason::Future => "future",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::ReplayedNonce => "replayed_nonce",
            RejectReason::InvalidPayload => "invalid_payload",
            RejectReason::RateLimited => "rate_limited",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).expect("in ALL")
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rejected input, with enough context to find and replay it.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
    /// Where it came from: `direct`, or `topic/partition/offset` for Kafka.
    pub origin: String,
    /// The original bytes as received (possibly truncated to the limit).
    pub original: Vec<u8>,
}

/// Counts of rejections per reason (lock-free; read by metrics).
#[derive(Default, Debug)]
pub struct RejectCounters {
    counts: [AtomicU64; 11],
}

impl RejectCounters {
    pub fn add(&self, r: RejectReason) {
        self.counts[r.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self, r: RejectReason) -> u64 {
        self.counts[r.index()].load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        RejectReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// Writes DLQ records as JSON lines: `{"reason","detail","origin","validator",
/// "original_b64hex"}`. Flushes per batch so nothing rejected is lost on exit.
pub struct DlqFileSink {
    out: std::io::BufWriter<std::fs::File>,
    validator: String,
}

impl DlqFileSink {
    pub fn open(path: &std::path::Path, validator: String) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(DlqFileSink { out: std::io::BufWriter::new(f), validator })
    }

    pub fn write(&mut self, r: &Rejection) -> std::io::Result<()> {
        let rec = serde_json::json!({
            "reason": r.reason.as_str(),
            "detail": r.detail,
            "origin": r.origin,
            "validator": self.validator,
            "original_hex": hex::encode(&r.original),
        });
        serde_json::to_writer(&mut self.out, &rec)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
