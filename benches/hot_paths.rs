//! Criterion benches of the hot paths. `cargo bench --bench hot_paths`;
//! figures are recorded in the README's performance section.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use cybermesh::edges::store::BlockStore;
use cybermesh::protocol::block::{tx_root, Block, BlockHeader};
use cybermesh::protocol::crypto::{self, BatchItem};
use cybermesh::protocol::event::{sample_anomaly_payload, Event, TxKind};
use cybermesh::protocol::mempool::{Mempool, MempoolConfig, VerifiedTx};
use cybermesh::protocol::state::{State, StateConfig};
use cybermesh::protocol::verify::Incoming;
use cybermesh::protocol::verify::{Verifier, VerifyPolicy};
use cybermesh::Hash32;
use std::sync::Arc;

const NOW: u64 = 1_800_000_000_000;

fn events(key: &crypto::SigningKey, n: usize, ts: u64) -> Vec<Event> {
    (0..n as u64)
        .map(|i| {
            Event::sign(
                TxKind::Anomaly,
                key,
                (i as u128 + ((ts as u128) << 64)).to_be_bytes(),
                sample_anomaly_payload(i, 300),
                ts,
                (i as u32).to_be_bytes(),
            )
        })
        .collect()
}

fn signatures(c: &mut Criterion) {
    let keys: Vec<_> = (0..4).map(|_| crypto::generate_key()).collect();
    let mut g = c.benchmark_group("verify");
    for &n in &[64usize, 256, 1024] {
        // Four producers, as in a small deployment.
        let evs: Vec<Event> = (0..n).flat_map(|i| events(&keys[i % 4], 1, NOW + i as u64)).collect();
        let msgs: Vec<Vec<u8>> = evs.iter().map(|e| e.signed_bytes()).collect();
        let items: Vec<BatchItem> =
            evs.iter().zip(&msgs).map(|(e, m)| BatchItem { key: &e.producer, msg: m, sig: &e.signature }).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("batch_{n}"), |b| b.iter(|| black_box(crypto::verify_batch(black_box(&items)))));
        if n == 256 {
            // The same batch through ed25519-consensus (the reference the
            // accept rule is tested against; this crate's verifier before):
            // the ratio of the two in one run is what our verifier gains.
            g.bench_function("batch_256_reference_ed25519_consensus", |b| {
                b.iter(|| {
                    let mut v = ed25519_consensus::batch::Verifier::new();
                    for it in &items {
                        let vk = ed25519_consensus::VerificationKeyBytes::from(*it.key);
                        v.queue((vk, ed25519_consensus::Signature::from(*it.sig), it.msg));
                    }
                    black_box(v.verify(rand::thread_rng())).unwrap()
                })
            });
            g.bench_function("single_256", |b| {
                b.iter(|| {
                    for it in &items {
                        black_box(crypto::verify_one(it.key, it.msg, it.sig)).unwrap();
                    }
                })
            });
        }
    }
    g.finish();
}

