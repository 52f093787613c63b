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

use crate::Hash32;
use std::sync::LazyLock;

pub const EMPTY: Hash32 = [0u8; 32];

/// Updates at or above this count split across rayon workers near the root
/// (below it, the fork/join overhead outweighs the gain: see the
/// `merkle/*` benches).
pub const PARALLEL_MIN_UPDATES: usize = 2048;
const PARALLEL_MAX_DEPTH: usize = 3;

#[derive(Debug, Default, Clone)]
enum Node {
    #[default]
    Empty,
    Leaf {
        key: Hash32,
        value: Hash32,
        hash: Hash32,
    },
    Internal {
        left: Box<Node>,
        right: Box<Node>,
        hash: Hash32,
    },
}

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

impl Node {
    fn hash(&self) -> Hash32 {
        match self {
            Node::Empty => EMPTY,
            Node::Leaf { hash, .. } | Node::Internal { hash, .. } => *hash,
        }
    }

    fn leaf(key: Hash32, value: Hash32) -> Node {
        Node::Leaf { key, value, hash: leaf_hash(&key, &value) }
    }

    /// Joins two children, collapsing to keep the canonical shape.
    fn join(left: Node, right: Node) -> Node {
        Node::join_into(None, left, right)
    }

    /// `join`, storing the children in `boxes` (a replaced node's) when an
    /// internal node results: no allocation on an update's common path.
    fn join_into(boxes: Option<(Box<Node>, Box<Node>)>, left: Node, right: Node) -> Node {
        match (&left, &right) {
            (Node::Empty, Node::Empty) => Node::Empty,
            (Node::Empty, Node::Leaf { .. }) => right,
            (Node::Leaf { .. }, Node::Empty) => left,
            _ => {
                let hash = internal_hash(&left.hash(), &right.hash());
                let (left, right) = match boxes {
                    Some((mut l, mut r)) => {
                        *l = left;
                        *r = right;
                        (l, r)
                    }
                    None => (Box::new(left), Box::new(right)),
                };
                Node::Internal { left, right, hash }
            }
        }
    }
}

/// One change: set `key` to `value`, or delete it with `None`.
pub type Update = (Hash32, Option<Hash32>);

/// The tree. `len` counts leaves.
#[derive(Debug, Default, Clone)]
pub struct SparseMerkleTree {
    root: Node,
    len: usize,
    /// 0 means the default, `PARALLEL_MIN_UPDATES`.
    parallel_min: usize,
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
        self.root.hash()
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
        let root = std::mem::take(&mut self.root);
        let par = if self.parallel_min == 0 { PARALLEL_MIN_UPDATES } else { self.parallel_min };
        let (root, delta) = update(root, 0, &dedup, par);
        self.root = root;
        self.len = (self.len as isize + delta) as usize;
    }

    /// Value hash stored for `key`.
    pub fn get(&self, key: &Hash32) -> Option<Hash32> {
        let mut n = &self.root;
        let mut depth = 0;
        loop {
            match n {
                Node::Empty => return None,
                Node::Leaf { key: k, value, .. } => return (k == key).then_some(*value),
                Node::Internal { left, right, .. } => {
                    n = if bit(key, depth) { right } else { left };
                    depth += 1;
                }
            }
        }
    }

    pub fn prove(&self, key: &Hash32) -> Proof {
        let mut siblings = vec![];
        let mut n = &self.root;
        let mut depth = 0;
        loop {
            match n {
                Node::Empty => return Proof { siblings, leaf: None },
                Node::Leaf { key: k, value, .. } => return Proof { siblings, leaf: Some((*k, *value)) },
                Node::Internal { left, right, .. } => {
                    if bit(key, depth) {
                        siblings.push(left.hash());
                        n = right;
                    } else {
                        siblings.push(right.hash());
                        n = left;
                    }
                    depth += 1;
                }
            }
        }
    }
}

/// Applies sorted, deduplicated `ups` to the subtree `node` at `depth`.
/// Returns the new subtree and the change in leaf count.
fn update(node: Node, depth: usize, ups: &[Update], par: usize) -> (Node, isize) {
    if ups.is_empty() {
        return (node, 0);
    }
    match node {
        Node::Internal { mut left, mut right, .. } => {
            let split = ups.partition_point(|u| !bit(&u.0, depth));
            let (lu, ru) = ups.split_at(split);
            let (old_l, old_r) = (std::mem::take(&mut *left), std::mem::take(&mut *right));
            let ((l, dl), (r, dr)) = if ups.len() >= par && depth < PARALLEL_MAX_DEPTH {
                rayon::join(|| update(old_l, depth + 1, lu, par), || update(old_r, depth + 1, ru, par))
            } else {
                (update(old_l, depth + 1, lu, par), update(old_r, depth + 1, ru, par))
            };
            (Node::join_into(Some((left, right)), l, r), dl + dr)
        }
        Node::Empty => {
            let ins: Vec<(Hash32, Hash32)> = ups.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect();
            let n = ins.len() as isize;
            (build(depth, &ins, par), n)
        }
        Node::Leaf { key, value, .. } => {
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
            (build(depth, &ins, par), delta)
        }
    }
}

/// Builds the canonical subtree of sorted leaves at `depth`.
fn build(depth: usize, leaves: &[(Hash32, Hash32)], par: usize) -> Node {
    match leaves.len() {
        0 => Node::Empty,
        1 => Node::leaf(leaves[0].0, leaves[0].1),
        _ => {
            debug_assert!(depth < 256, "distinct keys must differ within 256 bits");
            let split = leaves.partition_point(|(k, _)| !bit(k, depth));
            let (l, r) = leaves.split_at(split);
            if leaves.len() >= par && depth < PARALLEL_MAX_DEPTH {
                let (a, b) = rayon::join(|| build(depth + 1, l, par), || build(depth + 1, r, par));
                Node::join(a, b)
            } else {
                Node::join(build(depth + 1, l, par), build(depth + 1, r, par))
            }
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

    /// Reference: root computed from scratch over the full set.
    fn reference(set: &std::collections::BTreeMap<Hash32, Hash32>) -> Hash32 {
        let v: Vec<_> = set.iter().map(|(a, b)| (*a, *b)).collect();
        build(0, &v, usize::MAX).hash()
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
        fn incremental_equals_from_scratch_and_order_free(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u32..200, proptest::option::of(0u32..5)), 0..40), 1..8)
        ) {
            let mut t = SparseMerkleTree::new();
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
    }
}
