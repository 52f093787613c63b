//! The shipped alert rules and dashboard against real tools: `promtool`
//! checks and unit-tests the rules, Debian's Prometheus scrapes a running
//! validator and answers a query, and every metric the rules and the
//! dashboard name is one a validator exports. `scripts/setup-deps.sh`
//! installs Debian's `prometheus` package (both binaries).

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn tool(name: &str) -> Command {
    let path = Path::new("/usr/bin").join(name);
    assert!(path.exists(), "{} missing: scripts/setup-deps.sh installs Debian's prometheus package", path.display());
    Command::new(path)
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let mut check = tool("promtool");
    check.arg("check").arg("rules").arg(deploy("prometheus/alerts.yml"));
    let text = run_ok(check);
    assert!(text.contains("SUCCESS: 10 rules found"), "{text}");
    // Each alert fires on the series that should fire it (annotations
    // rendered), and not on a healthy validator's.
    let mut test = tool("promtool");
    test.arg("test").arg("rules").arg("alerts_test.yml").current_dir(deploy("prometheus"));
    let text = run_ok(test);
    assert!(text.contains("SUCCESS"), "{text}");
    let mut config = tool("promtool");
    config.arg("check").arg("config").arg(deploy("prometheus/prometheus.yml"));
    run_ok(config);
}

/// PromQL words that are not metric names.
const PROMQL: &[&str] = &[
    "sum",
    "by",
    "rate",
    "increase",
    "changes",
    "deriv",
    "histogram_quantile",
    "and",
    "or",
    "unless",
    "on",
    "max",
    "min",
    "avg",
    "count",
    "offset",
    "bool",
    "ignoring",
    "without",
    "group_left",
    "group_right",
    "e6",
    "e9",
];

/// Metric names in a PromQL expression: identifiers outside label matchers,
/// grouping clauses, ranges, numbers and words of the language.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut e = expr.to_string();
    // Label matchers, ranges, and `by (...)` / `on (...)` label lists.
    for (open, close) in [('{', '}'), ('[', ']')] {
        while let Some(a) = e.find(open) {
            let b = a + e[a..].find(close).expect("balanced");
            e.replace_range(a..=b, " ");
        }
    }
    for kw in ["by", "without", "on", "ignoring", "group_left", "group_right"] {
        let mut from = 0;
        while let Some(i) = e[from..].find(&format!("{kw} (")).map(|i| i + from) {
            let close = i + e[i..].find(')').expect("balanced");
            e.replace_range(i..=close, " ");
            from = i;
        }
    }
    e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_'))
        .filter(|w| !PROMQL.contains(w))
        .map(str::to_string)
        .collect()
}

#[test]
fn metric_names_are_read_from_promql() {
    let got = metric_names(
        r#"histogram_quantile(0.99, sum by (le, instance) (rate(a_ms_bucket{instance=~"$instance"}[1m]))) / 1e6 and on (instance) b == 1"#,
    );
    assert_eq!(got, BTreeSet::from(["a_ms_bucket".to_string(), "b".to_string()]));
}

/// Every expression of the rules and of the dashboard's panels.
fn shipped_exprs() -> Vec<(String, String)> {
    let mut out = vec![];
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let mut lines = rules.lines().peekable();
    while let Some(l) = lines.next() {
        let t = l.trim_start();
        if let Some(rest) = t.strip_prefix("expr:") {
            let mut expr = rest.trim().to_string();
            if expr == "|" {
                expr.clear();
                let indent = lines.peek().map(|n| n.len() - n.trim_start().len()).unwrap_or(0);
                while let Some(n) = lines.peek() {
                    if n.len() - n.trim_start().len() < indent || n.trim().is_empty() {
                        break;
                    }
                    expr.push_str(lines.next().unwrap().trim());
                    expr.push(' ');
                }
            }
            out.push(("alerts.yml".to_string(), expr));
        }
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/cybermesh.json")).unwrap()).unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push((format!("panel {}", p["title"]), t["expr"].as_str().unwrap().to_string()));
        }
    }
    let variables = dash["templating"]["list"].as_array().unwrap();
    for v in variables.iter().filter(|v| v["type"] == "query") {
        let q = v["definition"].as_str().unwrap();
        let inner = q.trim_start_matches("label_values(").split(',').next().unwrap();
        out.push((format!("variable {}", v["name"]), inner.to_string()));
    }
    out
}

