//! The sans-I/O core of one validator: mempool, PBFT replica and state
//! machine, driven by events (`on_txs`, `on_message`, `on_tick`) with the
//! time passed in, producing [`Output`]s for the runtime to carry out in
//! order. No clocks, sockets or threads in here; the runtime and the tests
//! drive it alike.
//!
//! ```text
//! verified txs ─► mempool ─► (primary) proposal ─► PBFT ─► committed value
//!                    ▲                                          │
//!   backups check proposals (proposal::check)      execute ─► block + state root
//! ```
//! Proposals name their txs by hash (`proposal::TxRef`): a backup resolves
//! them against its own mempool and asks peers for the bodies it lacks
//! (`Output::FetchTxs`, `bodies`) before it checks and prepares; a
//! committed value whose bodies are missing waits in the execution queue
//! until they arrive, and nothing after it executes first.
//! A committed value becomes the block at height = PBFT sequence number (a
//! null value becomes an empty block), so heights and sequence numbers agree
//! and the block store doubles as PBFT's committed log for catch-up.

use crate::protocol::block::{tx_root, Block, BlockHeader, BuilderConfig};
use crate::protocol::bodies::{ask_order, Bodies};
use crate::protocol::clock::Now;
use crate::protocol::consensus::genesis::{Genesis, GenesisError, GenesisOutput, ReadyAttestation};
use crate::protocol::consensus::pbft::{
    without_value, Action, Auth, Checkpoint, CommitCert, EpochAuth, Message, Params, PrePrepare, Proof, Record,
    Replica, Rid, Seq, Signed, View,
};
use crate::protocol::consensus::wire::MAX_FETCH_TXS;
use crate::protocol::crypto::PublicKey;
use crate::protocol::event::{Event, Limits};
use crate::protocol::mempool::{Admit, Mempool, MempoolConfig, VerifiedTx};
use crate::protocol::proposal::{self, CheckContext, Named, Proposal};
use crate::protocol::reject::{RejectReason, Rejection};
/// Leader reputation lives in its own module; re-exported where it was.
pub use crate::protocol::reputation::Reputation;
use crate::protocol::snapshot::{self, JoinStep};
use crate::protocol::state::{Executed, Receipt, State, TxStatus};
use crate::protocol::verify::VerifyPolicy;
use crate::Hash32;
// Per-tx maps: foldhash (randomly seeded, like std's SipHash, and several
// times cheaper per look-up on the core thread).
use foldhash::{HashMap, HashMapExt};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Retransmit intervals a validator waits, after executing a switch
/// height, for the old set's checkpoint there to become stable before it
/// hands over without it (see `Node::switch_due`).
const SWITCH_WAIT_RETRANSMITS: u64 = 10;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub builder: BuilderConfig,
    pub mempool: MempoolConfig,
    pub limits: Limits,
    /// What txs in other validators' proposals are checked against.
    pub policy: Arc<VerifyPolicy>,
    /// Tolerance for a proposal's timestamp ahead of this validator's clock.
    pub skew_ms: u64,
    /// Validator keys; index = replica id.
    pub validators: Vec<PublicKey>,
    /// Record a chain snapshot every this many blocks (0: never); a
    /// multiple of the checkpoint interval.
    pub snapshot_interval: u64,
}

/// What the runtime must do. Executors take a step's outputs as a
/// [`Ready`], which puts them in the order durability asks for.
#[derive(Debug)]
pub enum Output {
    /// Send to the DLQ.
    Reject(Rejection),
    /// Append to the consensus log; durable before any later send.
    Persist(Record),
    Send(Rid, Message),
    Broadcast(Message),
    /// Txs this backup holds that the primary has not proposed: send them
    /// to `to` (the primary) as a tx forward (no durability needed).
    Forward {
        to: Rid,
        txs: Vec<Arc<Event>>,
    },
    /// A peer asks for committed blocks from `from_seq` on: answer from the
    /// block store with `Message::Committed` (it fetches the bodies it lacks).
    ServeFetch {
        to: Rid,
        from_seq: Seq,
    },
    /// Ask `to` for the bodies of these txs of the value at `seq`.
    FetchTxs {
        to: Rid,
        seq: Seq,
        tx_hashes: Vec<Hash32>,
    },
    /// Send `to` these tx bodies of the value at `seq` (a fetch answered).
    SendTxs {
        to: Rid,
        seq: Seq,
        txs: Vec<Arc<Event>>,
    },
    /// `to` asks for txs of the value at `seq` that are no longer in
    /// memory here: answer (labelled `seq`) with those the committed block
    /// at `height` holds, from the block store. `height` is `seq` itself,
    /// or an earlier block that committed the same txs (a new-view may
    /// re-propose a value whose txs committed meanwhile).
    ServeBlockTxs {
        to: Rid,
        seq: Seq,
        height: u64,
        tx_hashes: Vec<Hash32>,
    },
    /// A committed block: make it durable with its certificate, then publish.
    Commit {
        block: Arc<Block>,
        cert: CommitCert,
        receipts: Vec<Receipt>,
        /// Kept with the block: what egress events are made from.
        outcome: crate::proto::BlockOutcome,
    },
    /// A complete chain snapshot (state, reputation, and the q-signed proof
    /// of its stable checkpoint): write it and serve it to joining
    /// validators from now on (it follows the `Persist(Stable)` it proves).
    Snapshot(Box<crate::protocol::snapshot::Recorded>),
    /// A validator misbehaved, with proof checked by the replica or proposal
    /// checks (for logs, metrics and reputation).
    Evidence {
        culprit: Rid,
        what: String,
    },
    /// This validator entered `view`, led by `primary` (for logs, the audit
    /// log and metrics; counted in `NodeStats::view_changes`).
    ViewChanged {
        view: View,
        primary: Rid,
        cause: crate::protocol::consensus::pbft::ViewChangeCause,
        /// The chain's height here then.
        height: u64,
    },
    /// Committed proof of misbehaviour quarantined `validator` at `height`.
    Quarantined {
        validator: Rid,
        height: u64,
    },
    /// The genesis ceremony's: send an attestation, write the certificate
    /// (durable before any later output: consensus starts on it), or warn
    /// that validators are still silent.
    Genesis(GenesisOutput),
    /// Joining: ask `to` (with `None`, every peer) for a snapshot chunk.
    SnapshotRequest {
        to: Option<Rid>,
        request: crate::proto::SnapshotRequest,
    },
    /// `to` asks for a chunk of the snapshot this validator serves: answer
    /// with `snapshot::answer` (a chunk saying "none" if there is none).
    ServeSnapshot {
        to: Rid,
        request: crate::proto::SnapshotRequest,
    },
    /// Joined from this verified snapshot: write `bytes` as `blocks.base`
    /// (durable before any later output), start the block store above
    /// `header`, and serve the snapshot from now on.
    Joined {
        header: BlockHeader,
        bytes: Arc<Vec<u8>>,
    },
    /// A validator set change took effect: block `epoch.from_height` (the
    /// old set's last) executed, and from this output on replica ids are
    /// the new set's (`epoch.validators` in id order). `me`: this
    /// validator's id there, None if the change removed it (it orders
    /// nothing more; the host stops it). Comes alone in its `Ready`, after
    /// the record that starts the new epoch's consensus log.
    EpochSwitched {
        epoch: crate::protocol::reconfig::Epoch,
        me: Option<Rid>,
    },
    /// f + 1 peers have pruned the blocks this validator needs next (so at
    /// least one honest one did): it cannot catch up block by block. The
    /// host moves its block store aside (the consensus log stays: its votes
    /// are remembered) and starts again, joining from a snapshot.
    Rejoin {
        /// This validator's executed height.
        height: u64,
        /// The lowest height those peers store.
        lowest: u64,
    },
}

/// A committed block as [`Ready`] hands it on: make it durable with its
/// certificate, then publish.
#[derive(Debug)]
pub struct Committed {
    pub block: Arc<Block>,
    pub cert: CommitCert,
    pub receipts: Vec<Receipt>,
    pub outcome: crate::proto::BlockOutcome,
}

/// One step's outputs sorted by what must be durable before what (as
/// raft-rs's `Ready` with its `must_sync`). The executor, the runtime's or
/// the simulator's, does exactly this, in this order:
/// 1. every output of `effects`, in order (DLQ records, tx forwards and
///    fetches, files written atomically: the genesis certificate and
///    `blocks.base` are durable before anything after them);
/// 2. append `records` to the consensus log and sync (one sync for all);
/// 3. send `sends` (each may depend on any record of step 2);
/// 4. append `commits` to the block store and sync;
/// 5. send `after_commits`: the checkpoints, which vouch for executed
///    blocks, go out only once those are durable here, so a stable
///    checkpoint (and a snapshot it proves) never sits over a block that a
///    quorum might all lose in a crash (sim seed 747687819569);
/// 6. publish the commits.
#[derive(Debug, Default)]
pub struct Ready {
    pub effects: Vec<Output>,
    pub records: Vec<Record>,
    /// A `Record::Stable` is among `records`: the log may be compacted.
    pub stable: bool,
    /// Protocol messages, to one validator or (`None`) to every other one.
    pub sends: Vec<(Option<Rid>, Message)>,
    pub commits: Vec<Committed>,
    pub after_commits: Vec<(Option<Rid>, Message)>,
}

impl Ready {
    pub fn from_outputs(out: impl IntoIterator<Item = Output>) -> Ready {
        let mut r = Ready::default();
        let mut sends = vec![];
        for o in out {
            match o {
                Output::Persist(rec) => {
                    r.stable |= matches!(rec, Record::Stable { .. });
                    r.records.push(rec);
                }
                Output::Send(to, m) => sends.push((Some(to), m)),
                Output::Broadcast(m) => sends.push((None, m)),
                Output::Commit { block, cert, receipts, outcome } => {
                    r.commits.push(Committed { block, cert, receipts, outcome })
                }
                other => r.effects.push(other),
            }
        }
        let commits = !r.commits.is_empty();
        for (to, m) in sends {
            match m {
                Message::Checkpoint(_) if commits => r.after_commits.push((to, m)),
                m => r.sends.push((to, m)),
            }
        }
        r
    }
}

/// Counters the runtime publishes as metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct NodeStats {
    pub admitted: u64,
    /// Exact repeats of a tx pending or committed here (redelivery,
    /// resends): dropped and counted, never dead-lettered.
    pub duplicates: u64,
    /// Txs refused by execution for their producer's rate (receipts).
    pub rate_limited: u64,
    /// Views this backup left because the primary kept passing over txs
    /// it holds while ordering later ones.
    pub censorship_suspicions: u64,
    /// Txs this backup forwarded to the primary.
    pub forwarded: u64,
    /// Forwarded txs this validator received and admitted / refused
    /// (failed verification: a faulty forwarder, or clock skew).
    pub forwards_admitted: u64,
    pub forwards_refused: u64,
    /// Tx bodies this validator asked peers for (asks sent) and received
    /// (bodies it lacked for a value to prepare or execute).
    pub fetch_asks: u64,
    pub txs_fetched: u64,
    /// Tx bodies sent to peers that asked.
    pub txs_served: u64,
    pub committed_txs: u64,
    pub committed_blocks: u64,
    pub proposals_refused: u64,
    pub view_changes: u64,
    /// Chain snapshots that failed verification while joining, and joins
    /// completed from one.
    pub snapshots_refused: u64,
    pub joined_from_snapshot: u64,
}

/// What this validator observed of each validator (reputation inputs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Conduct {
    pub blocks_proposed: u64,
    pub invalid_proposals: u64,
    pub equivocations: u64,
    /// Views it led that ended in a view change.
    pub failed_views: u64,
}

/// A stage of the core whose duration the host may measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Taking txs from the mempool and encoding a proposal (leader).
    BuildBlock,
    /// Executing a committed block through the state machine (state root).
    Execute,
}

/// Where a tx's time goes inside consensus, each stage from the end of the
/// previous one (ms of the host's `now_ms`; for the per-stage latency
/// histograms, `take_latencies`). Verification before and durability after
/// are measured by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStage {
    /// Admitted (verified) here to put in a proposal (primary only).
    Queue,
    /// Pre-prepare sent (primary) or received (backup) to prepared here:
    /// resolving bodies, checking, the prepare round.
    Prepare,
    /// Prepared to committed (the commit round).
    Commit,
    /// Committed to executed (bodies this validator waited for, and the
    /// state machine).
    Execute,
}

impl TxStage {
    pub const ALL: [TxStage; 4] = [TxStage::Queue, TxStage::Prepare, TxStage::Commit, TxStage::Execute];
    pub fn as_str(self) -> &'static str {
        match self {
            TxStage::Queue => "queue",
            TxStage::Prepare => "prepare",
            TxStage::Commit => "commit",
            TxStage::Execute => "execute",
        }
    }
}

/// When this validator saw a slot's value reach each phase (ms).
#[derive(Debug, Default, Clone, Copy)]
struct SlotTimes {
    pre_prepared_ms: Option<u64>,
    prepared_ms: Option<u64>,
    committed_ms: Option<u64>,
}

/// Latency samples kept until the host drains them (bounded: dropped past it).
const MAX_LATENCY_SAMPLES: usize = 8192;

/// A monotonic host clock in nanoseconds, for observability only: the core
/// reads it around its two costly stages and hands the durations out
/// (`take_stage_times`); a reading never feeds a decision, so the core stays
/// deterministic (the simulator and unit tests run without one).
pub type Stopwatch = fn() -> u64;

/// Stage durations kept until the host drains them (bounded: dropped past it).
const MAX_STAGE_TIMES: usize = 1024;

/// A tx of a value in flight: its hash, and its nonce if the body is here.
type InflightTx = (Hash32, Option<[u8; 16]>);

/// A committed value waiting to execute.
#[derive(Debug)]
struct Queued {
    seq: Seq,
    cert: CommitCert,
    body: QueuedBody,
}

#[derive(Debug)]
enum QueuedBody {
    Ready(Proposal),
    Missing(Bodies),
}

pub struct Node<A: Auth + Clone> {
    cfg: NodeConfig,
    mempool: Mempool,
    /// Admitted by the shards but not yet fitting in the mempool.
    backlog: VecDeque<VerifiedTx>,
    state: State,
    /// Txs of values in flight (pre-prepared in the current view, not yet
    /// executed), by nonce: kept out of new proposals, and a proposal that
    /// repeats one at another seq is refused. Rebuilt from the replica's
    /// log whenever the view changed (`inflight_view`).
    inflight: HashMap<[u8; 16], (Seq, Hash32)>,
    /// The same by tx hash: also the txs whose bodies are not here.
    inflight_tx: HashMap<Hash32, Seq>,
    inflight_by_seq: BTreeMap<Seq, Vec<InflightTx>>,
    inflight_view: Option<View>,
    /// The txs of the last `RECENT_WINDOWS` windows of executed blocks, by
    /// tx hash: the height that committed each. A new-view may re-propose a
    /// value prepared in an older view whose txs committed since (within a
    /// window of it); their bodies are then in no mempool, only in that
    /// block, and fetches are answered from it.
    recent_tx: HashMap<Hash32, u64>,
    recent_by_height: VecDeque<(u64, Vec<Hash32>)>,
    /// Admission time here of the newest tx the current view ordered: a
    /// pending tx admitted more than the order timeout before it was
    /// passed over (censorship check, `on_tick`).
    newest_ordered_received_ms: u64,
    next_order_check_ms: u64,
    /// Txs forwarded to the primary of the current view (cleared at a view
    /// change; pruned to the mempool's txs).
    forwarded: foldhash::HashSet<Hash32>,
    /// When a backup alone in a view change forwards its txs again.
    next_forward_retry_ms: u64,
    /// Forwarded txs verified per sender in this budget window (a faulty
    /// validator cannot make this one verify without a bound).
    forward_budget: Vec<usize>,
    /// Tx bodies served per sender in this budget window.
    serve_budget: Vec<usize>,
    /// When the budgets refill (a window of `BUDGET_WINDOW_MS`, counted
    /// where they are spent, so it does not depend on how often ticks come).
    budgets_refill_ms: u64,
    /// Pre-prepares of the current view (within the window) whose bodies
    /// are not all here yet, or that wait for execution to catch up.
    awaiting: BTreeMap<Seq, (Signed<PrePrepare>, Bodies)>,
    /// Values the replica committed, in order, waiting for their bodies
    /// (only the first can be missing any: the rest wait behind it).
    exec_queue: VecDeque<Queued>,
    last: Option<BlockHeader>,
    replica: Replica<A>,
    view: View,
    last_proposal_ms: u64,
    last_proposal_ts: u64,
    /// The host's wall clock at the latest input (block timestamps and the
    /// skew checks); every other time field here is monotonic.
    wall_ms: u64,
    /// Proposals made here or that passed `proposal::check`, decoded, by
    /// digest (bounded): checked once, and executed without decoding again.
    checked: HashMap<Hash32, Arc<Proposal>>,
    checked_order: VecDeque<Hash32>,
    conduct: Vec<Conduct>,
    reputation: Reputation,
    /// Verified proofs of misbehaviour not yet committed, and whether this
    /// validator has put them in a proposal of the current view.
    proofs: Vec<(Proof, bool)>,
    stats: NodeStats,
    actions: Vec<Action>,
    /// Kafka messages whose txs were dropped as duplicates (finished).
    dropped: Vec<crate::protocol::source::SourcePos>,
    stopwatch: Option<Stopwatch>,
    stage_times: Vec<(Stage, u64)>,
    /// The host says its source has txs not yet verified (see
    /// `set_source_busy`).
    source_busy: bool,
    /// Phase times of the slots in the window (pruned as they execute).
    slot_times: BTreeMap<Seq, SlotTimes>,
    /// (stage, ms, txs): `txs` txs spent `ms` in `stage`.
    latencies: Vec<(TxStage, u64, u32)>,
    /// The snapshot recorded at the newest snapshot height, waiting for
    /// the checkpoint there to become stable (its proof).
    pending_snapshot: Option<Box<crate::protocol::snapshot::Recorded>>,
    /// The genesis ceremony (None with one validator): everything else
    /// waits until it is done; then it only answers late peers.
    genesis: Option<Box<Genesis>>,
    /// Some while this validator, with an empty store, looks for a chain
    /// snapshot to start from: consensus waits (see `start_joining`).
    joining: Option<Box<Joining<A>>>,
    /// Peers that said they pruned the blocks this validator fetched, with
    /// the lowest height each stores (at most one entry per peer).
    pruned_by: BTreeMap<Rid, u64>,
    /// The switch height executed: a tick hands over to the new set's
    /// replica (`switch_epoch`) once the old set's checkpoint there is
    /// stable (its proof completes the snapshot at H, which a validator the
    /// change adds joins from), or at `switch_by_ms` at the latest (a
    /// checkpoint that never completes, with peers gone ahead, does not
    /// hold this one back). A peer's word that it switched does not cut the
    /// wait short: a Byzantine one could then deny the snapshot at H.
    switch_due: bool,
    switch_by_ms: u64,
    /// Set once a change removed this validator: it orders nothing more.
    removed: bool,
    /// The consensus records the next epoch's replica wrote before a
    /// restart that lost the switch block (recovery found them after the
    /// log's epoch marker): restored into that replica at the switch.
    next_epoch_records: Option<(u64, Vec<Record>)>,
    /// When each peer's heartbeat from another epoch may prompt a fetch or
    /// a fetch's answer again (`on_other_epoch`).
    other_epoch_ms: Vec<u64>,
}

/// The snapshot join: the transfer (from the end of genesis), and what the
/// snapshot is verified with.
struct Joining<A> {
    join: Option<snapshot::Join>,
    setup: snapshot::JoinSetup<A>,
    /// When a member-only join asks again after every peer's snapshot was
    /// refused (not naming this validator yet).
    again_at_ms: u64,
}

