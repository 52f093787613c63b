//! The Kafka source: client settings, which topic carries which kind, and
//! the offset tracker that decides what may be committed.
//!
//! Every validator consumes every message: its consumer group is
//! `<KAFKA_CONSUMER_GROUP_ID>-node-<id>`. A message's value is the event's
//! protobuf bytes (`AnomalyEvent`, `EvidenceEvent` or `PolicyEvent`); its kind
//! is the topic's (a topic name containing `anomal`, `evidence` or `policy`).
//!
//! # Offsets
//! An offset is committed only once every message before it in its
//! partition is *finished*: its tx is in a durable block, or the message is
//! in the DLQ, or it was dropped as a duplicate of a committed or pending tx.
//! [`OffsetTracker`] keeps the unfinished offsets per partition; the commit
//! point is the smallest unfinished one (or one past the last seen). After a
//! crash the consumer resumes there: messages redelivered whose txs were
//! already committed are dropped by nonce, so none commits twice.

use crate::protocol::source::SourcePos;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// Hands `record` to the producer, waiting `wait` at a time while
/// librdkafka's local queue is full (backpressure, not a failure); any other
/// refusal is returned.
pub fn send_when_queued<'a, K, P, C>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    mut record: rdkafka::producer::BaseRecord<'a, K, P, C::DeliveryOpaque>,
    wait: std::time::Duration,
) -> rdkafka::error::KafkaResult<()>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
    C: rdkafka::producer::ProducerContext + 'static,
{
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(wait);
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Settings shared by the consumer and the producers (brokers, TLS, SASL).
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    let sasl = !k.sasl_mechanism.trim().is_empty();
    let protocol = match (k.tls_enabled, sasl) {
        (false, false) => "plaintext",
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    c.set("security.protocol", protocol);
    if k.tls_enabled && !k.ca_location.is_empty() {
        c.set("ssl.ca.location", &k.ca_location);
    }
    if sasl {
        c.set("sasl.mechanisms", k.sasl_mechanism.trim().to_ascii_uppercase());
        c.set("sasl.username", &k.sasl_username);
        c.set("sasl.password", &k.sasl_password);
    }
    c
}

/// Every topic the validator reads or writes: input, DLQ, control.
pub fn all_topics(k: &KafkaConfig) -> Vec<String> {
    let mut t = k.input_topics.clone();
    t.extend(
        [&k.dlq_topic, &k.commits_topic, &k.reputation_topic, &k.policy_topic, &k.evidence_topic].map(|s| s.clone()),
    );
    t.retain(|s| !s.trim().is_empty());
    t.sort();
    t.dedup();
    t
}

/// Topics of [`all_topics`] the broker does not list.
pub fn missing_topics(k: &KafkaConfig, timeout: std::time::Duration) -> rdkafka::error::KafkaResult<Vec<String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = client_config(k).create()?;
    let md = c.fetch_metadata(None, timeout)?;
    let have: std::collections::HashSet<&str> =
        md.topics().iter().filter(|t| t.error().is_none() && !t.partitions().is_empty()).map(|t| t.name()).collect();
    Ok(all_topics(k).into_iter().filter(|t| !have.contains(t.as_str())).collect())
}

/// Creates the missing topics (KAFKA_CREATE_TOPICS) with the configured
/// partitions and replication; a topic created meanwhile by someone else is
/// fine. Returns the topics still missing afterwards, for the caller to name.
pub fn ensure_topics(k: &KafkaConfig) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::types::RDKafkaErrorCode;
    let timeout = std::time::Duration::from_secs(10);
    let missing = missing_topics(k, timeout).context("listing Kafka topics")?;
    if missing.is_empty() || !k.create_topics {
        return Ok(missing);
    }
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        client_config(k).create().context("creating the Kafka admin client")?;
    let new: Vec<NewTopic> = missing
        .iter()
        .map(|t| NewTopic::new(t, k.topic_partitions, TopicReplication::Fixed(k.topic_replication)))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let results = rt.block_on(admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(timeout))));
    match results {
        Ok(rs) => {
            for r in rs {
                match r {
                    Ok(t) => tracing::info!(topic = t, partitions = k.topic_partitions, "Kafka topic created"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, e)) => tracing::warn!(topic = t, error = %e, "could not create Kafka topic"),
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "the broker refused to create topics"),
    }
    missing_topics(k, timeout).context("listing Kafka topics")
}

