//! What the stages publish for logs, `/status` and `/metrics`: lock-free
//! counters and gauges (`RuntimeStats`) and latency histograms
//! (`Latencies`). A leaf below the API and the runtime: the stages write
//! here, the API thread reads, and neither imports the other for it.

use prometheus::{Histogram, HistogramOpts, HistogramVec};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use crate::protocol::reject::RejectCounters;

/// Counters published by the stages (lock-free), for logs and metrics.
#[derive(Default)]
pub struct RuntimeStats {
    pub received: AtomicU64,
    pub verified: AtomicU64,
    pub rejected: RejectCounters,
    pub duplicates: AtomicU64,
    pub height: AtomicU64,
    pub committed_txs: AtomicU64,
    pub mempool_size: AtomicU64,
    pub mempool_bytes: AtomicU64,
    pub view: AtomicU64,
    pub evidence: AtomicU64,
    /// The database mirror's progress.
    pub mirror: Arc<crate::edges::persist::MirrorStats>,
    pub genesis_done: AtomicBool,
    /// Waiting for or loading a chain snapshot (the join).
    pub joining: AtomicBool,
    /// Blocks behind what f + 1 other validators say they executed.
    pub lag_blocks: AtomicU64,
    /// Validators (others) heard from in the last 5 s.
    pub peers_connected: AtomicU64,
    /// Validator id leading the current view.
    pub leader: AtomicU64,
    pub view_changes: AtomicU64,
    pub blocks_committed: AtomicU64,
    /// PBFT messages received from other validators, by kind.
    pub proposals_received: AtomicU64,
    pub prepares_received: AtomicU64,
    pub commits_received: AtomicU64,
    /// Kafka messages consumed and not finished.
    pub kafka_unfinished: AtomicU64,
    /// Batches waiting in the verify shards' input rings.
    pub ring_occupancy: AtomicU64,
    /// Direct-source client connections open now.
    pub direct_connections: AtomicU64,
    /// Verify shards running, and the microseconds they spent verifying
    /// (all shards summed): their busy share is its rate ÷ 10⁶ ÷ shards.
    pub verify_shards: AtomicU64,
    pub verify_busy_us: AtomicU64,
    /// The mempool's configured limits (MEMPOOL_MAX_TXS, MEMPOOL_MAX_BYTES).
    pub mempool_max_txs: AtomicU64,
    pub mempool_max_bytes: AtomicU64,
    /// A database mirror is configured (DB_MIRROR_ENABLED): 0 or 1.
    pub mirror_enabled: AtomicU64,
    /// The data directory's file system: bytes free to the validator and in
    /// all (refreshed by the core once a second).
    pub storage_free_bytes: AtomicU64,
    pub storage_size_bytes: AtomicU64,
    /// The lowest block height stored (those below were pruned), the
    /// blocks pruned since the start, and the block store's bytes.
    pub lowest_stored: AtomicU64,
    pub pruned_blocks: AtomicU64,
    pub block_store_bytes: AtomicU64,
    /// Bytes sent to / received from the other validators (copied from the
    /// transport's counters by the core loop).
    pub p2p_bytes_sent: AtomicU64,
    pub p2p_bytes_received: AtomicU64,
    pub latencies: Arc<Latencies>,
    /// The validator set as `/validators` shows it (refreshed every second
    /// by the core; the lock is taken once a second, not per tx).
    pub validators_json: Mutex<Option<Arc<serde_json::Value>>>,
    /// Every validator set epoch as `/epochs` shows it (refreshed with it).
    pub epochs_json: Mutex<Option<Arc<serde_json::Value>>>,
}

