//! Sparse Merkle tree over 256-bit key hashes, with single-leaf subtrees
//! compressed into their leaf (as in Diem's JMT, binary).
//!
//! * leaf hash     = C(IV_LEAF, key_hash || value_hash)
//! * internal hash = C(IV_NODE, left || right)
//! * empty subtree = 32 zero bytes
//!
//! `C` is the SHA-256 compression function on one 64-byte block, output as
//! big-endian words; `IV_LEAF` / `IV_NODE` are the big-endian words of
//! SHA-256("cybermesh/smt/leaf") / SHA-256("cybermesh/smt/node"). Every
//! input is exactly one block, so no length padding is needed for collision
//! resistance (Merkle–Damgård strengthening guards variable lengths), and
//! the distinct IVs separate leaves from nodes. Each hash is one compression
//! instead of the two of `SHA-256(tag || l || r)`: hashing was half of a
//! block's Merkle time.
//!
//! The shape is canonical (a subtree holding one leaf *is* that leaf; no
//! internal node has fewer than two leaves below it), so the root depends only
//! on the set of (key, value) pairs, never on insertion order. A batch update
//! rehashes only the paths it touches: cost O(k · log n) for k changed keys in
//! a tree of n, and disjoint subtrees of large batches hash in parallel.
//!
//! # Layout
//! Nodes live in arenas, not boxes: an internal node is its two children's
//! references *and their hashes* (72 bytes), a leaf its key and value
//! (64 bytes), and a node's own hash is kept by its parent (the root's by
//! the tree). An update walks one node per level and finds its sibling's hash
//! in the node it already read; with boxed nodes that each held their own
//! hash, every level read the sibling too, and moved both in and out of the
//! recursion (2.5 M leaves: 3.2 µs per insert, most of it cache misses).
//! Nodes below depth [`SPLIT_DEPTH`] live in one of eight arenas chosen by the
//! first three bits of their path, the few above in a ninth: a large batch
//! updates the eight subtrees in parallel, each task owning its arena.

use crate::Hash32;
use std::sync::LazyLock;

pub const EMPTY: Hash32 = [0u8; 32];

/// Updates at or above this count split across rayon workers near the root
/// (below it, the fork/join overhead outweighs the gain: see the
/// `merkle/*` benches).
pub const PARALLEL_MIN_UPDATES: usize = 2048;
/// Depth at which a large batch splits into parallel tasks (2^3 subtrees).
const SPLIT_DEPTH: usize = 3;
const SUBTREES: usize = 1 << SPLIT_DEPTH;
/// The arena of the internal nodes above `SPLIT_DEPTH`.
const TOP: usize = SUBTREES;
/// Nodes per arena chunk: arenas grow a chunk at a time, never by copying
/// what they hold (a doubling `Vec` of 20 MB would stall a block).
const CHUNK: usize = 4096;
/// Index bits of a [`Ref`]; an arena holds at most 2^27 − 1 nodes of a kind.
const INDEX_BITS: u32 = 27;

fn iv(tag: &str) -> [u32; 8] {
    let h = crate::sha256(tag.as_bytes());
    std::array::from_fn(|i| u32::from_be_bytes(h[4 * i..4 * i + 4].try_into().expect("4 bytes")))
}
static IV_LEAF: LazyLock<[u32; 8]> = LazyLock::new(|| iv("cybermesh/smt/leaf"));
static IV_NODE: LazyLock<[u32; 8]> = LazyLock::new(|| iv("cybermesh/smt/node"));