/// The consumer group of validator `id`: its own, so it sees every message.
pub fn group_id(k: &KafkaConfig, id: u32) -> String {
    format!("{}-node-{id}", k.consumer_group_id)
}

/// Unfinished messages per partition, and which nonce each decoded one
/// carries (a committed block finishes its txs by nonce). Shared by the
/// consumer (registers), the DLQ writer and the core (finish).
#[derive(Default)]
pub struct OffsetTracker {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    parts: HashMap<(Arc<str>, i32), Partition>,
    by_nonce: HashMap<[u8; 16], Vec<SourcePos>>,
    nonce_of: HashMap<SourcePos, [u8; 16]>,
}

#[derive(Default)]
struct Partition {
    unfinished: BTreeSet<i64>,
    /// One past the highest offset seen.
    next: i64,
    /// The last commit point handed out.
    committed: i64,
}

impl OffsetTracker {
    /// A message was consumed; `nonce` if it decoded as an event.
    pub fn consumed(&self, pos: &SourcePos, nonce: Option<[u8; 16]>) {
        self.consumed_all(&[(pos.clone(), nonce)]);
    }

    /// `consumed` for a batch, under one lock.
    pub fn consumed_all(&self, batch: &[(SourcePos, Option<[u8; 16]>)]) {
        let mut g = self.inner.lock().expect("tracker lock");
        for (pos, nonce) in batch {
            let p = g.parts.entry((pos.topic.clone(), pos.partition)).or_default();
            p.unfinished.insert(pos.offset);
            p.next = p.next.max(pos.offset + 1);
            if let Some(n) = nonce {
                g.by_nonce.entry(*n).or_default().push(pos.clone());
                g.nonce_of.insert(pos.clone(), *n);
            }
        }
    }

    /// The message at `pos` is finished (in the DLQ, or dropped).
    pub fn finish(&self, pos: &SourcePos) {
        let mut g = self.inner.lock().expect("tracker lock");
        g.finish(pos);
    }

    /// Txs with these nonces are in a durable block: every message that
    /// carried one is finished.
    pub fn finish_nonces<'a>(&self, nonces: impl IntoIterator<Item = &'a [u8; 16]>) {
        let mut g = self.inner.lock().expect("tracker lock");
        for n in nonces {
            if let Some(ps) = g.by_nonce.remove(n) {
                for p in ps {
                    g.finish(&p);
                }
            }
        }
    }

    /// Partitions whose commit point moved since the last call, with the
    /// offset to commit (the next one to read after a restart).
    pub fn commit_points(&self) -> Vec<(Arc<str>, i32, i64)> {
        let mut g = self.inner.lock().expect("tracker lock");
        let mut out = vec![];
        for ((topic, partition), p) in g.parts.iter_mut() {
            let point = p.unfinished.first().copied().unwrap_or(p.next);
            if point > p.committed {
                p.committed = point;
                out.push((topic.clone(), *partition, point));
            }
        }
        out.sort();
        out
    }

    /// A commit of these points failed: hand them out again next time.
    pub fn commit_failed(&self, points: &[(Arc<str>, i32, i64)]) {
        let mut g = self.inner.lock().expect("tracker lock");
        for (topic, partition, point) in points {
            if let Some(p) = g.parts.get_mut(&(topic.clone(), *partition)) {
                if p.committed == *point {
                    p.committed = 0;
                }
            }
        }
    }

    /// Messages consumed and not finished.
    pub fn unfinished(&self) -> usize {
        self.inner.lock().expect("tracker lock").parts.values().map(|p| p.unfinished.len()).sum()
    }
}

