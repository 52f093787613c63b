//! `cybermesh monitor`: a live terminal view of one or more validators, read
//! from their HTTP API (`/status` and `/metrics`; `https://host:port` over
//! TLS, checked against `--ca-cert` or the system's roots), redrawn every
//! interval. Rates are the change of a counter between two reads; stage
//! latencies are the percentiles of the observations between two reads.

use anyhow::Context;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// One read of a validator's API.
struct Sample {
    status: serde_json::Value,
    /// Series (`name` or `name{labels}`) → value.
    metrics: BTreeMap<String, f64>,
    at: Instant,
}

/// How to reach validators' APIs over TLS (`https://` addresses).
pub type Tls = Option<std::sync::Arc<rustls::ClientConfig>>;

/// The TLS client settings: trust `ca_cert` (PEM: the API's certificate or
/// its CA) if given, else the system's roots.
pub fn tls_client(ca_cert: Option<&std::path::Path>) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading --ca-cert {}", path.display()))?
            {
                roots.add(cert.with_context(|| format!("--ca-cert {}: not a PEM certificate", path.display()))?)?;
            }
            anyhow::ensure!(!roots.is_empty(), "--ca-cert {}: no certificate in it", path.display());
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

/// GET `path` from `addr` (`host:port`, or `https://host:port`) over
/// HTTP/1.0, within `timeout`.
fn get(addr: &str, path: &str, timeout: Duration, tls: &Tls) -> anyhow::Result<String> {
    use std::net::ToSocketAddrs;
    let (https, hostport) = match addr.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, addr.strip_prefix("http://").unwrap_or(addr)),
    };
    let hostport = hostport.trim_end_matches('/');
    let sock = hostport
        .to_socket_addrs()
        .with_context(|| format!("{addr} is not host:port"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&sock, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n");
    let mut text = String::new();
    if https {
        let cfg = tls.clone().context("https needs TLS settings")?;
        let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h).trim_matches(|c| c == '[' || c == ']');
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .with_context(|| format!("{host} is not a valid TLS server name"))?;
        let conn = rustls::ClientConnection::new(cfg, name)?;
        let mut tls = rustls::StreamOwned::new(conn, s);
        tls.write_all(request.as_bytes()).with_context(|| format!("TLS to {addr}"))?;
        // A server that closes without close_notify still sent the whole reply.
        match tls.take(16 << 20).read_to_string(&mut text) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !text.is_empty() => {}
            Err(e) => return Err(e).with_context(|| format!("reading {path} from {addr}")),
        }
    } else {
        s.write_all(request.as_bytes())?;
        s.take(16 << 20).read_to_string(&mut text).with_context(|| format!("reading {path} from {addr}"))?;
    }
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).unwrap_or("?");
    // /status answers 200; a stopped validator answers 503 with a reason.
    anyhow::ensure!(code == "200" || code == "503", "{addr}{path}: HTTP {code}");
    Ok(body.to_string())
}

/// Prometheus text → series values (comments and malformed lines skipped).
fn parse_metrics(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn read(addr: &str, timeout: Duration, tls: &Tls) -> anyhow::Result<Sample> {
    let status = serde_json::from_str(&get(addr, "/status", timeout, tls)?).context("/status is not JSON")?;
    let metrics = parse_metrics(&get(addr, "/metrics", timeout, tls)?);
    Ok(Sample { status, metrics, at: Instant::now() })
}

impl Sample {
    fn m(&self, name: &str) -> f64 {
        self.metrics.get(name).copied().unwrap_or(0.0)
    }
    /// Per second between `prev` and this read.
    fn rate(&self, prev: Option<&Sample>, name: &str) -> Option<f64> {
        let p = prev?;
        let dt = self.at.duration_since(p.at).as_secs_f64();
        (dt > 0.0).then(|| (self.m(name) - p.m(name)).max(0.0) / dt)
    }
    /// Rejected inputs per second, by reason.
    fn rejections(&self, prev: Option<&Sample>) -> Vec<(String, f64)> {
        let reason = |k: &str| k.strip_prefix("ingest_rejected_total{reason=\"")?.strip_suffix("\"}").map(String::from);
        self.metrics.keys().filter_map(|k| Some((reason(k)?, self.rate(prev, k)?))).filter(|(_, r)| *r > 0.0).collect()
    }
}

/// Upper bucket bounds (ms) of the p50 and p99 of `stage`'s
/// `tx_stage_latency_ms` observations between each validator's two reads,
/// all validators together (None before a second read or with none).
fn stage_percentiles(rows: &[(String, Option<Sample>, anyhow::Result<Sample>)], stage: &str) -> Option<(f64, f64)> {
    let prefix = format!("tx_stage_latency_ms_bucket{{stage=\"{stage}\",le=\"");
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new(); // le bits (sortable) -> (le, count)
    for (_, prev, now) in rows {
        let (Some(p), Ok(n)) = (prev, now) else { continue };
        for (k, v) in n.metrics.range(prefix.clone()..) {
            let Some(le) = k.strip_prefix(&prefix).and_then(|r| r.strip_suffix("\"}")) else { break };
            let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let delta = (v - p.m(k)).max(0.0);
            let key = if le.is_infinite() { u64::MAX } else { (le * 1000.0) as u64 };
            buckets.entry(key).or_insert((le, 0.0)).1 += delta;
        }
    }
    let total = buckets.values().map(|b| b.1).fold(0.0, f64::max); // cumulative: the +Inf bucket
    if total <= 0.0 {
        return None;
    }
    let at = |q: f64| buckets.values().find(|(_, c)| *c >= q * total).map(|(le, _)| *le);
    Some((at(0.5)?, at(0.99)?))
}

/// A bucket's upper bound in ms (`>max`: past the largest bucket).
fn ms_text(le: f64) -> String {
    if le.is_infinite() {
        ">max".into()
    } else {
        format!("{le}")
    }
}

fn rate_text(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.0}"))
}

