//! Genesis ceremony (sans-I/O): every validator proves it runs the same
//! consensus configuration and validator set before consensus starts.
//!
//! * config hash = SHA-256 of the canonical text of every consensus-relevant
//!   setting (`config_fingerprint`); peer hash = SHA-256 of the sorted
//!   `(id, public key)` list;
//! * each validator broadcasts a signed ready attestation
//!   (`"cybermesh.genesis.ready.v1" ‖ u32 BE id ‖ config hash ‖ peer hash ‖ u64 BE timestamp_ms`);
//! * with attestations from all N validators, matching hashes and
//!   timestamps within the skew tolerance (15 min by default), the ceremony
//!   yields a genesis certificate, persisted by the caller and re-verified on
//!   every restart; a mismatch aborts with an error naming the hash and the
//!   validator.

use crate::protocol::clock::Now;
use crate::protocol::crypto::{self, PublicKey, Signature, SigningKey};
use crate::{sha256, Hash32};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadyAttestation {
    pub validator: u32,
    #[serde(with = "hex32")]
    pub config_hash: Hash32,
    #[serde(with = "hex32")]
    pub peer_hash: Hash32,
    pub timestamp_ms: u64,
    #[serde(with = "hex64")]
    pub signature: Signature,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenesisCertificate {
    #[serde(with = "hex32")]
    pub config_hash: Hash32,
    #[serde(with = "hex32")]
    pub peer_hash: Hash32,
    /// Latest attestation time: the chain's genesis time.
    pub genesis_time_ms: u64,
    pub attestations: Vec<ReadyAttestation>,
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let b = hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)?;
        b.try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}
mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let b = hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)?;
        b.try_into().map_err(|_| serde::de::Error::custom("expected 64 bytes"))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GenesisError {
    #[error("validator {validator} has a different {which} ({theirs}) from ours ({ours}): its configuration or validator set differs; make every validator's consensus settings and CONSENSUS_NODES/VALIDATOR_<n>_PUBKEY_HEX identical")]
    Mismatch { validator: u32, which: &'static str, ours: String, theirs: String },
    #[error("attestation from unknown validator {0}")]
    UnknownValidator(u32),
    #[error("attestation of validator {0} has a bad signature")]
    BadSignature(u32),
    #[error("attestation of validator {validator} is {skew_ms} ms away from our clock (tolerance {tolerance_ms} ms, GENESIS_CLOCK_SKEW_TOLERANCE); synchronise the clocks (NTP)")]
    ClockSkew { validator: u32, skew_ms: u64, tolerance_ms: u64 },
    #[error("genesis certificate lacks an attestation from validator {0}")]
    Missing(u32),
}

/// Hash of the sorted validator set.
pub fn peer_hash(validators: &BTreeMap<u32, PublicKey>) -> Hash32 {
    let mut v = b"cybermesh.peers.v1".to_vec();
    for (id, k) in validators {
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(k);
    }
    sha256(&v)
}

fn signed_bytes(validator: u32, config_hash: &Hash32, peer_hash: &Hash32, ts: u64) -> Vec<u8> {
    let mut v = b"cybermesh.genesis.ready.v1".to_vec();
    v.extend_from_slice(&validator.to_be_bytes());
    v.extend_from_slice(config_hash);
    v.extend_from_slice(peer_hash);
    v.extend_from_slice(&ts.to_be_bytes());
    v
}

/// One validator's side of the ceremony.
pub struct Ceremony {
    me: u32,
    config_hash: Hash32,
    peer_hash: Hash32,
    validators: BTreeMap<u32, PublicKey>,
    skew_ms: u64,
    got: BTreeMap<u32, ReadyAttestation>,
}

impl Ceremony {
    pub fn new(me: u32, config_hash: Hash32, validators: BTreeMap<u32, PublicKey>, skew_ms: u64) -> Self {
        assert!(validators.contains_key(&me), "own id is in the validator set");
        Ceremony { me, config_hash, peer_hash: peer_hash(&validators), validators, skew_ms, got: BTreeMap::new() }
    }

    /// Our attestation at `now_ms` (broadcast it, and again every refresh interval).
    pub fn attest(&mut self, key: &SigningKey, now_ms: u64) -> ReadyAttestation {
        let a = ReadyAttestation {
            validator: self.me,
            config_hash: self.config_hash,
            peer_hash: self.peer_hash,
            timestamp_ms: now_ms,
            signature: crypto::sign(key, &signed_bytes(self.me, &self.config_hash, &self.peer_hash, now_ms)),
        };
        self.got.insert(self.me, a.clone());
        a
    }

    fn check(&self, a: &ReadyAttestation, now_ms: u64) -> Result<(), GenesisError> {
        let key = self.validators.get(&a.validator).ok_or(GenesisError::UnknownValidator(a.validator))?;
        crypto::verify_one(key, &signed_bytes(a.validator, &a.config_hash, &a.peer_hash, a.timestamp_ms), &a.signature)
            .map_err(|_| GenesisError::BadSignature(a.validator))?;
        let skew = a.timestamp_ms.abs_diff(now_ms);
        if skew > self.skew_ms {
            return Err(GenesisError::ClockSkew { validator: a.validator, skew_ms: skew, tolerance_ms: self.skew_ms });
        }
        if a.config_hash != self.config_hash {
            return Err(GenesisError::Mismatch {
                validator: a.validator,
                which: "config hash",
                ours: hex::encode(self.config_hash),
                theirs: hex::encode(a.config_hash),
            });
        }
        if a.peer_hash != self.peer_hash {
            return Err(GenesisError::Mismatch {
                validator: a.validator,
                which: "peer hash",
                ours: hex::encode(self.peer_hash),
                theirs: hex::encode(a.peer_hash),
            });
        }
        Ok(())
    }

    /// A peer's attestation. A mismatch is fatal (abort startup); skew and
    /// bad signatures are reported and the attestation ignored.
    pub fn on_attestation(
        &mut self,
        a: ReadyAttestation,
        now_ms: u64,
    ) -> Result<Option<GenesisCertificate>, GenesisError> {
        self.check(&a, now_ms)?;
        self.got.insert(a.validator, a);
        if self.got.len() < self.validators.len() {
            return Ok(None);
        }
        Ok(Some(GenesisCertificate {
            config_hash: self.config_hash,
            peer_hash: self.peer_hash,
            genesis_time_ms: self.got.values().map(|a| a.timestamp_ms).max().unwrap_or(0),
            attestations: self.got.values().cloned().collect(),
        }))
    }

    /// Validators whose attestation is still missing.
    pub fn waiting_for(&self) -> Vec<u32> {
        self.validators.keys().filter(|id| !self.got.contains_key(id)).copied().collect()
    }
}

/// Re-verifies a persisted certificate against the current configuration
/// (restart with the same config reuses it; any change is named).
pub fn verify_certificate(
    cert: &GenesisCertificate,
    config_hash: &Hash32,
    validators: &BTreeMap<u32, PublicKey>,
) -> Result<(), GenesisError> {
    let ph = peer_hash(validators);
    if cert.config_hash != *config_hash {
        return Err(GenesisError::Mismatch {
            validator: u32::MAX,
            which: "config hash (against the stored genesis certificate)",
            ours: hex::encode(config_hash),
            theirs: hex::encode(cert.config_hash),
        });
    }
    if cert.peer_hash != ph {
        return Err(GenesisError::Mismatch {
            validator: u32::MAX,
            which: "peer hash (against the stored genesis certificate)",
            ours: hex::encode(ph),
            theirs: hex::encode(cert.peer_hash),
        });
    }
    for (id, key) in validators {
        let a = cert.attestations.iter().find(|a| a.validator == *id).ok_or(GenesisError::Missing(*id))?;
        if a.config_hash != cert.config_hash || a.peer_hash != cert.peer_hash {
            return Err(GenesisError::Mismatch {
                validator: *id,
                which: "config hash",
                ours: hex::encode(cert.config_hash),
                theirs: hex::encode(a.config_hash),
            });
        }
        crypto::verify_one(key, &signed_bytes(*id, &a.config_hash, &a.peer_hash, a.timestamp_ms), &a.signature)
            .map_err(|_| GenesisError::BadSignature(*id))?;
    }
    Ok(())
}

/// A finished validator answers a late one's attestation with its own at
/// most once per this gap (two finished validators answering each other
/// stop at once: the answer to an answer arrives within the gap).
pub const GENESIS_REPLY_GAP_MS: u64 = 1000;
/// The first rebroadcast of our attestation; it doubles up to the refresh
/// interval (a reply can be lost on a connection the peer is replacing).
pub const GENESIS_FIRST_RETRY_MS: u64 = 1000;

/// What the host must do for the genesis phase, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenesisOutput {
    /// Send our attestation to validator `to` (`None`: to every peer).
    Attest { to: Option<u32>, attestation: ReadyAttestation },
    /// The ceremony completed: write the certificate durably (consensus
    /// starts now; a restart reuses it).
    Complete(GenesisCertificate),
    /// The ready timeout passed again with these validators still silent.
    StillWaiting(Vec<u32>),
}