impl<A: EpochAuth> Node<A> {
    /// `state` must reflect every block up to `last`, and `replica` must have
    /// executed exactly as many values (see `runtime` recovery).
    /// `reputation` must have seen every block up to `last` (the runtime
    /// replays them); its exclusions apply at once, or from the next view
    /// if the replica recorded who may lead its current view.
    pub fn new(
        cfg: NodeConfig,
        mut replica: Replica<A>,
        state: State,
        last: Option<BlockHeader>,
        reputation: Reputation,
        now: Now,
    ) -> Self {
        let height = last.as_ref().map_or(0, |h| h.height);
        // The replica's set names proposers and sizes the per-peer tables
        // (the configured set is the genesis one).
        let mut cfg = cfg;
        if let Some(e) = state.epoch(replica.epoch()) {
            cfg.validators = e.validators.values().copied().collect();
        }
        assert_eq!(cfg.validators.len(), replica.params().n, "the replica's set is the node's");
        if replica.excluded_recorded() {
            // Who leads the current view was recorded when this validator
            // entered it; what the chain says now applies from the next.
            replica.exclude_from_next_view(reputation.excluded().iter().copied());
        } else {
            replica.set_excluded(reputation.excluded().iter().copied());
        }
        assert_eq!(state.height(), height, "state and last block disagree");
        assert_eq!(replica.executed(), height, "replica and block store disagree");
        Node {
            mempool: Mempool::new(cfg.mempool),
            backlog: VecDeque::new(),
            inflight: HashMap::new(),
            inflight_tx: HashMap::new(),
            inflight_by_seq: Default::default(),
            inflight_view: None,
            recent_tx: HashMap::new(),
            recent_by_height: VecDeque::new(),
            newest_ordered_received_ms: 0,
            next_order_check_ms: 0,
            forwarded: Default::default(),
            next_forward_retry_ms: 0,
            forward_budget: vec![0; cfg.validators.len()],
            serve_budget: vec![0; cfg.validators.len()],
            budgets_refill_ms: 0,
            awaiting: BTreeMap::new(),
            exec_queue: VecDeque::new(),
            state,
            last_proposal_ts: last.as_ref().map_or(0, |h| h.timestamp_ms),
            last,
            view: replica.view(),
            replica,
            last_proposal_ms: now.mono_ms,
            wall_ms: now.wall_ms,
            checked: HashMap::new(),
            checked_order: VecDeque::new(),
            conduct: vec![Conduct::default(); cfg.validators.len()],
            reputation,
            proofs: vec![],
            stats: NodeStats::default(),
            actions: Vec::new(),
            dropped: Vec::new(),
            stopwatch: None,
            stage_times: Vec::new(),
            slot_times: BTreeMap::new(),
            latencies: Vec::new(),
            source_busy: false,
            pending_snapshot: None,
            genesis: None,
            joining: None,
            pruned_by: BTreeMap::new(),
            switch_due: false,
            switch_by_ms: 0,
            removed: false,
            next_epoch_records: None,
            other_epoch_ms: vec![0; cfg.validators.len()],
            cfg,
        }
        .with_epoch_schedule()
    }

    /// Applies what the state says of validator set changes: a scheduled
    /// one caps the replica at its switch height; one the state made
    /// current that the replica does not run yet is switched to.
    fn with_epoch_schedule(mut self) -> Self {
        if let Some(next) = self.state.scheduled_epoch() {
            self.replica.set_ceiling(next.from_height);
        }
        let current = self.state.current_epoch().map_or(0, |e| e.epoch);
        assert!(current >= self.replica.epoch(), "the replica's epoch is ahead of the state's");
        self.switch_due = current > self.replica.epoch();
        if self.switch_due {
            // Built at the switch height (a snapshot there): the old set's
            // replica orders nothing more before it hands over.
            let executed = self.replica.executed();
            self.replica.set_ceiling(executed);
        }
        self
    }

    /// The consensus records of epoch `epoch`'s replica that recovery found
    /// past the state (see `next_epoch_records`).
    pub fn hold_next_epoch_records(&mut self, epoch: u64, records: Vec<Record>) {
        self.next_epoch_records = Some((epoch, records));
    }

    /// Hands over to the new set's replica at the switch height (see
    /// `next_epoch`): this node is rebuilt on it, keeping its mempool and
    /// the txs it remembers, as the snapshot join rebuilds one.
    fn switch_epoch(&mut self, now: Now, out: &mut Vec<Output>) {
        self.switch_due = false;
        let (Some(epoch), Some(last)) = (self.state.current_epoch(), self.last.clone()) else { return };
        let prev = self.state.epoch(epoch.epoch - 1).expect("the state keeps every epoch");
        assert_eq!((self.height(), self.replica.executed()), (epoch.from_height, epoch.from_height), "switch at H");
        let app = snapshot::app_digest(&last.hash(), &self.reputation);
        let Some((mut replica, reputation)) = next_epoch(&self.replica, &self.reputation, &prev, &epoch, app) else {
            tracing::warn!(
                epoch = epoch.epoch,
                height = epoch.from_height,
                "this validator is not in the new set: it orders nothing more"
            );
            self.removed = true;
            out.push(Output::EpochSwitched { epoch, me: None });
            return;
        };
        out.push(Output::Persist(Record::Epoch { epoch: epoch.epoch, base: epoch.from_height }));
        if let Some((e, records)) = self.next_epoch_records.take() {
            if e == epoch.epoch {
                replica = replica.recover_onto(std::iter::empty(), records);
            }
        }
        let cfg = self.cfg.clone();
        let state = std::mem::replace(&mut self.state, State::new(Default::default()));
        let me = replica.id;
        let mut node = Node::new(cfg, replica, state, Some(last), reputation, now);
        node.mempool = std::mem::replace(&mut self.mempool, Mempool::new(self.cfg.mempool));
        // What the old set had in flight and did not order is pending again.
        node.mempool.unpropose_all();
        node.backlog = std::mem::take(&mut self.backlog);
        node.recent_tx = std::mem::take(&mut self.recent_tx);
        node.recent_by_height = std::mem::take(&mut self.recent_by_height);
        node.stopwatch = self.stopwatch;
        node.stats = self.stats;
        node.source_busy = self.source_busy;
        node.genesis = self.genesis.take();
        node.dropped = std::mem::take(&mut self.dropped);
        node.last_proposal_ts = self.last_proposal_ts;
        *self = node;
        tracing::info!(
            epoch = epoch.epoch,
            height = epoch.from_height,
            validators = epoch.validators.len(),
            replica = me,
            "validator set change took effect"
        );
        out.push(Output::EpochSwitched { epoch, me: Some(me) });
    }

    /// Looks for a chain snapshot before taking part in consensus: a
    /// validator whose block store is empty (fresh, or its disk replaced).
    /// It asks every peer at the next tick; once a verified snapshot
    /// arrives it rebuilds itself on it (`Output::Joined`), and if none is
    /// to be had it starts from height 1.
    pub fn start_joining(&mut self, setup: snapshot::JoinSetup<A>) {
        assert_eq!(self.height(), 0, "only an empty validator joins");
        self.joining = Some(Box::new(Joining { join: None, setup, again_at_ms: 0 }));
    }

    /// Takes part in the genesis ceremony first (`done`: a stored
    /// certificate matched; it then only answers late peers).
    pub fn start_genesis(&mut self, genesis: Genesis) {
        self.genesis = Some(Box::new(genesis));
    }

    pub fn genesis_done(&self) -> bool {
        self.genesis.as_ref().is_none_or(|g| g.done())
    }

    /// Whether consensus runs here (genesis done, not joining).
    pub fn started(&self) -> bool {
        self.genesis_done() && self.joining.is_none()
    }

    /// Waiting for or loading a chain snapshot to start from.
    pub fn joining(&self) -> bool {
        self.joining.is_some()
    }

    /// Blocks this validator is behind what f + 1 others say they executed
    /// (0 when it is level with them or ahead: see
    /// `Replica::cluster_executed`).
    pub fn lag_blocks(&self) -> u64 {
        self.replica.cluster_executed().saturating_sub(self.replica.executed())
    }

    /// Peer `from` answered a fetch (of blocks, or of the bodies of a
    /// committed block): it stores blocks from `lowest` on only (pruned). Once f + 1 peers say so above this validator's next
    /// height, `Output::Rejoin`. The first such answer from each peer asks
    /// every peer (one fetch broadcast), so the others' answers come too.
    pub fn on_fetch_pruned(&mut self, now: Now, from: Rid, lowest: u64, out: &mut Vec<Output>) {
        // The next block to execute here (the replica may have committed
        // values further whose bodies are the pruned ones).
        let next = self.height() + 1;
        if from >= self.replica.params().n || from == self.replica.id || lowest <= next || !self.started() {
            return;
        }
        let f = self.replica.params().f();
        if self.pruned_by.len() > f {
            return; // already asked to rejoin
        }
        if self.pruned_by.insert(from, lowest).is_none() {
            let now_ms = self.enter(now);
            self.actions.push(Action::Broadcast(Message::Fetch { from: self.replica.id, from_seq: next }));
            self.step(now_ms, out);
        }
        // Only answers about this validator's current height count.
        self.pruned_by.retain(|_, &mut l| l > next);
        if self.pruned_by.len() > f {
            let lowest = *self.pruned_by.values().min().expect("f + 1 entries");
            out.push(Output::Rejoin { height: next - 1, lowest });
        }
    }

    /// Validator `peer` (its id) connected to this one: it may have
    /// restarted, so genesis answers it again.
    pub fn on_peer_connected(&mut self, peer: u32) {
        if let Some(g) = self.genesis.as_mut() {
            g.on_peer_connected(peer);
        }
    }

    /// A genesis attestation from validator `from` (its id). An error is
    /// fatal: the validators' configurations differ.
    pub fn on_genesis_attestation(
        &mut self,
        now: Now,
        from: u32,
        a: ReadyAttestation,
        out: &mut Vec<Output>,
    ) -> Result<(), GenesisError> {
        let Some(g) = self.genesis.as_mut() else { return Ok(()) };
        let mut gout = vec![];
        let r = g.on_attestation(now, from, a, &mut gout);
        out.extend(gout.into_iter().map(Output::Genesis));
        r
    }

    /// A peer asks for a chunk of the snapshot this validator serves
    /// (answered in any phase: "none" tells a joiner not to wait).
    pub fn on_snapshot_request(&mut self, from: Rid, request: crate::proto::SnapshotRequest, out: &mut Vec<Output>) {
        if from != self.replica.id && from < self.cfg.validators.len() {
            out.push(Output::ServeSnapshot { to: from, request });
        }
    }

    /// A chunk of a snapshot (ignored unless joining).
    pub fn on_snapshot_chunk(
        &mut self,
        now: Now,
        from: Rid,
        chunk: crate::proto::SnapshotChunk,
        out: &mut Vec<Output>,
    ) {
        let Some(join) = self.joining.as_mut().and_then(|j| j.join.as_mut()) else { return };
        if let Some(step) = join.on_chunk(from as u32, chunk, now.mono_ms) {
            self.join_step(now, step, out);
        }
    }

