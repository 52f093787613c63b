//! Why an input was refused: the stable, machine-readable reasons of DLQ
//! records, receipts and the `reason` label of `ingest_rejected_total`.
//!
//! A leaf module (no imports from the rest of the crate): the event decoder,
//! the verify shards, the state machine and the DLQ writers all speak it.
//!
//! Two kinds of reason, and where each verdict comes from:
//! * **local** ([`RejectReason::is_local`]): decided by one validator from the
//!   message bytes and the configuration alone (malformed, oversized, unknown
//!   producer, content hash, nonce layout, bad signature, invalid payload) or
//!   from its clock at arrival (stale, future). The same bytes get the same
//!   verdict on every validator; only stale/future depend on when they
//!   arrived, within the skew tolerance.
//! * **committed** (every other reason): written into a receipt by the
//!   deterministic state machine when the tx's block executes (replayed
//!   nonce, duplicate id, rate limited, expired, future at block time), so
//!   every validator reaches the same verdict at the same height.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why an input was rejected. The string form is part of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Timestamp older than now − skew tolerance (at arrival).
    Stale,
    /// Timestamp newer than now + skew tolerance (at arrival, or at the
    /// block's timestamp in a receipt).
    Future,
    /// Signature fails the accept rule.
    BadSignature,
    /// Another tx with this nonce is committed (committed state).
    ReplayedNonce,
    /// Payload does not decode or breaks its kind's rules.
    InvalidPayload,
    /// Producer exceeded its token-bucket rate, charged against block
    /// timestamps by the state machine (committed state).
    RateLimited,
    /// Older than the nonce TTL at its block's timestamp (committed state).
    Expired,
    /// An anomaly or evidence id already committed by another tx
    /// (committed state).
    DuplicateId,
    /// A validator set change its rules refuse at its block (too few
    /// signatures of the current set, stale epoch, too many changes, a
    /// change already scheduled, ...: `protocol::reconfig`; committed state).
    ReconfigurationRefused,
}

impl RejectReason {
    pub const ALL: [RejectReason; 14] = [
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
        RejectReason::Expired,
        RejectReason::DuplicateId,
        RejectReason::ReconfigurationRefused,
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
            RejectReason::Expired => "expired",
            RejectReason::DuplicateId => "duplicate_id",
            RejectReason::ReconfigurationRefused => "reconfiguration_refused",
        }
    }

    /// The reason with this stable name.
    pub fn from_name(s: &str) -> Option<RejectReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Decided by one validator from the bytes (and its clock at arrival),
    /// not by executing a committed block: see the module doc.
    pub fn is_local(self) -> bool {
        !matches!(
            self,
            RejectReason::ReplayedNonce
                | RejectReason::RateLimited
                | RejectReason::Expired
                | RejectReason::DuplicateId
                | RejectReason::ReconfigurationRefused
        )
    }

    /// Position in [`Self::ALL`] (for per-reason counter arrays).
    pub fn index(self) -> usize {
        self as usize
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
    /// The original bytes as received, whole (sinks keep at most
    /// [`MAX_VALUE_BYTES`] of them, with the full length and SHA-256).
    pub original: Vec<u8>,
    /// The Kafka message, if it came from Kafka (its offset waits for this
    /// record to be written).
    pub pos: Option<crate::protocol::source::SourcePos>,
    /// For a verdict of committed state: the height of the block that
    /// holds the tx and its receipt. With the Kafka source these records
    /// are published with the block's events, from the block store's
    /// cursor (so none is lost across a crash), not by the DLQ writer.
    pub height: Option<u64>,
}

/// Most bytes of an original message a DLQ record carries: below the
/// broker's default message limit (1 MiB) with room for the headers. Every
/// record also carries the original's length and SHA-256 (headers
/// `original_length`, `original_sha256`), so a longer one, cut here, is still
/// identified exactly. Input events are far smaller (`max_event_bytes`).
pub const MAX_VALUE_BYTES: usize = 960 * 1024;

impl Rejection {
    /// The part of the original a record carries (see [`MAX_VALUE_BYTES`]).
    pub fn kept(&self) -> &[u8] {
        &self.original[..self.original.len().min(MAX_VALUE_BYTES)]
    }
    pub fn original_sha256_hex(&self) -> String {
        hex::encode(crate::sha256(&self.original))
    }
}

/// Counts of rejections per reason (lock-free; read by metrics).
#[derive(Default, Debug)]
pub struct RejectCounters {
    counts: [AtomicU64; RejectReason::ALL.len()],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip_and_index_matches_all() {
        let mut names: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(RejectReason::from_name(r.as_str()), Some(*r));
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), RejectReason::ALL.len());
        assert_eq!(RejectReason::from_name("nope"), None);
        assert!(RejectReason::BadSignature.is_local() && !RejectReason::RateLimited.is_local());
    }
}
