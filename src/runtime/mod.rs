//! Runtime: the validator's threads and the queues between them.
//!
//! ```text
//! direct source: each verify shard's glommio executor accepts its share of
//!   the connections (SO_REUSEPORT) and reads them (io_uring): frame → decode
//!   → route by hash(nonce)   [RUNTIME_EXECUTOR=threads: one event-loop thread]
//! Kafka source: rdkafka's threads, routed the same way
//!        │  Ring<Vec<Incoming>> per shard
//!        ▼
//! verify shard × N (pinned when configured): checks → batched Ed25519 → nonces
//!        │  Ring<Vec<VerifiedTx>> per shard            rejections ─► DLQ thread
//!        ▼
//! core thread (single owner): Node (genesis → snapshot join → mempool, PBFT replica, state)
//!        │   ▲ consensus frames (bounded queue, rings the core's doorbell)
//!        │   └── net thread (tokio + quinn QUIC to the other validators)
//!        │  Job per pass (bounded FIFO): records, sends, commits, store-side effects
//!        ▼
//! persistence thread (`persistence`): consensus.log (fdatasync, then the sends)
//!   · block store (fdatasync, then checkpoints) · committed blocks published
//!        ▼
//! subscribers (each direct connection's notice queue, written by its connection's task),
//! the event publisher and the database mirror (their own threads)
//! ```
//! Each stage owns its data; queues are bounded, so a slow stage stops the
//! one before it and, finally, the TCP reader: backpressure, never growth.

pub mod config;
pub mod devnet;
mod direct;
mod executor;
mod kafka;
pub mod monitor;
mod persistence;
pub mod reconfig_cli;
pub mod recovery;
pub mod ring;

use crate::edges::dlq::{DlqFileSink, DlqKafkaSink};
use crate::edges::framed::write_atomically;
use crate::edges::kafka::OffsetTracker;
pub use crate::edges::metrics::RuntimeStats;
use crate::edges::net::{Net, NetConfig, NetEvent, Peer};
use crate::edges::store::BlockStore;
use crate::proto;
use crate::protocol::block::Block;
use crate::protocol::clock::Now;
use crate::protocol::consensus::genesis::{Ceremony, Genesis, GenesisOutput};
use crate::protocol::consensus::pbft::{Message, Rid, Seq};
use crate::protocol::consensus::wire::{self, Ed25519Auth, Frame, WireLimits};
use crate::protocol::crypto;
use crate::protocol::event::Limits;
use crate::protocol::mempool::VerifiedTx;
use crate::protocol::node::{Node, NodeConfig, Output, Ready, Stage};
use crate::protocol::proposal;
use crate::protocol::reject::{RejectReason, Rejection};
use crate::protocol::snapshot;
use crate::protocol::verify::Incoming;
use crate::protocol::verify::{Verifier, VerifyPolicy};
use crate::runtime::config::{ExecutorKind, IdlePolicy, Validated};
use anyhow::{bail, Context};
use persistence::{BlockFeed, MakeItem};
use prost::Message as _;
use ring::{idle_wait, Doorbell, Ring};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch (the runtime's only clock).
/// The wall clock (Unix ms): block timestamps, skew checks, audit records.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Monotonic nanoseconds since first use: the core's stopwatch (stage
/// durations for metrics only).
pub fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

/// Monotonic ms since first use: the core's timers and every wait.
pub fn mono_ms() -> u64 {
    monotonic_ns() / 1_000_000
}

/// Both clocks, as the core takes them with each input.
pub fn clocks() -> Now {
    Now { mono_ms: mono_ms(), wall_ms: now_ms() }
}

struct Shared {
    stop: Arc<AtomicBool>,
    idle: IdlePolicy,
    limits: Limits,
    batch: usize,
    shard_in: Vec<Arc<Ring<Vec<Incoming>>>>,
    dlq: SyncSender<Rejection>,
    stats: Arc<RuntimeStats>,
    subscribers: direct::CommitSubscribers,
    /// Kafka source: which messages are finished (offsets to commit).
    tracker: Option<Arc<OffsetTracker>>,
    /// Txs a verify shard has taken from its ring and not yet handed on.
    verifying: AtomicUsize,
    /// The last direct connection's id (ids name commit subscribers).
    connection_ids: AtomicU64,
}

/// A running validator. Drop or `shutdown` to stop it.
pub struct Running {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    core: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    /// Joined last, once nothing can reject any more.
    dlq: Option<std::thread::JoinHandle<()>>,
    dlq_done: Arc<AtomicBool>,
    /// The event publisher and the database mirror: joined after the core
    /// (they drain what the core handed them).
    egress: Option<std::thread::JoinHandle<()>>,
    mirror: Option<std::thread::JoinHandle<()>>,
    listen: std::net::SocketAddr,
    pub stats: Arc<RuntimeStats>,
}

impl Running {
    pub fn direct_addr(&self) -> std::net::SocketAddr {
        self.listen
    }

    /// Blocks until `stop` is raised (e.g. by SIGTERM) and the threads end.
    pub fn wait(mut self) -> anyhow::Result<()> {
        while !self.shared.stop.load(Ordering::Relaxed) {
            if self.core.as_ref().is_some_and(|c| c.is_finished()) {
                break;
            }
            std::thread::park_timeout(Duration::from_millis(200));
        }
        self.shutdown()
    }

    /// Stops every thread: sources first, then shards drain, then the core.
    pub fn shutdown(&mut self) -> anyhow::Result<()> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let core = match self.core.take() {
            Some(c) => c.join().map_err(|_| anyhow::anyhow!("core thread panicked")).and_then(|r| r),
            None => Ok(()),
        };
        self.dlq_done.store(true, Ordering::SeqCst);
        if let Some(d) = self.dlq.take() {
            let _ = d.join();
        }
        if let Some(e) = self.egress.take() {
            let _ = e.join();
        }
        if let Some(m) = self.mirror.take() {
            let _ = m.join();
        }
        core
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn pin(core: Option<usize>, what: &str) {
    if let Some(c) = core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
            tracing::warn!(core = c, thread = what, "could not pin thread to core");
        }
    }
}

/// Gives the calling thread the lowest CPU priority (nice 19): it runs on
/// what the validator's own pipeline leaves.
fn lower_priority(what: &str) {
    set_nice(what, 19)
}

fn set_nice(what: &str, nice: i32) {
    // SAFETY: setpriority on the calling thread's own id (Linux: per thread).
    let ok = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0
    };
    if !ok {
        tracing::warn!(thread = what, "could not lower the thread's priority");
    }
}

/// Opts the process out of transparent huge pages. mimalloc asks for them
/// (`MADV_HUGEPAGE`), and then every fresh 2 MiB of the blocks being
/// encoded, the txs being executed and the state being grown is a fault
/// that zeroes a whole huge page on the core thread: `clear_page_erms` was
/// 42% of one validator's samples at 4 KB payloads. Without them the
/// devnet's maximum rose 40% at 4 KB and 12% at 300 B (docs/performance.md,
/// 2026-12-07 b). `PR_SET_THP_DISABLE` also holds where the host's THP
/// setting is `always`.
pub fn refuse_huge_pages() {
    // SAFETY: a prctl that sets a flag of the calling process; no pointers.
    let ok = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 };
    if !ok {
        tracing::warn!("could not opt out of transparent huge pages (prctl PR_SET_THP_DISABLE)");
    }
}

