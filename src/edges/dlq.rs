//! Dead-letter queue: every rejected input, with a machine-readable reason.
//!
//! Reasons have stable snake_case names (`RejectReason::as_str`): they appear
//! in DLQ records, in logs and as the `reason` label of
//! `ingest_rejected_total`. With the Kafka source, records go to the DLQ
//! topic ([`DlqKafkaSink`]); with the direct source, to a JSON-lines file in
//! the data directory (`dlq.jsonl`, [`DlqFileSink`]).

use std::io::Write;

use crate::protocol::reject::{Rejection, MAX_VALUE_BYTES};

/// Writes DLQ records as JSON lines: `{"reason","detail","origin","validator",
/// "original_hex","original_length","original_sha256"}`. Flushes per batch so
/// nothing rejected is lost on exit.
///
/// Bounded: once the file reaches `max_bytes` it becomes `dlq.jsonl.1` (the
/// older ones `.2` … `.keep`, the oldest beyond that deleted) and a new file
/// starts, so the DLQ never takes more than about `max_bytes × (keep + 1)`.
/// A record is never split between files.
pub struct DlqFileSink {
    out: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    validator: String,
    /// Bytes in the current file.
    len: u64,
    max_bytes: u64,
    keep: u32,
}

impl DlqFileSink {
    pub fn open(path: &std::path::Path, validator: String, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let len = f.metadata()?.len();
        Ok(DlqFileSink { out: std::io::BufWriter::new(f), path: path.to_path_buf(), validator, len, max_bytes, keep })
    }

    pub fn write(&mut self, r: &Rejection) -> std::io::Result<()> {
        if self.len >= self.max_bytes {
            self.rotate()?;
        }
        let rec = serde_json::json!({
            "reason": r.reason.as_str(),
            "detail": r.detail,
            "origin": r.origin,
            "validator": self.validator,
            "original_hex": hex::encode(r.kept()),
            "original_length": r.original.len(),
            "original_sha256": r.original_sha256_hex(),
        });
        let mut line = serde_json::to_vec(&rec)?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.len += line.len() as u64;
        Ok(())
    }

    /// The path of the `i`-th older file (`dlq.jsonl.i`).
    pub fn rotated(path: &std::path::Path, i: u32) -> std::path::PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{i}"));
        p.into()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        match std::fs::remove_file(Self::rotated(&self.path, self.keep)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for i in (1..self.keep).rev() {
            match std::fs::rename(Self::rotated(&self.path, i), Self::rotated(&self.path, i + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if self.keep > 0 {
            std::fs::rename(&self.path, Self::rotated(&self.path, 1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.out = std::io::BufWriter::new(f);
        self.len = 0;
        Ok(())
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
    tracker: Option<std::sync::Arc<crate::edges::kafka::OffsetTracker>>,
}

impl rdkafka::ClientContext for DlqDelivery {}

impl rdkafka::producer::ProducerContext for DlqDelivery {
    type DeliveryOpaque = Box<Option<crate::protocol::source::SourcePos>>;
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
        k: &crate::edges::kafka::KafkaConfig,
        validator: String,
        tracker: Option<std::sync::Arc<crate::edges::kafka::OffsetTracker>>,
    ) -> rdkafka::error::KafkaResult<Self> {
        let producer = crate::edges::kafka::client_config(k)
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
        if let Err(e) = crate::edges::kafka::send_when_queued(&self.producer, record, wait) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::reject::RejectReason;

    #[test]
    fn the_dlq_file_rotates_at_its_size_and_keeps_a_bounded_number_of_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let (max, keep) = (4_000u64, 2u32);
        let mut sink = DlqFileSink::open(&path, "1".into(), max, keep).unwrap();
        let n = 200;
        for i in 0..n {
            let r = Rejection {
                reason: RejectReason::BadSignature,
                detail: format!("record {i}"),
                origin: "direct".into(),
                original: vec![i as u8; 100],
                pos: None,
                height: None,
            };
            sink.write(&r).unwrap();
        }
        sink.flush().unwrap();
        let files = [path.clone(), DlqFileSink::rotated(&path, 1), DlqFileSink::rotated(&path, 2)];
        let mut total = 0;
        let mut details = vec![];
        // Oldest first: .2, .1, then the current file.
        for f in files.iter().rev() {
            let text = std::fs::read_to_string(f).unwrap();
            total += text.len() as u64;
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).expect("whole records only");
                details.push(v["detail"].as_str().unwrap().to_string());
            }
        }
        assert!(!DlqFileSink::rotated(&path, 3).exists(), "at most {keep} older files");
        let line = total / details.len() as u64;
        assert!(total <= max * (keep as u64 + 1) + line, "{total} bytes on disk");
        // The newest records, in order, with none missing among them.
        let first: usize = details[0].trim_start_matches("record ").parse().unwrap();
        let want: Vec<String> = (first..n).map(|i| format!("record {i}")).collect();
        assert_eq!(details, want);
        assert!(first > 0, "older records were rotated away");
        // A reopened sink continues the current file's size.
        let len = std::fs::metadata(&path).unwrap().len();
        let reopened = DlqFileSink::open(&path, "1".into(), max, keep).unwrap();
        assert_eq!(reopened.len, len);
    }
}
