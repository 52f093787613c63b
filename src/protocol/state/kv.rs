//! The state's entries: one map split into [`SHARDS`] maps by a hash of
//! the key, each behind an `Arc`.
//!
//! Two stalls of the core thread this removes, both measured there: a
//! snapshot used to copy every entry (hundreds of thousands, on every
//! validator at the same height), and the one big map's growth rehashed
//! every entry at once (a `perf` profile of the devnet at its maximum
//! showed `reserve_rehash` of this map faulting in and zeroing tens of MB).
//! Now a snapshot is [`Kv::freeze`] (one reference per shard); the first
//! write to a shard a snapshot still holds copies that shard alone
//! (`Arc::make_mut`), and each shard grows by itself, at its own time:
//! shards are sized by [`Spread`], so they do not all double together.
//!
//! Which shard holds a key changes nothing observable (it differs from run
//! to run): lookups are by key, and snapshots sort their entries.

use foldhash::{HashMap, HashMapExt};
use std::hash::BuildHasher;
use std::sync::Arc;

use super::spread::Spread;

/// Shards of the map (a power of two): a rehash, or the copy a write makes
/// of a shard a snapshot holds, touches 1/4096 of the state. A block of n
/// txs writes ~2n keys, so the block after a snapshot copies ~2n shards,
/// not the whole state.
pub const SHARDS: usize = 4096;

type Shard = HashMap<Vec<u8>, Vec<u8>>;

#[derive(Clone)]
pub struct Kv {
    shards: Vec<Arc<Shard>>,
    len: usize,
    /// Picks a key's shard; randomly keyed like the shards' own hashers
    /// (producers choose keys).
    placement: foldhash::fast::RandomState,
    spread: Arc<Spread>,
}

impl Default for Kv {
    fn default() -> Self {
        Kv {
            shards: (0..SHARDS).map(|_| Arc::new(Shard::new())).collect(),
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
        self.shards[self.shard_of(key)].get(key)
    }

    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Option<Vec<u8>> {
        let i = self.shard_of(&key);
        let old = Arc::make_mut(&mut self.shards[i]).insert(key, value);
        self.len += usize::from(old.is_none());
        old
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        let i = self.shard_of(key);
        // Only a present key is worth copying a shared shard for.
        self.shards[i].get(key)?;
        let old = Arc::make_mut(&mut self.shards[i]).remove(key);
        self.len -= usize::from(old.is_some());
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries as they are now, for a reader elsewhere (a snapshot
    /// writer): costs one reference per shard, not a copy.
    pub fn freeze(&self) -> Frozen {
        Frozen { shards: self.shards.clone(), len: self.len }
    }
}

/// The entries of a [`Kv`] at one moment, shared with it until either
/// side changes a shard.
#[derive(Clone)]
pub struct Frozen {
    shards: Vec<Arc<Shard>>,
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
        self.shards.iter().flat_map(|s| s.iter())
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
        // share, at most twice the smallest's).
        let most = kv.shards.iter().map(|s| s.len()).max().unwrap();
        assert!(most <= 8, "{most} of 1001 keys in one of {SHARDS} shards");
    }

    #[test]
    fn an_unshared_shard_is_changed_in_place() {
        let mut kv = Kv::default();
        kv.insert(b"k".to_vec(), vec![1]);
        let i = kv.shard_of(b"k");
        let before = Arc::as_ptr(&kv.shards[i]);
        kv.insert(b"k".to_vec(), vec![2]);
        assert_eq!(Arc::as_ptr(&kv.shards[i]), before, "copied although nothing shared it");
        let frozen = kv.freeze();
        kv.insert(b"k".to_vec(), vec![3]);
        assert_ne!(Arc::as_ptr(&kv.shards[i]), before, "wrote into a shard a snapshot holds");
        drop(frozen);
    }
}
