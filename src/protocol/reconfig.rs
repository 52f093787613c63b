//! Validator set changes (issue 21; the design is `docs/reconfiguration.md`):
//! the signed change, its canonical bytes, and the rules every replica
//! checks when it executes one. Pure: no clock, I/O or randomness.
//!
//! Wired in so far (the design's implementation order, step 1): the tx kind
//! (`TxKind::Reconfiguration`), its payload, and its execution, which
//! checks these rules against the state's epoch and set and records the
//! scheduled change in the state. Not yet: the switch at the scheduled
//! height (consensus keeps the genesis set), the runtime's and the
//! transport's view of the set, the CLI.
//!
//! The rule: a change is authorised by q = n − f signatures of the current
//! epoch's validators over [`signed_bytes`]; at most f changes an epoch; the
//! set after it keeps n ≥ [`MIN_VALIDATORS`] with unique ids and keys.

use crate::protocol::crypto::{self, PublicKey, Signature, SigningKey};
use crate::Hash32;
use std::collections::{BTreeMap, BTreeSet};

/// Domain separation of the signed bytes.
pub const DOMAIN: &[u8] = b"cybermesh.reconfig.v1";
/// The smallest set a change may leave (f ≥ 1).
pub const MIN_VALIDATORS: usize = 4;

/// Validator id → public key, in id order.
pub type ValidatorSet = BTreeMap<u32, PublicKey>;

/// Most changes one tx may carry, and most signatures (far above any f and
/// n in use; a bound on what a decoder accepts).
pub const MAX_CHANGES: usize = 64;
pub const MAX_SIGNATURES: usize = 256;

/// What execution needs to judge a change: the chain's identity, the set
/// of epoch 0 (genesis), and the checkpoint interval and PBFT window that
/// place switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRules {
    pub chain: Hash32,
    pub genesis: ValidatorSet,
    pub checkpoint_interval: u64,
    pub window: u64,
}

/// An epoch's set and where it starts: the state's record of the current
/// epoch, and of the scheduled one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub epoch: u64,
    /// Heights above this one are ordered by this set (0 for genesis).
    pub from_height: u64,
    pub validators: ValidatorSet,
}

impl Epoch {
    /// `u64 BE epoch ‖ u64 BE from_height ‖ (u32 BE id ‖ key (32))*` in id order.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + 36 * self.validators.len());
        v.extend_from_slice(&self.epoch.to_be_bytes());
        v.extend_from_slice(&self.from_height.to_be_bytes());
        for (id, key) in &self.validators {
            v.extend_from_slice(&id.to_be_bytes());
            v.extend_from_slice(key);
        }
        v
    }

    pub fn decode(b: &[u8]) -> Option<Epoch> {
        if b.len() < 16 || (b.len() - 16) % 36 != 0 {
            return None;
        }
        let epoch = u64::from_be_bytes(b[..8].try_into().ok()?);
        let from_height = u64::from_be_bytes(b[8..16].try_into().ok()?);
        let validators = b[16..]
            .chunks_exact(36)
            .map(|c| (u32::from_be_bytes(c[..4].try_into().expect("4 bytes")), c[4..].try_into().expect("32 bytes")))
            .collect();
        Some(Epoch { epoch, from_height, validators })
    }
}

impl Reconfiguration {
    /// From the tx payload, with every length checked (a decoder's error
    /// is the tx's `invalid_payload` detail).
    pub fn from_proto(p: crate::proto::ReconfigurationPayload) -> Result<Reconfiguration, String> {
        let chain: Hash32 =
            p.chain.as_slice().try_into().map_err(|_| format!("chain must be 32 bytes, got {}", p.chain.len()))?;
        if p.changes.len() > MAX_CHANGES || p.signatures.len() > MAX_SIGNATURES {
            return Err(format!(
                "{} changes and {} signatures; at most {MAX_CHANGES} and {MAX_SIGNATURES}",
                p.changes.len(),
                p.signatures.len()
            ));
        }
        let mut changes = Vec::with_capacity(p.changes.len());
        for c in p.changes {
            let kind = match crate::proto::ChangeKind::try_from(c.kind) {
                Ok(crate::proto::ChangeKind::Add) => ChangeKind::Add,
                Ok(crate::proto::ChangeKind::Remove) => ChangeKind::Remove,
                Ok(crate::proto::ChangeKind::Rotate) => ChangeKind::Rotate,
                _ => return Err(format!("change of validator {}: unknown kind {}", c.id, c.kind)),
            };
            let key: PublicKey = match (kind, c.public_key.len()) {
                (ChangeKind::Remove, 0) => [0; 32],
                (ChangeKind::Remove, n) => return Err(format!("removal of validator {} carries a {n}-byte key", c.id)),
                (_, 32) => c.public_key.as_slice().try_into().expect("32 bytes"),
                (_, n) => return Err(format!("validator {}'s key must be 32 bytes, got {n}", c.id)),
            };
            changes.push(Change { kind, id: c.id, key });
        }
        let mut signatures = Vec::with_capacity(p.signatures.len());
        for s in p.signatures {
            let sig: Signature =
                s.signature.as_slice().try_into().map_err(|_| {
                    format!("validator {}'s signature must be 64 bytes, got {}", s.id, s.signature.len())
                })?;
            signatures.push((s.id, sig));
        }
        Ok(Reconfiguration { chain, epoch: p.epoch, changes, signatures })
    }

