//! The persistence thread (`storage` in `top -H`): makes the core's records and blocks durable, then
//! sends and publishes what waited for them, so the core thread never waits
//! for a disk.
//!
//! ```text
//! core ── Job (FIFO, bounded: JOBS_QUEUED_MAX) ──▶ persistence thread
//!   per group of queued jobs:
//!     consensus.log append + fdatasync (every record of the group)
//!     effects that touch the store or the audit log (joins, fetch serving, snapshots)
//!     sends, in order (a checkpoint after a block of the group waits for step 4)
//!     block store append + fdatasync (every block of the group)
//!     checkpoints, then publish: Kafka offsets, commit events, mirror, notices
//!   once a second: retention (pruning), disk space; feeds catch up from the store
//! ```
//! The durability rules of DESIGN.md hold as before: a record is durable
//! before any message sent after it (every send of a group follows the
//! group's log sync), and a block is published and checkpointed only after
//! its sync returns. The core runs ahead by at most `JOBS_QUEUED_MAX` jobs:
//! a slow disk stops the core, never grows a queue. The replica's state
//! itself does not wait: execution is deterministic and a crash before a
//! sync loses nothing a peer saw (nothing was sent on it).

use super::{commit_frame, disk_space, now_ms, RuntimeStats, Served, Shared};
use crate::edges::consensus_log::ConsensusLog;
use crate::edges::framed::write_atomically;
use crate::edges::kafka::OffsetTracker;
use crate::edges::net::NetSender;
use crate::edges::store::BlockStore;
use crate::proto;
use crate::protocol::block::Block;
use crate::protocol::consensus::pbft::{CommitCert, Message, Record, Rid, Seq};
use crate::protocol::consensus::wire::{self, WireLimits};
use crate::protocol::node::{Output, Ready};
use crate::protocol::snapshot;
use crate::runtime::recovery::stored_cert;
use anyhow::Context;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

/// Jobs the core may queue ahead of the disk. Each is one pass of the core
/// (a few messages, at most a window of blocks); 64 passes is far more than
/// one sync takes to come back, so the queue fills only when the disk falls
/// behind, and then the core waits for it.
pub(super) const JOBS_QUEUED_MAX: usize = 64;

/// Jobs taken into one group (one log sync, one store sync).
const GROUP_JOBS_MAX: usize = JOBS_QUEUED_MAX;

/// How often the thread looks at its feeds and timers when no job comes.
const IDLE_POLL_INTERVAL_MS: u64 = 20;

/// Retention and disk-space figures, this often.
const HOUSEKEEPING_INTERVAL_MS: u64 = 1_000;

/// What the core hands the persistence thread, in its order.
pub(super) enum Job {
    /// One pass's outputs that wait for a sync or touch the store: records,
    /// sends, commits, checkpoints and store-side effects.
    Ready { ready: Ready, executed_ms: u64 },
    /// Rewrite the consensus log with the replica's durable records (sent
    /// at a stable checkpoint once `Persistence::compact_wanted` was raised).
    Compact(Vec<Record>),
}

/// Where messages go: the transport's sending half and the replica →
/// validator id map. Both threads have one.
#[derive(Clone)]
pub(super) struct Outbox {
    pub net: Option<NetSender>,
    pub ids: Arc<[u32]>,
}

impl Outbox {
    pub fn send_frame(&self, to: Rid, frame: Vec<u8>) {
        if let Some(net) = &self.net {
            net.send(self.ids[to], Arc::new(frame));
        }
    }
    pub fn broadcast_frame(&self, frame: Vec<u8>) {
        if let Some(net) = &self.net {
            net.broadcast(Arc::new(frame));
        }
    }
    pub fn send(&self, to: Rid, m: &Message) {
        self.send_frame(to, wire::encode(m));
    }
    pub fn broadcast(&self, m: &Message) {
        self.broadcast_frame(wire::encode(m));
    }
    pub fn send_to(&self, to: Option<Rid>, m: &Message) {
        match to {
            Some(to) => self.send(to, m),
            None => self.broadcast(m),
        }
    }
    pub fn send_bodies(&self, to: Rid, seq: Seq, txs: &[Arc<crate::protocol::event::Event>]) {
        for frame in wire::encode_tx_bodies(seq, txs) {
            self.send_frame(to, frame);
        }
    }
}

