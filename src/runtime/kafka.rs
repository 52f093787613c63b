//! The Kafka consumer thread: messages → decoded events → per-shard
//! batches, like the direct source's readers, with offsets committed from
//! the [`OffsetTracker`] and partitions paused while the shards are full.

use super::Shared;
use crate::edges::kafka::OffsetTracker;
use crate::protocol::event::Event;
use crate::protocol::event::TxKind;
use crate::protocol::reject::{RejectReason, Rejection};
use crate::protocol::source::SourcePos;
use crate::protocol::verify::shard_of;
use crate::protocol::verify::Incoming;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often finished offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(500);

pub(super) fn consumer_loop(consumer: BaseConsumer, tracker: Arc<OffsetTracker>, sh: &Shared) {
    let n = sh.shard_in.len();
    let mut batches: Vec<Vec<Incoming>> = (0..n).map(|_| Vec::with_capacity(sh.batch)).collect();
    // Batches the shards had no room for: partitions stay paused until they fit.
    let mut held: VecDeque<(usize, Vec<Incoming>)> = VecDeque::new();
    let mut paused = false;
    let mut last_commit = Instant::now();
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    let mut last_error = Instant::now() - Duration::from_secs(60);
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            commit(&consumer, &tracker, CommitMode::Sync);
            return;
        }
        while let Some((i, b)) = held.pop_front() {
            if let Err(b) = sh.shard_in[i].try_push(b) {
                held.push_front((i, b));
                break;
            }
        }
        match (held.is_empty(), paused) {
            (false, false) => {
                if let Ok(a) = consumer.assignment() {
                    paused = consumer.pause(&a).is_ok();
                    tracing::debug!("verify shards full: Kafka partitions paused");
                }
            }
            (true, true) => {
                if let Ok(a) = consumer.assignment() {
                    paused = consumer.resume(&a).is_err();
                }
            }
            _ => {}
        }
        // Block briefly for the first message, then take what is ready.
        let mut wait = if held.is_empty() { Duration::from_millis(100) } else { Duration::from_millis(20) };
        let mut taken = 0;
        // Registered with the tracker before any of it reaches a shard (a
        // message must be known unfinished before anything can finish it).
        let mut consumed: Vec<(SourcePos, Option<[u8; 16]>)> = Vec::new();
        let mut rejected: Vec<Rejection> = Vec::new();
        while taken < sh.batch * n {
            let Some(r) = consumer.poll(wait) else { break };
            wait = Duration::ZERO;
            taken += 1;
            let m = match r {
                Ok(m) => m,
                Err(e) => {
                    if last_error.elapsed() >= Duration::from_secs(5) {
                        last_error = Instant::now();
                        tracing::warn!(error = %e, "Kafka consumer error (retrying)");
                    }
                    continue;
                }
            };
            sh.stats.received.fetch_add(1, Ordering::Relaxed);
            if let Some(ts) = m.timestamp().to_millis() {
                let age = super::now_ms().saturating_sub(ts.max(0) as u64);
                sh.stats.latencies.kafka_consume.observe(age as f64);
            }
            let topic = topics.entry(m.topic().to_string()).or_insert_with(|| m.topic().into()).clone();
            let pos = SourcePos { topic: topic.clone(), partition: m.partition(), offset: m.offset() };
            let payload = m.payload().unwrap_or_default();
            let decoded = match TxKind::from_topic(&pos.topic) {
                None => Err((RejectReason::Malformed, format!("topic {} carries no known event kind", pos.topic))),
                Some(_) if payload.len() > sh.limits.max_event_bytes => Err((
                    RejectReason::Oversized,
                    format!("message of {} bytes exceeds {}", payload.len(), sh.limits.max_event_bytes),
                )),
                Some(kind) => Event::decode(kind, payload, &sh.limits),
            };
            match decoded {
                Ok(event) => {
                    consumed.push((pos.clone(), Some(event.nonce)));
                    let i = shard_of(&event.nonce, n);
                    // The origin names the topic; the position travels in `pos`.
                    let received_ms = super::mono_ms();
                    batches[i].push(Incoming { event, origin: topic, pos: Some(pos), received_ms });
                }
                Err((reason, detail)) => {
                    consumed.push((pos.clone(), None));
                    rejected.push(Rejection {
                        reason,
                        detail,
                        origin: topic.to_string(),
                        original: payload.to_vec(),
                        pos: Some(pos),
                        height: None,
                    });
                }
            }
        }
        tracker.consumed_all(&consumed);
        for r in rejected {
            let _ = sh.dlq.send(r);
        }
        for (i, b) in batches.iter_mut().enumerate() {
            if !b.is_empty() {
                held.push_back((i, std::mem::replace(b, Vec::with_capacity(sh.batch))));
            }
        }
        if last_commit.elapsed() >= COMMIT_EVERY {
            last_commit = Instant::now();
            commit(&consumer, &tracker, CommitMode::Async);
            sh.stats.kafka_unfinished.store(tracker.unfinished() as u64, Ordering::Relaxed);
        }
    }
}

fn commit(consumer: &BaseConsumer, tracker: &OffsetTracker, mode: CommitMode) {
    let points = tracker.commit_points();
    if points.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in &points {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!(error = %e, "bad offset to commit");
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => tracing::debug!(partitions = points.len(), "Kafka offsets committed"),
        Err(e) => {
            tracker.commit_failed(&points);
            tracing::warn!(error = %e, "Kafka offset commit failed (retried)");
        }
    }
}
