//! `cybermesh`: the validator binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use cybermesh::{config::Config, crypto, store::BlockStore};
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
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
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
    /// Open a block store (recovering a torn tail), re-read every block and check the chain.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check an audit log's HMAC chain; names the first bad line.
    Verify {
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
        Cmd::Audit { cmd: AuditCmd::Verify { file, key } } => {
            let (n, _) = cybermesh::audit::verify(&file, &cybermesh::audit::key_from(&key))?;
            println!("audit log OK: {n} records, chain and MACs verified");
            Ok(())
        }
        Cmd::Db { cmd: DbCmd::Migrate { config } } => {
            let c = Config::load(config.as_deref())?;
            if c.database.dsn.is_empty() {
                anyhow::bail!("no database configured: set DB_DSN (database.dsn)");
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let applied = rt.block_on(async {
                let mut client = cybermesh::persist::connect(&c.database.dsn)
                    .await
                    .with_context(|| "connecting to the database (DB_DSN)".to_string())?;
                cybermesh::persist::migrate(&mut client).await.context("applying migrations")
            })?;
            let latest = cybermesh::persist::MIGRATIONS.last().map_or(0, |m| m.0);
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
        Cmd::Store { cmd: StoreCmd::Check { data_dir } } => {
            let base = cybermesh::snapshot::read_base_header(&data_dir)?;
            let (store, rec) = BlockStore::open_above(&data_dir, Default::default(), base.clone())?;
            let mut txs = 0usize;
            let mut repeats = 0usize;
            let mut nonces = std::collections::HashSet::new();
            let mut prev: Option<cybermesh::block::BlockHeader> = base;
            for h in store.base_height() + 1..=store.height() {
                let (b, _) = store.read(h)?.context("indexed block missing")?;
                b.validate(
                    prev.as_ref(),
                    &cybermesh::block::BuilderConfig {
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
                "block store OK: {} blocks{}, {txs} txs ({repeats} repeated), last view {}, torn tail truncated: {} bytes, last hash {}",
                store.height(),
                match store.base_height() {
                    0 => String::new(),
                    b => format!(" (from a snapshot at height {b})"),
                },
                prev.as_ref().map_or(0, |h| h.view),
                rec.truncated_bytes,
                hex::encode(store.last_hash())
            );
            Ok(())
        }
        Cmd::Debug { cmd: DebugCmd::StoreWriter { data_dir } } => store_writer(&data_dir),
    }
}

fn store_writer(dir: &std::path::Path) -> anyhow::Result<()> {
    use cybermesh::block::{tx_root, Block, BlockHeader};
    use cybermesh::event::{sample_anomaly_payload, Event, TxKind};
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