    fn join_step(&mut self, now: Now, step: JoinStep, out: &mut Vec<Output>) {
        let j = self.joining.as_mut().expect("joining");
        match step {
            JoinStep::Request(to, request) => {
                out.push(Output::SnapshotRequest { to: to.map(|r| r as Rid), request });
            }
            JoinStep::GiveUp if j.setup.member_only => {
                tracing::info!(
                    "no snapshot names this validator yet (the set change has not taken effect); asking again"
                );
                j.join = None;
                j.again_at_ms = now.mono_ms + 1_000;
            }
            JoinStep::GiveUp => {
                tracing::info!("no peer offered a snapshot; catching up from height 1");
                self.joining = None;
            }
            JoinStep::Complete { peer, bytes } => {
                let s = &j.setup;
                let verified =
                    snapshot::verify(&bytes, s.me, &s.params, s.auth.clone(), &s.wire, s.state.clone(), s.reputation);
                let v = match verified {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(peer, error = %e, "snapshot refused; asking the other validators");
                        j.join.as_mut().expect("a transfer completed").refuse(peer, now.mono_ms);
                        self.stats.snapshots_refused += 1;
                        return;
                    }
                };
                if s.member_only {
                    let current = v.state.current_epoch();
                    let keys: Vec<PublicKey> = current.iter().flat_map(|e| e.validators.values().copied()).collect();
                    if s.auth.for_epoch(current.map_or(0, |e| e.epoch), &keys).is_none() {
                        tracing::info!(
                            peer,
                            height = v.header.height,
                            "this snapshot's set does not name this validator yet; asking the others"
                        );
                        j.join.as_mut().expect("a transfer completed").refuse(peer, now.mono_ms);
                        return;
                    }
                }
                let j = self.joining.take().expect("joining");
                let height = v.header.height;
                let (records, _) = crate::protocol::consensus::pbft::epoch_records(j.setup.records, v.replica.epoch());
                let replica = v.replica.recover_onto(std::iter::empty(), records);
                let mut node = Node::new(self.cfg.clone(), replica, v.state, Some(v.header.clone()), v.reputation, now);
                node.stopwatch = self.stopwatch;
                node.stats = self.stats;
                node.stats.joined_from_snapshot += 1;
                node.backlog = std::mem::take(&mut self.backlog);
                node.genesis = self.genesis.take();
                *self = node;
                let epoch = self.replica.epoch();
                out.push(Output::Joined { header: v.header, bytes: Arc::new(bytes) });
                tracing::info!(height, peer, epoch, "joined from a snapshot; catching up with the blocks above it");
                // Joined into a later set's epoch: the host follows it (its
                // transport and ids were the genesis set's). At a switch
                // height itself, the old set's replica hands over at once
                // (a validator the change adds has no place in the old set).
                if self.switch_due {
                    self.switch_epoch(now, out);
                } else if epoch > 0 {
                    let current = self.state.epoch(epoch).expect("the state's current epoch");
                    out.push(Output::EpochSwitched { epoch: current, me: Some(self.replica.id) });
                }
            }
        }
    }

    /// Measure stage durations with `clock` (see `Stopwatch`).
    pub fn set_stopwatch(&mut self, clock: Stopwatch) {
        self.stopwatch = Some(clock);
    }

    /// Stage durations (ns) measured since the last call.
    pub fn take_stage_times(&mut self) -> Vec<(Stage, u64)> {
        std::mem::take(&mut self.stage_times)
    }

    /// Whether this validator's source has txs it has not verified yet
    /// (the host's rings are not empty): a proposal's missing bodies are
    /// then not asked of peers yet (see `Bodies::ask`).
    pub fn set_source_busy(&mut self, busy: bool) {
        self.source_busy = busy;
    }

    /// Per-stage latency samples since the last call: (stage, ms, txs).
    pub fn take_latencies(&mut self) -> Vec<(TxStage, u64, u32)> {
        std::mem::take(&mut self.latencies)
    }

    fn sample(&mut self, stage: TxStage, ms: u64, txs: u32) {
        if txs > 0 && self.latencies.len() < MAX_LATENCY_SAMPLES {
            self.latencies.push((stage, ms, txs));
        }
    }

    /// Notes the time a slot in the window reached a phase (first time only).
    /// Every input starts here: the wall clock is kept for what needs it,
    /// the monotonic time is returned for everything else.
    fn enter(&mut self, now: Now) -> u64 {
        self.wall_ms = now.wall_ms;
        now.mono_ms
    }

    fn refill_budgets(&mut self, now_ms: u64) {
        if now_ms >= self.budgets_refill_ms {
            self.budgets_refill_ms = now_ms + BUDGET_WINDOW_MS;
            self.forward_budget.iter_mut().for_each(|b| *b = 0);
            self.serve_budget.iter_mut().for_each(|b| *b = 0);
        }
    }

    fn slot_time(&mut self, seq: Seq, now_ms: u64, phase: fn(&mut SlotTimes) -> &mut Option<u64>) {
        let window = self.replica.params().window;
        if seq <= self.height() || seq > self.height() + 2 * window {
            return;
        }
        phase(self.slot_times.entry(seq).or_default()).get_or_insert(now_ms);
    }

    fn lap(&self) -> u64 {
        self.stopwatch.map_or(0, |clock| clock())
    }

    fn record_stage(&mut self, stage: Stage, started: u64) {
        if let Some(clock) = self.stopwatch {
            if self.stage_times.len() < MAX_STAGE_TIMES {
                self.stage_times.push((stage, clock().saturating_sub(started)));
            }
        }
    }

    pub fn height(&self) -> u64 {
        self.last.as_ref().map_or(0, |h| h.height)
    }
    pub fn last_header(&self) -> Option<&BlockHeader> {
        self.last.as_ref()
    }
    pub fn state(&self) -> &State {
        &self.state
    }
    pub fn replica(&self) -> &Replica<A> {
        &self.replica
    }
    pub fn stats(&self) -> NodeStats {
        self.stats
    }
    pub fn conduct(&self) -> &[Conduct] {
        &self.conduct
    }
    pub fn reputation(&self) -> &Reputation {
        &self.reputation
    }
    /// Whether `tx_hash` is pending here (the simulator's diagnosis).
    #[cfg(test)]
    pub(crate) fn holds(&self, tx_hash: &Hash32) -> bool {
        self.mempool.contains(tx_hash)
    }

    /// The checkpoint at `seq` became stable: if it is the pending
    /// snapshot's, the snapshot is complete (proof attached).
    fn complete_snapshot(&mut self, seq: Seq, proof: &[Signed<Checkpoint>], out: &mut Vec<Output>) {
        let Some(height) = self.pending_snapshot.as_ref().map(|s| s.height()) else {
            return;
        };
        if height > seq {
            return;
        }
        let mut snap = self.pending_snapshot.take().expect("checked");
        if height < seq {
            // Its checkpoint was passed over (a later one became stable first).
            tracing::debug!(height, stable = seq, "snapshot dropped: its checkpoint never became stable here");
            return;
        }
        snap.chain.proof = proof.iter().map(crate::protocol::consensus::wire::checkpoint_to).collect();
        out.push(Output::Snapshot(snap));
    }

    /// The committed values waiting to execute: seq, the certificate's
    /// view and primary, and how many bodies each lacks (the simulator's
    /// diagnosis).
    #[cfg(test)]
    pub(crate) fn exec_queue_summary(&self) -> Vec<(Seq, View, Rid, String)> {
        self.exec_queue
            .iter()
            .map(|q| {
                let missing = match &q.body {
                    QueuedBody::Ready(p) => format!("ready origin {:?}", p.origin),
                    QueuedBody::Missing(b) => b.describe(),
                };
                (q.seq, q.cert.pre_prepare.body.view, q.cert.pre_prepare.from, missing)
            })
            .collect()
    }

    pub fn mempool_len(&self) -> usize {
        self.mempool.len()
    }
    pub fn mempool_bytes(&self) -> usize {
        self.mempool.bytes()
    }
    /// Kafka messages dropped as duplicates since the last call: finished.
    pub fn take_dropped(&mut self) -> Vec<crate::protocol::source::SourcePos> {
        std::mem::take(&mut self.dropped)
    }

    /// False while admitted txs wait for room: stop pulling from the shards.
    pub fn has_room(&self) -> bool {
        self.started() && self.backlog.is_empty() && self.mempool.has_room()
    }

    /// Txs admitted by the verify shards. No verdict is made here that
    /// another validator could make differently: the rate limit is the
    /// state machine's (receipts), and the backlog is backpressure only.
    pub fn on_txs(&mut self, now: Now, txs: Vec<VerifiedTx>, out: &mut Vec<Output>) {
        let now_ms = self.enter(now);
        self.backlog.extend(txs);
        if !self.started() {
            return; // admitted once started (`has_room` said no meanwhile)
        }
        self.drain_backlog(out);
        self.drain_exec_queue(now_ms, out);
        self.step(now_ms, out);
    }

    /// Whether some value waits for bodies.
    fn waits_for_bodies(&self) -> bool {
        !self.awaiting.is_empty() || !self.exec_queue.is_empty()
    }

    /// Offers a tx this validator now holds to the values waiting for it.
    fn offer(&mut self, event: &Arc<Event>, tx_hash: &Hash32) {
        for (_, b) in self.awaiting.values_mut() {
            b.offer(event, tx_hash);
        }
        for q in &mut self.exec_queue {
            if let QueuedBody::Missing(b) = &mut q.body {
                b.offer(event, tx_hash);
            }
        }
    }

    fn drain_backlog(&mut self, out: &mut Vec<Output>) {
        while let Some(tx) = self.backlog.front() {
            // One look-up of the nonce for both questions (the index misses
            // the cache on nearly every tx).
            let owner = self.state.nonce_owner(&tx.event.nonce).copied();
            // This very tx committed (a redelivery after restart, a resend)
            // or pending: a duplicate, finished without a DLQ record.
            if owner == Some(tx.tx_hash) || self.mempool.contains(&tx.tx_hash) {
                let tx = self.backlog.pop_front().expect("front exists");
                self.stats.duplicates += 1;
                self.dropped.extend(tx.pos);
                continue;
            }
            // Another tx committed with its nonce: it can never commit (a
            // verdict from committed state, the same on every validator).
            if let Some(owner) = owner {
                let detail = format!("nonce already committed by tx {}", hex::encode(owner));
                let tx = self.backlog.pop_front().expect("front exists");
                out.push(Output::Reject(rejection(&tx, RejectReason::ReplayedNonce, detail, "mempool".into())));
                continue;
            }
            if !self.mempool.fits(tx) {
                return; // admitted as soon as a block commits
            }
            let tx = self.backlog.pop_front().expect("front exists");
            let pos = tx.pos.clone();
            let waited = self.waits_for_bodies().then(|| (tx.event.clone(), tx.tx_hash));
            if self.mempool.admit(tx) == Admit::Added {
                self.stats.admitted += 1;
                if let Some((event, tx_hash)) = waited {
                    self.offer(&event, &tx_hash);
                }
            } else {
                self.stats.duplicates += 1;
                self.dropped.extend(pos);
            }
        }
    }

    /// Txs validator `from` forwarded (see `Output::Forward`): decoded with
    /// this validator's limits, deduplicated by tx hash, verified like any
    /// ingest, admitted. At most `MAX_FORWARD_TXS` per sender per budget
    /// window are verified; the rest are dropped (the sender retries in a
    /// later view if still needed).
    pub fn on_forward(&mut self, now: Now, from: Rid, txs: Vec<crate::proto::Transaction>, out: &mut Vec<Output>) {
        if !self.started() {
            return; // consensus waits for genesis and the join; peers retransmit
        }
        let now_ms = self.enter(now);
        self.refill_budgets(now_ms);
        let Some(budget) = self.forward_budget.get_mut(from) else { return };
        let mut events = Vec::with_capacity(txs.len());
        for t in txs {
            let Ok(ev) = Event::from_tx_proto(t, &self.cfg.limits) else {
                self.stats.forwards_refused += 1;
                continue;
            };
            let tx_hash = ev.tx_hash();
            if self.mempool.contains(&tx_hash) || self.state.is_committed(&ev.nonce, &tx_hash) {
                continue; // known here: nothing to verify
            }
            if *budget >= crate::protocol::consensus::wire::MAX_FORWARD_TXS {
                self.stats.forwards_refused += 1;
                continue;
            }
            *budget += 1;
            events.push((ev, tx_hash));
        }
        if events.is_empty() {
            return;
        }
        let refs: Vec<&Event> = events.iter().map(|(e, _)| e).collect();
        let verdicts = crate::protocol::verify::verify_each(&self.cfg.policy, &refs, now.wall_ms);
        let mut admitted = vec![];
        for ((event, tx_hash), v) in events.into_iter().zip(verdicts) {
            match v {
                Ok(()) => admitted.push(VerifiedTx { event: Arc::new(event), tx_hash, received_ms: now_ms, pos: None }),
                Err((reason, detail)) => {
                    self.stats.forwards_refused += 1;
                    tracing::debug!(from, %reason, detail, "forwarded tx refused");
                }
            }
        }
        self.stats.forwards_admitted += admitted.len() as u64;
        self.on_txs(now, admitted, out);
    }

    /// A consensus message from validator `from` (authenticated by the
    /// transport; the replica checks the signatures inside).
    pub fn on_message(&mut self, now: Now, from: Rid, msg: Message, out: &mut Vec<Output>) {
        if !self.started() {
            return; // consensus waits for genesis and the join; peers retransmit
        }
        let now_ms = self.enter(now);
        match msg {
            // Answered to the connection's sender, whatever rid the message
            // names: across a set change, its own set numbers it otherwise.
            Message::Fetch { from: _, from_seq } => {
                let asker = from;
                if asker != self.replica.id {
                    out.push(Output::ServeFetch { to: asker, from_seq });
                    for c in self.replica.stable_proof_for(from_seq) {
                        self.actions.push(Action::Send(asker, Message::Checkpoint(c.clone())));
                    }
                    // One asking from an older view needs this view's
                    // new-view to vote again (`Replica::ask_for_view`).
                    self.replica.set_time(now_ms);
                    if let Some(nv) = self.replica.new_view_for(asker) {
                        self.actions.push(Action::Send(asker, Message::NewView(nv)));
                    }
                    if !self.actions.is_empty() {
                        self.step(now_ms, out);
                    }
                }
                return;
            }
            Message::PrePrepare(s)
                if s.from == from
                    && s.body.view == self.replica.view()
                    && s.from == self.replica.primary(s.body.view)
                    && s.from != self.replica.id
                    && s.body.seq > self.replica.executed()
                    && !self.checked.contains_key(&s.body.digest)
                    && !self.replica.holds_pre_prepare(s.body.view, s.body.seq, &s.body.digest) =>
            {
                self.slot_time(s.body.seq, now_ms, |t| &mut t.pre_prepared_ms);
                self.on_pre_prepare(now_ms, s, out);
                self.step(now_ms, out);
                return;
            }
            Message::Heartbeat(ref s) if s.body.epoch != self.replica.epoch() => {
                if s.from == from && from != self.replica.id {
                    self.on_other_epoch(now_ms, from, s.body.epoch, s.body.executed, out);
                }
                return;
            }
            Message::Committed(_) if self.exec_queue.len() >= 2 * self.replica.params().window as usize => {
                return; // bodies of the values before it still missing: fetched again later
            }
            Message::Committed(ref c) => {
                // Catching up: a peer answers a fetch with a window of
                // blocks; at the window's boundary ask it for the next one,
                // so a far-behind validator streams instead of waiting for
                // the retransmit timer.
                let seq = c.pre_prepare.body.seq;
                let window = self.replica.params().window;
                self.replica.set_time(now_ms);
                self.replica.on_message(msg, &mut self.actions);
                if seq % window == 0 && self.replica.executed() >= seq && from != self.replica.id {
                    let from_seq = self.replica.executed() + 1;
                    self.actions.push(Action::Send(from, Message::Fetch { from: self.replica.id, from_seq }));
                }
                self.step(now_ms, out);
                return;
            }
            _ => {}
        }
        self.replica.set_time(now_ms);
        self.replica.on_message(msg, &mut self.actions);
        self.step(now_ms, out);
    }

    /// A heartbeat from a validator in another validator set's epoch: its
    /// signature cannot be checked here (its domain is the other epoch),
    /// so only the connection vouches for the sender, and it is read as a
    /// hint, as a fetch is. Behind it across a switch, this validator
    /// fetches the blocks it lacks from that peer (the old set's
    /// certificates verify here up to the switch; then it switches and
    /// catches up in the new epoch); ahead of a peer still before the
    /// switch, it serves that peer the blocks from its seq. At most once
    /// per retransmit interval per peer.
    fn on_other_epoch(&mut self, now_ms: u64, from: Rid, epoch: u64, executed: Seq, out: &mut Vec<Output>) {
        let Some(next_ms) = self.other_epoch_ms.get_mut(from) else { return };
        if *next_ms > now_ms {
            return;
        }
        *next_ms = now_ms + self.replica.params().retransmit_ms;
        let (mine, me) = (self.replica.executed(), self.replica.id);
        if epoch > self.replica.epoch() && executed > mine {
            self.actions.push(Action::Send(from, Message::Fetch { from: me, from_seq: mine + 1 }));
            self.step(now_ms, out);
        } else if epoch < self.replica.epoch() && executed < self.replica.base() {
            out.push(Output::ServeFetch { to: from, from_seq: executed + 1 });
        }
    }

    fn check_context(&self) -> CheckContext<'_> {
        CheckContext {
            builder: &self.cfg.builder,
            policy: &self.cfg.policy,
            mempool: &self.mempool,
            wall_ms: self.wall_ms,
            skew_ms: self.cfg.skew_ms,
        }
    }

    /// The bodies of `named` this validator holds (admitted to its
    /// mempool, or verified and waiting in the backlog); the rest are asked
    /// of `first` and then the other validators.
    fn resolve(&self, named: Named, first: Rid, now_ms: u64) -> Bodies {
        let peers = ask_order(self.cfg.validators.len(), first, self.replica.id);
        let mut b = Bodies::new(named, |r| self.mempool.get(&r.tx_hash).map(|t| t.event.clone()), peers, now_ms);
        for t in &self.backlog {
            if b.is_complete() {
                break;
            }
            b.offer(&t.event, &t.tx_hash);
        }
        b
    }

    /// A pre-prepare of the current primary not checked yet: decoded and
    /// checked as far as it can be without its bodies, then held until
    /// they are here (and execution has caught up with the replica).
    fn on_pre_prepare(&mut self, now_ms: u64, s: Signed<PrePrepare>, out: &mut Vec<Output>) {
        let seq = s.body.seq;
        if let Some((held, _)) = self.awaiting.get(&seq) {
            // Held already: a retransmission, or the primary signed two
            // values for the slot (the replica has seen neither yet).
            if held.body.digest != s.body.digest && held.body.view == s.body.view {
                let proof = Proof::PrePrepares(without_value(held), without_value(&s));
                if self.replica.verify_proof(&proof) {
                    self.conduct[s.from].equivocations += 1;
                    self.note_proof(proof);
                    let what = format!("two pre-prepares for seq {seq} in view {}", s.body.view);
                    out.push(Output::Evidence { culprit: s.from, what });
                }
            }
            return;
        }
        if seq > self.replica.executed() + self.replica.params().window {
            return; // outside the window: the replica would drop it
        }
        let named = proposal::decode(&s.body.value, self.cfg.builder.max_txs)
            .and_then(|n| proposal::check_origin(&n, s.body.view, s.from).map(|()| n))
            .and_then(|n| proposal::check_named(&n, &self.check_context()).map(|()| n));
        match named {
            Ok(named) => {
                let bodies = self.resolve(named, s.from, now_ms);
                self.awaiting.insert(seq, (s, bodies));
                self.check_awaiting(now_ms, out);
            }
            Err(e) => self.refuse(&s, e, out),
        }
    }

    /// Checks the held pre-prepares whose bodies are all here, once this
    /// validator's state is the replica's (nothing waits to execute).
    fn check_awaiting(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if !self.exec_queue.is_empty() {
            return;
        }
        let ready: Vec<Seq> = self.awaiting.iter().filter(|(_, (_, b))| b.is_complete()).map(|(s, _)| *s).collect();
        for seq in ready {
            let (s, bodies) = self.awaiting.remove(&seq).expect("listed");
            if seq <= self.replica.executed() || s.body.view != self.replica.view() {
                continue; // committed meanwhile (fetched), or the view moved on
            }
            self.check_pre_prepare(now_ms, s, bodies.into_proposal(), out);
        }
    }

    /// Full check of a pre-prepare with its bodies; if it passes, the
    /// replica gets it (and prepares).
    fn check_pre_prepare(&mut self, now_ms: u64, s: Signed<PrePrepare>, p: Proposal, out: &mut Vec<Output>) {
        self.sync_inflight();
        let seq = s.body.seq;
        let checked = proposal::check(&p, &self.check_context()).and_then(|()| {
            match p.evidence.iter().position(|e| !self.replica.verify_proof(e)) {
                Some(i) => Err(proposal::ProposalError::Decode(format!("proof {i} does not verify"))),
                None => self.check_no_repeats(seq, &p),
            }
        });
        match checked {
            Ok(()) => {
                self.add_inflight(seq, p.tx_hashes.iter().copied().zip(p.txs.iter().map(|t| Some(t.nonce))));
                self.remember_checked(s.body.digest, p);
                self.replica.set_time(now_ms);
                self.replica.on_message(Message::PrePrepare(s), &mut self.actions);
            }
            Err(e) => self.refuse(&s, e, out),
        }
    }

    /// An invalid proposal: no prepare (the view changes if the primary
    /// persists), and evidence against its primary.
    fn refuse(&mut self, s: &Signed<PrePrepare>, e: proposal::ProposalError, out: &mut Vec<Output>) {
        self.stats.proposals_refused += 1;
        self.conduct[s.from].invalid_proposals += 1;
        out.push(Output::Evidence {
            culprit: s.from,
            what: format!("invalid proposal for seq {} in view {}: {e}", s.body.seq, s.body.view),
        });
    }

    /// Bodies validator `from` sent for the value at `seq`: decoded with
    /// this validator's limits and kept only where a waiting value names
    /// them (both hashes); the rest are dropped. Bodies of a pre-prepare
    /// are verified when it is checked; those of a committed value need not
    /// be (a quorum prepared exactly these bytes).
    pub fn on_bodies(
        &mut self,
        now: Now,
        from: Rid,
        seq: Seq,
        txs: Vec<crate::proto::Transaction>,
        out: &mut Vec<Output>,
    ) {
        let now_ms = self.enter(now);
        if !self.started() || from >= self.cfg.validators.len() || !self.waits_for_bodies() {
            return;
        }
        for t in txs {
            let Ok(ev) = Event::from_tx_proto(t, &self.cfg.limits) else { continue };
            let h = ev.tx_hash();
            let ev = Arc::new(ev);
            let mut taken = self.awaiting.get_mut(&seq).is_some_and(|(_, b)| b.offer(&ev, &h));
            if !taken {
                if let Some(QueuedBody::Missing(b)) =
                    self.exec_queue.iter_mut().find(|q| q.seq == seq).map(|q| &mut q.body)
                {
                    taken = b.offer(&ev, &h);
                }
            }
            self.stats.txs_fetched += taken as u64;
        }
        self.drain_exec_queue(now_ms, out);
        self.step(now_ms, out);
    }

    /// Validator `from` asks for tx bodies of the value at `seq`: answered
    /// from the mempool and the proposals checked here, else (a committed
    /// block) from the block store. At most `MAX_SERVED_TXS` per sender per
    /// budget window.
    pub fn on_tx_fetch(&mut self, now: Now, from: Rid, seq: Seq, tx_hashes: Vec<Hash32>, out: &mut Vec<Output>) {
        if !self.started() {
            return; // consensus waits for genesis and the join; peers retransmit
        }
        let now_ms = self.enter(now);
        if from == self.replica.id {
            return;
        }
        self.refill_budgets(now_ms);
        let Some(budget) = self.serve_budget.get_mut(from) else { return };
        if *budget + tx_hashes.len() > MAX_SERVED_TXS {
            return; // asked again after the retry interval
        }
        *budget += tx_hashes.len();
        let mut txs = vec![];
        let mut rest: foldhash::HashSet<Hash32> = Default::default();
        for h in tx_hashes {
            match self.mempool.get(&h) {
                Some(t) => txs.push(t.event.clone()),
                None => {
                    rest.insert(h);
                }
            }
        }
        if !rest.is_empty() {
            for p in self.checked.values() {
                for (t, h) in p.txs.iter().zip(&p.tx_hashes) {
                    if rest.remove(h) {
                        txs.push(t.clone());
                    }
                }
            }
        }
        self.stats.txs_served += txs.len() as u64;
        if !txs.is_empty() {
            out.push(Output::SendTxs { to: from, seq, txs });
        }
        // The rest from the block store: the block that committed each, else
        // the block at `seq` (committed before the window kept here).
        let mut by_height: BTreeMap<u64, Vec<Hash32>> = BTreeMap::new();
        for h in rest {
            match self.recent_tx.get(&h) {
                Some(&at) => by_height.entry(at).or_default().push(h),
                None if seq <= self.height() => by_height.entry(seq).or_default().push(h),
                None => {}
            }
        }
        for (height, mut tx_hashes) in by_height {
            tx_hashes.sort_unstable(); // deterministic outputs
            out.push(Output::ServeBlockTxs { to: from, seq, height, tx_hashes });
        }
    }

    /// How many of the newest blocks' txs are remembered (`recent_tx`).
    pub fn recent_heights(&self) -> u64 {
        RECENT_WINDOWS * self.replica.params().window
    }

    /// Remembers the txs `height` committed (see `recent_tx`); also called
    /// at start for the blocks the store holds.
    pub fn remember_committed(&mut self, height: u64, tx_hashes: &[Hash32]) {
        let keep = self.recent_heights();
        if self.recent_by_height.back().is_some_and(|(h, _)| *h >= height) {
            return; // remembered already (start-up and execution overlap)
        }
        for h in tx_hashes {
            self.recent_tx.insert(*h, height);
        }
        self.recent_by_height.push_back((height, tx_hashes.to_vec()));
        while self.recent_by_height.front().is_some_and(|(h, _)| h + keep <= height) {
            let (h, txs) = self.recent_by_height.pop_front().expect("front exists");
            for t in txs {
                if self.recent_tx.get(&t) == Some(&h) {
                    self.recent_tx.remove(&t);
                }
            }
        }
    }

    /// Asks peers for the bodies still missing whose ask is due.
    fn ask_for_bodies(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let mut asks = vec![];
        let busy = self.source_busy;
        for (seq, (_, b)) in self.awaiting.iter_mut() {
            asks.extend(b.ask(now_ms, MAX_FETCH_TXS, busy).map(|a| (*seq, a)));
        }
        for q in &mut self.exec_queue {
            if let QueuedBody::Missing(b) = &mut q.body {
                asks.extend(b.ask(now_ms, MAX_FETCH_TXS, busy).map(|a| (q.seq, a)));
            }
        }
        for (seq, (to, tx_hashes)) in asks {
            self.stats.fetch_asks += 1;
            out.push(Output::FetchTxs { to, seq, tx_hashes });
        }
    }

    /// No tx of `p` (for `seq`) is committed or in a value in flight at
    /// another seq: an honest primary never orders a tx twice.
    fn check_no_repeats(&self, seq: Seq, p: &Proposal) -> Result<(), proposal::ProposalError> {
        for (index, (tx, h)) in p.txs.iter().zip(&p.tx_hashes).enumerate() {
            if let Some(at) = self.inflight_tx.get(h).filter(|at| **at != seq) {
                return Err(proposal::ProposalError::Tx { index, detail: format!("tx is in flight at seq {at}") });
            }
            if let Some(owner) = self.state.nonce_owner(&tx.nonce) {
                let what = if owner == h { "is committed" } else { "reuses a committed nonce" };
                return Err(proposal::ProposalError::Tx { index, detail: format!("tx {what}") });
            }
            if let Some((at, _)) = self.inflight.get(&tx.nonce).filter(|(at, _)| *at != seq) {
                return Err(proposal::ProposalError::Tx {
                    index,
                    detail: format!("its nonce is in flight at seq {at}"),
                });
            }
        }
        Ok(())
    }

    /// Rebuilds the in-flight set from the replica's log once per view
    /// (values a new-view re-proposed; abandoned ones leave it), and from
    /// the committed values waiting to execute.
    fn sync_inflight(&mut self) {
        let view = self.replica.view();
        if self.inflight_view == Some(view) {
            return;
        }
        self.inflight_view = Some(view);
        self.inflight.clear();
        self.inflight_tx.clear();
        self.inflight_by_seq.clear();
        let mut values: Vec<(Seq, Vec<InflightTx>)> = vec![];
        for q in &self.exec_queue {
            let txs = match &q.body {
                QueuedBody::Ready(p) => p.tx_hashes.iter().copied().zip(p.txs.iter().map(|t| Some(t.nonce))).collect(),
                QueuedBody::Missing(b) => {
                    b.tx_hashes().map(|h| (*h, self.mempool.get(h).map(|t| t.event.nonce))).collect()
                }
            };
            values.push((q.seq, txs));
        }
        for (seq, digest, value) in self.replica.unexecuted_pre_prepares() {
            let txs = match self.checked.get(digest) {
                Some(p) => p.tx_hashes.iter().copied().zip(p.txs.iter().map(|t| Some(t.nonce))).collect(),
                None => match proposal::decode(value, self.cfg.builder.max_txs) {
                    Ok(n) => n
                        .refs
                        .iter()
                        .map(|r| (r.tx_hash, self.mempool.get(&r.tx_hash).map(|t| t.event.nonce)))
                        .collect(),
                    Err(_) => continue, // executes as a null block
                },
            };
            values.push((seq, txs));
        }
        for (seq, txs) in values {
            self.add_inflight(seq, txs.into_iter());
        }
    }

    /// The txs (tx hash, nonce if the body is here) of a value at `seq`.
    fn add_inflight(&mut self, seq: Seq, txs: impl Iterator<Item = InflightTx>) {
        let entry = self.inflight_by_seq.entry(seq).or_default();
        for (h, n) in txs {
            if let Some(n) = n {
                self.inflight.insert(n, (seq, h));
            }
            self.inflight_tx.insert(h, seq);
            entry.push((h, n));
        }
    }

    /// Seq `seq` executed: values in flight at or below it are done.
    fn retire_inflight(&mut self, seq: Seq) {
        let keep = self.inflight_by_seq.split_off(&(seq + 1));
        for (s, txs) in std::mem::replace(&mut self.inflight_by_seq, keep) {
            for (h, n) in txs {
                if let Some(n) = n {
                    if self.inflight.get(&n).is_some_and(|(at, _)| *at == s) {
                        self.inflight.remove(&n);
                    }
                }
                if self.inflight_tx.get(&h) == Some(&s) {
                    self.inflight_tx.remove(&h);
                }
            }
        }
    }

    /// Censorship check (backups): a pending tx not in flight, admitted
    /// here more than the order timeout before a tx this view ordered, was
    /// passed over: move to the next view. Txs waiting behind a queue (the
    /// primary orders oldest first) are never older than what it orders,
    /// so overload alone does not trigger it; an idle primary that orders
    /// nothing is the view-change timer's job (`expect_progress`).
    fn check_order(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if now_ms < self.next_order_check_ms {
            return;
        }
        self.next_order_check_ms = now_ms + ORDER_CHECK_INTERVAL_MS;
        if self.replica.is_primary() || !self.exec_queue.is_empty() {
            return;
        }
        if self.replica.is_changing() {
            self.forward_while_changing(now_ms, out);
            return;
        }
        self.sync_inflight();
        let to = self.replica.primary(self.replica.view());
        self.forward_passed_over(now_ms, to, out);
        let timeout_ms = self.order_timeout_ms();
        let oldest = self
            .mempool
            .iter_pending()
            .take(ORDER_CHECK_MAX_SCAN)
            .find(|t| !self.inflight.contains_key(&t.event.nonce))
            .map(|t| t.received_ms);
        if let Some(received_ms) = oldest {
            if received_ms + timeout_ms <= self.newest_ordered_received_ms {
                self.stats.censorship_suspicions += 1;
                tracing::warn!(
                    view = self.replica.view(),
                    waited_ms = now_ms.saturating_sub(received_ms),
                    "the primary orders later txs but not one held here; moving to the next view"
                );
                self.replica.suspect_primary(&mut self.actions);
            }
        }
    }

    /// Forwards to the primary (once per view) pending txs not in flight
    /// that waited `FORWARD_DELAY_MS` here while the primary ordered later
    /// ones or nothing at all: it may never have received them (a restart,
    /// a client that reached only some validators). A primary that has them
    /// queued behind load is never sent them: under load something is in
    /// flight and what it orders is not newer than them.
    fn forward_passed_over(&mut self, now_ms: u64, to: Rid, out: &mut Vec<Output>) {
        let idle = self.inflight.is_empty();
        let newest = self.newest_ordered_received_ms;
        let (hashes, txs): (Vec<Hash32>, Vec<Arc<Event>>) = self
            .mempool
            .iter_pending()
            .take(ORDER_CHECK_MAX_SCAN)
            .filter(|t| {
                let waited = t.received_ms + FORWARD_DELAY_MS;
                waited <= now_ms && (idle || waited <= newest) && !self.inflight.contains_key(&t.event.nonce)
            })
            .filter(|t| !self.forwarded.contains(&t.tx_hash))
            .take(crate::protocol::consensus::wire::MAX_FORWARD_TXS)
            // Within a frame: the first tx, and the rest while they fit.
            .scan(0usize, |bytes, t| {
                *bytes += t.event.size();
                (*bytes == t.event.size() || *bytes <= crate::protocol::consensus::wire::MAX_BODIES_BYTES).then_some(t)
            })
            .map(|t| (t.tx_hash, t.event.clone()))
            .unzip();
        if txs.is_empty() {
            return;
        }
        if self.forwarded.len() > 2 * self.mempool.len() + 1024 {
            let m = &self.mempool;
            self.forwarded.retain(|h| m.contains(h));
        }
        self.forwarded.extend(hashes);
        self.stats.forwarded += txs.len() as u64;
        out.push(Output::Forward { to, txs });
    }

    /// A backup alone in a view change (cut off while its peers went on in
    /// a lower view, which PBFT's view-change promise forbids it to rejoin:
    /// it waits for their next view change) would hold its txs until then.
    /// It forwards them instead to the proposer of the newest block it
    /// executed (it keeps executing through fetches): the cluster's primary
    /// as far as it can tell. Again every `FORWARD_RETRY_MS` (forwards can
    /// be lost; the primary drops repeats).
    fn forward_while_changing(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        // Else (it proposed that block itself, or none yet) the primary of
        // the view before the one it is changing to: where its peers stayed.
        let me = self.replica.id;
        let proposer = self.last.as_ref().and_then(|h| self.cfg.validators.iter().position(|k| *k == h.proposer));
        let before = self.replica.view().checked_sub(1).map(|v| self.replica.primary(v));
        let Some(to) = proposer.filter(|&p| p != me).or(before.filter(|&p| p != me)) else { return };
        if now_ms >= self.next_forward_retry_ms {
            self.next_forward_retry_ms = now_ms + FORWARD_RETRY_MS;
            self.forwarded.clear();
        }
        // What counts as in flight is the view it is changing to (nothing
        // yet): a value of a view it left may never commit, and its txs
        // must not be held back for it (found by the whole-node simulator,
        // seed 222126145517: a tx a dead view had pre-prepared stayed here).
        self.sync_inflight();
        self.forward_passed_over(now_ms, to, out);
        // Rebuilt again once the view is entered (its new-view brings pre-prepares).
        self.inflight_view = None;
    }

    /// How long a tx may be passed over before the primary is suspected:
    /// four view-change timeouts (AIMD: they grow after failed views), and
    /// at least `ORDER_TIMEOUT_MIN_MS`, so validators that consume a Kafka
    /// backlog in somewhat different orders do not suspect each other.
    fn order_timeout_ms(&self) -> u64 {
        (4 * self.replica.timeout_ms()).max(ORDER_TIMEOUT_MIN_MS)
    }

    /// A proof this replica found: keep it to commit (once per culprit).
    fn note_proof(&mut self, p: Proof) {
        let c = p.culprit();
        if self.reputation.quarantine_enabled()
            && !self.reputation.is_quarantined(c)
            && !self.proofs.iter().any(|(q, _)| q.culprit() == c)
        {
            self.proofs.push((p, false));
        }
    }

    fn remember_checked(&mut self, d: Hash32, p: Proposal) {
        if self.checked.insert(d, Arc::new(p)).is_none() {
            self.checked_order.push_back(d);
            // A few windows' worth: values in flight, re-proposed or retransmitted.
            if self.checked_order.len() > 4 * self.replica.params().window as usize {
                let old = self.checked_order.pop_front().expect("non-empty");
                self.checked.remove(&old);
            }
        }
    }

    /// Time passes: timers, and a proposal if this validator leads.
    pub fn on_tick(&mut self, now: Now, out: &mut Vec<Output>) {
        if let Some(g) = self.genesis.as_mut() {
            if now.mono_ms >= g.poll_timeout_ms() {
                let mut gout = vec![];
                g.on_tick(now, &mut gout);
                out.extend(gout.into_iter().map(Output::Genesis));
            }
            if !g.done() {
                return;
            }
        }
        if let Some(j) = self.joining.as_mut().filter(|j| j.join.is_some() || now.mono_ms >= j.again_at_ms) {
            let (me, n) = (self.replica.id, self.cfg.validators.len());
            // The join's timeout runs from the end of genesis, however long that took.
            let join = j.join.get_or_insert_with(|| {
                let peers = (0..n).filter(|&r| r != me).map(|r| r as u32);
                // A member-only join asks round after round until a
                // snapshot names it: a short round, a second apart.
                let timeout_ms = if j.setup.member_only { j.setup.timeout_ms.min(3_000) } else { j.setup.timeout_ms };
                snapshot::Join::new(peers, now.mono_ms, timeout_ms)
            });
            if let Some(step) = join.tick(now.mono_ms) {
                self.join_step(now, step, out);
            }
            return;
        }
        if self.removed {
            return;
        }
        if self.switch_ready(now.mono_ms) {
            self.enter(now);
            self.switch_epoch(now, out);
            return;
        }
        let now_ms = self.enter(now);
        self.replica.on_tick(now_ms, &mut self.actions);
        self.check_order(now_ms, out);
        self.ask_for_bodies(now_ms, out);
        self.step(now_ms, out);
    }

    /// Proposes while leading and the builder says so, then turns the
    /// replica's actions into outputs (executing committed values).
    fn step(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        self.run_step(now_ms, out);
        // Held pre-prepares whose slot committed meanwhile (another value,
        // or fetched): their bodies may never come (a primary naming txs
        // nobody has), and the window moves on without them.
        let executed = self.replica.executed();
        if self.awaiting.first_key_value().is_some_and(|(&s, _)| s <= executed) {
            self.awaiting = self.awaiting.split_off(&(executed + 1));
        }
        if cfg!(any(debug_assertions, test)) {
            self.invariants();
        }
    }

    /// What holds after every step (the replica checks its own): the
    /// state machine is the replica's executed prefix less the committed
    /// values waiting for bodies, and every queue is bounded.
    pub fn invariants(&self) {
        let window = self.replica.params().window as usize;
        assert_eq!(
            self.height() + self.exec_queue.len() as u64,
            self.replica.executed(),
            "executed blocks + values waiting for bodies = the replica's executed seq"
        );
        assert!(self.exec_queue.iter().zip(self.exec_queue.iter().skip(1)).all(|(a, b)| b.seq == a.seq + 1));
        assert!(
            self.exec_queue.front().is_none_or(|q| q.seq == self.height() + 1),
            "the queue starts after the last block"
        );
        assert!(self.awaiting.len() <= window, "pre-prepares awaiting bodies: at most a window");
        assert!(
            self.awaiting.keys().all(|&s| s > self.replica.executed()),
            "pre-prepares awaiting bodies are above the executed seq"
        );
        assert!(self.exec_queue.len() <= 3 * window, "committed values awaiting bodies: bounded");
        assert!(
            self.recent_by_height.len() as u64 <= RECENT_WINDOWS * window as u64,
            "recently committed txs: bounded by windows"
        );
        assert!(self.recent_tx.len() <= self.recent_by_height.iter().map(|(_, t)| t.len()).sum::<usize>());
    }

    fn run_step(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        // Deadlines set below count from now, even before the first tick.
        self.replica.set_time(now_ms);
        // Set once the pending txs were all in flight already: nothing to
        // propose until something changes (a later step).
        let mut nothing_to_propose = false;
        loop {
            self.note_view(out);
            let unproposed_proofs = self.proofs.iter().any(|(_, proposed)| !proposed);
            // A primary whose execution lags its replica (bodies missing)
            // does not propose: its mempool and state are not current.
            if !nothing_to_propose
                && self.replica.can_propose()
                && self.exec_queue.is_empty()
                && (unproposed_proofs
                    || self.cfg.builder.should_build(
                        self.mempool.pending(),
                        // Only what is not yet proposed fills the next block.
                        self.mempool.pending_bytes(),
                        now_ms,
                        self.last_proposal_ms,
                        self.replica.queued() == 0,
                    ))
            {
                let started = self.lap();
                self.sync_inflight();
                let inflight = &self.inflight;
                let inflight_tx = &self.inflight_tx;
                let txs = self.mempool.take_for_block(self.cfg.builder.max_txs, self.cfg.builder.max_bytes, |t| {
                    inflight.contains_key(&t.event.nonce) || inflight_tx.contains_key(&t.tx_hash)
                });
                if txs.is_empty() && !unproposed_proofs {
                    // Every pending tx is in flight (after a view change:
                    // re-proposed by the new-view): an empty proposal would
                    // be refused by every backup as misbehaviour.
                    nothing_to_propose = true;
                    continue;
                }
                let ts = self.wall_ms.max(self.last_proposal_ts).max(self.last.as_ref().map_or(0, |h| h.timestamp_ms));
                self.last_proposal_ts = ts;
                self.last_proposal_ms = now_ms;
                let tx_hashes: Vec<Hash32> = txs.iter().map(|t| t.tx_hash).collect();
                for t in &txs {
                    self.sample(TxStage::Queue, now_ms.saturating_sub(t.received_ms), 1);
                }
                let events: Vec<Arc<Event>> = txs.into_iter().map(|t| t.event).collect();
                let mut evidence = vec![];
                for (p, proposed) in self.proofs.iter_mut().filter(|(_, proposed)| !proposed) {
                    if evidence.len() < proposal::MAX_EVIDENCE {
                        *proposed = true;
                        evidence.push(p.clone());
                    }
                }
                let origin = proposal::Origin { view: self.replica.view(), proposer: self.replica.id };
                let value = Arc::new(proposal::encode_with(origin, ts, &events, &tx_hashes, &evidence));
                // Its execution (queued in `actions`) finds it decoded here.
                let digest = self.replica.propose(value, &mut self.actions);
                let p = Proposal { origin: Some(origin), timestamp_ms: ts, txs: events, tx_hashes, evidence };
                self.remember_checked(digest, p);
                self.record_stage(Stage::BuildBlock, started);
            } else if !self.replica.is_primary() && (self.mempool.pending() > 0 || !self.awaiting.is_empty()) {
                // Txs wait, or a proposal's bodies: the primary must get
                // something ordered before the timeout.
                self.replica.expect_progress();
            } else if !self.replica.is_primary() && self.exec_queue.is_empty() {
                self.replica.expect_nothing();
            }
            if self.actions.is_empty() {
                return;
            }
            for a in std::mem::take(&mut self.actions) {
                match a {
                    Action::Persist(r) => {
                        let stable = match &r {
                            Record::Stable { seq, proof } => Some((*seq, proof.clone())),
                            _ => None,
                        };
                        out.push(Output::Persist(r));
                        if let Some((seq, proof)) = stable {
                            self.complete_snapshot(seq, &proof, out);
                        }
                    }
                    Action::Send(to, m) => out.push(Output::Send(to, m)),
                    Action::Broadcast(m) => {
                        match &m {
                            Message::PrePrepare(p) => self.slot_time(p.body.seq, now_ms, |t| &mut t.pre_prepared_ms),
                            Message::Vote(v) if v.body.phase == crate::protocol::consensus::pbft::Phase::Commit => {
                                self.slot_time(v.body.seq, now_ms, |t| &mut t.prepared_ms)
                            }
                            _ => {}
                        }
                        out.push(Output::Broadcast(m))
                    }
                    Action::Execute { seq, value, cert } => {
                        self.slot_time(seq, now_ms, |t| &mut t.committed_ms);
                        self.execute(now_ms, seq, &value, cert, out)
                    }
                    Action::Evidence { culprit, what, proof } => {
                        self.conduct[culprit].equivocations += 1;
                        if let Some(p) = proof {
                            self.note_proof(p);
                        }
                        out.push(Output::Evidence { culprit, what: what.to_string() });
                    }
                }
            }
        }
    }

    /// After a view change: proposals of this validator that were not
    /// committed go back to pending (what a quorum prepared returns through
    /// the new-view; duplicates are harmless, execution skips used nonces).
    fn note_view(&mut self, out: &mut Vec<Output>) {
        let v = self.replica.view();
        if v != self.view {
            let (primary, cause) = (self.replica.primary(v), self.replica.view_change_cause());
            out.push(Output::ViewChanged { view: v, primary, cause, height: self.height() });
            let old_primary = self.replica.primary(self.view);
            self.conduct[old_primary].failed_views += 1;
            self.stats.view_changes += 1;
            self.view = v;
            self.newest_ordered_received_ms = 0;
            self.forwarded.clear();
            self.awaiting.clear(); // a new primary re-proposes what counts
            self.replica.clear_queue();
            self.mempool.unpropose_all();
            for (_, proposed) in &mut self.proofs {
                *proposed = false;
            }
        }
    }

    /// The replica committed `value` at `seq`: executed once its bodies
    /// are here and everything before it executed.
    fn execute(&mut self, now_ms: u64, seq: Seq, value: &[u8], cert: CommitCert, out: &mut Vec<Output>) {
        let last_ts = self.last.as_ref().map_or(0, |h| h.timestamp_ms);
        // Honest backups checked the value before preparing it; one that
        // still fails to decode is executed as a null block on every replica.
        let digest = cert.pre_prepare.body.digest;
        let body = match self.checked.remove(&digest) {
            Some(p) => QueuedBody::Ready(Arc::unwrap_or_clone(p)),
            None => match proposal::decode(value, self.cfg.builder.max_txs) {
                Ok(named) => {
                    let b = self.resolve(named, cert.pre_prepare.from, now_ms);
                    if b.is_complete() {
                        QueuedBody::Ready(b.into_proposal())
                    } else {
                        QueuedBody::Missing(b)
                    }
                }
                Err(e) => {
                    tracing::error!(seq, error = %e, "committed value does not decode; executing it as an empty block");
                    QueuedBody::Ready(Proposal {
                        origin: None,
                        timestamp_ms: last_ts,
                        txs: vec![],
                        tx_hashes: vec![],
                        evidence: vec![],
                    })
                }
            },
        };
        self.exec_queue.push_back(Queued { seq, cert, body });
        self.drain_exec_queue(now_ms, out);
    }

    /// Executes the committed values whose bodies are all here, in order;
    /// once none waits, the held pre-prepares can be checked.
    fn drain_exec_queue(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        while let Some(q) = self.exec_queue.front() {
            if let QueuedBody::Missing(b) = &q.body {
                if !b.is_complete() {
                    break;
                }
            }
            let q = self.exec_queue.pop_front().expect("front exists");
            let p = match q.body {
                QueuedBody::Ready(p) => p,
                QueuedBody::Missing(b) => b.into_proposal(),
            };
            self.execute_proposal(now_ms, q.seq, p, q.cert, out);
        }
        self.check_awaiting(now_ms, out);
    }

    fn execute_proposal(&mut self, now_ms: u64, seq: Seq, p: Proposal, cert: CommitCert, out: &mut Vec<Output>) {
        assert_eq!(seq, self.height() + 1, "PBFT executes sequence numbers in order; height = seq");
        let last_ts = self.last.as_ref().map_or(0, |h| h.timestamp_ms);
        let later = self.slot_times.split_off(&(seq + 1));
        // Only slots seen through every phase here (not fetched ones).
        if let Some(SlotTimes { pre_prepared_ms: Some(a), prepared_ms: Some(b), committed_ms: Some(c) }) =
            std::mem::replace(&mut self.slot_times, later).remove(&seq)
        {
            let txs = p.txs.len() as u32;
            self.sample(TxStage::Prepare, b.saturating_sub(a), txs);
            self.sample(TxStage::Commit, c.saturating_sub(b), txs);
            self.sample(TxStage::Execute, now_ms.saturating_sub(c), txs);
        }
        // Block time never goes back, even if a new primary's clock is behind
        // the last one's (the proposal keeps its own time; the store keeps it).
        let timestamp_ms = p.timestamp_ms.max(last_ts);
        let pairs: Vec<(&Event, Hash32)> = p.txs.iter().map(|t| &**t).zip(p.tx_hashes.iter().copied()).collect();
        let started = self.lap();
        let Executed { state_root, receipts, undo: _ } = self.state.execute_block(seq, timestamp_ms, &pairs);
        self.record_stage(Stage::Execute, started);
        debug_assert_eq!(receipts.len(), p.txs.len());
        self.retire_inflight(seq);
        if self.view == cert.pre_prepare.body.view {
            for h in &p.tx_hashes {
                if let Some(t) = self.mempool.get(h) {
                    self.newest_ordered_received_ms = self.newest_ordered_received_ms.max(t.received_ms);
                }
            }
        }
        // Verdicts from committed state: every validator writes the same
        // DLQ records for this block (their txs are finished by the block).
        for ((tx, r), h) in p.txs.iter().zip(&receipts).zip(&p.tx_hashes) {
            if let TxStatus::Rejected(reason) = r.status {
                if reason == RejectReason::RateLimited {
                    self.stats.rate_limited += 1;
                }
                let detail = format!("refused by execution at height {seq}");
                out.push(Output::Reject(Rejection {
                    reason,
                    detail,
                    origin: format!("block/{seq}"),
                    original: tx.encode(),
                    pos: None,
                    height: Some(seq),
                }));
            }
            // Other txs holding a nonce this block consumed can never commit.
            // The receipt says whether this tx owns its nonce now (the
            // state's `consumes`; a repeat owned it already): no look-up.
            let owns = !matches!(r.status, TxStatus::Rejected(RejectReason::ReplayedNonce | RejectReason::Expired));
            debug_assert_eq!(owns, self.state.is_committed(&tx.nonce, h), "{:?}", r.status);
            if owns {
                for loser in self.mempool.remove_nonce_losers(&tx.nonce, h) {
                    let detail = format!("nonce committed at height {seq} by tx {}", hex::encode(h));
                    out.push(Output::Reject(rejection(&loser, RejectReason::ReplayedNonce, detail, "mempool".into())));
                }
            }
        }
        // From the value, not the certificate (see `proposal::Origin`); a
        // null block keeps the previous block's view and names nobody.
        let prev_view = self.last.as_ref().map_or(0, |h| h.view);
        let (view, proposer_id) = p.origin.map_or((prev_view, usize::MAX), |o| (o.view, o.proposer));
        let header = BlockHeader {
            height: seq,
            view,
            timestamp_ms,
            previous_hash: self.last.as_ref().map_or([0; 32], |h| h.hash()),
            tx_root: tx_root(&p.tx_hashes),
            state_root,
            proposer: self.cfg.validators.get(proposer_id).copied().unwrap_or([0; 32]),
            tx_count: p.txs.len() as u32,
        };
        self.mempool.remove_committed(&p.tx_hashes);
        self.remember_committed(seq, &p.tx_hashes);
        let block = Arc::new(Block { header: header.clone(), txs: p.txs, tx_hashes: p.tx_hashes });
        if let Some(c) = self.conduct.get_mut(proposer_id) {
            c.blocks_proposed += 1;
        }
        let mut changed = false;
        for e in &p.evidence {
            let culprit = e.culprit();
            let was = self.reputation.is_quarantined(culprit);
            changed |= self.reputation.quarantine(culprit);
            if !was && self.reputation.is_quarantined(culprit) {
                out.push(Output::Quarantined { validator: culprit, height: seq });
            }
            self.proofs.retain(|(q, _)| q.culprit() != culprit);
            tracing::warn!(height = seq, validator = culprit, "validator quarantined: committed proof of misbehaviour");
        }
        // Views count from 0 again in a new set's epoch.
        let since_view = if self.replica.epoch() > 0 && seq == self.replica.base() + 1 { 0 } else { prev_view };
        if self.reputation.on_block(since_view, header.view, Some(proposer_id)) || changed {
            let ex = self.reputation.excluded().to_vec();
            tracing::info!(height = seq, excluded = ?ex, "leader exclusions changed (reputation); applied at the next view change");
            self.replica.exclude_from_next_view(ex);
        }
        // The checkpoint at this height signs the block and reputation.
        let app = crate::protocol::snapshot::app_digest(&header.hash(), &self.reputation);
        self.replica.on_app_digest(seq, app, &mut self.actions);
        if self.cfg.snapshot_interval > 0 && seq % self.cfg.snapshot_interval == 0 {
            self.pending_snapshot =
                Some(Box::new(crate::protocol::snapshot::record(&header, &self.state, &self.reputation)));
        }
        self.last = Some(header);
        self.stats.committed_blocks += 1;
        self.stats.committed_txs += block.txs.len() as u64;
        self.drain_backlog(out);
        if self.replica.is_primary() && self.replica.queued() == 0 {
            // The pipeline drained: the next block may wait its interval from now.
            self.last_proposal_ms = self.last_proposal_ms.min(now_ms);
        }
        // A set change ordered here: nothing above its switch height is
        // ordered by this set. At the switch height, the next tick switches.
        let scheduled =
            block.txs.iter().zip(&receipts).any(|(t, r)| {
                t.kind == crate::protocol::event::TxKind::Reconfiguration && r.status == TxStatus::Applied
            });
        if let Some(next) = self.state.scheduled_epoch().filter(|_| scheduled) {
            self.replica.set_ceiling(next.from_height);
        }
        let outcome = block_outcome(&block, &receipts, &self.state);
        out.push(Output::Commit { block, cert, receipts, outcome });
        if seq == self.replica.ceiling() {
            self.switch_due = true;
            // The replica retransmits its checkpoint each interval: a few
            // intervals ride out lost ones.
            self.switch_by_ms = now_ms + SWITCH_WAIT_RETRANSMITS * self.replica.params().retransmit_ms;
        }
    }

    /// Whether the executed switch height hands over now (see `switch_due`).
    fn switch_ready(&self, now_ms: u64) -> bool {
        self.switch_due && (now_ms >= self.switch_by_ms || self.replica.stable_checkpoint().0 >= self.replica.ceiling())
    }

    /// When (monotonic ms) `on_tick` must next run, exactly: the replica's
    /// earliest timer; the next block while leading with txs pending; the
    /// order check while a backup holds pending txs; the next fetch of a
    /// missing body; now (0) for a proof to propose. Ticking earlier does
    /// nothing; later delays that work.
    pub fn poll_timeout_ms(&self) -> u64 {
        if let Some(g) = self.genesis.as_ref().filter(|g| !g.done()) {
            return g.poll_timeout_ms();
        }
        if let Some(j) = &self.joining {
            return j.join.as_ref().map_or(j.again_at_ms, |join| join.poll_timeout_ms());
        }
        if self.removed {
            return u64::MAX;
        }
        if self.switch_ready(0) {
            return 0; // due now
        }
        let mut at_ms = self.replica.poll_timeout_ms();
        if self.switch_due {
            at_ms = at_ms.min(self.switch_by_ms);
        }
        let unproposed_proofs = self.proofs.iter().any(|(_, proposed)| !proposed);
        if unproposed_proofs && self.replica.can_propose() && self.exec_queue.is_empty() {
            return 0; // due now
        }
        if self.mempool.pending() > 0 {
            if self.replica.can_propose() && self.exec_queue.is_empty() {
                at_ms = at_ms.min(self.cfg.builder.next_deadline_ms(self.last_proposal_ms, self.replica.queued() == 0));
            } else if !self.replica.is_primary() && self.exec_queue.is_empty() {
                at_ms = at_ms.min(self.next_order_check_ms);
            }
        }
        let asks = self.awaiting.values().filter_map(|(_, b)| b.next_ask_ms());
        let queued = self.exec_queue.iter().filter_map(|q| match &q.body {
            QueuedBody::Missing(b) => b.next_ask_ms(),
            QueuedBody::Ready(_) => None,
        });
        asks.chain(queued).fold(at_ms, u64::min)
    }
}

