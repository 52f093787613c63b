//! Ingest: sources (the `direct` TCP source, `kafka`) and the
//! verification shards' pipeline (`verify`).

pub mod direct;
pub mod kafka;
pub mod verify;

use crate::event::Event;
use std::sync::Arc;

/// A decoded event and where it came from (for DLQ records).
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event: Event,
    pub origin: Arc<str>,
    /// Its Kafka message (None from the direct source): finished when the
    /// tx is in a durable block, in the DLQ or dropped as a duplicate.
    pub pos: Option<SourcePos>,
    /// When the source read it (host ms; for the verify-stage latency).
    pub received_ms: u64,
}

/// Where a Kafka message sits: what its offset commit waits on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePos {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}
