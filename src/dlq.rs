//! Dead-letter queue: every rejected input, with a machine-readable reason.
//!
//! Reasons have stable snake_case names (`RejectReason::as_str`): they appear
//! in DLQ records, in logs and as the `reason` label of
//! `ingest_rejected_total`. With the Kafka source, records go to the DLQ
//! topic ([`DlqKafkaSink`]); with the direct source, to a JSON-lines file in
//! the data directory (`dlq.jsonl`, [`DlqFileSink`]).

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
    /// The Kafka message, if it came from Kafka (its offset waits for this
    /// record to be written).
    pub pos: Option<crate::ingest::SourcePos>,
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

/// The DLQ on Kafka (`KAFKA_DLQ_TOPIC`, default `ai.dlq.v1`): the message
/// value is the original bytes; headers say why and where from:
/// `reason`, `detail`, `origin`, `validator_id`, and for Kafka input
/// `source_topic`, `source_partition`, `source_offset` (decimal strings).
/// Once the broker acknowledges a record, its source message is finished
/// (its offset may be committed); a record the broker never acknowledges
/// leaves the offset uncommitted, so the message is read again after a
/// restart.
pub struct DlqKafkaSink {
    producer: rdkafka::producer::ThreadedProducer<DlqDelivery>,
    topic: String,
    validator: String,
}

pub struct DlqDelivery {
    tracker: Option<std::sync::Arc<crate::ingest::kafka::OffsetTracker>>,
}

impl rdkafka::ClientContext for DlqDelivery {}

impl rdkafka::producer::ProducerContext for DlqDelivery {
    type DeliveryOpaque = Box<Option<crate::ingest::SourcePos>>;
    fn delivery(&self, r: &rdkafka::producer::DeliveryResult<'_>, pos: Self::DeliveryOpaque) {
        match (r, *pos) {
            (Ok(_), Some(pos)) => {
                if let Some(t) = &self.tracker {
                    t.finish(&pos);
                }
            }
            (Ok(_), None) => {}
            (Err((e, _)), pos) => {
                tracing::error!(error = %e, ?pos, "DLQ record not delivered; its message will be read again after a restart")
            }
        }
    }
}

impl DlqKafkaSink {
    pub fn new(
        k: &crate::config::KafkaConfig,
        validator: String,
        tracker: Option<std::sync::Arc<crate::ingest::kafka::OffsetTracker>>,
    ) -> rdkafka::error::KafkaResult<Self> {
        let producer = crate::ingest::kafka::client_config(k)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("linger.ms", "5")
            .create_with_context(DlqDelivery { tracker })?;
        Ok(DlqKafkaSink { producer, topic: k.dlq_topic.clone(), validator })
    }

    pub fn write(&mut self, r: &Rejection) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::BaseRecord;
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(r.reason.as_str()) })
            .insert(Header { key: "detail", value: Some(r.detail.as_str()) })
            .insert(Header { key: "origin", value: Some(r.origin.as_str()) })
            .insert(Header { key: "validator_id", value: Some(self.validator.as_str()) });
        if let Some(p) = &r.pos {
            headers = headers
                .insert(Header { key: "source_topic", value: Some(&*p.topic) })
                .insert(Header { key: "source_partition", value: Some(&p.partition.to_string()) })
                .insert(Header { key: "source_offset", value: Some(&p.offset.to_string()) });
        }
        let key = match &r.pos {
            Some(p) => format!("{}/{}/{}", p.topic, p.partition, p.offset),
            None => r.origin.clone(),
        };
        let record = BaseRecord::with_opaque_to(&self.topic, Box::new(r.pos.clone()))
            .payload(&r.original[..])
            .key(key.as_str())
            .headers(headers);
        let wait = std::time::Duration::from_millis(50);
        if let Err(e) = crate::ingest::kafka::send_when_queued(&self.producer, record, wait) {
            tracing::error!(error = %e, reason = r.reason.as_str(), "DLQ record refused by the producer; its message will be read again after a restart");
        }
    }

    pub fn flush(&mut self, timeout: std::time::Duration) {
        use rdkafka::producer::Producer;
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "DLQ flush did not complete");
        }
    }
}