/// The genesis phase of a validator (sans-I/O): broadcasts its attestation
/// with backoff until the ceremony completes, then answers late peers.
/// Timers run on the monotonic clock, attestation times on the wall clock.
pub struct Genesis {
    ceremony: Ceremony,
    key: SigningKey,
    done: bool,
    refresh_ms: u64,
    timeout_ms: u64,
    next_broadcast_ms: u64,
    backoff_ms: u64,
    next_warn_ms: u64,
    /// Monotonic time of the last answer to each validator (bounded by the
    /// validator set: attestations from others are refused before).
    replied_ms: BTreeMap<u32, u64>,
}

impl Genesis {
    /// `done`: a stored certificate matched this configuration (see
    /// `recovery::genesis_certificate`); the phase then only answers.
    pub fn new(ceremony: Ceremony, key: SigningKey, done: bool, refresh_ms: u64, timeout_ms: u64, now: Now) -> Self {
        Genesis {
            ceremony,
            key,
            done,
            refresh_ms: refresh_ms.max(GENESIS_FIRST_RETRY_MS),
            timeout_ms,
            next_broadcast_ms: now.mono_ms,
            backoff_ms: GENESIS_FIRST_RETRY_MS / 2,
            next_warn_ms: now.mono_ms + timeout_ms,
            replied_ms: BTreeMap::new(),
        }
    }

    pub fn done(&self) -> bool {
        self.done
    }

    /// When `on_tick` next has work (`u64::MAX`: never again).
    pub fn poll_timeout_ms(&self) -> u64 {
        if self.done {
            u64::MAX
        } else {
            self.next_broadcast_ms.min(self.next_warn_ms)
        }
    }

    pub fn on_tick(&mut self, now: Now, out: &mut Vec<GenesisOutput>) {
        if self.done {
            return;
        }
        if now.mono_ms >= self.next_broadcast_ms {
            self.backoff_ms = (self.backoff_ms * 2).clamp(GENESIS_FIRST_RETRY_MS, self.refresh_ms);
            self.next_broadcast_ms = now.mono_ms + self.backoff_ms;
            out.push(GenesisOutput::Attest { to: None, attestation: self.ceremony.attest(&self.key, now.wall_ms) });
        }
        if now.mono_ms >= self.next_warn_ms {
            self.next_warn_ms = now.mono_ms + self.timeout_ms;
            out.push(GenesisOutput::StillWaiting(self.ceremony.waiting_for()));
        }
        debug_assert!(self.poll_timeout_ms() > now.mono_ms, "every due timer was rearmed");
    }

    /// A peer (re)connected: it may have restarted, so answer it again.
    pub fn on_peer_connected(&mut self, peer: u32) {
        self.replied_ms.remove(&peer);
    }

