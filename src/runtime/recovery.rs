//! Recovery at start: one function of the disk, the same in the validator
//! and in the whole-node simulator (which runs it on a disk that tore,
//! lost or flipped what it held).
//!
//! It starts from the snapshot the store sits on (`blocks.base`, if this
//! validator joined from one), re-executes the block store into the state
//! machine (checking each state root), and rebuilds the replica from the
//! blocks' commit certificates plus its durable consensus records.

use crate::edges::consensus_log::ConsensusLog;
use crate::edges::framed::{Mode, Scan};
use crate::edges::storage::Disk;
use crate::edges::store::{self, BlockStore};
use crate::proto;
use crate::protocol::block::Block;
use crate::protocol::consensus::genesis::{verify_certificate, GenesisCertificate};
use crate::protocol::consensus::pbft::{Auth, CommitCert, EpochAuth, Params, PrePrepare, Record, Replica, Rid, Signed};
use crate::protocol::consensus::wire::{self, WireLimits};
use crate::protocol::crypto::PublicKey;
use crate::protocol::event::Limits;
use crate::protocol::proposal;
use crate::protocol::reputation::Reputation;
use crate::protocol::snapshot;
use crate::protocol::state::{State, StateConfig};
use anyhow::{bail, Context};
use std::path::Path;
use std::sync::Arc;

/// A validator set change removed this validator: it orders nothing more.
#[derive(Debug, thiserror::Error)]
#[error(
    "a validator set change (epoch {epoch}) removed this validator above height {height}: it takes no part in \
     consensus any more; stop its service (its data dir keeps the chain up to there)"
)]
pub struct RemovedFromSet {
    pub epoch: u64,
    pub height: u64,
}

/// What a validator recovers from.
pub struct Setup<'a, A> {
    pub disk: Arc<dyn Disk>,
    pub dir: &'a Path,
    pub me: Rid,
    pub params: Params,
    pub auth: A,
    /// Validator keys in replica order.
    pub keys: &'a [PublicKey],
    pub wire: WireLimits,
    pub limits: Limits,
    pub state: StateConfig,
    pub reputation: snapshot::ReputationConfig,
}

/// What it recovered.
pub struct Recovered<A: Auth + Clone> {
    pub store: BlockStore,
    /// None with one validator (nobody to vote twice to).
    pub log: Option<ConsensusLog>,
    pub replica: Replica<A>,
    pub state: State,
    pub reputation: Reputation,
    /// The snapshot the store sits on, encoded (served to joining validators).
    pub base_bytes: Option<Vec<u8>>,
    /// An empty store may still join from a snapshot: its records, again.
    pub join_records: Option<Vec<Record>>,
    /// The next epoch's replica's records, if the log is ahead of the
    /// store (`Node::hold_next_epoch_records`).
    pub next_epoch_records: Option<(u64, Vec<Record>)>,
    pub store_scan: store::Recovery,
    pub log_scan: Option<Scan>,
}