/// Starts a validator from a validated config. Returns once it listens.
pub fn start(v: Validated, stop: Arc<AtomicBool>) -> anyhow::Result<Running> {
    refuse_huge_pages();
    let c = &v.config;
    let (key, next_key) = load_keys(&v)?;
    let from_kafka = c.ingest.source == crate::runtime::config::SourceKind::Kafka;
    let limits = c.limits();
    std::fs::create_dir_all(&c.node.data_dir)
        .with_context(|| format!("creating data dir {}", c.node.data_dir.display()))?;

    // The genesis set in id order: replica i is the i-th id. Recovery
    // starts from it and follows the set changes the chain made.
    let genesis_ids: Vec<u32> = v.validators.keys().copied().collect();
    let genesis_keys: Vec<crypto::PublicKey> = v.validators.values().copied().collect();
    // A validator a set change adds has no genesis replica id: it takes
    // none until a snapshot of a set naming it (it only joins before).
    let added = c.node.added_by_set_change;
    let me_rid = genesis_ids.iter().position(|&i| i == c.node.id).unwrap_or(0);
    let genesis_params = c.pbft_params(genesis_ids.len());
    let wire_for = |n: usize| WireLimits {
        n,
        // Values name their txs (64 bytes each) and carry at most 16 proofs.
        max_value_bytes: proposal::TX_REF_BYTES * c.block.max_txs + proposal::MAX_EVIDENCE * 1024 + 1024,
        window: genesis_params.window as usize,
    };
    // Records and snapshots may come from a later set, larger by at most
    // the changes of one epoch at a time: decoding bounds replica ids by it.
    let wire = wire_for(genesis_ids.len() + crate::protocol::reconfig::MAX_CHANGES);

    // Recover (crate::runtime::recovery): the same function the simulator runs.
    let auth = Ed25519Auth::new(key.clone(), genesis_keys.clone()).with_next_key(next_key.clone());
    let rep_cfg = snapshot::ReputationConfig {
        floor: c.consensus.enable_reputation.then_some(c.consensus.min_leader_reputation),
        quarantine: c.consensus.enable_quarantine,
    };
    let base_path = c.node.data_dir.join(snapshot::BASE_FILE);
    let crate::runtime::recovery::Recovered {
        mut store,
        log: clog,
        replica,
        state,
        reputation,
        base_bytes,
        join_records,
        next_epoch_records,
        ..
    } = crate::runtime::recovery::recover(crate::runtime::recovery::Setup {
        disk: crate::edges::storage::os(),
        dir: &c.node.data_dir,
        me: me_rid,
        params: genesis_params.clone(),
        auth: auth.clone(),
        keys: &genesis_keys,
        wire,
        limits,
        state: v.state_config(),
        reputation: rep_cfg,
    })?;
    // Every key this validator holds: blocks of an earlier epoch are
    // published with the one of their set.
    let held: Vec<crypto::SigningKey> = std::iter::once(key.clone()).chain(next_key.clone()).collect();
    // The set the chain names now, and this validator's key in it.
    let waiting_to_join = added && store.height() == 0;
    let (ids, keys, key) = match waiting_to_join {
        // Not in any set yet: the genesis set's peers serve the snapshot.
        true => (genesis_ids.clone(), genesis_keys.clone(), key),
        false => current_set(&v, &state, replica.epoch(), key, next_key)?,
    };
    let n = ids.len();
    let params = c.pbft_params(n);
    // Peers' messages are bounded by the current set.
    let wire = wire_for(n);
    // Every set so far (a chain without set changes: the configured one):
    // commit events and the API name each block's signers by its epoch's.
    let epochs: Vec<crate::protocol::reconfig::Epoch> = (0..=replica.epoch())
        .map(|e| {
            let genesis =
                || crate::protocol::reconfig::Epoch { epoch: 0, from_height: 0, validators: v.validators.clone() };
            state.epoch(e).unwrap_or_else(genesis)
        })
        .collect();
    if replica.epoch() > 0 {
        tracing::info!(epoch = replica.epoch(), validators = ?ids, "validator set of the current epoch");
    }

    store.set_segment_bytes(c.storage.segment_bytes);

    let genesis = if n > 1 && !added { Some(load_genesis(c, &v, key.clone())?) } else { None };

    let stats = Arc::new(RuntimeStats::default());
    stats.height.store(store.height(), Ordering::Relaxed);
    persistence::publish_store(&store, &stats);
    stats.verify_shards.store(c.runtime.verify_shards as u64, Ordering::Relaxed);
    stats.mempool_max_txs.store(c.mempool.max_txs as u64, Ordering::Relaxed);
    stats.mempool_max_bytes.store(c.mempool.max_bytes as u64, Ordering::Relaxed);
    stats.mirror_enabled.store(c.database.enabled as u64, Ordering::Relaxed);
    persistence::publish_disk_space(&c.node.data_dir, &stats);
    let (dlq_tx, dlq_rx) = sync_channel::<Rejection>(8192);
    let core_bell = Arc::new(Doorbell::default());
    let shards = c.runtime.verify_shards;
    let shard_bells: Vec<Arc<Doorbell>> = (0..shards).map(|_| Arc::new(Doorbell::default())).collect();
    let shard_in: Vec<Arc<Ring<Vec<Incoming>>>> =
        shard_bells.iter().map(|b| Arc::new(Ring::new(c.runtime.ring_capacity, b.clone()))).collect();
    let shard_out: Vec<Arc<Ring<Vec<VerifiedTx>>>> =
        (0..shards).map(|_| Arc::new(Ring::new(c.runtime.ring_capacity, core_bell.clone()))).collect();

    // The direct source's sockets: one per glommio shard (SO_REUSEPORT),
    // or one for the threads path's event loop.
    let glommio = c.runtime.executor == ExecutorKind::Glommio;
    let mut listeners = if glommio {
        executor::bind_listeners(&c.ingest.direct_listen, shards)?
    } else {
        vec![TcpListener::bind(&c.ingest.direct_listen)
            .with_context(|| format!("binding the direct source on {} (DIRECT_LISTEN_ADDR)", c.ingest.direct_listen))?]
    };
    let listen = listeners[0].local_addr()?;
    let shared = Arc::new(Shared {
        stop: stop.clone(),
        idle: c.runtime.idle,
        limits,
        batch: c.runtime.verify_batch,
        shard_in: shard_in.clone(),
        dlq: dlq_tx.clone(),
        stats: stats.clone(),
        subscribers: Mutex::new(vec![]),
        tracker: from_kafka.then(|| Arc::new(OffsetTracker::default())),
        verifying: AtomicUsize::new(0),
        connection_ids: AtomicU64::new(0),
    });
    let mut threads = vec![];

    let (dlq, dlq_done) = start_dlq(c, &shared, dlq_rx)?;

    let policy = Arc::new(VerifyPolicy {
        producers: v.producers.iter().copied().collect(),
        skew_ms: c.ingest.max_timestamp_skew.as_millis() as u64,
    });
    tracing::info!(shards, executor = ?c.runtime.executor, curve_backend = crate::protocol::crypto::curve_backend(), "starting signature verification");
    if glommio {
        let io = listeners
            .drain(..)
            .enumerate()
            .map(|(i, listener)| executor::ShardIo {
                input: shard_in[i].clone(),
                output: shard_out[i].clone(),
                bell: shard_bells[i].clone(),
                verifier: Verifier::new(policy.clone()),
                listener,
            })
            .collect();
        threads.extend(executor::start(c, io, &shared)?);
    } else {
        threads.extend(start_shards(c, &policy, &shard_in, &shard_out, &shard_bells, &shared)?);
    }

    if let Some(tracker) = shared.tracker.clone() {
        threads.push(start_kafka_source(c, tracker, &shared)?);
    }
    let (egress_feed, egress) = match from_kafka {
        true => start_egress(c, &stop, &stats, &store, &key, &held, &epochs).map(|(f, h)| (Some(f), Some(h)))?,
        false => (None, None),
    };

    let (mirror_feed, mirror) = match c.database.enabled {
        true => start_mirror(&v, &stop, &stats, &store).map(|(f, h)| (Some(f), Some(h)))?,
        false => (None, None),
    };

    // State lookups from the API, answered by the core between events.
    let (state_tx, state_rx) = sync_channel::<crate::edges::api::StateQuery>(64);
    if c.api.enabled {
        let info = crate::edges::api::StaticInfo {
            validator: c.node.id,
            validators: n,
            quorum: params.q(),
            ids: ids.clone(),
            epochs: epochs.clone(),
            ready_lag_blocks: params.window,
        };
        threads.push(start_api(c, info, &stats, &stop, state_tx.clone())?);
    }

    // Network (N > 1): QUIC to every other validator; incoming messages
    // ring the core's doorbell.
    let net = match n > 1 {
        true => Some(start_net(&v, &ids, &keys, &key, &wire, &params, &core_bell)?),
        false => None,
    };
    // mDNS (P2P_ENABLE_MDNS): peers' addresses found on the LAN.
    let mdns = match (&net, c.cluster.enable_mdns) {
        (Some(net), true) => {
            let me = crate::edges::mdns::Announce {
                id: c.node.id,
                key: crypto::public_key(&key),
                chain: c.consensus_fingerprint(),
                listen: net.local_addr,
            };
            let d = crate::edges::mdns::Discovery::start(me, v.validators.clone(), net.address_book())
                .map_err(|e| anyhow::anyhow!("P2P_ENABLE_MDNS: {e}"))?;
            tracing::info!(service = crate::edges::mdns::SERVICE_TYPE, "announcing and browsing by mDNS");
            Some(d)
        }
        _ => None,
    };

    // Core.
    let ncfg = NodeConfig {
        builder: c.builder(),
        mempool: c.mempool_config(),
        limits,
        policy: policy.clone(),
        skew_ms: c.ingest.max_timestamp_skew.as_millis() as u64,
        validators: keys.clone(),
        snapshot_interval: if n > 1 { c.consensus.snapshot_interval } else { 0 },
    };
    let last = store.last_header().cloned();
    if !reputation.excluded().is_empty() {
        tracing::info!(excluded = ?reputation.excluded(), "leaders excluded by reputation");
    }
    let mut node = Node::new(ncfg.clone(), replica, state, last, reputation, clocks());
    if let Some((epoch, records)) = next_epoch_records {
        node.hold_next_epoch_records(epoch, records);
    }
    node.set_stopwatch(monotonic_ns);
    crate::runtime::recovery::remember_recent(&mut node, &store).context("reading the newest blocks' txs")?;
    let served = served_snapshot(c, &store, base_bytes);
    let base_kept = Arc::new(AtomicU64::new(store.base_height()));
    let snapshot_writer = match n > 1 && c.consensus.snapshot_interval > 0 {
        true => Some(start_snapshot_writer(c, &served, &base_kept)?),
        false => None,
    };
    // What pruning must not pass: the heights the publisher and the mirror
    // resume from after a restart (their cursor files).
    let mut feed_cursors = vec![];
    if from_kafka {
        feed_cursors.push(c.node.data_dir.join("commits.cursor"));
    }
    if c.database.enabled {
        feed_cursors.push(c.node.data_dir.join("mirror.cursor"));
    }
    if let Some(g) = genesis {
        node.start_genesis(g);
    }
    // An empty store may start from a peer's snapshot (the node joins
    // after genesis; a young chain has none and it starts from height 1).
    if let Some(records) = join_records.filter(|_| n > 1 && c.consensus.snapshot_interval > 0) {
        node.start_joining(snapshot::JoinSetup {
            me: me_rid,
            params: genesis_params.clone(),
            auth: auth.clone(),
            wire,
            state: v.state_config(),
            reputation: rep_cfg,
            records,
            timeout_ms: c.consensus.snapshot_join_timeout.as_millis() as u64,
            member_only: added,
        });
    }
    let audit = open_audit(c, &store, n)?;
    let out = persistence::Outbox { net: net.as_ref().map(|n| n.sender()), ids: ids.clone().into() };
    let compact_wanted = Arc::new(AtomicBool::new(false));
    let persist = persistence::Persistence {
        log: clog,
        store,
        out: out.clone(),
        wire,
        compact_at: c.runtime.consensus_log_compact_bytes,
        compact_min: c.runtime.consensus_log_compact_bytes,
        compact_wanted: compact_wanted.clone(),
        served: served.clone(),
        base_path,
        data_dir: c.node.data_dir.clone(),
        snapshot_writer,
        retain_blocks: c.storage.retain_blocks,
        retain_bytes: c.storage.retain_bytes,
        base_kept,
        feed_cursors,
        egress: egress_feed,
        mirror: mirror_feed,
        tracker: shared.tracker.clone(),
        audit,
        me: me_rid,
    };
    let cons = Consensus {
        publishes_events: persist.egress.is_some(),
        net,
        out,
        ids,
        wire,
        served,
        genesis_path: c.genesis_path(),
        _mdns: mdns,
        tracker: shared.tracker.clone(),
        keys: keys.clone(),
        state_queries: state_rx,
        compact_wanted,
    };
    // `/validators` and `/epochs` answer from the start (then the core
    // refreshes them each second).
    let mut logged_by_core = node.state().scheduled_epoch().map(|e| (e.epoch, e.from_height));
    publish_validators(&node, &cons, &shared, &mut logged_by_core);
    let (sh, outs, bell) = (shared.clone(), shard_out.clone(), core_bell.clone());
    let core_pin = c.runtime.pin_cores.then_some(c.runtime.core_core).flatten();
    let storage_pin = c.runtime.pin_cores.then_some(c.runtime.storage_core).flatten();
    let core = std::thread::Builder::new().name("core".into()).spawn(move || {
        pin(core_pin, "core");
        let r = core_loop(node, persist, storage_pin, cons, &outs, &bell, &sh);
        if let Err(e) = &r {
            match e.downcast_ref::<persistence::EpochSwitch>() {
                Some(s) => tracing::info!(epoch = s.epoch, height = s.height, "core stopped to switch validator sets"),
                None => tracing::error!(error = %format!("{e:#}"), "core stopped"),
            }
            sh.stop.store(true, Ordering::SeqCst);
        }
        r
    })?;

    // Direct source acceptor (the glommio shards accept their own).
    if let Some(listener) = listeners.pop() {
        let sh = shared.clone();
        threads.push(std::thread::Builder::new().name("direct".into()).spawn(move || direct::serve(listener, sh))?);
    }
    tracing::info!(addr = %listen, shards, "direct source listening");
    Ok(Running { shared, threads, core: Some(core), dlq: Some(dlq), dlq_done, egress, mirror, listen, stats })
}