/// Most tx bodies served to one validator per order check (a faulty one
/// cannot make this one read and send without a bound).
const MAX_SERVED_TXS: usize = 4 * MAX_FETCH_TXS;

/// How often a backup checks that the primary is not passing over its txs.
const ORDER_CHECK_INTERVAL_MS: u64 = 200;
/// The window of the per-sender budgets for forwarded and served txs.
const BUDGET_WINDOW_MS: u64 = 200;
/// How long a backup holds a tx the primary passes over (or, idle, does
/// not order) before forwarding it to the primary.
const FORWARD_DELAY_MS: u64 = 1_000;
/// How often a backup alone in a view change forwards its pending txs again.
const FORWARD_RETRY_MS: u64 = 5_000;
/// Windows of executed blocks whose txs are remembered by hash (a value a
/// new-view re-proposes was prepared within a window of the seq where its
/// txs may have committed since; two for margin).
const RECENT_WINDOWS: u64 = 2;
/// The shortest time a tx may be passed over before its holder suspects
/// the primary.
const ORDER_TIMEOUT_MIN_MS: u64 = 5_000;
/// Most pending txs one censorship check looks at (the oldest ones).
const ORDER_CHECK_MAX_SCAN: usize = 8192;

fn rejection(tx: &VerifiedTx, reason: RejectReason, detail: String, origin: String) -> Rejection {
    Rejection { reason, detail, origin, original: tx.event.encode(), pos: tx.pos.clone(), height: None }
}