/// The persistence thread's state: the files, and the feeds fed from them.
pub(super) struct Persistence {
    /// None with one validator (no one to vote twice to).
    pub log: Option<ConsensusLog>,
    pub store: BlockStore,
    pub out: Outbox,
    pub wire: WireLimits,
    /// Log size that triggers compaction at a stable checkpoint (see
    /// `next_compaction_at`), and the configured floor of it.
    pub compact_at: u64,
    pub compact_min: u64,
    /// Raised once the log outgrew `compact_at`; the core answers at its
    /// next stable checkpoint with `Job::Compact`.
    pub compact_wanted: Arc<AtomicBool>,
    /// The encoded chain snapshot served to joining validators, by height.
    pub served: Served,
    /// Where a joined snapshot is kept (`blocks.base`).
    pub base_path: std::path::PathBuf,
    /// The data directory (its file system's free space is a metric).
    pub data_dir: std::path::PathBuf,
    /// To the thread that writes `snapshot.bin`, and whether to keep it as
    /// `blocks.base` too (pruning moves the base up).
    pub snapshot_writer: Option<SyncSender<(Box<snapshot::Recorded>, bool)>>,
    /// STORAGE_RETAIN_BLOCKS and STORAGE_RETAIN_BYTES (0: no such limit).
    pub retain_blocks: u64,
    pub retain_bytes: u64,
    /// The height of the snapshot last kept as `blocks.base` by the writer.
    pub base_kept: Arc<AtomicU64>,
    /// Cursor files of the downstream feeds (pruning stays below them).
    pub feed_cursors: Vec<std::path::PathBuf>,
    /// Commit events to publish (Kafka).
    pub egress: Option<BlockFeed<crate::edges::egress::HeightEvents>>,
    /// Blocks to mirror into the database.
    pub mirror: Option<BlockFeed<crate::edges::persist::MirrorBlock>>,
    /// Kafka source: committed txs finish their messages.
    pub tracker: Option<Arc<OffsetTracker>>,
    /// The HMAC-chained audit log (AUDIT_SIGNING_KEY set).
    pub audit: Option<crate::edges::audit::AuditLog>,
    /// This validator's replica id (to recognise its own proposals).
    pub me: Rid,
}

/// Runs the thread until the core drops its end of `jobs`; every job
/// queued by then is carried out first.
pub(super) fn run(mut p: Persistence, jobs: Receiver<Job>, sh: &Shared) -> anyhow::Result<()> {
    let mut next_housekeeping_ms = 0u64;
    let mut open = true;
    // A job that starts the next group (see below).
    let mut carried: Option<Job> = None;
    while open || carried.is_some() {
        let mut group = vec![];
        let mut compact = None;
        let first = match carried.take() {
            Some(job) => Some(job),
            None => match jobs.recv_timeout(Duration::from_millis(IDLE_POLL_INTERVAL_MS)) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            },
        };
        // Everything already queued joins the group, but for two jobs that
        // close it: a compaction (records queued after it go into the new
        // log), and a pass with effects after a pass with blocks (effects
        // see the store as their pass left it: a snapshot is kept as the
        // store's base only once its block is stored).
        let mut next = first;
        let mut blocks = false;
        while let Some(job) = next.take() {
            match job {
                Job::Ready { ready, executed_ms } if blocks && !ready.effects.is_empty() => {
                    carried = Some(Job::Ready { ready, executed_ms });
                    break;
                }
                Job::Ready { ready, executed_ms } => {
                    blocks |= !ready.commits.is_empty();
                    group.push((ready, executed_ms));
                }
                Job::Compact(records) => {
                    compact = Some(records);
                    break;
                }
            }
            if group.len() < GROUP_JOBS_MAX {
                next = jobs.try_recv().ok();
            }
        }
        if !group.is_empty() {
            p.perform(group, sh)?;
        }
        if let Some(records) = compact {
            p.compact(&records)?;
        }
        p.catch_up_feeds()?;
        if let Some(a) = p.audit.as_mut() {
            a.flush()?;
        }
        let now = now_ms();
        if now >= next_housekeeping_ms {
            next_housekeeping_ms = now + HOUSEKEEPING_INTERVAL_MS;
            publish_disk_space(&p.data_dir, &sh.stats);
            p.prune(&sh.stats)?;
        }
    }
    Ok(())
}

