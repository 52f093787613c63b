//! The state's entries: one map split into [`SHARDS`] maps by a hash of
//! the key, plus an overlay for the writes made while a snapshot reads it.
//!
//! Stalls of the core thread this removes, each measured there: a
//! snapshot used to copy every entry (hundreds of thousands, on every
//! validator at the same height); then, with shards behind `Arc`s copied on
//! the first write after a snapshot, the copies were as bad spread over a
//! few blocks (2.4 M entries: 136 ms for the first block of 400 writes
//! after a freeze, over a second of the core thread in the next 20; the
//! tail of 120 s devnet runs); and the one big map's growth rehashed every
//! entry at once (`reserve_rehash` faulting in and zeroing tens of MB).
//!
//! Now [`Kv::freeze`] shares the shards with the snapshot writer (one
//! reference); while it holds them, writes go to the overlay (checked first
//! by lookups); once it lets go, each write moves a few overlay entries
//! back ([`SETTLE_PER_WRITE`]), so no write copies more than that. Shards
//! are sized by [`Spread`], so they do not all double together.
//!
//! Which shard holds a key changes nothing observable (it differs from run
//! to run): lookups are by key, and snapshots sort their entries.

use foldhash::{HashMap, HashMapExt};
use indexmap::IndexMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use super::spread::Spread;

/// Shards of the map (a power of two): a rehash touches 1/4096 of the
/// state.
pub const SHARDS: usize = 4096;

/// Overlay entries moved back into the shards per write once no snapshot
/// shares them: bounds the work any one write does, and empties the overlay
/// within a quarter as many writes as it holds.
pub const SETTLE_PER_WRITE: usize = 4;

type Shard = HashMap<Vec<u8>, Vec<u8>>;
/// Writes made while the shards were shared: `None` is a removal. Ordered
/// so the settling can take its last entry in O(1).
type Overlay = IndexMap<Vec<u8>, Option<Vec<u8>>, foldhash::fast::RandomState>;

#[derive(Clone)]
pub struct Kv {
    shards: Arc<Vec<Shard>>,
    overlay: Arc<Overlay>,
    len: usize,
    /// Picks a key's shard; randomly keyed like the shards' own hashers
    /// (producers choose keys).
    placement: foldhash::fast::RandomState,
    spread: Arc<Spread>,
}

impl Default for Kv {
    fn default() -> Self {
        Kv {
            shards: Arc::new((0..SHARDS).map(|_| Shard::new()).collect()),
            overlay: Arc::new(Overlay::default()),
            len: 0,
            placement: Default::default(),
            spread: Arc::new(Spread::new(SHARDS)),
        }
    }
}

impl Kv {
    fn shard_of(&self, key: &[u8]) -> usize {
        self.spread.shard(self.placement.hash_one(key))
    }

    pub fn get(&self, key: &[u8]) -> Option<&Vec<u8>> {
        if !self.overlay.is_empty() {
            if let Some(v) = self.overlay.get(key) {
                return v.as_ref();
            }
        }
        self.shards[self.shard_of(key)].get(key)
    }

    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Option<Vec<u8>> {
        let old = self.write(key, Some(value));
        self.len += usize::from(old.is_none());
        old
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        // Only a present key is worth an overlay entry.
        self.get(key)?;
        let old = self.write(key.to_vec(), None);
        self.len -= usize::from(old.is_some());
        old
    }

    /// Sets (`Some`) or removes (`None`) `key`; returns its value before.
    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let i = self.shard_of(&key);
        if Arc::get_mut(&mut self.shards).is_none() {
            // A snapshot reads the shards: leave them as they are.
            return match Arc::make_mut(&mut self.overlay).entry(key) {
                indexmap::map::Entry::Occupied(mut e) => e.insert(value),
                indexmap::map::Entry::Vacant(e) => {
                    let before = self.shards[i].get(e.key()).cloned();
                    e.insert(value);
                    before
                }
            };
        }
        self.settle();
        // A value written while shared is newer than the shard's.
        let overlaid = if self.overlay.is_empty() { None } else { Arc::make_mut(&mut self.overlay).swap_remove(&key) };
        let shards = Arc::get_mut(&mut self.shards).expect("checked unshared above");
        let before = match value {
            Some(v) => shards[i].insert(key, v),
            None => shards[i].remove(&key),
        };
        match overlaid {
            Some(v) => v,
            None => before,
        }
    }

    /// Moves up to [`SETTLE_PER_WRITE`] overlay entries into the shards
    /// (called only when they are not shared).
    fn settle(&mut self) {
        if self.overlay.is_empty() {
            return;
        }
        let overlay = Arc::make_mut(&mut self.overlay);
        for _ in 0..SETTLE_PER_WRITE {
            let Some((key, value)) = overlay.pop() else { break };
            let i = self.spread.shard(self.placement.hash_one(&key));
            let shard = &mut Arc::get_mut(&mut self.shards).expect("settled only when unshared")[i];
            match value {
                Some(v) => shard.insert(key, v),
                None => shard.remove(&key),
            };
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries written while a snapshot held the shards, not yet moved back.
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }

    /// The entries as they are now, for a reader elsewhere (a snapshot
    /// writer): costs two references, not a copy.
    pub fn freeze(&self) -> Frozen {
        Frozen { shards: self.shards.clone(), overlay: self.overlay.clone(), len: self.len }
    }
}

