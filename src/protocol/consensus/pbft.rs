//! PBFT replica (Castro–Liskov) as a pure state machine: `(state, event) ->
//! actions`. No clocks, sockets, threads or randomness: time arrives with
//! `on_tick`, messages with `on_message`, work with `propose`; the caller
//! carries out the returned [`Action`]s.
//!
//! * normal case: pre-prepare / prepare / commit, several sequence numbers in
//!   flight inside the watermark window `(low, low + window]`;
//! * quorum `q = n − f`; prepared = pre-prepare + `q − 1` matching prepares from
//!   distinct backups; committed = prepared + `q` matching commits;
//! * checkpoints every `checkpoint_interval` executions; `q` matching ones make
//!   it stable and garbage-collect the log below it;
//! * view change carrying signed prepared certificates, new-view recomputed and
//!   checked by every backup, null requests for gaps;
//! * catch-up: a replica behind a stable checkpoint fetches committed values
//!   with their `q` signed commits and verifies them;
//! * every message is signed (`Auth`); votes are part of the durable state,
//!   so a restarted replica never votes twice for different values.
//!
//! Values are opaque bytes (blocks, in the validator); digest = SHA-256.

use crate::protocol::clock::{TimerName, TimerTable};
use crate::{sha256, Hash32};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

pub type Rid = usize;
pub type View = u64;
pub type Seq = u64;
pub type Value = Arc<Vec<u8>>;

/// Message authentication. The validator uses Ed25519; the simulator a cheap
/// keyed hash (Byzantine replicas there never learn other replicas' secrets).
pub trait Auth {
    fn sign(&self, bytes: &[u8]) -> Vec<u8>;
    fn verify(&self, signer: Rid, bytes: &[u8], sig: &[u8]) -> bool;
}

/// An `Auth` that can sign for another validator set's epoch (a set
/// change: see `Node`'s switch). Signatures of one epoch never verify in
/// another: the epoch is part of what is signed (`in_epoch`).
pub trait EpochAuth: Auth + Clone + Sized {
    /// This validator's signer for `epoch` over `keys` (replica order), and
    /// its replica id among them; None if it holds none of their keys (it
    /// was removed).
    fn for_epoch(&self, epoch: u64, keys: &[crate::protocol::crypto::PublicKey]) -> Option<(Rid, Self)>;
}

/// What is signed for `bytes` in `epoch`: the bytes themselves in epoch 0
/// (the genesis set; as before set changes existed), else prefixed with a
/// domain and the epoch.
pub fn in_epoch(epoch: u64, bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match epoch {
        0 => std::borrow::Cow::Borrowed(bytes),
        e => std::borrow::Cow::Owned([&b"cybermesh.epoch"[..], &e.to_be_bytes(), bytes].concat()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<T> {
    pub body: T,
    pub from: Rid,
    pub sig: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrePrepare {
    pub view: View,
    pub seq: Seq,
    pub digest: Hash32,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prepare,
    Commit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    pub phase: Phase,
    pub view: View,
    pub seq: Seq,
    pub digest: Hash32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: Seq,
    /// Chained digest of every value executed up to `seq`.
    pub state: Hash32,
    /// The application's digest after executing `seq` (the validator: block
    /// hash and reputation), so a stable checkpoint vouches for a state
    /// snapshot a fresh replica can start from.
    pub app: Hash32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedCert {
    pub pre_prepare: Signed<PrePrepare>,
    pub prepares: Vec<Signed<Vote>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewChange {
    pub new_view: View,
    pub stable_seq: Seq,
    pub stable_proof: Vec<Signed<Checkpoint>>,
    pub prepared: Vec<PreparedCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewView {
    pub view: View,
    pub view_changes: Vec<Signed<ViewChange>>,
    pub pre_prepares: Vec<Signed<PrePrepare>>,
}

/// A committed value with the proof that `q` replicas committed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitCert {
    pub pre_prepare: Signed<PrePrepare>,
    pub commits: Vec<Signed<Vote>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    PrePrepare(Signed<PrePrepare>),
    Vote(Signed<Vote>),
    Checkpoint(Signed<Checkpoint>),
    ViewChange(Signed<ViewChange>),
    NewView(Signed<NewView>),
    /// Ask for committed values from `from_seq` on.
    Fetch {
        from: Rid,
        from_seq: Seq,
    },
    Committed(CommitCert),
    /// The primary is alive in its view, and has executed this far (signed
    /// by it).
    Heartbeat(Signed<Heartbeat>),
}

/// A primary's periodic sign of life. `executed` lets a replica that fell
/// behind while the cluster went idle (its last seq not a checkpoint, so no
/// checkpoint tells it) notice and fetch what it lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub view: View,
    pub executed: Seq,
    /// The sender's validator set epoch (see `Node::on_other_epoch`).
    pub epoch: u64,
}

/// What a replica must make durable before the sends that follow it in the
/// same action list (like raft-rs's `Ready`): its own votes, pre-prepares,
/// prepared certificates and view changes. `Replica::recover` rebuilds from
/// them, so a restarted replica never votes for two values in one slot and
/// never forgets a certificate a view change must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    View {
        view: View,
        changing: bool,
        /// Who may not lead this view (they decide its primary). None in
        /// records from before it was kept.
        excluded: Option<Vec<Rid>>,
    },
    PrePrepare(Signed<PrePrepare>),
    Vote(Signed<Vote>),
    Prepared(PreparedCert),
    ViewChange(Signed<ViewChange>),
    /// The new-view that started the view (made as its primary, or
    /// accepted): after a restart it is still retransmitted and sent to a
    /// replica that asks from an older view.
    NewView(Signed<NewView>),
    /// A checkpoint became stable, with its `q` signatures.
    Stable {
        seq: Seq,
        proof: Vec<Signed<Checkpoint>>,
    },
    /// The replica of validator set epoch `epoch` (starting above `base`)
    /// took over: the records after it are its own, those before belong
    /// to the previous set's replica (see `runtime::recovery`).
    Epoch {
        epoch: u64,
        base: Seq,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make this durable before carrying out any later action.
    Persist(Record),
    Send(Rid, Message),
    Broadcast(Message),
    /// Execute `value` at `seq` (in order, exactly once per seq).
    Execute {
        seq: Seq,
        value: Value,
        cert: CommitCert,
    },
    /// Misbehaviour, with its proof when it is two signed, conflicting
    /// messages (anyone can check it with `Replica::verify_proof`).
    Evidence {
        culprit: Rid,
        what: &'static str,
        proof: Option<Proof>,
    },
}

/// Two messages one replica signed for one slot that no honest replica signs
/// both of. Pre-prepares are kept without their values (the signature covers
/// the digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    PrePrepares(Signed<PrePrepare>, Signed<PrePrepare>),
    Votes(Signed<Vote>, Signed<Vote>),
}

impl Proof {
    pub fn culprit(&self) -> Rid {
        match self {
            Proof::PrePrepares(a, _) => a.from,
            Proof::Votes(a, _) => a.from,
        }
    }
}

/// A pre-prepare as a proof carries it: the signature covers the digest.
pub fn without_value(s: &Signed<PrePrepare>) -> Signed<PrePrepare> {
    let mut s = s.clone();
    s.body.value = Arc::new(vec![]);
    s
}

#[derive(Debug, Clone)]
pub struct Params {
    pub n: usize,
    pub window: u64,
    pub checkpoint_interval: u64,
    /// View-change timeout at start; AIMD moves it within [min, max]:
    /// ×`timeout_increase` when a view fails, −`timeout_decrease_ms` per
    /// executed value (manual: CONSENSUS_*_TIMEOUT, 1.5, 200 ms).
    pub timeout_ms: u64,
    pub timeout_min_ms: u64,
    pub timeout_max_ms: u64,
    pub timeout_increase: f64,
    pub timeout_decrease_ms: u64,
    /// How often unfinished work is retransmitted.
    pub retransmit_ms: u64,
    /// The primary's heartbeat period; backups change view after
    /// `missed_heartbeats` periods without one (0 disables heartbeats).
    pub heartbeat_ms: u64,
    pub missed_heartbeats: u64,
    /// Committed certificates kept in memory below the stable checkpoint to
    /// answer `Fetch` (the validator keeps few: its block store answers).
    pub keep_committed: u64,
}

impl Params {
    /// Defaults of the original manual for `n` replicas.
    pub fn manual_defaults(n: usize) -> Params {
        Params {
            n,
            window: 16,
            checkpoint_interval: 8,
            timeout_ms: 10_000,
            timeout_min_ms: 5_000,
            timeout_max_ms: 60_000,
            timeout_increase: 1.5,
            timeout_decrease_ms: 200,
            retransmit_ms: 1_000,
            heartbeat_ms: 500,
            missed_heartbeats: 6,
            keep_committed: u64::MAX,
        }
    }
}

impl Params {
    pub fn f(&self) -> usize {
        (self.n - 1) / 3
    }
    pub fn q(&self) -> usize {
        self.n - self.f()
    }
}

/// The consensus records of the replica of epoch `epoch` (those after the
/// log's last `Record::Epoch` marker for it, or all with no marker in
/// epoch 0), and those of the next epoch's replica when the log is ahead
/// of the store (the marker reached the disk, the switch block did not:
/// the node restores them once it switches again). Records of an earlier
/// epoch are dropped: that set orders nothing above its switch height,
/// which is executed.
pub fn epoch_records(records: Vec<Record>, epoch: u64) -> (Vec<Record>, Option<(u64, Vec<Record>)>) {
    let markers: Vec<(usize, u64)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Record::Epoch { epoch, .. } => Some((i, *epoch)),
            _ => None,
        })
        .collect();
    let start_of = |e: u64| -> Option<usize> {
        match e {
            0 => Some(0),
            e => markers.iter().rev().find(|(_, m)| *m == e).map(|(i, _)| i + 1),
        }
    };
    let end_of = |from: usize| markers.iter().find(|(i, _)| *i >= from).map_or(records.len(), |(i, _)| *i);
    let Some(from) = start_of(epoch) else {
        // No marker for this epoch yet (the switch block is stored, its
        // marker was not): nothing of this epoch's replica was sent.
        return (vec![], None);
    };
    let to = end_of(from);
    let next = start_of(epoch + 1).filter(|_| epoch + 1 > 0).map(|i| (epoch + 1, records[i..end_of(i)].to_vec()));
    (records[from..to].to_vec(), next)
}

// ---- canonical bytes that are signed -----------------------------------

pub(crate) fn pp_bytes(p: &PrePrepare) -> Vec<u8> {
    let mut v = b"pbft.preprepare".to_vec();
    v.extend_from_slice(&p.view.to_be_bytes());
    v.extend_from_slice(&p.seq.to_be_bytes());
    v.extend_from_slice(&p.digest);
    v
}
pub(crate) fn vote_bytes(x: &Vote) -> Vec<u8> {
    let mut v = match x.phase {
        Phase::Prepare => b"pbft.prepare".to_vec(),
        Phase::Commit => b"pbft.commit".to_vec(),
    };
    v.extend_from_slice(&x.view.to_be_bytes());
    v.extend_from_slice(&x.seq.to_be_bytes());
    v.extend_from_slice(&x.digest);
    v
}
pub(crate) fn ckpt_bytes(c: &Checkpoint) -> Vec<u8> {
    let mut v = b"pbft.checkpoint".to_vec();
    v.extend_from_slice(&c.seq.to_be_bytes());
    v.extend_from_slice(&c.state);
    v.extend_from_slice(&c.app);
    v
}
pub(crate) fn vc_bytes(c: &ViewChange) -> Vec<u8> {
    // Certificates are self-authenticating; the signature binds the claim.
    let mut v = b"pbft.viewchange".to_vec();
    v.extend_from_slice(&c.new_view.to_be_bytes());
    v.extend_from_slice(&c.stable_seq.to_be_bytes());
    for p in &c.prepared {
        v.extend_from_slice(&p.pre_prepare.body.view.to_be_bytes());
        v.extend_from_slice(&p.pre_prepare.body.seq.to_be_bytes());
        v.extend_from_slice(&p.pre_prepare.body.digest);
    }
    v
}
fn hb_bytes(h: &Heartbeat) -> Vec<u8> {
    let mut b = b"pbft.heartbeat.v2".to_vec();
    b.extend_from_slice(&h.view.to_be_bytes());
    b.extend_from_slice(&h.executed.to_be_bytes());
    b
}
fn nv_bytes(n: &NewView) -> Vec<u8> {
    let mut v = b"pbft.newview".to_vec();
    v.extend_from_slice(&n.view.to_be_bytes());
    for c in &n.view_changes {
        v.extend_from_slice(&(c.from as u64).to_be_bytes());
    }
    for p in &n.pre_prepares {
        v.extend_from_slice(&p.body.seq.to_be_bytes());
        v.extend_from_slice(&p.body.digest);
    }
    v
}

#[derive(Debug, Clone, Default)]
struct Slot {
    pre_prepare: Option<Signed<PrePrepare>>,
    prepares: BTreeMap<Rid, Signed<Vote>>,
    commits: BTreeMap<Rid, Signed<Vote>>,
    sent_prepare: bool,
    sent_commit: bool,
    /// The highest-view prepared certificate this replica formed for the
    /// slot. It outlives later pre-prepares for the slot: a view change must
    /// report it, or a value committed elsewhere could be replaced.
    prepared_cert: Option<PreparedCert>,
    /// When (replica time) a pre-prepare or vote last entered the slot.
    /// Retransmission skips slots that moved within the last interval: under
    /// load every slot in flight is young, and re-sending megabyte values
    /// that are on their way anyway swamped the links (see `retransmit`).
    touched_ms: u64,
}

/// Why a replica left its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewChangeCause {
    /// Still in the view it started or recovered in.
    None,
    /// Work waited longer than the view-change timeout.
    Timeout,
    /// The primary sent neither heartbeats nor proposals.
    SilentPrimary,
    /// f + 1 replicas asked for a later view (PBFT §4.5.2's liveness rule).
    Asked,
    /// The application suspected the primary (censorship check).
    Suspected,
    /// A new-view for a later view arrived (it missed the view change).
    NewView,
}

impl ViewChangeCause {
    pub fn as_str(self) -> &'static str {
        match self {
            ViewChangeCause::None => "none",
            ViewChangeCause::Timeout => "timeout",
            ViewChangeCause::SilentPrimary => "silent primary",
            ViewChangeCause::Asked => "f + 1 validators asked",
            ViewChangeCause::Suspected => "primary suspected",
            ViewChangeCause::NewView => "new-view received",
        }
    }
}

/// The replica's timers (deadlines in replica time, ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// Work known but not executed: move to the next view when it fires
    /// (`timeout_ms`, AIMD).
    ViewChange,
    /// Re-send what stalled (`retransmit_ms`).
    Retransmit,
    /// The primary's next heartbeat (`heartbeat_ms`).
    Heartbeat,
    /// A backup's limit on its primary's silence
    /// (`heartbeat_ms × missed_heartbeats`).
    PrimarySilent,
}