impl Inner {
    fn finish(&mut self, pos: &SourcePos) {
        if let Some(p) = self.parts.get_mut(&(pos.topic.clone(), pos.partition)) {
            p.unfinished.remove(&pos.offset);
        }
        if let Some(n) = self.nonce_of.remove(pos) {
            if let Some(v) = self.by_nonce.get_mut(&n) {
                v.retain(|x| x != pos);
                if v.is_empty() {
                    self.by_nonce.remove(&n);
                }
            }
        }
    }
}

/// The Kafka client settings and topic names (the `[kafka]` section).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub tls_enabled: bool,
    pub ca_location: String,
    /// PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | "" (none).
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: String,
    pub input_topics: Vec<String>,
    pub consumer_group_id: String,
    pub dlq_topic: String,
    pub commits_topic: String,
    pub reputation_topic: String,
    pub policy_topic: String,
    pub evidence_topic: String,
    /// Create missing input, DLQ and control topics at startup
    /// (KAFKA_CREATE_TOPICS); when off, or when the broker refuses, wait for
    /// them with one message naming them.
    pub create_topics: bool,
    /// Partitions and replication factor of topics created here
    /// (KAFKA_TOPIC_PARTITIONS, KAFKA_TOPIC_REPLICATION).
    pub topic_partitions: i32,
    pub topic_replication: i32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            tls_enabled: false,
            ca_location: String::new(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password: String::new(),
            input_topics: vec!["ai.anomalies.v1".into(), "ai.evidence.v1".into(), "ai.policy.v1".into()],
            consumer_group_id: "cybermesh-consensus".into(),
            dlq_topic: "ai.dlq.v1".into(),
            commits_topic: "control.commits.v1".into(),
            reputation_topic: "control.reputation.v1".into(),
            policy_topic: "control.policy.v1".into(),
            evidence_topic: "control.evidence.v1".into(),
            create_topics: true,
            topic_partitions: 4,
            topic_replication: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(t: &str, p: i32, o: i64) -> SourcePos {
        SourcePos { topic: t.into(), partition: p, offset: o }
    }

    #[test]
    fn commit_point_waits_for_the_oldest_unfinished_message() {
        let t = OffsetTracker::default();
        for o in 0..5 {
            t.consumed(&pos("a", 0, o), Some([o as u8; 16]));
        }
        t.consumed(&pos("a", 1, 7), None);
        // Partition 1 started at 7 (its committed offset): that is its point;
        // partition 0 has nothing finished.
        assert_eq!(t.commit_points(), vec![("a".into(), 1, 7)]);
        // 1 and 2 are done (DLQ; block), 0 is not: nothing can be committed.
        t.finish(&pos("a", 0, 1));
        t.finish_nonces([&[2u8; 16]]);
        assert!(t.commit_points().is_empty());
        t.finish_nonces([&[0u8; 16]]);
        assert_eq!(t.commit_points(), vec![("a".into(), 0, 3)]);
        assert!(t.commit_points().is_empty(), "only changes are reported");
        t.finish(&pos("a", 1, 7));
        t.finish_nonces([&[3u8; 16], &[4u8; 16]]);
        assert_eq!(t.commit_points(), vec![("a".into(), 0, 5), ("a".into(), 1, 8)]);
        // A failed commit is handed out again.
        t.commit_failed(&[("a".into(), 1, 8)]);
        assert_eq!(t.commit_points(), vec![("a".into(), 1, 8)]);
        assert_eq!(t.unfinished(), 0);
    }

    #[test]
    fn a_redelivered_copy_is_finished_with_its_original_and_dropping_one_copy_keeps_the_other() {
        let t = OffsetTracker::default();
        t.consumed(&pos("a", 0, 0), Some([9; 16]));
        t.consumed(&pos("a", 0, 1), Some([9; 16]));
        // The copy is dropped as a duplicate of the pending tx: the original
        // still holds the commit point.
        t.finish(&pos("a", 0, 1));
        assert!(t.commit_points().is_empty());
        t.finish_nonces([&[9u8; 16]]);
        assert_eq!(t.commit_points(), vec![("a".into(), 0, 2)]);
    }
}
