//! The verification pipeline of one shard:
//! known producer → content hash → nonce layout → timestamp skew →
//! batched Ed25519 → payload rules.
//! (Decoding and size limits happen at the source.) Every verdict here is a
//! function of the bytes and the configuration (and, for stale/future, the
//! arrival time): the same on every validator. Nonce reuse, duplicates and
//! the per-producer rate limit are judged against committed state by the
//! core and the state machine, so no validator's verdict differs from
//! another's (see `reject`).
//!
//! Shards are chosen by a hash of the nonce, so one tx and its resends are
//! always checked by the same shard.

use crate::protocol::crypto::{self, BatchItem, PublicKey};
use crate::protocol::event::{parse_payload, signed_len, write_signed_bytes, Event};
use crate::protocol::mempool::VerifiedTx;
use crate::protocol::reject::{RejectReason, Rejection};
use crate::protocol::source::SourcePos;
use crate::{sha256, Hash32};
use foldhash::HashSet;
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

/// What every shard checks against (shared, read-only).
#[derive(Debug, Clone)]
pub struct VerifyPolicy {
    pub producers: HashSet<PublicKey>,
    pub skew_ms: u64,
}

/// Per-shard verifier state.
pub struct Verifier {
    policy: Arc<VerifyPolicy>,
}