impl Persistence {
    /// Whether blocks are pruned (STORAGE_RETAIN_BLOCKS or STORAGE_RETAIN_BYTES).
    fn retains(&self) -> bool {
        self.retain_blocks > 0 || self.retain_bytes > 0
    }

    fn audit(&mut self, event: &str, fields: serde_json::Value) -> anyhow::Result<()> {
        if let Some(a) = &mut self.audit {
            a.record(now_ms(), event, fields).context("writing the audit log")?;
        }
        Ok(())
    }

    /// Carries out a group of the core's passes in order: the records
    /// durable (one sync) before any send, the blocks durable (one sync)
    /// before their checkpoints and their publication.
    fn perform(&mut self, mut group: Vec<(Ready, u64)>, sh: &Shared) -> anyhow::Result<()> {
        let records: Vec<Record> = group.iter_mut().flat_map(|(r, _)| r.records.drain(..)).collect();
        if let Some(log) = &mut self.log {
            log.append(&records).context("consensus log append failed; stopping (restart recovers it)")?;
            if log.len() > self.compact_at {
                self.compact_wanted.store(true, Ordering::Release);
            }
        }
        for (ready, _) in group.iter_mut() {
            for o in std::mem::take(&mut ready.effects) {
                self.perform_effect(o)?;
            }
        }
        let (now, checkpoints) =
            split_sends(group.iter_mut().map(|(r, _)| {
                (!r.commits.is_empty(), std::mem::take(&mut r.sends), std::mem::take(&mut r.after_commits))
            }));
        for (to, m) in now {
            if let Message::PrePrepare(pp) = &m {
                if pp.from == self.me && self.audit.is_some() {
                    let b = &pp.body;
                    let fields = serde_json::json!({"view": b.view, "seq": b.seq, "digest": hex::encode(b.digest)});
                    self.audit("proposal", fields)?;
                }
            }
            self.out.send_to(to, &m);
        }
        let mut commits = vec![];
        let mut executed = vec![];
        for (ready, executed_ms) in group {
            for c in ready.commits {
                executed.push((executed_ms, c.block.txs.len()));
                commits.push((c.block, c.cert, c.outcome));
            }
        }
        if !commits.is_empty() {
            self.store
                .append_with_outcomes(&crate::runtime::recovery::stored_form(&commits))
                .context("block store append failed; stopping (restart recovers the store)")?;
        }
        for (to, m) in &checkpoints {
            self.out.send_to(*to, m);
        }
        let now = now_ms();
        let h = sh.stats.latencies.stage("durable");
        for (executed_ms, txs) in executed {
            let ms = now.saturating_sub(executed_ms) as f64;
            for _ in 0..txs {
                h.observe(ms);
            }
        }
        if !commits.is_empty() {
            self.publish_commits(&commits, sh)?;
        }
        Ok(())
    }

    /// Keeps only what recovery needs (values below the stable checkpoint
    /// are in the store).
    fn compact(&mut self, records: &[Record]) -> anyhow::Result<()> {
        if let Some(log) = self.log.as_mut() {
            let before = log.len();
            log.compact(records).context("compacting the consensus log")?;
            self.compact_at = next_compaction_at(self.compact_min, log.len());
            tracing::info!(before, after = log.len(), next_at = self.compact_at, "consensus log compacted");
        }
        self.compact_wanted.store(false, Ordering::Release);
        Ok(())
    }

