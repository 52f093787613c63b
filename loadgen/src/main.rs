//! loadgen: drives signed alert load into validators and measures committed
//! throughput and commit latency.
//!
//! `loadgen single` starts a validator process of its own (this binary
//! re-executed as `loadgen validator`, which runs the same code as
//! `cybermesh run`), pre-signs the transactions in parallel before the clock
//! starts, sends them over the direct source and reads back the commit stream.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use cybermesh::protocol::crypto;
use cybermesh::protocol::event::{sample_anomaly_payload, Event, TxKind};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "loadgen", about = "Load generator and throughput harness for CyberMesh validators")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Parser, Clone)]
struct LoadArgs {
    /// How long to send.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Offered rate in tx/s; 0 = as fast as the validators accept
    /// (default: 0 for `single`, 4000 for `devnet`).
    #[arg(long)]
    rate: Option<u64>,
    /// Payload size in bytes (the AnomalyPayload is padded to it).
    #[arg(long, default_value_t = 300)]
    payload: usize,
    /// Transactions to pre-sign when --rate is 0.
    #[arg(long, default_value_t = 600_000)]
    max_txs: usize,
    /// Print the summary as JSON too.
    #[arg(long)]
    json: bool,
    /// The first part of the run: its txs are sent and committed like the
    /// rest but left out of the latency percentiles (and of the devnet's
    /// stage figures), and reported on a line of their own. A fresh
    /// cluster's first blocks pay first-touch costs (new files, page
    /// faults, cold caches) that a running validator has paid long ago.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
}

/// The local cluster `devnet` and `sweep` start.
#[derive(Parser, Clone, Default)]
struct ClusterArgs {
    /// Validators (N ≥ 4 tolerates f = (N − 1) / 3 faults).
    #[arg(long, default_value_t = 4)]
    validators: usize,
    /// Verification shards per validator.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Block size limit.
    #[arg(long, default_value_t = 2000)]
    block_max_txs: usize,
    /// Block build interval.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    build_interval: Duration,
    /// The shortest gap between two blocks while none is in flight
    /// (BLOCK_MIN_INTERVAL; 0 = a block as soon as the last one committed).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    min_block_interval: Duration,
    /// Mirror validator 1's blocks into a fresh database on this PostgreSQL
    /// (an admin DSN: a database is created per run) and report the
    /// mirror's rows/s and lag.
    #[arg(long)]
    db_dsn: Option<String>,
}