    pub fn to_proto(&self) -> crate::proto::ReconfigurationPayload {
        crate::proto::ReconfigurationPayload {
            chain: self.chain.to_vec(),
            epoch: self.epoch,
            changes: self
                .changes
                .iter()
                .map(|c| crate::proto::ValidatorChange {
                    kind: match c.kind {
                        ChangeKind::Add => crate::proto::ChangeKind::Add,
                        ChangeKind::Remove => crate::proto::ChangeKind::Remove,
                        ChangeKind::Rotate => crate::proto::ChangeKind::Rotate,
                    } as i32,
                    id: c.id,
                    public_key: if c.kind == ChangeKind::Remove { vec![] } else { c.key.to_vec() },
                })
                .collect(),
            signatures: self
                .signatures
                .iter()
                .map(|(id, sig)| crate::proto::ReconfigurationSignature { id: *id, signature: sig.to_vec() })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    Add = 1,
    Remove = 2,
    Rotate = 3,
}

/// One change: `key` is the added validator's or the rotated one's new key
/// (all zero for a removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub id: u32,
    pub key: PublicKey,
}

/// A change of the set, with its signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconfiguration {
    /// The chain it is for: the genesis config hash.
    pub chain: Hash32,
    /// The epoch it changes (the current one when it executes).
    pub epoch: u64,
    pub changes: Vec<Change>,
    pub signatures: Vec<(u32, Signature)>,
}

/// Why a change is refused (every replica refuses it at the same height).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("signed for another chain")]
    WrongChain,
    #[error("changes epoch {got}, the current epoch is {current}")]
    StaleEpoch { got: u64, current: u64 },
    #[error("no changes")]
    Empty,
    #[error("{changes} changes in one epoch; at most f = {f}")]
    TooMany { changes: usize, f: usize },
    #[error("validator {id} is changed twice")]
    ChangedTwice { id: u32 },
    #[error("validator {id} is already in the set")]
    AlreadyIn { id: u32 },
    #[error("validator {id} is not in the set")]
    NotIn { id: u32 },
    #[error("a removal carries no key (validator {id})")]
    KeyOnRemoval { id: u32 },
    #[error("validator {id}'s key: {problem}")]
    BadKey { id: u32, problem: String },
    #[error("a key would be used by two validators ({a} and {b})")]
    KeyInUse { a: u32, b: u32 },
    #[error("the set would have {n} validators; at least {MIN_VALIDATORS}")]
    TooSmall { n: usize },
    #[error("{valid} valid signatures of current validators; {q} needed")]
    TooFewSignatures { valid: usize, q: usize },
}

/// f and q of a set of n.
pub fn fault_tolerance(n: usize) -> (usize, usize) {
    let f = n.saturating_sub(1) / 3;
    (f, n - f)
}

/// The bytes each validator signs: `DOMAIN ‖ chain ‖ u64 BE epoch ‖
/// u32 BE count ‖ (u8 kind ‖ u32 BE id ‖ 32 B key)*`, changes in id order.
pub fn signed_bytes(chain: &Hash32, epoch: u64, changes: &[Change]) -> Vec<u8> {
    let mut sorted = changes.to_vec();
    sorted.sort_by_key(|c| (c.id, c.kind));
    let mut v = Vec::with_capacity(DOMAIN.len() + 44 + 37 * sorted.len());
    v.extend_from_slice(DOMAIN);
    v.extend_from_slice(chain);
    v.extend_from_slice(&epoch.to_be_bytes());
    v.extend_from_slice(&(sorted.len() as u32).to_be_bytes());
    for c in &sorted {
        v.push(c.kind as u8);
        v.extend_from_slice(&c.id.to_be_bytes());
        v.extend_from_slice(&c.key);
    }
    v
}