/// A single validator with its API on, having committed a few txs.
fn running_validator() -> (Setup, Validator, String) {
    let s = Setup::single("\n[runtime]\nverify_shards = 2\n");
    let (v, addr) = s.start_with_api();
    let mut c = v.connect();
    let evs: Vec<_> = (0..10).map(|i| anomaly(&s.producer, i)).collect();
    for e in &evs {
        c.send_event(e);
    }
    c.wait_committed(&evs.iter().map(|e| e.nonce).collect::<Vec<_>>());
    (s, v, addr)
}

#[test]
fn every_metric_the_rules_and_dashboard_name_is_exported() {
    let (_s, _v, addr) = running_validator();
    let (code, page) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    let exported: BTreeSet<String> = page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let exprs = shipped_exprs();
    assert!(exprs.len() >= 30, "the rules and dashboard hold {} expressions", exprs.len());
    let mut used = BTreeSet::new();
    for (whence, expr) in &exprs {
        for name in metric_names(expr) {
            // `up` is Prometheus's own, per scrape target.
            assert!(name == "up" || exported.contains(&name), "{whence}: `{name}` is not exported ({expr})");
            used.insert(name);
        }
    }
    // The figures the new panels and alerts rely on are live, not zeros.
    let value = |name: &str| metric(&page, name);
    assert!(value("verify_busy_us_total") > 0.0, "10 txs were verified");
    assert_eq!(value("verify_shards"), 2.0);
    assert_eq!(value("mempool_max_txs"), 1000.0);
    assert_eq!(value("persistence_enabled"), 0.0);
    let (free, size) = (value("storage_free_bytes"), value("storage_size_bytes"));
    assert!(0.0 < free && free <= size, "free {free} of {size}");
    for must in
        ["consensus_height", "consensus_committed_txs_total", "tx_stage_latency_ms_bucket", "storage_free_bytes"]
    {
        assert!(used.contains(must), "nothing shipped reads {must}");
    }
}

/// A free loopback port (bound, then released for Prometheus to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn prometheus_scrapes_a_running_validator_and_loads_the_rules() {
    let (s, v, addr) = running_validator();
    let dir = s.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(deploy("prometheus/alerts.yml"), dir.join("alerts.yml")).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
             scrape_configs:\n  - job_name: cybermesh\n    static_configs:\n      - targets: [\"{addr}\"]\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut prom = tool("prometheus");
    prom.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap());
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(prom.spawn().unwrap());
    let log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    // Prometheus scrapes once a second: ask until the validator's series is
    // there (or Prometheus exits, or a minute passes).
    let query = |q: &str| -> Option<serde_json::Value> {
        let path = format!("/api/v1/query?query={q}");
        std::net::TcpStream::connect(&web).ok()?;
        let (code, body) = http_get(&web, &path);
        (code == 200).then(|| serde_json::from_str(&body).unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        if let Some(r) = query("consensus_committed_txs_total") {
            if r["data"]["result"].as_array().is_some_and(|a| !a.is_empty()) {
                break r;
            }
        }
        assert!(child.0.try_wait().unwrap().is_none(), "prometheus exited:\n{}", log());
        assert!(Instant::now() < deadline, "no validator series within 60 s:\n{}", log());
        std::thread::sleep(Duration::from_millis(200)); // Prometheus's next scrape
    };
    let series = &result["data"]["result"][0];
    assert_eq!(series["metric"]["job"], "cybermesh");
    assert_eq!(series["metric"]["instance"], addr.as_str());
    let committed: f64 = series["value"][1].as_str().unwrap().parse().unwrap();
    assert_eq!(committed, 10.0, "the 10 txs the validator committed");
    let up = query("up").unwrap();
    assert_eq!(up["data"]["result"][0]["value"][1], "1");
    // The shipped rules are loaded and evaluated without error, and none
    // fires on a healthy validator (a single validator is its own quorum).
    let group = loop {
        let (code, body) = http_get(&web, "/api/v1/rules");
        assert_eq!(code, 200);
        let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
        let group = rules["data"]["groups"][0].clone();
        assert_eq!(group["name"], "cybermesh", "{rules}");
        if group["rules"].as_array().unwrap().iter().all(|r| r["health"] != "unknown") {
            break group;
        }
        assert!(Instant::now() < deadline, "rules never evaluated: {rules}");
        std::thread::sleep(Duration::from_millis(200)); // the next evaluation
    };
    assert_eq!(group["rules"].as_array().unwrap().len(), 10);
    for r in group["rules"].as_array().unwrap() {
        assert_eq!(r["health"], "ok", "{r}");
        assert_ne!(r["state"], "firing", "{r}");
    }
    drop(v);
}
