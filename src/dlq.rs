//! Dead-letter queue: every rejected input, with a machine-readable reason.
//!
//! Reasons have stable snake_case names (`RejectReason::as_str`): they appear
//! in DLQ records, in logs and as the `reason` label of
//! `ingest_rejected_total`. With the Kafka source, records go to the DLQ
//! topic ([`DlqKafkaSink`]); with the direct source, to a JSON-lines file in
//! the data directory (`dlq.jsonl`, [`DlqFileSink`]).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::reject::RejectReason;

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
    pub pos: Option<crate::ingest::SourcePos>,
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

/// Writes DLQ records as JSON lines: `{"reason","detail","origin","validator",
/// "original_hex","original_length","original_sha256"}`. Flushes per batch so
/// nothing rejected is lost on exit.
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
            "original_hex": hex::encode(r.kept()),
            "original_length": r.original.len(),
            "original_sha256": r.original_sha256_hex(),
        });
        serde_json::to_writer(&mut self.out, &rec)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The DLQ on Kafka (`KAFKA_DLQ_TOPIC`, default `ai.dlq.v1`): the message
/// value is the original bytes (at most [`MAX_VALUE_BYTES`]); headers say
/// why and where from: `reason`, `detail`, `origin`, `validator_id`,
/// `original_length` (decimal), `original_sha256` (hex), and for Kafka
/// input `source_topic`, `source_partition`, `source_offset` (decimal
/// strings).
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
            // A whole original plus headers fits (librdkafka's default is 1 MB).
            .set("message.max.bytes", (MAX_VALUE_BYTES + 64 * 1024).to_string())
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
            .insert(Header { key: "validator_id", value: Some(self.validator.as_str()) })
            .insert(Header { key: "original_length", value: Some(&r.original.len().to_string()) })
            .insert(Header { key: "original_sha256", value: Some(&r.original_sha256_hex()) });
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
            .payload(r.kept())
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