/// The entries of a [`Kv`] at one moment, shared with it: while this
/// exists the `Kv` writes beside the shards, not into them.
#[derive(Clone)]
pub struct Frozen {
    shards: Arc<Vec<Shard>>,
    overlay: Arc<Overlay>,
    len: usize,
}

impl Frozen {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Vec<u8>)> {
        let overlay = &self.overlay;
        let shadowed = move |k: &Vec<u8>| !overlay.is_empty() && overlay.contains_key(k);
        self.shards
            .iter()
            .flat_map(|s| s.iter())
            .filter(move |(k, _)| !shadowed(k))
            .chain(self.overlay.iter().filter_map(|(k, v)| v.as_ref().map(|v| (k, v))))
    }
}

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frozen({} entries)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn sorted(f: &Frozen) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let m: BTreeMap<_, _> = f.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(m.len(), f.iter().count(), "a key listed twice");
        assert_eq!(m.len(), f.len());
        m
    }

    #[test]
    fn a_frozen_view_keeps_its_moment_while_the_map_changes() {
        let mut kv = Kv::default();
        for i in 0u32..2000 {
            kv.insert(i.to_be_bytes().to_vec(), vec![1]);
        }
        let frozen = kv.freeze();
        for i in 0u32..1000 {
            kv.insert(i.to_be_bytes().to_vec(), vec![2]); // overwrite
            assert_eq!(kv.remove(&(i + 1000).to_be_bytes()), Some(vec![1]));
        }
        assert_eq!(kv.remove(b"absent"), None);
        kv.insert(b"new".to_vec(), vec![3]);
        assert_eq!((kv.len(), frozen.len()), (1001, 2000));
        assert_eq!(frozen.iter().count(), 2000);
        assert!(frozen.iter().all(|(_, v)| v == &vec![1]), "the frozen view saw a later write");
        assert_eq!(kv.get(&5u32.to_be_bytes()), Some(&vec![2]));
        assert_eq!(kv.get(&1500u32.to_be_bytes()), None);
        // Keys spread over the shards (none holds more than a few times its
        // share).
        drop(frozen);
        while kv.overlay_len() > 0 {
            kv.insert(b"new".to_vec(), vec![3]);
        }
        let most = kv.shards.iter().map(|s| s.len()).max().unwrap();
        assert!(most <= 8, "{most} of 1001 keys in one of {SHARDS} shards");
    }

    #[test]
    fn shared_shards_are_never_copied_and_the_overlay_drains_in_bounded_steps() {
        let mut kv = Kv::default();
        for i in 0u32..100 {
            kv.insert(i.to_be_bytes().to_vec(), vec![1]);
        }
        let shards = Arc::as_ptr(&kv.shards);
        let frozen = kv.freeze();
        for i in 0u32..100 {
            kv.insert(i.to_be_bytes().to_vec(), vec![2]);
        }
        assert_eq!(Arc::as_ptr(&kv.shards), shards, "copied the shards a snapshot holds");
        assert_eq!(kv.overlay_len(), 100);
        drop(frozen);
        kv.insert(b"x".to_vec(), vec![3]);
        assert_eq!(kv.overlay_len(), 100 - SETTLE_PER_WRITE, "each write moves a bounded number back");
        assert_eq!(Arc::as_ptr(&kv.shards), shards, "changed in place once unshared");
        while kv.overlay_len() > 0 {
            kv.insert(b"x".to_vec(), vec![3]);
        }
        assert!((0u32..100).all(|i| kv.get(&i.to_be_bytes()) == Some(&vec![2])));
        assert_eq!(kv.len(), 101);
    }

    type Model = BTreeMap<Vec<u8>, Vec<u8>>;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u8),
        Remove(u8),
        Freeze,
        Thaw(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| Op::Insert(k % 64, v)),
            3 => any::<u8>().prop_map(|k| Op::Remove(k % 64)),
            1 => Just(Op::Freeze),
            1 => any::<usize>().prop_map(Op::Thaw),
        ]
    }

    proptest! {
        /// Against a BTreeMap: every read, every returned old value, the
        /// length, and every frozen view (compared with the model's copy
        /// at its freeze), with freezes held and released in any order.
        #[test]
        fn behaves_like_a_map_with_copies_at_each_freeze(ops in proptest::collection::vec(op(), 1..400)) {
            let mut kv = Kv::default();
            let mut model = BTreeMap::<Vec<u8>, Vec<u8>>::new();
            let mut frozen: Vec<(Frozen, Model)> = vec![];
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(kv.insert(vec![k], vec![v]), model.insert(vec![k], vec![v])),
                    Op::Remove(k) => prop_assert_eq!(kv.remove(&[k]), model.remove(&vec![k])),
                    Op::Freeze => frozen.push((kv.freeze(), model.clone())),
                    Op::Thaw(i) => {
                        if !frozen.is_empty() {
                            let (f, m) = frozen.remove(i % frozen.len());
                            prop_assert_eq!(sorted(&f), m);
                        }
                    }
                }
                prop_assert_eq!(kv.len(), model.len());
                for k in 0u8..64 {
                    prop_assert_eq!(kv.get(&[k]), model.get(&vec![k]));
                }
            }
            for (f, m) in &frozen {
                prop_assert_eq!(&sorted(f), m);
            }
            prop_assert_eq!(sorted(&kv.freeze()), model);
        }
    }
}