    /// One output that reads or writes the store or the audit log.
    fn perform_effect(&mut self, o: Output) -> anyhow::Result<()> {
        match o {
            Output::Rejoin { height, lowest } => {
                let moved_to = move_store_aside(&self.data_dir, height)?.display().to_string();
                let e = RejoinRequired { height, lowest, moved_to };
                tracing::warn!(height, lowest, "{e}");
                return Err(e.into());
            }
            Output::Joined { header, bytes } => {
                // Durable before the store starts above it.
                write_atomically(&self.base_path, &bytes)
                    .with_context(|| format!("writing {}", self.base_path.display()))?;
                let height = header.height;
                self.store.set_base(header)?;
                *self.served.lock().unwrap() = Some((height, bytes));
                // Else they would read block 1 of a store that starts above the snapshot.
                if let Some(e) = self.egress.as_mut() {
                    e.start_above(height);
                }
                if let Some(m) = self.mirror.as_mut() {
                    m.start_above(height);
                }
            }
            Output::Snapshot(snap) => {
                if let Some(w) = &self.snapshot_writer {
                    let height = snap.height();
                    let keep_as_base = self.retains() && self.store.height() >= height;
                    if w.try_send((snap, keep_as_base)).is_err() {
                        tracing::warn!(height, "snapshot writer busy; snapshot.bin keeps an older snapshot");
                    }
                }
            }
            Output::ServeFetch { to, from_seq } => self.serve_fetch(to, from_seq)?,
            Output::ServeBlockTxs { to, seq, height, tx_hashes } => {
                self.serve_block_txs(to, seq, height, &tx_hashes)?
            }
            Output::ViewChanged { view, primary, cause, height } => {
                let primary = self.out.ids.get(primary).copied().unwrap_or(0);
                tracing::info!(view, primary, height, cause = cause.as_str(), "view changed");
                self.audit("view_change", serde_json::json!({"view": view, "primary": primary, "height": height}))?;
            }
            Output::Quarantined { validator, height } => {
                let validator = self.out.ids.get(validator).copied().unwrap_or(0);
                self.audit("quarantine", serde_json::json!({"validator": validator, "height": height}))?;
            }
            Output::Evidence { culprit, what } => {
                let validator = self.out.ids.get(culprit).copied().unwrap_or(0);
                tracing::warn!(validator, what, "validator misbehaviour");
                self.audit("misbehaviour", serde_json::json!({"validator": validator, "what": what}))?;
            }
            other => unreachable!("the core carries out {other:?} itself (`is_persistence_effect`)"),
        }
        Ok(())
    }

    /// Answers a fetch with committed blocks from the store, each with its
    /// certificate (`recovery::committed_from`).
    fn serve_fetch(&self, to: Rid, from_seq: Seq) -> anyhow::Result<()> {
        let store = &self.store;
        if from_seq < store.lowest() && from_seq <= store.height() {
            // Pruned here (or below the snapshot this validator joined from).
            self.out.send_frame(to, wire::encode_fetch_pruned(store.lowest()));
            return Ok(());
        }
        for cert in crate::runtime::recovery::committed_from(store, &self.wire, from_seq)? {
            self.out.send(to, &Message::Committed(cert));
        }
        Ok(())
    }

    /// Answers a tx fetch for a committed block from the store.
    fn serve_block_txs(&self, to: Rid, seq: Seq, height: u64, tx_hashes: &[crate::Hash32]) -> anyhow::Result<()> {
        let store = &self.store;
        if height < store.lowest() && height <= store.height() {
            // Its block was pruned here: the asker may have to rejoin.
            self.out.send_frame(to, wire::encode_fetch_pruned(store.lowest()));
            return Ok(());
        }
        self.out.send_bodies(to, seq, &crate::runtime::recovery::block_txs(store, height, tx_hashes)?);
        Ok(())
    }