/// Shard index for a nonce (stable across runs and validators).
pub fn shard_of(nonce: &[u8; 16], shards: usize) -> usize {
    // The last 4 bytes are random per event; mix in the rest for safety.
    let h = u64::from_le_bytes(nonce[8..16].try_into().unwrap())
        ^ u64::from_le_bytes(nonce[..8].try_into().unwrap()).rotate_left(17);
    (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % shards
}

fn reject(inc: &Incoming, reason: RejectReason, detail: String) -> Rejection {
    Rejection {
        reason,
        detail,
        origin: inc.origin.to_string(),
        original: inc.event.encode(),
        pos: inc.pos.clone(),
        height: None,
    }
}

impl Verifier {
    pub fn new(policy: Arc<VerifyPolicy>) -> Self {
        Verifier { policy }
    }

    /// Verifies a batch at wall-clock time `wall_ms` (the timestamp skew
    /// check); admitted txs are stamped `received_ms` (the core's monotonic
    /// clock). Every input ends up in exactly one of `admitted` or `rejected`.
    pub fn process(
        &mut self,
        batch: Vec<Incoming>,
        wall_ms: u64,
        received_ms: u64,
        admitted: &mut Vec<VerifiedTx>,
        rejected: &mut Vec<Rejection>,
    ) {
        let p = &*self.policy;
        // Cheap checks first; keep survivors with their signed bytes.
        let mut cand: Vec<(Incoming, Vec<u8>)> = Vec::with_capacity(batch.len());
        for inc in batch {
            if let Err((reason, detail)) = precheck(p, &inc.event, wall_ms) {
                rejected.push(reject(&inc, reason, detail));
                continue;
            }
            let ev = &inc.event;
            let mut sb = Vec::with_capacity(signed_len(ev.kind.domain().len()));
            write_signed_bytes(&mut sb, ev.kind.domain(), ev.timestamp_ms, &ev.nonce, &ev.id, &ev.content_hash);
            cand.push((inc, sb));
        }
        // One batched signature check for all survivors.
        let verdicts = {
            let items: Vec<BatchItem> = cand
                .iter()
                .map(|(inc, sb)| BatchItem { key: &inc.event.producer, msg: sb, sig: &inc.event.signature })
                .collect();
            crypto::verify_batch(&items)
        };
        for ((inc, sb), verdict) in cand.into_iter().zip(verdicts) {
            if let Err(e) = verdict {
                rejected.push(reject(&inc, RejectReason::BadSignature, e.to_string()));
                continue;
            }
            if let Err(d) = parse_payload(inc.event.kind, &inc.event.payload) {
                rejected.push(reject(&inc, RejectReason::InvalidPayload, d));
                continue;
            }
            let tx_hash: Hash32 = sha256(&sb);
            admitted.push(VerifiedTx { event: Arc::new(inc.event), tx_hash, received_ms, pos: inc.pos });
        }
    }
}

/// The checks before the signature: known producer, content hash, nonce
/// layout, timestamp within the skew tolerance of `now_ms`.
pub fn precheck(p: &VerifyPolicy, ev: &Event, now_ms: u64) -> Result<(), (RejectReason, String)> {
    if !p.producers.contains(&ev.producer) {
        return Err((
            RejectReason::UnknownProducer,
            format!("producer {} is not configured", hex::encode(ev.producer)),
        ));
    }
    if sha256(&ev.payload) != ev.content_hash {
        return Err((RejectReason::ContentHashMismatch, "content_hash is not SHA-256(payload)".into()));
    }
    if ev.nonce[..8] != ev.timestamp_ms.to_be_bytes() || ev.nonce[8..12] != ev.producer[..4] {
        return Err((
            RejectReason::NonceMismatch,
            "nonce must be u64 BE timestamp_ms || producer key[0..4] || 4 random bytes".into(),
        ));
    }
    if ev.timestamp_ms + p.skew_ms < now_ms {
        let d =
            format!("timestamp {} is {} ms old, tolerance {} ms", ev.timestamp_ms, now_ms - ev.timestamp_ms, p.skew_ms);
        return Err((RejectReason::Stale, d));
    }
    if ev.timestamp_ms > now_ms + p.skew_ms {
        let d = format!(
            "timestamp {} is {} ms ahead, tolerance {} ms",
            ev.timestamp_ms,
            ev.timestamp_ms - now_ms,
            p.skew_ms
        );
        return Err((RejectReason::Future, d));
    }
    Ok(())
}

/// Full check of events this validator has not verified itself (txs in
/// another validator's proposal): precheck, one batched signature check,
/// payload rules. Returns the first failure with the tx's index.
pub fn verify_events(p: &VerifyPolicy, events: &[&Event], now_ms: u64) -> Result<(), (usize, RejectReason, String)> {
    match verify_each(p, events, now_ms).into_iter().enumerate().find_map(|(i, v)| v.err().map(|e| (i, e))) {
        Some((i, (r, d))) => Err((i, r, d)),
        None => Ok(()),
    }
}

/// The verdict on each event (in order): precheck at `now_ms`, one batched
/// signature check for those that pass it, payload rules.
pub fn verify_each(p: &VerifyPolicy, events: &[&Event], now_ms: u64) -> Vec<Result<(), (RejectReason, String)>> {
    let mut verdicts: Vec<Result<(), (RejectReason, String)>> =
        events.iter().map(|ev| precheck(p, ev, now_ms)).collect();
    let mut signed = Vec::with_capacity(events.len());
    let mut idx = Vec::with_capacity(events.len());
    for (i, ev) in events.iter().enumerate().filter(|(i, _)| verdicts[*i].is_ok()) {
        let mut sb = Vec::with_capacity(signed_len(ev.kind.domain().len()));
        write_signed_bytes(&mut sb, ev.kind.domain(), ev.timestamp_ms, &ev.nonce, &ev.id, &ev.content_hash);
        signed.push(sb);
        idx.push(i);
    }
    let items: Vec<BatchItem> = idx
        .iter()
        .zip(&signed)
        .map(|(&i, sb)| BatchItem { key: &events[i].producer, msg: sb, sig: &events[i].signature })
        .collect();
    for (&i, v) in idx.iter().zip(crypto::verify_batch(&items)) {
        verdicts[i] = match v {
            Err(e) => Err((RejectReason::BadSignature, e.to_string())),
            Ok(_) => parse_payload(events[i].kind, &events[i].payload)
                .map(|_| ())
                .map_err(|d| (RejectReason::InvalidPayload, d)),
        };
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::event::{sample_anomaly_payload, Event, TxKind};

    const NOW: u64 = 1_800_000_000_000;

    struct Fx {
        key: crypto::SigningKey,
        v: Verifier,
    }

    fn fx() -> Fx {
        let key = crypto::generate_key();
        let policy = VerifyPolicy { producers: [crypto::public_key(&key)].into_iter().collect(), skew_ms: 300_000 };
        Fx { key, v: Verifier::new(Arc::new(policy)) }
    }

    fn ev(k: &crypto::SigningKey, i: u64, ts: u64) -> Event {
        Event::sign(
            TxKind::Anomaly,
            k,
            (i as u128).to_be_bytes(),
            sample_anomaly_payload(i, 300),
            ts,
            (i as u32).to_be_bytes(),
        )
    }

    fn run(v: &mut Verifier, evs: Vec<Event>) -> (Vec<VerifiedTx>, Vec<Rejection>) {
        let (mut a, mut r) = (vec![], vec![]);
        v.process(
            evs.into_iter()
                .map(|event| Incoming { event, origin: "test".into(), pos: None, received_ms: NOW })
                .collect(),
            NOW,
            NOW,
            &mut a,
            &mut r,
        );
        (a, r)
    }

    #[test]
    fn every_reason_is_detected() {
        let mut f = fx();
        let good = ev(&f.key, 1, NOW);
        let mut unknown = ev(&crypto::generate_key(), 2, NOW);
        unknown.nonce[8..12].copy_from_slice(&unknown.producer[..4]);
        let mut hash = ev(&f.key, 3, NOW);
        hash.payload[0] ^= 1;
        let mut nonce = ev(&f.key, 4, NOW);
        nonce.nonce[9] ^= 1;
        let stale = ev(&f.key, 5, NOW - 301_000);
        let future = ev(&f.key, 6, NOW + 301_000);
        let mut sig = ev(&f.key, 7, NOW);
        sig.signature[5] ^= 1;
        let payload = Event::sign(TxKind::Anomaly, &f.key, [8; 16], vec![0x08, 0x00], NOW, [8; 4]);
        // An exact resend is no verdict of a shard's: the core drops it as a
        // duplicate of the pending or committed tx (same tx hash).
        let resend = good.clone();
        let (a, r) = run(&mut f.v, vec![good.clone(), unknown, hash, nonce, stale, future, sig, payload, resend]);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|t| t.tx_hash == good.tx_hash()));
        let reasons: Vec<_> = r.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            vec![
                RejectReason::UnknownProducer,
                RejectReason::ContentHashMismatch,
                RejectReason::NonceMismatch,
                RejectReason::Stale,
                RejectReason::Future,
                RejectReason::BadSignature,
                RejectReason::InvalidPayload,
            ]
        );
        // The original bytes travel with the rejection.
        assert!(Event::decode(TxKind::Anomaly, &r[0].original, &Default::default()).is_ok());
    }

    #[test]
    fn forged_event_does_not_burn_the_nonce() {
        let mut f = fx();
        let good = ev(&f.key, 1, NOW);
        let mut forged = good.clone();
        forged.signature[0] ^= 1;
        let (a, r) = run(&mut f.v, vec![forged]);
        assert!(a.is_empty() && r[0].reason == RejectReason::BadSignature);
        let (a, _) = run(&mut f.v, vec![good]);
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn shards_spread() {
        let mut counts = [0usize; 4];
        for i in 0u32..4000 {
            let mut n = [0u8; 16];
            n[12..].copy_from_slice(&i.to_le_bytes());
            counts[shard_of(&n, 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }
}