/// The validator's signing key, checked against its configured public key.
/// The validator's key, and the key it rotates to (`node.next_key_file`),
/// if one is configured.
fn load_keys(v: &Validated) -> anyhow::Result<(crypto::SigningKey, Option<crypto::SigningKey>)> {
    let c = &v.config;
    let strict_key_mode = c.node.environment == crate::runtime::config::Environment::Production;
    let key = crypto::read_key_file(&c.node.key_file, strict_key_mode).with_context(|| {
        format!("loading the validator key (node.key_file / CONTROL_SIGNING_KEY_PATH = {})", c.node.key_file.display())
    })?;
    let next = match &c.node.next_key_file {
        Some(p) => Some(crypto::read_key_file(p, strict_key_mode).with_context(|| {
            format!("loading the key to rotate to (node.next_key_file / CYBERMESH_NEXT_KEY_FILE = {})", p.display())
        })?),
        None => None,
    };
    Ok((key, next))
}

/// The validator set the chain names now (the genesis set until a set
/// change took effect: `epoch` is the recovered replica's), in id order,
/// and the key this validator signs with in it: its key, or the key it
/// rotates to once the set names that one.
fn current_set(
    v: &Validated,
    state: &crate::protocol::state::State,
    epoch: u64,
    key: crypto::SigningKey,
    next: Option<crypto::SigningKey>,
) -> anyhow::Result<(Vec<u32>, Vec<crypto::PublicKey>, crypto::SigningKey)> {
    let c = &v.config;
    let set = match state.epoch(epoch) {
        Some(e) => e.validators,
        None => v.validators.clone(),
    };
    let Some(&want) = set.get(&c.node.id) else {
        return Err(crate::runtime::recovery::RemovedFromSet { epoch, height: state.height() }.into());
    };
    let key = match (crypto::public_key(&key) == want, next) {
        (true, _) => key,
        (false, Some(n)) if crypto::public_key(&n) == want => n,
        (false, next) if epoch == 0 => bail!(
            "the key in {} has public key {}{}, but VALIDATOR_{}_PUBKEY_HEX is {}: point node.key_file at validator {}'s key or fix the public key",
            c.node.key_file.display(),
            hex::encode(crypto::public_key(&key)),
            next.map(|n| format!(" (node.next_key_file: {})", hex::encode(crypto::public_key(&n)))).unwrap_or_default(),
            c.node.id,
            hex::encode(want),
            c.node.id
        ),
        (false, next) => bail!(
            "validator {}'s key in epoch {epoch} is {}, but node.key_file holds {}{}: point node.key_file (or node.next_key_file) at the key the set change named",
            c.node.id,
            hex::encode(want),
            hex::encode(crypto::public_key(&key)),
            next.map(|n| format!(" and node.next_key_file {}", hex::encode(crypto::public_key(&n)))).unwrap_or_default(),
        ),
    };
    Ok((set.keys().copied().collect(), set.values().copied().collect(), key))
}

/// The DLQ writer thread: the Kafka DLQ topic, or `dlq.jsonl` for the
/// direct source. The flag tells it to drain and stop.
fn start_dlq(
    c: &crate::runtime::config::Config,
    shared: &Shared,
    dlq_rx: Receiver<Rejection>,
) -> anyhow::Result<(std::thread::JoinHandle<()>, Arc<AtomicBool>)> {
    let from_kafka = shared.tracker.is_some();
    let mut sink = if from_kafka {
        DlqSink::Kafka(DlqKafkaSink::new(&c.kafka, c.node.id.to_string(), shared.tracker.clone()).with_context(
            || format!("creating the DLQ producer for {} (KAFKA_BROKERS={})", c.kafka.dlq_topic, c.kafka.brokers),
        )?)
    } else {
        DlqSink::File(
            DlqFileSink::open(
                &c.node.data_dir.join("dlq.jsonl"),
                c.node.id.to_string(),
                c.ingest.dlq_file_max_bytes,
                c.ingest.dlq_file_keep,
            )
            .context("opening the DLQ file")?,
        )
    };
    let (st, dlq_done) = (shared.stats.clone(), Arc::new(AtomicBool::new(false)));
    let dd = dlq_done.clone();
    let dlq = std::thread::Builder::new().name("dlq".into()).spawn(move || dlq_loop(dlq_rx, &mut sink, &st, &dd))?;
    Ok((dlq, dlq_done))
}

/// The verify shards, one thread each (pinned and niced as configured).
fn start_shards(
    c: &crate::runtime::config::Config,
    policy: &Arc<VerifyPolicy>,
    shard_in: &[Arc<Ring<Vec<Incoming>>>],
    shard_out: &[Arc<Ring<Vec<VerifiedTx>>>],
    shard_bells: &[Arc<Doorbell>],
    shared: &Arc<Shared>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = vec![];
    for i in 0..shard_in.len() {
        let (input, output, bell, sh, pol) =
            (shard_in[i].clone(), shard_out[i].clone(), shard_bells[i].clone(), shared.clone(), policy.clone());
        let core = c.runtime.pin_cores.then(|| c.runtime.verify_cores.get(i).copied()).flatten();
        let nice = c.runtime.verify_nice;
        threads.push(std::thread::Builder::new().name(format!("verify-{i}")).spawn(move || {
            pin(core, "verify");
            if nice > 0 {
                set_nice("verify", nice); // runtime.verify_nice
            }
            shard_loop(Verifier::new(pol), &input, &output, &bell, &sh)
        })?);
    }
    Ok(threads)
}