    /// Publishes blocks made durable: their Kafka offsets, commit events,
    /// database rows, audit records and direct-source commit notices.
    fn publish_commits(
        &mut self,
        commits: &[(Arc<Block>, CommitCert, proto::BlockOutcome)],
        sh: &Shared,
    ) -> anyhow::Result<()> {
        for (block, cert, outcome) in commits {
            // Durable: their Kafka messages are finished; their events may go out.
            if let Some(t) = &self.tracker {
                t.finish_nonces(block.txs.iter().map(|t| &t.nonce));
            }
            if let Some(e) = &mut self.egress {
                e.on_commit(block, cert, outcome);
            }
            if let Some(m) = &mut self.mirror {
                m.on_commit(block, cert, outcome);
            }
        }
        for (block, _, outcome) in commits {
            let rejected = outcome.rejected.len();
            sh.stats.latencies.consensus_round.observe(now_ms().saturating_sub(block.header.timestamp_ms) as f64);
            if self.audit.is_some() {
                let h = &block.header;
                let fields = serde_json::json!({
                    "height": h.height,
                    "hash": hex::encode(block.hash()),
                    "view": h.view,
                    "txs": block.txs.len(),
                    "rejected": rejected,
                    "state_root": hex::encode(h.state_root),
                });
                self.audit("commit", fields)?;
            }
            sh.stats.height.store(block.header.height, Ordering::Relaxed);
            tracing::debug!(
                height = block.header.height,
                view = block.header.view,
                txs = block.txs.len(),
                rejected,
                age_ms = now_ms().saturating_sub(block.header.timestamp_ms),
                "committed"
            );
            let frame = commit_frame(block);
            sh.subscribers.lock().unwrap().retain(|(_, s)| match s.try_send(frame.clone()) {
                Ok(()) => true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("direct subscriber too slow; dropping it");
                    false
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
        Ok(())
    }

    fn catch_up_feeds(&mut self) -> anyhow::Result<()> {
        if let Some(e) = &mut self.egress {
            e.catch_up(&self.store, &self.wire)?;
        }
        if let Some(m) = &mut self.mirror {
            m.catch_up(&self.store, &self.wire)?;
        }
        Ok(())
    }

    /// Retention (STORAGE_RETAIN_BLOCKS): moves the store's base up to the
    /// snapshot the writer last kept as `blocks.base`, then deletes the
    /// segments wholly below min(base, newest − retain, every feed's cursor).
    /// Nothing a restart, a join or a downstream consumer needs goes.
    fn prune(&mut self, stats: &RuntimeStats) -> anyhow::Result<()> {
        if !self.retains() {
            return Ok(());
        }
        let store = &mut self.store;
        let kept = self.base_kept.load(Ordering::Acquire);
        if kept > store.base_height() && kept <= store.height() {
            let header =
                store.read_header(kept)?.with_context(|| format!("block {kept} (the new base) is not stored"))?;
            store.rebase(header);
            tracing::debug!(height = kept, "the block store sits on a newer snapshot");
        }
        let mut cursors = vec![];
        for path in &self.feed_cursors {
            cursors
                .push(crate::edges::egress::read_cursor(path).with_context(|| format!("reading {}", path.display()))?);
        }
        let by_bytes = match self.retain_bytes {
            0 => 0,
            b => store.height_to_fit(b),
        };
        let limit = prune_limit(store.base_height(), store.height(), self.retain_blocks, by_bytes, &cursors);
        let pruned = store.prune_through(limit)?;
        // Published before the log line: whoever reads the log sees the API agree.
        publish_store(store, stats);
        if pruned > 0 {
            stats.pruned_blocks.fetch_add(pruned, Ordering::Relaxed);
            tracing::info!(blocks = pruned, lowest = store.lowest(), "pruned block segments");
        }
        Ok(())
    }
}

type Sends = Vec<(Option<Rid>, Message)>;

/// A group's sends, in order, split into those that go out once its
/// records are durable and those that wait for its blocks: a checkpoint
/// vouches for the blocks before it, so from the first pass that commits a
/// block on, checkpoints wait for the group's store sync (`Ready` does the
/// same within one pass: its `after_commits`). Each pass: whether it
/// commits blocks, its sends, its `after_commits`.
fn split_sends(passes: impl Iterator<Item = (bool, Sends, Sends)>) -> (Sends, Sends) {
    let (mut now, mut after_blocks) = (vec![], vec![]);
    let mut blocks_pending = false;
    for (commits, sends, mut after_commits) in passes {
        blocks_pending |= commits;
        for (to, m) in sends {
            match m {
                Message::Checkpoint(_) if blocks_pending => after_blocks.push((to, m)),
                m => now.push((to, m)),
            }
        }
        after_blocks.append(&mut after_commits);
    }
    (now, after_blocks)
}

/// Whether the persistence thread carries out this effect (it reads or
/// writes the store or the audit log); the core does the rest at once.
pub(super) fn is_persistence_effect(o: &Output) -> bool {
    matches!(
        o,
        Output::Rejoin { .. }
            | Output::Joined { .. }
            | Output::Snapshot(_)
            | Output::ServeFetch { .. }
            | Output::ServeBlockTxs { .. }
            | Output::ViewChanged { .. }
            | Output::Quarantined { .. }
            | Output::Evidence { .. }
    )
}

/// When to compact the consensus log again, given its live size after a
/// compaction: twice that, and at least the configured size. What recovery
/// needs (the values in flight: up to a window of blocks) can exceed the
/// configured size; compacting at every checkpoint would then rewrite it
/// each time.
fn next_compaction_at(configured: u64, live: u64) -> u64 {
    configured.max(live.saturating_mul(2))
}

/// The core stopped because this validator is behind every block its peers
/// retain: its block store was moved aside; start it again to join from a
/// snapshot (`run_blocking` does).
#[derive(Debug, thiserror::Error)]
#[error(
    "this validator executed height {height}, but f + 1 peers store blocks only from {lowest} on \
     (STORAGE_RETAIN_BLOCKS): its block store was moved to {moved_to} and it starts again to join from a snapshot"
)]
pub struct RejoinRequired {
    pub height: u64,
    pub lowest: u64,
    pub moved_to: String,
}

/// A validator set change took effect at `height`: the consensus core stops
/// (everything queued made durable, the new epoch's log marker with it) and
/// the validator starts again on the new set (`run_blocking` does): the
/// transport, the replica and the API then follow the set the state names.
#[derive(Debug, thiserror::Error)]
#[error("validator set epoch {epoch} took effect above height {height}; starting again on the new set")]
pub struct EpochSwitch {
    pub epoch: u64,
    pub height: u64,
}

/// Moves the block store (segments, `blocks.base`) and the served snapshot
/// of `dir` into `dir/behind-<height>/`, so the next start finds an empty
/// store and joins from a peer's snapshot. The consensus log and the
/// genesis certificate stay: the votes this validator cast are remembered.
fn move_store_aside(dir: &std::path::Path, height: u64) -> anyhow::Result<std::path::PathBuf> {
    let aside = dir.join(format!("behind-{height}"));
    std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
    let disk = crate::edges::storage::os();
    let mut moving: Vec<std::path::PathBuf> =
        crate::edges::store::segment_files(&*disk, dir, 0)?.into_iter().map(|(_, p)| p).collect();
    moving.push(dir.join(snapshot::BASE_FILE));
    moving.push(dir.join(snapshot::SERVED_FILE));
    for from in moving.into_iter().filter(|p| p.exists()) {
        let to = aside.join(from.file_name().expect("a file"));
        disk.rename(&from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    Ok(aside)
}

pub(super) type MakeItem<M> = Box<dyn Fn(&Arc<Block>, Option<&CommitCert>, Option<&proto::BlockOutcome>) -> M + Send>;

/// Feeds a downstream thread (the event publisher, the database mirror)
/// every stored block in height order from its cursor: live blocks as they
/// become durable, older ones (after a restart, or while it was behind)
/// read back from the block store. Never blocks: a full queue waits for the
/// next turn.
pub(super) struct BlockFeed<M> {
    tx: SyncSender<M>,
    next: u64,
    held: Option<M>,
    make: MakeItem<M>,
}

impl<M> BlockFeed<M> {
    pub fn new(tx: SyncSender<M>, next: u64, make: MakeItem<M>) -> Self {
        BlockFeed { tx, next, held: None, make }
    }

    /// The store now starts above `base` (a snapshot join): the blocks
    /// below it are not here to feed (peers published and mirrored them).
    fn start_above(&mut self, base: u64) {
        self.next = self.next.max(base + 1);
    }

    fn offer(&mut self, item: M) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(item)) => {
                self.held = Some(item);
                false
            }
            Err(TrySendError::Disconnected(_)) => {
                self.next = u64::MAX; // the thread stopped (logged there); a restart resumes
                false
            }
        }
    }