/// A validator's signature of a change.
pub fn sign(key: &SigningKey, chain: &Hash32, epoch: u64, changes: &[Change]) -> Signature {
    crypto::sign(key, &signed_bytes(chain, epoch, changes))
}

/// Checks `rc` against the chain, the current epoch and its set; returns
/// the next epoch's set.
pub fn check(rc: &Reconfiguration, chain: &Hash32, epoch: u64, set: &ValidatorSet) -> Result<ValidatorSet, Refused> {
    if rc.chain != *chain {
        return Err(Refused::WrongChain);
    }
    if rc.epoch != epoch {
        return Err(Refused::StaleEpoch { got: rc.epoch, current: epoch });
    }
    if rc.changes.is_empty() {
        return Err(Refused::Empty);
    }
    let (f, q) = fault_tolerance(set.len());
    if rc.changes.len() > f {
        return Err(Refused::TooMany { changes: rc.changes.len(), f });
    }
    let mut next = set.clone();
    let mut seen = BTreeSet::new();
    for c in &rc.changes {
        if !seen.insert(c.id) {
            return Err(Refused::ChangedTwice { id: c.id });
        }
        match c.kind {
            ChangeKind::Add if set.contains_key(&c.id) => return Err(Refused::AlreadyIn { id: c.id }),
            ChangeKind::Remove | ChangeKind::Rotate if !set.contains_key(&c.id) => {
                return Err(Refused::NotIn { id: c.id })
            }
            ChangeKind::Remove if c.key != [0; 32] => return Err(Refused::KeyOnRemoval { id: c.id }),
            ChangeKind::Remove => {
                next.remove(&c.id);
            }
            ChangeKind::Add | ChangeKind::Rotate => {
                crypto::check_public_key(&c.key).map_err(|e| Refused::BadKey { id: c.id, problem: e.to_string() })?;
                next.insert(c.id, c.key);
            }
        }
    }
    if next.len() < MIN_VALIDATORS {
        return Err(Refused::TooSmall { n: next.len() });
    }
    // A key used twice in the next set, or an old key coming back under
    // another id, would let one signer count twice.
    let mut by_key: BTreeMap<PublicKey, u32> = BTreeMap::new();
    for (id, key) in set.iter().chain(next.iter()) {
        if let Some(&other) = by_key.get(key) {
            if other != *id {
                return Err(Refused::KeyInUse { a: other.min(*id), b: other.max(*id) });
            }
        }
        by_key.insert(*key, *id);
    }
    let valid = valid_signers(rc, set);
    if valid < q {
        return Err(Refused::TooFewSignatures { valid, q });
    }
    Ok(next)
}

/// How many distinct validators of `set` signed `rc` validly (over its own
/// chain and epoch: `check` compares those with the current ones first).
pub fn valid_signers(rc: &Reconfiguration, set: &ValidatorSet) -> usize {
    let msg = signed_bytes(&rc.chain, rc.epoch, &rc.changes);
    let mut signers = BTreeSet::new();
    for (id, sig) in &rc.signatures {
        let Some(key) = set.get(id) else { continue };
        if !signers.contains(id) && crypto::verify_one(key, &msg, sig).is_ok() {
            signers.insert(*id);
        }
    }
    signers.len()
}

/// The epoch whose set orders (and certifies) block `height` among
/// `epochs` (oldest first, from genesis): the last one starting below it.
pub fn certifying(epochs: &[Epoch], height: u64) -> Option<&Epoch> {
    epochs.iter().rev().find(|e| e.from_height < height || e.epoch == 0)
}