/// What executing `block` did: the txs refused, and every producer's
/// totals after it.
/// The replica and reputation of epoch `next`, whose set orders the seqs
/// above `next.from_height`, taking over from `replica` (epoch `prev`'s,
/// having executed exactly that height; `app` its application digest
/// there): the same chained state at its base, the new set's parameters
/// and signer, view 0. Reputation is carried by validator id. None if
/// this validator holds none of the new set's keys.
pub fn next_epoch<A: EpochAuth>(
    replica: &Replica<A>,
    reputation: &Reputation,
    prev: &crate::protocol::reconfig::Epoch,
    next: &crate::protocol::reconfig::Epoch,
    app: Hash32,
) -> Option<(Replica<A>, Reputation)> {
    assert_eq!(replica.executed(), next.from_height, "the old set's replica stops at the switch height");
    let keys: Vec<PublicKey> = next.validators.values().copied().collect();
    let (rid, auth) = replica.auth().for_epoch(next.epoch, &keys)?;
    let params = Params { n: keys.len(), ..replica.params().clone() };
    let base = Replica::at_epoch_base(rid, params, auth, next.epoch, next.from_height, replica.state_digest(), app);
    let old_ids: Vec<u32> = prev.validators.keys().copied().collect();
    let new_ids: Vec<u32> = next.validators.keys().copied().collect();
    Some((base, reputation.for_set(&old_ids, &new_ids)))
}

pub fn block_outcome(block: &Block, receipts: &[Receipt], state: &State) -> crate::proto::BlockOutcome {
    let rejected = receipts
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r.status {
            crate::protocol::state::TxStatus::Applied => None,
            crate::protocol::state::TxStatus::Rejected(reason) => {
                Some(crate::proto::TxRejection { index: i as u32, reason: reason.as_str().into() })
            }
            crate::protocol::state::TxStatus::Repeat => Some(crate::proto::TxRejection {
                index: i as u32,
                reason: crate::protocol::state::REPEAT_REASON.into(),
            }),
        })
        .collect();
    let producers: std::collections::BTreeSet<[u8; 32]> = block.txs.iter().map(|t| t.producer).collect();
    let producers = producers
        .into_iter()
        .map(|p| {
            let (accepted, rejected) = state.producer_totals(&p);
            crate::proto::ProducerTotals { producer: p.to_vec(), accepted, rejected }
        })
        .collect();
    crate::proto::BlockOutcome { rejected, producers }
}