    fn on_commit(&mut self, block: &Arc<Block>, cert: &CommitCert, outcome: &proto::BlockOutcome) {
        if self.held.is_none() && self.next == block.header.height {
            let cert = (!cert.commits.is_empty()).then_some(cert);
            let item = (self.make)(block, cert, Some(outcome));
            self.next += 1;
            self.offer(item);
        }
    }

    fn catch_up(&mut self, store: &BlockStore, wire: &WireLimits) -> anyhow::Result<()> {
        if let Some(item) = self.held.take() {
            if !self.offer(item) {
                return Ok(());
            }
        }
        while self.next <= store.height() {
            let h = self.next;
            let (b, pc, outcome) =
                store.read_full(h)?.ok_or_else(|| anyhow::anyhow!("block {h} is indexed but unreadable"))?;
            let cert = match pc {
                Some(pc) => Some(stored_cert(&b, Some(pc), wire)?),
                None => None,
            };
            let item = (self.make)(&Arc::new(b), cert.as_ref(), outcome.as_ref());
            self.next += 1;
            if !self.offer(item) {
                break;
            }
        }
        Ok(())
    }
}

/// The height through which blocks may be pruned: what either limit lets
/// go (`retain_blocks` below the newest, `by_bytes` from the byte budget;
/// 0 = off), never above the base nor a downstream feed's cursor.
fn prune_limit(base: u64, height: u64, retain_blocks: u64, by_bytes: u64, cursors: &[u64]) -> u64 {
    let by_blocks = match retain_blocks {
        0 => 0,
        r => height.saturating_sub(r),
    };
    cursors.iter().fold(base.min(by_blocks.max(by_bytes)), |l, c| l.min(*c))
}

