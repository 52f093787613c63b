//! A local cluster's files: one key, config and data dir per validator, all
//! on loopback, plus a producer key. Used by `loadgen devnet`, `cybermesh
//! devnet init` and the multi-process tests, so they all run the same setup.

use crate::protocol::crypto::{self, SigningKey};
use crate::runtime::config::Config;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct DevnetOptions {
    pub validators: usize,
    pub verify_shards: usize,
    pub block_max_txs: usize,
    pub build_interval: Duration,
    /// The floor between blocks of an idle pipeline (BLOCK_MIN_INTERVAL).
    pub min_block_interval: Duration,
    pub mempool_max_txs: usize,
    /// Heartbeat period; backups change view after 6 missed heartbeats.
    pub heartbeat: Duration,
    /// View-change timeout at start (AIMD keeps it within [½×, 6×]).
    pub base_timeout: Duration,
    pub log_level: String,
    pub log_json: bool,
}

impl Default for DevnetOptions {
    fn default() -> Self {
        DevnetOptions {
            validators: 4,
            verify_shards: 1,
            block_max_txs: 2000,
            build_interval: Duration::from_millis(50),
            min_block_interval: crate::protocol::block::BuilderConfig::default().min_interval,
            mempool_max_txs: 20_000,
            heartbeat: Duration::from_millis(500),
            base_timeout: Duration::from_secs(10),
            log_level: "info".into(),
            log_json: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DevnetNode {
    pub id: u32,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub direct: SocketAddr,
    pub p2p: SocketAddr,
}

pub struct Devnet {
    pub root: PathBuf,
    pub nodes: Vec<DevnetNode>,
    pub producer: SigningKey,
}

fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}
fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// Writes keys and configs for `opts.validators` validators under `root`;
/// `tweak` adjusts each config (after the defaults here) before it is saved.
pub fn create(root: &Path, opts: &DevnetOptions, tweak: impl Fn(&mut Config)) -> anyhow::Result<Devnet> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let n = opts.validators;
    anyhow::ensure!(n == 1 || n >= 4, "a cluster needs 1 or at least 4 validators (N ≥ 3f + 1), not {n}");
    let keys: Vec<SigningKey> = (0..n).map(|_| crypto::generate_key()).collect();
    let producer = crypto::generate_key();
    crypto::write_key_file(&root.join("producer.pem"), &producer)?;
    let ids: Vec<u32> = (1..=n as u32).collect();
    let mut nodes = vec![];
    for &id in &ids {
        nodes.push(DevnetNode {
            id,
            config: root.join(format!("validator-{id}.toml")),
            data_dir: root.join(format!("data-{id}")),
            direct: free_tcp()?,
            p2p: free_udp()?,
        });
    }
    for (i, node) in nodes.iter().enumerate() {
        let key_file = root.join(format!("validator-{}.pem", node.id));
        crypto::write_key_file(&key_file, &keys[i])?;
        let mut c = Config::default();
        c.node.id = node.id;
        c.node.data_dir = node.data_dir.clone();
        c.node.key_file = key_file;
        c.cluster.nodes = ids.clone();
        c.cluster.validators =
            ids.iter().zip(&keys).map(|(id, k)| (id.to_string(), hex::encode(crypto::public_key(k)))).collect();
        c.cluster.peers = nodes.iter().filter(|p| p.id != node.id).map(|p| format!("{}@{}", p.id, p.p2p)).collect();
        c.cluster.listen = node.p2p.to_string();
        c.cluster.allowed_ips = vec!["127.0.0.0/8".into()];
        c.producers.keys = vec![hex::encode(crypto::public_key(&producer))];
        c.ingest.direct_listen = node.direct.to_string();
        c.mempool.max_txs = opts.mempool_max_txs;
        c.mempool.max_bytes = 256 << 20;
        c.mempool.rate_per_second = 0;
        c.block.max_txs = opts.block_max_txs;
        c.block.build_interval = opts.build_interval;
        c.block.min_interval = opts.min_block_interval;
        c.consensus.heartbeat_interval = opts.heartbeat;
        c.consensus.base_timeout = opts.base_timeout;
        c.consensus.min_timeout = opts.base_timeout / 2;
        c.consensus.max_timeout = opts.base_timeout * 6;
        c.runtime.verify_shards = opts.verify_shards;
        c.log.level = opts.log_level.clone();
        c.log.format = if opts.log_json { "json" } else { "pretty" }.into();
        tweak(&mut c);
        let text = toml::to_string_pretty(&c).context("serialising a devnet config")?;
        std::fs::write(&node.config, text).with_context(|| format!("writing {}", node.config.display()))?;
    }
    Ok(Devnet { root: root.to_path_buf(), nodes, producer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devnet_configs_validate_and_agree_on_the_consensus_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let d = create(dir.path(), &DevnetOptions::default(), |_| {}).unwrap();
        assert_eq!(d.nodes.len(), 4);
        let mut prints = vec![];
        for n in &d.nodes {
            let c = Config::load(Some(&n.config)).unwrap();
            prints.push(c.consensus_fingerprint());
            let v = c.validate().unwrap();
            assert_eq!(v.peers.len(), 3);
            assert_eq!(v.quorum, 3);
        }
        assert!(prints.iter().all(|p| *p == prints[0]));
        assert!(create(dir.path(), &DevnetOptions { validators: 3, ..Default::default() }, |_| {}).is_err());
    }
}