/// Re-executes a stored block into `state`, checking its state root.
pub fn replay(state: &mut State, block: &Block) -> Result<(), String> {
    let pairs: Vec<(&Event, Hash32)> = block.txs.iter().map(|t| &**t).zip(block.tx_hashes.iter().copied()).collect();
    let ex = state.execute_block(block.header.height, block.header.timestamp_ms, &pairs);
    if ex.state_root != block.header.state_root {
        return Err(format!(
            "state root mismatch replaying block {}: stored {}, computed {}",
            block.header.height,
            hex::encode(block.header.state_root),
            hex::encode(ex.state_root)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// One test clock: monotonic and wall the same.
    fn at(ms: u64) -> Now {
        Now { mono_ms: ms, wall_ms: ms }
    }
    use super::*;
    use crate::protocol::consensus::pbft::Params;
    use crate::protocol::consensus::wire::Ed25519Auth;
    use crate::protocol::crypto;
    use crate::protocol::event::{sample_anomaly_payload, TxKind};
    use crate::protocol::state::{StateConfig, TxStatus};
    use std::collections::HashSet;
    use std::time::Duration;

    fn vtx(k: &crypto::SigningKey, i: u64, ts: u64) -> VerifiedTx {
        let pk = crypto::public_key(k);
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&ts.to_be_bytes());
        nonce[8..12].copy_from_slice(&pk[..4]);
        nonce[12..].copy_from_slice(&(i as u32).to_be_bytes());
        let ev = Event::sign(TxKind::Anomaly, k, nonce, sample_anomaly_payload(i, 300), ts, (i as u32).to_be_bytes());
        VerifiedTx { tx_hash: ev.tx_hash(), event: Arc::new(ev), received_ms: ts, pos: None }
    }

    thread_local! {
        /// A validator that drops every tx forwarded to it (a censor).
        static DROP_FORWARDS_TO: std::cell::Cell<Option<Rid>> = const { std::cell::Cell::new(None) };
        /// Validators that answer no tx fetch (a primary naming txs it
        /// keeps to itself).
        static WITHHOLD_BODIES: std::cell::Cell<&'static [Rid]> = const { std::cell::Cell::new(&[]) };
        /// Steps whose checkpoints `Ready` held until their blocks were durable.
        static HELD_CHECKPOINTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        /// Each node's committed blocks by height (its block store).
        static STORED: std::cell::RefCell<HashMap<(usize, Seq), Arc<Block>>> = std::cell::RefCell::new(HashMap::new());
    }

    /// Short timeouts (the tests drive a simulated clock in 100 ms steps).
    fn params_for_tests(n: usize) -> Params {
        Params {
            window: 16,
            checkpoint_interval: 4,
            timeout_ms: 2_000,
            timeout_min_ms: 1_000,
            retransmit_ms: 200,
            heartbeat_ms: 200,
            missed_heartbeats: 25,
            ..Params::manual_defaults(n)
        }
    }

    fn cluster(n: usize, producer: &crypto::SigningKey, max_mempool: usize) -> Vec<Node<Ed25519Auth>> {
        cluster_with_keys(n, producer, max_mempool).0
    }

    fn cluster_with_keys(
        n: usize,
        producer: &crypto::SigningKey,
        max_mempool: usize,
    ) -> (Vec<Node<Ed25519Auth>>, Vec<crypto::SigningKey>) {
        cluster_with_state(n, producer, max_mempool, StateConfig::default())
    }

    fn cluster_with_state(
        n: usize,
        producer: &crypto::SigningKey,
        max_mempool: usize,
        state: StateConfig,
    ) -> (Vec<Node<Ed25519Auth>>, Vec<crypto::SigningKey>) {
        let keys: Vec<_> = (0..n).map(|_| crypto::generate_key()).collect();
        let pks: Vec<_> = keys.iter().map(crypto::public_key).collect();
        let cfg = NodeConfig {
            builder: BuilderConfig {
                max_txs: 4,
                max_bytes: 1 << 20,
                build_interval: Duration::from_millis(100),
                min_txs: 1,
                min_interval: Duration::ZERO,
            },
            mempool: MempoolConfig { max_txs: max_mempool, max_bytes: 1 << 20 },
            limits: Limits::default(),
            policy: Arc::new(VerifyPolicy {
                producers: [crypto::public_key(producer)].into_iter().collect(),
                skew_ms: 60_000,
            }),
            skew_ms: 60_000,
            validators: pks.clone(),
            snapshot_interval: 8,
        };
        let nodes = (0..n)
            .map(|i| {
                let r = Replica::new(i, params_for_tests(n), Ed25519Auth::new(keys[i].clone(), pks.clone()));
                Node::new(cfg.clone(), r, State::new(state.clone()), None, Reputation::new(n, Some(0.7), true), at(0))
            })
            .collect();
        (nodes, keys)
    }

    /// A `Ready` checked against its rules and flattened back in its order.
    fn in_ready_order(r: Ready) -> Vec<Output> {
        for o in &r.effects {
            assert!(
                !matches!(o, Output::Persist(_) | Output::Send(..) | Output::Broadcast(_) | Output::Commit { .. }),
                "{o:?} among the effects"
            );
        }
        assert_eq!(r.stable, r.records.iter().any(|x| matches!(x, Record::Stable { .. })));
        assert!(r.after_commits.iter().all(|(_, m)| matches!(m, Message::Checkpoint(_))));
        if !r.commits.is_empty() {
            assert!(
                r.sends.iter().all(|(_, m)| !matches!(m, Message::Checkpoint(_))),
                "a checkpoint before its blocks"
            );
        }
        if !r.after_commits.is_empty() {
            HELD_CHECKPOINTS.set(HELD_CHECKPOINTS.get() + 1);
        }
        let to_output = |(to, m): (Option<Rid>, Message)| match to {
            Some(to) => Output::Send(to, m),
            None => Output::Broadcast(m),
        };
        let mut out = r.effects;
        out.extend(r.records.into_iter().map(Output::Persist));
        out.extend(r.sends.into_iter().map(to_output));
        out.extend(r.commits.into_iter().map(|c| Output::Commit {
            block: c.block,
            cert: c.cert,
            receipts: c.receipts,
            outcome: c.outcome,
        }));
        out.extend(r.after_commits.into_iter().map(to_output));
        out
    }

    /// Delivers every message (lossless, in order) until quiet; returns the
    /// committed blocks per node.
    fn settle(
        nodes: &mut [Node<Ed25519Auth>],
        now: u64,
        outs: &mut [Vec<Output>],
        mute: &[Rid],
    ) -> Vec<Vec<Arc<Block>>> {
        settle_with(nodes, now, outs, mute, &mut |_, _| None)
    }

    /// `settle`, handing every output but sends to `other` (commits too),
    /// which may answer with messages from that node to the one it names.
    fn settle_with(
        nodes: &mut [Node<Ed25519Auth>],
        now: u64,
        outs: &mut [Vec<Output>],
        mute: &[Rid],
        other: &mut dyn FnMut(usize, Output) -> Option<(Rid, Vec<Message>)>,
    ) -> Vec<Vec<Arc<Block>>> {
        let mut committed = vec![vec![]; nodes.len()];
        loop {
            let mut msgs = vec![];
            let mut forwards = vec![];
            let mut fetches = vec![];
            let mut bodies = vec![];
            for (i, out) in outs.iter_mut().enumerate() {
                // Every step's outputs go through `Ready`, in its order.
                for o in in_ready_order(Ready::from_outputs(out.drain(..))) {
                    match o {
                        Output::Send(to, m) => msgs.push((i, Some(to), m)),
                        Output::Broadcast(m) => msgs.push((i, None, m)),
                        Output::Forward { to, txs } => forwards.push((i, to, txs)),
                        Output::FetchTxs { to, seq, tx_hashes } => fetches.push((i, to, seq, tx_hashes)),
                        Output::SendTxs { to, seq, txs } => bodies.push((i, to, seq, txs)),
                        Output::ServeBlockTxs { to, seq, height, tx_hashes } => {
                            // The block store: this node's committed block.
                            let b = STORED.with_borrow(|s| s.get(&(i, height)).cloned());
                            if let Some(b) = b {
                                let txs = b
                                    .txs
                                    .iter()
                                    .zip(&b.tx_hashes)
                                    .filter(|(_, h)| tx_hashes.contains(h))
                                    .map(|(t, _)| t.clone())
                                    .collect();
                                bodies.push((i, to, seq, txs));
                            }
                        }
                        o => {
                            if let Output::Commit { block, .. } = &o {
                                committed[i].push(block.clone());
                                STORED.with_borrow_mut(|s| s.insert((i, block.header.height), block.clone()));
                            }
                            if let Some((to, ms)) = other(i, o) {
                                msgs.extend(ms.into_iter().map(|m| (i, Some(to), m)));
                            }
                        }
                    }
                }
            }
            if msgs.is_empty() && forwards.is_empty() && fetches.is_empty() && bodies.is_empty() {
                return committed;
            }
            for (from, to, seq, hashes) in fetches {
                if !mute.contains(&from) && !WITHHOLD_BODIES.get().contains(&to) {
                    nodes[to].on_tx_fetch(at(now), from, seq, hashes, &mut outs[to]);
                }
            }
            for (from, to, seq, txs) in bodies {
                if !mute.contains(&from) {
                    let txs = txs.iter().map(|t| t.to_tx_proto()).collect();
                    nodes[to].on_bodies(at(now), from, seq, txs, &mut outs[to]);
                }
            }
            for (from, to, txs) in forwards {
                if mute.contains(&from) || DROP_FORWARDS_TO.get() == Some(to) {
                    continue;
                }
                let txs = txs.iter().map(|t| t.to_tx_proto()).collect();
                nodes[to].on_forward(at(now), from, txs, &mut outs[to]);
            }
            for (from, to, m) in msgs {
                if mute.contains(&from) {
                    continue;
                }
                for (j, node) in nodes.iter_mut().enumerate() {
                    if j != from && to.is_none_or(|t| t == j) {
                        node.on_message(at(now), from, m.clone(), &mut outs[j]);
                    }
                }
            }
        }
    }

    /// Lets the backups' wait for their own source run out, so they ask
    /// for the bodies they lack, and delivers everything.
    fn fetch_bodies(nodes: &mut [Node<Ed25519Auth>], now: u64, outs: &mut [Vec<Output>]) {
        let later = now + crate::protocol::bodies::WAIT_FOR_SOURCE_MS;
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_tick(at(later), &mut outs[i]);
        }
        settle(nodes, later, outs, &[]);
    }

    #[test]
    fn single_validator_commits_and_backpressures() {
        let k = crypto::generate_key();
        let mut n = cluster(1, &k, 6).pop().unwrap();
        let mut out = vec![];
        n.on_txs(at(1000), (0..10).map(|i| vtx(&k, i, 1000)).collect(), &mut out);
        // Four are a full block: proposed and (N = 1) committed at once; the
        // backlog refills the pool, so a second full block follows, and the
        // last two go at once too (no block in flight: nothing to wait for).
        let commits: Vec<_> =
            out.iter().filter_map(|o| if let Output::Commit { block, .. } = o { Some(block) } else { None }).collect();
        assert_eq!(commits.iter().map(|b| b.txs.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert_eq!(commits[1].header.previous_hash, commits[0].hash());
        assert_eq!(commits[0].header.height, 1);
        assert_eq!(commits[0].txs.len(), 4);
        assert!(out.iter().any(|o| matches!(o, Output::Persist(Record::PrePrepare(_)))), "pre-prepare persisted");
        let mut total: usize = commits.iter().map(|b| b.txs.len()).sum();
        let mut now = 1000;
        while n.mempool_len() > 0 || !n.backlog.is_empty() {
            now += 100;
            out.clear();
            n.on_tick(at(now), &mut out);
            for o in &out {
                if let Output::Commit { block, receipts, .. } = o {
                    total += block.txs.len();
                    assert!(receipts.iter().all(|r| r.status == TxStatus::Applied));
                }
            }
        }
        assert_eq!(total, 10, "nothing lost through backpressure");
        assert_eq!(n.stats().committed_txs, 10);
    }

    #[test]
    fn a_primary_cuts_a_block_early_only_for_bytes_not_yet_proposed() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let primary = &mut nodes[0];
        let txs: Vec<VerifiedTx> = (0..3).map(|i| vtx(&k, i, 10)).collect();
        let sz = txs[0].event.size();
        // Room for two txs' bytes per block, a long interval.
        primary.cfg.builder = BuilderConfig {
            max_txs: 100,
            max_bytes: sz * 5 / 2,
            build_interval: Duration::from_millis(100),
            min_txs: 1,
            min_interval: Duration::ZERO,
        };
        let proposals =
            |out: &[Output]| out.iter().filter(|o| matches!(o, Output::Persist(Record::PrePrepare(_)))).count();
        let mut out = vec![];
        primary.on_txs(at(10), txs, &mut out);
        // Three txs' bytes fill a block: two are cut at once. The third
        // waits for the interval, though the pool (with the two in flight)
        // still holds more than a block's bytes.
        assert_eq!(proposals(&out), 1);
        out.clear();
        primary.on_tick(at(50), &mut out);
        assert_eq!(proposals(&out), 0, "the in-flight block's bytes do not fill the next one");
        primary.on_tick(at(110), &mut out);
        assert_eq!(proposals(&out), 1, "cut when the interval is over");
    }

    #[test]
    fn stage_times_are_measured_only_with_a_stopwatch() {
        // A fake clock that advances 1 µs per reading.
        static TICKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        fn fake_clock() -> u64 {
            TICKS.fetch_add(1_000, std::sync::atomic::Ordering::Relaxed)
        }
        let k = crypto::generate_key();
        let mut plain = cluster(1, &k, 6).pop().unwrap();
        let mut out = vec![];
        plain.on_txs(at(1000), (0..8).map(|i| vtx(&k, i, 1000)).collect(), &mut out);
        assert_eq!(plain.stats().committed_blocks, 2);
        assert!(plain.take_stage_times().is_empty(), "no stopwatch, no readings");

        let mut timed = cluster(1, &k, 6).pop().unwrap();
        timed.set_stopwatch(fake_clock);
        out.clear();
        timed.on_txs(at(1000), (0..8).map(|i| vtx(&k, i, 1000)).collect(), &mut out);
        let times = timed.take_stage_times();
        let count = |s: Stage| times.iter().filter(|(t, _)| *t == s).count();
        assert_eq!(count(Stage::BuildBlock), 2, "{times:?}");
        assert_eq!(count(Stage::Execute), 2, "{times:?}");
        assert!(times.iter().all(|(_, ns)| *ns == 1_000), "one reading apart: {times:?}");
        assert!(timed.take_stage_times().is_empty(), "drained");
        // The same outputs either way: readings never feed a decision.
        assert_eq!(timed.height(), plain.height());
        assert_eq!(timed.state().root(), plain.state().root());
    }

    #[test]
    fn pipelined_single_validator_commits_every_tx_exactly_once() {
        let k = crypto::generate_key();
        let mut n = cluster(1, &k, 1000).pop().unwrap();
        let mut out = vec![];
        let txs: Vec<_> = (0..60).map(|i| vtx(&k, i, 1000)).collect();
        let mut now = 1000;
        for chunk in txs.chunks(7) {
            now += 3;
            n.on_txs(at(now), chunk.to_vec(), &mut out);
            n.on_tick(at(now), &mut out);
        }
        for _ in 0..10 {
            now += 100;
            n.on_tick(at(now), &mut out);
        }
        let mut seen = HashSet::new();
        for o in &out {
            if let Output::Commit { block, .. } = o {
                for h in &block.tx_hashes {
                    assert!(seen.insert(*h), "tx committed twice (block {})", block.header.height);
                }
            }
        }
        assert_eq!(seen.len(), 60);
    }

    #[test]
    fn a_backup_fed_before_its_first_tick_does_not_change_view_at_once() {
        // Wall-clock time: a deadline counted from 0 would already be past.
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let now = 1_800_000_000_000;
        let mut out = vec![];
        nodes[1].on_txs(at(now), vec![vtx(&k, 1, now)], &mut out);
        nodes[1].on_tick(at(now + 10), &mut out);
        assert_eq!(nodes[1].replica().view(), 0, "{out:?}");
        nodes[1].on_tick(at(now + 2_500), &mut out);
        assert_eq!(nodes[1].replica().view(), 1, "the primary ordered nothing within the timeout");
    }

    #[test]
    fn reputation_excludes_a_leader_whose_views_fail_and_readmits_it() {
        let mut r = Reputation::new(4, Some(0.7), true);
        assert!(!r.on_block(0, 0, Some(0)));
        assert!(!r.on_block(0, 1, Some(1)), "one failed view (0's) is not enough");
        assert!(!r.on_block(1, 3, Some(3)));
        // Views 3 and 4 fail too; 4 was led by 0 again: 0 drops under 0.7.
        assert!(r.on_block(3, 5, Some(1)));
        assert_eq!(r.excluded(), &[0]);
        assert!(r.score(0) < 0.7 && r.score(3) >= 0.7);
        // With 0 out of the rotation, view 5 is led by the third of 1, 2, 3.
        assert_eq!(r.leader_of(5), 3);
        let mut blocks = 0;
        while !r.excluded().is_empty() {
            r.on_block(5, 5, Some(2));
            blocks += 1;
            assert!(blocks < 100);
        }
        assert_eq!(blocks, 7, "readmitted after 7 good blocks");
        // At most f = 1 excluded, the lowest first; disabled: never.
        let mut r = Reputation::new(4, Some(0.99), true);
        r.on_block(0, 2, Some(2)); // views 0 and 1 failed
        assert_eq!(r.excluded().len(), 1);
        let mut off = Reputation::new(4, None, false);
        off.on_block(0, 9, Some(1));
        assert!(off.excluded().is_empty());
    }

    #[test]
    fn an_equivocating_primary_is_quarantined_through_a_committed_proof() {
        use crate::protocol::consensus::pbft::{pp_bytes, PrePrepare, Signed, Value};
        let k = crypto::generate_key();
        let (mut nodes, keys) = cluster_with_keys(4, &k, 100);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let mut now = 1000;
        let (a, b) = (vtx(&k, 1, now), vtx(&k, 2, now));
        // Validator 0 leads view 0 and signs two different values for seq 1.
        let auth0 = Ed25519Auth::new(keys[0].clone(), nodes[0].cfg.validators.clone());
        let pp = |t: &VerifiedTx| {
            let value: Value = Arc::new(proposal::encode(
                proposal::Origin::default(),
                now,
                std::slice::from_ref(&t.event),
                &[t.tx_hash],
            ));
            let body = PrePrepare { view: 0, seq: 1, digest: crate::sha256(&value), value };
            Message::PrePrepare(Signed { sig: auth0.sign(&pp_bytes(&body)), body, from: 0 })
        };
        for (i, n) in nodes.iter_mut().enumerate().skip(1) {
            n.on_txs(at(now), vec![a.clone(), b.clone()], &mut outs[i]);
        }
        let (ppa, ppb) = (pp(&a), pp(&b));
        nodes[1].on_message(at(now), 0, ppa, &mut outs[1]);
        nodes[1].on_message(at(now), 0, ppb, &mut outs[1]);
        assert!(outs[1].iter().any(|o| matches!(o, Output::Evidence { culprit: 0, .. })), "equivocation seen");
        // Validator 0 goes silent; the others change view, and validator 1,
        // leading view 1, commits the proof with the txs.
        while !nodes[1..].iter().all(|n| n.reputation().is_quarantined(0)) {
            now += 100;
            assert!(now < 60_000, "the proof was never committed");
            for (i, n) in nodes.iter_mut().enumerate().skip(1) {
                n.on_tick(at(now), &mut outs[i]);
            }
            outs[0].clear();
            settle(&mut nodes, now, &mut outs, &[0]);
        }
        for n in &nodes[1..] {
            assert_eq!(n.reputation().excluded(), &[0], "quarantined validators do not lead");
            assert_eq!(n.state().root(), nodes[1].state().root());
        }
    }

    #[test]
    fn redelivered_committed_tx_is_a_duplicate() {
        let k = crypto::generate_key();
        let mut n = cluster(1, &k, 10).pop().unwrap();
        let mut out = vec![];
        let t = vtx(&k, 1, 1000);
        n.on_txs(at(1000), vec![t.clone()], &mut out);
        n.on_tick(at(1200), &mut out);
        assert_eq!(n.height(), 1);
        n.on_txs(at(1300), vec![t], &mut out);
        assert_eq!(n.stats().duplicates, 1);
        assert_eq!(n.mempool_len(), 0);
    }

    /// Four validators that each admitted the same ten txs at 1000 ms.
    fn four_fed_ten_txs() -> (Vec<Node<Ed25519Auth>>, Vec<Vec<Output>>, Vec<VerifiedTx>) {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let txs: Vec<_> = (0..10).map(|i| vtx(&k, i, 1000)).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(1000), txs.clone(), &mut outs[i]);
        }
        (nodes, outs, txs)
    }

    /// A new primary whose pending txs the new-view re-proposes has nothing
    /// to propose: it must not propose an empty value (backups refuse those
    /// as misbehaviour, and the view would change again and again).
    #[test]
    fn a_new_primary_with_every_pending_tx_re_proposed_proposes_nothing_empty() {
        let (mut nodes, mut outs, txs) = four_fed_ten_txs();
        nodes[0].on_tick(at(1100), &mut outs[0]);
        // Pre-prepares and prepares flow, commits are lost: every backup
        // holds a prepared certificate, nothing commits.
        loop {
            let mut msgs = vec![];
            for (i, out) in outs.iter_mut().enumerate() {
                for o in out.drain(..) {
                    match o {
                        Output::Broadcast(m) => msgs.push((i, m)),
                        Output::Send(_, m) => msgs.push((i, m)),
                        _ => {}
                    }
                }
            }
            msgs.retain(
                |(_, m)| !matches!(m, Message::Vote(v) if v.body.phase == crate::protocol::consensus::pbft::Phase::Commit),
            );
            if msgs.is_empty() {
                break;
            }
            for (from, m) in msgs {
                for (j, n) in nodes.iter_mut().enumerate().filter(|(j, _)| *j != from) {
                    n.on_message(at(1100), from, m.clone(), &mut outs[j]);
                }
            }
        }
        assert!(nodes.iter().all(|n| n.height() == 0));
        // The primary goes; the others change view and validator 1 leads.
        for (i, n) in nodes.iter_mut().enumerate().skip(1) {
            n.replica.set_time(1200);
            n.replica.suspect_primary(&mut n.actions);
            n.step(1200, &mut outs[i]);
        }
        let mut now = 1200;
        let mut committed = vec![vec![]; 4];
        while nodes[1..].iter().any(|n| n.height() == 0) {
            now += 100;
            assert!(now < 120_000, "nothing committed after the view change");
            for (i, n) in nodes.iter_mut().enumerate().skip(1) {
                n.on_tick(at(now), &mut outs[i]);
            }
            outs[0].clear();
            let c = settle(&mut nodes, now, &mut outs, &[0]);
            for (i, b) in c.into_iter().enumerate() {
                committed[i].extend(b);
            }
        }
        for (i, n) in nodes.iter().enumerate().skip(1) {
            assert_eq!(n.replica().view(), 1, "validator {i}: one view change, not a cascade");
            assert_eq!(n.stats().proposals_refused, 0, "validator {i} refused a proposal");
            assert_eq!(n.conduct()[1].invalid_proposals, 0);
            assert_eq!(committed_ids(&committed[i]).len(), txs.len(), "validator {i}: every tx once");
        }
    }

    #[test]
    fn four_validators_agree_and_every_tx_commits_once() {
        let (mut nodes, mut outs, _) = four_fed_ten_txs();
        let mut now = 1000;
        let mut blocks = vec![vec![]; 4];
        while nodes.iter().any(|n| n.mempool_len() > 0) {
            now += 100;
            assert!(now < 10_000, "no progress");
            for (i, n) in nodes.iter_mut().enumerate() {
                n.on_tick(at(now), &mut outs[i]);
            }
            for (i, b) in settle(&mut nodes, now, &mut outs, &[]).into_iter().enumerate() {
                blocks[i].extend(b);
            }
        }
        let hashes: Vec<Vec<Hash32>> = blocks.iter().map(|bs| bs.iter().map(|b| b.hash()).collect()).collect();
        assert!(hashes.iter().all(|h| *h == hashes[0]), "same blocks on every validator");
        let txs_committed: usize = blocks[0].iter().map(|b| b.txs.len()).sum();
        assert_eq!(txs_committed, 10);
        assert!(nodes.iter().all(|n| n.state().root() == nodes[0].state().root()));
        assert_eq!(blocks[0][0].header.proposer, nodes[0].cfg.validators[0], "validator 0 leads view 0");
    }

    /// With `min_interval`, a primary whose pipeline is idle waits out the
    /// floor since its last block (its `poll_timeout_ms` says exactly when),
    /// then proposes; a full block does not wait.
    #[test]
    fn an_idle_primary_waits_out_the_block_floor_and_polls_for_it() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        for n in nodes.iter_mut() {
            n.cfg.builder.min_interval = Duration::from_millis(30);
        }
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let proposed = |out: &[Output]| out.iter().any(|o| matches!(o, Output::Broadcast(Message::PrePrepare(_))));
        // Every validator gets every tx (as from Kafka).
        let give = |nodes: &mut [Node<Ed25519Auth>], outs: &mut [Vec<Output>], now: u64, txs: Vec<VerifiedTx>| {
            for (r, n) in nodes.iter_mut().enumerate() {
                n.on_txs(at(now), txs.clone(), &mut outs[r]);
            }
        };
        // First block at 1000: the last block was "never".
        give(&mut nodes, &mut outs, 1000, vec![vtx(&k, 0, 1000)]);
        assert!(proposed(&outs[0]), "{:?}", outs[0]);
        settle(&mut nodes, 1000, &mut outs, &[]);
        assert!(nodes.iter().all(|n| n.height() == 1));
        // Committed at once; one tx at 1010 waits for 1030.
        give(&mut nodes, &mut outs, 1010, vec![vtx(&k, 1, 1010)]);
        assert!(!proposed(&outs[0]), "proposed inside the floor: {:?}", outs[0]);
        // Woken when it asks (never later than the floor), it holds the tx
        // until 1030.
        let mut now = 1010;
        while now < 1030 {
            let due = nodes[0].poll_timeout_ms();
            assert!(due <= 1030, "polls at {due}, after the floor");
            now = due.max(now + 1).min(1030);
            if now < 1030 {
                nodes[0].on_tick(at(now), &mut outs[0]);
                assert!(!proposed(&outs[0]), "proposed at {now}: {:?}", outs[0]);
            }
        }
        nodes[0].on_tick(at(1030), &mut outs[0]);
        assert!(proposed(&outs[0]), "{:?}", outs[0]);
        settle(&mut nodes, 1030, &mut outs, &[]);
        assert!(nodes.iter().all(|n| n.height() == 2));
        // A full block (max_txs 4) is cut at once, floor or not.
        give(&mut nodes, &mut outs, 1031, (2..6).map(|i| vtx(&k, i, 1031)).collect());
        assert!(proposed(&outs[0]), "a full block waited: {:?}", outs[0]);
    }

    /// A checkpoint a step makes beside the commit of the block it vouches
    /// for waits in `Ready::after_commits` (sent once the block is durable);
    /// `settle` checks every step's `Ready` against its rules.
    #[test]
    fn ready_holds_a_checkpoint_until_its_blocks_are_durable() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        HELD_CHECKPOINTS.set(0);
        let mut now = 1000;
        for i in 0..8 {
            for (r, n) in nodes.iter_mut().enumerate() {
                n.on_txs(at(now), vec![vtx(&k, i, 1000)], &mut outs[r]);
            }
            now += 100;
            for (r, n) in nodes.iter_mut().enumerate() {
                n.on_tick(at(now), &mut outs[r]);
            }
            settle(&mut nodes, now, &mut outs, &[]);
        }
        assert!(
            nodes.iter().all(|n| n.height() >= 4),
            "heights {:?}",
            nodes.iter().map(|n| n.height()).collect::<Vec<_>>()
        );
        assert!(HELD_CHECKPOINTS.get() > 0, "no checkpoint went out with its block's commit");
    }

    /// What the runtime keeps per node in these tests: committed
    /// certificates (its block store, answering fetches) and, for node 0,
    /// the newest snapshot completed with its stable checkpoint's proof.
    #[derive(Default)]
    struct Stores {
        certs: Vec<std::collections::BTreeMap<Seq, CommitCert>>,
        served: Option<(Seq, Vec<u8>)>,
    }

    impl Stores {
        fn handle(&mut self, i: usize, o: Output) -> Option<(Rid, Vec<Message>)> {
            match o {
                Output::Commit { block, cert, .. } => {
                    self.certs[i].insert(block.header.height, cert);
                }
                Output::ServeFetch { to, from_seq } => {
                    let ms = self.certs[i].range(from_seq..from_seq + 16).map(|(_, c)| Message::Committed(c.clone()));
                    return Some((to, ms.collect()));
                }
                Output::Snapshot(s) if i == 0 => {
                    let seq = s.height();
                    self.served = Some((seq, crate::protocol::snapshot::encode(*s)));
                }
                _ => {}
            }
            None
        }
    }

    /// Ticks and delivers until `done`.
    fn drive(
        nodes: &mut [Node<Ed25519Auth>],
        outs: &mut [Vec<Output>],
        stores: &mut Stores,
        now: &mut u64,
        done: impl Fn(&[Node<Ed25519Auth>]) -> bool,
    ) {
        while !done(nodes) {
            *now += 100;
            let heights: Vec<u64> = nodes.iter().map(|n| n.height()).collect();
            assert!(*now < 300_000, "no progress: heights {heights:?}");
            for (i, n) in nodes.iter_mut().enumerate() {
                n.on_tick(at(*now), &mut outs[i]);
            }
            settle_with(nodes, *now, outs, &[], &mut |i, o| stores.handle(i, o));
        }
    }

    #[test]
    fn a_fresh_validator_joins_from_a_verified_snapshot_and_catches_up() {
        use crate::protocol::consensus::wire::WireLimits;
        use crate::protocol::snapshot::{self, ReputationConfig};
        use prost::Message as _;
        let k = crypto::generate_key();
        let (mut nodes, keys) = cluster_with_keys(4, &k, 200);
        let pks: Vec<_> = keys.iter().map(crypto::public_key).collect();
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let mut stores = Stores { certs: vec![Default::default(); 4], ..Default::default() };
        let mut now = 1000;
        let txs: Vec<_> = (0..60).map(|i| vtx(&k, i, 1000)).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(now), txs[..40].to_vec(), &mut outs[i]);
        }
        drive(&mut nodes, &mut outs, &mut stores, &mut now, |ns| ns.iter().all(|n| n.height() >= 10));
        let (seq, bytes) = stores.served.clone().expect("node 0 completed a snapshot at a stable checkpoint");
        assert_eq!(seq % 8, 0);

        // Validator 3 loses everything and starts from node 0's snapshot.
        let limits = WireLimits { n: 4, max_value_bytes: 1 << 20, window: 16 };
        let rep = ReputationConfig { floor: Some(0.7), quarantine: true };
        let auth = |i: usize| Ed25519Auth::new(keys[i].clone(), pks.clone());
        let verify = |b: &[u8]| {
            snapshot::verify(b, 3, &params_for_tests(4), auth(3), &limits, StateConfig::default(), rep).map(|_| ())
        };
        // Tampering with anything a checkpoint vouches for is caught.
        let good = crate::proto::ChainSnapshot::decode(&bytes[..]).unwrap();
        let mut bad_state = good.clone();
        bad_state.state.as_mut().unwrap().entries[0].value.push(1);
        let mut bad_rep = good.clone();
        bad_rep.reputation[1] -= 1;
        let mut few_sigs = good.clone();
        few_sigs.proof.truncate(2);
        let mut other_header = good.clone();
        other_header.header.as_mut().unwrap().timestamp_ms += 1;
        for (what, b) in
            [("state", bad_state.clone()), ("reputation", bad_rep), ("signatures", few_sigs), ("header", other_header)]
        {
            assert!(verify(&b.encode_to_vec()).is_err(), "a snapshot with a changed {what} was accepted");
        }
        // It joins through the node's own join phase: a forged offer is
        // refused, a peer without one is passed over, node 0's is taken.
        let cfg = nodes[3].cfg.clone();
        let empty = Replica::new(3, params_for_tests(4), auth(3));
        let mut fresh = Node::new(
            cfg,
            empty,
            State::new(StateConfig::default()),
            None,
            Reputation::new(4, Some(0.7), true),
            at(now),
        );
        let setup = snapshot::JoinSetup {
            me: 3,
            params: params_for_tests(4),
            auth: auth(3),
            wire: limits,
            state: StateConfig::default(),
            reputation: rep,
            records: vec![],
            timeout_ms: 10_000,
            member_only: false,
        };
        fresh.start_joining(setup);
        assert!(!fresh.started() && !fresh.has_room(), "consensus waits for the join");
        assert!(fresh.poll_timeout_ms() <= now, "it asks at once");
        let mut out = vec![];
        let ask = |fresh: &mut Node<Ed25519Auth>, out: &mut Vec<Output>, now: u64| {
            fresh.on_tick(at(now), out);
            match out.pop() {
                Some(Output::SnapshotRequest { to: None, request }) => request,
                o => panic!("expected a request to every peer, got {o:?}"),
            }
        };
        let req = ask(&mut fresh, &mut out, now);
        fresh.on_snapshot_chunk(at(now), 1, snapshot::answer(None, &req), &mut out);
        let forged = bad_state.encode_to_vec();
        fresh.on_snapshot_chunk(at(now), 2, snapshot::answer(Some((seq, &forged)), &req), &mut out);
        assert!(out.is_empty() && !fresh.started(), "{out:?}");
        assert_eq!(fresh.stats().snapshots_refused, 1);
        let retry_ms = fresh.poll_timeout_ms();
        assert_eq!(retry_ms, now, "after a refusal it asks the others at once");
        let req = ask(&mut fresh, &mut out, retry_ms);
        // A message before the join is over changes nothing.
        fresh.on_message(at(now), 0, Message::Fetch { from: 0, from_seq: 1 }, &mut out);
        assert!(out.is_empty());
        fresh.on_snapshot_chunk(at(now), 0, snapshot::answer(Some((seq, &bytes)), &req), &mut out);
        match out.as_slice() {
            [Output::Joined { header, bytes: b }] => {
                assert_eq!((header.height, b.as_slice()), (seq, bytes.as_slice()));
            }
            o => panic!("expected Joined, got {o:?}"),
        }
        out.clear();
        assert!(fresh.started() && fresh.height() == seq && fresh.stats().joined_from_snapshot == 1);
        assert_eq!(Some(fresh.state().root()), fresh.last_header().map(|h| h.state_root));
        nodes[3] = fresh;
        stores.certs[3].clear();

        // New txs commit everywhere; the joined validator fetches the blocks
        // above the snapshot and ends with the same chain and state root.
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(now), txs[40..].to_vec(), &mut outs[i]);
        }
        drive(&mut nodes, &mut outs, &mut stores, &mut now, |ns| {
            ns.iter().all(|n| n.mempool_len() == 0 && n.height() == ns[0].height())
        });
        assert!(
            stores.certs[3].keys().next().is_some_and(|&h| h == seq + 1),
            "it stored blocks from above the snapshot"
        );
        assert_eq!(nodes[3].last_header().map(|h| h.hash()), nodes[0].last_header().map(|h| h.hash()));
        assert_eq!(nodes[3].state().root(), nodes[0].state().root());
        assert!(txs.iter().all(|t| nodes[3].state().has_nonce(&t.event.nonce)), "every tx is in its state");
    }

    #[test]
    fn a_validator_rejoins_only_once_f_plus_one_peers_pruned_past_it() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let n = &mut nodes[3];
        let rejoin = |out: &[Output]| {
            out.iter().find_map(|o| match o {
                Output::Rejoin { height, lowest } => Some((*height, *lowest)),
                _ => None,
            })
        };
        let fetches = |out: &[Output]| {
            out.iter().filter(|o| matches!(o, Output::Broadcast(Message::Fetch { from: 3, from_seq: 1 }))).count()
        };
        let mut out = vec![];
        // Blocks it needs next are still there (lowest 1): nothing.
        n.on_fetch_pruned(at(10), 0, 1, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // One peer pruned past it: ask every peer, do not trust it alone.
        n.on_fetch_pruned(at(10), 0, 50, &mut out);
        assert_eq!((fetches(&out), rejoin(&out)), (1, None));
        // The same peer again, itself, and a peer index out of range count nothing.
        n.on_fetch_pruned(at(11), 0, 60, &mut out);
        n.on_fetch_pruned(at(11), 3, 60, &mut out);
        n.on_fetch_pruned(at(11), 9, 60, &mut out);
        assert_eq!((fetches(&out), rejoin(&out)), (1, None));
        // A second peer (f + 1 = 2): rejoin, from the lowest either stores.
        n.on_fetch_pruned(at(12), 1, 40, &mut out);
        assert_eq!(rejoin(&out), Some((0, 40)));
        // Once only.
        let mut more = vec![];
        n.on_fetch_pruned(at(13), 2, 40, &mut more);
        assert_eq!(rejoin(&more), None);
    }

    #[test]
    fn invalid_proposal_is_refused_and_the_view_changes() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        // The primary (0) proposes a tx with a broken signature: it admitted
        // it through a "bug"; backups never saw it.
        let mut forged = vtx(&k, 1, 1000);
        let mut ev = (*forged.event).clone();
        ev.signature[5] ^= 0xff;
        forged.event = Arc::new(ev);
        nodes[0].mempool.admit(forged);
        nodes[0].on_tick(at(1200), &mut outs[0]);
        settle(&mut nodes, 1200, &mut outs, &[]);
        assert_eq!(nodes[1].stats().proposals_refused, 0, "it waits for its own source first");
        fetch_bodies(&mut nodes, 1200, &mut outs);
        for (i, n) in nodes.iter().enumerate().skip(1) {
            assert_eq!(n.stats().txs_fetched, 1, "backup {i} fetched the body from the primary");
            assert_eq!(n.stats().proposals_refused, 1, "backup {i} refused");
            assert_eq!(n.conduct()[0].invalid_proposals, 1);
        }
        assert_eq!(nodes[1].height(), 0);
        // A good tx reaches everyone; the backups time out on the primary
        // and elect validator 1, which commits the good tx.
        let good = vtx(&k, 2, 1000);
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(1300), vec![good.clone()], &mut outs[i]);
        }
        let mut now = 1300;
        while nodes[1..].iter().any(|n| n.height() == 0) {
            now += 100;
            assert!(now < 60_000, "no view change");
            for (i, n) in nodes.iter_mut().enumerate() {
                n.on_tick(at(now), &mut outs[i]);
            }
            settle(&mut nodes, now, &mut outs, &[]);
        }
        for n in &nodes[1..] {
            assert!(n.replica().view() >= 1);
            assert_ne!(n.replica().primary(n.replica().view()), 0, "the faulty primary was replaced");
            assert!(n.stats().view_changes >= 1);
        }
        assert!(nodes[1..].iter().all(|n| n.state().root() == nodes[1].state().root()));
    }

    /// A tx signed with an explicit id, payload and nonce randomness.
    fn vtx_with(k: &crypto::SigningKey, id: u8, payload: Vec<u8>, ts: u64, random: u32) -> VerifiedTx {
        let ev = Event::sign(TxKind::Anomaly, k, [id; 16], payload, ts, random.to_be_bytes());
        VerifiedTx { tx_hash: ev.tx_hash(), event: Arc::new(ev), received_ms: ts, pos: None }
    }

    /// Ticks every node and delivers until `done`, collecting commits and
    /// DLQ records per node.
    fn run_until(
        nodes: &mut [Node<Ed25519Auth>],
        outs: &mut [Vec<Output>],
        now: &mut u64,
        limit_ms: u64,
        mut each_tick: impl FnMut(u64, &mut [Node<Ed25519Auth>], &mut [Vec<Output>]),
        done: impl Fn(&[Node<Ed25519Auth>], &[Vec<Arc<Block>>]) -> bool,
    ) -> (Vec<Vec<Arc<Block>>>, Vec<Vec<Rejection>>) {
        let mut blocks = vec![vec![]; nodes.len()];
        let mut rejects: Vec<Vec<Rejection>> = vec![vec![]; nodes.len()];
        while !done(nodes, &blocks) {
            *now += 100;
            assert!(
                *now < limit_ms,
                "no progress by {now} ms: heights {:?}",
                nodes.iter().map(|n| n.height()).collect::<Vec<_>>()
            );
            each_tick(*now, nodes, outs);
            for (i, n) in nodes.iter_mut().enumerate() {
                n.on_tick(at(*now), &mut outs[i]);
            }
            let got = settle_with(nodes, *now, outs, &[], &mut |i, o| {
                if let Output::Reject(r) = o {
                    rejects[i].push(r);
                }
                None
            });
            for (i, b) in got.into_iter().enumerate() {
                blocks[i].extend(b);
            }
        }
        (blocks, rejects)
    }

    fn committed_ids(blocks: &[Arc<Block>]) -> Vec<[u8; 16]> {
        blocks.iter().flat_map(|b| b.txs.iter().map(|t| t.id)).collect()
    }

    #[test]
    fn identical_payloads_and_exact_resends_commit_exactly_once_everywhere() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        // Six alerts, one payload: distinct ids and nonces, so six txs.
        let payload = sample_anomaly_payload(42, 300);
        let txs: Vec<_> = (0..6).map(|i| vtx_with(&k, i, payload.clone(), 1000, i as u32)).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(1000), txs.clone(), &mut outs[i]);
            // Resent at once (pending) ...
            n.on_txs(at(1000), txs[..2].to_vec(), &mut outs[i]);
        }
        let mut now = 1000;
        let (mut blocks, rejects) = run_until(
            &mut nodes,
            &mut outs,
            &mut now,
            20_000,
            |_, _, _| {},
            |n, _| n.iter().all(|n| n.mempool_len() == 0),
        );
        // ... and again after commit (redelivery).
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(now), txs.clone(), &mut outs[i]);
        }
        let (more, more_rejects) = run_until(&mut nodes, &mut outs, &mut now, 30_000, |_, _, _| {}, |_, _| true);
        for (b, m) in blocks.iter_mut().zip(more) {
            b.extend(m);
        }
        let mut ids = committed_ids(&blocks[0]);
        ids.sort();
        assert_eq!(ids, (0..6).map(|i| [i; 16]).collect::<Vec<_>>(), "every alert committed once");
        assert!(blocks.iter().all(|b| b.iter().map(|b| b.hash()).eq(blocks[0].iter().map(|b| b.hash()))));
        assert!(rejects.iter().chain(&more_rejects).all(|r| r.is_empty()), "duplicates are not dead-lettered");
        for n in &nodes {
            assert_eq!(n.stats().duplicates, 8, "2 resends while pending + 6 after commit");
            assert_eq!(n.state().producer_totals(&crypto::public_key(&k)), (6, 0));
        }
    }

    #[test]
    fn a_proposal_repeating_a_committed_tx_is_refused() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let t = vtx(&k, 1, 1000);
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(1000), vec![t.clone()], &mut outs[i]);
        }
        let mut now = 1000;
        run_until(&mut nodes, &mut outs, &mut now, 20_000, |_, _, _| {}, |n, _| n.iter().all(|n| n.height() == 1));
        // A faulty primary orders it again (into its pool past every check).
        assert_eq!(nodes[0].mempool.admit(t.clone()), Admit::Added);
        nodes[0].on_tick(at(now + 200), &mut outs[0]);
        settle(&mut nodes, now + 200, &mut outs, &[]);
        fetch_bodies(&mut nodes, now + 200, &mut outs);
        for n in &nodes[1..] {
            assert_eq!(n.stats().proposals_refused, 1);
            assert_eq!(n.height(), 1);
        }
    }

    /// Only the backups get `held`; the primary orders newer load (one tx
    /// every 500 ms) until `held` commits. Returns the blocks of node 1.
    fn order_a_tx_only_backups_hold(
        nodes: &mut [Node<Ed25519Auth>],
        k: &crypto::SigningKey,
        held: &VerifiedTx,
    ) -> Vec<Arc<Block>> {
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        for (i, n) in nodes.iter_mut().enumerate().skip(1) {
            n.on_txs(at(1000), vec![held.clone()], &mut outs[i]);
        }
        let mut now = 1000;
        let mut next = 0u64;
        let (blocks, _) = run_until(
            nodes,
            &mut outs,
            &mut now,
            60_000,
            |now, nodes, outs| {
                if now % 500 == 0 {
                    next += 1;
                    let t = vtx(k, next, now);
                    for (i, n) in nodes.iter_mut().enumerate() {
                        n.on_txs(at(now), vec![t.clone()], &mut outs[i]);
                    }
                }
            },
            |_, blocks| committed_ids(&blocks[1]).contains(&held.event.id),
        );
        blocks[1].clone()
    }

    #[test]
    fn a_tx_only_the_backups_hold_is_forwarded_to_the_primary_and_ordered_in_its_view() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 1000);
        let held = vtx(&k, 1_000_000, 1000);
        let blocks = order_a_tx_only_backups_hold(&mut nodes, &k, &held);
        let at = blocks.iter().find(|b| b.txs.iter().any(|t| t.id == held.event.id)).unwrap();
        assert_eq!(at.header.view, 0, "no view change needed");
        assert_eq!(at.header.proposer, nodes[0].cfg.validators[0]);
        assert!(nodes[1..].iter().all(|n| n.stats().forwarded >= 1 && n.stats().censorship_suspicions == 0));
        assert_eq!(nodes[0].stats().forwards_admitted, 1, "admitted once, however many forwarded it");
        assert_eq!(committed_ids(&blocks).iter().filter(|id| **id == held.event.id).count(), 1);
    }

    #[test]
    fn a_primary_censoring_a_tx_the_backups_hold_is_replaced() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 1000);
        let held = vtx(&k, 1_000_000, 1000);
        DROP_FORWARDS_TO.set(Some(0));
        let blocks = order_a_tx_only_backups_hold(&mut nodes, &k, &held);
        DROP_FORWARDS_TO.set(None);
        let at = blocks.iter().find(|b| b.txs.iter().any(|t| t.id == held.event.id)).unwrap();
        assert!(at.header.view >= 1, "ordered after a view change");
        assert_ne!(at.header.proposer, nodes[0].cfg.validators[0]);
        assert!(nodes[1..].iter().all(|n| n.stats().censorship_suspicions >= 1));
        // While the primary ordered the load, it did so without a view change.
        assert!(blocks.iter().filter(|b| b.header.view == 0).count() >= 3);
    }

    #[test]
    fn forwarded_txs_are_verified_and_bounded_per_sender() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 10_000);
        let mut out = vec![];
        let good = vtx(&k, 1, 1000);
        let mut forged = (*vtx(&k, 2, 1000).event).clone();
        forged.signature[3] ^= 1;
        let stranger = vtx(&crypto::generate_key(), 3, 1000);
        let txs = vec![good.event.to_tx_proto(), forged.to_tx_proto(), stranger.event.to_tx_proto()];
        nodes[0].on_forward(at(1000), 1, txs, &mut out);
        assert_eq!((nodes[0].stats().forwards_admitted, nodes[0].stats().forwards_refused), (1, 2));
        assert!(nodes[0].mempool.contains(&good.tx_hash));
        assert!(!out.iter().any(|o| matches!(o, Output::Reject(_))), "a peer's forward is no producer's DLQ record");
        // A flood from one sender: verified up to the budget per check.
        let flood: Vec<_> = (10..10 + 2 * crate::protocol::consensus::wire::MAX_FORWARD_TXS as u64)
            .map(|i| vtx(&k, i, 1000).event.to_tx_proto())
            .collect();
        let before = nodes[0].stats().forwards_admitted;
        nodes[0].on_forward(at(1000), 2, flood.clone(), &mut out);
        let taken = nodes[0].stats().forwards_admitted - before;
        assert_eq!(taken, crate::protocol::consensus::wire::MAX_FORWARD_TXS as u64);
        // Known txs cost nothing and are not admitted twice.
        nodes[0].on_forward(at(1000), 2, flood[..10].to_vec(), &mut out);
        assert_eq!(nodes[0].stats().forwards_admitted - before, taken);
    }

    /// A backup alone in a view change (it suspected a primary the others
    /// keep following) still executes what they commit, by fetching it, so
    /// its pool drains; and it does not race ahead through views alone.
    #[test]
    fn a_backup_alone_in_a_view_change_executes_what_the_others_commit() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 1000);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let mut actions = vec![];
        nodes[3].replica.set_time(1000);
        nodes[3].replica.suspect_primary(&mut actions);
        // Its view change goes nowhere: the others never see it.
        assert!(nodes[3].replica().is_changing() && nodes[3].replica().view() == 1);
        // Two blocks (4 txs each at most), then nothing: no checkpoint (every
        // 4 here) ever tells it it is behind; it must ask.
        let txs: Vec<_> = (0..6).map(|i| vtx(&k, i, 1000)).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(1000), txs.clone(), &mut outs[i]);
        }
        outs[3].clear(); // its view-change messages are lost
        let mut stores = Stores { certs: vec![Default::default(); 4], ..Default::default() };
        let mut now = 1000;
        drive(&mut nodes, &mut outs, &mut stores, &mut now, |ns| ns.iter().all(|n| n.mempool_len() == 0));
        assert_eq!(nodes[3].height(), 2);
        assert_eq!(nodes[3].height(), nodes[0].height());
        assert_eq!(nodes[3].state().root(), nodes[0].state().root());
        assert_eq!(nodes[0].replica().view(), 0, "the others kept their view");
        assert_eq!(nodes[3].replica().view(), 1, "alone, it did not move on through views");
    }

    #[test]
    fn rate_limit_verdicts_are_the_same_on_every_validator() {
        let k = crypto::generate_key();
        let cfg = StateConfig { rate_per_second: 1, rate_burst: 3, ..StateConfig::default() };
        let (mut nodes, _) = cluster_with_state(4, &k, 100, cfg);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let txs: Vec<_> = (0..12).map(|i| vtx(&k, i, 1000)).collect();
        // Each validator sees them in another order and at other times.
        for (i, n) in nodes.iter_mut().enumerate() {
            let mut mine = txs.clone();
            mine.rotate_left(i * 3);
            n.on_txs(at(1000 + i as u64 * 30), mine, &mut outs[i]);
        }
        let mut now = 1000;
        let (blocks, rejects) = run_until(
            &mut nodes,
            &mut outs,
            &mut now,
            30_000,
            |_, _, _| {},
            |n, _| n.iter().all(|n| n.mempool_len() == 0),
        );
        let limited: Vec<Vec<Hash32>> = rejects
            .iter()
            .map(|rs| {
                assert!(rs.iter().all(|r| r.reason == RejectReason::RateLimited));
                let mut v: Vec<Hash32> = rs.iter().map(|r| crate::sha256(&r.original)).collect();
                v.sort();
                v
            })
            .collect();
        assert!(!limited[0].is_empty() && limited[0].len() < 12, "{} limited", limited[0].len());
        assert!(limited.iter().all(|l| *l == limited[0]), "every validator dead-letters the same txs");
        assert_eq!(committed_ids(&blocks[0]).len(), 12, "every tx is in a block, with its receipt");
        assert!(nodes.iter().all(|n| n.stats().rate_limited == limited[0].len() as u64));
    }

    /// Four validators; the primary alone admitted a tx and proposed it at
    /// 1200 ms (its outputs not delivered yet).
    fn the_primary_alone_proposes_a_tx() -> (crypto::SigningKey, Vec<Node<Ed25519Auth>>, Vec<Vec<Output>>, VerifiedTx) {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let t = vtx(&k, 1, 1000);
        nodes[0].on_txs(at(1000), vec![t.clone()], &mut outs[0]);
        nodes[0].on_tick(at(1200), &mut outs[0]);
        (k, nodes, outs, t)
    }

    #[test]
    fn a_tx_only_the_primary_holds_is_fetched_verified_and_committed_and_values_name_txs() {
        let (_, mut nodes, mut outs, t) = the_primary_alone_proposes_a_tx();
        let value_len = outs[0]
            .iter()
            .find_map(|o| match o {
                Output::Persist(Record::PrePrepare(p)) => Some(p.body.value.len()),
                _ => None,
            })
            .expect("proposed");
        assert!(value_len < proposal::TX_REF_BYTES + 16, "the value names the tx ({value_len} bytes)");
        assert!(t.event.size() > 2 * value_len, "it does not carry the body");
        settle(&mut nodes, 1200, &mut outs, &[]);
        assert_eq!(nodes[1].height(), 0, "no prepare without the body");
        fetch_bodies(&mut nodes, 1200, &mut outs);
        for n in &nodes {
            assert_eq!(n.height(), 1);
            assert_eq!(n.state().root(), nodes[0].state().root());
            assert!(n.state().is_committed(&t.event.nonce, &t.tx_hash));
        }
        for n in &nodes[1..] {
            assert_eq!((n.stats().fetch_asks, n.stats().txs_fetched), (1, 1));
        }
        assert_eq!(nodes[0].stats().txs_served, 3);
    }

    #[test]
    fn a_primary_naming_txs_it_withholds_loses_its_view_and_the_rest_commits() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 100);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        WITHHOLD_BODIES.set(&[0]);
        let secret = vtx(&k, 1, 1000);
        let public = vtx(&k, 2, 1000);
        nodes[0].on_txs(at(1000), vec![secret.clone()], &mut outs[0]);
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(1000), vec![public.clone()], &mut outs[i]);
        }
        let mut now = 1000;
        let (blocks, _) = run_until(
            &mut nodes,
            &mut outs,
            &mut now,
            30_000,
            |_, _, _| {},
            |n, _| n.iter().all(|n| n.state().is_committed(&public.event.nonce, &public.tx_hash)),
        );
        WITHHOLD_BODIES.set(&[]);
        for n in &nodes[1..] {
            assert!(n.stats().fetch_asks >= 2, "asked the primary, then the others");
            assert!(n.conduct()[0].failed_views >= 1, "its view failed");
            assert!(n.replica().view() >= 1);
        }
        // What committed in its view (by the new-view: prepared there) names
        // it as proposer, but not the withheld tx.
        let secret_in = |bs: &[Arc<Block>]| bs.iter().find(|b| b.tx_hashes.contains(&secret.tx_hash)).cloned();
        assert!(secret_in(&blocks[1]).is_none(), "the withheld value did not commit");
        // Held by validator 0 alone, the withheld tx reaches the new primary
        // as a forward and commits too, in a later view: view 0 counts as failed.
        let (later, _) = run_until(
            &mut nodes,
            &mut outs,
            &mut now,
            60_000,
            |_, _, _| {},
            |n, _| n.iter().all(|n| n.state().is_committed(&secret.event.nonce, &secret.tx_hash)),
        );
        assert!(secret_in(&later[1]).is_some_and(|b| b.header.view >= 1));
        for n in &nodes {
            assert_eq!(n.state().root(), nodes[0].state().root());
            assert!(n.reputation().score(0) < n.reputation().score(2), "its reputation fell");
        }
    }

    #[test]
    fn a_validator_that_never_received_the_txs_catches_up_with_fetched_bodies() {
        let k = crypto::generate_key();
        let mut nodes = cluster(4, &k, 200);
        let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
        let mut stores = Stores { certs: vec![Default::default(); 4], ..Default::default() };
        let mut now = 1000;
        // Validator 3 is cut off while the others commit 40 txs it never sees.
        let txs: Vec<_> = (0..40).map(|i| vtx(&k, i, 1000)).collect();
        for (i, n) in nodes.iter_mut().enumerate().take(3) {
            n.on_txs(at(now), txs.clone(), &mut outs[i]);
        }
        drive(&mut nodes[..3], &mut outs[..3], &mut stores, &mut now, |ns| ns.iter().all(|n| n.mempool_len() == 0));
        let height = nodes[0].height();
        assert!(height >= 10, "several blocks ({height})");
        assert_eq!(nodes[3].height(), 0);
        // Back, it learns of them from new traffic, fetches the certificates
        // and then the bodies, executing in order.
        let later: Vec<_> = (40..44).map(|i| vtx(&k, i, now)).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            n.on_txs(at(now), later.clone(), &mut outs[i]);
        }
        drive(&mut nodes, &mut outs, &mut stores, &mut now, |ns| {
            ns.iter().all(|n| n.mempool_len() == 0 && n.height() == ns[0].height())
        });
        assert_eq!(nodes[3].last_header().map(|h| h.hash()), nodes[0].last_header().map(|h| h.hash()));
        assert_eq!(nodes[3].state().root(), nodes[0].state().root());
        assert!(nodes.iter().all(|n| n.lag_blocks() == 0), "level with the cluster again");
        assert!(nodes[3].stats().txs_fetched >= 40, "fetched {}", nodes[3].stats().txs_fetched);
        assert!(txs.iter().all(|t| nodes[3].state().is_committed(&t.event.nonce, &t.tx_hash)));
        assert!(nodes[3].exec_queue.is_empty() && nodes[3].awaiting.is_empty());
    }

    #[test]
    fn every_committed_tx_is_timed_through_each_consensus_stage() {
        let (mut nodes, mut outs, _) = four_fed_ten_txs();
        let mut now = 1000;
        run_until(&mut nodes, &mut outs, &mut now, 20_000, |_, _, _| {}, |n, _| n.iter().all(|n| n.height() >= 3));
        let total = |samples: &[(TxStage, u64, u32)], stage: TxStage| -> u32 {
            samples.iter().filter(|(s, _, _)| *s == stage).map(|(_, _, n)| n).sum()
        };
        for (i, n) in nodes.iter_mut().enumerate() {
            let committed = n.stats().committed_txs as u32;
            let samples = n.take_latencies();
            assert_eq!(total(&samples, TxStage::Queue), if i == 0 { committed } else { 0 }, "the primary's only");
            for stage in [TxStage::Prepare, TxStage::Commit, TxStage::Execute] {
                assert_eq!(total(&samples, stage), committed, "validator {i}, {}", stage.as_str());
            }
            // Admitted at 1000 ms, proposed at the primary's ticks after it.
            if i == 0 {
                assert!(samples.iter().any(|(s, ms, _)| *s == TxStage::Queue && *ms >= 100), "{samples:?}");
            }
            assert!(n.take_latencies().is_empty(), "drained");
            assert!(n.slot_times.is_empty(), "executed slots leave no times behind");
        }
    }

    #[test]
    fn bodies_are_not_fetched_while_the_own_source_is_busy_and_fetches_are_bounded() {
        let (k, mut nodes, mut outs, t) = the_primary_alone_proposes_a_tx();
        settle(&mut nodes, 1200, &mut outs, &[]);
        let asks = |out: &[Output]| out.iter().filter(|o| matches!(o, Output::FetchTxs { .. })).count();
        // Its shards still verify txs: the body is most likely among them.
        nodes[1].set_source_busy(true);
        let mut out = vec![];
        nodes[1].on_tick(at(1300), &mut out);
        assert_eq!(asks(&out), 0);
        nodes[1].on_txs(at(1300), vec![t.clone()], &mut out);
        assert_eq!((nodes[1].stats().fetch_asks, nodes[1].stats().txs_fetched), (0, 0), "it came from its source");
        assert!(nodes[1].awaiting.is_empty(), "checked, prepared");
        // Another backup, not busy, asks once the wait is over.
        let mut out = vec![];
        nodes[2].on_tick(at(1300), &mut out);
        assert_eq!(asks(&out), 1);
        // Bodies nobody waits for are dropped; answers are bounded per asker.
        let before = nodes[3].stats().txs_fetched;
        let stranger = vtx(&k, 9, 1000);
        nodes[3].on_bodies(at(1300), 0, 1, vec![stranger.event.to_tx_proto()], &mut vec![]);
        assert_eq!(nodes[3].stats().txs_fetched, before);
        let mut out = vec![];
        let many: Vec<Hash32> = vec![t.tx_hash; MAX_FETCH_TXS];
        for _ in 0..(MAX_SERVED_TXS / MAX_FETCH_TXS + 2) {
            nodes[0].on_tx_fetch(at(1300), 3, 1, many.clone(), &mut out);
        }
        let served: usize = out
            .iter()
            .map(|o| match o {
                Output::SendTxs { txs, .. } => txs.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(served, MAX_SERVED_TXS, "at most MAX_SERVED_TXS per asker per budget window");
        // The next window serves again.
        out.clear();
        nodes[0].on_tx_fetch(at(1300 + BUDGET_WINDOW_MS), 3, 1, many.clone(), &mut out);
        assert!(out.iter().any(|o| matches!(o, Output::SendTxs { .. })), "{out:?}");
    }

    /// A new-view may re-propose a value prepared in an older view whose
    /// txs committed meanwhile (whole-node simulator, seed 9585): their
    /// bodies are in no mempool, so a fetch for that value's seq is answered
    /// from the block that committed them.
    #[test]
    fn bodies_of_txs_committed_at_another_height_are_served_from_that_block() {
        let (mut nodes, mut outs, txs) = four_fed_ten_txs();
        let mut now = 1000;
        let mut blocks = vec![];
        while nodes[0].mempool_len() > 0 {
            now += 100;
            assert!(now < 10_000, "no progress");
            for (i, n) in nodes.iter_mut().enumerate() {
                n.on_tick(at(now), &mut outs[i]);
            }
            blocks.extend(settle(&mut nodes, now, &mut outs, &[]).swap_remove(0));
        }
        let b = blocks.first().expect("a block");
        let (h, tx) = (b.header.height, b.tx_hashes[0]);
        assert!(txs.iter().any(|t| t.tx_hash == tx) && !nodes[0].holds(&tx), "committed, out of the mempool");
        let later = nodes[0].height() + 3;
        let mut out = vec![];
        nodes[0].on_tx_fetch(at(now), 3, later, vec![tx], &mut out);
        let served: Vec<(Seq, u64, Vec<Hash32>)> = out
            .iter()
            .filter_map(|o| match o {
                Output::ServeBlockTxs { seq, height, tx_hashes, .. } => Some((*seq, *height, tx_hashes.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(served, vec![(later, h, vec![tx])], "read from block {h}, answered for seq {later}");
    }

    /// Txs reach random subsets of the validators at random times (as after
    /// restarts, or clients that reach only some): over many seeds, every
    /// tx commits exactly once and all four end with the same chain, through
    /// body fetches (txs the primary alone holds) and forwards (txs only
    /// backups hold).
    #[test]
    fn txs_reaching_random_subsets_commit_once_everywhere_over_many_seeds() {
        use rand::{Rng, SeedableRng};
        let k = crypto::generate_key();
        let seeds: u64 = std::env::var("NODE_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
        for seed in 0..seeds {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut nodes = cluster(4, &k, 100);
            let mut outs: Vec<Vec<Output>> = (0..4).map(|_| vec![]).collect();
            let txs: Vec<VerifiedTx> = (0..24).map(|i| vtx(&k, i, 1000)).collect();
            // When (tick) and where each tx arrives.
            let plan: Vec<(u64, Vec<usize>)> = txs
                .iter()
                .map(|_| {
                    let at = 1000 + 100 * rng.gen_range(0..20u64);
                    let mut to: Vec<usize> = (0..4).filter(|_| rng.gen_bool(0.5)).collect();
                    if to.is_empty() {
                        to.push(rng.gen_range(0..4));
                    }
                    (at, to)
                })
                .collect();
            let mut now = 900;
            let (blocks, _) = run_until(
                &mut nodes,
                &mut outs,
                &mut now,
                120_000,
                |now, nodes, outs| {
                    for (t, (at_ms, to)) in txs.iter().zip(&plan) {
                        if *at_ms == now {
                            for &i in to {
                                nodes[i].on_txs(at(now), vec![t.clone()], &mut outs[i]);
                            }
                        }
                    }
                },
                |n, _| {
                    n.iter().all(|n| {
                        txs.iter().all(|t| n.state().is_committed(&t.event.nonce, &t.tx_hash))
                            && n.height() == nodes_height(n)
                    })
                },
            );
            for (i, n) in nodes.iter().enumerate() {
                assert_eq!(n.state().root(), nodes[0].state().root(), "seed {seed}: validator {i}");
                assert_eq!(n.last_header().map(|h| h.hash()), nodes[0].last_header().map(|h| h.hash()), "seed {seed}");
                let ids = committed_ids(&blocks[i]);
                let unique: std::collections::BTreeSet<_> = ids.iter().collect();
                assert_eq!(ids.len(), unique.len(), "seed {seed}: a tx in two blocks at validator {i}");
                assert_eq!(unique.len(), txs.len(), "seed {seed}: validator {i}");
            }
        }
    }

    fn nodes_height(n: &Node<Ed25519Auth>) -> u64 {
        n.replica().executed()
    }

    #[test]
    fn a_primary_signing_two_values_for_a_slot_is_caught_while_their_bodies_are_fetched() {
        use crate::protocol::consensus::pbft::{pp_bytes, PrePrepare, Signed, Value};
        let k = crypto::generate_key();
        let (mut nodes, keys) = cluster_with_keys(4, &k, 100);
        let auth0 = Ed25519Auth::new(keys[0].clone(), nodes[0].cfg.validators.clone());
        let (a, b) = (vtx(&k, 1, 1000), vtx(&k, 2, 1000));
        let pp = |t: &VerifiedTx| {
            let value: Value = Arc::new(proposal::encode(
                proposal::Origin::default(),
                1000,
                std::slice::from_ref(&t.event),
                &[t.tx_hash],
            ));
            let body = PrePrepare { view: 0, seq: 1, digest: crate::sha256(&value), value };
            Message::PrePrepare(Signed { sig: auth0.sign(&pp_bytes(&body)), body, from: 0 })
        };
        // Backup 1 holds neither tx: both values wait for their bodies.
        let mut out = vec![];
        nodes[1].on_message(at(1000), 0, pp(&a), &mut out);
        assert!(!out.iter().any(|o| matches!(o, Output::Evidence { .. })));
        nodes[1].on_message(at(1000), 0, pp(&a), &mut out);
        assert!(!out.iter().any(|o| matches!(o, Output::Evidence { .. })), "a retransmission is not evidence");
        nodes[1].on_message(at(1000), 0, pp(&b), &mut out);
        assert!(out.iter().any(|o| matches!(o, Output::Evidence { culprit: 0, .. })));
        assert_eq!(nodes[1].conduct()[0].equivocations, 1);
        assert_eq!(nodes[1].proofs.len(), 1, "kept to commit");
    }
}
