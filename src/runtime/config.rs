//! Configuration: a TOML file, then environment overrides that accept the
//! original manual's variable names, then validation that names the variable
//! and the fix for every problem.

pub use crate::edges::kafka::KafkaConfig;
use crate::protocol::block::BuilderConfig;
use crate::protocol::crypto::{self, PublicKey};
use crate::protocol::event::Limits;
use crate::protocol::mempool::MempoolConfig;
use crate::protocol::state::StateConfig;
pub use crate::runtime::ring::IdlePolicy;

/// What runs the verify shards and the direct source (RUNTIME_EXECUTOR).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// A pinned glommio executor per shard, owning its connections.
    Glommio,
    /// Plain threads, one event-loop thread for the connections.
    Threads,
}
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Durations are written as in the manual: `500ms`, `5s`, `15m`.
mod dur {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("bad duration {s:?}: {e} (write e.g. 500ms, 5s, 15m)")))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Staging,
    Production,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// NODE_ID: this validator's id; must be in `cluster.nodes`.
    pub id: u32,
    /// ENVIRONMENT: development | staging | production.
    pub environment: Environment,
    /// CYBERMESH_DATA_DIR: block store, DLQ file, genesis state.
    pub data_dir: PathBuf,
    /// CONTROL_SIGNING_KEY_PATH / CYBERMESH_KEY_FILE: PKCS#8 PEM Ed25519 key.
    pub key_file: PathBuf,
    /// CYBERMESH_NEXT_KEY_FILE: the key this validator rotates to. It signs
    /// with it from the epoch whose set names it (a `rotate` set change),
    /// with `key_file` until then.
    pub next_key_file: Option<PathBuf>,
    /// NODE_ADDED_BY_SET_CHANGE: this validator is not in the genesis set
    /// (`cluster.nodes`); an `add` set change names it. It takes no part in
    /// the genesis ceremony and waits for a snapshot whose set names it.
    pub added_by_set_change: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            environment: Environment::Development,
            data_dir: "./data".into(),
            key_file: "keys/validator.pem".into(),
            next_key_file: None,
            added_by_set_change: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// CONSENSUS_NODES: validator ids.
    pub nodes: Vec<u32>,
    /// QUORUM_SIZE: 0 = N − f (the only safe choice; a smaller value is refused).
    pub quorum_size: usize,
    /// VALIDATOR_<n>_PUBKEY_HEX: public key of each validator id.
    pub validators: BTreeMap<String, String>,
    /// P2P_BOOTSTRAP_PEERS: `id@host:port` for every other validator.
    pub peers: Vec<String>,
    /// ALLOWED_IPS: CIDRs (or single addresses) peers may connect from (empty: any).
    pub allowed_ips: Vec<String>,
    /// P2P_LISTEN_ADDR: UDP address for QUIC between validators (N > 1).
    pub listen: String,
    /// P2P_ENABLE_MDNS: announce this validator and find the others' QUIC
    /// addresses by mDNS on the LAN (peers may then be left out of
    /// P2P_BOOTSTRAP_PEERS; keys are still proven by the handshake).
    pub enable_mdns: bool,
    /// P2P_MDNS_ALLOW_PRODUCTION: allow mDNS with ENVIRONMENT=production.
    pub mdns_in_production: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: vec![],
            quorum_size: 0,
            validators: BTreeMap::new(),
            peers: vec![],
            allowed_ips: vec![],
            listen: "0.0.0.0:8001".into(),
            enable_mdns: false,
            mdns_in_production: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// PRODUCER_PUBKEYS: hex Ed25519 keys of the AI detectors allowed to publish.
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Direct,
    Kafka,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// STORAGE_RETAIN_BLOCKS: blocks kept below the newest; older ones are
    /// pruned, whole segments at a time, once a chain snapshot vouches for
    /// them and the event publisher and database mirror are past them.
    /// 0 keeps every block.
    pub retain_blocks: u64,
    /// STORAGE_RETAIN_BYTES: a budget for the block store's bytes; the
    /// oldest segments beyond it are pruned, under the same conditions.
    /// 0: no budget. With both set, the smaller of the two ranges is kept.
    pub retain_bytes: u64,
    /// STORAGE_SEGMENT_BYTES: size at which the block store starts a new
    /// segment file (the unit pruning deletes).
    pub segment_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { retain_blocks: 0, retain_bytes: 0, segment_bytes: crate::edges::store::SEGMENT_BYTES_DEFAULT }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// INGEST_SOURCE: direct | kafka.
    pub source: SourceKind,
    /// DIRECT_LISTEN_ADDR: loopback TCP address of the direct source.
    pub direct_listen: String,
    /// KAFKA_MAX_TIMESTAMP_SKEW / MEMPOOL_SKEW_TOLERANCE.
    #[serde(with = "dur")]
    pub max_timestamp_skew: Duration,
    /// MEMPOOL_NONCE_TTL: how long a nonce is remembered.
    #[serde(with = "dur")]
    pub nonce_ttl: Duration,
    /// MAX_EVENT_BYTES.
    pub max_event_bytes: usize,
    /// MAX_PAYLOAD_BYTES.
    pub max_payload_bytes: usize,
    /// DLQ_FILE_MAX_BYTES: the direct source's DLQ file (`dlq.jsonl`) is
    /// rotated at this size.
    pub dlq_file_max_bytes: u64,
    /// DLQ_FILE_KEEP: rotated DLQ files kept (`dlq.jsonl.1` … `.N`).
    pub dlq_file_keep: u32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            source: SourceKind::Direct,
            direct_listen: "127.0.0.1:7600".into(),
            max_timestamp_skew: Duration::from_secs(300),
            nonce_ttl: Duration::from_secs(900),
            max_event_bytes: Limits::default().max_event_bytes,
            max_payload_bytes: Limits::default().max_payload_bytes,
            dlq_file_max_bytes: 64 * 1024 * 1024,
            dlq_file_keep: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MempoolSection {
    pub max_txs: usize,
    pub max_bytes: usize,
    /// MEMPOOL_RATE_PER_SECOND: per-producer token-bucket rate (0 = unlimited).
    pub rate_per_second: u32,
    /// Burst size of the bucket (0 = one second's worth).
    pub rate_burst: u32,
}

