//! What the stages publish for logs, `/status` and `/metrics`: lock-free
//! counters and gauges (`RuntimeStats`) and latency histograms
//! (`Latencies`). A leaf below the API and the runtime: the stages write
//! here, the API thread reads, and neither imports the other for it.

use prometheus::{Histogram, HistogramOpts, HistogramVec};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use crate::dlq::RejectCounters;

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
    pub mirror: Arc<crate::persist::MirrorStats>,
    pub genesis_done: AtomicBool,
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
    /// Bytes sent to / received from the other validators (copied from the
    /// transport's counters by the core loop).
    pub p2p_bytes_sent: AtomicU64,
    pub p2p_bytes_received: AtomicU64,
    pub latencies: Arc<Latencies>,
    /// The validator set as `/validators` shows it (refreshed every second
    /// by the core; the lock is taken once a second, not per tx).
    pub validators_json: Mutex<Option<Arc<serde_json::Value>>>,
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