/// QUIC to every other validator; each incoming message rings `bell`.
fn start_net(
    v: &Validated,
    ids: &[u32],
    keys: &[crypto::PublicKey],
    key: &crypto::SigningKey,
    wire: &WireLimits,
    params: &crate::protocol::consensus::pbft::Params,
    bell: &Arc<Doorbell>,
) -> anyhow::Result<Net> {
    let c = &v.config;
    let sock = std::net::UdpSocket::bind(&c.cluster.listen)
        .with_context(|| format!("binding QUIC on {} (P2P_LISTEN_ADDR)", c.cluster.listen))?;
    let p2p = sock.local_addr()?;
    let peers = ids
        .iter()
        .zip(keys)
        .filter(|(id, _)| **id != c.node.id)
        .map(|(id, key)| Peer { id: *id, addr: v.peers.get(id).copied(), key: *key })
        .collect();
    let bell = bell.clone();
    let max_frame = wire::max_frame(wire, params.q());
    let net = Net::start(NetConfig {
        me: c.node.id,
        key: key.clone(),
        socket: sock,
        peers,
        max_frame,
        // One largest frame besides the usual traffic.
        max_queued_bytes: max_frame.saturating_add(128 << 20),
        queue: 8192,
        allowed_ips: v.allowed_ips.clone(),
        wake: Some(Arc::new(move || bell.ring())),
    })
    .context("starting the QUIC transport")?;
    tracing::info!(addr = %p2p, validators = ids.len(), quorum = params.q(), "p2p listening");
    Ok(net)
}

/// The snapshot this validator serves: its newest (`snapshot.bin`), else
/// the one it started from (`blocks.base`).
fn served_snapshot(c: &crate::runtime::config::Config, store: &BlockStore, base_bytes: Option<Vec<u8>>) -> Served {
    let served = match crate::edges::storage::os().read(&c.node.data_dir.join(snapshot::SERVED_FILE)) {
        Ok(bytes) => match proto::ChainSnapshot::decode(&bytes[..]) {
            Ok(s) => Some((s.header.map_or(0, |h| h.height), Arc::new(bytes))),
            Err(e) => {
                tracing::warn!(error = %e, "snapshot.bin does not decode; not serving it");
                None
            }
        },
        Err(_) => None,
    }
    .or_else(|| base_bytes.map(|b| (store.base_height(), Arc::new(b))));
    Arc::new(Mutex::new(served))
}

/// The thread that encodes, writes and then serves each new snapshot.
fn start_snapshot_writer(
    c: &crate::runtime::config::Config,
    served: &Served,
    base_kept: &Arc<AtomicU64>,
) -> anyhow::Result<SyncSender<(Box<snapshot::Recorded>, bool)>> {
    // Encoding a snapshot (tens of MB at 10^5 records) took the core
    // thread hundreds of ms: a commit-latency spike at every snapshot.
    // This thread encodes, writes, then serves it.
    let (tx, rx) = sync_channel::<(Box<snapshot::Recorded>, bool)>(2);
    let path = c.node.data_dir.join(snapshot::SERVED_FILE);
    let base_path = c.node.data_dir.join(snapshot::BASE_FILE);
    let (served, base_kept) = (served.clone(), base_kept.clone());
    std::thread::Builder::new().name("snapshot-writer".into()).spawn(move || {
        // Background work: all validators snapshot the same height at
        // once, and tens of MB sorted, encoded and written at normal
        // priority slowed every commit for a second or so.
        lower_priority("snapshot-writer");
        for (snap, keep_as_base) in rx {
            let height = snap.height();
            let started = std::time::Instant::now();
            let bytes = Arc::new(snapshot::encode(*snap));
            let encode_ms = started.elapsed().as_millis() as u64;
            let written = crate::edges::storage::write_atomically_paced(&path, &bytes);
            let write_ms = started.elapsed().as_millis() as u64 - encode_ms;
            match &written {
                Ok(()) => tracing::debug!(bytes = bytes.len(), "snapshot written"),
                Err(e) => tracing::error!(error = %e, path = %path.display(), "writing the snapshot failed"),
            }
            // The store's blocks up to `height` are durable (the core asked
            // only then): a restart may start from here, and pruning may
            // delete what is below.
            if keep_as_base {
                let kept = match written {
                    Ok(()) => link_as_base(&path, &base_path),
                    Err(_) => write_atomically(&base_path, &bytes),
                };
                match kept {
                    Ok(()) => base_kept.store(height, Ordering::Release),
                    Err(e) => tracing::error!(error = %e, path = %base_path.display(), "keeping the snapshot as the store's base failed; nothing is pruned"),
                }
            }
            let len = bytes.len();
            *served.lock().unwrap() = Some((height, bytes));
            tracing::info!(height, bytes = len, encode_ms, write_ms, "chain snapshot ready");
        }
    })?;
    Ok(tx)
}

/// Makes `base` a second name of the snapshot file `served` (written whole
/// and only ever replaced by a rename, so the two stay the same bytes until
/// the next snapshot): no second copy of tens of MB on disk.
fn link_as_base(served: &std::path::Path, base: &std::path::Path) -> std::io::Result<()> {
    let tmp = base.with_extension("link");
    let _ = std::fs::remove_file(&tmp);
    match std::fs::hard_link(served, &tmp) {
        Ok(()) => crate::edges::storage::os().rename(&tmp, base),
        // A file system without hard links: a copy.
        Err(_) => std::fs::read(served).and_then(|b| write_atomically(base, &b)),
    }
}

/// The audit log (when `AUDIT_SIGNING_KEY` is set), with its `start` record.
fn open_audit(
    c: &crate::runtime::config::Config,
    store: &BlockStore,
    n: usize,
) -> anyhow::Result<Option<crate::edges::audit::AuditLog>> {
    let mut audit = if c.secrets.audit_signing_key.is_empty() {
        None
    } else {
        let path = match c.secrets.audit_log_path.as_str() {
            "" => c.node.data_dir.join("audit.jsonl"),
            p => std::path::PathBuf::from(p),
        };
        let rotation =
            crate::edges::audit::Rotation { max_bytes: c.secrets.audit_log_max_bytes, keep: c.secrets.audit_log_keep };
        let key = crate::edges::audit::key_from(&c.secrets.audit_signing_key);
        let log = crate::edges::audit::AuditLog::open_rotating(&path, key, rotation)
            .context("opening the audit log (a log that does not verify is not extended; `cybermesh audit verify` names the bad line)")?;
        tracing::info!(path = %path.display(), "audit log");
        Some(log)
    };
    if let Some(a) = &mut audit {
        let fields = serde_json::json!({
            "validator": c.node.id,
            "config_hash": hex::encode(c.consensus_fingerprint()),
            "height": store.height(),
            "validators": n,
        });
        a.record(now_ms(), "start", fields)?;
        a.flush()?;
    }
    Ok(audit)
}

/// Where rejections go: the Kafka DLQ topic, or a file for the direct source.
enum DlqSink {
    File(DlqFileSink),
    Kafka(DlqKafkaSink),
}

impl DlqSink {
    fn write(&mut self, r: &Rejection) -> std::io::Result<()> {
        match self {
            DlqSink::File(f) => f.write(r),
            DlqSink::Kafka(k) => {
                k.write(r);
                Ok(())
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            DlqSink::File(f) => f.flush(),
            // The threaded producer delivers in the background; each
            // acknowledgement finishes its message. Waiting here (or a
            // zero-timeout flush, which warns while records are in flight)
            // would only stall the writer.
            DlqSink::Kafka(_) => Ok(()),
        }
    }
}

fn dlq_loop(rx: Receiver<Rejection>, sink: &mut DlqSink, stats: &RuntimeStats, done: &AtomicBool) {
    let mut written = 0u64;
    loop {
        let r = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(_) if done.load(Ordering::SeqCst) => match rx.try_recv() {
                Ok(r) => r,
                Err(_) => {
                    if let DlqSink::Kafka(k) = sink {
                        k.flush(Duration::from_secs(5)); // acknowledged records finish their messages
                    }
                    return;
                }
            },
            Err(_) => continue,
        };
        let mut next = Some(r);
        while let Some(r) = next {
            stats.rejected.add(r.reason);
            tracing::debug!(reason = r.reason.as_str(), detail = %r.detail, origin = %r.origin, "rejected");
            match sink.write(&r) {
                Ok(()) => written += 1,
                Err(e) => tracing::error!(error = %e, "DLQ write failed"),
            }
            next = rx.try_recv().ok();
        }
        match sink.flush() {
            // Tests wait on this event rather than polling the file.
            Ok(()) => tracing::debug!(total = written, "dlq flushed"),
            Err(e) => tracing::error!(error = %e, "DLQ flush failed"),
        }
    }
}

pub use direct::MAX_DIRECT_CONNECTIONS;