    /// An attestation received from validator `from`. Only a mismatch
    /// before the ceremony completed is returned (fatal: the
    /// configurations differ); other refusals are logged and dropped.
    pub fn on_attestation(
        &mut self,
        now: Now,
        from: u32,
        a: ReadyAttestation,
        out: &mut Vec<GenesisOutput>,
    ) -> Result<(), GenesisError> {
        if a.validator != from {
            tracing::warn!(
                peer = from,
                claimed = a.validator,
                "genesis attestation relayed by another validator; ignored"
            );
            return Ok(());
        }
        match self.ceremony.on_attestation(a, now.wall_ms) {
            Err(e @ GenesisError::Mismatch { .. }) if !self.done => return Err(e),
            Err(e) => {
                tracing::warn!(peer = from, error = %e, "genesis attestation refused");
                return Ok(());
            }
            Ok(Some(cert)) if !self.done => {
                self.done = true;
                out.push(GenesisOutput::Complete(cert));
            }
            Ok(_) => {}
        }
        if self.done && self.replied_ms.get(&from).is_none_or(|&t| now.mono_ms >= t + GENESIS_REPLY_GAP_MS) {
            self.replied_ms.insert(from, now.mono_ms);
            let attestation = self.ceremony.attest(&self.key, now.wall_ms);
            out.push(GenesisOutput::Attest { to: Some(from), attestation });
        }
        assert!(self.replied_ms.len() <= self.ceremony.validators.len(), "one answer time per validator");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;
    const SKEW: u64 = 15 * 60_000;

    fn setup(n: u32) -> (Vec<SigningKey>, BTreeMap<u32, PublicKey>) {
        let keys: Vec<SigningKey> = (0..n).map(|_| crypto::generate_key()).collect();
        let set = keys.iter().enumerate().map(|(i, k)| (i as u32 + 1, crypto::public_key(k))).collect();
        (keys, set)
    }

    #[test]
    fn all_attest_yields_a_certificate_that_verifies_and_survives_serde() {
        let (keys, set) = setup(4);
        let ch = sha256(b"config");
        let mut cs: Vec<Ceremony> = (1..=4).map(|i| Ceremony::new(i, ch, set.clone(), SKEW)).collect();
        let atts: Vec<ReadyAttestation> =
            cs.iter_mut().zip(&keys).enumerate().map(|(i, (c, k))| c.attest(k, NOW + i as u64)).collect();
        let mut cert = None;
        for a in &atts[1..] {
            cert = cs[0].on_attestation(a.clone(), NOW).unwrap();
        }
        let cert = cert.expect("all four attested");
        assert_eq!(cert.genesis_time_ms, NOW + 3);
        verify_certificate(&cert, &ch, &set).unwrap();
        let json = serde_json::to_string(&cert).unwrap();
        let back: GenesisCertificate = serde_json::from_str(&json).unwrap();
        verify_certificate(&back, &ch, &set).unwrap();
        // Changed config on restart: named.
        let e = verify_certificate(&back, &sha256(b"other"), &set).unwrap_err();
        assert!(e.to_string().contains("config hash"), "{e}");
        let mut tampered = back.clone();
        tampered.attestations[2].timestamp_ms += 1;
        assert_eq!(verify_certificate(&tampered, &ch, &set), Err(GenesisError::BadSignature(3)));
    }

    #[test]
    fn mismatch_names_the_hash_and_the_validator() {
        let (keys, set) = setup(4);
        let mut mine = Ceremony::new(1, sha256(b"config"), set.clone(), SKEW);
        let mut theirs = Ceremony::new(3, sha256(b"config with another block size"), set.clone(), SKEW);
        let e = mine.on_attestation(theirs.attest(&keys[2], NOW), NOW).unwrap_err();
        assert!(matches!(e, GenesisError::Mismatch { validator: 3, which: "config hash", .. }), "{e}");
        let mut other_set = set.clone();
        other_set.insert(4, crypto::public_key(&crypto::generate_key()));
        let mut odd = Ceremony::new(2, sha256(b"config"), other_set, SKEW);
        let e = mine.on_attestation(odd.attest(&keys[1], NOW), NOW).unwrap_err();
        assert!(matches!(e, GenesisError::Mismatch { validator: 2, which: "peer hash", .. }), "{e}");
        assert!(e.to_string().contains("validator 2"));
    }

    #[test]
    fn skew_forgery_and_strangers_are_refused() {
        let (keys, set) = setup(4);
        let ch = sha256(b"c");
        let mut mine = Ceremony::new(1, ch, set.clone(), SKEW);
        let mut two = Ceremony::new(2, ch, set.clone(), SKEW);
        let late = two.attest(&keys[1], NOW - SKEW - 1);
        assert!(matches!(mine.on_attestation(late, NOW), Err(GenesisError::ClockSkew { validator: 2, .. })));
        let mut forged = two.attest(&keys[1], NOW);
        forged.validator = 4; // signed by 2, claims 4
        assert_eq!(mine.on_attestation(forged, NOW), Err(GenesisError::BadSignature(4)));
        let mut stranger = two.attest(&keys[1], NOW);
        stranger.validator = 9;
        assert_eq!(mine.on_attestation(stranger, NOW), Err(GenesisError::UnknownValidator(9)));
        assert_eq!(mine.waiting_for(), vec![1, 2, 3, 4]);
    }
    #[test]
    fn the_phase_backs_off_completes_once_and_answers_a_late_validator_once_per_gap() {
        let (keys, set) = setup(3);
        let ch = sha256(b"config");
        let at = |mono_ms: u64| Now { mono_ms, wall_ms: NOW + mono_ms };
        let mut gs: Vec<Genesis> = (1..=3u32)
            .map(|i| {
                let c = Ceremony::new(i, ch, set.clone(), SKEW);
                Genesis::new(c, keys[i as usize - 1].clone(), false, 8_000, 60_000, at(0))
            })
            .collect();
        // Validator 3 is silent: 1 and 2 broadcast at 0, 1 s, 3 s, 7 s, 15 s, 23 s (capped at the refresh).
        let mut sent_at = vec![];
        for t in (0..24_000).step_by(100) {
            if t >= gs[0].poll_timeout_ms() {
                let mut out = vec![];
                gs[0].on_tick(at(t), &mut out);
                if out.iter().any(|o| matches!(o, GenesisOutput::Attest { to: None, .. })) {
                    sent_at.push(t);
                }
            }
        }
        assert_eq!(sent_at, vec![0, 1_000, 3_000, 7_000, 15_000, 23_000]);
        // All three attest; each completes exactly once.
        let atts: Vec<ReadyAttestation> = (0..3).map(|i| gs[i].ceremony.attest(&keys[i], NOW)).collect();
        let mut certs = 0;
        for (i, g) in gs.iter_mut().enumerate() {
            for (j, a) in atts.iter().enumerate().filter(|(j, _)| *j != i) {
                let mut out = vec![];
                g.on_attestation(at(30_000), j as u32 + 1, a.clone(), &mut out).unwrap();
                certs += out.iter().filter(|o| matches!(o, GenesisOutput::Complete(_))).count();
            }
            assert!(g.done() && g.poll_timeout_ms() == u64::MAX);
        }
        assert_eq!(certs, 3);
        // A late (restarted) validator 3 is answered once per gap, and again at once after it reconnects.
        let answers = |g: &mut Genesis, t: u64| {
            let mut out = vec![];
            g.on_attestation(at(t), 3, atts[2].clone(), &mut out).unwrap();
            out.iter().filter(|o| matches!(o, GenesisOutput::Attest { to: Some(3), .. })).count()
        };
        assert_eq!(answers(&mut gs[0], 40_000), 1);
        assert_eq!(answers(&mut gs[0], 40_500), 0, "within the gap");
        gs[0].on_peer_connected(3);
        assert_eq!(answers(&mut gs[0], 40_600), 1, "it reconnected");
        assert_eq!(answers(&mut gs[0], 41_600), 1, "the gap passed");
        // Relayed attestations are ignored.
        let mut out = vec![];
        gs[0].on_attestation(at(50_000), 2, atts[2].clone(), &mut out).unwrap();
        assert!(out.is_empty());
    }
}
