//! `cybermesh`: the validator binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use cybermesh::edges::store::BlockStore;
use cybermesh::protocol::crypto;
use cybermesh::runtime::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cybermesh", version, about = "BFT validator for signed security alerts")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a new Ed25519 private key (PKCS#8 PEM, mode 0600) and print its public key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a validator until SIGINT/SIGTERM.
    Run {
        /// TOML config file; environment variables override it.
        #[arg(long, env = "CYBERMESH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Block store tools.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Database mirror tools.
    Db {
        #[command(subcommand)]
        cmd: DbCmd,
    },
    /// A live terminal view of validators (their HTTP API: ENABLE_API,
    /// API_LISTEN_ADDR): height, view, leader, peers, lag, committed /
    /// received / rejected per second, mempool, verify rings and busy share,
    /// Kafka and mirror lag, rejections by reason.
    Monitor {
        /// API addresses (host:port, or https://host:port), one per validator.
        #[arg(required = true)]
        apis: Vec<String>,
        /// PEM certificate(s) to trust for https:// APIs (the API's own
        /// certificate or its CA); default: the system's roots.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Refresh period.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Draw this many times, then exit (default: until Ctrl-C).
        #[arg(long)]
        rounds: Option<u64>,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Validator set changes: propose one, sign it (each validator's
    /// operator), submit it once q = n - f have signed (docs/reconfiguration.md).
    Reconfig {
        #[command(subcommand)]
        cmd: ReconfigCmd,
    },
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a config (file + environment) and explain every problem.
    Check {
        #[arg(long, env = "CYBERMESH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the default config as TOML.
    Default,
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Check a validator's block store and consensus log without modifying them: re-read every block,
    /// check the chain, and report a torn tail (which the validator's next start truncates) or corruption.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
        /// Cut each file at its first damaged record, dropping it and every record after it (the validator
        /// then fetches the missing blocks from its peers). Only for corruption the check reported. A repaired
        /// consensus log may have lost votes this validator sent: the cluster tolerates f such validators.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check an audit log's HMAC chain across its segments; names the first
    /// bad line and its file.
    Verify {
        /// The data directory (its audit.jsonl), the active file (its
        /// segments beside it are checked too), or one segment.
        file: PathBuf,
        /// The HMAC key (as AUDIT_SIGNING_KEY: hex, or raw text).
        #[arg(long, env = "AUDIT_SIGNING_KEY", hide_env_values = true)]
        key: String,
    },
}

#[derive(Subcommand)]
enum DbCmd {
    /// Apply the schema migrations not yet applied (DB_DSN from the config
    /// or the environment); the validator also does at startup.
    Migrate {
        #[arg(long, env = "CYBERMESH_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ReconfigCmd {
    /// Write a change file for the chain of this config (its config hash)
    /// and the epoch it changes (`GET /validators` shows the current one).
    Propose {
        #[arg(long, env = "CYBERMESH_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        epoch: u64,
        /// Add a validator: ID:PUBLIC_KEY_HEX (from `cybermesh keygen`).
        #[arg(long)]
        add: Vec<String>,
        /// Remove a validator: ID.
        #[arg(long)]
        remove: Vec<String>,
        /// Give a validator a new key: ID:PUBLIC_KEY_HEX.
        #[arg(long)]
        rotate: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add this validator's signature (node.id, node.key_file of the config) to a change file.
    Sign {
        file: PathBuf,
        #[arg(long, env = "CYBERMESH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Sign the change as a tx (kind 4) with a configured producer key and send
    /// it to a validator's direct source (waits for the block that orders it),
    /// or write the tx for a Kafka input topic with "reconfig" in its name.
    Submit {
        file: PathBuf,
        /// A configured producer's private key (PEM).
        #[arg(long)]
        producer_key: PathBuf,
        /// A validator's direct source, host:port.
        #[arg(long, conflicts_with_all = ["out_event", "kafka_topic"])]
        direct: Option<String>,
        /// Produce it to this Kafka topic (one with "reconfig" in its name,
        /// among the validators' KAFKA_INPUT_TOPICS), with --config's Kafka settings.
        #[arg(long, requires = "config", conflicts_with = "out_event")]
        kafka_topic: Option<String>,
        /// Write the encoded tx here instead (for another Kafka producer).
        #[arg(long)]
        out_event: Option<PathBuf>,
        /// A validator config to check the change against first (as execution will).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Send it even if that check refuses it (every validator then refuses
        /// it alike at its block, with a reconfiguration_refused DLQ record).
        #[arg(long, requires = "config")]
        force: bool,
        /// How long to wait for the block that orders it.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Append blocks forever, printing `durable <height>` after each fsync
    /// (used by the crash-recovery test).
    StoreWriter {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Keygen { out } => {
            let key = crypto::generate_key();
            crypto::write_key_file(&out, &key)?;
            println!("{}", hex::encode(crypto::public_key(&key)));
            Ok(())
        }
        Cmd::Run { config } => cybermesh::runtime::run_blocking(config.as_deref()),
        Cmd::Monitor { apis, interval, rounds, ca_cert } => {
            let tls = match apis.iter().any(|a| a.starts_with("https://")) {
                true => Some(cybermesh::runtime::monitor::tls_client(ca_cert.as_deref())?),
                false => None,
            };
            cybermesh::runtime::monitor::run(&apis, interval, rounds, tls)
        }
        Cmd::Audit { cmd: AuditCmd::Verify { file, key } } => {
            let t = cybermesh::edges::audit::verify(&file, &cybermesh::edges::audit::key_from(&key))?;
            println!(
                "audit log OK: {} records in {} file(s), seq {}..{}, chain and MACs verified{}",
                t.records,
                t.files,
                t.first_seq,
                t.last_seq,
                match t.first_seq {
                    0 | 1 => String::new(),
                    s => format!("; records before {s} were rotated out (AUDIT_LOG_KEEP)"),
                }
            );
            Ok(())
        }
        Cmd::Db { cmd: DbCmd::Migrate { config } } => {
            let c = Config::load(config.as_deref())?;
            if c.database.dsn.is_empty() {
                anyhow::bail!("no database configured: set DB_DSN (database.dsn)");
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let applied = rt.block_on(async {
                let mut client = cybermesh::edges::persist::connect(&c.database.dsn)
                    .await
                    .with_context(|| "connecting to the database (DB_DSN)".to_string())?;
                cybermesh::edges::persist::migrate(&mut client).await.context("applying migrations")
            })?;
            let latest = cybermesh::edges::persist::MIGRATIONS.last().map_or(0, |m| m.0);
            match applied.as_slice() {
                [] => println!("schema up to date (version {latest})"),
                v => println!("applied migrations {v:?}; schema at version {latest}"),
            }
            Ok(())
        }
        Cmd::Config { cmd: ConfigCmd::Check { config } } => {
            let v = Config::load(config.as_deref())?.validate()?;
            println!("config hash (genesis): {}", hex::encode(v.config.consensus_fingerprint()));
            println!(
                "config OK: node {} of {} validators (f = {}, quorum = {}), {} producer keys, source {:?}, environment {:?}",
                v.config.node.id,
                v.validators.len(),
                v.faults,
                v.quorum,
                v.producers.len(),
                v.config.ingest.source,
                v.config.node.environment
            );
            Ok(())
        }
        Cmd::Config { cmd: ConfigCmd::Default } => {
            print!("{}", toml::to_string_pretty(&Config::default())?);
            Ok(())
        }
        Cmd::Store { cmd: StoreCmd::Check { data_dir, repair } } => store_check(&data_dir, repair),
        Cmd::Debug { cmd: DebugCmd::StoreWriter { data_dir } } => store_writer(&data_dir),
        Cmd::Reconfig { cmd } => reconfig(cmd),
    }
}

fn reconfig(cmd: ReconfigCmd) -> anyhow::Result<()> {
    use cybermesh::protocol::reconfig::ChangeKind;
    use cybermesh::runtime::reconfig_cli::{self as rc, ChangeFile};
    match cmd {
        ReconfigCmd::Propose { config, epoch, add, remove, rotate, out } => {
            let v = Config::load(config.as_deref())?.validate()?;
            let mut changes = vec![];
            for (kind, args) in [(ChangeKind::Add, add), (ChangeKind::Remove, remove), (ChangeKind::Rotate, rotate)] {
                for a in args {
                    changes.push(rc::parse_change(kind, &a)?);
                }
            }
            if changes.is_empty() {
                anyhow::bail!("no change: give --add, --remove or --rotate");
            }
            let file = ChangeFile::new(&v.config.consensus_fingerprint(), epoch, &changes);
            file.write(&out)?;
            println!(
                "wrote {}: {} change(s) of epoch {epoch}; each validator's operator runs `cybermesh reconfig sign {}`",
                out.display(),
                changes.len(),
                out.display()
            );
            Ok(())
        }
        ReconfigCmd::Sign { file, config } => {
            let v = Config::load(config.as_deref())?.validate()?;
            let mut f = ChangeFile::read(&file)?;
            let counted = rc::sign(&mut f, &v)?;
            f.write(&file)?;
            match counted {
                Some((valid, q)) => {
                    println!(
                        "validator {} signed {}: {valid} of {q} signatures needed",
                        v.config.node.id,
                        file.display()
                    )
                }
                None => println!(
                    "validator {} signed {} ({} signatures; epoch {}'s set judges them: GET /epochs)",
                    v.config.node.id,
                    file.display(),
                    f.signatures.len(),
                    f.epoch
                ),
            }
            Ok(())
        }
        ReconfigCmd::Submit { file, producer_key, direct, kafka_topic, out_event, config, force, wait } => {
            let change = ChangeFile::read(&file)?.reconfiguration()?;
            let v = match config {
                Some(config) => Some(Config::load(Some(&config))?.validate()?),
                None => None,
            };
            match (&v, force) {
                (Some(v), false) => rc::preflight(&change, v)?,
                (Some(v), true) => {
                    if let Err(e) = rc::preflight(&change, v) {
                        eprintln!("warning: {e:#}; sending it anyway (--force)");
                    }
                }
                (None, _) => {}
            }
            let producer = crypto::read_key_file(&producer_key, true)
                .with_context(|| format!("reading the producer key {}", producer_key.display()))?;
            let ev = rc::envelope(&change, &producer, cybermesh::runtime::now_ms());
            if let (Some(topic), Some(v)) = (kafka_topic, &v) {
                if cybermesh::protocol::event::TxKind::from_topic(&topic)
                    != Some(cybermesh::protocol::event::TxKind::Reconfiguration)
                {
                    anyhow::bail!("--kafka-topic {topic:?}: the validators read set changes only from a topic with \"reconfig\" in its name");
                }
                let (partition, offset) = rc::submit_kafka(&v.config.kafka, &topic, &ev, wait)?;
                println!(
                    "produced to {topic} (partition {partition}, offset {offset}); once ordered, `GET /validators` \
                     shows it under `scheduled` (or the DLQ topic has it as reconfiguration_refused)"
                );
                return Ok(());
            }
            match (direct, out_event) {
                (Some(addr), _) => {
                    let height = rc::submit_direct(&addr, &ev, wait)?;
                    println!(
                        "ordered in block {height}; `GET /validators` shows it under `scheduled` \
                         (or the DLQ has it as reconfiguration_refused)"
                    );
                }
                (None, Some(path)) => {
                    std::fs::write(&path, ev.encode()).with_context(|| format!("writing {}", path.display()))?;
                    println!(
                        "wrote the tx to {}: produce it to an input topic with \"reconfig\" in its name",
                        path.display()
                    );
                }
                (None, None) => anyhow::bail!("say where: --direct HOST:PORT, --kafka-topic TOPIC or --out-event FILE"),
            }
            Ok(())
        }
    }
}

fn store_check(data_dir: &std::path::Path, repair: bool) -> anyhow::Result<()> {
    use cybermesh::edges::framed::Mode;
    let mode = if repair { Mode::Repair } else { Mode::ReadOnly };
    let tail = |bytes: u64| match (bytes, repair) {
        (0, _) => String::new(),
        (b, false) => format!(", torn tail of {b} bytes (the validator's next start truncates it)"),
        (b, true) => format!(", {b} bytes cut"),
    };
    let base = cybermesh::edges::store::base_header_on(&*cybermesh::edges::storage::os(), data_dir)?;
    let (store, rec) = BlockStore::open_in(data_dir, Default::default(), base.clone(), mode)?;
    let mut txs = 0usize;
    let mut repeats = 0usize;
    let mut nonces = std::collections::HashSet::new();
    // Blocks below the lowest stored one were pruned: the chain check
    // starts at the first block kept (the base vouches for the rest).
    let mut prev: Option<cybermesh::protocol::block::BlockHeader> =
        if store.lowest() == store.base_height() + 1 { base } else { None };
    for h in store.lowest()..=store.height() {
        let (b, _) = store.read(h)?.context("indexed block missing")?;
        if prev.is_none() && h > 1 {
            // The first block kept after pruning: its parent is gone (the
            // store checked its hashes link on from here).
            txs += b.txs.len();
            prev = Some(b.header);
            continue;
        }
        b.validate(
            prev.as_ref(),
            &cybermesh::protocol::block::BuilderConfig {
                max_txs: usize::MAX,
                max_bytes: usize::MAX,
                ..Default::default()
            },
        )
        .with_context(|| format!("block {h}"))?;
        txs += b.txs.len();
        // A tx ordered twice (possible after a view change) executes
        // once; the second copy is a no-op "duplicate" receipt.
        repeats += b.txs.iter().filter(|t| !nonces.insert(t.nonce)).count();
        prev = Some(b.header);
    }
    println!(
        "block store OK: {} blocks{}, {txs} txs ({repeats} repeated), last view {}, last hash {}{}{}",
        store.height(),
        match (store.base_height(), store.lowest()) {
            (0, _) => String::new(),
            // Blocks below the lowest stored: pruned, or never here (a join).
            (b, l) => format!(" (from a snapshot at height {b}; blocks {l}..={} stored)", store.height()),
        },
        prev.as_ref().map_or(0, |h| h.view),
        hex::encode(store.last_hash()),
        tail(rec.truncated_bytes),
        match rec.dropped_blocks {
            0 => String::new(),
            d => format!(", {d} intact blocks after the corrupt one dropped"),
        }
    );
    if data_dir.join("consensus.log").exists() {
        // Limits as wide as the format allows: this reads a log, it does not
        // admit messages.
        let wide = cybermesh::protocol::consensus::wire::WireLimits {
            n: 1 << 16,
            max_value_bytes: cybermesh::edges::framed::MAX_RECORD as usize,
            window: 1 << 20,
        };
        let (_, records, scan) = cybermesh::edges::consensus_log::ConsensusLog::open_in(data_dir, &wide, mode)?;
        println!(
            "consensus log OK: {} records{}{}",
            records.len(),
            tail(scan.truncated_bytes),
            match scan.dropped_records {
                0 => String::new(),
                d => format!(", {d} intact records after the corrupt one dropped"),
            }
        );
    }
    Ok(())
}

fn store_writer(dir: &std::path::Path) -> anyhow::Result<()> {
    use cybermesh::protocol::block::{tx_root, Block, BlockHeader};
    use cybermesh::protocol::event::{sample_anomaly_payload, Event, TxKind};
    use std::io::Write;
    use std::sync::Arc;
    let (mut store, _) = BlockStore::open(dir, Default::default())?;
    let key = crypto::generate_key();
    let mut out = std::io::stdout().lock();
    loop {
        let h = store.height() + 1;
        let txs: Vec<Arc<Event>> = (0..50u64)
            .map(|i| {
                Arc::new(Event::sign(
                    TxKind::Anomaly,
                    &key,
                    ((h << 8) as u128 + i as u128).to_be_bytes(),
                    sample_anomaly_payload(i, 300),
                    h,
                    [0; 4],
                ))
            })
            .collect();
        let tx_hashes: Vec<_> = txs.iter().map(|t| t.tx_hash()).collect();
        let header = BlockHeader {
            height: h,
            view: 0,
            timestamp_ms: h,
            previous_hash: store.last_hash(),
            tx_root: tx_root(&tx_hashes),
            state_root: [0; 32],
            proposer: crypto::public_key(&key),
            tx_count: txs.len() as u32,
        };
        let b = Block { header, txs, tx_hashes };
        store.append(&[(&b, None)])?;
        writeln!(out, "durable {h}")?;
        out.flush()?;
    }
}