/// The Kafka source: one consumer thread (its own group: every validator
/// reads every message) feeding the shards like a direct connection.
fn start_kafka_source(
    c: &crate::runtime::config::Config,
    tracker: Arc<OffsetTracker>,
    shared: &Arc<Shared>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let group = crate::edges::kafka::group_id(&c.kafka, c.node.id);
    let consumer: rdkafka::consumer::BaseConsumer = crate::edges::kafka::client_config(&c.kafka)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("enable.partition.eof", "false")
        .set("queued.max.messages.kbytes", "65536")
        // Topics created after the validator starts are picked up within seconds.
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create()
        .context("creating the Kafka consumer")?;
    {
        use rdkafka::consumer::Consumer;
        consumer.fetch_metadata(None, Duration::from_secs(10)).with_context(|| {
            format!(
                "cannot reach Kafka at KAFKA_BROKERS={} (check the address, TLS and SASL settings)",
                c.kafka.brokers
            )
        })?;
        let missing = crate::edges::kafka::ensure_topics(&c.kafka)?;
        if !missing.is_empty() {
            // Not fatal: the consumer picks topics up as they appear.
            tracing::warn!(
                topics = ?missing,
                "Kafka topics missing; waiting for them (create them, or set KAFKA_CREATE_TOPICS=true on a broker that allows it)"
            );
        }
        let topics: Vec<&str> = c.kafka.input_topics.iter().map(|t| t.as_str()).collect();
        consumer.subscribe(&topics).context("subscribing to KAFKA_INPUT_TOPICS")?;
    }
    tracing::info!(group, topics = ?c.kafka.input_topics, "Kafka source subscribed");
    let sh = shared.clone();
    Ok(std::thread::Builder::new()
        .name("kafka-consume".into())
        .spawn(move || kafka::consumer_loop(consumer, tracker, &sh))?)
}

/// Egress (with Kafka): signed commit events from the block store, from a
/// persisted cursor, on their own thread.
fn start_egress(
    c: &crate::runtime::config::Config,
    stop: &Arc<AtomicBool>,
    stats: &RuntimeStats,
    store: &BlockStore,
    key: &crypto::SigningKey,
    held: &[crypto::SigningKey],
    epochs: &[crate::protocol::reconfig::Epoch],
) -> anyhow::Result<(BlockFeed<crate::edges::egress::HeightEvents>, std::thread::JoinHandle<()>)> {
    let cursor_path = c.node.data_dir.join("commits.cursor");
    let cursor = crate::edges::egress::read_cursor(&cursor_path)
        .with_context(|| format!("reading the commit-event cursor {}", cursor_path.display()))?;
    let (tx, rx) = sync_channel::<crate::edges::egress::HeightEvents>(1024);
    let (kc, st) = (c.kafka.clone(), stop.clone());
    let lat = stats.latencies.kafka_produce.clone();
    let handle = std::thread::Builder::new().name("egress".into()).spawn(move || {
        if let Err(e) = crate::edges::egress::publish_loop(&kc, rx, cursor_path, cursor, &st, lat) {
            tracing::error!(error = %format!("{e:#}"), "commit-event publisher stopped");
        }
    })?;
    tracing::info!(topic = %c.kafka.commits_topic, cursor, "publishing commit events");
    let next = (cursor + 1).max(store.lowest());
    let events = crate::edges::egress::EventMaker::new(key.clone(), epochs.to_vec(), &c.kafka, c.node.id.to_string())
        .with_older_keys(held.to_vec());
    let make: MakeItem<_> = Box::new(move |b, cert, outcome| events.for_block(b, cert, outcome));
    Ok((BlockFeed::new(tx, next, make), handle))
}

/// The database mirror (ENABLE_PERSISTENCE): its own thread, fed from the
/// block store from its persisted cursor.
fn start_mirror(
    v: &Validated,
    stop: &Arc<AtomicBool>,
    stats: &RuntimeStats,
    store: &BlockStore,
) -> anyhow::Result<(BlockFeed<crate::edges::persist::MirrorBlock>, std::thread::JoinHandle<()>)> {
    let c = &v.config;
    let cursor_path = c.node.data_dir.join("mirror.cursor");
    let cursor = crate::edges::egress::read_cursor(&cursor_path)
        .with_context(|| format!("reading the mirror cursor {}", cursor_path.display()))?;
    let (tx, rx) = sync_channel::<crate::edges::persist::MirrorBlock>(1024);
    let mcfg = crate::edges::persist::MirrorConfig {
        dsn: c.database.dsn.clone(),
        retry_min: c.database.retry_min,
        retry_max: c.database.retry_max,
        batch_blocks: 256,
        copy: c.database.write_mode == "copy",
        validators: v.validators.iter().map(|(id, k)| (*id, *k)).collect(),
    };
    let (st, ms, lat) = (stop.clone(), stats.mirror.clone(), stats.latencies.persistence.clone());
    let handle = std::thread::Builder::new()
        .name("persist".into())
        .spawn(move || crate::edges::persist::mirror_loop(mcfg, rx, cursor_path, st, ms, lat))?;
    tracing::info!(cursor, "mirroring blocks to the database");
    let next = (cursor + 1).max(store.lowest());
    let make: MakeItem<_> = Box::new(|b, _, outcome| crate::edges::persist::MirrorBlock::new(b.clone(), outcome));
    Ok((BlockFeed::new(tx, next, make), handle))
}

/// The HTTP API and metrics (ENABLE_API): a thread reading published stats.
fn start_api(
    c: &crate::runtime::config::Config,
    info: crate::edges::api::StaticInfo,
    stats: &Arc<RuntimeStats>,
    stop: &Arc<AtomicBool>,
    state_tx: SyncSender<crate::edges::api::StateQuery>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let tls = if c.api.tls_enabled {
        let read = |p: &str, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the API {what} {p} (API_TLS_{})", what.to_uppercase()))
        };
        let cfg = crate::edges::api::tls_config(&read(&c.api.tls_cert, "cert")?, &read(&c.api.tls_key, "key")?)
            .map_err(|e| anyhow::anyhow!("API TLS (API_TLS_CERT, API_TLS_KEY): {e}"))?;
        Some(cfg)
    } else {
        None
    };
    let listener = std::net::TcpListener::bind(&c.api.listen)
        .with_context(|| format!("starting the HTTP API on {} (API_LISTEN_ADDR)", c.api.listen))?;
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (st, sp) = (stats.clone(), stop.clone());
    let lat = stats.latencies.clone();
    let reader = crate::edges::store::BlockStoreReader::open(&c.node.data_dir, c.limits())
        .context("opening the block store for the API")?;
    let api = crate::edges::api::Api::new(info, st, &lat, Some(reader), state_tx)
        .map_err(|e| anyhow::anyhow!("metrics registry: {e}"))?;
    let handle = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || crate::edges::api::serve(listener, tls, api, sp))?;
    tracing::info!(addr = %addr, "HTTP API listening");
    Ok(handle)
}

fn send_reject(sh: &Shared, reason: RejectReason, detail: String, origin: &str, original: &[u8]) {
    let _ = sh.dlq.send(Rejection {
        reason,
        detail,
        origin: origin.to_string(),
        original: original.to_vec(),
        pos: None,
        height: None,
    });
}

fn shard_loop(
    mut v: Verifier,
    input: &Ring<Vec<Incoming>>,
    output: &Ring<Vec<VerifiedTx>>,
    bell: &Doorbell,
    sh: &Shared,
) {
    loop {
        let batch = take_batch(input, sh.batch);
        if batch.is_empty() {
            if sh.stop.load(Ordering::Relaxed) {
                return;
            }
            idle_wait(sh.idle, bell, Duration::from_millis(100), || !input.is_empty());
            continue;
        }
        let taken = batch.len();
        sh.verifying.fetch_add(taken, Ordering::Relaxed);
        let ok = verify_batch(&mut v, batch, sh);
        let pushed = ok.is_empty() || output.push(ok, sh.idle, &sh.stop).is_ok();
        sh.verifying.fetch_sub(taken, Ordering::Relaxed);
        if !pushed {
            return;
        }
    }
}

/// Up to about `max` txs from a shard's ring (whole batches).
fn take_batch(input: &Ring<Vec<Incoming>>, max: usize) -> Vec<Incoming> {
    let mut batch: Vec<Incoming> = Vec::new();
    while batch.len() < max {
        match input.pop() {
            Some(mut b) => batch.append(&mut b),
            None => break,
        }
    }
    batch
}

/// One batch through the checks and the batched verification: the
/// rejected go to the DLQ, the verified are returned.
fn verify_batch(v: &mut Verifier, batch: Vec<Incoming>, sh: &Shared) -> Vec<VerifiedTx> {
    let waited: Vec<u64> = batch.iter().map(|i| i.received_ms).collect();
    let (mut ok, mut bad) = (Vec::with_capacity(batch.len()), Vec::new());
    let started = std::time::Instant::now();
    v.process(batch, now_ms(), mono_ms(), &mut ok, &mut bad);
    sh.stats.verify_busy_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    let verified_ms = mono_ms();
    let h = sh.stats.latencies.stage("verify");
    for received_ms in waited {
        h.observe(verified_ms.saturating_sub(received_ms) as f64);
    }
    sh.stats.verified.fetch_add(ok.len() as u64, Ordering::Relaxed);
    for r in bad {
        let _ = sh.dlq.send(r);
    }
    ok
}

