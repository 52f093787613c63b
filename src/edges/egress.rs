//! Egress: the signed events a validator publishes about committed blocks.
//!
//! Per block, in this order, each signed by the publishing validator over the
//! fixed layout documented in `control_events.proto`:
//! * `CommitEvent` on `CONTROL_COMMITS_TOPIC`, key = height;
//! * `ReputationEvent` on `CONTROL_REPUTATION_TOPIC` for every producer with
//!   a tx in the block (totals after it; reputation = accepted / (accepted +
//!   rejected)), key = producer key (hex);
//! * then, per tx in block order: a `PolicyUpdateEvent` on
//!   `CONTROL_POLICY_TOPIC` for every policy tx the state machine applied,
//!   key = policy_id; an `EvidenceRequestEvent` on `CONTROL_EVIDENCE_TOPIC`
//!   for every anomaly applied with severity ≥ 8 and confidence < 0.7 (high
//!   impact, low certainty), key = anomaly id (hex).
//!
//! One `CommitEvent` per block on `control.commits.v1`, keyed by the height
//! (decimal string), signed by the publishing validator and carrying the
//! block's PBFT commit certificate, so a consumer checks both that this
//! validator vouches for the block and that a quorum committed the height.
//! Every validator publishes its own event per height: a consumer keeps one
//! per (height, public_key), and a repeat after a restart is recognisable
//! as such. Events are published from the block store in height order from
//! a persisted cursor (`commits.cursor`): a restart neither skips a height
//! nor republishes more than the few acknowledged after the cursor's last
//! write.

use crate::proto;
use crate::protocol::block::Block;
use crate::protocol::consensus::pbft::CommitCert;
use crate::protocol::crypto::{self, PublicKey, SigningKey};
use crate::protocol::event::TxKind;
use crate::protocol::reconfig::Epoch;

pub const COMMITS_DOMAIN: &str = "control.commits.v1";

/// The bytes a `CommitEvent`'s signature covers (see the proto).
pub fn commit_signed_bytes(e: &proto::CommitEvent) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + COMMITS_DOMAIN.len() + 8 + 32 + 32 + 8 + 4);
    v.push(COMMITS_DOMAIN.len() as u8);
    v.extend_from_slice(COMMITS_DOMAIN.as_bytes());
    v.extend_from_slice(&e.height.to_be_bytes());
    v.extend_from_slice(&e.block_hash);
    v.extend_from_slice(&e.state_root);
    v.extend_from_slice(&e.timestamp_ms.to_be_bytes());
    v.extend_from_slice(&e.tx_count.to_be_bytes());
    v
}

/// The signed commit event of `block`; `cert` is None for blocks committed
/// by a lone validator (N = 1).
/// `outcome` (None for blocks stored without one) names the txs execution
/// refused or found repeated: they are not listed among the ids.
pub fn commit_event(
    block: &Block,
    cert: Option<&CommitCert>,
    outcome: Option<&proto::BlockOutcome>,
    set: &Epoch,
    key: &SigningKey,
) -> proto::CommitEvent {
    let refused: std::collections::BTreeSet<u32> =
        outcome.map(|o| o.rejected.iter().map(|r| r.index).collect()).unwrap_or_default();
    let ids = |kind: TxKind| -> Vec<Vec<u8>> {
        block
            .txs
            .iter()
            .enumerate()
            .filter(|(i, t)| t.kind == kind && !refused.contains(&(*i as u32)))
            .map(|(_, t)| t.id.to_vec())
            .collect()
    };
    let h = &block.header;
    let block_hash = block.hash();
    let certificate = cert.map(|c| proto::CommitCertificate {
        height: h.height,
        view: c.pre_prepare.body.view,
        block_hash: block_hash.to_vec(),
        value_digest: c.pre_prepare.body.digest.to_vec(),
        epoch: set.epoch,
        signatures: c
            .commits
            .iter()
            .filter_map(|v| {
                let k = set.validators.values().nth(v.from)?;
                Some(proto::ValidatorSignature { public_key: k.to_vec(), signature: v.sig.clone() })
            })
            .collect(),
    });
    let mut e = proto::CommitEvent {
        height: h.height,
        block_hash: block_hash.to_vec(),
        state_root: h.state_root.to_vec(),
        tx_count: h.tx_count,
        anomaly_ids: ids(TxKind::Anomaly),
        evidence_ids: ids(TxKind::Evidence),
        policy_ids: ids(TxKind::Policy),
        timestamp_ms: h.timestamp_ms,
        signature: vec![],
        public_key: crypto::public_key(key).to_vec(),
        previous_hash: h.previous_hash.to_vec(),
        view: h.view,
        certificate,
    };
    e.signature = crypto::sign(key, &commit_signed_bytes(&e)).to_vec();
    e
}