impl Default for MempoolSection {
    fn default() -> Self {
        MempoolSection { max_txs: 1000, max_bytes: 10 * 1024 * 1024, rate_per_second: 1000, rate_burst: 0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockSection {
    pub max_txs: usize,
    pub max_bytes: usize,
    #[serde(with = "dur")]
    pub build_interval: Duration,
    pub min_mempool_txs: usize,
    /// The shortest gap between two blocks while none is in flight (see
    /// `BuilderConfig::min_interval`); 0 cuts a block as soon as the last
    /// one committed.
    #[serde(with = "dur")]
    pub min_interval: Duration,
}

impl Default for BlockSection {
    fn default() -> Self {
        let b = BuilderConfig::default();
        BlockSection {
            max_txs: b.max_txs,
            max_bytes: b.max_bytes,
            build_interval: b.build_interval,
            min_mempool_txs: b.min_txs,
            min_interval: b.min_interval,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsensusSection {
    #[serde(with = "dur")]
    pub block_timeout: Duration,
    #[serde(with = "dur")]
    pub base_timeout: Duration,
    #[serde(with = "dur")]
    pub min_timeout: Duration,
    #[serde(with = "dur")]
    pub max_timeout: Duration,
    pub timeout_increase_factor: f64,
    #[serde(with = "dur")]
    pub timeout_decrease_delta: Duration,
    #[serde(with = "dur")]
    pub viewchange_timeout: Duration,
    #[serde(with = "dur")]
    pub heartbeat_interval: Duration,
    #[serde(with = "dur")]
    pub max_idle_time: Duration,
    pub missed_heartbeats: u32,
    pub enable_aimd: bool,
    pub enable_reputation: bool,
    pub min_leader_reputation: f64,
    pub enable_quarantine: bool,
    /// CONSENSUS_WINDOW: sequence numbers in flight at once (watermark window).
    pub window: u64,
    /// CONSENSUS_CHECKPOINT_INTERVAL: blocks between checkpoints.
    pub checkpoint_interval: u64,
    /// CONSENSUS_RETRANSMIT_INTERVAL: resend unfinished work this often.
    #[serde(with = "dur")]
    pub retransmit_interval: Duration,
    /// CONSENSUS_SNAPSHOT_INTERVAL: keep a chain snapshot (served to joining
    /// validators) every this many blocks; a multiple of the checkpoint
    /// interval; 0 turns snapshots off (joining validators replay from 1).
    pub snapshot_interval: u64,
    /// CONSENSUS_SNAPSHOT_JOIN_TIMEOUT: how long a validator with an empty
    /// block store waits for a peer to offer a snapshot before it catches up
    /// from height 1.
    #[serde(with = "dur")]
    pub snapshot_join_timeout: Duration,
}

impl Default for ConsensusSection {
    fn default() -> Self {
        ConsensusSection {
            block_timeout: Duration::from_secs(5),
            base_timeout: Duration::from_secs(10),
            min_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(60),
            timeout_increase_factor: 1.5,
            timeout_decrease_delta: Duration::from_millis(200),
            viewchange_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_millis(500),
            max_idle_time: Duration::from_secs(3),
            missed_heartbeats: 6,
            enable_aimd: true,
            enable_reputation: true,
            min_leader_reputation: 0.7,
            enable_quarantine: true,
            window: 16,
            checkpoint_interval: 8,
            retransmit_interval: Duration::from_secs(1),
            snapshot_interval: 1024,
            snapshot_join_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// RUNTIME_VERIFY_SHARDS: verification threads.
    pub verify_shards: usize,
    /// Signatures per batch verification.
    pub verify_batch: usize,
    /// RUNTIME_IDLE: park | spin.
    pub idle: IdlePolicy,
    /// RUNTIME_PIN_CORES: pin threads to cores.
    pub pin_cores: bool,
    /// RUNTIME_EXECUTOR: what runs the verify shards and the direct
    /// source. `glommio`: each shard is a glommio executor (io_uring) that
    /// accepts and reads its own share of the direct connections
    /// (`SO_REUSEPORT`); `threads`: plain threads behind one event-loop
    /// thread for all connections (where io_uring is unavailable, e.g.
    /// Docker's default seccomp profile).
    pub executor: ExecutorKind,
    /// RUNTIME_IO_MEMORY_BYTES: memory each glommio executor registers with
    /// io_uring (locked: shards × this must fit the memlock limit,
    /// `LimitMEMLOCK` under systemd; ≥ 64 KiB).
    pub io_memory_bytes: usize,
    /// RUNTIME_SPIN_BEFORE_PARK: how long an idle glommio executor polls
    /// before it sleeps (0: at once, so several validators share cores;
    /// with `RUNTIME_IDLE=spin` and 0 here, 100 ms).
    #[serde(with = "dur")]
    pub spin_before_park: Duration,
    /// RUNTIME_VERIFY_NICE: how much nicer (0–19) than the core thread the
    /// verify shards run. On a machine whose cores are all busy (several
    /// validators on 2 cores), 5 let the core thread (votes, proposals,
    /// fsyncs) run first and cut the devnet's p99 at 12,000 tx/s by a third,
    /// but cost ~10% of the maximum rate (lagging shards make backups fetch
    /// and verify bodies themselves). 0 by default.
    pub verify_nice: i32,
    /// Cores for the verify shards (in order), used when pinning.
    pub verify_cores: Vec<usize>,
    /// Core for the consensus core thread, used when pinning.
    pub core_core: Option<usize>,
    /// Core for the persistence thread (consensus log and block store
    /// appends and their fdatasyncs), used when pinning. It mostly waits
    /// for the disk: it may share a core with the verify shards.
    pub storage_core: Option<usize>,
    /// Capacity (in batches) of each ring between stages.
    pub ring_capacity: usize,
    /// Compact the consensus log at the first stable checkpoint once it
    /// holds this many bytes. Each compaction rewrites the live records (a
    /// window of proposals, ~10 MB at full load); at 8 MiB that happened
    /// every second or two and cost as much as the appends (7% of a backup's
    /// core thread at max rate).
    pub consensus_log_compact_bytes: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            verify_shards: 2,
            verify_batch: 256,
            idle: IdlePolicy::Park,
            pin_cores: false,
            executor: ExecutorKind::Glommio,
            io_memory_bytes: 1 << 20,
            spin_before_park: Duration::ZERO,
            verify_nice: 0,
            verify_cores: vec![],
            core_core: None,
            storage_core: None,
            ring_capacity: 64,
            consensus_log_compact_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// ENABLE_PERSISTENCE.
    pub enabled: bool,
    /// DB_DSN / DATABASE_URL.
    pub dsn: String,
    /// DB_TLS.
    pub tls: bool,
    /// DB_WRITE_MODE: `copy` (binary COPY into temp tables, then INSERT …
    /// ON CONFLICT; measured faster) or `unnest` (multi-row INSERT from
    /// arrays; for databases without binary COPY, e.g. CockroachDB).
    pub write_mode: String,
    /// DB_RETRY_MIN / DB_RETRY_MAX: the mirror's backoff after a failure.
    #[serde(with = "dur")]
    pub retry_min: Duration,
    #[serde(with = "dur")]
    pub retry_max: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            enabled: false,
            dsn: String::new(),
            tls: false,
            write_mode: "copy".into(),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub enabled: bool,
    pub listen: String,
    pub tls_enabled: bool,
    /// API_TLS_CERT / API_TLS_KEY: PEM certificate chain and private key.
    pub tls_cert: String,
    pub tls_key: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: false,
            listen: "127.0.0.1:8443".into(),
            tls_enabled: false,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    pub encryption_key: String,
    pub secret_key: String,
    pub jwt_secret: String,
    pub audit_signing_key: String,
    /// AUDIT_LOG_PATH: the audit log (default `<data_dir>/audit.jsonl`);
    /// written when AUDIT_SIGNING_KEY is set.
    pub audit_log_path: String,
    /// AUDIT_LOG_MAX_BYTES: the active audit file is closed into a segment
    /// at this size.
    pub audit_log_max_bytes: u64,
    /// AUDIT_LOG_KEEP: closed segments kept (0: all).
    pub audit_log_keep: usize,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        let r = crate::edges::audit::Rotation::default();
        SecretsConfig {
            encryption_key: String::new(),
            secret_key: String::new(),
            jwt_secret: String::new(),
            audit_signing_key: String::new(),
            audit_log_path: String::new(),
            audit_log_max_bytes: r.max_bytes,
            audit_log_keep: r.keep,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// LOG_LEVEL: trace | debug | info | warn | error.
    pub level: String,
    /// json | pretty.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: "pretty".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenesisSection {
    /// GENESIS_STATE_PATH: where the genesis certificate is kept (empty:
    /// `<data_dir>/genesis_state.json`).
    pub state_path: PathBuf,
    /// GENESIS_CLOCK_SKEW_TOLERANCE: largest clock difference accepted in attestations.
    #[serde(with = "dur")]
    pub clock_skew_tolerance: Duration,
    /// GENESIS_READY_REFRESH_INTERVAL: rebroadcast our attestation this often while waiting.
    #[serde(with = "dur")]
    pub ready_refresh_interval: Duration,
    /// GENESIS_READY_TIMEOUT: after this long, name the validators still missing (and keep waiting).
    #[serde(with = "dur")]
    pub ready_timeout: Duration,
}

impl Default for GenesisSection {
    fn default() -> Self {
        GenesisSection {
            state_path: PathBuf::new(),
            clock_skew_tolerance: Duration::from_secs(15 * 60),
            ready_refresh_interval: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Where the genesis certificate lives.
    pub fn genesis_path(&self) -> PathBuf {
        if self.genesis.state_path.as_os_str().is_empty() {
            self.node.data_dir.join("genesis_state.json")
        } else {
            self.genesis.state_path.clone()
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub producers: ProducerConfig,
    pub ingest: IngestConfig,
    pub kafka: KafkaConfig,
    pub mempool: MempoolSection,
    pub block: BlockSection,
    pub consensus: ConsensusSection,
    pub storage: StorageConfig,
    pub runtime: RuntimeConfig,
    pub database: DatabaseConfig,
    pub api: ApiConfig,
    pub secrets: SecretsConfig,
    pub log: LogConfig,
    pub genesis: GenesisSection,
}

/// One configuration problem: which setting, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (fix: {})", self.key, self.problem, self.fix)
    }
}

fn err(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), problem: problem.into(), fix: fix.into() }
}

/// Everything wrong with a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{} configuration error(s):\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {v:?}")),
    }
}
fn parse_num<T: std::str::FromStr>(v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse::<T>().map_err(|e| format!("expected a number, got {v:?}: {e}"))
}
fn parse_dur(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v.trim()).map_err(|e| format!("bad duration {v:?}: {e} (write e.g. 500ms, 5s, 15m)"))
}
fn parse_list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

type Setter = fn(&mut Config, &str) -> Result<(), String>;

#[allow(clippy::unit_arg)] // `Ok(field = value)` keeps each row of the table one line
/// Environment variables read on top of the file (the manual's names first).
pub const ENV_VARS: &[(&str, Setter)] = &[
    ("NODE_ID", |c, v| Ok(c.node.id = parse_num(v)?)),
    ("ENVIRONMENT", |c, v| {
        c.node.environment = match v.trim().to_ascii_lowercase().as_str() {
            "development" | "dev" => Environment::Development,
            "staging" => Environment::Staging,
            "production" | "prod" => Environment::Production,
            _ => return Err(format!("expected development, staging or production, got {v:?}")),
        };
        Ok(())
    }),
    ("CYBERMESH_DATA_DIR", |c, v| Ok(c.node.data_dir = v.into())),
    ("CYBERMESH_KEY_FILE", |c, v| Ok(c.node.key_file = v.into())),
    ("CONTROL_SIGNING_KEY_PATH", |c, v| Ok(c.node.key_file = v.into())),
    ("CYBERMESH_NEXT_KEY_FILE", |c, v| Ok(c.node.next_key_file = Some(v.into()))),
    ("NODE_ADDED_BY_SET_CHANGE", |c, v| Ok(c.node.added_by_set_change = parse_bool(v)?)),
    ("CONSENSUS_NODES", |c, v| {
        c.cluster.nodes = parse_list(v).iter().map(|s| parse_num::<u32>(s)).collect::<Result<_, _>>()?;
        Ok(())
    }),
    ("QUORUM_SIZE", |c, v| Ok(c.cluster.quorum_size = parse_num(v)?)),
    ("P2P_BOOTSTRAP_PEERS", |c, v| Ok(c.cluster.peers = parse_list(v))),
    ("ALLOWED_IPS", |c, v| Ok(c.cluster.allowed_ips = parse_list(v))),
    ("P2P_ENABLE_MDNS", |c, v| Ok(c.cluster.enable_mdns = parse_bool(v)?)),
    ("P2P_MDNS_ALLOW_PRODUCTION", |c, v| Ok(c.cluster.mdns_in_production = parse_bool(v)?)),
    ("P2P_LISTEN_ADDR", |c, v| Ok(c.cluster.listen = v.trim().into())),
    ("GENESIS_STATE_PATH", |c, v| Ok(c.genesis.state_path = v.trim().into())),
    ("GENESIS_CLOCK_SKEW_TOLERANCE", |c, v| Ok(c.genesis.clock_skew_tolerance = parse_dur(v)?)),
    ("GENESIS_READY_REFRESH_INTERVAL", |c, v| Ok(c.genesis.ready_refresh_interval = parse_dur(v)?)),
    ("GENESIS_READY_TIMEOUT", |c, v| Ok(c.genesis.ready_timeout = parse_dur(v)?)),
    ("PRODUCER_PUBKEYS", |c, v| Ok(c.producers.keys = parse_list(v))),
    ("INGEST_SOURCE", |c, v| {
        c.ingest.source = match v.trim() {
            "direct" => SourceKind::Direct,
            "kafka" => SourceKind::Kafka,
            _ => return Err(format!("expected direct or kafka, got {v:?}")),
        };
        Ok(())
    }),
    ("DIRECT_LISTEN_ADDR", |c, v| Ok(c.ingest.direct_listen = v.trim().into())),
    ("DLQ_FILE_MAX_BYTES", |c, v| Ok(c.ingest.dlq_file_max_bytes = parse_num(v)?)),
    ("DLQ_FILE_KEEP", |c, v| Ok(c.ingest.dlq_file_keep = parse_num(v)?)),
    ("STORAGE_RETAIN_BLOCKS", |c, v| Ok(c.storage.retain_blocks = parse_num(v)?)),
    ("STORAGE_RETAIN_BYTES", |c, v| Ok(c.storage.retain_bytes = parse_num(v)?)),
    ("STORAGE_SEGMENT_BYTES", |c, v| Ok(c.storage.segment_bytes = parse_num(v)?)),
    ("KAFKA_MAX_TIMESTAMP_SKEW", |c, v| Ok(c.ingest.max_timestamp_skew = parse_dur(v)?)),
    ("MEMPOOL_SKEW_TOLERANCE", |c, v| Ok(c.ingest.max_timestamp_skew = parse_dur(v)?)),
    ("MEMPOOL_NONCE_TTL", |c, v| Ok(c.ingest.nonce_ttl = parse_dur(v)?)),
    ("MAX_EVENT_BYTES", |c, v| Ok(c.ingest.max_event_bytes = parse_num(v)?)),
    ("MAX_PAYLOAD_BYTES", |c, v| Ok(c.ingest.max_payload_bytes = parse_num(v)?)),
    ("KAFKA_BROKERS", |c, v| Ok(c.kafka.brokers = v.trim().into())),
    ("KAFKA_TLS_ENABLED", |c, v| Ok(c.kafka.tls_enabled = parse_bool(v)?)),
    ("KAFKA_CA_LOCATION", |c, v| Ok(c.kafka.ca_location = v.trim().into())),
    ("KAFKA_SASL_MECHANISM", |c, v| Ok(c.kafka.sasl_mechanism = v.trim().into())),
    ("KAFKA_SASL_USERNAME", |c, v| Ok(c.kafka.sasl_username = v.into())),
    ("KAFKA_SASL_PASSWORD", |c, v| Ok(c.kafka.sasl_password = v.into())),
    ("KAFKA_INPUT_TOPICS", |c, v| Ok(c.kafka.input_topics = parse_list(v))),
    ("KAFKA_CONSUMER_GROUP_ID", |c, v| Ok(c.kafka.consumer_group_id = v.trim().into())),
    ("KAFKA_DLQ_TOPIC", |c, v| Ok(c.kafka.dlq_topic = v.trim().into())),
    ("KAFKA_CREATE_TOPICS", |c, v| Ok(c.kafka.create_topics = parse_bool(v)?)),
    ("KAFKA_TOPIC_PARTITIONS", |c, v| Ok(c.kafka.topic_partitions = parse_num(v)?)),
    ("KAFKA_TOPIC_REPLICATION", |c, v| Ok(c.kafka.topic_replication = parse_num(v)?)),
    ("CONTROL_COMMITS_TOPIC", |c, v| Ok(c.kafka.commits_topic = v.trim().into())),
    ("CONTROL_REPUTATION_TOPIC", |c, v| Ok(c.kafka.reputation_topic = v.trim().into())),
    ("CONTROL_POLICY_TOPIC", |c, v| Ok(c.kafka.policy_topic = v.trim().into())),
    ("CONTROL_EVIDENCE_TOPIC", |c, v| Ok(c.kafka.evidence_topic = v.trim().into())),
    ("MEMPOOL_MAX_TXS", |c, v| Ok(c.mempool.max_txs = parse_num(v)?)),
    ("MEMPOOL_MAX_BYTES", |c, v| Ok(c.mempool.max_bytes = parse_num(v)?)),
    ("MEMPOOL_RATE_PER_SECOND", |c, v| Ok(c.mempool.rate_per_second = parse_num(v)?)),
    ("MEMPOOL_RATE_BURST", |c, v| Ok(c.mempool.rate_burst = parse_num(v)?)),
    ("BLOCK_MAX_TXS", |c, v| Ok(c.block.max_txs = parse_num(v)?)),
    ("BLOCK_MAX_BYTES", |c, v| Ok(c.block.max_bytes = parse_num(v)?)),
    ("BLOCK_BUILD_INTERVAL", |c, v| Ok(c.block.build_interval = parse_dur(v)?)),
    ("BLOCK_MIN_INTERVAL", |c, v| Ok(c.block.min_interval = parse_dur(v)?)),
    ("BLOCK_MIN_MEMPOOL_TXS", |c, v| Ok(c.block.min_mempool_txs = parse_num(v)?)),
    ("CONSENSUS_BLOCK_TIMEOUT", |c, v| Ok(c.consensus.block_timeout = parse_dur(v)?)),
    ("CONSENSUS_BASE_TIMEOUT", |c, v| Ok(c.consensus.base_timeout = parse_dur(v)?)),
    ("CONSENSUS_MIN_TIMEOUT", |c, v| Ok(c.consensus.min_timeout = parse_dur(v)?)),
    ("CONSENSUS_MAX_TIMEOUT", |c, v| Ok(c.consensus.max_timeout = parse_dur(v)?)),
    ("CONSENSUS_TIMEOUT_INCREASE_FACTOR", |c, v| Ok(c.consensus.timeout_increase_factor = parse_num(v)?)),
    ("CONSENSUS_TIMEOUT_DECREASE_DELTA", |c, v| Ok(c.consensus.timeout_decrease_delta = parse_dur(v)?)),
    ("CONSENSUS_VIEWCHANGE_TIMEOUT", |c, v| Ok(c.consensus.viewchange_timeout = parse_dur(v)?)),
    ("CONSENSUS_HEARTBEAT_INTERVAL", |c, v| Ok(c.consensus.heartbeat_interval = parse_dur(v)?)),
    ("CONSENSUS_MAX_IDLE_TIME", |c, v| Ok(c.consensus.max_idle_time = parse_dur(v)?)),
    ("CONSENSUS_MISSED_HEARTBEATS", |c, v| Ok(c.consensus.missed_heartbeats = parse_num(v)?)),
    ("CONSENSUS_WINDOW", |c, v| Ok(c.consensus.window = parse_num(v)?)),
    ("CONSENSUS_CHECKPOINT_INTERVAL", |c, v| Ok(c.consensus.checkpoint_interval = parse_num(v)?)),
    ("CONSENSUS_RETRANSMIT_INTERVAL", |c, v| Ok(c.consensus.retransmit_interval = parse_dur(v)?)),
    ("CONSENSUS_SNAPSHOT_INTERVAL", |c, v| Ok(c.consensus.snapshot_interval = parse_num(v)?)),
    ("CONSENSUS_SNAPSHOT_JOIN_TIMEOUT", |c, v| Ok(c.consensus.snapshot_join_timeout = parse_dur(v)?)),
    ("CONSENSUS_ENABLE_AIMD", |c, v| Ok(c.consensus.enable_aimd = parse_bool(v)?)),
    ("CONSENSUS_ENABLE_REPUTATION", |c, v| Ok(c.consensus.enable_reputation = parse_bool(v)?)),
    ("CONSENSUS_MIN_LEADER_REPUTATION", |c, v| Ok(c.consensus.min_leader_reputation = parse_num(v)?)),
    ("CONSENSUS_ENABLE_QUARANTINE", |c, v| Ok(c.consensus.enable_quarantine = parse_bool(v)?)),
    ("RUNTIME_VERIFY_SHARDS", |c, v| Ok(c.runtime.verify_shards = parse_num(v)?)),
    ("RUNTIME_VERIFY_BATCH", |c, v| Ok(c.runtime.verify_batch = parse_num(v)?)),
    ("RUNTIME_VERIFY_NICE", |c, v| Ok(c.runtime.verify_nice = parse_num(v)?)),
    ("RUNTIME_RING_CAPACITY", |c, v| Ok(c.runtime.ring_capacity = parse_num(v)?)),
    ("RUNTIME_IDLE", |c, v| {
        c.runtime.idle = match v.trim() {
            "park" => IdlePolicy::Park,
            "spin" => IdlePolicy::Spin,
            _ => return Err(format!("expected park or spin, got {v:?}")),
        };
        Ok(())
    }),
    ("RUNTIME_PIN_CORES", |c, v| Ok(c.runtime.pin_cores = parse_bool(v)?)),
    ("RUNTIME_EXECUTOR", |c, v| {
        c.runtime.executor = match v.trim() {
            "glommio" => ExecutorKind::Glommio,
            "threads" => ExecutorKind::Threads,
            _ => return Err(format!("expected glommio or threads, got {v:?}")),
        };
        Ok(())
    }),
    ("RUNTIME_IO_MEMORY_BYTES", |c, v| Ok(c.runtime.io_memory_bytes = parse_num(v)?)),
    ("RUNTIME_SPIN_BEFORE_PARK", |c, v| Ok(c.runtime.spin_before_park = parse_dur(v)?)),
    ("ENABLE_PERSISTENCE", |c, v| Ok(c.database.enabled = parse_bool(v)?)),
    ("DB_DSN", |c, v| Ok(c.database.dsn = v.trim().into())),
    ("DATABASE_URL", |c, v| Ok(c.database.dsn = v.trim().into())),
    ("DB_TLS", |c, v| Ok(c.database.tls = parse_bool(v)?)),
    ("DB_RETRY_MIN", |c, v| Ok(c.database.retry_min = parse_dur(v)?)),
    ("DB_WRITE_MODE", |c, v| Ok(c.database.write_mode = v.trim().to_ascii_lowercase())),
    ("DB_RETRY_MAX", |c, v| Ok(c.database.retry_max = parse_dur(v)?)),
    ("ENABLE_API", |c, v| Ok(c.api.enabled = parse_bool(v)?)),
    ("API_LISTEN_ADDR", |c, v| Ok(c.api.listen = v.trim().into())),
    ("API_TLS_ENABLED", |c, v| Ok(c.api.tls_enabled = parse_bool(v)?)),
    ("API_TLS_CERT", |c, v| Ok(c.api.tls_cert = v.trim().into())),
    ("API_TLS_KEY", |c, v| Ok(c.api.tls_key = v.trim().into())),
    ("ENCRYPTION_KEY", |c, v| Ok(c.secrets.encryption_key = v.into())),
    ("SECRET_KEY", |c, v| Ok(c.secrets.secret_key = v.into())),
    ("JWT_SECRET", |c, v| Ok(c.secrets.jwt_secret = v.into())),
    ("AUDIT_SIGNING_KEY", |c, v| Ok(c.secrets.audit_signing_key = v.into())),
    ("AUDIT_LOG_PATH", |c, v| Ok(c.secrets.audit_log_path = v.trim().into())),
    ("AUDIT_LOG_MAX_BYTES", |c, v| Ok(c.secrets.audit_log_max_bytes = parse_num(v)?)),
    ("AUDIT_LOG_KEEP", |c, v| Ok(c.secrets.audit_log_keep = parse_num(v)?)),
    ("LOG_LEVEL", |c, v| Ok(c.log.level = v.trim().into())),
];

/// Checks the peer list (`id@host:port` for every other validator), the
/// listen address and the IP allowlist.
fn validate_p2p(c: &Config, e: &mut Vec<ConfigError>) -> (BTreeMap<u32, std::net::SocketAddr>, Vec<ipnet::IpNet>) {
    use std::net::ToSocketAddrs;
    let mut peers = BTreeMap::new();
    for p in &c.cluster.peers {
        let Some((id, addr)) = p.split_once('@') else {
            e.push(err(
                "P2P_BOOTSTRAP_PEERS (cluster.peers)",
                format!("{p:?} is not id@host:port"),
                "write each peer as e.g. 2@10.0.0.2:8001",
            ));
            continue;
        };
        let Ok(id) = id.trim().parse::<u32>() else {
            e.push(err(
                "P2P_BOOTSTRAP_PEERS (cluster.peers)",
                format!("{p:?}: {id:?} is not a validator id"),
                "write each peer as e.g. 2@10.0.0.2:8001",
            ));
            continue;
        };
        // An id outside the genesis set is a validator a set change adds
        // (its address, for when the chain names it).
        match addr.trim().to_socket_addrs().ok().and_then(|mut a| a.next()) {
            Some(a) => {
                peers.insert(id, a);
            }
            None => e.push(err(
                "P2P_BOOTSTRAP_PEERS (cluster.peers)",
                format!("{p:?}: cannot resolve {addr:?}"),
                "use host:port that resolves, e.g. 10.0.0.2:8001",
            )),
        }
    }
    if c.cluster.nodes.len() > 1 {
        for id in &c.cluster.nodes {
            if *id != c.node.id
                && !c.cluster.enable_mdns
                && !peers.contains_key(id)
                && !c.cluster.peers.iter().any(|p| p.starts_with(&format!("{id}@")))
            {
                e.push(err(
                    "P2P_BOOTSTRAP_PEERS (cluster.peers)",
                    format!("no address for validator {id}"),
                    format!("add {id}@host:port (its P2P_LISTEN_ADDR)"),
                ));
            }
        }
        if c.cluster.listen.parse::<std::net::SocketAddr>().is_err() {
            e.push(err(
                "P2P_LISTEN_ADDR (cluster.listen)",
                format!("{:?} is not ip:port", c.cluster.listen),
                "use e.g. 0.0.0.0:8001",
            ));
        }
    }
    let mut allowed = vec![];
    for a in &c.cluster.allowed_ips {
        let a = a.trim();
        match a.parse::<ipnet::IpNet>().or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
            Ok(n) => allowed.push(n),
            Err(_) => e.push(err(
                "ALLOWED_IPS (cluster.allowed_ips)",
                format!("{a:?} is not a CIDR or IP address"),
                "use e.g. 10.0.0.0/24,127.0.0.1",
            )),
        }
    }
    (peers, allowed)
}

/// A validated configuration with parsed keys.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    /// Validator id -> key, in id order.
    pub validators: BTreeMap<u32, PublicKey>,
    pub producers: Vec<PublicKey>,
    pub quorum: usize,
    pub faults: usize,
    /// Other validators' QUIC addresses (from P2P_BOOTSTRAP_PEERS; with
    /// mDNS some may be missing, found at run time).
    pub peers: BTreeMap<u32, std::net::SocketAddr>,
    pub allowed_ips: Vec<ipnet::IpNet>,
}

impl Validated {
    /// The state machine's settings, with what it judges validator set
    /// changes against (a chain of one validator takes none).
    pub fn state_config(&self) -> StateConfig {
        let c = &self.config;
        let mut s = c.state_config();
        if self.validators.len() > 1 {
            s.chain = Some(std::sync::Arc::new(crate::protocol::reconfig::ChainRules {
                chain: c.consensus_fingerprint(),
                genesis: self.validators.clone(),
                checkpoint_interval: c.consensus.checkpoint_interval,
                window: c.consensus.window,
            }));
        }
        s
    }
}

impl Config {
    /// Parses a TOML file (unknown keys are errors, named).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![err(
                origin,
                e.message().to_string(),
                "see README \"Configuration\" for the keys and their types",
            )])
        })
    }

    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let mut c = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigErrors(vec![err(
                        &p.display().to_string(),
                        e.to_string(),
                        "pass an existing TOML file with --config",
                    )])
                })?;
                Self::from_toml(&text, &p.display().to_string())?
            }
            None => Config::default(),
        };
        c.apply_env(std::env::vars())?;
        Ok(c)
    }

    /// Applies overrides from `vars` (normally the process environment).
    pub fn apply_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigErrors> {
        let mut errors = vec![];
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        for (name, set) in ENV_VARS {
            if let Some(v) = vars.get(*name) {
                if let Err(e) = set(self, v) {
                    errors.push(err(name, e, format!("set {name} to a valid value or unset it")));
                }
            }
        }
        for (name, v) in &vars {
            if let Some(id) = name.strip_prefix("VALIDATOR_").and_then(|r| r.strip_suffix("_PUBKEY_HEX")) {
                match id.parse::<u32>() {
                    Ok(id) => {
                        self.cluster.validators.insert(id.to_string(), v.trim().to_string());
                    }
                    Err(_) => errors.push(err(
                        name,
                        "the part between VALIDATOR_ and _PUBKEY_HEX is not a number",
                        "name it VALIDATOR_<id>_PUBKEY_HEX",
                    )),
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    pub fn limits(&self) -> Limits {
        Limits { max_event_bytes: self.ingest.max_event_bytes, max_payload_bytes: self.ingest.max_payload_bytes }
    }
    pub fn builder(&self) -> BuilderConfig {
        BuilderConfig {
            max_txs: self.block.max_txs,
            max_bytes: self.block.max_bytes,
            build_interval: self.block.build_interval,
            min_txs: self.block.min_mempool_txs,
            min_interval: self.block.min_interval,
        }
    }
    pub fn mempool_config(&self) -> MempoolConfig {
        MempoolConfig { max_txs: self.mempool.max_txs, max_bytes: self.mempool.max_bytes }
    }
    pub fn state_config(&self) -> StateConfig {
        StateConfig {
            nonce_ttl_ms: self.ingest.nonce_ttl.as_millis() as u64,
            future_skew_ms: self.ingest.max_timestamp_skew.as_millis() as u64,
            rate_per_second: self.mempool.rate_per_second,
            rate_burst: self.mempool.rate_burst,
            chain: None,
        }
    }

    /// SHA-256 of every setting all validators must share (the genesis
    /// ceremony's config hash). Local settings (paths, listen addresses,
    /// threads, logging, credentials) are left out.
    pub fn consensus_fingerprint(&self) -> crate::Hash32 {
        let mut producers = self.producers.keys.iter().map(|k| k.trim().to_ascii_lowercase()).collect::<Vec<_>>();
        producers.sort();
        let mut nodes = self.cluster.nodes.clone();
        nodes.sort();
        let validators: BTreeMap<u32, String> = self
            .cluster
            .validators
            .iter()
            .filter_map(|(id, k)| Some((id.parse::<u32>().ok()?, k.trim().to_ascii_lowercase())))
            .collect();
        let canonical = serde_json::json!({
            "v": 1,
            "nodes": nodes,
            "quorum_size": self.cluster.quorum_size,
            "validators": validators,
            "producers": producers,
            "ingest": {
                "max_timestamp_skew_ms": self.ingest.max_timestamp_skew.as_millis() as u64,
                "nonce_ttl_ms": self.ingest.nonce_ttl.as_millis() as u64,
                "max_event_bytes": self.ingest.max_event_bytes,
                "max_payload_bytes": self.ingest.max_payload_bytes,
            },
            "mempool": { "rate_per_second": self.mempool.rate_per_second, "rate_burst": self.mempool.rate_burst },
            "block": {
                "max_txs": self.block.max_txs,
                "max_bytes": self.block.max_bytes,
                "build_interval_ms": self.block.build_interval.as_millis() as u64,
                "min_mempool_txs": self.block.min_mempool_txs,
            },
            "consensus": serde_json::to_value(&self.consensus).expect("serialisable"),
        });
        crate::sha256(canonical.to_string().as_bytes())
    }

    /// PBFT parameters for the validator set (manual defaults, from config).
    pub fn pbft_params(&self, n: usize) -> crate::protocol::consensus::pbft::Params {
        let c = &self.consensus;
        let ms = |d: Duration| d.as_millis() as u64;
        let mut p = crate::protocol::consensus::pbft::Params {
            n,
            window: c.window,
            checkpoint_interval: c.checkpoint_interval,
            timeout_ms: ms(c.base_timeout),
            timeout_min_ms: ms(c.min_timeout),
            timeout_max_ms: ms(c.max_timeout),
            timeout_increase: c.timeout_increase_factor,
            timeout_decrease_ms: ms(c.timeout_decrease_delta),
            retransmit_ms: ms(c.retransmit_interval),
            heartbeat_ms: ms(c.heartbeat_interval),
            missed_heartbeats: c.missed_heartbeats as u64,
            // The block store answers older fetches.
            keep_committed: 2 * c.window,
        };
        if !c.enable_aimd {
            p.timeout_increase = 1.0;
            p.timeout_decrease_ms = 0;
            p.timeout_min_ms = p.timeout_ms;
            p.timeout_max_ms = p.timeout_ms;
        }
        p
    }

    /// Validates everything, returning all problems at once.
    pub fn validate(self) -> Result<Validated, ConfigErrors> {
        let mut e = vec![];
        let c = &self;
        let (validators, quorum, faults) = validate_cluster(c, &mut e);
        let producers = validate_producers(c, &mut e);
        validate_limits(c, &mut e);
        validate_timeouts(c, &mut e);
        validate_runtime(c, &mut e);
        let (peers, allowed_ips) = validate_p2p(c, &mut e);
        validate_window(c, &mut e);
        validate_edges(c, &mut e);
        if c.node.environment == Environment::Production {
            production_checklist(c, &mut e);
        }
        if e.is_empty() {
            Ok(Validated { producers, validators, quorum, faults, peers, allowed_ips, config: self })
        } else {
            Err(ConfigErrors(e))
        }
    }
}

/// Cluster membership, validator keys and the quorum: (keys by id, quorum, f).
fn validate_cluster(c: &Config, e: &mut Vec<ConfigError>) -> (BTreeMap<u32, crypto::PublicKey>, usize, usize) {
    if c.cluster.nodes.is_empty() {
        e.push(err(
            "CONSENSUS_NODES (cluster.nodes)",
            "no validators listed",
            "list the validator ids, e.g. CONSENSUS_NODES=1,2,3,4",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for id in &c.cluster.nodes {
        if !seen.insert(*id) {
            e.push(err(
                "CONSENSUS_NODES (cluster.nodes)",
                format!("validator id {id} is listed twice"),
                "list each id once",
            ));
        }
    }
    let in_genesis = c.cluster.nodes.contains(&c.node.id);
    if !c.cluster.nodes.is_empty() && !in_genesis && !c.node.added_by_set_change {
        e.push(err(
            "NODE_ID (node.id)",
            format!("node id {} is not in CONSENSUS_NODES {:?}", c.node.id, c.cluster.nodes),
            "set NODE_ID to one of the listed ids or add it to CONSENSUS_NODES (or, for a validator a set change adds, set NODE_ADDED_BY_SET_CHANGE=true)",
        ));
    }
    if c.node.added_by_set_change && (in_genesis || c.cluster.nodes.len() < 4) {
        e.push(err(
            "NODE_ADDED_BY_SET_CHANGE (node.added_by_set_change)",
            match in_genesis {
                true => format!("validator {} is in the genesis set CONSENSUS_NODES", c.node.id),
                false => "a set change needs a genesis set of at least 4 validators".to_string(),
            },
            "set it only on a validator an `add` set change names, with the chain's genesis settings unchanged",
        ));
    }
    let mut validators = BTreeMap::new();
    for id in &c.cluster.nodes {
        let var = format!("VALIDATOR_{id}_PUBKEY_HEX");
        match c.cluster.validators.get(&id.to_string()) {
            None => e.push(err(
                &var,
                format!("missing public key for validator {id}"),
                format!("set {var} to the 64-hex-char key printed by `cybermesh keygen`"),
            )),
            Some(h) => match crypto::parse_public_key_hex(h) {
                Ok(k) => {
                    validators.insert(*id, k);
                }
                Err(m) => e.push(err(&var, m, "use the public key printed by `cybermesh keygen`")),
            },
        }
    }
    let n = c.cluster.nodes.len();
    let faults = n.saturating_sub(1) / 3;
    let quorum = n - faults;
    if c.cluster.quorum_size != 0 && c.cluster.quorum_size < quorum {
        e.push(err(
            "QUORUM_SIZE (cluster.quorum_size)",
            format!(
                "{} is below N − f = {quorum} for N = {n} (f = {faults}); two quorums could then disagree on a block",
                c.cluster.quorum_size
            ),
            format!("unset QUORUM_SIZE (it is derived) or set it to {quorum}"),
        ));
    }
    if c.cluster.quorum_size > quorum {
        e.push(err(
            "QUORUM_SIZE (cluster.quorum_size)",
            format!(
                "{} is above N − f = {quorum}: PBFT here always uses N − f (a larger quorum would stall with f validators down)",
                c.cluster.quorum_size
            ),
            format!("unset it or set it to {quorum}"),
        ));
    }
    (validators, quorum, faults)
}

/// The producers' keys (every event must be signed by one).
fn validate_producers(c: &Config, e: &mut Vec<ConfigError>) -> Vec<crypto::PublicKey> {
    let mut producers = vec![];
    for (i, h) in c.producers.keys.iter().enumerate() {
        match crypto::parse_public_key_hex(h) {
            Ok(k) => producers.push(k),
            Err(m) => e.push(err(
                &format!("PRODUCER_PUBKEYS[{i}] (producers.keys)"),
                m,
                "use the producers' 32-byte Ed25519 public keys in hex",
            )),
        }
    }
    if producers.is_empty() {
        e.push(err(
            "PRODUCER_PUBKEYS (producers.keys)",
            "no producer keys: every event would be rejected as unknown_producer",
            "list the AI detectors' public keys",
        ));
    }
    producers
}

/// Limits and sizes: positive, and consistent with each other.
fn validate_limits(c: &Config, e: &mut Vec<ConfigError>) {
    let positive = [
        ("MEMPOOL_MAX_TXS (mempool.max_txs)", c.mempool.max_txs),
        ("MEMPOOL_MAX_BYTES (mempool.max_bytes)", c.mempool.max_bytes),
        ("BLOCK_MAX_TXS (block.max_txs)", c.block.max_txs),
        ("BLOCK_MAX_BYTES (block.max_bytes)", c.block.max_bytes),
        ("MAX_EVENT_BYTES (ingest.max_event_bytes)", c.ingest.max_event_bytes),
        ("MAX_PAYLOAD_BYTES (ingest.max_payload_bytes)", c.ingest.max_payload_bytes),
        ("RUNTIME_VERIFY_SHARDS (runtime.verify_shards)", c.runtime.verify_shards),
        ("RUNTIME_VERIFY_BATCH (runtime.verify_batch)", c.runtime.verify_batch),
        ("runtime.ring_capacity", c.runtime.ring_capacity),
    ];
    for (k, v) in positive {
        if v == 0 {
            e.push(err(k, "must be greater than 0", "set a positive value"));
        }
    }
    if c.ingest.dlq_file_max_bytes < 64 * 1024 {
        e.push(err(
            "DLQ_FILE_MAX_BYTES (ingest.dlq_file_max_bytes)",
            format!("{} bytes would rotate the DLQ file every few records", c.ingest.dlq_file_max_bytes),
            "use at least 65536 (default 67108864, 64 MiB)",
        ));
    }
    if !(0..=19).contains(&c.runtime.verify_nice) {
        e.push(err(
            "RUNTIME_VERIFY_NICE (runtime.verify_nice)",
            format!("{} is outside 0..=19", c.runtime.verify_nice),
            "use 0 (same priority as the core thread) up to 19 (lowest)",
        ));
    }
    if c.block.min_mempool_txs > c.block.max_txs {
        e.push(err(
            "BLOCK_MIN_MEMPOOL_TXS (block.min_mempool_txs)",
            format!("{} exceeds BLOCK_MAX_TXS {}", c.block.min_mempool_txs, c.block.max_txs),
            "lower it",
        ));
    }
    if c.block.max_txs > c.mempool.max_txs {
        e.push(err(
            "BLOCK_MAX_TXS (block.max_txs)",
            format!("{} exceeds MEMPOOL_MAX_TXS {}: blocks could never fill", c.block.max_txs, c.mempool.max_txs),
            "raise MEMPOOL_MAX_TXS or lower BLOCK_MAX_TXS",
        ));
    }
    if c.ingest.max_payload_bytes > c.ingest.max_event_bytes {
        e.push(err(
            "MAX_PAYLOAD_BYTES (ingest.max_payload_bytes)",
            "exceeds MAX_EVENT_BYTES",
            "keep the payload limit at or below the event limit",
        ));
    }
    if c.block.build_interval.is_zero() {
        e.push(err("BLOCK_BUILD_INTERVAL (block.build_interval)", "is zero", "set e.g. 500ms"));
    }
    if c.block.min_interval > c.block.build_interval {
        e.push(err(
            "BLOCK_MIN_INTERVAL (block.min_interval)",
            "exceeds BLOCK_BUILD_INTERVAL",
            "keep the idle pipeline's floor at or below the build interval (e.g. 10ms)",
        ));
    }
    if c.ingest.nonce_ttl < c.ingest.max_timestamp_skew {
        e.push(err("MEMPOOL_NONCE_TTL (ingest.nonce_ttl)", "is shorter than the timestamp skew tolerance: a replay could arrive after its nonce is forgotten but before it is stale", "set MEMPOOL_NONCE_TTL >= KAFKA_MAX_TIMESTAMP_SKEW"));
    }
}

/// The view-change timeouts and heartbeats.
fn validate_timeouts(c: &Config, e: &mut Vec<ConfigError>) {
    let cs = &c.consensus;
    if cs.min_timeout > cs.max_timeout {
        e.push(err("CONSENSUS_MIN_TIMEOUT", "is above CONSENSUS_MAX_TIMEOUT", "make min <= max"));
    }
    if cs.timeout_increase_factor.is_nan() || cs.timeout_increase_factor < 1.0 {
        e.push(err(
            "CONSENSUS_TIMEOUT_INCREASE_FACTOR",
            format!("{} is below 1.0", cs.timeout_increase_factor),
            "use e.g. 1.5",
        ));
    }
    if !(0.0..=1.0).contains(&cs.min_leader_reputation) {
        e.push(err("CONSENSUS_MIN_LEADER_REPUTATION", "outside 0.0..=1.0", "use e.g. 0.7"));
    }
    if cs.missed_heartbeats == 0 {
        e.push(err("CONSENSUS_MISSED_HEARTBEATS", "is 0", "use e.g. 6"));
    }
}

/// Pinned cores and the direct source's address.
fn validate_runtime(c: &Config, e: &mut Vec<ConfigError>) {
    if c.runtime.executor == ExecutorKind::Glommio && c.runtime.io_memory_bytes < 64 << 10 {
        e.push(err(
            "RUNTIME_IO_MEMORY_BYTES (runtime.io_memory_bytes)",
            format!("{} is below glommio's minimum of 65536", c.runtime.io_memory_bytes),
            "use e.g. 1048576 (1 MiB)",
        ));
    }
    if c.runtime.pin_cores {
        let avail = core_affinity::get_core_ids().map(|v| v.len()).unwrap_or(0);
        let r = &c.runtime;
        for core in r.verify_cores.iter().chain(r.core_core.iter()).chain(r.storage_core.iter()) {
            if *core >= avail {
                e.push(err(
                    "runtime.verify_cores / runtime.core_core / runtime.storage_core",
                    format!("core {core} does not exist (this machine has {avail})"),
                    "use core numbers below the core count",
                ));
            }
        }
    }
    if c.ingest.source == SourceKind::Direct && c.ingest.direct_listen.parse::<std::net::SocketAddr>().is_err() {
        e.push(err(
            "DIRECT_LISTEN_ADDR (ingest.direct_listen)",
            format!("{:?} is not host:port", c.ingest.direct_listen),
            "use e.g. 127.0.0.1:7600",
        ));
    }
}

/// The PBFT window, checkpoint and snapshot intervals.
fn validate_window(c: &Config, e: &mut Vec<ConfigError>) {
    if c.consensus.window == 0 || c.consensus.window > 1024 {
        e.push(err(
            "CONSENSUS_WINDOW (consensus.window)",
            format!("{} is out of range", c.consensus.window),
            "use 1..=1024 (default 16)",
        ));
    }
    if c.consensus.checkpoint_interval == 0 || c.consensus.checkpoint_interval > c.consensus.window {
        e.push(err(
            "CONSENSUS_CHECKPOINT_INTERVAL (consensus.checkpoint_interval)",
            format!("{} must be between 1 and the window ({})", c.consensus.checkpoint_interval, c.consensus.window),
            "use half the window (default 8 of 16)",
        ));
    }
    if c.secrets.audit_log_max_bytes < 64 * 1024 {
        e.push(err(
            "AUDIT_LOG_MAX_BYTES (secrets.audit_log_max_bytes)",
            format!("{} bytes would close an audit segment every few records", c.secrets.audit_log_max_bytes),
            "use at least 65536 (default 67108864, 64 MiB)",
        ));
    }
    if c.storage.segment_bytes < 64 * 1024 {
        e.push(err(
            "STORAGE_SEGMENT_BYTES (storage.segment_bytes)",
            format!("{} bytes would start a segment file every few blocks", c.storage.segment_bytes),
            "use at least 65536 (default 268435456, 256 MiB)",
        ));
    }
    if c.storage.retain_bytes > 0 && c.storage.retain_bytes < 2 * c.storage.segment_bytes {
        e.push(err(
            "STORAGE_RETAIN_BYTES (storage.retain_bytes)",
            format!(
                "{} bytes is under two segments ({} each): nearly every block would go at once",
                c.storage.retain_bytes, c.storage.segment_bytes
            ),
            "allow several segments (e.g. 8 × STORAGE_SEGMENT_BYTES), or lower STORAGE_SEGMENT_BYTES",
        ));
    }
    if c.storage.retain_bytes > 0 && (c.consensus.snapshot_interval == 0 || c.cluster.validators.len() < 2) {
        e.push(err(
            "STORAGE_RETAIN_BYTES (storage.retain_bytes)",
            "pruning needs chain snapshots to restart from and serve joins, and a single validator (or \
             CONSENSUS_SNAPSHOT_INTERVAL=0) makes none",
            "set 0 for no byte budget, or run several validators with CONSENSUS_SNAPSHOT_INTERVAL > 0",
        ));
    }
    if c.storage.retain_blocks > 0 {
        if c.consensus.snapshot_interval == 0 || c.cluster.validators.len() < 2 {
            e.push(err(
                "STORAGE_RETAIN_BLOCKS (storage.retain_blocks)",
                "pruning needs chain snapshots to restart from and serve joins, and a single validator (or \
                 CONSENSUS_SNAPSHOT_INTERVAL=0) makes none",
                "set 0 to keep every block, or run several validators with CONSENSUS_SNAPSHOT_INTERVAL > 0",
            ));
        } else if c.storage.retain_blocks < c.consensus.window {
            e.push(err(
                "STORAGE_RETAIN_BLOCKS (storage.retain_blocks)",
                format!(
                    "{} is below the PBFT window ({}): a peer a window behind could not catch up from this validator",
                    c.storage.retain_blocks, c.consensus.window
                ),
                format!("use at least {} (or 0 to keep every block)", c.consensus.window),
            ));
        }
    }
    let ci = c.consensus.checkpoint_interval.max(1);
    if c.consensus.snapshot_interval % ci != 0 {
        e.push(err(
            "CONSENSUS_SNAPSHOT_INTERVAL (consensus.snapshot_interval)",
            format!(
                "{} is not a multiple of the checkpoint interval ({ci}): its checkpoint is what vouches for a snapshot",
                c.consensus.snapshot_interval
            ),
            "use a multiple of CONSENSUS_CHECKPOINT_INTERVAL (default 1024 with 8), or 0 to turn snapshots off",
        ));
    }
}

/// Logging, the database mirror, the API's TLS and Kafka.
fn validate_edges(c: &Config, e: &mut Vec<ConfigError>) {
    if !["trace", "debug", "info", "warn", "error"].contains(&c.log.level.as_str()) {
        e.push(err(
            "LOG_LEVEL (log.level)",
            format!("unknown level {:?}", c.log.level),
            "use debug, info, warn or error",
        ));
    }
    if c.database.enabled && c.database.dsn.is_empty() {
        e.push(err(
            "DB_DSN (database.dsn)",
            "persistence is enabled but no DSN is set",
            "set DB_DSN=postgresql://user:pass@host:5432/cybermesh or ENABLE_PERSISTENCE=false",
        ));
    }
    if c.api.enabled && c.api.tls_enabled && (c.api.tls_cert.is_empty() || c.api.tls_key.is_empty()) {
        e.push(err(
            "API_TLS_CERT / API_TLS_KEY",
            "API_TLS_ENABLED=true needs a certificate and a key",
            "set API_TLS_CERT=/path/cert.pem and API_TLS_KEY=/path/key.pem",
        ));
    }
    if !["copy", "unnest"].contains(&c.database.write_mode.as_str()) {
        e.push(err(
            "DB_WRITE_MODE (database.write_mode)",
            format!("{:?} is not a write mode", c.database.write_mode),
            "use copy (default) or unnest",
        ));
    }
    if c.database.enabled && !c.database.dsn.is_empty() {
        match crate::edges::persist::split_tls(&c.database.dsn) {
            Err(why) => e.push(err("DB_DSN (database.dsn)", why, "see README \"Database mirror\"")),
            Ok(t) if c.database.tls && t.verify_full_ca.is_none() => e.push(err(
                "DB_TLS / DB_DSN",
                "DB_TLS=true but DB_DSN does not ask for a verified TLS connection",
                "add sslmode=verify-full&sslrootcert=/path/to/ca.pem to DB_DSN",
            )),
            Ok(_) => {}
        }
    }
    let mech = c.kafka.sasl_mechanism.to_ascii_uppercase();
    if !["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&mech.as_str()) {
        e.push(err(
            "KAFKA_SASL_MECHANISM",
            format!("unknown mechanism {:?}", c.kafka.sasl_mechanism),
            "use SCRAM-SHA-256 or SCRAM-SHA-512",
        ));
    }
    if c.ingest.source == SourceKind::Kafka {
        for t in &c.kafka.input_topics {
            if crate::protocol::event::TxKind::from_topic(t).is_none() {
                e.push(err(
                    "KAFKA_INPUT_TOPICS (kafka.input_topics)",
                    format!("topic {t:?} does not say which events it carries"),
                    "name each input topic with anomal…, evidence, policy or reconfig in it (default ai.anomalies.v1,ai.evidence.v1,ai.policy.v1; validator set changes: add control.reconfiguration.v1)",
                ));
            }
        }
        if c.kafka.topic_partitions < 1 || c.kafka.topic_replication < 1 {
            e.push(err(
                "KAFKA_TOPIC_PARTITIONS / KAFKA_TOPIC_REPLICATION",
                "must be at least 1",
                "set KAFKA_TOPIC_PARTITIONS=4 and KAFKA_TOPIC_REPLICATION=1 (or your cluster's factor)",
            ));
        }
        if c.kafka.input_topics.is_empty() || c.kafka.brokers.trim().is_empty() {
            e.push(err(
                "KAFKA_BROKERS / KAFKA_INPUT_TOPICS",
                "INGEST_SOURCE=kafka needs brokers and input topics",
                "set KAFKA_BROKERS=host:9092 and KAFKA_INPUT_TOPICS (defaults: 127.0.0.1:9092; the ai.* topics)",
            ));
        }
    }
}

fn is_placeholder(s: &str) -> bool {
    let l = s.trim().to_ascii_lowercase();
    l.is_empty()
        || l.starts_with('<')
        || ["changeme", "change-me", "placeholder", "example", "secret", "password", "todo", "xxx"]
            .iter()
            .any(|p| l.contains(p))
        || l.chars().all(|c| c == '0')
        || l.chars().collect::<std::collections::BTreeSet<_>>().len() < 4
}

/// The manual's production checklist, enforced.
fn production_checklist(c: &Config, e: &mut Vec<ConfigError>) {
    if c.cluster.enable_mdns && !c.cluster.mdns_in_production {
        e.push(err(
            "P2P_ENABLE_MDNS (cluster.enable_mdns)",
            "mDNS announces this validator to the whole LAN and takes peer addresses from it; not in production \
             unless allowed",
            "list the peers in P2P_BOOTSTRAP_PEERS, or set P2P_MDNS_ALLOW_PRODUCTION=true on a LAN you trust",
        ));
    }
    if c.ingest.source == SourceKind::Kafka {
        if !c.kafka.tls_enabled {
            e.push(err("KAFKA_TLS_ENABLED", "production requires TLS to Kafka", "set KAFKA_TLS_ENABLED=true"));
        }
        let mech = c.kafka.sasl_mechanism.to_ascii_uppercase();
        if mech == "PLAIN" {
            e.push(err(
                "KAFKA_SASL_MECHANISM",
                "PLAIN is not allowed in production",
                "use SCRAM-SHA-256 or SCRAM-SHA-512",
            ));
        } else if mech.is_empty() {
            e.push(err(
                "KAFKA_SASL_MECHANISM",
                "production requires SASL authentication to Kafka",
                "set SCRAM-SHA-256 or SCRAM-SHA-512 with KAFKA_SASL_USERNAME/PASSWORD",
            ));
        }
        if !mech.is_empty() && is_placeholder(&c.kafka.sasl_password) {
            e.push(err("KAFKA_SASL_PASSWORD", "empty or a placeholder", "set the real SASL password"));
        }
    }
    if c.ingest.source == SourceKind::Direct {
        let loopback =
            c.ingest.direct_listen.parse::<std::net::SocketAddr>().map(|a| a.ip().is_loopback()).unwrap_or(false);
        if !loopback {
            e.push(err(
                "DIRECT_LISTEN_ADDR",
                "the direct source is unauthenticated and must listen on loopback in production",
                "use 127.0.0.1:<port> or INGEST_SOURCE=kafka",
            ));
        }
    }
    if c.database.enabled {
        let dsn = c.database.dsn.to_ascii_lowercase();
        if !c.database.tls || !dsn.contains("sslmode=verify-full") {
            e.push(err(
                "DB_TLS / DB_DSN",
                "production requires TLS to the database with certificate verification",
                "set DB_TLS=true and sslmode=verify-full in DB_DSN",
            ));
        }
    }
    // Production: TLS on the API, or loopback only (behind a TLS proxy).
    let loopback = c.api.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
    if c.api.enabled && !loopback && !c.api.tls_enabled {
        e.push(err(
            "API_TLS_ENABLED",
            "production requires TLS on an API reachable from other hosts",
            "set API_TLS_ENABLED=true with API_TLS_CERT/API_TLS_KEY, or bind API_LISTEN_ADDR to loopback behind a TLS proxy",
        ));
    }
    for (name, v, min) in [
        ("ENCRYPTION_KEY", &c.secrets.encryption_key, 64),
        ("SECRET_KEY", &c.secrets.secret_key, 64),
        ("JWT_SECRET", &c.secrets.jwt_secret, 128),
        ("AUDIT_SIGNING_KEY", &c.secrets.audit_signing_key, 64),
    ] {
        if !v.is_empty() && (is_placeholder(v) || v.len() < min) {
            e.push(err(
                name,
                format!("looks like a placeholder or is shorter than {min} characters"),
                format!("generate one, e.g. `openssl rand -hex {}`", min / 2),
            ));
        }
    }
    let mut files = vec![("CONTROL_SIGNING_KEY_PATH (node.key_file)", &c.node.key_file)];
    files.extend(c.node.next_key_file.iter().map(|p| ("CYBERMESH_NEXT_KEY_FILE (node.next_key_file)", p)));
    for (key, path) in files {
        match std::fs::metadata(path) {
            Ok(m) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = m.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    e.push(err(
                        key,
                        format!("{} has mode {mode:o}", path.display()),
                        format!("chmod 600 {}", path.display()),
                    ));
                }
            }
            Err(er) => {
                e.push(err(key, format!("{}: {er}", path.display()), "create it with `cybermesh keygen --out FILE`"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_hex() -> String {
        hex::encode(crypto::public_key(&crypto::generate_key()))
    }

    fn good() -> Config {
        let mut c = Config::default();
        c.cluster.nodes = vec![1, 2, 3, 4];
        for i in 1..=4 {
            c.cluster.validators.insert(i.to_string(), key_hex());
        }
        c.cluster.peers = (2..=4).map(|i| format!("{i}@127.0.0.1:800{i}")).collect();
        c.producers.keys = vec![key_hex()];
        c
    }

    fn keys_of(e: ConfigErrors) -> Vec<String> {
        e.0.into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn good_config_validates_with_quorum_n_minus_f() {
        let v = good().validate().unwrap();
        assert_eq!((v.quorum, v.faults), (3, 1));
        let mut c = good();
        c.cluster.nodes = vec![1, 2, 3, 4, 5];
        c.cluster.validators.insert("5".into(), key_hex());
        c.cluster.peers.push("5@127.0.0.1:8005".into());
        let v = c.validate().unwrap();
        assert_eq!(v.peers[&5], "127.0.0.1:8005".parse().unwrap());
        let mut c = good();
        c.cluster.quorum_size = 3;
        assert!(c.clone().validate().is_ok(), "N − f itself may be written out");
        c.cluster.quorum_size = 4;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("4 is above N − f = 3"), "{e}");
        assert_eq!((v.quorum, v.faults), (4, 1), "N=5: f=1, q=N-f=4, not the manual's 3");
    }

    #[test]
    fn peer_list_and_allowlist_errors_name_the_entry() {
        let mut c = good();
        c.cluster.peers = vec!["2@127.0.0.1:8002".into(), "3-127.0.0.1:8003".into(), "7@127.0.0.1:8007".into()];
        c.cluster.allowed_ips = vec!["10.0.0.0/8".into(), "127.0.0.1".into(), "not-an-ip".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("\"3-127.0.0.1:8003\" is not id@host:port"), "{e}");
        // 7 is outside the genesis set: a validator a set change may add.
        assert!(!e.contains("7@"), "{e}");
        assert!(e.contains("no address for validator 4"), "{e}");
        assert!(e.contains("\"not-an-ip\" is not a CIDR"), "{e}");
        let mut c = good();
        c.cluster.allowed_ips = vec!["10.0.0.0/8".into(), "127.0.0.1".into()];
        c.cluster.peers.push("7@127.0.0.1:8007".into());
        let v = c.validate().unwrap();
        assert_eq!(v.allowed_ips.len(), 2);
        assert!(v.allowed_ips[1].contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()));
        assert_eq!(v.peers.get(&7), Some(&"127.0.0.1:8007".parse().unwrap()));
    }

    #[test]
    fn a_validator_outside_the_genesis_set_says_a_set_change_adds_it() {
        let mut c = good();
        c.node.id = 9;
        c.cluster.peers = (1..=4).map(|i| format!("{i}@127.0.0.1:800{i}")).collect();
        assert_eq!(keys_of(c.clone().validate().unwrap_err()), vec!["NODE_ID (node.id)"]);
        c.node.added_by_set_change = true;
        let v = c.clone().validate().unwrap();
        assert!(!v.validators.contains_key(&9), "the genesis set stays");
        c.node.id = 1;
        assert_eq!(
            keys_of(c.validate().unwrap_err()),
            vec!["NODE_ADDED_BY_SET_CHANGE (node.added_by_set_change)"],
            "a genesis validator is not added"
        );
    }

    #[test]
    fn each_error_names_its_variable() {
        let mut c = good();
        c.node.id = 9;
        c.cluster.quorum_size = 2;
        c.cluster.validators.remove("3");
        c.cluster.validators.insert("4".into(), "abcd".into());
        let k = keys_of(c.validate().unwrap_err());
        assert!(k.contains(&"NODE_ID (node.id)".to_string()), "{k:?}");
        assert!(k.contains(&"QUORUM_SIZE (cluster.quorum_size)".to_string()));
        assert!(k.contains(&"VALIDATOR_3_PUBKEY_HEX".to_string()));
        assert!(k.contains(&"VALIDATOR_4_PUBKEY_HEX".to_string()));
        let mut c = good();
        c.apply_env([("RUNTIME_VERIFY_NICE".to_string(), "20".to_string())]).unwrap();
        assert_eq!(keys_of(c.clone().validate().unwrap_err()), vec!["RUNTIME_VERIFY_NICE (runtime.verify_nice)"]);
        c.runtime.verify_nice = 5;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn env_overrides_use_manual_names() {
        let mut c = good();
        let k = key_hex();
        c.apply_env([
            ("NODE_ID".to_string(), "3".to_string()),
            ("BLOCK_BUILD_INTERVAL".into(), "250ms".into()),
            ("MEMPOOL_MAX_TXS".into(), "2000".into()),
            ("VALIDATOR_2_PUBKEY_HEX".into(), k.clone()),
            ("CONSENSUS_NODES".into(), "1, 2,3,4".into()),
        ])
        .unwrap();
        assert_eq!(c.node.id, 3);
        assert_eq!(c.block.build_interval, Duration::from_millis(250));
        assert_eq!(c.mempool.max_txs, 2000);
        assert_eq!(c.cluster.validators["2"], k);
        let e = c.apply_env([("BLOCK_BUILD_INTERVAL".to_string(), "soon".to_string())]).unwrap_err();
        assert_eq!(e.0[0].key, "BLOCK_BUILD_INTERVAL");
        assert!(e.0[0].problem.contains("bad duration"));
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let text = toml::to_string(&good()).unwrap();
        let c = Config::from_toml(&text, "x.toml").unwrap();
        c.validate().unwrap();
        let e = Config::from_toml("[node]\nidd = 3\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("idd"), "{e}");
        let e = Config::from_toml("[block]\nbuild_interval = \"fast\"\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("bad duration"), "{e}");
    }

    #[test]
    fn consensus_fingerprint_covers_shared_settings_only() {
        let a = good();
        let mut b = a.clone();
        b.node.data_dir = "/elsewhere".into();
        b.ingest.direct_listen = "127.0.0.1:1".into();
        b.runtime.verify_shards = 7;
        b.producers.keys.reverse();
        assert_eq!(a.consensus_fingerprint(), b.consensus_fingerprint());
        b.block.max_txs += 1;
        assert_ne!(a.consensus_fingerprint(), b.consensus_fingerprint());
        let mut c = a.clone();
        c.consensus.heartbeat_interval = Duration::from_millis(501);
        assert_ne!(a.consensus_fingerprint(), c.consensus_fingerprint());
    }

    #[test]
    fn mdns_lets_peers_go_unlisted_and_is_refused_in_production_unless_allowed() {
        let mut c = good();
        c.cluster.peers.truncate(1);
        let k = keys_of(c.clone().validate().unwrap_err());
        assert_eq!(k, vec!["P2P_BOOTSTRAP_PEERS (cluster.peers)"; 2], "two peers without an address");
        c.cluster.enable_mdns = true;
        let v = c.clone().validate().unwrap();
        assert_eq!(v.peers.keys().copied().collect::<Vec<_>>(), vec![2], "the listed one keeps its address");
        c.node.environment = Environment::Production;
        let k = keys_of(c.clone().validate().unwrap_err());
        assert!(k.contains(&"P2P_ENABLE_MDNS (cluster.enable_mdns)".to_string()), "{k:?}");
        c.cluster.mdns_in_production = true;
        let k = c.validate().err().map(keys_of).unwrap_or_default();
        assert!(!k.contains(&"P2P_ENABLE_MDNS (cluster.enable_mdns)".to_string()), "{k:?}");
    }

    #[test]
    fn a_byte_budget_needs_snapshots_and_room_for_several_segments() {
        let mut c = good();
        c.storage.retain_bytes = 1 << 30;
        c.clone().validate().unwrap();
        c.storage.retain_bytes = c.storage.segment_bytes;
        assert_eq!(keys_of(c.clone().validate().unwrap_err()), vec!["STORAGE_RETAIN_BYTES (storage.retain_bytes)"]);
        c.storage.retain_bytes = 1 << 30;
        c.consensus.snapshot_interval = 0;
        assert_eq!(keys_of(c.validate().unwrap_err()), vec!["STORAGE_RETAIN_BYTES (storage.retain_bytes)"]);
    }

    #[test]
    fn production_checklist_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let kf = dir.path().join("k.pem");
        crypto::write_key_file(&kf, &crypto::generate_key()).unwrap();
        let mut c = good();
        c.node.environment = Environment::Production;
        c.node.key_file = kf.clone();
        c.ingest.source = SourceKind::Kafka;
        c.kafka.sasl_mechanism = "PLAIN".into();
        c.secrets.jwt_secret = "changeme".into();
        c.database.enabled = true;
        c.database.dsn = "postgresql://u:p@h/db?sslmode=disable".into();
        let k = keys_of(c.clone().validate().unwrap_err());
        for want in ["KAFKA_TLS_ENABLED", "KAFKA_SASL_MECHANISM", "JWT_SECRET", "DB_TLS / DB_DSN"] {
            assert!(k.contains(&want.to_string()), "{want} missing from {k:?}");
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o644)).unwrap();
        let k = keys_of(c.validate().unwrap_err());
        assert!(k.contains(&"CONTROL_SIGNING_KEY_PATH (node.key_file)".to_string()));
        // A proper production config passes.
        let mut ok = good();
        ok.node.environment = Environment::Production;
        std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).unwrap();
        ok.node.key_file = kf;
        ok.ingest.source = SourceKind::Kafka;
        ok.kafka.tls_enabled = true;
        ok.kafka.sasl_mechanism = "SCRAM-SHA-512".into();
        ok.kafka.sasl_password = "Zq8-vR2k!Lw7pN4x".into();
        ok.validate().unwrap();
    }
}