/// The screen for one round of reads.
fn render(rows: &[(String, Option<Sample>, anyhow::Result<Sample>)], interval: Duration) -> String {
    let mut out = format!("cybermesh monitor: {} validator(s), every {:?} (Ctrl-C to quit)\n\n", rows.len(), interval);
    out.push_str(&format!(
        "{:<22} {:>3} {:>5} {:>8} {:>5} {:>4} {:>5} {:>6} {:>8} {:>8} {:>8} {:>8} {:>5} {:>6} {:>7} {:>7}\n",
        "api",
        "id",
        "ready",
        "height",
        "view",
        "lead",
        "peers",
        "lag",
        "commit/s",
        "in/s",
        "reject/s",
        "mempool",
        "ring",
        "verify",
        "kafka",
        "mirror"
    ));
    let mut reasons: BTreeMap<String, f64> = BTreeMap::new();
    for (addr, prev, now) in rows {
        let s = match now {
            Ok(s) => s,
            Err(e) => {
                out.push_str(&format!("{addr:<22} unreachable: {e:#}\n"));
                continue;
            }
        };
        let st = &s.status;
        let busy = s.rate(prev.as_ref(), "verify_busy_us_total").map(|us| us / 1e6 / s.m("verify_shards").max(1.0));
        let rejections = s.rejections(prev.as_ref());
        let mirror = match s.m("persistence_enabled") > 0.0 {
            true => format!("{:.0}", s.m("consensus_height") - s.m("persistence_height")),
            false => "off".into(),
        };
        out.push_str(&format!(
            "{:<22} {:>3} {:>5} {:>8} {:>5} {:>4} {:>5} {:>6} {:>8} {:>8} {:>8} {:>8} {:>5} {:>6} {:>7} {:>7}\n",
            addr,
            st["validator"],
            if st["ready"] == true { "yes" } else { "NO" },
            st["height"],
            st["view"],
            st["leader"],
            format!("{}/{}", st["peers_connected"].as_u64().unwrap_or(0) + 1, st["validators"]),
            st["lag_blocks"],
            rate_text(s.rate(prev.as_ref(), "consensus_committed_txs_total")),
            rate_text(s.rate(prev.as_ref(), "ingest_received_total")),
            rate_text(prev.as_ref().map(|_| rejections.iter().map(|(_, r)| r).sum::<f64>())),
            st["mempool"]["size"],
            s.m("ring_occupancy_batches"),
            busy.map_or("-".into(), |b| format!("{:.0}%", b * 100.0)),
            s.m("kafka_consumer_lag"),
            mirror,
        ));
        for (reason, r) in rejections {
            *reasons.entry(reason).or_default() += r;
        }
    }
    out.push_str("\nstage latency ms p50/p99 (last interval, all validators):");
    for stage in crate::edges::metrics::TX_STAGES {
        let text = match stage_percentiles(rows, stage) {
            Some((p50, p99)) => format!("{}/{}", ms_text(p50), ms_text(p99)),
            None => "-".into(),
        };
        out.push_str(&format!(" {stage} {text}"));
    }
    out.push_str("\nrejected/s by reason (all validators): ");
    match reasons.is_empty() {
        true => out.push_str("none"),
        false => {
            let parts: Vec<String> = reasons.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
            out.push_str(&parts.join(", "))
        }
    }
    out.push('\n');
    out
}