fn commit_frame(block: &Block) -> Arc<Vec<u8>> {
    let m = proto::DirectCommit {
        height: block.header.height,
        block_hash: block.hash().to_vec(),
        timestamp_ms: block.header.timestamp_ms,
        nonces: block.txs.iter().map(|t| t.nonce.to_vec()).collect(),
    };
    let mut buf = Vec::with_capacity(m.encoded_len() + 4);
    crate::edges::direct::write_frame(&mut buf, &m.encode_to_vec()).expect("vec write");
    Arc::new(buf)
}

/// The encoded snapshot served to joiners: set by the snapshot writer,
/// read by the core thread when a joiner asks.
type Served = Arc<Mutex<Option<(Seq, Arc<Vec<u8>>)>>>;

/// The core thread's consensus I/O: the transport, id maps, and the queue
/// to the persistence thread (which owns the files: `persistence`).
struct Consensus {
    net: Option<Net>,
    /// Sends that need no sync (the persistence thread has its own).
    out: persistence::Outbox,
    /// Replica index -> validator id.
    ids: Vec<u32>,
    wire: WireLimits,
    /// The encoded chain snapshot served to joining validators, by height.
    served: Served,
    /// Where the genesis certificate is kept.
    genesis_path: std::path::PathBuf,
    /// mDNS discovery, while it runs (dropped with the core: unregisters).
    _mdns: Option<crate::edges::mdns::Discovery>,
    /// Commit events go to Kafka: verdicts of committed state go out with them.
    publishes_events: bool,
    /// Kafka source: txs dropped unexecuted finish their messages.
    tracker: Option<Arc<OffsetTracker>>,
    /// Validator keys in replica order.
    keys: Vec<crypto::PublicKey>,
    /// `/state/{key}` lookups from the API thread.
    state_queries: Receiver<crate::edges::api::StateQuery>,
    /// Raised by the persistence thread once the consensus log outgrew its
    /// compaction size.
    compact_wanted: Arc<AtomicBool>,
}

impl Consensus {
    fn rid_of(&self, id: u32) -> Option<Rid> {
        self.ids.iter().position(|&i| i == id)
    }
}

/// Reuses a stored certificate if it matches this configuration (any
/// difference is named and aborts the start); otherwise the ceremony runs.
fn load_genesis(c: &crate::runtime::config::Config, v: &Validated, key: crypto::SigningKey) -> anyhow::Result<Genesis> {
    let path = c.genesis_path();
    let config_hash = c.consensus_fingerprint();
    let cert = crate::runtime::recovery::genesis_certificate(
        &*crate::edges::storage::os(),
        &path,
        &config_hash,
        &v.validators,
    )?;
    if let Some(cert) = &cert {
        tracing::info!(path = %path.display(), genesis_time_ms = cert.genesis_time_ms, "genesis certificate reused");
    }
    let skew = c.genesis.clock_skew_tolerance.as_millis() as u64;
    Ok(Genesis::new(
        Ceremony::new(c.node.id, config_hash, v.validators.clone(), skew),
        key,
        cert.is_some(),
        c.genesis.ready_refresh_interval.as_millis() as u64,
        c.genesis.ready_timeout.as_millis() as u64,
        clocks(),
    ))
}