impl TimerName for Timer {
    const ALL: &'static [Timer] = &[Timer::ViewChange, Timer::Retransmit, Timer::Heartbeat, Timer::PrimarySilent];
    fn index(self) -> usize {
        self as usize
    }
}

/// One replica. All fields but the retransmission clocks (`Slot::touched_ms`,
/// `executed_at_ms`: zero after recovery, so a recovered replica re-sends at
/// once) are its durable state: the runtime persists the replica before
/// sending what an event produced.
#[derive(Debug, Clone)]
pub struct Replica<A: Auth + Clone> {
    pub id: Rid,
    p: Params,
    auth: A,
    view: View,
    /// True between sending a view change and accepting the new view.
    changing: bool,
    next_seq: Seq,
    /// The highest slot rebuilt from durable records at recovery. It can
    /// lie above the window when the block store lost blocks (repaired
    /// after damage at rest) while the log kept the votes sent for them:
    /// they stay (never vote twice), a bound fixed at recovery.
    recovered_top_seq: Seq,
    low: Seq,
    /// The epoch's first stable checkpoint (0 at genesis): trusted without
    /// a proof, as the state the previous set certified says it is.
    base: Seq,
    /// The validator set's epoch (0: the genesis set).
    epoch: u64,
    /// The last seq this replica's set orders (a validator set change is
    /// scheduled to take effect above it), or `Seq::MAX`.
    ceiling: Seq,
    stable_proof: Vec<Signed<Checkpoint>>,
    executed: Seq,
    state: Hash32,
    log: BTreeMap<Seq, Slot>,
    committed: BTreeMap<Seq, CommitCert>,
    checkpoints: BTreeMap<Seq, BTreeMap<Rid, Signed<Checkpoint>>>,
    /// Own checkpoints: (chained state, application digest) per seq.
    own_checkpoints: BTreeMap<Seq, (Hash32, Hash32)>,
    /// Checkpoint seqs executed whose application digest has not arrived.
    awaiting_app: BTreeMap<Seq, Hash32>,
    view_changes: BTreeMap<View, BTreeMap<Rid, Signed<ViewChange>>>,
    /// Values known and not yet executed, with their digests (every replica
    /// keeps them, so any of them can propose them when it becomes primary;
    /// each hashed once, as a value may be megabytes).
    queue: VecDeque<(Hash32, Value)>,
    /// Digests this replica proposed as primary in the current view.
    assigned: BTreeSet<Hash32>,
    /// The view-change deadline (work known but not executed), the
    /// retransmit interval, the primary's heartbeats and a backup's limit
    /// on its primary's silence.
    timers: TimerTable<Timer, 4>,
    timeout_ms: u64,
    /// When (replica time) the last value was executed: catch-up fetches and
    /// new-view retransmits go out only once execution has stalled.
    executed_at_ms: u64,
    now_ms: u64,
    /// The new-view that started this replica's view (made as its primary,
    /// or received): retransmitted by the primary once execution stalls,
    /// and sent to a replica that asks from an older view.
    last_new_view: Option<Signed<NewView>>,
    /// Why this replica last left a view (for operators' logs).
    view_change_cause: ViewChangeCause,
    /// Replica time before which this replica does not ask again for a
    /// later view's new-view (`ask_for_view`).
    next_view_ask_ms: u64,
    /// The executed seq and replica time of this replica's last fetch for
    /// a gap (`ask_to_catch_up`) or for a checkpoint ahead: its own
    /// limiter, so that the new-view request a restarted replica just made
    /// does not hold it back.
    fetched: Option<(Seq, u64)>,
    /// This replica's next seq and the replica time of the first primary
    /// heartbeat that said the primary had executed it.
    next_executed_by_primary: Option<(Seq, u64)>,
    /// When (replica time) the new-view was last sent to each replica that
    /// asked for it: at most once per retransmit interval each.
    new_view_sent_ms: Vec<Option<u64>>,
    /// Each replica's executed seq as its heartbeats last said, and since
    /// when (`help_behind`).
    peer_executed: Vec<Option<(Seq, u64)>>,
    /// Replicas that may not lead (quarantined or under the reputation
    /// floor); set identically on every replica from committed state.
    excluded: BTreeSet<Rid>,
    /// Exclusions to apply at the next view change.
    next_excluded: Option<BTreeSet<Rid>>,
    /// `excluded` came from a `Record::View` at recovery.
    excluded_recorded: bool,
}

impl<A: Auth + Clone> Replica<A> {
    pub fn new(id: Rid, p: Params, auth: A) -> Self {
        assert!(p.n >= 4 || p.n == 1, "n must be 1 or at least 4");
        assert!(id < p.n);
        let timeout_ms = p.timeout_ms;
        let n = p.n;
        Replica {
            id,
            p,
            auth,
            view: 0,
            changing: false,
            next_seq: 1,
            recovered_top_seq: 0,
            low: 0,
            base: 0,
            epoch: 0,
            ceiling: Seq::MAX,
            stable_proof: vec![],
            executed: 0,
            state: [0; 32],
            log: BTreeMap::new(),
            committed: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            own_checkpoints: BTreeMap::new(),
            awaiting_app: BTreeMap::new(),
            view_changes: BTreeMap::new(),
            queue: VecDeque::new(),
            assigned: BTreeSet::new(),
            timers: TimerTable::default(),
            timeout_ms,
            executed_at_ms: 0,
            now_ms: 0,
            last_new_view: None,
            next_view_ask_ms: 0,
            fetched: None,
            next_executed_by_primary: None,
            view_change_cause: ViewChangeCause::None,
            new_view_sent_ms: vec![None; n],
            peer_executed: vec![None; n],
            excluded: BTreeSet::new(),
            next_excluded: None,
            excluded_recorded: false,
        }
    }

    /// Rebuilds a replica after a restart: re-executes the committed values
    /// (from the block store, with their certificates and the application
    /// digest after each), then replays the durable records in the order
    /// they were persisted.
    pub fn recover(
        id: Rid,
        p: Params,
        auth: A,
        executed: impl IntoIterator<Item = (CommitCert, Hash32)>,
        records: impl IntoIterator<Item = Record>,
    ) -> Self {
        Replica::new(id, p, auth).recover_onto(executed, records)
    }