/// Redraws the view every `interval` until interrupted (or `rounds` times).
pub fn run(addrs: &[String], interval: Duration, rounds: Option<u64>, tls: Tls) -> anyhow::Result<()> {
    anyhow::ensure!(!addrs.is_empty(), "name at least one validator API address (host:port, API_LISTEN_ADDR)");
    let timeout = interval.max(Duration::from_millis(500));
    let mut prev: Vec<Option<Sample>> = addrs.iter().map(|_| None).collect();
    let mut round = 0u64;
    let stdout = std::io::stdout();
    loop {
        let rows: Vec<(String, Option<Sample>, anyhow::Result<Sample>)> =
            addrs.iter().zip(prev.iter_mut()).map(|(a, p)| (a.clone(), p.take(), read(a, timeout, &tls))).collect();
        let screen = render(&rows, interval);
        {
            let mut out = stdout.lock();
            // Clear and home, then the screen.
            write!(out, "\x1b[2J\x1b[H{screen}")?;
            out.flush()?;
        }
        for ((_, _, now), p) in rows.into_iter().zip(prev.iter_mut()) {
            *p = now.ok();
        }
        round += 1;
        if rounds.is_some_and(|r| round >= r) {
            return Ok(());
        }
        std::thread::sleep(interval); // the refresh period the operator asked for
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_two_reads_and_rejections_are_summed_by_reason() {
        let page = |committed: u64, bad: u64| {
            format!(
                "# TYPE x counter\nconsensus_committed_txs_total {committed}\ningest_received_total {committed}\n\
                 ingest_rejected_total{{reason=\"bad_signature\"}} {bad}\ningest_rejected_total{{reason=\"expired\"}} 0\n\
                 verify_shards 2\nverify_busy_us_total {}\n",
                committed * 100
            )
        };
        let status = serde_json::json!({"validator": 3, "ready": true, "height": 9, "view": 0, "leader": 1,
            "peers_connected": 3, "validators": 4, "lag_blocks": 0, "mempool": {"size": 5}});
        let t0 = Instant::now();
        let a = Sample { status: status.clone(), metrics: parse_metrics(&page(1000, 10)), at: t0 };
        let b = Sample { status, metrics: parse_metrics(&page(3000, 30)), at: t0 + Duration::from_secs(2) };
        assert_eq!(b.rate(Some(&a), "consensus_committed_txs_total"), Some(1000.0));
        assert_eq!(b.rate(None, "consensus_committed_txs_total"), None);
        assert_eq!(b.rejections(Some(&a)), vec![("bad_signature".to_string(), 10.0)]);
        let screen = render(&[("127.0.0.1:1".into(), Some(a), Ok(b))], Duration::from_secs(1));
        let row = screen.lines().find(|l| l.starts_with("127.0.0.1:1")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[..9], ["127.0.0.1:1", "3", "yes", "9", "0", "1", "4/4", "0", "1000"], "{screen}");
        assert_eq!(cols[10], "10", "reject/s: {screen}");
        assert_eq!(cols[13], "5%", "verify busy: 100 ms per 2 s on 2 shards: {screen}");
        assert!(screen.contains("by reason (all validators): bad_signature 10"), "{screen}");
    }

    #[test]
    fn stage_percentiles_come_from_the_bucket_changes_between_reads_over_all_validators() {
        // Cumulative buckets at 1, 5, 25 ms and +Inf for two stages.
        let page = |v: [u64; 4], c: [u64; 4]| {
            let mut s = String::new();
            for (stage, counts) in [("verify", v), ("commit", c)] {
                for (le, n) in ["1", "5", "25", "+Inf"].iter().zip(counts) {
                    s.push_str(&format!("tx_stage_latency_ms_bucket{{stage=\"{stage}\",le=\"{le}\"}} {n}\n"));
                }
            }
            parse_metrics(&s)
        };
        let t0 = Instant::now();
        let sample = |m, dt| Sample { status: serde_json::json!({}), metrics: m, at: t0 + Duration::from_secs(dt) };
        // Validator A: 100 verify observations all ≤ 1 ms before; in the
        // interval 90 more ≤ 1 ms and 10 in (1, 5]. Validator B: none before,
        // 100 in (5, 25] after. Together: 200, p50 ≤ 5 ms (190 ≤ 5), p99 ≤ 25.
        let a0 = sample(page([100, 100, 100, 100], [0; 4]), 0);
        let a1 = sample(page([190, 200, 200, 200], [0, 0, 0, 3]), 1);
        let b0 = sample(page([0; 4], [0; 4]), 0);
        let b1 = sample(page([0, 0, 100, 100], [0; 4]), 1);
        let rows = vec![("a".to_string(), Some(a0), Ok(a1)), ("b".to_string(), Some(b0), Ok(b1))];
        assert_eq!(stage_percentiles(&rows, "verify"), Some((5.0, 25.0)));
        assert_eq!(stage_percentiles(&rows, "commit"), Some((f64::INFINITY, f64::INFINITY)), "past the largest bucket");
        assert_eq!(stage_percentiles(&rows, "queue"), None, "no observations");
        let screen = render(&rows, Duration::from_secs(1));
        assert!(
            screen.contains("verify 5/25") && screen.contains("commit >max/>max") && screen.contains("queue -"),
            "{screen}"
        );
        // One read only: no interval yet.
        let (_, _, now) = &rows[0];
        let first = vec![("a".to_string(), None, Ok(sample(now.as_ref().unwrap().metrics.clone(), 1)))];
        assert_eq!(stage_percentiles(&first, "verify"), None);
    }
}