/// The height a change executed at `height` takes effect after: the first
/// multiple of the checkpoint interval at least one interval and one PBFT
/// window later. The window matters for safety: a replica orders seqs up
/// to its stable checkpoint plus the window, and a stable checkpoint needs
/// execution, so no honest replica can have ordered a seq above the switch
/// height before it executed the change (and capped its replica there).
pub fn switch_height(height: u64, checkpoint_interval: u64, window: u64) -> u64 {
    assert!(checkpoint_interval > 0, "a checkpoint interval of 0");
    (height + checkpoint_interval.max(window)).div_ceil(checkpoint_interval) * checkpoint_interval
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(keys: &[SigningKey]) -> ValidatorSet {
        keys.iter().enumerate().map(|(i, k)| (i as u32 + 1, crypto::public_key(k))).collect()
    }

    fn signed(
        keys: &[SigningKey],
        signers: &[usize],
        chain: Hash32,
        epoch: u64,
        changes: Vec<Change>,
    ) -> Reconfiguration {
        let signatures = signers.iter().map(|&i| (i as u32 + 1, sign(&keys[i], &chain, epoch, &changes))).collect();
        Reconfiguration { chain, epoch, changes, signatures }
    }

    #[test]
    fn a_quorum_of_the_current_set_adds_removes_and_rotates() {
        let keys: Vec<SigningKey> = (0..4).map(|_| crypto::generate_key()).collect();
        let set = set_of(&keys);
        let chain = [7; 32];
        let new = crypto::public_key(&crypto::generate_key());
        let add = vec![Change { kind: ChangeKind::Add, id: 5, key: new }];
        let next = check(&signed(&keys, &[0, 1, 2], chain, 3, add.clone()), &chain, 3, &set).unwrap();
        assert_eq!(next.len(), 5);
        assert_eq!(next[&5], new);
        // Five validators: f = 1, q = 4; removing one leaves four.
        let rm = vec![Change { kind: ChangeKind::Remove, id: 2, key: [0; 32] }];
        let mut keys5 = keys.clone();
        keys5.push(crypto::generate_key());
        let set5 = set_of(&keys5);
        assert_eq!(
            check(&signed(&keys5, &[0, 1, 2], chain, 4, rm.clone()), &chain, 4, &set5),
            Err(Refused::TooFewSignatures { valid: 3, q: 4 })
        );
        let next = check(&signed(&keys5, &[0, 2, 3, 4], chain, 4, rm), &chain, 4, &set5).unwrap();
        assert!(!next.contains_key(&2) && next.len() == 4);
        let rotated = crypto::public_key(&crypto::generate_key());
        let rot = vec![Change { kind: ChangeKind::Rotate, id: 1, key: rotated }];
        let next = check(&signed(&keys, &[1, 2, 3], chain, 3, rot), &chain, 3, &set).unwrap();
        assert_eq!(next[&1], rotated);
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let keys: Vec<SigningKey> = (0..4).map(|_| crypto::generate_key()).collect();
        let set = set_of(&keys);
        let chain = [7; 32];
        let k = |i: u8| crypto::public_key(&SigningKey::from_bytes(&[i; 32]));
        let add = |id| Change { kind: ChangeKind::Add, id, key: k(id as u8) };
        let rm = |id| Change { kind: ChangeKind::Remove, id, key: [0; 32] };
        let all = [0, 1, 2, 3];
        let try_ = |rc: Reconfiguration| check(&rc, &chain, 3, &set);
        assert_eq!(try_(signed(&keys, &all, [8; 32], 3, vec![add(5)])), Err(Refused::WrongChain));
        assert_eq!(try_(signed(&keys, &all, chain, 2, vec![add(5)])), Err(Refused::StaleEpoch { got: 2, current: 3 }));
        assert_eq!(try_(signed(&keys, &all, chain, 3, vec![])), Err(Refused::Empty));
        assert_eq!(
            try_(signed(&keys, &all, chain, 3, vec![add(5), add(6)])),
            Err(Refused::TooMany { changes: 2, f: 1 })
        );
        assert_eq!(try_(signed(&keys, &all, chain, 3, vec![add(2)])), Err(Refused::AlreadyIn { id: 2 }));
        assert_eq!(try_(signed(&keys, &all, chain, 3, vec![rm(9)])), Err(Refused::NotIn { id: 9 }));
        assert_eq!(try_(signed(&keys, &all, chain, 3, vec![rm(4)])), Err(Refused::TooSmall { n: 3 }));
        let reuse = Change { kind: ChangeKind::Add, id: 5, key: set[&1] };
        assert_eq!(try_(signed(&keys, &all, chain, 3, vec![reuse])), Err(Refused::KeyInUse { a: 1, b: 5 }));
        let bad = Change { kind: ChangeKind::Remove, id: 4, key: [1; 32] };
        assert_eq!(try_(signed(&keys, &all, chain, 3, vec![bad])), Err(Refused::KeyOnRemoval { id: 4 }));
        // Two signatures of one validator, a signature of a stranger and a
        // forged one count once, never, never.
        let mut rc = signed(&keys, &[0, 1], chain, 3, vec![add(5)]);
        rc.signatures.push(rc.signatures[0]);
        rc.signatures.push((9, sign(&crypto::generate_key(), &chain, 3, &rc.changes)));
        rc.signatures.push((3, [0; 64]));
        assert_eq!(try_(rc), Err(Refused::TooFewSignatures { valid: 2, q: 3 }));
        // Seven validators (f = 2): two changes, one of each kind.
        let keys7: Vec<SigningKey> = (0..7).map(|_| crypto::generate_key()).collect();
        let set7 = set_of(&keys7);
        let both = vec![rm(7), Change { kind: ChangeKind::Rotate, id: 1, key: k(42) }];
        let next = check(&signed(&keys7, &[0, 1, 2, 3, 4], chain, 1, both), &chain, 1, &set7).unwrap();
        assert_eq!((next.len(), next[&1]), (6, k(42)));
    }

    #[test]
    fn the_signed_bytes_are_fixed_and_independent_of_the_changes_order() {
        let a = Change { kind: ChangeKind::Add, id: 5, key: [0xaa; 32] };
        let r = Change { kind: ChangeKind::Remove, id: 2, key: [0; 32] };
        let bytes = signed_bytes(&[1; 32], 9, &[a, r]);
        assert_eq!(bytes, signed_bytes(&[1; 32], 9, &[r, a]));
        let mut want = b"cybermesh.reconfig.v1".to_vec();
        want.extend_from_slice(&[1; 32]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 2]);
        want.extend_from_slice(&[2, 0, 0, 0, 2]);
        want.extend_from_slice(&[0; 32]);
        want.extend_from_slice(&[1, 0, 0, 0, 5]);
        want.extend_from_slice(&[0xaa; 32]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn the_payload_round_trips_and_bad_lengths_are_named() {
        use prost::Message;
        let keys: Vec<SigningKey> = (0..4).map(|_| crypto::generate_key()).collect();
        let changes = vec![
            Change { kind: ChangeKind::Rotate, id: 2, key: [5; 32] },
            Change { kind: ChangeKind::Remove, id: 3, key: [0; 32] },
        ];
        let rc = signed(&keys, &[0, 1, 2], [1; 32], 6, changes);
        let bytes = rc.to_proto().encode_to_vec();
        let back = Reconfiguration::from_proto(crate::proto::ReconfigurationPayload::decode(&bytes[..]).unwrap());
        assert_eq!(back, Ok(rc.clone()));
        let broken = |f: &dyn Fn(&mut crate::proto::ReconfigurationPayload)| {
            let mut p = rc.to_proto();
            f(&mut p);
            Reconfiguration::from_proto(p).unwrap_err()
        };
        assert!(broken(&|p| p.chain.pop().map(drop).unwrap_or(())).contains("chain must be 32 bytes"));
        assert!(broken(&|p| p.changes[0].public_key.truncate(31)).contains("validator 2's key must be 32 bytes"));
        assert!(broken(&|p| p.changes[1].public_key = vec![1; 32]).contains("removal of validator 3"));
        assert!(broken(&|p| p.changes[0].kind = 9).contains("unknown kind 9"));
        assert!(broken(&|p| p.signatures[0].signature.clear()).contains("signature must be 64 bytes"));
        assert!(broken(&|p| p.signatures = vec![p.signatures[0].clone(); MAX_SIGNATURES + 1]).contains("at most"));
    }

    #[test]
    fn an_epoch_record_round_trips_and_a_torn_one_is_refused() {
        let e = Epoch { epoch: 3, from_height: 48, validators: [(1, [1; 32]), (7, [7; 32])].into_iter().collect() };
        let b = e.encode();
        assert_eq!(b.len(), 16 + 2 * 36);
        assert_eq!(Epoch::decode(&b), Some(e));
        assert_eq!(Epoch::decode(&b[..b.len() - 1]), None);
        assert_eq!(Epoch::decode(&b[..15]), None);
    }

    #[test]
    fn the_switch_is_at_least_one_checkpoint_interval_and_window_later_on_a_checkpoint() {
        assert_eq!(switch_height(1, 16, 16), 32);
        assert_eq!(switch_height(16, 16, 16), 32);
        assert_eq!(switch_height(17, 16, 16), 48);
        assert_eq!(switch_height(31, 16, 8), 48);
        assert_eq!(switch_height(1, 8, 16), 24);
        for h in 0..200 {
            for (interval, window) in [(16, 16), (8, 16), (16, 4), (4, 20)] {
                let s = switch_height(h, interval, window);
                let lead = u64::max(interval, window);
                assert!(s % interval == 0 && s >= h + lead && s < h + lead + interval, "{h} -> {s}");
            }
        }
    }
}