/// The commit vote bytes each certificate signature covers.
pub fn commit_vote_bytes(view: u64, height: u64, value_digest: &[u8]) -> Vec<u8> {
    let mut v = b"pbft.commit".to_vec();
    v.extend_from_slice(&view.to_be_bytes());
    v.extend_from_slice(&height.to_be_bytes());
    v.extend_from_slice(value_digest);
    v
}

/// What a consumer checks: the publisher's signature, and `q` distinct
/// validators' commit votes for the height (`validators`: the keys of the
/// set of the certificate's epoch; the publisher must be among them).
pub fn verify_commit_event(e: &proto::CommitEvent, validators: &[PublicKey], q: usize) -> Result<(), String> {
    let pk: PublicKey = e.public_key.as_slice().try_into().map_err(|_| "public_key is not 32 bytes")?;
    if !validators.contains(&pk) {
        return Err("published by a key outside the validator set".into());
    }
    let sig: [u8; 64] = e.signature.as_slice().try_into().map_err(|_| "signature is not 64 bytes")?;
    crypto::verify_one(&pk, &commit_signed_bytes(e), &sig).map_err(|e| format!("publisher signature: {e}"))?;
    let Some(c) = &e.certificate else {
        return if validators.len() == 1 { Ok(()) } else { Err("no commit certificate".into()) };
    };
    if c.height != e.height || c.block_hash != e.block_hash {
        return Err("certificate is for another block".into());
    }
    let msg =
        crate::protocol::consensus::pbft::in_epoch(c.epoch, &commit_vote_bytes(c.view, c.height, &c.value_digest))
            .into_owned();
    let mut signers = std::collections::BTreeSet::new();
    for s in &c.signatures {
        let (Ok(k), Ok(sig)) =
            (<[u8; 32]>::try_from(s.public_key.as_slice()), <[u8; 64]>::try_from(s.signature.as_slice()))
        else {
            continue;
        };
        if validators.contains(&k) && crypto::verify_one(&k, &msg, &sig).is_ok() {
            signers.insert(k);
        }
    }
    if signers.len() < q {
        return Err(format!("{} valid commit signatures, {q} needed", signers.len()));
    }
    Ok(())
}

/// Severity from which an uncertain anomaly triggers an evidence request.
pub const EVIDENCE_MIN_SEVERITY: u32 = 8;
/// Confidence under which such an anomaly triggers one.
pub const EVIDENCE_MAX_CONFIDENCE: f64 = 0.7;