/// Latency histograms observed by the stages (milliseconds).
pub struct Latencies {
    /// Block timestamp (the proposal's) to commit at this validator.
    pub consensus_round: Histogram,
    /// One mirror batch (transaction) in the database.
    pub persistence: Histogram,
    /// Leader: mempool to encoded proposal.
    pub block_build: Histogram,
    /// A committed block through the state machine (to its state root).
    pub state_execution: Histogram,
    /// Kafka message timestamp to consumed by this validator.
    pub kafka_consume: Histogram,
    /// Commit-event batch: sent to acknowledged by the broker.
    pub kafka_produce: Histogram,
    /// Where each tx's time goes, stage by stage (`TX_STAGES`), one
    /// observation per tx: `tx_stage_latency_ms{stage}`.
    pub tx_stage: HistogramVec,
    /// Its children, resolved once (the hot path observes per tx).
    tx_stages: Vec<Histogram>,
}

/// The stages of `tx_stage_latency_ms`, in pipeline order, each from the
/// end of the one before: read by the source → verified (`verify`) →
/// proposed by the primary (`queue`) → prepared (`prepare`) → committed
/// (`commit`) → executed (`execute`) → durable in the block store
/// (`durable`). `queue` is the primary's only.
pub const TX_STAGES: [&str; 6] = ["verify", "queue", "prepare", "commit", "execute", "durable"];

impl Latencies {
    /// The histogram of one of `TX_STAGES`.
    pub fn stage(&self, name: &str) -> &Histogram {
        let i = TX_STAGES.iter().position(|s| *s == name).expect("a known stage");
        &self.tx_stages[i]
    }
}

fn ms_histogram(name: &str, help: &str) -> Histogram {
    let buckets = vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

/// For work inside the core, which takes well under a millisecond per block.
fn sub_ms_histogram(name: &str, help: &str) -> Histogram {
    let buckets = vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0];
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

impl Default for Latencies {
    fn default() -> Self {
        let buckets = vec![
            0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 750.0,
            1000.0, 2000.0, 5000.0,
        ];
        let opts =
            HistogramOpts::new("tx_stage_latency_ms", "Time each tx spends in a pipeline stage").buckets(buckets);
        let tx_stage = HistogramVec::new(opts, &["stage"]).expect("valid histogram");
        let tx_stages = TX_STAGES.iter().map(|s| tx_stage.with_label_values(&[s])).collect();
        Latencies {
            consensus_round: ms_histogram(
                "consensus_round_latency_ms",
                "Time from a block's proposal timestamp to its commit here",
            ),
            block_build: sub_ms_histogram("block_build_latency_ms", "Time for the leader to build one proposal"),
            state_execution: sub_ms_histogram(
                "state_execution_latency_ms",
                "Time to execute one committed block (state machine and state root)",
            ),
            persistence: ms_histogram("persistence_latency_ms", "Time to write one mirror batch"),
            kafka_consume: ms_histogram("kafka_consume_latency_ms", "Kafka message timestamp to consumed"),
            kafka_produce: ms_histogram("kafka_produce_latency_ms", "Commit events sent to acknowledged"),
            tx_stage,
            tx_stages,
        }
    }
}

/// What a figure is to Prometheus: a counter only ever grows (since the
/// process started), a gauge is a level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// What the figures are read from at a scrape: the stages' stats and the
/// validator set's fixed sizes.
pub struct Figures<'a> {
    pub stats: &'a RuntimeStats,
    pub quorum: u64,
    pub validators: u64,
}

/// How a figure is read: one value, or one per label value.
#[derive(Clone, Copy)]
pub enum Read {
    One(fn(&Figures) -> u64),
    ByLabel(&'static str, fn(&Figures) -> Vec<(&'static str, u64)>),
}

