//! Shard placement that keeps sharded maps from growing all at once.
//!
//! A hash map doubles its table when it passes 7/8 of a power of two. Maps
//! split into equal shards by a uniform hash all reach that count at about
//! the same total, so they all double within a moment: the same memory to
//! allocate and fault in as one big map, in one burst, on every validator
//! at the same height (measured on the devnet at 14,500 tx/s: a 300 ms
//! stall of every core thread at 229k txs, mostly the kernel zeroing fresh
//! pages). [`Spread`] gives shard `i` a share proportional to `2^(i/n)`:
//! shares span one octave, so shard `i` passes a given size at a total
//! `2^(-i/n)` times another's, and the shards' doublings fall evenly
//! between two doublings of the whole instead of together.

/// Maps a uniform 64-bit hash to one of `n` shards with log-uniform shares.
pub struct Spread {
    /// `bounds[i]`: the first hash value past shard `i`.
    bounds: Box<[u64]>,
    /// `first[b]`: the shard holding the first hash of bucket `b` (the top
    /// `BUCKET_BITS` bits). Every share is at least 1/(2n) of the hashes,
    /// so with at least `n` buckets a bucket meets at most three shards:
    /// a lookup is on the hot path of every state read, and this makes it
    /// a table read and a step or two, not a binary search.
    first: Box<[u32]>,
    bucket_shift: u32,
}

impl Spread {
    pub fn new(n: usize) -> Spread {
        assert!(n > 0 && n <= u32::MAX as usize, "a spread needs 1..=u32::MAX shards");
        let weights: Vec<f64> = (0..n).map(|i| (i as f64 / n as f64).exp2()).collect();
        let total: f64 = weights.iter().sum();
        let mut cum = 0.0;
        let mut bounds: Vec<u64> = weights
            .iter()
            .map(|w| {
                cum += w;
                // f64 → u64 saturates at u64::MAX.
                (cum / total * 18_446_744_073_709_551_616.0) as u64
            })
            .collect();
        *bounds.last_mut().expect("n > 0") = u64::MAX;
        let bucket_bits = n.next_power_of_two().trailing_zeros();
        let bucket_shift = 64 - bucket_bits;
        let first = (0..1u64 << bucket_bits)
            .map(|b| {
                let lowest = b.checked_shl(bucket_shift).unwrap_or(0);
                bounds.partition_point(|&x| x <= lowest).min(n - 1) as u32
            })
            .collect();
        Spread { bounds: bounds.into_boxed_slice(), first, bucket_shift }
    }

    /// The shard of a uniformly distributed `hash`.
    pub fn shard(&self, hash: u64) -> usize {
        let bucket = hash.checked_shr(self.bucket_shift).unwrap_or(0) as usize;
        let mut i = self.first[bucket] as usize;
        while self.bounds[i] <= hash && i + 1 < self.bounds.len() {
            i += 1;
        }
        i
    }

    pub fn len(&self) -> usize {
        self.bounds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bounds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Inserts `total` uniform hashes and counts, per 1/32 of an octave of
    /// inserts (the map's own growth by 2.2%), how many shards passed 7/8
    /// of a power of two (a table doubling) of 512 buckets or more (the
    /// early, small ones cost nothing).
    fn doublings_per_step(place: impl Fn(u64) -> usize, shards: usize, total: usize) -> Vec<usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut len = vec![0usize; shards];
        let mut per = vec![0usize; 32 * 64];
        for k in 0..total {
            let s = place(rng.gen());
            len[s] += 1;
            let l = len[s];
            // hashbrown grows a table of 8·2^k buckets at its (7·2^k + 1)th entry.
            if l > 7 * 64 && (l - 1) % 7 == 0 && ((l - 1) / 7).is_power_of_two() {
                per[((k as f64 + 1.0).log2() * 32.0) as usize] += 1;
            }
        }
        per
    }

    #[test]
    fn shares_span_one_octave_and_every_hash_has_a_shard() {
        let s = Spread::new(256);
        assert_eq!(s.len(), 256);
        assert_eq!((s.shard(0), s.shard(u64::MAX)), (0, 255));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut count = vec![0u32; 256];
        // The bucket table finds the shard a search of the bounds finds.
        let searched = |s: &Spread, h: u64| s.bounds.partition_point(|&b| b <= h).min(s.len() - 1);
        for _ in 0..2_000_000 {
            let h = rng.gen();
            let i = s.shard(h);
            assert_eq!(i, searched(&s, h), "hash {h:#x}");
            count[i] += 1;
        }
        for n in [1, 3, 4096] {
            let s = Spread::new(n);
            for h in (0..10_000).map(|_| rng.gen()).chain(s.bounds.iter().flat_map(|&b| [b.wrapping_sub(1), b])) {
                assert_eq!(s.shard(h), searched(&s, h), "{n} shards, hash {h:#x}");
            }
        }
        let (first, last) = (count[..16].iter().sum::<u32>() as f64, count[240..].iter().sum::<u32>() as f64);
        let ratio = last / first;
        assert!((1.8..2.1).contains(&ratio), "the last shards hold {ratio:.2}x the first's");
        assert_eq!(Spread::new(1).shard(12345), 0);
    }

    #[test]
    fn spread_shards_double_at_different_times_where_equal_shards_double_together() {
        let (shards, total) = (256, 600_000);
        let spread = Spread::new(shards);
        let equal = doublings_per_step(|h| (h >> 56) as usize % shards, shards, total);
        let skewed = doublings_per_step(|h| spread.shard(h), shards, total);
        let (equal_max, skewed_max) = (*equal.iter().max().unwrap(), *skewed.iter().max().unwrap());
        assert_eq!(equal.iter().sum::<usize>() > 0, skewed.iter().sum::<usize>() > 0);
        // Equal shards: bursts of most of the shards within a few steps;
        // spread: a steady trickle (256 shards over 32 steps an octave).
        assert!(equal_max >= 60, "equal shards' worst step: {equal_max} doublings");
        assert!(
            skewed_max * 4 <= equal_max,
            "spread {skewed_max} against equal {equal_max} doublings in the worst step"
        );
    }
}