fn domain_prefix(domain: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.push(domain.len() as u8);
    v.extend_from_slice(domain.as_bytes());
    v
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

/// `u8 len ‖ "control.reputation.v1" ‖ producer (32) ‖ u64 BE accepted ‖
/// u64 BE rejected ‖ u64 BE height ‖ u64 BE timestamp_ms`.
pub fn reputation_signed_bytes(e: &proto::ReputationEvent) -> Vec<u8> {
    let mut v = domain_prefix(REPUTATION_DOMAIN);
    v.extend_from_slice(&e.producer_pubkey);
    for x in [e.accepted, e.rejected, e.height, e.timestamp_ms] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// `u8 len ‖ "control.policy.v1" ‖ u64 BE height ‖ tx_id (16) ‖ u64 BE
/// timestamp_ms ‖ (u32 BE len ‖ UTF-8) of policy_id, action, target, rule ‖
/// u64 BE ttl_seconds`.
pub fn policy_signed_bytes(e: &proto::PolicyUpdateEvent) -> Vec<u8> {
    let mut v = domain_prefix(POLICY_DOMAIN);
    v.extend_from_slice(&e.height.to_be_bytes());
    v.extend_from_slice(&e.tx_id);
    v.extend_from_slice(&e.timestamp_ms.to_be_bytes());
    for f in [&e.policy_id, &e.action, &e.target, &e.rule] {
        put_str(&mut v, f);
    }
    v.extend_from_slice(&e.ttl_seconds.to_be_bytes());
    v
}

/// `u8 len ‖ "control.evidence.v1" ‖ anomaly_id (16) ‖ u64 BE height ‖ u64
/// BE timestamp_ms ‖ u32 BE len ‖ reason (UTF-8)`.
pub fn evidence_request_signed_bytes(e: &proto::EvidenceRequestEvent) -> Vec<u8> {
    let mut v = domain_prefix(EVIDENCE_DOMAIN);
    v.extend_from_slice(&e.anomaly_id);
    v.extend_from_slice(&e.height.to_be_bytes());
    v.extend_from_slice(&e.timestamp_ms.to_be_bytes());
    put_str(&mut v, &e.reason);
    v
}

pub const REPUTATION_DOMAIN: &str = "control.reputation.v1";
pub const POLICY_DOMAIN: &str = "control.policy.v1";
pub const EVIDENCE_DOMAIN: &str = "control.evidence.v1";

/// One event to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: std::sync::Arc<str>,
    pub key: String,
    pub payload: Vec<u8>,
    /// Kafka headers (UTF-8 values): DLQ records only.
    pub headers: Vec<(&'static str, String)>,
}

/// Every event of one block; the cursor passes the height once all are
/// acknowledged.
#[derive(Debug, Clone)]
pub struct HeightEvents {
    pub height: u64,
    pub events: Vec<Outgoing>,
}

/// Makes a block's signed events (the validator's key, the topics).
pub struct EventMaker {
    key: SigningKey,
    /// Every set of the chain so far, oldest first: each block's
    /// certificate names the keys of its own epoch.
    epochs: Vec<Epoch>,
    /// Keys this validator held in earlier epochs and still holds (before
    /// a rotation: `node.key_file` while `next_key_file` signs).
    older: Vec<SigningKey>,
    commits: std::sync::Arc<str>,
    reputation: std::sync::Arc<str>,
    policy: std::sync::Arc<str>,
    evidence: std::sync::Arc<str>,
    dlq: std::sync::Arc<str>,
    /// This validator's id (the DLQ records' `validator_id` header).
    validator_id: String,
}

impl EventMaker {
    /// The set that certified block `height` (the last one starting below it).
    fn epoch_of(&self, height: u64) -> &Epoch {
        crate::protocol::reconfig::certifying(&self.epochs, height).expect("the genesis set first")
    }

    /// The same, also holding `keys` (this validator's keys of earlier
    /// epochs: blocks of those are signed with them).
    pub fn with_older_keys(mut self, keys: Vec<SigningKey>) -> Self {
        let current = crypto::public_key(&self.key);
        self.older = keys.into_iter().filter(|k| crypto::public_key(k) != current).collect();
        self
    }

    pub fn new(
        key: SigningKey,
        epochs: Vec<Epoch>,
        k: &crate::edges::kafka::KafkaConfig,
        validator_id: String,
    ) -> Self {
        assert!(epochs.first().is_some_and(|e| e.epoch == 0), "the genesis set first");
        EventMaker {
            key,
            epochs,
            older: vec![],
            commits: k.commits_topic.as_str().into(),
            reputation: k.reputation_topic.as_str().into(),
            policy: k.policy_topic.as_str().into(),
            evidence: k.evidence_topic.as_str().into(),
            dlq: k.dlq_topic.as_str().into(),
            validator_id,
        }
    }

    /// The DLQ record of the tx at `index` that execution refused: the
    /// same on every validator (a receipt of committed state), published
    /// with the block's events so a restart resumes it from the cursor.
    fn verdict_record(&self, block: &Block, index: usize, reason: &str) -> Option<Outgoing> {
        let tx = block.txs.get(index)?;
        let original = tx.encode();
        let height = block.header.height;
        let origin = format!("block/{height}");
        let headers = vec![
            ("reason", reason.to_string()),
            ("detail", format!("refused by execution at height {height}")),
            ("origin", origin.clone()),
            ("validator_id", self.validator_id.clone()),
            ("original_length", original.len().to_string()),
            ("original_sha256", hex::encode(crate::sha256(&original))),
        ];
        Some(Outgoing { topic: self.dlq.clone(), key: format!("{origin}/{index}"), payload: original, headers })
    }

    /// The block's events. `outcome` None (a block stored without one):
    /// only the commit event.
    pub fn for_block(
        &self,
        block: &Block,
        cert: Option<&CommitCert>,
        outcome: Option<&proto::BlockOutcome>,
    ) -> HeightEvents {
        use prost::Message as _;
        let h = &block.header;
        let (height, ts) = (h.height, h.timestamp_ms);
        let set = self.epoch_of(height);
        // Signed with this validator's key of the block's epoch when it holds
        // it (a block before a rotation, published after it), so a consumer
        // finds the publisher in that epoch's set.
        let held = |k: &&SigningKey| set.validators.values().any(|p| *p == crypto::public_key(k));
        let key = self.older.iter().find(held).unwrap_or(&self.key);
        let public = crypto::public_key(key);
        let mut events = vec![Outgoing {
            topic: self.commits.clone(),
            key: height.to_string(),
            payload: commit_event(block, cert, outcome, set, key).encode_to_vec(),
            headers: vec![],
        }];
        let Some(outcome) = outcome else { return HeightEvents { height, events } };
        let sign = |bytes: Vec<u8>| crypto::sign(key, &bytes).to_vec();
        for p in &outcome.producers {
            let total = p.accepted + p.rejected;
            let mut e = proto::ReputationEvent {
                producer_pubkey: p.producer.clone(),
                reputation: if total == 0 { 1.0 } else { p.accepted as f64 / total as f64 },
                accepted: p.accepted,
                rejected: p.rejected,
                height,
                timestamp_ms: ts,
                signature: vec![],
                public_key: public.to_vec(),
            };
            e.signature = sign(reputation_signed_bytes(&e));
            events.push(Outgoing {
                topic: self.reputation.clone(),
                key: hex::encode(&p.producer),
                payload: e.encode_to_vec(),
                headers: vec![],
            });
        }
        let refused: std::collections::BTreeSet<u32> = outcome.rejected.iter().map(|r| r.index).collect();
        for r in outcome.rejected.iter().filter(|r| r.reason != crate::protocol::state::REPEAT_REASON) {
            events.extend(self.verdict_record(block, r.index as usize, &r.reason));
        }
        for (i, tx) in block.txs.iter().enumerate() {
            if refused.contains(&(i as u32)) {
                continue;
            }
            match crate::protocol::event::parse_payload(tx.kind, &tx.payload) {
                Ok(crate::protocol::event::Payload::Policy(p)) => {
                    let mut e = proto::PolicyUpdateEvent {
                        policy_id: p.policy_id.clone(),
                        action: p.action,
                        target: p.target,
                        rule: p.rule,
                        ttl_seconds: p.ttl_seconds,
                        height,
                        tx_id: tx.id.to_vec(),
                        timestamp_ms: ts,
                        signature: vec![],
                        public_key: public.to_vec(),
                    };
                    e.signature = sign(policy_signed_bytes(&e));
                    events.push(Outgoing {
                        topic: self.policy.clone(),
                        key: p.policy_id,
                        payload: e.encode_to_vec(),
                        headers: vec![],
                    });
                }
                Ok(crate::protocol::event::Payload::Anomaly(a))
                    if a.severity >= EVIDENCE_MIN_SEVERITY && a.confidence < EVIDENCE_MAX_CONFIDENCE =>
                {
                    let mut e = proto::EvidenceRequestEvent {
                        anomaly_id: tx.id.to_vec(),
                        reason: format!(
                            "severity {} with confidence {:.2}: more evidence needed",
                            a.severity, a.confidence
                        ),
                        height,
                        timestamp_ms: ts,
                        signature: vec![],
                        public_key: public.to_vec(),
                    };
                    e.signature = sign(evidence_request_signed_bytes(&e));
                    events.push(Outgoing {
                        topic: self.evidence.clone(),
                        key: hex::encode(tx.id),
                        payload: e.encode_to_vec(),
                        headers: vec![],
                    });
                }
                _ => {}
            }
        }
        HeightEvents { height, events }
    }
}

/// The persisted cursor: the highest height whose event the broker
/// acknowledged, with every height below it (0: none).
pub fn read_cursor(path: &std::path::Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Delivery bookkeeping: events still unacknowledged per height, and the
/// heights whose events are all acknowledged.
#[derive(Default)]
pub struct Acks {
    state: std::sync::Mutex<(std::collections::BTreeMap<u64, usize>, std::collections::BTreeSet<u64>)>,
    failed: std::sync::atomic::AtomicBool,
    /// When each height's events were sent, for `kafka_produce_latency_ms`.
    sent: std::sync::Mutex<std::collections::HashMap<u64, std::time::Instant>>,
    latency: Option<prometheus::Histogram>,
}

impl rdkafka::ClientContext for Acks {}

impl rdkafka::producer::ProducerContext for Acks {
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &rdkafka::producer::DeliveryResult<'_>, height: usize) {
        match r {
            Ok(_) => {
                let mut g = self.state.lock().expect("acks lock");
                let h = height as u64;
                if let Some(n) = g.0.get_mut(&h) {
                    *n -= 1;
                    if *n == 0 {
                        g.0.remove(&h);
                        g.1.insert(h);
                        if let (Some(t), Some(l)) = (self.sent.lock().expect("sent lock").remove(&h), &self.latency) {
                            l.observe(t.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                }
            }
            Err((e, _)) => {
                // Only fatal errors end here (retries are unbounded): the
                // cursor stops before this height; a restart republishes.
                self.failed.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(height, error = %e, "event not delivered");
            }
        }
    }
}

/// The publisher thread: sends the core's events (in height order) with an
/// idempotent producer, advances the cursor over heights whose events are
/// all acknowledged and writes it at most every 100 ms.
pub fn publish_loop(
    k: &crate::edges::kafka::KafkaConfig,
    rx: std::sync::mpsc::Receiver<HeightEvents>,
    cursor_path: std::path::PathBuf,
    mut cursor: u64,
    stop: &std::sync::atomic::AtomicBool,
    latency: prometheus::Histogram,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let producer: ThreadedProducer<Acks> = crate::edges::kafka::client_config(k)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "2")
        .create_with_context(Acks { latency: Some(latency), ..Acks::default() })
        .context("creating the event producer")?;
    let mut written = cursor;
    let mut last_write = std::time::Instant::now();
    loop {
        let got = rx.recv_timeout(Duration::from_millis(100));
        let done = match &got {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
            _ => stop.load(Ordering::Relaxed) && got.is_err(),
        };
        if let Ok(batch) = got {
            let height = batch.height;
            producer.context().state.lock().expect("acks lock").0.insert(height, batch.events.len());
            producer.context().sent.lock().expect("sent lock").insert(height, std::time::Instant::now());
            for ev in &batch.events {
                let mut record =
                    BaseRecord::with_opaque_to(&ev.topic, height as usize).payload(&ev.payload[..]).key(&ev.key);
                if !ev.headers.is_empty() {
                    use rdkafka::message::{Header, OwnedHeaders};
                    let h = ev
                        .headers
                        .iter()
                        .fold(OwnedHeaders::new(), |h, (key, v)| h.insert(Header { key, value: Some(v.as_str()) }));
                    record = record.headers(h);
                }
                if let Err(e) = crate::edges::kafka::send_when_queued(&producer, record, Duration::from_millis(20)) {
                    tracing::error!(height, error = %e, topic = %ev.topic, "event refused by the producer; stopping the publisher (a restart resumes at the cursor)");
                    return Ok(());
                }
            }
        }
        if done {
            let _ = producer.flush(Duration::from_secs(5));
        }
        let acks = producer.context();
        if !acks.failed.load(Ordering::Relaxed) {
            let mut g = acks.state.lock().expect("acks lock");
            while g.1.remove(&(cursor + 1)) {
                cursor += 1;
            }
        }
        if cursor != written && (done || last_write.elapsed() >= Duration::from_millis(100)) {
            crate::edges::framed::write_atomically(&cursor_path, cursor.to_string().as_bytes())
                .with_context(|| format!("writing the event cursor {}", cursor_path.display()))?;
            tracing::debug!(height = cursor, "events published");
            written = cursor;
            last_write = std::time::Instant::now();
        }
        if done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::block::{tx_root, BlockHeader};
    use crate::protocol::event::Event;
    use prost::Message as _;
    use std::sync::Arc;

    fn sign_ok(pk: &[u8], sig: &[u8], msg: &[u8]) -> bool {
        let (Ok(pk), Ok(sig)) = (<[u8; 32]>::try_from(pk), <[u8; 64]>::try_from(sig)) else { return false };
        crypto::verify_one(&pk, msg, &sig).is_ok()
    }

    #[test]
    fn a_block_yields_its_commit_reputation_policy_and_evidence_request_events_signed() {
        let (vkey, producer) = (crypto::generate_key(), crypto::generate_key());
        let anomaly = |sev: u32, conf: f64, i: u8| {
            let p = proto::AnomalyPayload {
                anomaly_type: "ddos".into(),
                severity: sev,
                confidence: conf,
                ..Default::default()
            };
            Arc::new(Event::sign(TxKind::Anomaly, &producer, [i; 16], p.encode_to_vec(), 1000, [i; 4]))
        };
        let pol = proto::PolicyPayload {
            policy_id: "block-1".into(),
            action: "block".into(),
            target: "10.0.0.1".into(),
            rule: "deny".into(),
            ttl_seconds: 60,
        };
        let txs = vec![
            anomaly(9, 0.4, 1), // flagged
            anomaly(9, 0.9, 2), // confident: no request
            anomaly(3, 0.1, 3), // low severity: no request
            Arc::new(Event::sign(TxKind::Policy, &producer, [4; 16], pol.encode_to_vec(), 1000, [4; 4])),
            anomaly(10, 0.1, 5), // flagged but refused by the state machine
            anomaly(10, 0.1, 1), // a repeat of tx 0 (committed before)
        ];
        let hashes: Vec<_> = txs.iter().map(|t| t.tx_hash()).collect();
        let header = BlockHeader {
            height: 7,
            view: 0,
            timestamp_ms: 2000,
            previous_hash: [1; 32],
            tx_root: tx_root(&hashes),
            state_root: [2; 32],
            proposer: crypto::public_key(&vkey),
            tx_count: txs.len() as u32,
        };
        let block = Block { header, txs, tx_hashes: hashes };
        let outcome = proto::BlockOutcome {
            rejected: vec![
                proto::TxRejection { index: 4, reason: "duplicate_id".into() },
                proto::TxRejection { index: 5, reason: crate::protocol::state::REPEAT_REASON.into() },
            ],
            producers: vec![proto::ProducerTotals {
                producer: crypto::public_key(&producer).to_vec(),
                accepted: 12,
                rejected: 4,
            }],
        };
        let set = Epoch { epoch: 0, from_height: 0, validators: [(1, crypto::public_key(&vkey))].into() };
        let maker = EventMaker::new(vkey.clone(), vec![set], &Default::default(), "1".into());
        let mut out = maker.for_block(&block, None, Some(&outcome));
        assert_eq!(out.height, 7);
        let topics: Vec<&str> = out.events.iter().map(|e| &*e.topic).collect();
        // Commit, reputation, the refusal's DLQ record (not the repeat's),
        // then per tx in block order (the flagged anomaly is tx 0, the policy tx 3).
        assert_eq!(
            topics,
            ["control.commits.v1", "control.reputation.v1", "ai.dlq.v1", "control.evidence.v1", "control.policy.v1"]
        );
        let c = proto::CommitEvent::decode(&out.events[0].payload[..]).unwrap();
        verify_commit_event(&c, &[crypto::public_key(&vkey)], 1).unwrap();
        // Only applied txs are listed: not the refused one, not the repeat.
        assert_eq!(c.anomaly_ids, vec![vec![1u8; 16], vec![2u8; 16], vec![3u8; 16]]);
        assert_eq!(c.policy_ids, vec![vec![4u8; 16]]);
        assert_eq!(c.tx_count, 6);
        let d = out.events.remove(2);
        let h: std::collections::HashMap<_, _> = d.headers.iter().cloned().collect();
        assert_eq!(
            (h["reason"].as_str(), h["origin"].as_str(), h["validator_id"].as_str()),
            ("duplicate_id", "block/7", "1")
        );
        assert_eq!(d.payload, block.txs[4].encode(), "the original bytes");
        assert_eq!(h["original_sha256"], hex::encode(crate::sha256(&d.payload)));
        assert_eq!(d.key, "block/7/4");
        let r = proto::ReputationEvent::decode(&out.events[1].payload[..]).unwrap();
        assert_eq!((r.accepted, r.rejected, r.reputation), (12, 4, 0.75));
        assert!(sign_ok(&r.public_key, &r.signature, &reputation_signed_bytes(&r)));
        let p = proto::PolicyUpdateEvent::decode(&out.events[3].payload[..]).unwrap();
        assert_eq!((p.policy_id.as_str(), p.height, p.tx_id.as_slice()), ("block-1", 7, &[4u8; 16][..]));
        assert_eq!(out.events[3].key, "block-1");
        assert!(sign_ok(&p.public_key, &p.signature, &policy_signed_bytes(&p)));
        let e = proto::EvidenceRequestEvent::decode(&out.events[2].payload[..]).unwrap();
        assert_eq!(e.anomaly_id, vec![1u8; 16]);
        assert!(sign_ok(&e.public_key, &e.signature, &evidence_request_signed_bytes(&e)));
        // A changed field breaks the signature.
        let mut forged = p.clone();
        forged.target = "10.0.0.2".into();
        assert!(!sign_ok(&forged.public_key, &forged.signature, &policy_signed_bytes(&forged)));
        // Without an outcome (blocks stored before outcomes were kept): the commit event only.
        assert_eq!(maker.for_block(&block, None, None).events.len(), 1);
    }

    /// Across a key rotation: a block of the old epoch published after the
    /// switch is signed with the old key (the publisher its epoch's set
    /// names), one of the new epoch with the new key; each verifies against
    /// its own epoch's set only.
    #[test]
    fn each_block_is_published_with_the_key_of_its_epoch() {
        let (old, new) = (crypto::generate_key(), crypto::generate_key());
        let epochs = vec![
            Epoch { epoch: 0, from_height: 0, validators: [(1, crypto::public_key(&old))].into() },
            Epoch { epoch: 1, from_height: 16, validators: [(1, crypto::public_key(&new))].into() },
        ];
        let maker = EventMaker::new(new.clone(), epochs, &Default::default(), "1".into())
            .with_older_keys(vec![old.clone(), new.clone()]);
        let block = |height: u64| {
            let header = BlockHeader {
                height,
                view: 0,
                timestamp_ms: 2000,
                previous_hash: [1; 32],
                tx_root: tx_root(&[]),
                state_root: [2; 32],
                proposer: [0; 32],
                tx_count: 0,
            };
            Block { header, txs: vec![], tx_hashes: vec![] }
        };
        for (height, key, other) in [(16, &old, &new), (17, &new, &old)] {
            let out = maker.for_block(&block(height), None, None);
            let c = proto::CommitEvent::decode(&out.events[0].payload[..]).unwrap();
            assert_eq!(c.public_key, crypto::public_key(key).to_vec(), "block {height}");
            verify_commit_event(&c, &[crypto::public_key(key)], 1).unwrap();
            assert!(verify_commit_event(&c, &[crypto::public_key(other)], 1).is_err(), "block {height}");
        }
    }
}