/// The retained range and the block store's bytes.
pub(super) fn publish_store(store: &BlockStore, stats: &RuntimeStats) {
    stats.lowest_stored.store(store.lowest(), Ordering::Release);
    stats.block_store_bytes.store(store.segments().1, Ordering::Relaxed);
}

/// `storage_free_bytes` / `storage_size_bytes` (left as they were if
/// statvfs fails).
pub(super) fn publish_disk_space(dir: &std::path::Path, stats: &RuntimeStats) {
    if let Some((free, size)) = disk_space(dir) {
        stats.storage_free_bytes.store(free, Ordering::Relaxed);
        stats.storage_size_bytes.store(size, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::{next_compaction_at, prune_limit, split_sends};
    use crate::protocol::consensus::pbft::{Checkpoint, Message, Signed};

    fn checkpoint(seq: u64) -> Message {
        Message::Checkpoint(Signed { body: Checkpoint { seq, state: [0; 32], app: [0; 32] }, from: 0, sig: vec![] })
    }
    fn fetch(from_seq: u64) -> Message {
        Message::Fetch { from: 0, from_seq }
    }

    #[test]
    fn checkpoints_after_a_block_of_the_group_wait_for_the_store_sync_and_nothing_else_does() {
        let passes = vec![
            // Before any block of the group: an older block's checkpoint (durable already) goes at once.
            (false, vec![(None, checkpoint(4)), (Some(1), fetch(1))], vec![]),
            // This pass commits block 5; `Ready` put its own checkpoint in after_commits.
            (true, vec![(Some(2), fetch(2))], vec![(None, checkpoint(5))]),
            // A later pass's checkpoint of block 5 must wait too; its other sends need not.
            (false, vec![(Some(3), checkpoint(5)), (None, fetch(3))], vec![]),
        ];
        let (now, after) = split_sends(passes.into_iter());
        assert_eq!(now, vec![(None, checkpoint(4)), (Some(1), fetch(1)), (Some(2), fetch(2)), (None, fetch(3))]);
        assert_eq!(after, vec![(None, checkpoint(5)), (Some(3), checkpoint(5))], "in their passes' order");
        // A group without blocks sends everything once its records are durable.
        let (now, after) = split_sends(vec![(false, vec![(None, checkpoint(4))], vec![])].into_iter());
        assert_eq!((now.len(), after.len()), (1, 0));
    }

    #[test]
    fn pruning_stays_below_the_base_and_every_cursor_and_takes_the_stricter_retention() {
        // Base 100, newest 180: keep 50 blocks -> through 130, but the base caps it at 100.
        assert_eq!(prune_limit(100, 180, 50, 0, &[]), 100);
        assert_eq!(prune_limit(150, 180, 50, 0, &[]), 130);
        // The byte budget wants more gone than the block count: the stricter wins.
        assert_eq!(prune_limit(150, 180, 50, 140, &[]), 140);
        assert_eq!(prune_limit(150, 180, 0, 120, &[]), 120);
        assert_eq!(prune_limit(150, 180, 0, 0, &[]), 0, "no retention set");
        // A feed (events, mirror) behind holds it back.
        assert_eq!(prune_limit(150, 180, 50, 140, &[160, 90]), 90);
    }

    #[test]
    fn the_log_compacts_again_only_once_it_doubles_its_live_size() {
        // Small live set: the configured size rules.
        assert_eq!(next_compaction_at(8 << 20, 1 << 20), 8 << 20);
        // Live set (a window of big proposals) above it: wait for twice
        // that, so each compaction drops at least half of what it reads.
        assert_eq!(next_compaction_at(8 << 20, 12 << 20), 24 << 20);
        assert_eq!(next_compaction_at(8 << 20, u64::MAX), u64::MAX);
    }
}
