//! Egress: the signed events a validator publishes about committed blocks.
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

use crate::block::Block;
use crate::consensus::pbft::CommitCert;
use crate::crypto::{self, PublicKey, SigningKey};
use crate::event::TxKind;
use crate::proto;

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
pub fn commit_event(
    block: &Block,
    cert: Option<&CommitCert>,
    validators: &[PublicKey],
    key: &SigningKey,
) -> proto::CommitEvent {
    let h = &block.header;
    let block_hash = block.hash();
    let certificate = cert.map(|c| proto::CommitCertificate {
        height: h.height,
        view: c.pre_prepare.body.view,
        block_hash: block_hash.to_vec(),
        value_digest: c.pre_prepare.body.digest.to_vec(),
        signatures: c
            .commits
            .iter()
            .filter_map(|v| {
                let k = validators.get(v.from)?;
                Some(proto::ValidatorSignature { public_key: k.to_vec(), signature: v.sig.clone() })
            })
            .collect(),
    });
    let mut e = proto::CommitEvent {
        height: h.height,
        block_hash: block_hash.to_vec(),
        state_root: h.state_root.to_vec(),
        tx_count: h.tx_count,
        anomaly_ids: block.txs.iter().filter(|t| t.kind == TxKind::Anomaly).map(|t| t.id.to_vec()).collect(),
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
/// validators' commit votes for the height (`validators`: the set's keys).
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
    let msg = commit_vote_bytes(c.view, c.height, &c.value_digest);
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

/// Acknowledged heights, reported by the producer's delivery callbacks.
#[derive(Default)]
pub struct Acks {
    acked: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    failed: std::sync::atomic::AtomicBool,
}

impl rdkafka::ClientContext for Acks {}

impl rdkafka::producer::ProducerContext for Acks {
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &rdkafka::producer::DeliveryResult<'_>, height: usize) {
        match r {
            Ok(_) => {
                self.acked.lock().expect("acks lock").insert(height as u64);
            }
            Err((e, _)) => {
                // Only fatal errors end here (retries are unbounded): the
                // cursor stops before this height; a restart republishes.
                self.failed.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(height, error = %e, "commit event not delivered");
            }
        }
    }
}

/// The publisher thread: sends the core's encoded commit events (in height
/// order) with an idempotent producer, advances the cursor over contiguous
/// acknowledgements and writes it at most every 100 ms.
pub fn publish_loop(
    k: &crate::config::KafkaConfig,
    rx: std::sync::mpsc::Receiver<(u64, Vec<u8>)>,
    cursor_path: std::path::PathBuf,
    mut cursor: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let producer: ThreadedProducer<Acks> = crate::ingest::kafka::client_config(k)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "2")
        .create_with_context(Acks::default())
        .context("creating the commit-event producer")?;
    let topic = k.commits_topic.clone();
    let mut written = cursor;
    let mut last_write = std::time::Instant::now();
    loop {
        let got = rx.recv_timeout(Duration::from_millis(100));
        let done = match &got {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
            _ => stop.load(Ordering::Relaxed) && got.is_err(),
        };
        if let Ok((height, bytes)) = got {
            let key = height.to_string();
            let mut record = BaseRecord::with_opaque_to(&topic, height as usize).payload(&bytes[..]).key(&key);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        record = back;
                        producer.poll(Duration::from_millis(20));
                    }
                    Err((e, _)) => {
                        tracing::error!(height, error = %e, "commit event refused by the producer; stopping the publisher (a restart resumes at the cursor)");
                        return Ok(());
                    }
                }
            }
        }
        if done {
            let _ = producer.flush(Duration::from_secs(5));
        }
        let acks = producer.context();
        if !acks.failed.load(Ordering::Relaxed) {
            let mut a = acks.acked.lock().expect("acks lock");
            while a.remove(&(cursor + 1)) {
                cursor += 1;
            }
        }
        if cursor != written && (done || last_write.elapsed() >= Duration::from_millis(100)) {
            crate::runtime::write_atomically(&cursor_path, cursor.to_string().as_bytes())
                .with_context(|| format!("writing the commit-event cursor {}", cursor_path.display()))?;
            tracing::debug!(height = cursor, "commit events published");
            written = cursor;
            last_write = std::time::Instant::now();
        }
        if done {
            return Ok(());
        }
    }
}