/// One figure of `/metrics`, declared once (as Firedancer's metrics
/// declarations): its name, kind, help and how it is read. The export (and
/// its test) come from this table; nothing else registers these names.
pub struct MetricDecl {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
    pub read: Read,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

const fn decl(name: &'static str, kind: MetricKind, help: &'static str, read: fn(&Figures) -> u64) -> MetricDecl {
    MetricDecl { name, kind, help, read: Read::One(read) }
}

use MetricKind::{Counter, Gauge};

/// Every counter and gauge of `/metrics` (the latency histograms are
/// `Latencies`).
pub const METRICS: &[MetricDecl] = &[
    decl("consensus_view", Gauge, "Current view", |f| load(&f.stats.view)),
    decl("consensus_height", Gauge, "Height of the last committed block", |f| load(&f.stats.height)),
    decl("consensus_lag_blocks", Gauge, "Blocks behind what f + 1 other validators executed", |f| {
        load(&f.stats.lag_blocks)
    }),
    decl("consensus_leader_id", Gauge, "Validator id leading the current view", |f| load(&f.stats.leader)),
    decl("consensus_quorum_size", Gauge, "Votes needed (N - f)", |f| f.quorum),
    decl("consensus_validator_count", Gauge, "Validators in the set", |f| f.validators),
    decl("consensus_view_changes_total", Counter, "View changes seen by this validator", |f| {
        load(&f.stats.view_changes)
    }),
    decl("consensus_blocks_committed", Counter, "Blocks committed since start", |f| load(&f.stats.blocks_committed)),
    decl("consensus_proposals_total", Counter, "Pre-prepares received from other validators", |f| {
        load(&f.stats.proposals_received)
    }),
    decl("consensus_prepares_total", Counter, "Prepare votes received from other validators", |f| {
        load(&f.stats.prepares_received)
    }),
    decl("consensus_commits_total", Counter, "Commit votes received from other validators", |f| {
        load(&f.stats.commits_received)
    }),
    decl("consensus_committed_txs_total", Counter, "Transactions committed since start", |f| {
        load(&f.stats.committed_txs)
    }),
    decl("consensus_misbehaviour_total", Counter, "Misbehaviour reports with proof", |f| load(&f.stats.evidence)),
    decl("mempool_size", Gauge, "Transactions in the mempool", |f| load(&f.stats.mempool_size)),
    decl("mempool_bytes", Gauge, "Bytes in the mempool", |f| load(&f.stats.mempool_bytes)),
    decl("p2p_peers_connected", Gauge, "Validators heard from in the last 5 s", |f| load(&f.stats.peers_connected)),
    decl("p2p_bytes_sent_total", Counter, "Bytes of consensus frames sent to other validators", |f| {
        load(&f.stats.p2p_bytes_sent)
    }),
    decl("p2p_bytes_received_total", Counter, "Bytes of consensus frames received from other validators", |f| {
        load(&f.stats.p2p_bytes_received)
    }),
    decl("database_connections_active", Gauge, "Open mirror connections", |f| {
        f.stats.mirror.connected.load(std::sync::atomic::Ordering::Relaxed) as u64
    }),
    decl("persistence_height", Gauge, "Highest height mirrored to the database", |f| load(&f.stats.mirror.height)),
    decl("kafka_consumer_lag", Gauge, "Kafka messages consumed and not yet finished", |f| {
        load(&f.stats.kafka_unfinished)
    }),
    decl("ingest_received_total", Counter, "Inputs received from the sources", |f| load(&f.stats.received)),
    decl("ingest_direct_connections", Gauge, "Direct-source client connections open", |f| {
        load(&f.stats.direct_connections)
    }),
    MetricDecl {
        name: "ingest_rejected_total",
        kind: Counter,
        help: "Inputs sent to the DLQ, by reason",
        read: Read::ByLabel("reason", |f| {
            crate::protocol::reject::RejectReason::ALL.iter().map(|&r| (r.as_str(), f.stats.rejected.get(r))).collect()
        }),
    },
    decl("ring_occupancy_batches", Gauge, "Batches waiting in the verify shards' input rings", |f| {
        load(&f.stats.ring_occupancy)
    }),
    decl("verify_shards", Gauge, "Signature verification shards running", |f| load(&f.stats.verify_shards)),
    decl("verify_busy_us_total", Counter, "Microseconds the verify shards spent verifying (all shards)", |f| {
        load(&f.stats.verify_busy_us)
    }),
    decl("mempool_max_txs", Gauge, "The mempool's limit in transactions (MEMPOOL_MAX_TXS)", |f| {
        load(&f.stats.mempool_max_txs)
    }),
    decl("mempool_max_bytes", Gauge, "The mempool's limit in bytes (MEMPOOL_MAX_BYTES)", |f| {
        load(&f.stats.mempool_max_bytes)
    }),
    decl("persistence_enabled", Gauge, "1 if blocks are mirrored to a database", |f| load(&f.stats.mirror_enabled)),
    decl("storage_free_bytes", Gauge, "Bytes free to the validator on its data directory's file system", |f| {
        load(&f.stats.storage_free_bytes)
    }),
    decl("storage_size_bytes", Gauge, "Size of the data directory's file system", |f| {
        load(&f.stats.storage_size_bytes)
    }),
    decl("storage_lowest_block_height", Gauge, "The lowest block height stored; those below were pruned", |f| {
        load(&f.stats.lowest_stored)
    }),
    decl("storage_pruned_blocks_total", Counter, "Blocks pruned (STORAGE_RETAIN_BLOCKS) since the start", |f| {
        load(&f.stats.pruned_blocks)
    }),
    decl("storage_block_store_bytes", Gauge, "Bytes in the block store's segment files", |f| {
        load(&f.stats.block_store_bytes)
    }),
];

/// `METRICS` read now, as Prometheus metric families.
pub fn collect(f: &Figures) -> Vec<prometheus::proto::MetricFamily> {
    use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};
    let metric = |kind: MetricKind, value: u64, label: Option<(&str, &str)>| {
        let mut m = Metric::default();
        match kind {
            MetricKind::Counter => {
                let mut c = proto::Counter::default();
                c.set_value(value as f64);
                m.set_counter(c);
            }
            MetricKind::Gauge => {
                let mut g = proto::Gauge::default();
                g.set_value(value as f64);
                m.set_gauge(g);
            }
        }
        if let Some((name, value)) = label {
            let mut l = LabelPair::default();
            l.set_name(name.to_string());
            l.set_value(value.to_string());
            m.set_label(vec![l]);
        }
        m
    };
    METRICS
        .iter()
        .map(|d| {
            let mut fam = MetricFamily::default();
            fam.set_name(d.name.to_string());
            fam.set_help(d.help.to_string());
            fam.set_field_type(match d.kind {
                MetricKind::Counter => MetricType::COUNTER,
                MetricKind::Gauge => MetricType::GAUGE,
            });
            fam.set_metric(match d.read {
                Read::One(read) => vec![metric(d.kind, read(f), None)],
                Read::ByLabel(label, read) => {
                    read(f).into_iter().map(|(v, n)| metric(d.kind, n, Some((label, v)))).collect()
                }
            });
            fam
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn each_metric_is_declared_once_exported_with_its_kind_and_documented() {
        let mut names: Vec<&str> = METRICS.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRICS.len(), "a name declared twice");
        for d in METRICS {
            if d.name.ends_with("_total") {
                assert_eq!(d.kind, MetricKind::Counter, "{} is named as a counter", d.name);
            }
        }
        let stats = RuntimeStats::default();
        stats.view_changes.store(3, std::sync::atomic::Ordering::Relaxed);
        stats.rejected.add(crate::protocol::reject::RejectReason::BadSignature);
        let fams = collect(&Figures { stats: &stats, quorum: 3, validators: 4 });
        let mut buf = vec![];
        prometheus::TextEncoder::new().encode(&fams, &mut buf).unwrap();
        let page = String::from_utf8(buf).unwrap();
        for d in METRICS {
            let kind = match d.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
            };
            assert!(page.contains(&format!("# TYPE {} {kind}\n", d.name)), "{}: {page}", d.name);
        }
        assert!(page.contains("consensus_view_changes_total 3\n"), "{page}");
        assert!(page.contains("consensus_quorum_size 3\n") && page.contains("consensus_validator_count 4\n"));
        assert!(page.contains("ingest_rejected_total{reason=\"bad_signature\"} 1\n"), "{page}");
        // The operator's manual lists every one.
        let readme = include_str!("../../README.md");
        for d in METRICS {
            assert!(readme.contains(&format!("`{}", d.name)), "README does not list {}", d.name);
        }
    }
}