    /// A replica that starts at a stable checkpoint instead of at 0 (a fresh
    /// validator joining from a snapshot): `proof` must be `q` valid
    /// signatures on one checkpoint at `seq`. Returns the checkpoint's
    /// application digest with it, for the caller to compare with the
    /// snapshot it holds.
    pub fn from_stable_checkpoint(
        id: Rid,
        p: Params,
        auth: A,
        seq: Seq,
        proof: Vec<Signed<Checkpoint>>,
    ) -> Result<(Self, Hash32), &'static str> {
        let mut r = Replica::new(id, p, auth);
        if seq == 0 || !r.valid_stable_proof(seq, &proof) {
            return Err("the checkpoint proof does not carry a quorum of valid signatures");
        }
        let Checkpoint { state, app, .. } = proof[0].body.clone();
        r.state = state;
        r.executed = seq;
        r.next_seq = seq + 1;
        r.own_checkpoints.insert(seq, (state, app));
        r.make_stable(seq, proof);
        Ok((r, app))
    }

    /// The first replica of a new validator set's epoch: it starts where the
    /// previous set stopped, at `seq` (the switch height, executed), with
    /// the chained state digest `state` and application digest `app` there.
    /// Its stable checkpoint at `seq` needs no signatures: the previous set
    /// certified the block that made this set current.
    pub fn at_epoch_base(id: Rid, p: Params, auth: A, epoch: u64, seq: Seq, state: Hash32, app: Hash32) -> Self {
        let mut r = Replica::new(id, p, auth);
        r.epoch = epoch;
        r.state = state;
        r.executed = seq;
        r.next_seq = seq + 1;
        r.low = seq;
        r.base = seq;
        r.own_checkpoints.insert(seq, (state, app));
        r
    }

    /// The same replica, of set epoch `epoch` starting above `base` (one
    /// built from a later epoch's snapshot).
    pub fn in_epoch(mut self, epoch: u64, base: Seq) -> Self {
        assert!(base <= self.low, "an epoch starts at or below the stable checkpoint");
        self.epoch = epoch;
        self.base = base;
        self
    }

    /// Orders nothing above `seq`: a set change takes effect there, and the
    /// next set orders what follows (see `Node`'s epoch switch). No value
    /// above it is pre-prepared, prepared or committed by this replica.
    pub fn set_ceiling(&mut self, seq: Seq) {
        assert!(seq >= self.executed, "a ceiling below what is executed");
        self.ceiling = seq;
    }

    pub fn ceiling(&self) -> Seq {
        self.ceiling
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch's first stable checkpoint (0 at genesis).
    pub fn base(&self) -> Seq {
        self.base
    }

    pub fn auth(&self) -> &A {
        &self.auth
    }

    /// Re-executes one committed value at recovery (the block store's),
    /// with the application digest after it.
    pub fn replay_executed(&mut self, c: CommitCert, app: Hash32) {
        let mut sink = Vec::new();
        let seq = c.pre_prepare.body.seq;
        assert_eq!(seq, self.executed + 1, "committed values are replayed in order");
        self.execute(seq, c, &mut sink);
        self.on_app_digest(seq, app, &mut sink);
    }

    /// The highest seq this replica may order now: the window's top, or
    /// the ceiling below it.
    fn top(&self) -> Seq {
        (self.low + self.p.window).min(self.ceiling)
    }

    /// `recover` on top of this replica (new, or from a stable checkpoint).
    pub fn recover_onto(
        self,
        executed: impl IntoIterator<Item = (CommitCert, Hash32)>,
        records: impl IntoIterator<Item = Record>,
    ) -> Self {
        let mut r = self;
        let id = r.id;
        for (c, app) in executed {
            r.replay_executed(c, app);
        }
        for rec in records {
            match rec {
                // The caller passes one epoch's records (those after its
                // marker); a marker for this epoch says nothing more.
                Record::Epoch { epoch, .. } => debug_assert_eq!(epoch, r.epoch, "records of another epoch"),
                Record::View { view, changing, excluded } => {
                    if view > r.view || (view == r.view && !changing) {
                        r.view = view;
                        r.changing = changing;
                        r.excluded_recorded = excluded.is_some();
                        if let Some(e) = excluded {
                            r.excluded = r.cap_excluded(e);
                        }
                    }
                }
                Record::PrePrepare(s) => r.recover_pre_prepare(s),
                Record::Vote(v) => {
                    if v.body.seq > r.executed {
                        let slot = r.log.entry(v.body.seq).or_default();
                        match v.body.phase {
                            Phase::Prepare => slot.prepares.insert(id, v),
                            Phase::Commit => slot.commits.insert(id, v),
                        };
                    }
                }
                // Kept even when the store already executed it: a view
                // change reports every value prepared above the stable
                // checkpoint (PBFT §4.4), executed or not. Dropping those
                // let a new primary fill committed seqs with null values
                // (whole-node sim seed 694698751374).
                Record::Prepared(c) => {
                    let seq = c.pre_prepare.body.seq;
                    if seq > r.low {
                        let slot = r.log.entry(seq).or_default();
                        if slot
                            .prepared_cert
                            .as_ref()
                            .is_none_or(|old| old.pre_prepare.body.view <= c.pre_prepare.body.view)
                        {
                            slot.prepared_cert = Some(c);
                        }
                    }
                }
                Record::ViewChange(s) => {
                    r.view_changes.entry(s.body.new_view).or_default().insert(id, s);
                }
                Record::NewView(nv) => {
                    // Its pre-prepares count as recorded, whatever became of
                    // the records written after it: a failed sync can keep
                    // the new-view and lose them, and a primary that then
                    // re-sent this new-view and proposed afresh at the same
                    // seqs signed two values for one (view, seq).
                    for pp in &nv.body.pre_prepares {
                        r.recover_pre_prepare(pp.clone());
                    }
                    if r.last_new_view.as_ref().is_none_or(|old| old.body.view <= nv.body.view) {
                        r.last_new_view = Some(nv);
                    }
                }
                Record::Stable { seq, proof } => {
                    if seq > r.low && seq <= r.executed {
                        r.make_stable(seq, proof);
                    }
                }
            }
        }
        // Never reuse a sequence number below what is already executed
        // (a validator without records, e.g. N = 1, has none of its own).
        r.next_seq = r.next_seq.max(r.executed + 1);
        // Own votes of the current view count as sent.
        let view = r.view;
        for slot in r.log.values_mut() {
            slot.sent_prepare = slot.prepares.get(&id).is_some_and(|v| v.body.view == view);
            slot.sent_commit = slot.commits.get(&id).is_some_and(|v| v.body.view == view);
        }
        r.view_changes = r.view_changes.split_off(&r.view);
        r.recovered_top_seq = r.log.keys().next_back().copied().unwrap_or(0);
        r
    }

    /// A recorded pre-prepare (its own record or in a recorded new-view):
    /// an own one's seq is never assigned again; one above what executed
    /// fills its slot unless the slot holds one of a later view.
    fn recover_pre_prepare(&mut self, s: Signed<PrePrepare>) {
        let seq = s.body.seq;
        if s.from == self.id {
            self.next_seq = self.next_seq.max(seq + 1);
            if s.body.view == self.view {
                self.assigned.insert(s.body.digest);
            }
        }
        if seq > self.executed {
            let slot = self.log.entry(seq).or_default();
            if slot.pre_prepare.as_ref().is_none_or(|old| old.body.view <= s.body.view) {
                slot.pre_prepare = Some(s);
            }
        }
    }

    /// The smallest record list `recover` rebuilds this replica's durable
    /// state from (with the committed values): what a compacted log holds.
    /// Everything in it was persisted before; nothing else is needed.
    pub fn durable_records(&self) -> Vec<Record> {
        let mut out = vec![];
        if self.epoch > 0 {
            out.push(Record::Epoch { epoch: self.epoch, base: self.base });
        }
        out.push(self.view_record(self.view, self.changing));
        if let Some(nv) = self.last_new_view.as_ref().filter(|nv| nv.body.view == self.view) {
            out.push(Record::NewView(nv.clone()));
        }
        if self.low > 0 {
            out.push(Record::Stable { seq: self.low, proof: self.stable_proof.clone() });
        }
        for m in self.view_changes.values() {
            if let Some(vc) = m.get(&self.id) {
                out.push(Record::ViewChange(vc.clone()));
            }
        }
        for slot in self.log.values() {
            if let Some(pp) = slot.pre_prepare.as_ref().filter(|p| p.from == self.id) {
                out.push(Record::PrePrepare(pp.clone()));
            }
            if let Some(c) = &slot.prepared_cert {
                out.push(Record::Prepared(c.clone()));
            }
            for v in slot.prepares.get(&self.id).into_iter().chain(slot.commits.get(&self.id)) {
                out.push(Record::Vote(v.clone()));
            }
        }
        out
    }

    pub fn view(&self) -> View {
        self.view
    }
    pub fn executed(&self) -> Seq {
        self.executed
    }
    pub fn state_digest(&self) -> Hash32 {
        self.state
    }
    /// The highest seq that f + 1 other replicas say they executed (their
    /// checkpoints; at least one of them honest), or the stable checkpoint:
    /// how far the cluster is known to be, for a replica that may be behind.
    /// A faulty replica alone cannot raise it.
    pub fn cluster_executed(&self) -> Seq {
        let need = self.p.f() + 1;
        self.checkpoints
            .iter()
            .rev()
            .find(|(_, by)| by.keys().filter(|&&r| r != self.id).count() >= need)
            .map_or(self.low, |(&seq, _)| seq.max(self.low))
    }
    /// The newest stable checkpoint and its proof (`q` signatures).
    pub fn stable_checkpoint(&self) -> (Seq, &[Signed<Checkpoint>]) {
        (self.low, &self.stable_proof)
    }
    /// What a replica fetching from `from_seq` gets beside the committed
    /// values: this replica's stable checkpoint proof if it lies at or above
    /// `from_seq`. Without it a replica catching up executes past its own
    /// window (fetched certificates need none) but cannot move the window
    /// until the others re-send their checkpoints, a retransmit interval
    /// later: meanwhile it drops the current view's pre-prepares and its
    /// view-change timer may replace a primary that works.
    pub fn stable_proof_for(&self, from_seq: Seq) -> &[Signed<Checkpoint>] {
        match from_seq <= self.low {
            true => &self.stable_proof,
            false => &[],
        }
    }
    /// Leader of `view`: round-robin over the replicas not excluded.
    pub fn primary(&self, view: View) -> Rid {
        let eligible = self.p.n - self.excluded.len();
        let k = (view % eligible as u64) as usize;
        (0..self.p.n).filter(|r| !self.excluded.contains(r)).nth(k).expect("k < eligible")
    }

    /// Replicas that may not lead from now on. At most f may be excluded
    /// (more would let the faulty pick the leaders); extra ones are ignored.
    /// Callers apply it at the same executed height on every replica.
    pub fn set_excluded(&mut self, excluded: impl IntoIterator<Item = Rid>) {
        self.excluded = self.cap_excluded(excluded);
    }

    /// The durable record of entering `view` (with who may not lead it).
    fn view_record(&self, view: View, changing: bool) -> Record {
        Record::View { view, changing, excluded: Some(self.excluded.iter().copied().collect()) }
    }

    /// Whether the exclusions of the current view came from the durable
    /// records (a restart): the caller's view of reputation, recomputed
    /// from the chain, then applies from the next view on, as it did
    /// before the restart, so this replica's primary of the current view
    /// stays the one the others have.
    pub fn excluded_recorded(&self) -> bool {
        self.excluded_recorded
    }

    fn cap_excluded(&self, excluded: impl IntoIterator<Item = Rid>) -> BTreeSet<Rid> {
        excluded.into_iter().filter(|&r| r < self.p.n).take(self.p.f()).collect()
    }

    /// Exclusions that take effect at this replica's next view change (so
    /// the current view's leader never changes under it). Replicas apply
    /// them at slightly different moments; while they disagree on a
    /// leader only liveness waits: certificates do not depend on it.
    pub fn exclude_from_next_view(&mut self, excluded: impl IntoIterator<Item = Rid>) {
        self.next_excluded = Some(self.cap_excluded(excluded));
    }

    /// Whether `p` proves misbehaviour: two messages for one slot, both
    /// signed by the same replica, with different digests.
    pub fn verify_proof(&self, p: &Proof) -> bool {
        match p {
            Proof::PrePrepares(a, b) => {
                a.from == b.from
                    && a.from < self.p.n
                    && (a.body.view, a.body.seq) == (b.body.view, b.body.seq)
                    && a.body.digest != b.body.digest
                    && self.auth.verify(a.from, &pp_bytes(&a.body), &a.sig)
                    && self.auth.verify(b.from, &pp_bytes(&b.body), &b.sig)
            }
            Proof::Votes(a, b) => {
                a.from == b.from
                    && a.from < self.p.n
                    && (a.body.phase, a.body.view, a.body.seq) == (b.body.phase, b.body.view, b.body.seq)
                    && a.body.digest != b.body.digest
                    && self.auth.verify(a.from, &vote_bytes(&a.body), &a.sig)
                    && self.auth.verify(b.from, &vote_bytes(&b.body), &b.sig)
            }
        }
    }

    /// Current view-change timeout (AIMD).
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }
    pub fn is_primary(&self) -> bool {
        self.primary(self.view) == self.id && !self.changing
    }
    pub fn debug_summary(&self) -> String {
        format!(
            "replica {}: view {} changing {} low {} executed {} next_seq {} queue {} log {:?} timers {:?} vcs {:?}",
            self.id,
            self.view,
            self.changing,
            self.low,
            self.executed,
            self.next_seq,
            self.queue.len(),
            self.log
                .iter()
                .map(|(s, sl)| (*s, sl.pre_prepare.as_ref().map(|p| p.body.view), sl.prepares.len(), sl.commits.len()))
                .collect::<Vec<_>>(),
            self.timers,
            self.view_changes.iter().map(|(v, m)| (*v, m.keys().copied().collect::<Vec<_>>())).collect::<Vec<_>>()
        )
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether a value proposed now would get a sequence number at once:
    /// this replica leads the current view and the window has room.
    pub fn can_propose(&self) -> bool {
        self.is_primary() && self.next_seq <= self.top() && self.queue.len() < self.p.window as usize
    }

    /// Forgets values proposed here that are not executed (after a view
    /// change: what a quorum prepared comes back through the new-view; the
    /// caller re-proposes the rest from its own pool when it leads).
    pub fn clear_queue(&mut self) {
        self.queue.clear();
        self.assigned.clear();
    }

    /// Work is known that the primary has not ordered (e.g. txs waiting in
    /// this validator's mempool): start the view-change timer if idle, so a
    /// primary that heartbeats but censors is still replaced.
    pub fn expect_progress(&mut self) {
        if !self.timers.is_set(Timer::ViewChange) && !self.changing {
            self.timers.set(Timer::ViewChange, self.now_ms + self.timeout_ms);
        }
    }

    /// Checks `invariants` after each handler in debug builds and in tests
    /// (the simulator's seeds run them on every step, even in release).
    fn check_invariants(&self) {
        if cfg!(any(debug_assertions, test)) {
            self.invariants();
        }
    }

    /// What holds between any two events (TigerBeetle's `invariants()`): the
    /// window and the points in it, and a bound on every map a peer feeds.
    pub fn invariants(&self) {
        let (low, executed, window) = (self.low, self.executed, self.p.window);
        assert!(low <= executed, "stable checkpoint {low} above executed {executed}");
        if let Some((&first, _)) = self.log.iter().next() {
            assert!(first > low, "log slot {first} at or below the stable checkpoint {low}");
        }
        if let Some((&last, _)) = self.log.iter().next_back() {
            assert!(
                last <= low + window || last <= self.recovered_top_seq,
                "log slot {last} above the window ({low} + {window}) and what recovery rebuilt ({})",
                self.recovered_top_seq
            );
        }
        for (seq, slot) in &self.log {
            assert!(
                slot.prepares.len() <= self.p.n && slot.commits.len() <= self.p.n,
                "slot {seq}: a vote per replica"
            );
            if let Some(pp) = &slot.pre_prepare {
                assert_eq!(pp.body.seq, *seq, "a slot holds its own seq's pre-prepare");
            }
        }
        if let Some((&c, _)) = self.committed.iter().next_back() {
            assert_eq!(c, executed, "the newest commit certificate is the last executed seq");
        }
        assert!(self.own_checkpoints.keys().all(|&s| s >= low && s <= executed), "own checkpoints in [low, executed]");
        assert!(self.awaiting_app.keys().all(|&s| s > low && s <= executed), "app digests awaited in (low, executed]");
        let max = self.max_checkpoints_per_replica();
        assert!(self.checkpoints.keys().all(|&s| s > low), "checkpoints kept above the stable one");
        assert!(self.checkpoints.values().all(|m| !m.is_empty() && m.len() <= self.p.n));
        assert!(self.checkpoints.len() <= self.p.n * max, "checkpoints bounded by n × {max}");
        let vcs: usize = self.view_changes.values().map(|m| m.len()).sum();
        assert!(vcs <= self.p.n, "one view change kept per replica, {vcs} kept");
        assert_eq!(self.new_view_sent_ms.len(), self.p.n);
        assert_eq!(self.peer_executed.len(), self.p.n);
        assert!(self.excluded.len() <= self.p.f(), "at most f excluded from leading");
        assert!(self.view_changes.keys().all(|&v| v >= self.view), "view changes kept only for this view or later");
    }

    /// Whether this replica holds exactly this pre-prepare (e.g. from the
    /// new-view that started its view: a re-sent copy needs no new check).
    pub fn holds_pre_prepare(&self, view: View, seq: Seq, digest: &Hash32) -> bool {
        self.log
            .get(&seq)
            .and_then(|s| s.pre_prepare.as_ref())
            .is_some_and(|p| p.body.view == view && p.body.digest == *digest)
    }

    /// The application holds no work any more: a deadline that only
    /// `expect_progress` set lapses (the txs it waited for committed, or
    /// left), so an idle view is not changed for a reason that is gone. A
    /// deadline for this replica's own unexecuted pre-prepares stays.
    pub fn expect_nothing(&mut self) {
        if self.timers.is_set(Timer::ViewChange)
            && !self.changing
            && self.queue.is_empty()
            && !self.log.range(self.executed + 1..).any(|(_, s)| s.pre_prepare.is_some())
        {
            self.timers.stop(Timer::ViewChange);
        }
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    /// Why this replica last left a view.
    pub fn view_change_cause(&self) -> ViewChangeCause {
        self.view_change_cause
    }

    /// The view-change state (the simulator's diagnosis).
    #[cfg(test)]
    pub(crate) fn describe_view_change(&self) -> String {
        let vcs: Vec<(View, Vec<Rid>)> =
            self.view_changes.iter().map(|(v, m)| (*v, m.keys().copied().collect())).collect();
        format!(
            "now {} timers {:?} timeout {} ms view changes {vcs:?} new views {:?} excluded {:?} (recorded {}) next {:?}",
            self.now_ms,
            self.timers,
            self.timeout_ms,
            self.last_new_view.as_ref().map(|nv| nv.body.view),
            self.excluded,
            self.excluded_recorded,
            self.next_excluded
        )
    }

    /// True between sending a view change and accepting the new view.
    pub fn is_changing(&self) -> bool {
        self.changing
    }

    /// The application holds work the primary keeps passing over while it
    /// orders other work (a censoring primary, or one that never got the
    /// txs): move to the next view now, as the view-change timer would.
    pub fn suspect_primary(&mut self, out: &mut Vec<Action>) {
        if !self.changing && !self.is_primary() {
            self.start_view_change(self.view + 1, ViewChangeCause::Suspected, out);
        }
    }

    /// Pre-prepares of the current view not yet executed, by seq: the
    /// values in flight (the application keeps their txs out of new
    /// proposals and refuses proposals that repeat them).
    pub fn unexecuted_pre_prepares(&self) -> impl Iterator<Item = (Seq, &Hash32, &Value)> {
        let view = self.view;
        self.log.range(self.executed + 1..).filter_map(move |(&seq, slot)| {
            let pp = slot.pre_prepare.as_ref().filter(|p| p.body.view == view)?;
            Some((seq, &pp.body.digest, &pp.body.value))
        })
    }

    fn sign<T>(&self, body: T, bytes: Vec<u8>) -> Signed<T> {
        Signed { sig: self.auth.sign(&bytes), body, from: self.id }
    }

    /// A value to order. Every replica is told (as every validator sees every
    /// transaction); the primary assigns it a sequence number, backups start
    /// their timer so a silent primary is replaced.
    /// Returns the value's digest.
    pub fn propose(&mut self, value: Value, out: &mut Vec<Action>) -> Hash32 {
        let digest = self.add_value(value, out);
        self.check_invariants();
        digest
    }

    fn add_value(&mut self, value: Value, out: &mut Vec<Action>) -> Hash32 {
        let digest = sha256(&value);
        self.queue.push_back((digest, value));
        if !self.timers.is_set(Timer::ViewChange) {
            self.timers.set(Timer::ViewChange, self.now_ms + self.timeout_ms);
        }
        self.try_propose(out);
        digest
    }

    fn try_propose(&mut self, out: &mut Vec<Action>) {
        if !self.is_primary() {
            return;
        }
        let view = self.view;
        let mut i = 0;
        while self.next_seq <= self.top() && i < self.queue.len() {
            let digest = self.queue[i].0;
            i += 1;
            if self.assigned.contains(&digest) {
                continue;
            }
            if self
                .log
                .range(self.executed + 1..)
                .any(|(_, sl)| sl.pre_prepare.as_ref().is_some_and(|p| p.body.view == view && p.body.digest == digest))
            {
                continue; // already re-proposed by the new-view
            }
            self.assigned.insert(digest);
            let value = self.queue[i - 1].1.clone();
            let pp = PrePrepare { view, seq: self.next_seq, digest, value };
            self.next_seq += 1;
            let s = self.sign(pp.clone(), pp_bytes(&pp));
            out.push(Action::Persist(Record::PrePrepare(s.clone())));
            self.accept_hashed_pre_prepare(s.clone(), out);
            out.push(Action::Broadcast(Message::PrePrepare(s)));
        }
    }

    /// Time passes without firing timers (callers that feed messages or
    /// proposals before the first tick still get deadlines from `now`).
    pub fn set_time(&mut self, now: u64) {
        self.now_ms = self.now_ms.max(now);
    }

    /// Time passes.
    pub fn on_tick(&mut self, now: u64, out: &mut Vec<Action>) {
        self.tick(now, out);
        self.check_invariants();
        assert!(!self.lacks_own_view_change(), "a replica changing view has sent its view change");
    }

    fn tick(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        // Replica time never runs backwards, whatever the clock it is fed
        // does (the host feeds a monotonic clock; this is the guard).
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if self.lacks_own_view_change() {
            self.send_view_change(out);
        }
        if self.timers.is_expired(Timer::ViewChange, now) {
            self.start_view_change(self.view + 1, ViewChangeCause::Timeout, out);
        }
        if self.p.heartbeat_ms > 0 && !self.changing {
            if self.is_primary() {
                if self.timers.get(Timer::Heartbeat).is_none_or(|at| now >= at) {
                    self.timers.set(Timer::Heartbeat, now + self.p.heartbeat_ms);
                    let h = Heartbeat { view: self.view, executed: self.executed, epoch: self.epoch };
                    let bytes = hb_bytes(&h);
                    out.push(Action::Broadcast(Message::Heartbeat(self.sign(h, bytes))));
                }
            } else {
                // A new or recovered backup starts counting at its first tick.
                if !self.timers.is_set(Timer::PrimarySilent) {
                    self.heard_from_primary();
                }
                if self.timers.is_expired(Timer::PrimarySilent, now) {
                    // A silent primary is replaced even when there is no work.
                    self.start_view_change(self.view + 1, ViewChangeCause::SilentPrimary, out);
                }
            }
        }
        if self.timers.get(Timer::Retransmit).is_none_or(|at| now >= at) {
            self.timers.set(Timer::Retransmit, now + self.p.retransmit_ms);
            self.retransmit(out);
        }
    }

    /// The primary of this view was heard from (a heartbeat, a proposal, the
    /// new-view): it counts as silent after `missed_heartbeats` intervals.
    fn heard_from_primary(&mut self) {
        let silent_after_ms = self.p.heartbeat_ms * self.p.missed_heartbeats + 1;
        self.timers.set(Timer::PrimarySilent, self.now_ms + silent_after_ms);
    }

    /// Whether `timer` acts in this replica's current state (a backup has
    /// no heartbeat to send; nobody watches the primary during a change).
    fn timer_applies(&self, timer: Timer) -> bool {
        match timer {
            Timer::ViewChange | Timer::Retransmit => true,
            Timer::Heartbeat => self.p.heartbeat_ms > 0 && !self.changing && self.is_primary(),
            Timer::PrimarySilent => self.p.heartbeat_ms > 0 && !self.changing && !self.is_primary(),
        }
    }

    /// When (replica time, ms) `on_tick` must next run: the earliest timer
    /// that applies. A timer that applies but is not armed yet (the first
    /// tick, a new primary's first heartbeat) and a view change owed are due
    /// now. Ticking earlier is harmless; later delays that timer.
    pub fn poll_timeout_ms(&self) -> u64 {
        if self.lacks_own_view_change() {
            return self.now_ms;
        }
        Timer::ALL
            .iter()
            .filter(|&&t| self.timer_applies(t))
            .filter_map(|&t| match (t, self.timers.get(t)) {
                (Timer::ViewChange, at) => at,
                (_, at) => Some(at.unwrap_or(self.now_ms)),
            })
            .min()
            .expect("the retransmit timer always applies")
    }

    /// Re-sends what may have been lost, once progress has stalled: a
    /// slot's pre-prepare and own votes if nothing entered it for half an
    /// interval; a fetch and the new-view if nothing executed for one. Under
    /// load every slot in flight is younger than that, so nothing goes out
    /// twice (re-sending every unexecuted value each second cost a full
    /// window of megabyte proposals per replica per second).
    fn retransmit(&mut self, out: &mut Vec<Action>) {
        let stalled = |since: u64| self.now_ms.saturating_sub(since) >= self.p.retransmit_ms;
        let exec_stalled = stalled(self.executed_at_ms);
        // A slot counts as stalled after half an interval: one touched just
        // after this timer fired is then re-sent at the next firing, not the
        // one after (two intervals: the view-change timeout, so a primary's
        // first pre-prepare lost to backups still starting cost a view).
        let slot_stalled = |since: u64| self.now_ms.saturating_sub(since) >= self.p.retransmit_ms / 2;
        // Ask for what others committed if we have work outstanding: cheap,
        // and the way a replica that was cut off catches up, in any view.
        // A replica alone in a view change asks too (its timer is off until
        // a quorum joins): the others may be committing in the old view, and
        // what they commit it executes, so its pool drains while it waits.
        if exec_stalled && (self.timers.is_set(Timer::ViewChange) || !self.queue.is_empty() || self.changing) {
            out.push(Action::Broadcast(Message::Fetch { from: self.id, from_seq: self.executed + 1 }));
        }
        if self.changing {
            if let Some(vc) = self.view_changes.get(&self.view).and_then(|m| m.get(&self.id)) {
                out.push(Action::Broadcast(Message::ViewChange(vc.clone())));
            }
            return;
        }
        if let Some(nv) = self.last_new_view.as_ref().filter(|_| exec_stalled && self.is_primary()) {
            if nv.body.view == self.view {
                out.push(Action::Broadcast(Message::NewView(nv.clone())));
            }
        }
        for (_, slot) in self.log.range(self.executed + 1..).filter(|(_, s)| slot_stalled(s.touched_ms)) {
            if let Some(pp) = &slot.pre_prepare {
                if pp.body.view == self.view {
                    out.push(Action::Broadcast(Message::PrePrepare(pp.clone())));
                }
            }
            for v in slot.prepares.get(&self.id).into_iter().chain(slot.commits.get(&self.id)) {
                if v.body.view == self.view {
                    out.push(Action::Broadcast(Message::Vote(v.clone())));
                }
            }
        }
        if let Some((&seq, &(state, app))) = self.own_checkpoints.iter().next_back() {
            let c = Checkpoint { seq, state, app };
            out.push(Action::Broadcast(Message::Checkpoint(self.sign(c.clone(), ckpt_bytes(&c)))));
        }
    }

    pub fn on_message(&mut self, msg: Message, out: &mut Vec<Action>) {
        self.handle_message(msg, out);
        self.check_invariants();
    }

    fn handle_message(&mut self, msg: Message, out: &mut Vec<Action>) {
        match msg {
            Message::PrePrepare(s) => {
                if s.from == self.primary(s.body.view)
                    && s.body.view == self.view
                    && !self.changing
                    && self.auth.verify(s.from, &pp_bytes(&s.body), &s.sig)
                {
                    // A signed proposal of this view shows its primary alive,
                    // as a heartbeat does (under load, heartbeats queue behind
                    // big proposals); lack of progress is the deadline's job.
                    self.heard_from_primary();
                    self.accept_pre_prepare(s, out);
                } else {
                    self.ask_for_view(s.body.view, s.from, out);
                }
            }
            Message::Vote(s) => {
                if s.from < self.p.n && self.auth.verify(s.from, &vote_bytes(&s.body), &s.sig) {
                    self.on_vote(s, out);
                }
            }
            Message::Checkpoint(s) => {
                if s.from < self.p.n && self.auth.verify(s.from, &ckpt_bytes(&s.body), &s.sig) {
                    self.on_checkpoint(s, out);
                }
            }
            Message::ViewChange(s) => {
                if s.from < self.p.n
                    && self.auth.verify(s.from, &vc_bytes(&s.body), &s.sig)
                    && self.valid_view_change(&s)
                {
                    self.on_view_change(s, out);
                }
            }
            Message::NewView(s) => {
                // Leaving our view, pending exclusions apply; but only once
                // the new-view is accepted: a bogus one (a faulty replica's)
                // must not change who leads our current view.
                let view_before = self.view;
                let pending = self.next_excluded.clone().filter(|_| s.body.view > view_before);
                let before = pending.map(|e| std::mem::replace(&mut self.excluded, e));
                let signed = s.from < self.p.n && self.auth.verify(s.from, &nv_bytes(&s.body), &s.sig);
                if signed && s.from == self.primary(s.body.view) {
                    self.on_new_view(s, out);
                } else if signed && s.body.view > view_before && s.from != self.id {
                    // A new view we cannot place: who leads it depends on
                    // exclusions applied at a height we have not executed
                    // (found by the simulator: a replica two blocks behind
                    // dropped the real primary's new-view forever). Catch up
                    // from its sender (commit certificates verify
                    // themselves), then its new-view places.
                    out.push(Action::Send(s.from, Message::Fetch { from: self.id, from_seq: self.executed + 1 }));
                }
                if let Some(before) = before {
                    if self.view > view_before {
                        self.next_excluded = None; // applied with the new view
                    } else {
                        self.excluded = before;
                    }
                }
            }
            Message::Fetch { from, from_seq } => {
                if from < self.p.n && from != self.id {
                    for (_, c) in self.committed.range(from_seq..).take(self.p.window as usize) {
                        out.push(Action::Send(from, Message::Committed(c.clone())));
                    }
                    for c in self.stable_proof_for(from_seq) {
                        out.push(Action::Send(from, Message::Checkpoint(c.clone())));
                    }
                    if let Some(nv) = self.new_view_for(from) {
                        out.push(Action::Send(from, Message::NewView(nv)));
                    }
                }
            }
            Message::Committed(c) => self.on_commit_cert(c, out),
            Message::Heartbeat(s) => {
                let same_view = s.body.view == self.view;
                // From the primary of the view this replica is in (not changing).
                let from_my_primary = same_view && !self.changing && s.from == self.primary(s.body.view);
                if same_view && s.from < self.p.n && self.auth.verify(s.from, &hb_bytes(&s.body), &s.sig) {
                    if from_my_primary {
                        self.heard_from_primary();
                    }
                    // Whoever sends it: a validator that takes itself for
                    // this view's primary (it entered the view before
                    // executing the block that changed the exclusions, so
                    // it has another primary) must still catch up with the
                    // rest in an idle cluster, and learn the exclusions.
                    if s.body.executed > self.executed {
                        self.ask_to_catch_up(s.from, out);
                    } else if s.body.executed < self.executed {
                        self.help_behind(s.from, s.body.executed, out);
                    }
                }
                if !from_my_primary {
                    self.ask_for_view(s.body.view, s.from, out);
                }
            }
        }
    }

    /// A message of view `view` from `from`: if that is a later view (or the
    /// one this replica is still changing to) and `from` leads it, this
    /// replica missed its new-view (it was down or cut off while the others
    /// moved on) and nothing re-sends it while the view makes progress, so
    /// it asks `from`, with a fetch of what it has not executed; at most once
    /// per retransmit interval (signatures are not checked for this: the
    /// worst a forged message can do is cause one such fetch).
    fn ask_for_view(&mut self, view: View, from: Rid, out: &mut Vec<Action>) {
        let later = view > self.view || (view == self.view && self.changing);
        if !later
            || from >= self.p.n
            || from == self.id
            || from != self.primary(view)
            || self.now_ms < self.next_view_ask_ms
        {
            return;
        }
        self.next_view_ask_ms = self.now_ms + self.p.retransmit_ms;
        self.fetched = Some((self.executed, self.now_ms));
        out.push(Action::Send(from, Message::Fetch { from: self.id, from_seq: self.executed + 1 }));
    }

    /// The primary has executed more than this replica. If this replica
    /// holds no pre-prepare for its next seq, it missed it (e.g. sent
    /// before it entered the view); if an earlier heartbeat already said
    /// the primary executed that seq, it missed the votes (sent before it
    /// held the slot). Nobody re-sends an executed slot, so it fetches at
    /// once; again as soon as that fetch moved execution (the gap may lie
    /// past what it brought), else once per retransmit interval. Otherwise
    /// it is just behind under load (the primary executed its next seq
    /// less than a heartbeat ago) and fetches only once its own execution
    /// has stalled for an interval (shares `ask_for_view`'s limiter).
    /// Waiting a full interval lost the race with a view-change timeout as
    /// short as that interval: a restarted replica left a working view,
    /// which then lost its quorum with one more backup down.
    fn ask_to_catch_up(&mut self, primary: Rid, out: &mut Vec<Action>) {
        let next = self.executed + 1;
        let since_ms = match self.next_executed_by_primary {
            Some((seq, since_ms)) if seq == next => since_ms,
            _ => {
                self.next_executed_by_primary = Some((next, self.now_ms));
                self.now_ms
            }
        };
        let missed = since_ms < self.now_ms || self.log.get(&next).is_none_or(|s| s.pre_prepare.is_none());
        let stalled = self.now_ms.saturating_sub(self.executed_at_ms) >= self.p.retransmit_ms;
        let due = match missed {
            true => self.fetch_due(),
            false => stalled && self.now_ms >= self.next_view_ask_ms,
        };
        if !due {
            return;
        }
        self.fetched = Some((self.executed, self.now_ms));
        if !missed {
            self.next_view_ask_ms = self.now_ms + self.p.retransmit_ms;
        }
        out.push(Action::Send(primary, Message::Fetch { from: self.id, from_seq: self.executed + 1 }));
    }

    /// Whether a fetch now is not a repeat: none was sent at this executed
    /// seq within a retransmit interval (one that moved execution does not
    /// count).
    fn fetch_due(&self) -> bool {
        self.fetched
            .is_none_or(|(executed, at_ms)| executed != self.executed || self.now_ms >= at_ms + self.p.retransmit_ms)
    }

    /// The primary's heartbeats say it has executed only `executed`, below
    /// this replica: once that has not moved for a retransmit interval (a
    /// primary just behind under load catches up by itself), this replica
    /// sends it the commit certificates it keeps from there (at most a
    /// window; once per interval). A primary that restarted and lost the
    /// commits of its last proposal in an idle cluster has no other way to
    /// learn it committed: nobody sends it anything newer.
    fn help_behind(&mut self, peer: Rid, executed: Seq, out: &mut Vec<Action>) {
        let Some(seen) = self.peer_executed.get_mut(peer) else { return };
        match *seen {
            Some((seq, since_ms)) if seq == executed => {
                if peer == self.id || self.now_ms < since_ms + self.p.retransmit_ms {
                    return;
                }
                *seen = Some((seq, self.now_ms)); // once per interval
            }
            _ => {
                *seen = Some((executed, self.now_ms));
                return;
            }
        }
        for (_, c) in self.committed.range(executed + 1..).take(self.p.window as usize) {
            out.push(Action::Send(peer, Message::Committed(c.clone())));
        }
    }

    /// The new-view of this replica's view, for replica `to` that asked with
    /// a fetch; `None` in view 0, while changing, or if `to` had it within
    /// the last retransmit interval.
    pub fn new_view_for(&mut self, to: Rid) -> Option<Signed<NewView>> {
        let nv = self.last_new_view.as_ref().filter(|nv| nv.body.view == self.view && !self.changing)?;
        let sent = self.new_view_sent_ms.get_mut(to)?;
        if sent.is_some_and(|at| self.now_ms < at + self.p.retransmit_ms) {
            return None;
        }
        *sent = Some(self.now_ms);
        Some(nv.clone())
    }

    fn in_window(&self, seq: Seq) -> bool {
        seq > self.low && seq <= self.top()
    }

    fn accept_pre_prepare(&mut self, s: Signed<PrePrepare>, out: &mut Vec<Action>) {
        if sha256(&s.body.value) == s.body.digest {
            self.accept_hashed_pre_prepare(s, out);
        }
    }

    /// `accept_pre_prepare` of one whose digest is known to match its value.
    fn accept_hashed_pre_prepare(&mut self, s: Signed<PrePrepare>, out: &mut Vec<Action>) {
        let b = &s.body;
        debug_assert_eq!(sha256(&b.value), b.digest);
        if !self.in_window(b.seq) || b.seq <= self.executed {
            return;
        }
        let view = self.view;
        let slot = self.log.entry(b.seq).or_default();
        if let Some(existing) = &slot.pre_prepare {
            if existing.body.view == b.view {
                if existing.body.digest != b.digest && existing.from == s.from {
                    out.push(Action::Evidence {
                        culprit: s.from,
                        what: "two pre-prepares for one (view, seq)",
                        proof: Some(Proof::PrePrepares(without_value(existing), without_value(&s))),
                    });
                }
                return;
            }
        }
        // Never prepare a different value in a view where we already prepared.
        if slot.sent_prepare
            && slot.prepares.get(&self.id).is_some_and(|v| v.body.view == view && v.body.digest != b.digest)
        {
            return;
        }
        slot.pre_prepare = Some(s.clone());
        slot.touched_ms = self.now_ms;
        if !self.timers.is_set(Timer::ViewChange) {
            self.timers.set(Timer::ViewChange, self.now_ms + self.timeout_ms);
        }
        if self.primary(view) != self.id {
            let v = Vote { phase: Phase::Prepare, view, seq: b.seq, digest: b.digest };
            let sv = self.sign(v.clone(), vote_bytes(&v));
            let slot = self.log.get_mut(&b.seq).expect("inserted");
            slot.sent_prepare = true;
            slot.prepares.insert(self.id, sv.clone());
            out.push(Action::Persist(Record::Vote(sv.clone())));
            out.push(Action::Broadcast(Message::Vote(sv)));
        }
        self.check_progress(b.seq, out);
    }

    fn on_vote(&mut self, s: Signed<Vote>, out: &mut Vec<Action>) {
        let b = &s.body;
        if b.view != self.view || !self.in_window(b.seq) || b.seq <= self.executed {
            return;
        }
        if b.phase == Phase::Prepare && s.from == self.primary(b.view) {
            return; // the primary's pre-prepare is its prepare
        }
        let slot = self.log.entry(b.seq).or_default();
        let map = match b.phase {
            Phase::Prepare => &mut slot.prepares,
            Phase::Commit => &mut slot.commits,
        };
        match map.get(&s.from) {
            Some(old) if old.body.view == b.view && old.body.digest != b.digest => {
                out.push(Action::Evidence {
                    culprit: s.from,
                    what: "two votes for one (view, seq)",
                    proof: Some(Proof::Votes(old.clone(), s.clone())),
                });
                return;
            }
            Some(old) if old.body.view >= b.view => return,
            _ => {}
        }
        map.insert(s.from, s.clone());
        slot.touched_ms = self.now_ms;
        self.check_progress(b.seq, out);
    }

    fn matching(votes: &BTreeMap<Rid, Signed<Vote>>, view: View, digest: &Hash32) -> usize {
        votes.values().filter(|v| v.body.view == view && &v.body.digest == digest).count()
    }

    fn prepared(&self, seq: Seq) -> Option<(View, Hash32)> {
        let slot = self.log.get(&seq)?;
        let pp = slot.pre_prepare.as_ref()?;
        let (v, d) = (pp.body.view, pp.body.digest);
        (v == self.view && Self::matching(&slot.prepares, v, &d) + 1 >= self.p.q()).then_some((v, d))
    }

    fn check_progress(&mut self, seq: Seq, out: &mut Vec<Action>) {
        let Some((view, digest)) = self.prepared(seq) else { return };
        let slot = self.log.get_mut(&seq).expect("prepared slot exists");
        if slot.prepared_cert.as_ref().is_none_or(|c| c.pre_prepare.body.view < view) {
            let prepares =
                slot.prepares.values().filter(|v| v.body.view == view && v.body.digest == digest).cloned().collect();
            let cert = PreparedCert { pre_prepare: slot.pre_prepare.clone().expect("prepared"), prepares };
            out.push(Action::Persist(Record::Prepared(cert.clone())));
            slot.prepared_cert = Some(cert);
        }
        if !slot.sent_commit {
            slot.sent_commit = true;
            let v = Vote { phase: Phase::Commit, view, seq, digest };
            let sv = Signed { sig: self.auth.sign(&vote_bytes(&v)), body: v, from: self.id };
            slot.commits.insert(self.id, sv.clone());
            out.push(Action::Persist(Record::Vote(sv.clone())));
            out.push(Action::Broadcast(Message::Vote(sv)));
        }
        self.execute_ready(out);
    }

    fn execute_ready(&mut self, out: &mut Vec<Action>) {
        loop {
            let seq = self.executed + 1;
            let Some((view, digest)) = self.prepared(seq) else { return };
            let slot = &self.log[&seq];
            if Self::matching(&slot.commits, view, &digest) < self.p.q() {
                return;
            }
            let commits: Vec<Signed<Vote>> =
                slot.commits.values().filter(|v| v.body.view == view && v.body.digest == digest).cloned().collect();
            let cert = CommitCert { pre_prepare: slot.pre_prepare.clone().expect("prepared"), commits };
            self.execute(seq, cert, out);
        }
    }

    fn execute(&mut self, seq: Seq, cert: CommitCert, out: &mut Vec<Action>) {
        debug_assert_eq!(seq, self.executed + 1);
        let value = cert.pre_prepare.body.value.clone();
        let mut h = self.state.to_vec();
        h.extend_from_slice(&cert.pre_prepare.body.digest);
        self.state = sha256(&h);
        self.executed = seq;
        self.executed_at_ms = self.now_ms;
        // Progress: the view works (AIMD additive decrease).
        self.timeout_ms = self.timeout_ms.saturating_sub(self.p.timeout_decrease_ms).max(self.p.timeout_min_ms);
        self.queue.retain(|(d, _)| *d != cert.pre_prepare.body.digest);
        self.assigned.remove(&cert.pre_prepare.body.digest);
        let pending = self.log.range(seq + 1..).any(|(_, s)| s.pre_prepare.is_some()) || !self.queue.is_empty();
        // While changing view, the timer is the view change's (started once
        // a quorum asks for the view): executing a fetched value must not
        // restart it, or a replica alone could race ahead through views.
        if !self.changing {
            match pending {
                true => self.timers.set(Timer::ViewChange, self.now_ms + self.timeout_ms),
                false => self.timers.stop(Timer::ViewChange),
            }
        }
        self.committed.insert(seq, cert.clone());
        out.push(Action::Execute { seq, value, cert });
        if seq % self.p.checkpoint_interval == 0 {
            // The checkpoint goes out once the application reports its digest.
            self.awaiting_app.insert(seq, self.state);
        }
    }

    /// The application's digest after executing `seq` (after the `Execute`
    /// action for it). Callers report at least every checkpoint seq: until
    /// they do, no checkpoint is signed and the window cannot move on.
    pub fn on_app_digest(&mut self, seq: Seq, app: Hash32, out: &mut Vec<Action>) {
        let Some(state) = self.awaiting_app.remove(&seq) else { return };
        self.own_checkpoints.insert(seq, (state, app));
        let c = Checkpoint { seq, state, app };
        let s = self.sign(c.clone(), ckpt_bytes(&c));
        out.push(Action::Broadcast(Message::Checkpoint(s.clone())));
        self.on_checkpoint(s, out);
    }

    fn on_checkpoint(&mut self, s: Signed<Checkpoint>, out: &mut Vec<Action>) {
        let seq = s.body.seq;
        // Honest replicas checkpoint only at multiples of the interval.
        if seq <= self.low || seq % self.p.checkpoint_interval != 0 {
            return;
        }
        let from = s.from;
        self.checkpoints.entry(seq).or_default().insert(from, s);
        // A bound on what one replica can make us keep: its newest few
        // checkpoints (a window's worth and two more). An honest replica is
        // rarely further ahead than that; a faulty one only evicts its own.
        let max = self.max_checkpoints_per_replica();
        let theirs: Vec<Seq> =
            self.checkpoints.iter().filter(|(_, m)| m.contains_key(&from)).map(|(seq, _)| *seq).collect();
        for old in theirs.iter().take(theirs.len().saturating_sub(max)) {
            let m = self.checkpoints.get_mut(old).expect("listed");
            m.remove(&from);
            if m.is_empty() {
                self.checkpoints.remove(old);
            }
        }
        let Some(all) = self.checkpoints.get(&seq) else { return }; // evicted at once: older than its newest
        let proof: Vec<Signed<Checkpoint>> = {
            let mut by_state: BTreeMap<(Hash32, Hash32), Vec<Signed<Checkpoint>>> = BTreeMap::new();
            for c in all.values() {
                by_state.entry((c.body.state, c.body.app)).or_default().push(c.clone());
            }
            match by_state.into_values().find(|v| v.len() >= self.p.q()) {
                Some(v) => v,
                None => return,
            }
        };
        if self.executed < seq {
            // Others are ahead: fetch the committed values (unless a fetch
            // just went out: a proof usually comes with a fetch's answer).
            if self.fetch_due() {
                self.fetched = Some((self.executed, self.now_ms));
                out.push(Action::Broadcast(Message::Fetch { from: self.id, from_seq: self.executed + 1 }));
            }
            return;
        }
        if self.own_checkpoints.get(&seq) != Some(&(proof[0].body.state, proof[0].body.app)) {
            return; // our state differs from the quorum's: never happens for an honest replica
        }
        out.push(Action::Persist(Record::Stable { seq, proof: proof.clone() }));
        self.make_stable(seq, proof);
        // `committed` is kept for catch-up (the block store plays this role in
        // the validator).
        self.try_propose(out);
    }

    /// See `on_checkpoint`.
    fn max_checkpoints_per_replica(&self) -> usize {
        (self.p.window / self.p.checkpoint_interval.max(1)) as usize + 2
    }

    fn make_stable(&mut self, seq: Seq, proof: Vec<Signed<Checkpoint>>) {
        self.low = seq;
        self.stable_proof = proof;
        self.log = self.log.split_off(&(seq + 1));
        self.committed = self.committed.split_off(&seq.saturating_sub(self.p.keep_committed).max(1));
        self.own_checkpoints = self.own_checkpoints.split_off(&seq);
        self.awaiting_app = self.awaiting_app.split_off(&(seq + 1));
        self.checkpoints = self.checkpoints.split_off(&(seq + 1));
    }

    // Certificates of past views do not check that the pre-prepare came from
    // that view's primary: who leads a view may be judged differently once
    // exclusions change, and safety does not rest on it. Two certificates
    // for one (view, seq) share at least f + 1 signers, so an honest replica
    // would have signed two digests for one slot, which it never does.
    fn valid_commit_cert(&self, c: &CommitCert) -> bool {
        let pp = &c.pre_prepare;
        if pp.from >= self.p.n
            || !self.auth.verify(pp.from, &pp_bytes(&pp.body), &pp.sig)
            || sha256(&pp.body.value) != pp.body.digest
        {
            return false;
        }
        let mut signers = BTreeSet::new();
        for v in &c.commits {
            let b = &v.body;
            if b.phase == Phase::Commit
                && b.view == pp.body.view
                && b.seq == pp.body.seq
                && b.digest == pp.body.digest
                && v.from < self.p.n
                && self.auth.verify(v.from, &vote_bytes(b), &v.sig)
            {
                signers.insert(v.from);
            }
        }
        signers.len() >= self.p.q()
    }

    fn on_commit_cert(&mut self, c: CommitCert, out: &mut Vec<Action>) {
        let seq = c.pre_prepare.body.seq;
        if seq != self.executed + 1 || seq > self.ceiling || !self.valid_commit_cert(&c) {
            return;
        }
        // A certificate is only ever formed for the one value a quorum
        // committed at `seq`; adopting it is safe.
        self.execute(seq, c, out);
        self.execute_ready(out);
    }

    // ---- view change ------------------------------------------------------

    fn start_view_change(&mut self, new_view: View, cause: ViewChangeCause, out: &mut Vec<Action>) {
        if new_view < self.view || (new_view == self.view && self.changing) {
            return;
        }
        self.view_change_cause = cause;
        // View changes for views below the new one can never form a new-view now.
        self.view_changes = self.view_changes.split_off(&new_view);
        if let Some(e) = self.next_excluded.take() {
            self.excluded = e;
        }
        self.view = new_view;
        self.changing = true;
        // AIMD multiplicative increase: if this view fails too, wait longer.
        self.timeout_ms = ((self.timeout_ms as f64 * self.p.timeout_increase) as u64)
            .clamp(self.p.timeout_min_ms, self.p.timeout_max_ms);
        // The timer restarts only once a quorum asks for this view (PBFT):
        // a replica alone cannot race ahead through views.
        self.timers.stop(Timer::ViewChange);
        self.send_view_change(out);
    }

    /// Signs, persists and sends this replica's view change for the view it
    /// is changing to (PBFT §4.4: its stable checkpoint and prepared set).
    fn send_view_change(&mut self, out: &mut Vec<Action>) {
        debug_assert!(self.changing);
        let new_view = self.view;
        let prepared: Vec<PreparedCert> = self
            .log
            .range(self.low + 1..=self.low + self.p.window)
            .filter_map(|(_, slot)| slot.prepared_cert.clone())
            .collect();
        let vc = ViewChange { new_view, stable_seq: self.low, stable_proof: self.stable_proof.clone(), prepared };
        let s = self.sign(vc.clone(), vc_bytes(&vc));
        out.push(Action::Persist(self.view_record(new_view, true)));
        out.push(Action::Persist(Record::ViewChange(s.clone())));
        out.push(Action::Broadcast(Message::ViewChange(s.clone())));
        self.on_view_change(s, out);
    }

    /// Changing view without a view change of its own: a crash tore the
    /// log between the two records `send_view_change` appends (the view
    /// change was never synced, so never sent). Nobody else retransmits it
    /// and its timer waits for a quorum: without it, a cluster where this
    /// happened to enough replicas never leaves the view.
    fn lacks_own_view_change(&self) -> bool {
        self.changing && !self.view_changes.get(&self.view).is_some_and(|m| m.contains_key(&self.id))
    }

    fn valid_prepared_cert(&self, c: &PreparedCert, new_view: View, stable: Seq) -> bool {
        let pp = &c.pre_prepare;
        let b = &pp.body;
        if b.view >= new_view || b.seq <= stable || b.seq > stable + self.p.window {
            return false;
        }
        if pp.from >= self.p.n || !self.auth.verify(pp.from, &pp_bytes(b), &pp.sig) || sha256(&b.value) != b.digest {
            return false;
        }
        let mut signers = BTreeSet::new();
        for v in &c.prepares {
            let x = &v.body;
            if x.phase == Phase::Prepare
                && x.view == b.view
                && x.seq == b.seq
                && x.digest == b.digest
                && v.from < self.p.n
                && v.from != pp.from
                && self.auth.verify(v.from, &vote_bytes(x), &v.sig)
            {
                signers.insert(v.from);
            }
        }
        signers.len() + 1 >= self.p.q()
    }

    fn valid_stable_proof(&self, seq: Seq, proof: &[Signed<Checkpoint>]) -> bool {
        if seq == self.base {
            return true;
        }
        let Some(first) = proof.first() else { return false };
        let mut signers = BTreeSet::new();
        for c in proof {
            if c.body.seq == seq
                && c.body.state == first.body.state
                && c.body.app == first.body.app
                && c.from < self.p.n
                && self.auth.verify(c.from, &ckpt_bytes(&c.body), &c.sig)
            {
                signers.insert(c.from);
            }
        }
        signers.len() >= self.p.q()
    }

    fn valid_view_change(&self, s: &Signed<ViewChange>) -> bool {
        let b = &s.body;
        self.valid_stable_proof(b.stable_seq, &b.stable_proof)
            && b.prepared.iter().all(|c| self.valid_prepared_cert(c, b.new_view, b.stable_seq))
    }

    fn on_view_change(&mut self, s: Signed<ViewChange>, out: &mut Vec<Action>) {
        let nv = s.body.new_view;
        if nv < self.view || (nv == self.view && !self.changing) {
            return;
        }
        // One view change per replica, its highest: a replica that asks for
        // a higher view has abandoned the lower one (this bounds what a
        // faulty replica can make us keep to one entry).
        let from = s.from;
        if self.view_changes.range(nv + 1..).any(|(_, m)| m.contains_key(&from)) {
            return;
        }
        for m in self.view_changes.values_mut() {
            m.remove(&from);
        }
        self.view_changes.retain(|_, m| !m.is_empty());
        self.view_changes.entry(nv).or_default().insert(from, s);
        // A view change for a higher view also abandons ours: count those too,
        // or a replica that raced ahead alone could leave the rest waiting.
        let asking = self.view_changes.range(self.view..).flat_map(|(_, m)| m.keys()).collect::<BTreeSet<_>>().len();
        if self.changing && !self.timers.is_set(Timer::ViewChange) && asking >= self.p.q() {
            self.timers.set(Timer::ViewChange, self.now_ms + self.timeout_ms);
        }
        // f + 1 replicas ask for views above ours: at least one is honest, so
        // move to the smallest of those views (PBFT's liveness rule).
        let mut senders: BTreeMap<Rid, View> = BTreeMap::new();
        for (&v, m) in self.view_changes.range(self.view + 1..) {
            for &r in m.keys() {
                senders.entry(r).or_insert(v);
            }
        }
        if senders.len() > self.p.f() {
            let smallest = *senders.values().min().expect("non-empty");
            self.start_view_change(smallest, ViewChangeCause::Asked, out);
            return;
        }
        let nv = self.view;
        if self.changing && self.primary(nv) == self.id {
            if let Some(m) = self.view_changes.get(&nv) {
                if m.len() >= self.p.q() && m.contains_key(&self.id) {
                    let vcs: Vec<Signed<ViewChange>> = m.values().take(self.p.q()).cloned().collect();
                    let pps = self.compute_new_view_pre_prepares(nv, &vcs);
                    let body = NewView { view: nv, view_changes: vcs, pre_prepares: pps };
                    let s = self.sign(body.clone(), nv_bytes(&body));
                    // Durable before it is sent: a primary that restarted
                    // after sending must not make a second new-view.
                    out.push(Action::Persist(self.view_record(nv, false)));
                    out.push(Action::Persist(Record::NewView(s.clone())));
                    out.push(Action::Broadcast(Message::NewView(s.clone())));
                    self.last_new_view = Some(s.clone());
                    self.enter_view(s.body, out);
                }
            }
        }
    }

    /// The new primary's pre-prepares for view `nv`: for every seq between the
    /// highest stable checkpoint and the highest prepared seq, the value of the
    /// prepared certificate with the highest view, or a null request.
    fn compute_new_view_pre_prepares(&self, nv: View, vcs: &[Signed<ViewChange>]) -> Vec<Signed<PrePrepare>> {
        let min_s = vcs.iter().map(|v| v.body.stable_seq).max().unwrap_or(0);
        let mut best: BTreeMap<Seq, &PreparedCert> = BTreeMap::new();
        for vc in vcs {
            for c in &vc.body.prepared {
                let seq = c.pre_prepare.body.seq;
                if seq <= min_s {
                    continue;
                }
                match best.get(&seq) {
                    Some(b) if b.pre_prepare.body.view >= c.pre_prepare.body.view => {}
                    _ => {
                        best.insert(seq, c);
                    }
                }
            }
        }
        let max_s = best.keys().next_back().copied().unwrap_or(min_s);
        (min_s + 1..=max_s)
            .map(|seq| {
                let value: Value =
                    best.get(&seq).map(|c| c.pre_prepare.body.value.clone()).unwrap_or_else(|| Arc::new(vec![]));
                let pp = PrePrepare { view: nv, seq, digest: sha256(&value), value };
                Signed { sig: self.auth.sign(&pp_bytes(&pp)), body: pp, from: self.id }
            })
            .collect()
    }

    fn on_new_view(&mut self, s: Signed<NewView>, out: &mut Vec<Action>) {
        let b = &s.body;
        if b.view < self.view || (b.view == self.view && !self.changing) {
            return;
        }
        let signers: BTreeSet<Rid> = b
            .view_changes
            .iter()
            .filter(|v| {
                v.body.new_view == b.view
                    && self.auth.verify(v.from, &vc_bytes(&v.body), &v.sig)
                    && self.valid_view_change(v)
            })
            .map(|v| v.from)
            .collect();
        if signers.len() < self.p.q() || b.view_changes.len() != signers.len() {
            return;
        }
        // Recompute the pre-prepares: a primary that lies here is ignored.
        let expect = self.compute_new_view_pre_prepares(b.view, &b.view_changes);
        if expect.len() != b.pre_prepares.len()
            || expect
                .iter()
                .zip(&b.pre_prepares)
                .any(|(e, g)| e.body != g.body || !self.auth.verify(g.from, &pp_bytes(&g.body), &g.sig))
        {
            out.push(Action::Evidence { culprit: s.from, what: "new-view with wrong pre-prepares", proof: None });
            return;
        }
        if b.view > self.view {
            self.view_change_cause = ViewChangeCause::NewView; // joined without asking
        }
        out.push(Action::Persist(self.view_record(b.view, false)));
        out.push(Action::Persist(Record::NewView(s.clone())));
        self.last_new_view = Some(s.clone());
        self.enter_view(s.body, out);
    }

    /// Enters the view `nv` starts (its view record and the new-view itself
    /// already persisted by the caller).
    fn enter_view(&mut self, nv: NewView, out: &mut Vec<Action>) {
        if self.primary(nv.view) == self.id {
            for pp in &nv.pre_prepares {
                out.push(Action::Persist(Record::PrePrepare(pp.clone())));
            }
        }
        self.view = nv.view;
        self.changing = false;
        self.assigned.clear();
        self.heard_from_primary();
        self.view_changes = self.view_changes.split_off(&(nv.view + 1));
        let min_s = nv.view_changes.iter().map(|v| v.body.stable_seq).max().unwrap_or(0);
        let max_s = nv.pre_prepares.last().map_or(min_s, |p| p.body.seq);
        self.next_seq = (max_s + 1).max(self.executed + 1);
        // Votes of older views no longer count; keep the slots' own history.
        for slot in self.log.values_mut() {
            slot.sent_prepare = false;
            slot.sent_commit = false;
        }
        self.timers.set(Timer::ViewChange, self.now_ms + self.timeout_ms);
        for pp in nv.pre_prepares {
            if pp.body.seq > self.executed {
                if let Some(slot) = self.log.get_mut(&pp.body.seq) {
                    slot.pre_prepare = None;
                }
                self.accept_pre_prepare(pp, out);
            }
        }
        self.try_propose(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct NoAuth;
    impl Auth for NoAuth {
        fn sign(&self, _: &[u8]) -> Vec<u8> {
            vec![]
        }
        fn verify(&self, _: Rid, _: &[u8], _: &[u8]) -> bool {
            true
        }
    }

    fn params() -> Params {
        Params {
            timeout_ms: 1000,
            timeout_min_ms: 500,
            timeout_max_ms: 2000,
            heartbeat_ms: 0,
            ..Params::manual_defaults(4)
        }
    }

    /// Delivers every message `out` sends and what the replies send, until
    /// quiet; messages to replicas in `down` are lost.
    fn pump(rs: &mut [Replica<NoAuth>], down: &[Rid], from: Rid, out: Vec<Action>) {
        pump_keeping(rs, down, from, out, &mut vec![vec![]; 4]);
    }

    /// `pump`, keeping each replica's persisted records in `kept`, and
    /// checking that a replica persists before it sends anything after.
    fn pump_keeping(rs: &mut [Replica<NoAuth>], down: &[Rid], from: Rid, out: Vec<Action>, kept: &mut [Vec<Record>]) {
        let mut queue: VecDeque<(Rid, Rid, Message)> = VecDeque::new();
        let route = |queue: &mut VecDeque<_>, kept: &mut [Vec<Record>], from: Rid, out: Vec<Action>| {
            for a in out {
                match a {
                    Action::Broadcast(m) => {
                        (0..4).filter(|&to| to != from).for_each(|to| queue.push_back((from, to, m.clone())))
                    }
                    Action::Send(to, m) => queue.push_back((from, to, m)),
                    Action::Persist(r) => kept[from].push(r),
                    _ => {}
                }
            }
        };
        route(&mut queue, kept, from, out);
        while let Some((_, to, m)) = queue.pop_front() {
            if down.contains(&to) {
                continue;
            }
            let mut out = vec![];
            rs[to].on_message(m, &mut out);
            route(&mut queue, kept, to, out);
        }
    }

    /// Found by a cluster test under load: a primary's first pre-prepare,
    /// made just after its retransmit timer fired, reached backups still
    /// starting and was dropped. Re-sent only when a whole interval had
    /// passed at a firing, it went out two intervals later: with the view
    /// timeout, too late, and the view changed at height 0.
    #[test]
    fn a_lost_pre_prepare_is_resent_at_the_next_retransmit_firing() {
        let p = Params { retransmit_ms: 1000, timeout_ms: 2000, ..params() };
        let mut primary = Replica::new(0, p, NoAuth);
        let mut out = vec![];
        primary.on_tick(10_000, &mut out); // the retransmit timer: next at 11_000
        out.clear();
        primary.set_time(10_005);
        primary.propose(Arc::new(vec![1; 8]), &mut out); // lost
        out.clear();
        primary.on_tick(11_000, &mut out);
        let resent = out.iter().any(|a| matches!(a, Action::Broadcast(Message::PrePrepare(pp)) if pp.body.seq == 1));
        assert!(resent, "re-sent at the first firing after it, before the 2 s view timeout: {out:?}");
    }

    /// Found by the whole-node simulator (seed 228545): a primary that
    /// restarted forgot the new-view that started its view, so a replica
    /// still changing into that view could never get it. It is persisted
    /// (before it is sent) and recovered.
    #[test]
    fn a_restarted_primary_still_gives_its_new_view_to_a_replica_changing_into_it() {
        let p = Params { retransmit_ms: 100, ..params() };
        let mut rs: Vec<Replica<NoAuth>> = (0..4).map(|i| Replica::new(i, p.clone(), NoAuth)).collect();
        let mut kept = vec![vec![]; 4];
        // Replica 3 is cut off; 0, 1 and 2 move to view 1, led by 1.
        for r in 0..3 {
            rs[r].set_time(10);
            if rs[r].view() == 0 {
                let mut out = vec![];
                rs[r].start_view_change(1, ViewChangeCause::Suspected, &mut out);
                pump_keeping(&mut rs, &[3], r, out, &mut kept);
            }
        }
        assert!((0..3).all(|r| rs[r].view() == 1 && !rs[r].is_changing()));
        for (r, records) in kept.iter().enumerate().take(3) {
            assert!(records.iter().any(|k| matches!(k, Record::NewView(nv) if nv.body.view == 1)), "replica {r}");
        }
        // The primary restarts from its log, then from its compacted log.
        for records in [kept[1].clone(), rs[1].durable_records()] {
            let mut back = Replica::recover(1, p.clone(), NoAuth, vec![], records);
            back.set_time(20);
            assert_eq!((back.view(), back.is_changing()), (1, false));
            assert_eq!(back.new_view_for(3).map(|nv| nv.body.view), Some(1), "it still has the new-view");
        }
        rs[1] = Replica::recover(1, p.clone(), NoAuth, vec![], kept[1].clone());
        // Replica 3 comes back changing into view 1 on its own. The restarted
        // primary's next proposal reaches it; it asks, and the answer (the
        // new-view) takes it into view 1.
        let mut out = vec![];
        rs[3].set_time(20);
        rs[3].start_view_change(1, ViewChangeCause::Suspected, &mut out);
        pump(&mut rs, &[0, 2], 3, out);
        assert!(rs[3].is_changing());
        let mut out = vec![];
        rs[1].set_time(20);
        rs[1].propose(Arc::new(vec![7; 8]), &mut out);
        pump(&mut rs, &[], 1, out);
        assert_eq!((rs[3].view(), rs[3].is_changing()), (1, false), "replica 3 entered view 1");
    }

    #[test]
    fn a_replica_restarted_in_an_old_view_asks_for_the_new_view_and_votes_again() {
        let p = Params { retransmit_ms: 100, ..params() };
        let mut rs: Vec<Replica<NoAuth>> = (0..4).map(|i| Replica::new(i, p.clone(), NoAuth)).collect();
        let value = |i: u8| -> Value { Arc::new(vec![i; 8]) };
        // Replica 3 is down; the others move to view 1 (primary 1) and commit.
        for r in 0..3 {
            rs[r].set_time(10);
            if rs[r].view() == 0 {
                let mut out = vec![];
                rs[r].start_view_change(1, ViewChangeCause::Suspected, &mut out);
                pump(&mut rs, &[3], r, out);
            }
        }
        assert!(
            (0..3).all(|r| rs[r].view() == 1 && !rs[r].changing),
            "{:?}",
            rs.iter().map(|r| (r.view(), r.changing)).collect::<Vec<_>>()
        );
        let mut out = vec![];
        rs[1].propose(value(1), &mut out);
        pump(&mut rs, &[3], 1, out);
        assert!((0..3).all(|r| rs[r].executed() == 1));
        // Replica 3 restarts with no memory of view 1. The primary's next
        // proposal reaches it; in view 0 it ignores it, asks the primary, and
        // gets the certificate it missed and the new-view.
        rs[3] = Replica::new(3, p.clone(), NoAuth);
        rs[3].set_time(20);
        assert_eq!(rs[3].view(), 0);
        let mut out = vec![];
        rs[1].set_time(20);
        rs[1].propose(value(2), &mut out);
        pump(&mut rs, &[], 1, out);
        assert_eq!((rs[3].view(), rs[3].changing), (1, false), "replica 3 joined view 1");
        // The proposal it ignored in view 0 comes with its next fetch.
        let mut out = vec![];
        rs[3].on_tick(20 + 2 * p.retransmit_ms, &mut out);
        pump(&mut rs, &[], 3, out);
        assert_eq!(rs[3].executed(), 2, "and caught up");
        // It votes again: with replica 0 down, 1, 2 and 3 commit the next value.
        let mut out = vec![];
        rs[1].propose(value(3), &mut out);
        pump(&mut rs, &[0], 1, out);
        assert!([1, 2, 3].iter().all(|&r| rs[r].executed() == 3), "a quorum with the restarted replica commits");
        // A second ask within the retransmit interval gets no second new-view.
        assert!(rs[1].new_view_for(3).is_none());
        rs[1].set_time(20 + p.retransmit_ms);
        assert!(rs[1].new_view_for(3).is_some());
    }

    #[test]
    fn a_replica_behind_an_idle_primary_fetches_when_its_heartbeat_says_so() {
        let p = Params { retransmit_ms: 100, ..params() };
        let mut r = Replica::new(3, p, NoAuth);
        let hb = |executed| {
            Message::Heartbeat(Signed { body: Heartbeat { view: 0, executed, epoch: 0 }, from: 0, sig: vec![] })
        };
        let fetches = |out: &[Action]| {
            out.iter().filter(|a| matches!(a, Action::Send(0, Message::Fetch { from: 3, from_seq: 1 }))).count()
        };
        let mut out = vec![];
        r.set_time(500);
        r.on_message(hb(0), &mut out);
        assert_eq!(fetches(&out), 0, "level with the primary");
        r.on_message(hb(7), &mut out);
        assert_eq!(fetches(&out), 1, "seven behind: fetch from the primary");
        r.on_message(hb(7), &mut out);
        assert_eq!(fetches(&out), 1, "not twice within a retransmit interval");
        r.set_time(600);
        r.on_message(hb(7), &mut out);
        assert_eq!(fetches(&out), 2);
    }

    /// Replica `id`, having executed seq 1 (view 0) from a certificate.
    fn executed_one(id: Rid, p: &Params) -> Replica<NoAuth> {
        let mut r = Replica::new(id, p.clone(), NoAuth);
        r.on_message(Message::Committed(commit_cert(p, 1, b"v")), &mut vec![]);
        r
    }

    /// A view-0 certificate for `value` at `seq`: primary 0's pre-prepare
    /// and a quorum of commits.
    fn commit_cert(p: &Params, seq: Seq, value: &[u8]) -> CommitCert {
        let value: Value = Arc::new(value.to_vec());
        let pp = PrePrepare { view: 0, seq, digest: crate::sha256(&value), value };
        let commits = (0..p.q())
            .map(|i| Signed {
                body: Vote { phase: Phase::Commit, view: 0, seq, digest: pp.digest },
                from: i,
                sig: vec![],
            })
            .collect();
        CommitCert { pre_prepare: Signed { body: pp, from: 0, sig: vec![] }, commits }
    }

    #[test]
    fn a_primary_whose_heartbeats_stall_behind_is_sent_the_certificates_it_lacks() {
        let p = Params { retransmit_ms: 100, ..params() };
        let mut r = executed_one(3, &p);
        assert_eq!(r.executed(), 1);
        let hb = |executed| {
            Message::Heartbeat(Signed { body: Heartbeat { view: 0, executed, epoch: 0 }, from: 0, sig: vec![] })
        };
        let sent = |out: &[Action]| out.iter().filter(|a| matches!(a, Action::Send(0, Message::Committed(_)))).count();
        let mut out = vec![];
        r.set_time(500);
        r.on_message(hb(0), &mut out);
        r.set_time(550);
        r.on_message(hb(0), &mut out);
        assert_eq!(sent(&out), 0, "behind for less than a retransmit interval: it may be catching up");
        r.set_time(600);
        r.on_message(hb(0), &mut out);
        assert_eq!(sent(&out), 1, "stalled behind: the certificate it lacks");
        r.on_message(hb(0), &mut out);
        assert_eq!(sent(&out), 1, "once per interval");
        r.set_time(700);
        r.on_message(hb(1), &mut out);
        r.set_time(900);
        r.on_message(hb(1), &mut out);
        assert_eq!(sent(&out), 1, "level: nothing to send");
    }

    /// Seed 74010 of the whole-node simulator: a validator entered view v
    /// before executing the block that excluded a leader, so it takes
    /// itself for v's primary and heartbeats as one, behind the others in
    /// an idle cluster. It is not their primary, yet they send it the
    /// certificates it lacks (and it fetches from them): executing them,
    /// it learns the exclusion, which it applies at the next view change.
    #[test]
    fn heartbeats_from_a_validator_that_is_not_the_primary_still_catch_it_up() {
        let p = Params { retransmit_ms: 100, ..params() };
        let mut r = executed_one(3, &p);
        // Replica 2 heartbeats view 0 as if it led it, stalled at 0.
        let hb = |executed| {
            Message::Heartbeat(Signed { body: Heartbeat { view: 0, executed, epoch: 0 }, from: 2, sig: vec![] })
        };
        let sent = |out: &[Action]| out.iter().filter(|a| matches!(a, Action::Send(2, Message::Committed(_)))).count();
        let mut out = vec![];
        r.set_time(500);
        r.on_message(hb(0), &mut out);
        r.set_time(600);
        r.on_message(hb(0), &mut out);
        assert_eq!(sent(&out), 1, "the certificate it lacks");
        // And a replica behind such a validator fetches from it.
        let mut behind = Replica::new(1, p, NoAuth);
        let mut out = vec![];
        behind.set_time(500);
        behind.on_message(hb(4), &mut out);
        assert!(out.iter().any(|a| matches!(a, Action::Send(2, Message::Fetch { from: 1, from_seq: 1 }))), "{out:?}");
    }

    /// A replica that just executed (so not stalled) but holds no
    /// pre-prepare for its next seq, while the primary's heartbeat says
    /// that seq executed, missed it for good: it fetches at once (once per
    /// interval, or again once execution moved), not after a stall as long
    /// as a short view-change timeout. One that holds the pre-prepare is
    /// just behind and waits, until the next heartbeat says the same.
    #[test]
    fn a_replica_missing_its_next_pre_prepare_fetches_at_the_primarys_next_heartbeat() {
        let p = Params { retransmit_ms: 1000, ..params() };
        let hb = |executed| {
            Message::Heartbeat(Signed { body: Heartbeat { view: 0, executed, epoch: 0 }, from: 0, sig: vec![] })
        };
        let fetches = |out: &[Action], from_seq| {
            out.iter()
                .filter(|a| matches!(a, Action::Send(0, Message::Fetch { from: 3, from_seq: s }) if *s == from_seq))
                .count()
        };
        let mut gap = executed_one(3, &p);
        let mut out = vec![];
        gap.set_time(200);
        gap.on_message(hb(5), &mut out);
        assert_eq!(fetches(&out, 2), 1, "{out:?}");
        gap.set_time(400);
        gap.on_message(hb(5), &mut out);
        assert_eq!(fetches(&out, 2), 1, "once per interval");
        gap.set_time(1200);
        gap.on_message(hb(5), &mut out);
        assert_eq!(fetches(&out, 2), 2, "again after an interval");
        // The fetch brings seq 2 only (the primary had executed no more when
        // it answered): the gap at 3 is fetched at the next heartbeat.
        gap.on_message(Message::Committed(commit_cert(&p, 2, b"w")), &mut out);
        assert_eq!(gap.executed(), 2);
        gap.set_time(1400);
        gap.on_message(hb(5), &mut out);
        assert_eq!(fetches(&out, 3), 1, "execution moved: fetch again at once: {out:?}");

        let mut behind = executed_one(3, &p);
        let value: Value = Arc::new(b"w".to_vec());
        let pp = PrePrepare { view: 0, seq: 2, digest: crate::sha256(&value), value };
        let mut out = vec![];
        behind.set_time(200);
        behind.on_message(Message::PrePrepare(Signed { body: pp, from: 0, sig: vec![] }), &mut out);
        behind.on_message(hb(5), &mut out);
        assert_eq!(fetches(&out, 2), 0, "it holds seq 2 and waits for its votes: {out:?}");
        behind.set_time(400);
        behind.on_message(hb(5), &mut out);
        assert_eq!(fetches(&out, 2), 1, "a heartbeat later, the votes went by: fetch");
    }

    #[test]
    fn a_deadline_the_application_asked_for_lapses_when_its_work_is_gone() {
        let mut r = Replica::new(1, params(), NoAuth);
        r.set_time(100);
        r.expect_progress();
        assert!(r.timers.is_set(Timer::ViewChange));
        r.expect_nothing();
        assert!(!r.timers.is_set(Timer::ViewChange), "no work left: no view change for it");
        // A pre-prepare waiting to execute keeps its deadline.
        let value: Value = Arc::new(b"v".to_vec());
        let pp = PrePrepare { view: 0, seq: 1, digest: crate::sha256(&value), value };
        let mut out = vec![];
        r.on_message(Message::PrePrepare(Signed { body: pp, from: 0, sig: vec![] }), &mut out);
        assert!(r.timers.is_set(Timer::ViewChange));
        r.expect_nothing();
        assert!(r.timers.is_set(Timer::ViewChange));
    }

    #[test]
    fn poll_timeout_is_the_earliest_timer_that_applies() {
        let p = Params { heartbeat_ms: 100, retransmit_ms: 1_000, missed_heartbeats: 6, ..params() };
        let (mut primary, mut backup) = (Replica::new(0, p.clone(), NoAuth), Replica::new(1, p.clone(), NoAuth));
        let mut out = vec![];
        assert_eq!(backup.poll_timeout_ms(), 0, "never ticked: due at once");
        let t = 10_000;
        primary.on_tick(t, &mut out);
        backup.on_tick(t, &mut out);
        assert_eq!(primary.poll_timeout_ms(), t + 100, "the primary's next heartbeat");
        assert_eq!(backup.poll_timeout_ms(), t + 601, "silent after six missed heartbeats");
        // Before it, a tick does nothing; at it, the backup changes view.
        out.clear();
        backup.on_tick(t + 600, &mut out);
        assert!(out.is_empty() && !backup.is_changing(), "{out:?}");
        backup.on_tick(t + 601, &mut out);
        assert!(backup.is_changing());
        // Changing: no heartbeat watch; the retransmit of its view change.
        assert_eq!(backup.poll_timeout_ms(), t + 1_000);
        // Work makes the view-change deadline apply when it is earliest.
        let q = Params { heartbeat_ms: 0, timeout_ms: 500, timeout_min_ms: 500, ..p };
        let mut r = Replica::new(1, q, NoAuth);
        r.on_tick(t, &mut out);
        assert_eq!(r.poll_timeout_ms(), t + 1_000, "only the retransmit timer");
        r.propose(Arc::new(vec![1]), &mut out);
        assert_eq!(r.poll_timeout_ms(), t + 500, "the view-change deadline");
    }

    #[test]
    fn replica_time_never_runs_backwards() {
        let p = Params { heartbeat_ms: 100, retransmit_ms: 100, ..params() };
        let mut r = Replica::new(0, p, NoAuth);
        let beats =
            |out: &[Action]| out.iter().filter(|a| matches!(a, Action::Broadcast(Message::Heartbeat(_)))).count();
        let mut out = vec![];
        let t = 1_800_000_000_000; // a wall clock's milliseconds
        r.on_tick(t, &mut out);
        assert_eq!(beats(&out), 1, "the primary's first heartbeat");
        // The clock steps back an hour: no timer re-fires for the old times.
        out.clear();
        r.on_tick(t - 3_600_000, &mut out);
        assert_eq!(beats(&out), 0);
        assert_eq!(r.now_ms, t);
        r.on_tick(t + 100, &mut out);
        assert_eq!(beats(&out), 1, "the next heartbeat comes on the replica's own time");
    }

    #[test]
    fn how_far_the_cluster_is_takes_f_plus_one_others_and_no_faulty_one_alone() {
        let mut r = Replica::new(0, params(), NoAuth);
        let mut out = vec![];
        let interval = r.p.checkpoint_interval;
        let checkpoint = |r: &mut Replica<NoAuth>, out: &mut Vec<Action>, from: Rid, seq: Seq| {
            let c = Checkpoint { seq, state: [seq as u8; 32], app: [0; 32] };
            r.on_message(Message::Checkpoint(Signed { body: c, from, sig: vec![] }), out);
        };
        assert_eq!(r.cluster_executed(), 0);
        // One replica (possibly faulty) claims it is far ahead: not enough.
        checkpoint(&mut r, &mut out, 3, 50 * interval);
        assert_eq!(r.cluster_executed(), 0);
        // f + 1 = 2 others at 3 intervals: one of them is honest.
        checkpoint(&mut r, &mut out, 1, 3 * interval);
        checkpoint(&mut r, &mut out, 2, 3 * interval);
        assert_eq!(r.cluster_executed(), 3 * interval);
        // The newest seq two others vouch for counts, not the oldest.
        checkpoint(&mut r, &mut out, 1, 5 * interval);
        checkpoint(&mut r, &mut out, 3, 5 * interval);
        assert_eq!(r.cluster_executed(), 5 * interval);
        assert_eq!(r.executed(), 0, "this replica executed nothing: it is that far behind");
    }

    #[test]
    fn a_faulty_replica_cannot_grow_the_checkpoint_or_view_change_maps() {
        let mut r = Replica::new(0, params(), NoAuth);
        let mut out = vec![];
        let interval = r.p.checkpoint_interval;
        // Replica 3 signs checkpoints for a thousand future slots, and some
        // off the interval.
        for k in 1..=1000u64 {
            for seq in [k * interval, k * interval + 1] {
                let c = Checkpoint { seq, state: [k as u8; 32], app: [0; 32] };
                r.on_message(Message::Checkpoint(Signed { body: c, from: 3, sig: vec![] }), &mut out);
            }
        }
        let max = r.max_checkpoints_per_replica();
        assert_eq!(r.checkpoints.len(), max, "its newest {max} only");
        assert_eq!(*r.checkpoints.keys().next().unwrap(), (1001 - max as u64) * interval);
        // An honest checkpoint still counts beside them.
        let c = Checkpoint { seq: interval, state: [9; 32], app: [0; 32] };
        r.on_message(Message::Checkpoint(Signed { body: c, from: 1, sig: vec![] }), &mut out);
        assert!(r.checkpoints[&interval].contains_key(&1));
        // View changes for a thousand views: one entry, its highest.
        for v in 1..=1000u64 {
            let vc = ViewChange { new_view: v, stable_seq: 0, stable_proof: vec![], prepared: vec![] };
            r.on_message(Message::ViewChange(Signed { body: vc, from: 3, sig: vec![] }), &mut out);
        }
        assert_eq!(r.view_changes.len(), 1);
        assert!(r.view_changes[&1000].contains_key(&3));
        // A lower one after it is stale.
        let vc = ViewChange { new_view: 5, stable_seq: 0, stable_proof: vec![], prepared: vec![] };
        r.on_message(Message::ViewChange(Signed { body: vc, from: 3, sig: vec![] }), &mut out);
        assert_eq!(r.view_changes.keys().copied().collect::<Vec<_>>(), vec![1000]);
        assert_eq!(r.view(), 0, "one replica alone moves no one");
    }

    #[test]
    fn aimd_timeout_grows_by_factor_and_is_clamped() {
        let mut r = Replica::new(0, params(), NoAuth);
        let mut out = vec![];
        r.propose(Arc::new(b"x".to_vec()), &mut out);
        let mut now = 0;
        let mut seen = vec![];
        for _ in 0..3 {
            now += r.timeout_ms();
            r.on_tick(now, &mut out);
            seen.push(r.timeout_ms());
            // Alone, it does not race on: no timer until a quorum asks too.
            let view = r.view();
            r.on_tick(now + 10 * r.timeout_ms(), &mut out);
            assert_eq!(r.view(), view);
            for from in [2, 3] {
                let vc = ViewChange { new_view: view, stable_seq: 0, stable_proof: vec![], prepared: vec![] };
                r.on_message(Message::ViewChange(Signed { body: vc, from, sig: vec![] }), &mut out);
            }
            now += 10 * r.timeout_ms();
        }
        assert_eq!(seen, vec![1500, 2000, 2000]);
        assert_eq!(r.view(), 3);
    }

    #[test]
    fn proposals_of_the_view_count_as_heartbeats_and_silence_does_not() {
        // Heartbeats every 500 ms, 6 missed = 3 s; the progress deadline far off.
        let p = Params {
            heartbeat_ms: 500,
            timeout_ms: 60_000,
            timeout_min_ms: 60_000,
            timeout_max_ms: 60_000,
            ..params()
        };
        let mut r = Replica::new(1, p, NoAuth);
        let mut out = vec![];
        r.on_tick(0, &mut out);
        let changing = |out: &[Action]| out.iter().any(|a| matches!(a, Action::Broadcast(Message::ViewChange(_))));
        // Only proposals from the primary (no heartbeat) for 8 s: it is alive.
        for t in 1..=8u64 {
            r.set_time(t * 1000);
            let value: Value = Arc::new(t.to_be_bytes().to_vec());
            let pp = PrePrepare { view: 0, seq: t, digest: crate::sha256(&value), value };
            r.on_message(Message::PrePrepare(Signed { body: pp, from: 0, sig: vec![] }), &mut out);
            r.on_tick(t * 1000, &mut out);
            assert!(!changing(&out), "view change at {t} s with proposals arriving");
        }
        // Then silence past 3 s: the backup moves to view 1.
        r.on_tick(8000 + 3001, &mut out);
        assert!(changing(&out), "a silent primary is replaced");
    }

    #[test]
    fn only_what_stalled_for_an_interval_is_retransmitted() {
        let p = Params {
            retransmit_ms: 1000,
            timeout_ms: 60_000,
            timeout_min_ms: 60_000,
            timeout_max_ms: 60_000,
            ..params()
        };
        let mut r = Replica::new(1, p, NoAuth);
        let pp = |seq: Seq| {
            let value: Value = Arc::new(seq.to_be_bytes().to_vec());
            Message::PrePrepare(Signed {
                body: PrePrepare { view: 0, seq, digest: crate::sha256(&value), value },
                from: 0,
                sig: vec![],
            })
        };
        let vote = |phase, seq: Seq, from| {
            let digest = crate::sha256(&seq.to_be_bytes());
            Message::Vote(Signed { body: Vote { phase, view: 0, seq, digest }, from, sig: vec![] })
        };
        // (pre-prepares re-sent, votes re-sent, fetch asked) by a tick at `now`.
        let tick = |r: &mut Replica<NoAuth>, now| {
            let mut out = vec![];
            r.on_tick(now, &mut out);
            let (mut pps, mut votes, mut fetch) = (vec![], vec![], false);
            for a in out {
                match a {
                    Action::Broadcast(Message::PrePrepare(s)) => pps.push(s.body.seq),
                    Action::Broadcast(Message::Vote(v)) => votes.push(v.body.seq),
                    Action::Broadcast(Message::Fetch { .. }) => fetch = true,
                    _ => {}
                }
            }
            (pps, votes, fetch)
        };
        let mut out = vec![];
        assert_eq!(tick(&mut r, 0), (vec![], vec![], false));
        r.set_time(0);
        r.on_message(pp(1), &mut out);
        r.set_time(600);
        r.on_message(pp(2), &mut out);
        // Slot 1 sat a full interval; slot 2 is young; nothing executed yet.
        assert_eq!(tick(&mut r, 1000), (vec![1], vec![1], true));
        // Slot 1 commits at 1500 (prepares and commits from 2 and 3).
        r.set_time(1500);
        for from in [2, 3] {
            r.on_message(vote(Phase::Prepare, 1, from), &mut out);
        }
        for from in [2, 3] {
            r.on_message(vote(Phase::Commit, 1, from), &mut out);
        }
        assert!(out.iter().any(|a| matches!(a, Action::Execute { seq: 1, .. })));
        // Now slot 2 has stalled; execution moved 500 ms ago: no fetch.
        assert_eq!(tick(&mut r, 2000), (vec![2], vec![2], false));
        // Nothing moves for another interval: slot 2 again, and a fetch.
        assert_eq!(tick(&mut r, 3000), (vec![2], vec![2], true));
    }

    #[test]
    fn a_recovered_replica_never_votes_for_a_second_value_in_a_slot() {
        let pp = |v: &[u8]| {
            let value: Value = Arc::new(v.to_vec());
            Message::PrePrepare(Signed {
                body: PrePrepare { view: 0, seq: 1, digest: crate::sha256(&value), value },
                from: 0,
                sig: vec![],
            })
        };
        let mut r = Replica::new(1, params(), NoAuth);
        let mut out = vec![];
        r.on_message(pp(b"x"), &mut out);
        let records: Vec<Record> =
            out.iter().filter_map(|a| if let Action::Persist(r) = a { Some(r.clone()) } else { None }).collect();
        // The prepare is persisted before it is broadcast.
        let persist = out.iter().position(|a| matches!(a, Action::Persist(Record::Vote(_)))).expect("vote persisted");
        let send = out.iter().position(|a| matches!(a, Action::Broadcast(Message::Vote(_)))).expect("vote sent");
        assert!(persist < send);
        // Crash: rebuild from the records; an equivocating primary tries again.
        let mut r = Replica::recover(1, params(), NoAuth, vec![], records);
        let mut out = vec![];
        r.on_message(pp(b"y"), &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::Broadcast(Message::Vote(_)))), "voted twice: {out:?}");
        // Without the records it would have voted: the test can fail.
        let mut fresh = Replica::new(1, params(), NoAuth);
        let mut out = vec![];
        fresh.on_message(pp(b"y"), &mut out);
        assert!(out.iter().any(|a| matches!(a, Action::Broadcast(Message::Vote(_)))));
    }

    /// Found by the whole-node simulator (seed 146565): a failed sync kept
    /// a new primary's `NewView` record and lost the pre-prepare records
    /// after it. Recovered, the primary re-sent that new-view and proposed
    /// afresh at one of its seqs: two pre-prepares for one (view, seq), and
    /// an honest validator quarantined.
    #[test]
    fn a_primary_recovered_from_its_new_view_alone_never_reuses_its_seqs() {
        let value: Value = Arc::new(b"re-proposed".to_vec());
        let pp = PrePrepare { view: 1, seq: 1, digest: crate::sha256(&value), value };
        let nv =
            NewView { view: 1, view_changes: vec![], pre_prepares: vec![Signed { body: pp, from: 1, sig: vec![] }] };
        let records = vec![
            Record::View { view: 1, changing: false, excluded: None },
            Record::NewView(Signed { body: nv, from: 1, sig: vec![] }),
        ];
        let mut r = Replica::recover(1, params(), NoAuth, vec![], records);
        assert!(r.is_primary());
        assert!(r.log.get(&1).and_then(|s| s.pre_prepare.as_ref()).is_some(), "the new-view's slot is filled");
        let mut out = vec![];
        r.propose(Arc::new(b"fresh".to_vec()), &mut out);
        let seqs: Vec<Seq> = out
            .iter()
            .filter_map(|a| match a {
                Action::Broadcast(Message::PrePrepare(s)) => Some(s.body.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![2], "{out:?}");
    }

    /// Found by the whole-node simulator (seed 694698751374): recovery
    /// dropped the prepared certificates of seqs the block store had
    /// already executed, so the replica's next view change left them out
    /// and a new primary could fill those committed seqs with null values.
    /// PBFT §4.4: a view change carries every value prepared above the
    /// stable checkpoint, executed or not.
    #[test]
    fn a_recovered_replica_reports_executed_prepared_values_in_its_view_change() {
        let value: Value = Arc::new(b"committed".to_vec());
        let pp =
            Signed { body: PrePrepare { view: 0, seq: 1, digest: crate::sha256(&value), value }, from: 0, sig: vec![] };
        let vote =
            |phase, from| Signed { body: Vote { phase, view: 0, seq: 1, digest: pp.body.digest }, from, sig: vec![] };
        let prepared =
            PreparedCert { pre_prepare: pp.clone(), prepares: vec![vote(Phase::Prepare, 2), vote(Phase::Prepare, 3)] };
        let commit = CommitCert { pre_prepare: pp.clone(), commits: (1..4).map(|f| vote(Phase::Commit, f)).collect() };
        // Executed (the block store holds seq 1), no stable checkpoint yet.
        let mut r = Replica::recover(1, params(), NoAuth, vec![(commit, [7; 32])], vec![Record::Prepared(prepared)]);
        assert_eq!(r.executed(), 1);
        let mut out = vec![];
        r.suspect_primary(&mut out);
        let reported: Vec<Seq> = out
            .iter()
            .find_map(|a| match a {
                Action::Broadcast(Message::ViewChange(v)) => {
                    Some(v.body.prepared.iter().map(|c| c.pre_prepare.body.seq).collect())
                }
                _ => None,
            })
            .expect("a view change was sent");
        assert_eq!(reported, vec![1], "{out:?}");
    }

    /// Found by the whole-node simulator (seed 21793): a crash tore the
    /// log after the `View { changing }` record and before the view change
    /// itself. Recovered, the replica changed view without a view change of
    /// its own, so it never retransmitted one and, with others like it, the
    /// quorum that starts the timer never formed.
    #[test]
    fn a_replica_recovered_mid_view_change_without_its_view_change_sends_one() {
        let mut r = Replica::new(1, params(), NoAuth);
        let mut out = vec![];
        r.suspect_primary(&mut out);
        let records: Vec<Record> =
            out.iter().filter_map(|a| if let Action::Persist(r) = a { Some(r.clone()) } else { None }).collect();
        assert!(matches!(records.as_slice(), [Record::View { view: 1, changing: true, .. }, Record::ViewChange(_)]));
        // The torn tail keeps the first record only.
        let mut r = Replica::recover(1, params(), NoAuth, vec![], records[..1].to_vec());
        assert!(r.is_changing() && r.view() == 1);
        let mut out = vec![];
        r.on_tick(1, &mut out);
        let sent = out.iter().any(|a| matches!(a, Action::Broadcast(Message::ViewChange(v)) if v.body.new_view == 1));
        let kept = out.iter().any(|a| matches!(a, Action::Persist(Record::ViewChange(_))));
        assert!(sent && kept, "{out:?}");
        // With both records it has one already: nothing new is signed.
        let mut whole = Replica::recover(1, params(), NoAuth, vec![], records);
        let mut out = vec![];
        whole.on_tick(1, &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::Persist(Record::ViewChange(_)))), "{out:?}");
    }

    /// Found by the whole-node simulator (seed 55348): a validator restarted
    /// inside a view applied the exclusions its chain showed at once, so it
    /// had another primary for the current view than the others (itself),
    /// and waited as that view's primary for ever. Who may lead a view is
    /// recorded on entering it; recovered, that set leads the current view.
    #[test]
    fn a_recovered_replica_keeps_the_primary_its_view_was_entered_with() {
        let mut r = Replica::new(3, params(), NoAuth);
        r.exclude_from_next_view([1]);
        let mut out = vec![];
        r.suspect_primary(&mut out);
        assert_eq!((r.view(), r.primary(1)), (1, 2), "1 excluded: view 1 is led by 2");
        let records: Vec<Record> =
            out.iter().filter_map(|a| if let Action::Persist(r) = a { Some(r.clone()) } else { None }).collect();
        let mut back = Replica::recover(3, params(), NoAuth, vec![], records.clone());
        assert!(back.excluded_recorded());
        // The chain, replayed, shows nobody excluded now: that waits for view 2.
        back.exclude_from_next_view([]);
        assert_eq!(back.primary(1), 2, "the same primary as before the restart");
        // A record from before exclusions were kept: the caller's set applies.
        let old: Vec<Record> = records
            .into_iter()
            .map(|rec| match rec {
                Record::View { view, changing, .. } => Record::View { view, changing, excluded: None },
                rec => rec,
            })
            .collect();
        assert!(!Replica::recover(3, params(), NoAuth, vec![], old).excluded_recorded());
    }

    /// A new-view that is not accepted (here: without a quorum of view
    /// changes) must not apply the pending exclusions: they would change
    /// who leads the view this replica stays in.
    #[test]
    fn a_refused_new_view_leaves_the_current_primary_alone() {
        let mut r = Replica::new(3, params(), NoAuth);
        r.exclude_from_next_view([0]);
        let body = NewView { view: 1, view_changes: vec![], pre_prepares: vec![] };
        let mut out = vec![];
        r.on_message(Message::NewView(Signed { body, from: 2, sig: vec![] }), &mut out);
        assert_eq!((r.view(), r.primary(0)), (0, 0), "still view 0, still led by 0");
    }

    #[test]
    fn round_robin_skips_excluded_and_caps_exclusions_at_f() {
        let mut r = Replica::new(0, params(), NoAuth);
        assert_eq!((0..5).map(|v| r.primary(v)).collect::<Vec<_>>(), vec![0, 1, 2, 3, 0]);
        r.set_excluded([2]);
        assert_eq!((0..4).map(|v| r.primary(v)).collect::<Vec<_>>(), vec![0, 1, 3, 0]);
        r.set_excluded([1, 2]); // f = 1: only one may be excluded
        assert_eq!((0..3).map(|v| r.primary(v)).collect::<Vec<_>>(), vec![0, 2, 3]);
    }
}