/// Recovers a validator from `s.dir` on `s.disk` (see the module header).
pub fn recover<A: EpochAuth>(s: Setup<'_, A>) -> anyhow::Result<Recovered<A>> {
    let base_path = s.dir.join(snapshot::BASE_FILE);
    let base = match s.disk.read(&base_path) {
        Ok(bytes) => {
            let v = snapshot::verify(&bytes, s.me, &s.params, s.auth.clone(), &s.wire, s.state.clone(), s.reputation)
                .with_context(|| format!("{} (the snapshot this validator started from)", base_path.display()))?;
            tracing::info!(height = v.header.height, "starting above the snapshot in blocks.base");
            Some((v, bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", base_path.display())),
    };
    let (store, store_scan) = BlockStore::open_on(
        s.disk.clone(),
        s.dir,
        s.limits,
        base.as_ref().map(|(v, _)| v.header.clone()),
        Mode::Recover,
    )?;
    let n = s.keys.len();
    let (mut state, mut reputation, mut prev_view, replica, base_bytes) = match base {
        Some((v, bytes)) => (v.state, v.reputation, v.header.view, v.replica, Some(bytes)),
        None => (
            State::new(s.state),
            Reputation::new(n, s.reputation.floor, s.reputation.quarantine),
            0,
            Replica::new(s.me, s.params.clone(), s.auth.clone()),
            None,
        ),
    };
    let mut replica = Some(replica);
    // Which keys name proposers: the current epoch's set.
    let mut keys: Vec<PublicKey> = epoch_keys(&state).unwrap_or_else(|| s.keys.to_vec());
    let mut removed_at = None;
    // Once the state made a new set current at the switch height the
    // replica stands at, that set's replica orders what follows.
    let mut switch = |replica: &mut Option<Replica<A>>,
                      reputation: &mut Reputation,
                      keys: &mut Vec<PublicKey>,
                      state: &State,
                      app: crate::Hash32|
     -> anyhow::Result<()> {
        let Some(r) = replica.as_ref() else { return Ok(()) };
        let Some(next) = state.current_epoch().filter(|e| e.epoch > r.epoch()) else { return Ok(()) };
        let prev = state.epoch(next.epoch - 1).context("the state keeps every epoch")?;
        match crate::protocol::node::next_epoch(r, reputation, &prev, &next, app) {
            Some((r, rep)) => {
                *replica = Some(r);
                *reputation = rep;
            }
            None => {
                *replica = None;
                removed_at = Some(next.from_height);
            }
        }
        *keys = next.validators.values().copied().collect();
        Ok(())
    };
    let mut replayed = || -> anyhow::Result<()> {
        // A snapshot at a switch height itself (the old set signed it).
        if let Some(base) = store.base() {
            let app = snapshot::app_digest(&base.hash(), &reputation);
            switch(&mut replica, &mut reputation, &mut keys, &state, app)?;
        }
        for h in store.base_height() + 1..=store.height() {
            let (b, cert) = store.read(h)?.ok_or_else(|| anyhow::anyhow!("block {h} is indexed but unreadable"))?;
            crate::protocol::node::replay(&mut state, &b).map_err(anyhow::Error::msg)?;
            let proposer = keys.iter().position(|k| *k == b.header.proposer);
            let stored = cert.as_ref().and_then(|c| c.pre_prepare.as_ref()).map(|p| p.value.as_slice());
            for e in proposal::stored_evidence(stored.unwrap_or_default()) {
                reputation.quarantine(e.culprit());
            }
            // As `Node::execute_proposal`: views count from 0 again in a new epoch.
            let r = replica.as_mut().context("blocks stored after the switch that removed this validator")?;
            let since_view = if r.epoch() > 0 && h == r.base() + 1 { 0 } else { prev_view };
            reputation.on_block(since_view, b.header.view, proposer);
            prev_view = b.header.view;
            let app = snapshot::app_digest(&b.hash(), &reputation);
            r.replay_executed(stored_cert(&b, cert, &s.wire)?, app);
            switch(&mut replica, &mut reputation, &mut keys, &state, app)?;
        }
        Ok(())
    };
    let replayed = replayed();
    let (log, records, log_scan) = if n > 1 {
        let (log, records, scan) = ConsensusLog::open_on(s.disk.clone(), s.dir, &s.wire, Mode::Recover)
            .context("opening the consensus log")?;
        tracing::info!(records = records.len(), truncated_bytes = scan.truncated_bytes, "consensus log recovered");
        (Some(log), records, Some(scan))
    } else {
        (None, vec![], None)
    };
    replayed.context("recovering from the block store")?;
    if let Some(height) = removed_at {
        return Err(RemovedFromSet { epoch: state.current_epoch().map_or(0, |e| e.epoch), height }.into());
    }
    let replica = replica.expect("present unless removed");
    let join_records = (store.height() == 0).then(|| records.clone());
    let (records, next_epoch_records) = crate::protocol::consensus::pbft::epoch_records(records, replica.epoch());
    let replica = replica.recover_onto(std::iter::empty(), records);
    assert_eq!(replica.executed(), store.height(), "the replica resumes at the stored height");
    tracing::info!(height = store.height(), view = replica.view(), epoch = replica.epoch(), truncated_bytes = store_scan.truncated_bytes, state_root = %hex::encode(state.root()), "block store recovered");
    Ok(Recovered {
        store,
        log,
        replica,
        state,
        reputation,
        base_bytes,
        join_records,
        next_epoch_records,
        store_scan,
        log_scan,
    })
}

/// The current epoch's keys in replica order (None: a chain without set changes).
fn epoch_keys(state: &State) -> Option<Vec<PublicKey>> {
    state.current_epoch().map(|e| e.validators.values().copied().collect())
}

/// The genesis certificate stored at `path`, checked against this
/// configuration: `None` if there is none yet (the ceremony runs); an
/// error naming the difference if it was made with another one.
pub fn genesis_certificate(
    disk: &dyn Disk,
    path: &Path,
    config_hash: &crate::Hash32,
    validators: &std::collections::BTreeMap<u32, PublicKey>,
) -> anyhow::Result<Option<GenesisCertificate>> {
    let bytes = match disk.read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let cert: GenesisCertificate = serde_json::from_slice(&bytes)
        .with_context(|| format!("reading the genesis certificate {} (GENESIS_STATE_PATH)", path.display()))?;
    verify_certificate(&cert, config_hash, validators).map_err(anyhow::Error::msg).with_context(|| {
        format!(
            "the genesis certificate {} does not match this configuration; restore the configuration it was made with, or start a new chain with new data dirs",
            path.display()
        )
    })?;
    Ok(Some(cert))
}

/// The commit certificate of a stored block, its value rebuilt from the
/// block. Blocks stored without one (written by a single validator before
/// certificates were kept) get an unsigned stand-in carrying the digest,
/// which is all the replica's recovery reads.
pub fn stored_cert(b: &Block, cert: Option<proto::PbftCommitCert>, wire: &WireLimits) -> anyhow::Result<CommitCert> {
    let stored = cert.as_ref().and_then(|c| c.pre_prepare.as_ref()).map(|p| p.value.as_slice());
    let value = Arc::new(proposal::value_of_block(b, stored));
    let digest = crate::sha256(&value);
    let h = b.header.height;
    let Some(pc) = cert else {
        let pp = PrePrepare { view: b.header.view, seq: h, digest, value };
        return Ok(CommitCert { pre_prepare: Signed { body: pp, from: 0, sig: vec![] }, commits: vec![] });
    };
    let mut c = wire::commit_cert_from(pc, wire).with_context(|| format!("block {h}: stored certificate"))?;
    if c.pre_prepare.body.seq != h || c.pre_prepare.body.digest != digest {
        bail!("block {h}: its certificate is for seq {} with another value", c.pre_prepare.body.seq);
    }
    c.pre_prepare.body.value = value;
    Ok(c)
}

/// The stored form of committed blocks with their certificates (values
/// name their txs; the block holds the bodies), for `BlockStore::append_with_outcomes`.
pub fn stored_form(
    commits: &[(Arc<Block>, CommitCert, proto::BlockOutcome)],
) -> Vec<(&Block, Option<proto::PbftCommitCert>, Option<proto::BlockOutcome>)> {
    commits
        .iter()
        .map(|(b, c, o)| {
            let mut pc = wire::commit_cert_to(c);
            if let Some(pp) = &mut pc.pre_prepare {
                pp.value = proposal::stored_form(&pp.value);
            }
            (&**b, Some(pc), Some(o.clone()))
        })
        .collect()
}

/// Committed blocks from `from_seq` with their certificates, for a peer
/// catching up: at most a window's worth, none below the store's base,
/// stopping at a block stored without a certificate (nothing proves it).
/// Values name their txs: the peer fetches the bodies it lacks.
pub fn committed_from(store: &BlockStore, wire: &WireLimits, from_seq: u64) -> anyhow::Result<Vec<CommitCert>> {
    let end = store.height().min(from_seq.saturating_add(wire.window as u64 - 1));
    let mut out = Vec::new();
    for h in from_seq.max(store.lowest())..=end {
        let (b, cert) = store.read(h)?.ok_or_else(|| anyhow::anyhow!("block {h} is indexed but unreadable"))?;
        if cert.is_none() {
            break;
        }
        out.push(stored_cert(&b, cert, wire)?);
    }
    Ok(out)
}

/// The txs among `tx_hashes` of the committed block at `seq` (none if the
/// block is below the store's base or above its height).
/// Tells `node` the txs of the newest stored blocks (as many as it keeps:
/// `Node::recent_heights`), so it can serve the bodies of txs a re-proposed
/// value names after they committed, across a restart too.
pub fn remember_recent<A: crate::protocol::consensus::pbft::EpochAuth>(
    node: &mut crate::protocol::node::Node<A>,
    store: &BlockStore,
) -> anyhow::Result<()> {
    let top = store.height();
    let from = store.lowest().max((top + 1).saturating_sub(node.recent_heights()));
    for h in from..=top {
        if let Some((b, _)) = store.read(h)? {
            node.remember_committed(h, &b.tx_hashes);
        }
    }
    Ok(())
}

pub fn block_txs(
    store: &BlockStore,
    seq: u64,
    tx_hashes: &[crate::Hash32],
) -> anyhow::Result<Vec<Arc<crate::protocol::event::Event>>> {
    if seq < store.lowest() || seq > store.height() {
        return Ok(vec![]);
    }
    let Some((b, _)) = store.read(seq)? else { return Ok(vec![]) };
    let wanted: std::collections::HashSet<&crate::Hash32> = tx_hashes.iter().collect();
    Ok(b.txs.iter().zip(&b.tx_hashes).filter(|(_, h)| wanted.contains(h)).map(|(t, _)| t.clone()).collect())
}