/// `C(iv, a || b)`: one SHA-256 compression.
fn compress(iv: &[u32; 8], a: &Hash32, b: &Hash32) -> Hash32 {
    let mut block = sha2::digest::generic_array::GenericArray::<u8, sha2::digest::consts::U64>::default();
    block[..32].copy_from_slice(a);
    block[32..].copy_from_slice(b);
    let mut state = *iv;
    sha2::compress256(&mut state, std::slice::from_ref(&block));
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

fn leaf_hash(key: &Hash32, value: &Hash32) -> Hash32 {
    compress(&IV_LEAF, key, value)
}

fn internal_hash(l: &Hash32, r: &Hash32) -> Hash32 {
    compress(&IV_NODE, l, r)
}

#[inline]
fn bit(key: &Hash32, depth: usize) -> bool {
    key[depth / 8] & (0x80 >> (depth % 8)) != 0
}

/// The subtree (of `SUBTREES`) a key's path enters at `SPLIT_DEPTH`.
#[inline]
fn subtree(key: &Hash32) -> usize {
    (key[0] >> (8 - SPLIT_DEPTH)) as usize
}

/// A node: empty (0), or a leaf or internal node by arena and index.
/// Bit 31: leaf; bits 27–30: arena; bits 0–26: index + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Ref(u32);

impl Ref {
    const EMPTY: Ref = Ref(0);
    fn new(leaf: bool, arena: usize, idx: usize) -> Ref {
        assert!(idx + 1 < 1 << INDEX_BITS, "merkle arena full: more than 2^27 nodes in one eighth of the tree");
        Ref((leaf as u32) << 31 | (arena as u32) << INDEX_BITS | (idx as u32 + 1))
    }
    fn is_empty(self) -> bool {
        self.0 == 0
    }
    fn is_leaf(self) -> bool {
        self.0 >> 31 == 1
    }
    fn arena(self) -> usize {
        ((self.0 >> INDEX_BITS) & 0xf) as usize
    }
    fn idx(self) -> usize {
        (self.0 & ((1 << INDEX_BITS) - 1)) as usize - 1
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Inner {
    hash: [Hash32; 2],
    child: [Ref; 2],
}

#[derive(Debug, Clone, Copy, Default)]
struct Leaf {
    key: Hash32,
    value: Hash32,
}

/// Slots in fixed-size chunks, with a free list.
#[derive(Debug, Clone)]
struct Slots<T> {
    chunks: Vec<Box<[T]>>,
    len: usize,
    free: Vec<u32>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots { chunks: Vec::new(), len: 0, free: Vec::new() }
    }
}

impl<T: Copy + Default> Slots<T> {
    fn alloc(&mut self, v: T) -> usize {
        if let Some(i) = self.free.pop() {
            self[i as usize] = v;
            return i as usize;
        }
        if self.len == self.chunks.len() * CHUNK {
            self.chunks.push(vec![T::default(); CHUNK].into_boxed_slice());
        }
        let i = self.len;
        self.len += 1;
        self[i] = v;
        i
    }
    fn release(&mut self, i: usize) {
        self.free.push(i as u32);
    }
    fn live(&self) -> usize {
        self.len - self.free.len()
    }
}

impl<T> std::ops::Index<usize> for Slots<T> {
    type Output = T;
    #[inline]
    fn index(&self, i: usize) -> &T {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl<T> std::ops::IndexMut<usize> for Slots<T> {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}

#[derive(Debug, Clone, Default)]
struct Arena {
    inner: Slots<Inner>,
    leaves: Slots<Leaf>,
}

/// Access to the arenas a recursion may touch: all of them, or (in a
/// parallel task below `SPLIT_DEPTH`) the one its subtree lives in.
trait Nodes {
    fn arena(&mut self, id: usize) -> &mut Arena;

    fn inner(&mut self, r: Ref) -> Inner {
        self.arena(r.arena()).inner[r.idx()]
    }
    fn leaf(&mut self, r: Ref) -> Leaf {
        self.arena(r.arena()).leaves[r.idx()]
    }
    /// Starts loading node `r` into the cache (the walk reads it soon).
    fn prefetch(&mut self, r: Ref) {
        if r.is_empty() {
            return;
        }
        let a = self.arena(r.arena());
        let p: *const u8 = if r.is_leaf() {
            (&a.leaves[r.idx()] as *const Leaf).cast()
        } else {
            (&a.inner[r.idx()] as *const Inner).cast()
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint; it never faults or changes memory.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }
    fn free(&mut self, r: Ref) {
        if r.is_leaf() {
            self.arena(r.arena()).leaves.release(r.idx());
        } else if !r.is_empty() {
            self.arena(r.arena()).inner.release(r.idx());
        }
    }
    fn new_leaf(&mut self, key: Hash32, value: Hash32) -> (Ref, Hash32) {
        let a = subtree(&key);
        let i = self.arena(a).leaves.alloc(Leaf { key, value });
        (Ref::new(true, a, i), leaf_hash(&key, &value))
    }
    /// An internal node at `depth` on `key`'s path.
    fn new_inner(&mut self, depth: usize, key: &Hash32, node: Inner) -> Ref {
        let a = if depth < SPLIT_DEPTH { TOP } else { subtree(key) };
        let i = self.arena(a).inner.alloc(node);
        Ref::new(false, a, i)
    }
}

impl Nodes for [Arena] {
    #[inline]
    fn arena(&mut self, id: usize) -> &mut Arena {
        &mut self[id]
    }
}

/// One subtree's arena, in a parallel task.
struct One<'a>(usize, &'a mut Arena);

impl Nodes for One<'_> {
    #[inline]
    fn arena(&mut self, id: usize) -> &mut Arena {
        debug_assert_eq!(id, self.0, "a subtree's nodes live in its own arena");
        self.1
    }
}

/// One change: set `key` to `value`, or delete it with `None`.
pub type Update = (Hash32, Option<Hash32>);

/// The tree. `len` counts leaves.
#[derive(Debug, Clone)]
pub struct SparseMerkleTree {
    root: Ref,
    root_hash: Hash32,
    arenas: Box<[Arena]>,
    len: usize,
    /// 0 means the default, `PARALLEL_MIN_UPDATES`.
    parallel_min: usize,
}

impl Default for SparseMerkleTree {
    fn default() -> Self {
        SparseMerkleTree {
            root: Ref::EMPTY,
            root_hash: EMPTY,
            arenas: (0..=TOP).map(|_| Arena::default()).collect(),
            len: 0,
            parallel_min: 0,
        }
    }
}

/// Proof that a key has a value (or none) under a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// Sibling hashes from the root down.
    pub siblings: Vec<Hash32>,
    /// The leaf met at the end of the path, if any (it may be another key's:
    /// that proves absence).
    pub leaf: Option<(Hash32, Hash32)>,
}

impl Proof {
    /// Checks the proof for `key` having `value` (`None`: absent) under `root`.
    pub fn verify(&self, root: &Hash32, key: &Hash32, value: Option<&Hash32>) -> bool {
        if self.siblings.len() > 256 {
            return false;
        }
        match (value, &self.leaf) {
            (Some(v), Some((k, lv))) if k == key && lv == v => {}
            (None, Some((k, _))) if k != key => {
                // The other leaf must share the path walked so far.
                let d = self.siblings.len();
                if (0..d).any(|i| bit(k, i) != bit(key, i)) {
                    return false;
                }
            }
            (None, None) => {}
            _ => return false,
        }
        let mut h = match &self.leaf {
            Some((k, v)) => leaf_hash(k, v),
            None => EMPTY,
        };
        for (depth, sib) in self.siblings.iter().enumerate().rev() {
            h = if bit(key, depth) { internal_hash(sib, &h) } else { internal_hash(&h, sib) };
        }
        &h == root
    }
}

impl SparseMerkleTree {
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets how many updates a batch needs before subtrees hash in parallel
    /// (`usize::MAX`: never).
    pub fn set_parallel_threshold(&mut self, n: usize) {
        self.parallel_min = n;
    }

    pub fn root(&self) -> Hash32 {
        self.root_hash
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Applies a batch. Later updates of the same key win.
    pub fn apply(&mut self, mut updates: Vec<Update>) {
        if updates.is_empty() {
            return;
        }
        // Stable sort keeps the order of equal keys, so the last one wins.
        updates.sort_by_key(|u| u.0);
        let mut dedup: Vec<Update> = Vec::with_capacity(updates.len());
        for u in updates {
            match dedup.last_mut() {
                Some(last) if last.0 == u.0 => *last = u,
                _ => dedup.push(u),
            }
        }
        let par = if self.parallel_min == 0 { PARALLEL_MIN_UPDATES } else { self.parallel_min };
        let (root, hash, delta) = if dedup.len() >= par {
            self.update_parallel(&dedup)
        } else {
            update(&mut *self.arenas, self.root, 0, &dedup)
        };
        self.root = root;
        self.root_hash = hash;
        self.len = (self.len as isize + delta) as usize;
        debug_assert_eq!(self.len, self.arenas.iter().map(|a| a.leaves.live()).sum::<usize>(), "one leaf per key");
    }

    /// The whole batch as `SUBTREES` parallel tasks, one per arena: the
    /// internal nodes above `SPLIT_DEPTH` are taken apart, each subtree
    /// updated on its own, and the top joined again.
    fn update_parallel(&mut self, ups: &[Update]) -> (Ref, Hash32, isize) {
        let mut at_split = [(Ref::EMPTY, EMPTY); SUBTREES];
        let mut top = std::mem::take(&mut self.arenas[TOP]);
        unwind(&mut top, &mut self.arenas, self.root, self.root_hash, 0, 0, &mut at_split);
        self.arenas[TOP] = top;
        let bounds: Vec<usize> = (0..=SUBTREES).map(|s| ups.partition_point(|u| subtree(&u.0) < s)).collect();
        let (low, _) = self.arenas.split_at_mut(TOP);
        let done: Vec<(Ref, Hash32, isize)> = {
            use rayon::prelude::*;
            low.par_iter_mut()
                .zip(at_split.par_iter())
                .enumerate()
                .map(|(s, (arena, &(r, h)))| {
                    let part = &ups[bounds[s]..bounds[s + 1]];
                    if part.is_empty() {
                        (r, h, 0)
                    } else {
                        update(&mut One(s, arena), r, SPLIT_DEPTH, part)
                    }
                })
                .collect()
        };
        let delta = done.iter().map(|d| d.2).sum();
        // Above the split depth every internal node lives in TOP, whatever
        // key `join` is given.
        let mut level: Vec<(Ref, Hash32)> = done.iter().map(|d| (d.0, d.1)).collect();
        for depth in (0..SPLIT_DEPTH).rev() {
            level = level
                .chunks_exact(2)
                .map(|pair| {
                    let node = Inner { hash: [pair[0].1, pair[1].1], child: [pair[0].0, pair[1].0] };
                    join(&mut *self.arenas, depth, &EMPTY, node)
                })
                .collect();
        }
        (level[0].0, level[0].1, delta)
    }

    /// Value hash stored for `key`.
    pub fn get(&self, key: &Hash32) -> Option<Hash32> {
        let mut r = self.root;
        let mut depth = 0;
        loop {
            if r.is_empty() {
                return None;
            }
            if r.is_leaf() {
                let l = &self.arenas[r.arena()].leaves[r.idx()];
                return (&l.key == key).then_some(l.value);
            }
            r = self.arenas[r.arena()].inner[r.idx()].child[bit(key, depth) as usize];
            depth += 1;
        }
    }

    pub fn prove(&self, key: &Hash32) -> Proof {
        let mut siblings = vec![];
        let mut r = self.root;
        let mut depth = 0;
        loop {
            if r.is_empty() {
                return Proof { siblings, leaf: None };
            }
            if r.is_leaf() {
                let l = &self.arenas[r.arena()].leaves[r.idx()];
                return Proof { siblings, leaf: Some((l.key, l.value)) };
            }
            let n = &self.arenas[r.arena()].inner[r.idx()];
            let side = bit(key, depth) as usize;
            siblings.push(n.hash[1 - side]);
            r = n.child[side];
            depth += 1;
        }
    }
}

/// Takes the top of the tree apart for [`SparseMerkleTree::update_parallel`]:
/// frees the internal nodes above `SPLIT_DEPTH` and records, per subtree, the
/// node at the split depth and its hash (a leaf above it goes to its key's
/// subtree; the subtrees it does not reach stay empty).
fn unwind(
    top: &mut Arena,
    low: &mut [Arena],
    r: Ref,
    hash: Hash32,
    depth: usize,
    prefix: usize,
    out: &mut [(Ref, Hash32); SUBTREES],
) {
    if depth == SPLIT_DEPTH {
        out[prefix] = (r, hash);
    } else if r.is_leaf() {
        out[subtree(&low[r.arena()].leaves[r.idx()].key)] = (r, hash);
    } else if !r.is_empty() {
        let n = top.inner[r.idx()];
        top.inner.release(r.idx());
        for side in 0..2 {
            unwind(top, low, n.child[side], n.hash[side], depth + 1, prefix << 1 | side, out);
        }
    }
}

/// Stores internal node `node` (at `r`, or new at `depth` on `key`'s path
/// when `r` is empty), collapsing to keep the canonical shape: no children is
/// empty, a lone leaf moves up. Returns the node in its place and its hash.
fn settle<N: Nodes + ?Sized>(n: &mut N, r: Ref, depth: usize, key: &Hash32, node: Inner) -> (Ref, Hash32) {
    let [l, rt] = node.child;
    let lone = match (l.is_empty(), rt.is_empty()) {
        (true, true) => Some((Ref::EMPTY, EMPTY)),
        (true, false) if rt.is_leaf() => Some((rt, node.hash[1])),
        (false, true) if l.is_leaf() => Some((l, node.hash[0])),
        _ => None,
    };
    if let Some(moved) = lone {
        n.free(r);
        return moved;
    }
    let hash = internal_hash(&node.hash[0], &node.hash[1]);
    if r.is_empty() {
        (n.new_inner(depth, key, node), hash)
    } else {
        n.arena(r.arena()).inner[r.idx()] = node;
        (r, hash)
    }
}

/// [`settle`] of a new node.
fn join<N: Nodes + ?Sized>(n: &mut N, depth: usize, key: &Hash32, node: Inner) -> (Ref, Hash32) {
    settle(n, Ref::EMPTY, depth, key, node)
}

/// Applies sorted, deduplicated, non-empty `ups` to the subtree `r` at
/// `depth`. Returns the new subtree, its hash and the change in leaf count.
///
/// Level by level, not path by path: the walk down reads every node of a
/// depth before any of the next, prefetching a few ahead, so the cache misses
/// of a batch's many paths overlap instead of following one another down
/// each path (the tree is far larger than the cache; below its top levels
/// every node read is a miss). The walk up then settles each level's nodes
/// from their children's results.
fn update<N: Nodes + ?Sized>(n: &mut N, r: Ref, depth: usize, ups: &[Update]) -> (Ref, Hash32, isize) {
    debug_assert!(!ups.is_empty());
    /// A node the walk reached: its updates `ups[lo..hi]`, and where its
    /// result goes (its parent's index in the level above, and which side).
    struct Visit {
        r: Ref,
        node: Inner,
        lo: usize,
        hi: usize,
        parent: usize,
        side: usize,
    }
    const AHEAD: usize = 8;
    let mut levels: Vec<Vec<Visit>> =
        vec![vec![Visit { r, node: Inner::default(), lo: 0, hi: ups.len(), parent: 0, side: 0 }]];
    loop {
        let d = depth + levels.len() - 1;
        let cur = levels.last_mut().expect("a level");
        let mut next = Vec::with_capacity(cur.len() * 2);
        for i in 0..cur.len() {
            if let Some(v) = cur.get(i + AHEAD) {
                n.prefetch(v.r);
            }
            let v = &mut cur[i];
            if v.r.is_empty() || v.r.is_leaf() {
                continue;
            }
            v.node = n.inner(v.r);
            let split = v.lo + ups[v.lo..v.hi].partition_point(|u| !bit(&u.0, d));
            for (side, lo, hi) in [(0, v.lo, split), (1, split, v.hi)] {
                if lo < hi {
                    next.push(Visit { r: v.node.child[side], node: Inner::default(), lo, hi, parent: i, side });
                }
            }
        }
        if next.is_empty() {
            break;
        }
        levels.push(next);
    }
    let mut delta = 0;
    // Results of the level below: (subtree, hash, parent index, side).
    let mut below: Vec<(Ref, Hash32, usize, usize)> = Vec::new();
    for (l, mut visits) in levels.into_iter().enumerate().rev() {
        for (r, h, parent, side) in below.drain(..) {
            let node = &mut visits[parent].node;
            node.child[side] = r;
            node.hash[side] = h;
        }
        let d = depth + l;
        for v in &visits {
            let part = &ups[v.lo..v.hi];
            let (r, h) = if v.r.is_empty() || v.r.is_leaf() {
                let (r, h, dl) = replace(n, v.r, d, part);
                delta += dl;
                (r, h)
            } else {
                settle(n, v.r, d, &part[0].0, v.node)
            };
            below.push((r, h, v.parent, v.side));
        }
    }
    debug_assert_eq!(below.len(), 1, "one root");
    let (r, h, _, _) = below[0];
    (r, h, delta)
}

/// The updates to an empty subtree or a leaf: a subtree built of the inserts
/// (and the leaf, unless an update names it).
fn replace<N: Nodes + ?Sized>(n: &mut N, r: Ref, depth: usize, ups: &[Update]) -> (Ref, Hash32, isize) {
    if r.is_empty() {
        let ins: Vec<(Hash32, Hash32)> = ups.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect();
        let (r, h) = build(n, depth, &ins);
        return (r, h, ins.len() as isize);
    }
    let Leaf { key, value } = n.leaf(r);
    n.free(r);
    // Merge the existing leaf into the sorted inserts unless an update names it.
    let mut keep = ups.binary_search_by(|u| u.0.cmp(&key)).is_err().then_some((key, value));
    let mut ins: Vec<(Hash32, Hash32)> = Vec::with_capacity(ups.len() + 1);
    for (k, v) in ups {
        if let Some(old) = keep.filter(|old| old.0 < *k) {
            ins.push(old);
            keep = None;
        }
        if let Some(v) = v {
            ins.push((*k, *v));
        }
    }
    ins.extend(keep);
    let delta = ins.len() as isize - 1;
    let (r, h) = build(n, depth, &ins);
    (r, h, delta)
}

/// Builds the canonical subtree of sorted leaves at `depth`.
fn build<N: Nodes + ?Sized>(n: &mut N, depth: usize, leaves: &[(Hash32, Hash32)]) -> (Ref, Hash32) {
    match leaves.len() {
        0 => (Ref::EMPTY, EMPTY),
        1 => n.new_leaf(leaves[0].0, leaves[0].1),
        _ => {
            debug_assert!(depth < 256, "distinct keys must differ within 256 bits");
            let split = leaves.partition_point(|(k, _)| !bit(k, depth));
            let (l, r) = leaves.split_at(split);
            let (lr, lh) = build(n, depth + 1, l);
            let (rr, rh) = build(n, depth + 1, r);
            join(n, depth, &leaves[0].0, Inner { hash: [lh, rh], child: [lr, rr] })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sha256;
    use proptest::prelude::*;

    fn k(i: u32) -> Hash32 {
        sha256(&i.to_be_bytes())
    }

    /// Reference: root computed from scratch over the full set, by the
    /// definition (no arenas).
    fn reference(set: &std::collections::BTreeMap<Hash32, Hash32>) -> Hash32 {
        fn hash(depth: usize, leaves: &[(Hash32, Hash32)]) -> Hash32 {
            match leaves {
                [] => EMPTY,
                [(k, v)] => leaf_hash(k, v),
                _ => {
                    let split = leaves.partition_point(|(k, _)| !bit(k, depth));
                    internal_hash(&hash(depth + 1, &leaves[..split]), &hash(depth + 1, &leaves[split..]))
                }
            }
        }
        let v: Vec<_> = set.iter().map(|(a, b)| (*a, *b)).collect();
        hash(0, &v)
    }

    /// The compression function is SHA-256's: a one-block message's digest
    /// is C(SHA-256's IV, the message's padded block), and C(IV, block)
    /// depends on the IV and on both halves.
    #[test]
    fn node_hashes_are_one_sha256_compression_with_their_own_iv() {
        use sha2::Digest;
        let sha_iv: [u32; 8] =
            [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
        // SHA-256("abc"): one block, 0x80 after the message, bit length 24 at the end.
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[..3].copy_from_slice(b"abc");
        a[3] = 0x80;
        b[31] = 24;
        assert_eq!(compress(&sha_iv, &a, &b)[..], sha2::Sha256::digest(b"abc")[..]);
        let (x, y) = (k(1), k(2));
        assert_ne!(leaf_hash(&x, &y), internal_hash(&x, &y), "leaf and node domains differ");
        assert_ne!(internal_hash(&x, &y), internal_hash(&y, &x));
        assert_ne!(internal_hash(&x, &y), internal_hash(&x, &x));
        assert_eq!(IV_LEAF[0], u32::from_be_bytes(crate::sha256(b"cybermesh/smt/leaf")[..4].try_into().unwrap()));
    }

    #[test]
    fn empty_single_and_known_shapes() {
        let mut t = SparseMerkleTree::new();
        assert_eq!(t.root(), EMPTY);
        t.apply(vec![(k(1), Some(k(100)))]);
        assert_eq!(t.root(), leaf_hash(&k(1), &k(100)));
        t.apply(vec![(k(1), None)]);
        assert_eq!(t.root(), EMPTY);
        assert_eq!(t.len(), 0);
    }

    proptest! {
        #[test]
        /// Both paths: one recursion over all arenas, and the eight
        /// subtrees in parallel (threshold 1: every batch, so small trees
        /// with leaves above the split depth and deletions that collapse the
        /// top are covered).
        fn incremental_equals_from_scratch_and_order_free(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u32..200, proptest::option::of(0u32..5)), 0..40), 1..8),
            parallel in any::<bool>(),
        ) {
            let mut t = SparseMerkleTree::new();
            t.set_parallel_threshold(if parallel { 1 } else { usize::MAX });
            let mut set = std::collections::BTreeMap::new();
            for b in &batches {
                let ups: Vec<Update> = b.iter().map(|(key, v)| (k(*key), v.map(k))).collect();
                for (key, v) in &ups {
                    match v { Some(v) => { set.insert(*key, *v); } None => { set.remove(key); } }
                }
                t.apply(ups);
                prop_assert_eq!(t.root(), reference(&set));
                prop_assert_eq!(t.len(), set.len());
            }
            // Proofs of presence and absence.
            for i in 0..210u32 {
                let p = t.prove(&k(i));
                let v = set.get(&k(i));
                prop_assert!(p.verify(&t.root(), &k(i), v));
                if let Some(v) = v {
                    let wrong = sha256(v);
                    prop_assert!(!p.verify(&t.root(), &k(i), Some(&wrong)));
                    prop_assert!(!p.verify(&t.root(), &k(i), None));
                }
            }
        }
    }

    #[test]
    fn large_parallel_batch_matches_sequential() {
        let ups: Vec<Update> = (0..20_000).map(|i| (k(i), Some(k(i + 1)))).collect();
        let mut a = SparseMerkleTree::new();
        a.apply(ups.clone());
        let mut b = SparseMerkleTree::new();
        b.set_parallel_threshold(usize::MAX);
        for c in ups.chunks(100) {
            b.apply(c.to_vec());
        }
        assert_eq!(a.root(), b.root());
        assert_eq!(a.len(), 20_000);
        assert_eq!(a.get(&k(5)), Some(k(6)));
        // A parallel batch deleting all but a few collapses the top.
        let dels: Vec<Update> = (3..20_000).map(|i| (k(i), None)).collect();
        a.apply(dels.clone());
        for c in dels.chunks(1000) {
            b.apply(c.to_vec());
        }
        let rest: std::collections::BTreeMap<_, _> = (0..3).map(|i| (k(i), k(i + 1))).collect();
        assert_eq!(a.root(), reference(&rest));
        assert_eq!(b.root(), reference(&rest));
        assert_eq!(a.len(), 3);
        a.apply((0..3).map(|i| (k(i), None)).collect());
        assert_eq!((a.root(), a.len()), (EMPTY, 0));
        // Freed slots are reused, not leaked.
        a.apply(ups.clone());
        let slots: usize = a.arenas.iter().map(|r| r.leaves.len).sum();
        assert_eq!(slots, 20_000);
    }
}
