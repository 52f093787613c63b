//! Ingest: sources (the `direct` TCP source; Kafka next) and the
//! verification shards' pipeline (`verify`).

pub mod direct;
pub mod verify;

use crate::event::Event;
use std::sync::Arc;

/// A decoded event and where it came from (for DLQ records).
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event: Event,
    pub origin: Arc<str>,
}