impl LoadArgs {
    fn rate(&self) -> u64 {
        self.rate.unwrap_or(0)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start one validator (N = 1) in a temp dir and load it.
    Single {
        #[command(flatten)]
        load: LoadArgs,
        /// Verification shards of the validator.
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// Block size limit.
        #[arg(long, default_value_t = 2000)]
        block_max_txs: usize,
        /// Block build interval.
        #[arg(long, default_value = "20ms")]
        build_interval: String,
        /// Client connections, each sending its own share of the txs (with
        /// glommio shards, the kernel spreads connections over the shards).
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Keep the temp dir (configs, keys, blocks, DLQ) and print its path.
        #[arg(long)]
        keep: bool,
    },
    /// Start a local cluster of validator processes (PBFT over QUIC on
    /// loopback) in a temp dir and load every validator with the same txs,
    /// as Kafka would.
    Devnet {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Keep the temp dir (configs, keys, blocks, logs) and print its path.
        #[arg(long)]
        keep: bool,
    },
    /// Run `devnet` at several offered rates (a fresh cluster each), print
    /// throughput against p50/p99 latency and plot it: one curve per
    /// payload size, so the knee shows.
    Sweep {
        #[command(flatten)]
        load: LoadArgs,
        /// Offered rates in tx/s, comma-separated; 0 = as fast as accepted.
        #[arg(long, value_delimiter = ',', default_value = "2000,4000,6000,8000,0")]
        rates: Vec<u64>,
        /// Payload sizes (bytes), one curve each (default: --payload).
        #[arg(long, value_delimiter = ',')]
        payloads: Vec<usize>,
        /// Where to write the plot (SVG).
        #[arg(long, default_value = "loadgen-sweep.svg")]
        plot: PathBuf,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// How throughput and latency change with payload size, validator count
    /// and verify-shard count: a fresh devnet per variant, each loaded as
    /// fast as it accepts (`--max-txs` txs), one table at the end.
    Scaling {
        #[command(flatten)]
        load: LoadArgs,
        /// Payload sizes (bytes), with the other settings at their defaults.
        #[arg(long, value_delimiter = ',', default_value = "100,300,1000,4000")]
        payloads: Vec<usize>,
        /// Validator counts (300 B payloads, the base shard count).
        #[arg(long, value_delimiter = ',', default_value = "4,7")]
        validator_counts: Vec<usize>,
        /// Verify shards per validator (300 B payloads, the base validator count).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        shard_counts: Vec<usize>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// One validator reading a Kafka topic: pre-signed events are produced
    /// to a fresh topic first, the broker's own consume rate is measured on
    /// it, then the validator consumes, verifies and commits them all.
    Kafka {
        /// Kafka brokers (a running broker, e.g. the nisshi the test setup starts).
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Events to produce and consume.
        #[arg(long, default_value_t = 200_000)]
        count: usize,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 300)]
        payload: usize,
        /// Verification shards of the validator.
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// Block size limit.
        #[arg(long, default_value_t = 2000)]
        block_max_txs: usize,
    },
    /// The database mirror's two write paths on the same blocks: multi-row
    /// UNNEST inserts (the validator's) and binary COPY into temp tables.
    MirrorBench {
        /// An admin DSN: a fresh database is created (and dropped) per path.
        #[arg(long, default_value = "postgresql://cybermesh:cybermesh@127.0.0.1:5432/cybermesh")]
        db_dsn: String,
        /// Blocks, and txs per block.
        #[arg(long, default_value_t = 200)]
        blocks: u64,
        #[arg(long, default_value_t = 500)]
        txs: usize,
        /// Blocks per transaction.
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
    /// Run a validator (what `cybermesh run` does); used by `single` and `devnet`.
    #[command(hide = true)]
    Validator {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // The driver holds every pre-signed tx and encodes its sends: the same
    // huge-page zeroing the validators refuse would be charged to them.
    cybermesh::runtime::refuse_huge_pages();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validator { config } => cybermesh::runtime::run_blocking(Some(&config)),
        Cmd::Single { mut load, shards, block_max_txs, build_interval, connections, keep } => {
            load.rate.get_or_insert(0);
            single(load, shards, block_max_txs, &build_interval, connections, keep)
        }
        Cmd::MirrorBench { db_dsn, blocks, txs, batch } => mirror_bench(&db_dsn, blocks, txs, batch),
        Cmd::Kafka { brokers, count, payload, shards, block_max_txs } => {
            kafka(&brokers, count, payload, shards, block_max_txs)
        }
        Cmd::Devnet { mut load, cluster, keep } => {
            load.rate.get_or_insert(4000);
            devnet(load, &cluster, keep).map(|_| ())
        }
        Cmd::Sweep { load, rates, payloads, plot, cluster } => {
            let payloads = if payloads.is_empty() { vec![load.payload] } else { payloads };
            let mut curves = vec![];
            for &payload in &payloads {
                let mut rows = vec![];
                for &rate in &rates {
                    let mut l = LoadArgs { payload, rate: Some(rate), ..load.clone() };
                    l.max_txs = l.max_txs.min(300_000);
                    let (r, raw) = devnet(l, &cluster, false)?;
                    rows.push((if rate == 0 { "max".to_string() } else { rate.to_string() }, r, raw));
                }
                curves.push((format!("{payload} B"), rows));
            }
            for (name, rows) in &curves {
                println!("=== sweep: {}-validator devnet, {name} payloads ===", cluster.validators);
                print_table("offered", rows);
            }
            plot_sweep(&plot, cluster.validators, &curves)?;
            println!("plot: {}", plot.display());
            Ok(())
        }
        Cmd::Scaling { load, payloads, validator_counts, shard_counts, cluster } => {
            let mut variants: Vec<(String, usize, ClusterArgs)> = vec![];
            let base = cluster.clone();
            for &p in &payloads {
                variants.push((format!("payload {p} B"), p, base.clone()));
            }
            for &v in &validator_counts {
                variants.push((format!("{v} validators"), 300, ClusterArgs { validators: v, ..base.clone() }));
            }
            for &sh in &shard_counts {
                variants.push((format!("{sh} shard(s)"), 300, ClusterArgs { shards: sh, ..base.clone() }));
            }
            // The base setting appears in each group; it runs once.
            let mut measured: std::collections::HashMap<(usize, usize, usize), (Results, f64)> = Default::default();
            let mut rows = vec![];
            for (name, payload, c) in variants {
                let (r, raw) = match measured.entry((payload, c.validators, c.shards)) {
                    std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let l = LoadArgs { payload, rate: Some(0), ..load.clone() };
                        e.insert(devnet(l, &c, false)?).clone()
                    }
                };
                rows.push((name, r, raw));
            }
            println!(
                "=== scaling: devnets at the maximum rate ({} txs each; base: {} validators, {} shard(s), 300 B) ===",
                load.max_txs, cluster.validators, cluster.shards
            );
            print_table("variant", &rows);
            Ok(())
        }
    }
}

/// Throughput and latency per row, beside the raw verify rate measured in
/// the same run (compare ratios, not figures across machines).
fn print_table(label: &str, rows: &[(String, Results, f64)]) {
    println!(
        "{label:>16} {:>12} {:>9} {:>9} {:>9} {:>12} {:>9}",
        "committed/s", "p50 ms", "p90 ms", "p99 ms", "raw verify/s", "tx/raw"
    );
    for (name, r, raw) in rows {
        let ms = |q: f64| r.hist.value_at_quantile(q) as f64 / 1000.0;
        let tps = r.committed as f64 / r.elapsed.as_secs_f64().max(1e-9);
        println!(
            "{name:>16} {tps:>12.0} {:>9.1} {:>9.1} {:>9.1} {raw:>12.0} {:>9.2}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            tps / raw
        );
    }
}

/// Throughput (x) against p50 (dashed) and p99 (solid) latency (y, log
/// scale), one curve per run, as SVG.
/// One curve of a sweep: its label and, per offered rate, (label, results, raw verify/s).
type SweepCurve = (String, Vec<(String, Results, f64)>);

fn plot_sweep(path: &Path, validators: usize, curves: &[SweepCurve]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let points = |rows: &[(String, Results, f64)], q: f64| -> Vec<(f64, f64)> {
        let mut p: Vec<(f64, f64)> = rows
            .iter()
            .map(|(_, r, _)| {
                let tps = r.committed as f64 / r.elapsed.as_secs_f64().max(1e-9);
                (tps, (r.hist.value_at_quantile(q) as f64 / 1000.0).max(0.1))
            })
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let all: Vec<(f64, f64)> =
        curves.iter().flat_map(|(_, rows)| [points(rows, 0.5), points(rows, 0.99)]).flatten().collect();
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let y_max = all.iter().map(|p| p.1).fold(1.0, f64::max) * 1.5;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{validators}-validator devnet: commit latency against throughput"), ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (0.1..y_max).log_scale())
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("committed tx/s")
        .y_desc("latency ms (p99 solid, p50 dashed)")
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    for (i, (name, rows)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let p99 = points(rows, 0.99);
        chart
            .draw_series(LineSeries::new(p99.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?
            .label(format!("{name} p99"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(p99.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        chart
            .draw_series(DashedLineSeries::new(points(rows, 0.5), 6, 4, color.stroke_width(1)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?
            .label(format!("{name} p50"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Signs `n` anomaly events in parallel; returns frames and the signing rate.
fn presign(key: &crypto::SigningKey, n: usize, payload: usize) -> (Vec<Vec<u8>>, Vec<[u8; 16]>, f64) {
    let t = Instant::now();
    let ts = cybermesh::runtime::now_ms();
    let evs: Vec<(Vec<u8>, [u8; 16])> = (0..n)
        .into_par_iter()
        .map(|i| {
            let i = i as u64;
            let ev = Event::sign(
                TxKind::Anomaly,
                key,
                uuid::Uuid::new_v4().into_bytes(),
                sample_anomaly_payload(i, payload),
                ts,
                (i as u32).to_be_bytes(),
            );
            let mut f = Vec::with_capacity(payload + 220);
            cybermesh::edges::direct::push_event_frame(&mut f, TxKind::Anomaly, &ev.encode());
            (f, ev.nonce)
        })
        .collect();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let (frames, nonces) = evs.into_iter().unzip();
    (frames, nonces, rate)
}

/// Raw single-thread batch verification rate (batch 256), measured here so
/// throughput can be compared with the machine's own ceiling.
fn raw_verify_rate() -> f64 {
    let key = crypto::generate_key();
    let pk = crypto::public_key(&key);
    let msgs: Vec<Vec<u8>> = (0..256u32).map(|i| i.to_be_bytes().repeat(20)).collect();
    let sigs: Vec<crypto::Signature> = msgs.iter().map(|m| crypto::sign(&key, m)).collect();
    let items: Vec<crypto::BatchItem> =
        msgs.iter().zip(&sigs).map(|(m, s)| crypto::BatchItem { key: &pk, msg: m, sig: s }).collect();
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(1500) {
        assert!(crypto::verify_batch(&items).iter().all(|r| r.is_ok()));
        n += 256;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Writes a one-validator config (and keys) under `root`; returns its path
/// and the producer key its events must be signed with.
fn single_config(
    root: &Path,
    addr: SocketAddr,
    shards: usize,
    block_max_txs: usize,
    build_interval: &str,
) -> anyhow::Result<(PathBuf, crypto::SigningKey)> {
    let vkey = crypto::generate_key();
    let key_file = root.join("validator-1.pem");
    crypto::write_key_file(&key_file, &vkey)?;
    let producer = crypto::generate_key();
    let cfg = format!(
        r#"[node]
id = 1
data_dir = "{data}"
key_file = "{key}"

[cluster]
nodes = [1]
validators = {{ "1" = "{vpk}" }}

[producers]
keys = ["{ppk}"]

[ingest]
direct_listen = "{addr}"

[mempool]
max_txs = {mempool}
max_bytes = 268435456
rate_per_second = 0

[block]
max_txs = {block_max_txs}
build_interval = "{build_interval}"

[runtime]
verify_shards = {shards}
"#,
        data = root.join("data-1").display(),
        key = key_file.display(),
        vpk = hex::encode(crypto::public_key(&vkey)),
        ppk = hex::encode(crypto::public_key(&producer)),
        mempool = block_max_txs * 8,
    );
    let cfg_path = root.join("validator-1.toml");
    std::fs::write(&cfg_path, cfg)?;
    Ok((cfg_path, producer))
}

fn single(
    load: LoadArgs,
    shards: usize,
    block_max_txs: usize,
    build_interval: &str,
    connections: usize,
    keep: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("cybermesh-single-").tempdir()?;
    let root = dir.path().to_path_buf();
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (cfg_path, producer) = single_config(&root, addr, shards, block_max_txs, build_interval)?;

    println!("measuring raw batch verification (one core, batch 256)...");
    let raw = raw_verify_rate();
    let n = if load.rate() == 0 { load.max_txs } else { (load.rate() as f64 * load.duration.as_secs_f64()) as usize };
    println!("pre-signing {n} transactions of {} B payload...", load.payload);
    let (frames, nonces, sign_rate) = presign(&producer, n, load.payload);

    let log = std::fs::File::create(root.join("validator-1.log"))?;
    let child = Child(
        std::process::Command::new(std::env::current_exe()?)
            .arg("validator")
            .arg("--config")
            .arg(&cfg_path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the validator process")?,
    );
    let streams = (0..connections.max(1))
        .map(|_| connect(addr, Duration::from_secs(30), &root.join("validator-1.log")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let res = drive(streams, Fanout::Split, frames, &nonces, &load, || Ok(()))?;
    drop(child);
    report(&load, &res, raw, sign_rate, shards, "single validator (N = 1)");
    if keep {
        let p = dir.keep();
        println!("kept {}", p.display());
    }
    Ok(())
}

fn devnet(load: LoadArgs, cluster: &ClusterArgs, keep: bool) -> anyhow::Result<(Results, f64)> {
    let ClusterArgs { validators, shards, block_max_txs, build_interval, min_block_interval, ref db_dsn } = *cluster;
    let api_ports: Vec<u16> = (0..validators).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let mirror_dsn = db_dsn.as_deref().map(fresh_database).transpose()?;
    let dir = tempfile::Builder::new().prefix("cybermesh-devnet-").tempdir()?;
    let opts = cybermesh::runtime::devnet::DevnetOptions {
        validators,
        verify_shards: shards,
        block_max_txs,
        build_interval,
        min_block_interval,
        mempool_max_txs: block_max_txs * 10,
        ..Default::default()
    };
    let net = cybermesh::runtime::devnet::create(dir.path(), &opts, |cfg| {
        // The API, for the stage latencies and byte counters.
        cfg.api.enabled = true;
        cfg.api.listen = format!("127.0.0.1:{}", api_ports[cfg.node.id as usize - 1]);
        if let (Some(dsn), 1) = (&mirror_dsn, cfg.node.id) {
            cfg.database.enabled = true;
            cfg.database.dsn = dsn.clone();
        }
    })?;
    println!("measuring raw batch verification (one core, batch 256)...");
    let raw = raw_verify_rate();
    let n = if load.rate() == 0 { load.max_txs } else { (load.rate() as f64 * load.duration.as_secs_f64()) as usize };
    println!("pre-signing {n} transactions of {} B payload...", load.payload);
    let (frames, nonces, sign_rate) = presign(&net.producer, n, load.payload);
    println!("starting {validators} validators in {}...", net.root.display());
    let mut children = vec![];
    for node in &net.nodes {
        let log = std::fs::File::create(net.root.join(format!("validator-{}.log", node.id)))?;
        children.push(Child(
            std::process::Command::new(std::env::current_exe()?)
                .arg("validator")
                .arg("--config")
                .arg(&node.config)
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting validator {}", node.id))?,
        ));
    }
    let mut streams = vec![];
    for node in &net.nodes {
        let log = net.root.join(format!("validator-{}.log", node.id));
        streams.push(connect(node.direct, Duration::from_secs(30), &log)?);
    }
    // Measure from a formed cluster: wait until every validator has
    // finished the genesis ceremony (its certificate is on disk).
    let t = Instant::now();
    while !net.nodes.iter().all(|n| n.data_dir.join("genesis_state.json").exists()) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("genesis did not complete within 60 s; see the validator logs in {}", net.root.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ids: Vec<u32> = net.nodes.iter().map(|n| n.id).collect();
    // The validators' figures count from the end of the warm-up, like the
    // latency percentiles.
    let scrape_all = || api_ports.iter().map(|p| scrape(*p)).collect::<anyhow::Result<Vec<Scrape>>>();
    let mut before = vec![];
    let mut res = drive(streams, Fanout::Every, frames, &nonces, &load, || {
        before = scrape_all()?;
        Ok(())
    })?;
    if before.is_empty() {
        before = scrape_all()?; // a run shorter than its warm-up
    }
    let after = scrape_all()?;
    let measured = res.committed.saturating_sub(res.warm_hist.len()).max(1);
    (res.stages, res.bytes_per_tx) = breakdown(&ids, &before, &after, measured);
    let mirror = match &mirror_dsn {
        Some(dsn) => Some(wait_mirror(dsn, res.top_height)?),
        None => None,
    };
    drop(children);
    if let (Some(admin), Some(dsn)) = (db_dsn, &mirror_dsn) {
        drop_database(admin, dsn);
    }
    let f = (validators - 1) / 3;
    let what = format!(
        "{validators}-validator devnet (PBFT, f = {f}, quorum {}), commits seen at validator 1",
        validators - f
    );
    report(&load, &res, raw, sign_rate, shards, &what);
    if let Some((rows, lag)) = mirror {
        let secs = res.elapsed.as_secs_f64() + lag.as_secs_f64();
        println!(
            "database mirror  : {rows} rows (blocks, transactions, anomalies) at {:.0} rows/s; caught up {:.0} ms after the last commit",
            rows as f64 / secs,
            lag.as_secs_f64() * 1000.0
        );
    }
    if keep {
        let p = dir.keep();
        println!("kept {}", p.display());
    }
    Ok((res, raw))
}

fn connect(addr: SocketAddr, within: Duration, log: &Path) -> anyhow::Result<TcpStream> {
    let t = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(_) if t.elapsed() < within => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => bail!("validator did not listen on {addr} within {within:?}: {e}; see {}", log.display()),
        }
    }
}

#[derive(Clone)]
struct Results {
    sent: u64,
    committed: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    /// Latencies of the txs sent during the warm-up (`--warmup`).
    warm_hist: Histogram<u64>,
    blocks: u64,
    /// Txs committed a second time (a no-op; happens around view changes).
    repeats: u64,
    /// Height of the last block seen.
    top_height: u64,
    /// From the validators' own metrics over the run (devnet): each stage's
    /// p50 / p99 (ms), and bytes sent per committed tx by each validator.
    stages: Vec<(String, f64, f64)>,
    bytes_per_tx: Vec<(u32, bool, f64)>,
}

/// What loadgen reads from one validator's `/metrics`.
#[derive(Default, Clone)]
struct Scrape {
    /// Stage → cumulative bucket counts (upper bound ms, count).
    stages: std::collections::BTreeMap<String, Vec<(f64, f64)>>,
    bytes_sent: f64,
    leader: f64,
}

fn scrape(port: u16) -> anyhow::Result<Scrape> {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to a validator's API")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let mut out = Scrape::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if let Some(labels) = name.strip_prefix("tx_stage_latency_ms_bucket{") {
            // stage="verify",le="0.5"}
            let field = |k: &str| labels.split(&format!("{k}=\"")).nth(1).and_then(|r| r.split('"').next());
            if let (Some(stage), Some(le)) = (field("stage"), field("le")) {
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
                out.stages.entry(stage.to_string()).or_default().push((le, value));
            }
        } else if name == "p2p_bytes_sent_total" {
            out.bytes_sent = value;
        } else if name == "consensus_leader_id" {
            out.leader = value;
        }
    }
    Ok(out)
}

/// A quantile from cumulative bucket counts, interpolated within its bucket.
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= want {
            if le.is_infinite() {
                return Some(lo);
            }
            let within = if cum > below { (want - below) / (cum - below) } else { 1.0 };
            return Some(lo + (le - lo) * within);
        }
        (lo, below) = (le, cum);
    }
    Some(lo)
}

/// Per-stage p50 / p99 over all validators, and bytes sent per committed
/// tx by each, between two scrapes of every validator.
fn breakdown(ids: &[u32], before: &[Scrape], after: &[Scrape], committed: u64) -> Results2 {
    let mut merged: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for (b, a) in before.iter().zip(after) {
        for (stage, buckets) in &a.stages {
            let prev = b.stages.get(stage);
            let m = merged.entry(stage.clone()).or_insert_with(|| buckets.iter().map(|(le, _)| (*le, 0.0)).collect());
            for (i, (_, cum)) in buckets.iter().enumerate() {
                let was = prev.and_then(|p| p.get(i)).map_or(0.0, |(_, c)| *c);
                if let Some(slot) = m.get_mut(i) {
                    slot.1 += cum - was;
                }
            }
        }
    }
    let stages = cybermesh::edges::api::TX_STAGES
        .iter()
        .filter_map(|s| {
            let b = merged.get(*s)?;
            Some((s.to_string(), bucket_quantile(b, 0.5)?, bucket_quantile(b, 0.99)?))
        })
        .collect();
    let bytes = ids
        .iter()
        .zip(before.iter().zip(after))
        .map(|(id, (b, a))| (*id, a.leader as u32 == *id, (a.bytes_sent - b.bytes_sent) / committed.max(1) as f64))
        .collect();
    (stages, bytes)
}

type Results2 = (Vec<(String, f64, f64)>, Vec<(u32, bool, f64)>);

/// What [`drive`] sends on each of its streams.
#[derive(Clone, Copy, PartialEq)]
enum Fanout {
    /// Every tx on every stream (one stream per validator, as Kafka would).
    Every,
    /// Each tx on one stream (several clients of one validator): chunks of
    /// 64 dealt round robin.
    Split,
}

/// Sends the frames on the streams as `send` says (one writer thread
/// each); latency and throughput are measured on the first stream's commit
/// notices (every stream of a validator hears every commit). `on_warm` runs once the
/// warm-up (`--warmup`) has passed.
fn drive(
    streams: Vec<TcpStream>,
    send: Fanout,
    frames: Vec<Vec<u8>>,
    nonces: &[[u8; 16]],
    load: &LoadArgs,
    on_warm: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Results> {
    let stream = streams[0].try_clone()?;
    let index: HashMap<[u8; 16], u32> = nonces.iter().enumerate().map(|(i, n)| (*n, i as u32)).collect();
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..frames.len()).map(|_| AtomicU64::new(0)).collect());
    let frames = Arc::new(frames);
    let start = Instant::now();
    let writers_left = Arc::new(AtomicU64::new(streams.len() as u64));
    let done_sending = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (rate, duration) = (load.rate(), load.duration);
    let mut writers = vec![];
    let mut drains = vec![];
    for (k, s) in streams.iter().enumerate() {
        s.set_nodelay(true)?;
        let (w_stream, sa, ds, sc, fr, left) =
            (s.try_clone()?, sent_at.clone(), done_sending.clone(), sent.clone(), frames.clone(), writers_left.clone());
        // Which chunks this stream sends, and whether it counts them.
        let (stride, counts) = match send {
            Fanout::Every => ((0, 1), k == 0),
            Fanout::Split => ((k, streams.len()), true),
        };
        writers.push(std::thread::spawn(move || -> std::io::Result<()> {
            let r = write_frames(w_stream, &fr, stride, start, rate, duration, |i, end, now| {
                if counts {
                    for a in &sa[i..end] {
                        a.store(now, Ordering::Relaxed);
                    }
                    sc.fetch_add((end - i) as u64, Ordering::Relaxed);
                }
            });
            if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                ds.store(true, Ordering::SeqCst);
            }
            r
        }));
        if k > 0 {
            // Other validators' commit notices are read and dropped, so
            // their writers never stall on a full socket.
            let r = s.try_clone()?;
            drains.push(std::thread::spawn(move || {
                let mut r = BufReader::with_capacity(1 << 20, r);
                while let Ok(Some(_)) = cybermesh::edges::direct::read_frame(&mut r, 64 << 20) {}
            }));
        }
    }

    // Reader: blocking reads of the commit stream (no read timeout: a
    // timeout mid-frame would lose the framing).
    let committed = Arc::new(AtomicU64::new(0));
    let blocks = Arc::new(AtomicU64::new(0));
    let last_commit_ns = Arc::new(AtomicU64::new(0));
    let top = Arc::new(AtomicU64::new(0));
    let r_stream = stream.try_clone()?;
    let (c2, b2, l2, t2) = (committed.clone(), blocks.clone(), last_commit_ns.clone(), top.clone());
    let warmup_ns = load.warmup.as_nanos() as u64;
    let reader = std::thread::spawn(move || -> anyhow::Result<(Histogram<u64>, Histogram<u64>, u64)> {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let mut warm_hist = hist.clone();
        let mut r = BufReader::with_capacity(1 << 20, r_stream);
        let mut seen = vec![false; index.len()];
        let mut repeats = 0u64;
        while let Ok(Some(frame)) = cybermesh::edges::direct::read_frame(&mut r, 64 << 20) {
            let body = frame.map_err(|len| anyhow::anyhow!("commit frame of {len} bytes"))?;
            let c = cybermesh::proto::DirectCommit::decode(&body[..])?;
            let now = start.elapsed().as_nanos() as u64;
            let mut n_ok = 0;
            for n in &c.nonces {
                let Ok(n) = <[u8; 16]>::try_from(&n[..]) else { continue };
                if let Some(&i) = index.get(&n) {
                    // A tx ordered twice (after a view change) counts once.
                    if std::mem::replace(&mut seen[i as usize], true) {
                        repeats += 1;
                        continue;
                    }
                    let sent_ns = sent_at[i as usize].load(Ordering::Relaxed);
                    let lat_us = now.saturating_sub(sent_ns) / 1000;
                    match sent_ns < warmup_ns {
                        true => warm_hist.record(lat_us.max(1))?,
                        false => hist.record(lat_us.max(1))?,
                    }
                    n_ok += 1;
                }
            }
            c2.fetch_add(n_ok, Ordering::Relaxed);
            b2.fetch_add(1, Ordering::Relaxed);
            t2.fetch_max(c.height, Ordering::Relaxed);
            l2.store(now, Ordering::Relaxed);
        }
        Ok((hist, warm_hist, repeats))
    });

    let pb = ProgressBar::new(load.duration.as_secs());
    pb.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}").unwrap());
    let mut stalled_since: Option<(Instant, u64)> = None;
    let mut on_warm = Some(on_warm);
    loop {
        if start.elapsed() >= load.warmup {
            if let Some(f) = on_warm.take() {
                f()?;
            }
        }
        let (sent_now, done, got) =
            (sent.load(Ordering::Relaxed), done_sending.load(Ordering::SeqCst), committed.load(Ordering::Relaxed));
        if done && got >= sent_now {
            break;
        }
        if reader.is_finished() {
            eprintln!("the validator closed the commit stream; {got} of {sent_now} committed");
            break;
        }
        if done {
            // Give the validator 10 s without progress to finish the tail.
            match stalled_since {
                Some((t, c)) if c == got && t.elapsed() > Duration::from_secs(10) => {
                    eprintln!("no commit for 10 s after sending stopped; {got} of {sent_now} committed");
                    break;
                }
                Some((_, c)) if c == got => {}
                _ => stalled_since = Some((Instant::now(), got)),
            }
        }
        pb.set_position(start.elapsed().as_secs().min(load.duration.as_secs()));
        pb.set_message(format!(
            "sent {sent_now}, committed {got} ({:.0} tx/s)",
            got as f64 / start.elapsed().as_secs_f64()
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    pb.finish_and_clear();
    for w in writers {
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    for s in &streams {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    for d in drains {
        let _ = d.join();
    }
    let (hist, warm_hist, repeats) = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(Results {
        sent: sent.load(Ordering::Relaxed),
        committed: committed.load(Ordering::Relaxed),
        elapsed: Duration::from_nanos(last_commit_ns.load(Ordering::Relaxed)),
        hist,
        warm_hist,
        blocks: blocks.load(Ordering::Relaxed),
        repeats,
        top_height: top.load(Ordering::Relaxed),
        stages: vec![],
        bytes_per_tx: vec![],
    })
}

/// Writes frames in chunks of 64, open-loop at `rate` (0 = as fast as the
/// socket takes them); `on_chunk(first, end, now_ns)` runs before each chunk.
/// `(k, n)`: only chunks k, k + n, k + 2n, … (the whole rate is the sum).
fn write_frames(
    stream: TcpStream,
    frames: &[Vec<u8>],
    (k, n): (usize, usize),
    start: Instant,
    rate: u64,
    duration: Duration,
    mut on_chunk: impl FnMut(usize, usize, u64),
) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, stream);
    let chunk = 64;
    let mut i = k * chunk;
    let mut since_flush = 0;
    while i < frames.len() && start.elapsed() < duration {
        if rate > 0 {
            // Open loop: chunk k is due at k·chunk/rate seconds.
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                w.flush()?;
                std::thread::sleep(wait);
            }
        }
        let end = (i + chunk).min(frames.len());
        on_chunk(i, end, start.elapsed().as_nanos() as u64);
        for f in &frames[i..end] {
            w.write_all(f)?;
        }
        since_flush += end - i;
        i += chunk * n;
        if rate == 0 && since_flush >= 4096 {
            w.flush()?;
            since_flush = 0;
        }
    }
    w.flush()
}

fn report(load: &LoadArgs, r: &Results, raw_verify: f64, sign_rate: f64, shards: usize, what: &str) {
    let tps = r.committed as f64 / r.elapsed.as_secs_f64().max(1e-9);
    let ms = |q: f64| r.hist.value_at_quantile(q) as f64 / 1000.0;
    println!("=== loadgen: {what} ===");
    println!(
        "build            : {} (release={})",
        if cfg!(debug_assertions) { "debug" } else { "optimized" },
        !cfg!(debug_assertions)
    );
    println!(
        "offered rate     : {}",
        if load.rate() == 0 { "max".to_string() } else { format!("{} tx/s", load.rate()) }
    );
    println!("payload          : {} B", load.payload);
    println!("verify shards    : {shards}");
    println!("loadgen signing  : {sign_rate:.0} tx/s (pre-signed before the clock starts)");
    println!("raw batch verify : {raw_verify:.0} sig/s on one core (batch 256, {} backend)", crypto::curve_backend());
    println!("sent             : {}", r.sent);
    println!("committed        : {} in {} blocks ({} ordered twice, executed once)", r.committed, r.blocks, r.repeats);
    println!(
        "throughput       : {tps:.0} committed tx/s over {:.2} s ({:.2}x one core's raw verify rate)",
        r.elapsed.as_secs_f64(),
        tps / raw_verify
    );
    println!(
        "commit latency   : p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        r.hist.max() as f64 / 1000.0
    );
    if !r.warm_hist.is_empty() {
        let w = |q: f64| r.warm_hist.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "warm-up latency  : p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms ({} txs sent in the first {}, left out above)",
            w(0.5),
            w(0.99),
            r.warm_hist.max() as f64 / 1000.0,
            r.warm_hist.len(),
            humantime::format_duration(load.warmup)
        );
    }
    if !r.stages.is_empty() {
        let parts: Vec<String> = r.stages.iter().map(|(s, p50, p99)| format!("{s} {p50:.1}/{p99:.1}")).collect();
        println!("stage p50/p99 ms : {} (every validator's tx_stage_latency_ms)", parts.join("  "));
    }
    if !r.bytes_per_tx.is_empty() {
        let parts: Vec<String> = r
            .bytes_per_tx
            .iter()
            .map(|(id, leader, b)| format!("v{id}{} {b:.0}", if *leader { " (leader)" } else { "" }))
            .collect();
        println!("p2p bytes sent/tx: {}", parts.join("  "));
    }
    if load.json {
        println!(
            "{}",
            serde_json::json!({
                "what": what, "rate": load.rate(), "payload": load.payload, "shards": shards,
                "sent": r.sent, "committed": r.committed, "blocks": r.blocks, "repeats": r.repeats, "seconds": r.elapsed.as_secs_f64(),
                "tx_per_s": tps, "raw_verify_per_s": raw_verify, "sign_per_s": sign_rate,
                "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": r.hist.max() as f64 / 1000.0},
                "warmup_s": load.warmup.as_secs_f64(),
                "warmup_latency_ms": {
                    "p50": r.warm_hist.value_at_quantile(0.5) as f64 / 1000.0,
                    "p99": r.warm_hist.value_at_quantile(0.99) as f64 / 1000.0,
                    "max": r.warm_hist.max() as f64 / 1000.0,
                    "txs": r.warm_hist.len()
                }
            })
        );
    }
}

/// `loadgen kafka`: one validator's consumed-and-committed rate against the
/// broker's own consume rate, on the same topic and machine.
fn kafka(brokers: &str, count: usize, payload: usize, shards: usize, block_max_txs: usize) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use rdkafka::ClientConfig;
    let dir = tempfile::Builder::new().prefix("cybermesh-kafka-").tempdir()?;
    let root = dir.path().to_path_buf();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let (cfg_path, producer_key) = single_config(&root, addr, shards, block_max_txs, "20ms")?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("loadgen.{}.anomalies", &run[..12]);

    println!("measuring raw batch verification (one core, batch 256)...");
    let raw = raw_verify_rate();
    println!("pre-signing {count} transactions of {payload} B payload...");
    let (frames, nonces, _) = presign(&producer_key, count, payload);

    // 1. Produce everything (the event bytes: a frame without len and tag).
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("creating the producer")?;
    let t = Instant::now();
    for f in &frames {
        let mut r = BaseRecord::<(), [u8]>::to(&topic).payload(&f[5..]);
        loop {
            match producer.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    r = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).context("flushing the produced events")?;
    let produce_rate = count as f64 / t.elapsed().as_secs_f64();
    println!("produced {count} to {topic} at {produce_rate:.0} msg/s");

    // 2. The broker's own consume rate: a plain consumer, no processing.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("loadgen-raw-{run}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()?;
    c.subscribe(&[&topic])?;
    let (mut got, mut first) = (0usize, None);
    let deadline = Instant::now() + Duration::from_secs(300);
    while got < count {
        if Instant::now() > deadline {
            bail!("the broker delivered {got} of {count} messages within 300 s");
        }
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            got += 1;
        }
    }
    let broker_rate = count as f64 / first.map_or(1e-9, |f| f.elapsed().as_secs_f64());
    drop(c);
    println!("broker consume rate (plain consumer, from first message): {broker_rate:.0} msg/s");

    // 3. The validator reads the same topic (own group) and commits it all.
    let log_path = root.join("validator-1.log");
    let log = std::fs::File::create(&log_path)?;
    let child = Child(
        std::process::Command::new(std::env::current_exe()?)
            .arg("validator")
            .arg("--config")
            .arg(&cfg_path)
            .env("INGEST_SOURCE", "kafka")
            .env("KAFKA_BROKERS", brokers)
            .env("KAFKA_INPUT_TOPICS", format!("{topic},loadgen.{}.evidence,loadgen.{}.policy", &run[..12], &run[..12]))
            .env("KAFKA_CONSUMER_GROUP_ID", format!("loadgen-{run}"))
            .env("KAFKA_DLQ_TOPIC", format!("loadgen.{}.dlq", &run[..12]))
            .env("CONTROL_COMMITS_TOPIC", format!("loadgen.{}.commits", &run[..12]))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the validator process")?,
    );
    let stream = connect(addr, Duration::from_secs(30), &log_path)?;
    let want: std::collections::HashSet<[u8; 16]> = nonces.iter().copied().collect();
    let mut r = BufReader::new(stream);
    let (mut committed, mut first) = (0usize, None);
    let bar = ProgressBar::new(count as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} committed {per_sec}")?);
    while committed < count {
        let frame = match cybermesh::edges::direct::read_frame(&mut r, 64 << 20)? {
            Some(Ok(f)) => f,
            _ => bail!("the validator closed its commit stream; see {}", log_path.display()),
        };
        let m = cybermesh::proto::DirectCommit::decode(&frame[..])?;
        first.get_or_insert_with(Instant::now);
        committed += m.nonces.iter().filter(|n| <[u8; 16]>::try_from(&n[..]).is_ok_and(|n| want.contains(&n))).count();
        bar.set_position(committed as u64);
    }
    bar.finish_and_clear();
    let rate = count as f64 / first.map_or(1e-9, |f| f.elapsed().as_secs_f64());
    drop(child);
    println!("=== loadgen: one validator reading Kafka ({brokers}) ===");
    println!("events           : {count} × {payload} B payload, {shards} verify shards");
    println!("raw batch verify : {raw:.0} sig/s on one core (batch 256, {} backend)", crypto::curve_backend());
    println!("broker consume   : {broker_rate:.0} msg/s (plain rdkafka consumer, no processing)");
    println!(
        "validator        : {rate:.0} tx/s consumed, verified and committed ({:.2}x the broker's consume rate, {:.2}x raw verify)",
        rate / broker_rate,
        rate / raw
    );
    Ok(())
}

/// Creates a fresh database on the PostgreSQL `admin` points at; returns its DSN.
fn fresh_database(admin: &str) -> anyhow::Result<String> {
    let db = format!("loadgen_{}", uuid::Uuid::new_v4().simple());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let c = cybermesh::edges::persist::connect(admin).await.context("connecting with --db-dsn")?;
        c.batch_execute(&format!("CREATE DATABASE {db}")).await.context("creating the mirror database")
    })?;
    let (base, _) = admin.rsplit_once('/').context("--db-dsn must end with /<database>")?;
    Ok(format!("{base}/{db}"))
}

/// Waits until the mirror holds `height`; returns its row count and how long
/// after the call it got there.
fn wait_mirror(dsn: &str, height: u64) -> anyhow::Result<(u64, Duration)> {
    let t = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let c = cybermesh::edges::persist::connect(dsn).await?;
        loop {
            let h: i64 = c.query_one("SELECT height FROM mirror_cursor WHERE id = 1", &[]).await?.get(0);
            if h as u64 >= height {
                let lag = t.elapsed();
                let n: i64 = c
                    .query_one(
                        "SELECT (SELECT count(*) FROM blocks) + (SELECT count(*) FROM transactions) + (SELECT count(*) FROM anomalies)",
                        &[],
                    )
                    .await?
                    .get(0);
                return Ok((n as u64, lag));
            }
            if t.elapsed() > Duration::from_secs(300) {
                anyhow::bail!("the mirror reached height {h} of {height} within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Drops the per-run database again (best effort).
fn drop_database(admin: &str, dsn: &str) {
    let Some((_, db)) = dsn.rsplit_once('/') else { return };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let _ = rt.block_on(async {
        let c = cybermesh::edges::persist::connect(admin).await?;
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await
            .map_err(cybermesh::edges::persist::DbError::from)
    });
}

/// `loadgen mirror-bench`: rows/s of each mirror write path on identical blocks.
fn mirror_bench(admin: &str, blocks: u64, txs: usize, batch: usize) -> anyhow::Result<()> {
    use cybermesh::edges::persist::MirrorBlock;
    use cybermesh::protocol::block::{tx_root, Block, BlockHeader};
    let key = crypto::generate_key();
    let ts = cybermesh::runtime::now_ms();
    println!("building {blocks} blocks of {txs} txs...");
    let mut chain: Vec<MirrorBlock> = vec![];
    let mut prev = [0u8; 32];
    for h in 1..=blocks {
        let evs: Vec<Arc<Event>> = (0..txs)
            .into_par_iter()
            .map(|i| {
                let i = (h as usize * txs + i) as u64;
                Arc::new(Event::sign(
                    TxKind::Anomaly,
                    &key,
                    uuid::Uuid::new_v4().into_bytes(),
                    sample_anomaly_payload(i, 300),
                    ts,
                    (i as u32).to_be_bytes(),
                ))
            })
            .collect();
        let tx_hashes: Vec<_> = evs.iter().map(|e| e.tx_hash()).collect();
        let header = BlockHeader {
            height: h,
            view: 0,
            timestamp_ms: ts,
            previous_hash: prev,
            tx_root: tx_root(&tx_hashes),
            state_root: [0; 32],
            proposer: crypto::public_key(&key),
            tx_count: txs as u32,
        };
        let b = Block { header, txs: evs, tx_hashes };
        prev = b.hash();
        chain.push(MirrorBlock::new(Arc::new(b), None));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut results = vec![];
    for copy in [false, true] {
        let dsn = fresh_database(admin)?;
        let took = rt.block_on(async {
            let mut c = cybermesh::edges::persist::connect(&dsn).await?;
            cybermesh::edges::persist::migrate(&mut c).await?;
            let t = Instant::now();
            for part in chain.chunks(batch) {
                if copy {
                    cybermesh::edges::persist::write_batch_copy(&mut c, part).await?;
                } else {
                    cybermesh::edges::persist::write_batch(&mut c, part).await?;
                }
            }
            anyhow::Ok(t.elapsed())
        })?;
        drop_database(admin, &dsn);
        let rows = blocks as usize * (1 + 2 * txs);
        results.push((
            if copy { "binary COPY + INSERT SELECT" } else { "UNNEST INSERT (default)" },
            rows as f64 / took.as_secs_f64(),
        ));
    }
    println!("=== mirror write paths: {blocks} blocks × {txs} txs, {batch} blocks per transaction ===");
    for (name, rate) in &results {
        println!("{name:<30}: {rate:>9.0} rows/s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_quantiles_interpolate_within_buckets_and_diff_between_scrapes() {
        // 100 observations: 50 in (0, 1], 40 in (1, 5], 10 in (5, 10].
        let b = vec![(1.0, 50.0), (5.0, 90.0), (10.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(bucket_quantile(&b, 0.5), Some(1.0));
        assert_eq!(bucket_quantile(&b, 0.7), Some(3.0));
        assert_eq!(bucket_quantile(&b, 0.99), Some(9.5));
        assert_eq!(bucket_quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        let scrape = |n: f64, sent: f64| Scrape {
            stages: [("prepare".to_string(), vec![(1.0, n), (2.0, 2.0 * n), (f64::INFINITY, 2.0 * n)])].into(),
            bytes_sent: sent,
            leader: 1.0,
        };
        let (stages, bytes) = breakdown(&[1], &[scrape(10.0, 1000.0)], &[scrape(20.0, 3000.0)], 100);
        assert_eq!(stages, vec![("prepare".to_string(), 1.0, 1.98)]);
        assert_eq!(bytes, vec![(1, true, 20.0)]);
    }

    #[test]
    fn a_sweep_plots_one_curve_per_run() {
        let run = |tps: u64, p50_us: u64, p99_us: u64| {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            hist.record_n(p50_us, 60).unwrap();
            hist.record_n(p99_us, 40).unwrap();
            let r = Results {
                sent: tps,
                committed: tps,
                elapsed: Duration::from_secs(1),
                hist,
                warm_hist: Histogram::<u64>::new(3).unwrap(),
                blocks: 1,
                repeats: 0,
                top_height: 1,
                stages: vec![],
                bytes_per_tx: vec![],
            };
            (tps.to_string(), r, 100_000.0)
        };
        let curves = vec![
            ("300 B".to_string(), vec![run(2000, 5_000, 9_000), run(9000, 40_000, 300_000)]),
            ("4000 B".to_string(), vec![run(1000, 6_000, 12_000), run(3000, 90_000, 700_000)]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.svg");
        plot_sweep(&path, 4, &curves).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for label in ["300 B p99", "300 B p50", "4000 B p99", "committed tx/s"] {
            assert!(svg.contains(label), "{label} missing");
        }
        assert!(svg.matches("<polyline").count() >= 2, "a line per curve");
    }
}