fn shard(c: &mut Criterion) {
    let keys: Vec<_> = (0..4).map(|_| crypto::generate_key()).collect();
    let policy = Arc::new(VerifyPolicy { producers: keys.iter().map(crypto::public_key).collect(), skew_ms: 300_000 });
    let mut g = c.benchmark_group("shard");
    g.throughput(Throughput::Elements(256));
    let mut round = 0u64;
    g.bench_function("process_256", |b| {
        b.iter_batched(
            || {
                // Fresh nonces every round so none is a replay.
                round += 1;
                let batch: Vec<Incoming> = (0..256)
                    .map(|i| Incoming {
                        event: events(&keys[i % 4], 1, NOW - 1000 + round * 256 + i as u64).pop().unwrap(),
                        origin: "bench".into(),
                        pos: None,
                        received_ms: NOW,
                    })
                    .collect();
                (Verifier::new(policy.clone()), batch)
            },
            |(mut v, batch)| {
                let (mut ok, mut bad) = (Vec::with_capacity(256), Vec::new());
                v.process(batch, NOW, NOW, &mut ok, &mut bad);
                assert_eq!(ok.len(), 256);
                ok
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let payload = sample_anomaly_payload(1, 300);
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("content_hash_300B", |b| b.iter(|| cybermesh::sha256(black_box(&payload))));
    let hashes: Vec<Hash32> = (0..500u32).map(|i| cybermesh::sha256(&i.to_be_bytes())).collect();
    g.throughput(Throughput::Elements(500));
    g.bench_function("tx_root_500", |b| b.iter(|| tx_root(black_box(&hashes))));
    g.finish();
}

fn state(c: &mut Criterion) {
    let key = crypto::generate_key();
    let mut g = c.benchmark_group("state");
    g.sample_size(20);
    // A state holding 100k anomalies, then one 500-tx block.
    let mut base =
        State::new(StateConfig { nonce_ttl_ms: u64::MAX / 4, future_skew_ms: u64::MAX / 4, ..StateConfig::default() });
    let mut h = 0;
    for chunk in 0..20u64 {
        let evs = events(&key, 5000, NOW + chunk);
        let pairs: Vec<(&Event, Hash32)> = evs.iter().map(|e| (e, e.tx_hash())).collect();
        h += 1;
        base.execute_block(h, NOW + chunk, &pairs);
    }
    let block = events(&key, 500, NOW + 100);
    let pairs: Vec<(&Event, Hash32)> = block.iter().map(|e| (e, e.tx_hash())).collect();
    g.throughput(Throughput::Elements(500));
    g.bench_function("execute_500_txs_on_100k_keys", |b| {
        b.iter(|| {
            let ex = base.execute_block(h + 1, NOW + 100, &pairs);
            base.rollback(ex.undo);
        })
    });
    // What a snapshot costs the core thread (it takes one reference per
    // `kv` shard), and the copy the snapshot writer makes of it.
    g.throughput(Throughput::Elements(base.len() as u64));
    g.bench_function("snapshot_taken_on_100k_keys", |b| b.iter(|| black_box(base.snapshot_pending([0; 32]))));
    g.bench_function("snapshot_copied_on_100k_keys", |b| b.iter(|| black_box(base.snapshot_unordered([0; 32]))));
    // The first block after a snapshot copies the shards it writes.
    g.throughput(Throughput::Elements(500));
    g.bench_function("execute_500_txs_after_a_snapshot", |b| {
        b.iter_custom(|iters| {
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..iters {
                let held = base.snapshot_pending([0; 32]);
                let t = std::time::Instant::now();
                let ex = base.execute_block(h + 1, NOW + 100, &pairs);
                base.rollback(ex.undo);
                spent += t.elapsed();
                drop(held);
            }
            spent
        })
    });
    g.finish();
}

fn merkle(c: &mut Criterion) {
    use cybermesh::protocol::state::merkle::{SparseMerkleTree, Update};
    let k = |i: u32| cybermesh::sha256(&i.to_le_bytes());
    let mut base = SparseMerkleTree::new();
    base.apply((0..100_000).map(|i| (k(i), Some(k(i + 1)))).collect());
    let mut g = c.benchmark_group("merkle");
    g.sample_size(20);
    // 1,500 updates (a 500-tx block) and 16k updates, sequential vs rayon.
    for n in [1_500u32, 16_000] {
        let ups: Vec<Update> = (0..n).map(|i| (k(i * 7), Some(k(i)))).collect();
        g.throughput(Throughput::Elements(n as u64));
        for (name, threshold) in [("sequential", usize::MAX), ("parallel", 1)] {
            g.bench_function(format!("apply_{n}_{name}_on_100k"), |b| {
                b.iter_batched(
                    || {
                        let mut t = base.clone();
                        t.set_parallel_threshold(threshold);
                        (t, ups.clone())
                    },
                    |(mut t, ups)| {
                        t.apply(ups);
                        t
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    g.finish();
}

fn mempool(c: &mut Criterion) {
    let key = crypto::generate_key();
    let txs: Vec<VerifiedTx> = events(&key, 1000, NOW)
        .into_iter()
        .map(|e| VerifiedTx { tx_hash: e.tx_hash(), event: Arc::new(e), received_ms: 0, pos: None })
        .collect();
    let mut g = c.benchmark_group("mempool");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("admit_1000", |b| {
        b.iter_batched(
            || txs.clone(),
            |txs| {
                let mut m = Mempool::new(MempoolConfig { max_txs: 1000, max_bytes: 10 << 20 });
                for t in txs {
                    m.admit(t);
                }
                m
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let key = crypto::generate_key();
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = BlockStore::open(dir.path(), Default::default()).unwrap();
    let txs: Vec<Arc<Event>> = events(&key, 500, NOW).into_iter().map(Arc::new).collect();
    let tx_hashes: Vec<Hash32> = txs.iter().map(|t| t.tx_hash()).collect();
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    g.throughput(Throughput::Elements(500));
    g.bench_function("append_fsync_500_tx_block", |b| {
        b.iter(|| {
            let header = BlockHeader {
                height: s.height() + 1,
                view: 0,
                timestamp_ms: NOW,
                previous_hash: s.last_hash(),
                tx_root: tx_root(&tx_hashes),
                state_root: [0; 32],
                proposer: [1; 32],
                tx_count: 500,
            };
            let blk = Block { header, txs: txs.clone(), tx_hashes: tx_hashes.clone() };
            s.append(&[(&blk, None)]).unwrap();
        })
    });
    g.finish();
}

/// The block store's I/O primitive, the same bytes two ways (issue 22's
/// question: would glommio's DmaFile make the store faster?): `write` +
/// `fdatasync` through the page cache as the store does today, and a
/// glommio `DmaStreamWriter` (O_DIRECT, io_uring) `write_all` + `sync` on a
/// LocalExecutor, as a persistence executor would, and glommio's buffered
/// io_uring writes + fdatasync. Appends of one 500-tx
/// block's size (~190 KB) to a fresh file under `target/` (the data disk's
/// file system; tmpfs has no O_DIRECT).
fn storage_io(c: &mut Criterion) {
    use std::io::Write as _;
    const BLOCK_BYTES: usize = 190_000;
    let bytes = vec![0x5au8; BLOCK_BYTES];
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(BLOCK_BYTES as u64));
    let mut f = std::fs::File::create(dir.path().join("std.dat")).unwrap();
    g.bench_function("write_fdatasync_190KB_std", |b| {
        b.iter(|| {
            f.write_all(&bytes).unwrap();
            f.sync_data().unwrap();
        })
    });
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).io_memory(1 << 20).make().unwrap();
    let path = dir.path().join("dma.dat");
    let mut w = ex.run(async {
        let file = glommio::io::DmaFile::create(&path).await.unwrap();
        glommio::io::DmaStreamWriterBuilder::new(file).with_buffer_size(256 << 10).with_write_behind(2).build()
    });
    g.bench_function("write_fdatasync_190KB_glommio_dma", |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                use futures_lite::io::AsyncWriteExt as _;
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    w.write_all(&bytes).await.unwrap();
                    w.sync().await.unwrap();
                }
                t.elapsed()
            })
        })
    });
    // io_uring writes through the page cache (glommio's BufferedFile) and
    // its fdatasync: what a persistence executor keeping today's cached
    // writes would do. (`write_at` takes an owned buffer: one more copy.)
    let buffered = ex.run(async { glommio::io::BufferedFile::create(dir.path().join("buffered.dat")).await.unwrap() });
    let mut pos = 0u64;
    g.bench_function("write_fdatasync_190KB_glommio_buffered", |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    pos += buffered.write_at(bytes.clone(), pos).await.unwrap() as u64;
                    buffered.fdatasync().await.unwrap();
                }
                t.elapsed()
            })
        })
    });
    g.finish();
    ex.run(async move {
        use futures_lite::io::AsyncWriteExt as _;
        w.close().await.unwrap();
        buffered.close().await.unwrap();
    });
}

criterion_group!(benches, signatures, shard, hashing, state, merkle, mempool, store, storage_io);
criterion_main!(benches);