/// Runs the core thread's passes beside the persistence thread it starts
/// (`persistence::run`); when either stops, the other is stopped and the
/// first error is returned (the persistence thread's, when it caused it).
fn core_loop(
    node: Node<Ed25519Auth>,
    persist: persistence::Persistence,
    storage_pin: Option<usize>,
    cons: Consensus,
    inputs: &[Arc<Ring<Vec<VerifiedTx>>>],
    bell: &Doorbell,
    sh: &Shared,
) -> anyhow::Result<()> {
    let (jobs, queued) = sync_channel(persistence::JOBS_QUEUED_MAX);
    std::thread::scope(|s| {
        let writer = std::thread::Builder::new().name("storage".into()).spawn_scoped(s, move || {
            pin(storage_pin, "storage");
            let r = persistence::run(persist, queued, sh);
            if let Err(e) = &r {
                tracing::error!(error = %format!("{e:#}"), "storage thread stopped");
            }
            r
        })?;
        // `jobs` ends with the passes: the thread carries out what was queued, then ends.
        let passes = core_passes(node, &cons, jobs, inputs, bell, sh, &writer);
        let written = writer.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the storage thread panicked")));
        match (passes, written) {
            (Err(e), Ok(())) if e.is::<PersistenceStopped>() => Err(anyhow::anyhow!("the storage thread stopped")),
            (Err(e), Ok(())) => Err(e),
            (_, Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    })
}

fn core_passes(
    mut node: Node<Ed25519Auth>,
    cons: &Consensus,
    jobs: SyncSender<persistence::Job>,
    inputs: &[Arc<Ring<Vec<VerifiedTx>>>],
    bell: &Doorbell,
    sh: &Shared,
    writer: &std::thread::ScopedJoinHandle<'_, anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut out: Vec<Output> = Vec::new();
    let mut last_log = now_ms();
    let mut last_validators = 0u64;
    // The set change last logged as scheduled (`publish_validators`).
    let mut announced = None;
    // When each peer was last heard from (p2p_peers_connected, /ready).
    let mut last_heard: std::collections::HashMap<u32, u64> = Default::default();
    // When this validator next tells its peers it is alive (idle or not).
    let mut next_alive_ms = 0u64;
    loop {
        let clock = clocks();
        let now = clock.wall_ms;
        let mut worked = false;
        // Consensus starts once genesis (and a snapshot join) is done; until
        // then txs wait in the rings (`has_room` says no) and the node
        // drops consensus messages (peers retransmit).
        for ring in inputs.iter() {
            while node.has_room() {
                let Some(batch) = ring.pop() else { break };
                node.on_txs(clock, batch, &mut out);
                worked = true;
            }
        }
        // Txs still on their way through this validator's own shards: a
        // proposal's missing bodies are likely among them.
        node.set_source_busy(
            inputs.iter().any(|r| !r.is_empty())
                || sh.shard_in.iter().any(|r| !r.is_empty())
                || sh.verifying.load(Ordering::Relaxed) > 0,
        );
        if let Some(net) = &cons.net {
            // Connection events first: a peer's new connection precedes its
            // messages on it.
            on_net_events(&mut node, net);
        }
        let msgs = cons.net.as_ref().map(|net| net.take_incoming(4096)).unwrap_or_default();
        for (from, bytes) in msgs {
            worked = true;
            last_heard.insert(from, now);
            on_frame(&mut node, cons, sh, clock, from, &bytes, &mut out)?;
        }
        // Timers only when one is due (`poll_timeout_ms` is exact, genesis
        // and the join included; the simulator ticks the same way).
        if clock.mono_ms >= node.poll_timeout_ms() {
            node.on_tick(clock, &mut out);
        }
        if !out.is_empty() {
            worked = true;
            execute(&node, &mut out, cons, &jobs, sh)?;
        }
        observe_latencies(&mut node, sh);
        if let Some(t) = &cons.tracker {
            for p in node.take_dropped() {
                t.finish(&p);
            }
        }
        let peers = last_heard.values().filter(|&&t| now < t + 5000).count() as u64;
        publish_gauges(&node, cons, sh, peers);
        if now >= next_alive_ms {
            next_alive_ms = now + ALIVE_INTERVAL_MS;
            if let Some(net) = &cons.net {
                net.broadcast(Arc::new(wire::encode_alive()));
            }
        }
        while let Ok(q) = cons.state_queries.try_recv() {
            let _ = q.reply.try_send(crate::edges::api::state_answer(node.state(), &q.key));
        }
        if now >= last_validators + 1000 {
            last_validators = now;
            publish_validators(&node, cons, sh, &mut announced);
            // Once a second: it walks the peers' checkpoints.
            sh.stats.lag_blocks.store(node.lag_blocks(), Ordering::Relaxed);
        }
        if now >= last_log + 5000 {
            last_log = now;
            log_progress(&node, sh);
        }
        if sh.stop.load(Ordering::Relaxed) && inputs.iter().all(|r| r.is_empty()) {
            return Ok(());
        }
        if writer.is_finished() {
            return Err(PersistenceStopped.into());
        }
        if !worked {
            let wait = node.poll_timeout_ms().saturating_sub(mono_ms()).clamp(1, 100);
            let room = node.has_room();
            let net_ready = || cons.net.as_ref().is_some_and(|n| n.has_incoming());
            idle_wait(sh.idle, bell, Duration::from_millis(wait), || {
                (room && inputs.iter().any(|r| !r.is_empty())) || net_ready()
            });
        }
    }
}
/// Connections opened and failed (a peer's inbound connection may restart
/// a genesis exchange with it).
fn on_net_events(node: &mut Node<Ed25519Auth>, net: &Net) {
    for e in net.events.try_iter() {
        match e {
            NetEvent::Connected { peer, outgoing } => {
                tracing::debug!(peer, outgoing, "peer connected");
                if !outgoing {
                    node.on_peer_connected(peer);
                }
            }
            NetEvent::Failed { addr, reason } => tracing::debug!(%addr, reason, "peer connection failed"),
            NetEvent::Oversized { peer, len } => {
                tracing::warn!(peer, len, "peer sent an oversized frame; connection closed")
            }
        }
    }
}

/// One frame from a peer, decoded and handed to the node.
fn on_frame(
    node: &mut Node<Ed25519Auth>,
    cons: &Consensus,
    sh: &Shared,
    clock: Now,
    from: u32,
    bytes: &[u8],
    out: &mut Vec<Output>,
) -> anyhow::Result<()> {
    let Some(rid) = cons.rid_of(from) else { return Ok(()) };
    match wire::decode_frame(bytes, &cons.wire) {
        Ok(Frame::Pbft(m)) => {
            let counter = match &m {
                _ if !node.started() => None, // dropped: peers retransmit
                Message::PrePrepare(_) => Some(&sh.stats.proposals_received),
                Message::Vote(v) if v.body.phase == crate::protocol::consensus::pbft::Phase::Prepare => {
                    Some(&sh.stats.prepares_received)
                }
                Message::Vote(_) => Some(&sh.stats.commits_received),
                _ => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
            node.on_message(clock, rid, m, out)
        }
        Ok(Frame::Alive) => {} // heard from: that is all
        Ok(Frame::Forward(txs)) => node.on_forward(clock, rid, txs, out),
        Ok(Frame::TxFetch { seq, tx_hashes }) => node.on_tx_fetch(clock, rid, seq, tx_hashes, out),
        Ok(Frame::TxBodies { seq, txs }) => node.on_bodies(clock, rid, seq, txs, out),
        Ok(Frame::FetchPruned { lowest }) => node.on_fetch_pruned(clock, rid, lowest, out),
        Ok(Frame::Genesis(a)) => node.on_genesis_attestation(clock, from, a, out).context("genesis ceremony failed")?,
        Ok(Frame::SnapshotRequest(r)) => node.on_snapshot_request(rid, r, out),
        Ok(Frame::SnapshotChunk(c)) => node.on_snapshot_chunk(clock, rid, c, out),
        Err(e) => tracing::debug!(peer = from, error = %e, "undecodable consensus message"),
    }
    Ok(())
}

/// Carries out the node's outputs (`perform`), after publishing the
/// counts they change; asks for a compaction of the consensus log at a
/// stable checkpoint once the persistence thread found it big.
fn execute(
    node: &Node<Ed25519Auth>,
    out: &mut Vec<Output>,
    cons: &Consensus,
    jobs: &SyncSender<persistence::Job>,
    sh: &Shared,
) -> anyhow::Result<()> {
    // Counted once, in the core (`NodeStats`); published before
    // the commit notices go out, so a client that saw its commit
    // sees it counted.
    let s = node.stats();
    sh.stats.view_changes.store(s.view_changes, Ordering::Relaxed);
    sh.stats.blocks_committed.store(s.committed_blocks, Ordering::Relaxed);
    sh.stats.committed_txs.store(s.committed_txs, Ordering::Relaxed);
    let stable = perform(out, cons, jobs, sh)?;
    // Keep only what recovery needs (values below the checkpoint are in
    // the store, or queued for it ahead of this job).
    if stable && cons.compact_wanted.swap(false, Ordering::AcqRel) {
        queue(jobs, persistence::Job::Compact(node.replica().durable_records()))?;
    }
    Ok(())
}

/// Hands a job to the persistence thread, waiting while its queue is full
/// (the disk is behind: the core waits for it rather than run ahead).
fn queue(jobs: &SyncSender<persistence::Job>, job: persistence::Job) -> anyhow::Result<()> {
    jobs.send(job).map_err(|_| anyhow::Error::new(PersistenceStopped))
}

/// The persistence thread ended (its error is the cause, `core_loop`
/// reports it).
#[derive(Debug, thiserror::Error)]
#[error("the storage thread stopped")]
struct PersistenceStopped;

/// Carries out what needs no sync and no store at once (forwards, tx
/// fetches, genesis and snapshot-join messages, rejections); queues the
/// rest, in order, for the persistence thread. Returns whether a stable
/// checkpoint was reached.
fn perform(
    out: &mut Vec<Output>,
    cons: &Consensus,
    jobs: &SyncSender<persistence::Job>,
    sh: &Shared,
) -> anyhow::Result<bool> {
    let executed_ms = now_ms();
    let mut ready = Ready::from_outputs(out.drain(..));
    let mut switched = None;
    for o in std::mem::take(&mut ready.effects) {
        if let Output::EpochSwitched { epoch, me } = o {
            switched = Some((epoch, me));
        } else if persistence::is_persistence_effect(&o) {
            if let Output::Evidence { .. } = o {
                sh.stats.evidence.fetch_add(1, Ordering::Relaxed);
            }
            ready.effects.push(o);
        } else {
            perform_effect(o, cons, sh)?;
        }
    }
    let stable = ready.stable;
    let empty = ready.effects.is_empty()
        && ready.records.is_empty()
        && ready.sends.is_empty()
        && ready.commits.is_empty()
        && ready.after_commits.is_empty();
    if !empty {
        queue(jobs, persistence::Job::Ready { ready, executed_ms })?;
    }
    // A new validator set: stop here (the storage thread makes the new
    // epoch's log marker durable with everything queued before it) and
    // start again on the set the state now names.
    if let Some((epoch, me)) = switched {
        let (e, height) = (epoch.epoch, epoch.from_height);
        return Err(match me {
            Some(_) => anyhow::Error::new(persistence::EpochSwitch { epoch: e, height }),
            None => anyhow::Error::new(crate::runtime::recovery::RemovedFromSet { epoch: e, height }),
        });
    }
    Ok(stable)
}

/// One output the core carries out itself (`persistence::is_persistence_effect`
/// names the others).
fn perform_effect(o: Output, cons: &Consensus, sh: &Shared) -> anyhow::Result<()> {
    match o {
        // Verdicts of committed state go out with their block's events
        // when those are published (Kafka); else to the DLQ file now.
        Output::Reject(r) if r.height.is_some() && cons.publishes_events => {}
        Output::Reject(r) => {
            let _ = sh.dlq.send(r);
        }
        Output::Genesis(GenesisOutput::Attest { to, attestation }) => {
            if let Some(net) = &cons.net {
                let frame = Arc::new(wire::encode_genesis(&attestation));
                match to {
                    Some(peer) => {
                        net.send(peer, frame);
                    }
                    None => net.broadcast(frame),
                }
            }
        }
        Output::Genesis(GenesisOutput::Complete(cert)) => {
            let path = &cons.genesis_path;
            crate::edges::storage::os()
                .write_atomically(path, &serde_json::to_vec_pretty(&cert)?)
                .with_context(|| format!("writing the genesis certificate {}", path.display()))?;
            tracing::info!(path = %path.display(), genesis_time_ms = cert.genesis_time_ms, "genesis complete");
        }
        Output::Genesis(GenesisOutput::StillWaiting(waiting_for)) => {
            tracing::warn!(?waiting_for, "genesis: still waiting for ready attestations (GENESIS_READY_TIMEOUT passed); start those validators or check P2P_BOOTSTRAP_PEERS");
        }
        Output::SnapshotRequest { to, request } => {
            let frame = wire::encode_snapshot_request(request);
            match to {
                Some(peer) => cons.out.send_frame(peer, frame),
                None => cons.out.broadcast_frame(frame),
            }
        }
        Output::ServeSnapshot { to, request } => {
            let served = cons.served.lock().unwrap().clone();
            let chunk = snapshot::answer(served.as_ref().map(|(s, b)| (*s, b.as_slice())), &request);
            cons.out.send_frame(to, wire::encode_snapshot_chunk(chunk));
        }
        Output::Forward { to, txs } => cons.out.send_frame(to, wire::encode_forward(&txs)),
        Output::FetchTxs { to, seq, tx_hashes } => cons.out.send_frame(to, wire::encode_tx_fetch(seq, &tx_hashes)),
        Output::SendTxs { to, seq, txs } => cons.out.send_bodies(to, seq, &txs),
        other => {
            unreachable!("{other:?} is the persistence thread's (`Ready` and `is_persistence_effect` sort it there)")
        }
    }
    Ok(())
}

/// The core's latency figures, handed to the histograms.
fn observe_latencies(node: &mut Node<Ed25519Auth>, sh: &Shared) {
    for (stage, ms, txs) in node.take_latencies() {
        let h = sh.stats.latencies.stage(stage.as_str());
        for _ in 0..txs {
            h.observe(ms as f64);
        }
    }
    for (stage, ns) in node.take_stage_times() {
        let h = match stage {
            Stage::BuildBlock => &sh.stats.latencies.block_build,
            Stage::Execute => &sh.stats.latencies.state_execution,
        };
        h.observe(ns as f64 / 1e6);
    }
}

/// The levels `/status` and `/metrics` read, published after each pass.
fn publish_gauges(node: &Node<Ed25519Auth>, cons: &Consensus, sh: &Shared, peers_connected: u64) {
    let st = &sh.stats;
    st.duplicates.store(node.stats().duplicates, Ordering::Relaxed);
    st.mempool_size.store(node.mempool_len() as u64, Ordering::Relaxed);
    st.mempool_bytes.store(node.mempool_bytes() as u64, Ordering::Relaxed);
    let view = node.replica().view();
    st.genesis_done.store(node.genesis_done(), Ordering::Relaxed);
    st.joining.store(node.joining(), Ordering::Relaxed);
    st.leader.store(cons.ids.get(node.replica().primary(view)).copied().unwrap_or(0) as u64, Ordering::Relaxed);
    st.peers_connected.store(peers_connected, Ordering::Relaxed);
    st.ring_occupancy.store(sh.shard_in.iter().map(|r| r.len() as u64).sum(), Ordering::Relaxed);
    st.view.store(view, Ordering::Relaxed);
    if let Some(net) = &cons.net {
        st.p2p_bytes_sent.store(net.stats.bytes_sent.load(Ordering::Relaxed), Ordering::Relaxed);
        st.p2p_bytes_received.store(net.stats.bytes_received.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// The validator set as `/validators` shows it; a newly scheduled set
/// change is logged once (`announced`: the epoch and switch height last
/// logged), after the page shows it.
fn publish_validators(node: &Node<Ed25519Auth>, cons: &Consensus, sh: &Shared, announced: &mut Option<(u64, u64)>) {
    let rep = node.reputation();
    let leader = node.replica().primary(node.replica().view());
    let v: Vec<serde_json::Value> = cons
        .ids
        .iter()
        .zip(&cons.keys)
        .enumerate()
        .map(|(r, (id, key))| {
            serde_json::json!({
                "id": id,
                "public_key": hex::encode(key),
                "reputation": rep.score(r),
                "excluded": rep.excluded().contains(&r),
                "quarantined": rep.is_quarantined(r),
                "leader": leader == r,
            })
        })
        .collect();
    let set = |e: &crate::protocol::reconfig::Epoch| -> Vec<serde_json::Value> {
        e.validators.iter().map(|(id, key)| serde_json::json!({"id": id, "public_key": hex::encode(key)})).collect()
    };
    let current = node.state().current_epoch();
    let scheduled = node.state().scheduled_epoch();
    let page = serde_json::json!({
        "epoch": current.as_ref().map_or(0, |e| e.epoch),
        // The set orders the heights above this one (0: genesis).
        "from_height": current.as_ref().map_or(0, |e| e.from_height),
        "validators": v,
        // A change ordered and executed: it takes effect above its switch height.
        "scheduled": scheduled.as_ref().map(|e| serde_json::json!({
            "epoch": e.epoch,
            "switch_height": e.from_height,
            "validators": set(e),
        })),
    });
    *sh.stats.validators_json.lock().unwrap() = Some(Arc::new(page));
    // The chain of epochs from genesis: each set with the change, signed by
    // the set before, that made it (what a consumer checks certificates by).
    let state = node.state();
    let epochs: Vec<serde_json::Value> = (0..=current.as_ref().map_or(0, |e| e.epoch))
        .filter_map(|e| state.epoch(e))
        .map(|e| {
            serde_json::json!({
                "epoch": e.epoch,
                "from_height": e.from_height,
                "validators": set(&e),
                "change": state.epoch_change(e.epoch).map(hex::encode),
            })
        })
        .collect();
    *sh.stats.epochs_json.lock().unwrap() = Some(Arc::new(serde_json::json!({ "epochs": epochs })));
    let now = scheduled.as_ref().map(|e| (e.epoch, e.from_height));
    if now != *announced {
        if let Some(e) = &scheduled {
            let ids: Vec<u32> = e.validators.keys().copied().collect();
            tracing::info!(
                epoch = e.epoch,
                switch_height = e.from_height,
                validators = ?ids,
                "validator set change scheduled; it takes effect above the switch height"
            );
        }
        *announced = now;
    }
}

/// The operator's periodic progress line.
fn log_progress(node: &Node<Ed25519Auth>, sh: &Shared) {
    let s = node.stats();
    tracing::info!(
        height = node.height(),
        view = node.replica().view(),
        committed_txs = s.committed_txs,
        mempool = node.mempool_len(),
        rejected = sh.stats.rejected.total(),
        duplicates = s.duplicates,
        rate_limited = s.rate_limited,
        forwarded = s.forwarded,
        forwards_admitted = s.forwards_admitted,
        censorship_suspicions = s.censorship_suspicions,
        proposals_refused = s.proposals_refused,
        "progress"
    );
}

/// How often a validator tells every peer it is alive: well inside the 5 s
/// within which a peer counts as connected, so idle peers stay counted.
const ALIVE_INTERVAL_MS: u64 = 1_000;

/// Sets up logging per the config (idempotent).
pub fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { b.json().try_init() } else { b.try_init() };
}

/// `cybermesh run`: load and validate the config, start, run until SIGINT/SIGTERM.
pub fn run_blocking(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let cfg = crate::runtime::config::Config::load(config)?;
    init_logging(&cfg.log.level, cfg.log.format == "json");
    let v = cfg.validate()?;
    let signal = Arc::new(AtomicBool::new(false));
    let signals = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];
    for sig in signals {
        signal_hook::flag::register(sig, signal.clone()).context("installing signal handlers")?;
    }
    loop {
        // A stop flag per run: a run that ends on a full disk raises its own.
        let stop = Arc::new(AtomicBool::new(false));
        for sig in signals {
            signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
        }
        let result = start(v.clone(), stop).and_then(|running| running.wait());
        match result {
            Ok(()) => {
                tracing::info!("stopped");
                return Ok(());
            }
            Err(e) if is_disk_full(&e) && !signal.load(Ordering::Relaxed) => {
                let reason = format!("{e:#}");
                wait_for_disk_space(&v.config, &reason, &signal)?;
                if signal.load(Ordering::Relaxed) {
                    return Err(e);
                }
                tracing::info!(data_dir = %v.config.node.data_dir.display(), "disk space freed; starting again");
            }
            Err(e) if e.downcast_ref::<persistence::RejoinRequired>().is_some() && !signal.load(Ordering::Relaxed) => {
                tracing::info!("starting again to join from a snapshot");
            }
            Err(e) if e.downcast_ref::<persistence::EpochSwitch>().is_some() && !signal.load(Ordering::Relaxed) => {
                tracing::info!("starting again on the new validator set");
            }
            Err(e) if e.downcast_ref::<crate::runtime::recovery::RemovedFromSet>().is_some() => {
                tracing::warn!("{e:#}");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `e` comes from a write that found the disk full (ENOSPC, or a
/// quota: EDQUOT).
fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = c.downcast_ref::<std::io::Error>().or_else(|| {
            match c.downcast_ref::<crate::edges::framed::FramedError>() {
                Some(crate::edges::framed::FramedError::Io { source, .. }) => Some(source),
                _ => None,
            }
        });
        io.is_some_and(|io| matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    })
}

/// Bytes free for this process on the file system holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    disk_space(dir).map(|(free, _)| free)
}

/// Bytes free to an unprivileged writer and in all, of `dir`'s file system.
fn disk_space(dir: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct it is given; `c` is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0)
            .then(|| (st.f_bavail as u64 * st.f_frsize as u64, st.f_blocks as u64 * st.f_frsize as u64))
    }
}

/// Space freed on top of what was left when the disk filled before the
/// validator starts again.
const RESUME_FREE_BYTES: u64 = 4 * 1024 * 1024;

/// The data disk is full: nothing more is appended (every durable record is
/// intact: appends are all-or-nothing, see `crate::edges::framed`). Until space is
/// freed, the API (if enabled) answers `/health` and `/ready` with 503 and
/// the reason; then the caller starts the validator again.
fn wait_for_disk_space(
    c: &crate::runtime::config::Config,
    reason: &str,
    signal: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let dir = &c.node.data_dir;
    let free_at_stop = free_bytes(dir).unwrap_or(0);
    let want = free_at_stop + RESUME_FREE_BYTES;
    tracing::error!(
        data_dir = %dir.display(),
        free_bytes = free_at_stop,
        resume_at_free_bytes = want,
        error = reason,
        "the data disk is full: the validator stopped appending and starts again once space is freed"
    );
    let api_stop = Arc::new(AtomicBool::new(false));
    let api = if c.api.enabled {
        let listener = std::net::TcpListener::bind(&c.api.listen)
            .with_context(|| format!("starting the HTTP API on {} (API_LISTEN_ADDR)", c.api.listen))?;
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let tls = match c.api.tls_enabled {
            true => Some(
                crate::edges::api::tls_config(&std::fs::read(&c.api.tls_cert)?, &std::fs::read(&c.api.tls_key)?)
                    .map_err(|e| anyhow::anyhow!("API TLS: {e}"))?,
            ),
            false => None,
        };
        let stopped = crate::edges::api::Stopped {
            reason: format!("the data disk is full ({} bytes free in {}): {reason}", free_at_stop, dir.display()),
        };
        let sp = api_stop.clone();
        let t = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || crate::edges::api::serve(listener, tls, stopped, sp))?;
        tracing::info!(addr = %addr, "HTTP API listening");
        Some(t)
    } else {
        None
    };
    while !signal.load(Ordering::Relaxed) && free_bytes(dir).unwrap_or(0) < want {
        std::thread::sleep(Duration::from_millis(500)); // a disk's free space has no event to wait on
    }
    api_stop.store(true, Ordering::Relaxed);
    if let Some(t) = api {
        let _ = t.join();
    }
    Ok(())
}
