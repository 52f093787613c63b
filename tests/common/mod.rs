//! Helpers for integration tests: real validator processes on loopback.
#![allow(dead_code)]

use cybermesh::edges::direct;
use cybermesh::protocol::crypto::{self, SigningKey};
use cybermesh::protocol::event::{sample_anomaly_payload, Event, TxKind};
use prost::Message;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cybermesh");

pub fn now_ms() -> u64 {
    cybermesh::runtime::now_ms()
}

/// A validator's files: config, key, data dir.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub producer: SigningKey,
}

impl Setup {
    /// One validator (N = 1) configured with `extra` TOML appended.
    pub fn single(extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let vkey = crypto::generate_key();
        let key_file = dir.path().join("v1.pem");
        crypto::write_key_file(&key_file, &vkey).unwrap();
        let producer = crypto::generate_key();
        let text = format!(
            "[node]\nid = 1\ndata_dir = \"{}\"\nkey_file = \"{}\"\n\n[cluster]\nnodes = [1]\nvalidators = {{ \"1\" = \"{}\" }}\n\n\
             [producers]\nkeys = [\"{}\"]\n\n[ingest]\ndirect_listen = \"127.0.0.1:0\"\n\n[log]\nformat = \"json\"\nlevel = \"debug\"\n\n\
             [block]\nbuild_interval = \"20ms\"\n\n[mempool]\nrate_per_second = 0\n{extra}",
            dir.path().join("data").display(),
            key_file.display(),
            hex::encode(crypto::public_key(&vkey)),
            hex::encode(crypto::public_key(&producer)),
        );
        let config = dir.path().join("v1.toml");
        std::fs::write(&config, text).unwrap();
        Setup { dir, config, producer }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn start(&self) -> Validator {
        Validator::start(&self.config)
    }

    /// Starts it with its HTTP API on a free loopback port; returns the
    /// process and the API's address.
    pub fn start_with_api(&self) -> (Validator, String) {
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("ENABLE_API", "true")
            .env("API_LISTEN_ADDR", "127.0.0.1:0");
        let v = Validator::spawn(cmd);
        let addr = api_addr(&v);
        (v, addr)
    }
}

/// A running `cybermesh run` process; killed on drop.
pub struct Validator {
    pub child: Child,
    pub addr: SocketAddr,
    /// JSON log lines after startup.
    pub logs: Receiver<serde_json::Value>,
    /// Height reported by "block store recovered".
    pub recovered_height: u64,
    /// Messages of the log events up to "direct source listening".
    pub startup: Vec<String>,
    /// Those events, whole.
    pub startup_events: Vec<serde_json::Value>,
}

/// With `CM_TEST_LOGS=1` every validator's log lines are echoed to the
/// test's stderr, prefixed by its pid (for debugging a failing test).
fn spawn_log_reader(stderr: ChildStderr, pid: u32) -> Receiver<serde_json::Value> {
    let (tx, rx) = channel();
    let echo = std::env::var_os("CM_TEST_LOGS").is_some();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if echo {
                eprintln!("[{pid}] {line}");
            }
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) => {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                Err(_) => eprintln!("validator: {line}"),
            }
        }
    });
    rx
}

impl Validator {
    pub fn start(config: &Path) -> Validator {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(config);
        Validator::spawn(cmd)
    }

    /// Starts `cmd` (a `cybermesh run`, possibly wrapped, e.g. in
    /// `ip netns exec`) and waits until it listens.
    // A validator that never starts fails the test (panic); the process is
    // then reaped with the test process.
    #[allow(clippy::zombie_processes)]
    pub fn spawn(mut cmd: Command) -> Validator {
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let logs = spawn_log_reader(child.stderr.take().unwrap(), child.id());
        let mut recovered_height = 0;
        let mut startup = vec![];
        let mut startup_events = vec![];
        // Wait for the events that say it is up (bounded).
        loop {
            let v = logs.recv_timeout(Duration::from_secs(60)).expect("validator did not start within 60 s");
            let msg = v["fields"]["message"].as_str().unwrap_or("");
            startup.push(msg.to_string());
            startup_events.push(v.clone());
            if msg == "block store recovered" {
                recovered_height = v["fields"]["height"].as_u64().unwrap();
            }
            if msg == "direct source listening" {
                let addr = v["fields"]["addr"].as_str().unwrap().parse().unwrap();
                return Validator { child, addr, logs, recovered_height, startup, startup_events };
            }
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        self.child.wait().unwrap()
    }

    pub fn connect(&self) -> Client {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_nodelay(true).unwrap();
        Client { w: s.try_clone().unwrap(), r: BufReader::new(s) }
    }
}

impl Drop for Validator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Client {
    pub w: TcpStream,
    pub r: BufReader<TcpStream>,
}

impl Client {
    pub fn send_event(&mut self, ev: &Event) {
        self.send_raw(ev.kind.tag(), &ev.encode());
    }
    pub fn send_raw(&mut self, tag: u8, bytes: &[u8]) {
        self.try_send_raw(tag, bytes).unwrap()
    }
    pub fn try_send_raw(&mut self, tag: u8, bytes: &[u8]) -> std::io::Result<()> {
        let mut body = vec![tag];
        body.extend_from_slice(bytes);
        direct::write_frame(&mut self.w, &body)?;
        self.w.flush()
    }
    /// Next commit notice (bounded wait: the test fails rather than hangs).
    pub fn next_commit(&mut self) -> cybermesh::proto::DirectCommit {
        self.r.get_ref().set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let body = direct::read_frame(&mut self.r, 64 << 20).unwrap().expect("stream open").unwrap();
        cybermesh::proto::DirectCommit::decode(&body[..]).unwrap()
    }
    fn next_commit_or_report(&mut self, missing: usize) -> cybermesh::proto::DirectCommit {
        self.r.get_ref().set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        match direct::read_frame(&mut self.r, 64 << 20) {
            Ok(Some(Ok(body))) => cybermesh::proto::DirectCommit::decode(&body[..]).unwrap(),
            other => panic!("no commit within 60 s while {missing} txs are still uncommitted: {other:?}"),
        }
    }

    /// Reads commits until every nonce in `want` is committed; returns all
    /// committed nonces seen (in order) and the last commit.
    pub fn wait_committed(&mut self, want: &[[u8; 16]]) -> (Vec<[u8; 16]>, cybermesh::proto::DirectCommit) {
        let mut missing: std::collections::HashSet<[u8; 16]> = want.iter().copied().collect();
        let mut seen = vec![];
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "{} txs never committed", missing.len());
            let c = self.next_commit_or_report(missing.len());
            for n in &c.nonces {
                let n: [u8; 16] = n[..].try_into().unwrap();
                missing.remove(&n);
                seen.push(n);
            }
            if missing.is_empty() {
                return (seen, c);
            }
        }
    }
}

/// A local cluster's files (see `cybermesh::runtime::devnet`), with short timeouts.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub net: cybermesh::runtime::devnet::Devnet,
}

impl Cluster {
    pub fn new(validators: usize, tweak: impl Fn(&mut cybermesh::runtime::config::Config)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let opts = cybermesh::runtime::devnet::DevnetOptions {
            validators,
            build_interval: Duration::from_millis(20),
            heartbeat: Duration::from_millis(200),
            base_timeout: Duration::from_secs(2),
            log_level: std::env::var("CM_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            log_json: true,
            ..Default::default()
        };
        let net = cybermesh::runtime::devnet::create(dir.path(), &opts, tweak).unwrap();
        Cluster { dir, net }
    }
    /// Starts validator `i` (0-based index; validator id i + 1).
    pub fn start(&self, i: usize) -> Validator {
        Validator::start(&self.net.nodes[i].config)
    }
    pub fn producer(&self) -> &SigningKey {
        &self.net.producer
    }
}

/// A committed block as seen on the direct commit stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub hash: Vec<u8>,
    pub nonces: Vec<[u8; 16]>,
}

/// Reads commits until every nonce in `want` is committed; returns the
/// blocks seen by height.
pub fn collect(c: &mut Client, want: &[[u8; 16]]) -> std::collections::BTreeMap<u64, Seen> {
    let mut missing: std::collections::HashSet<[u8; 16]> = want.iter().copied().collect();
    let mut blocks = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !missing.is_empty() {
        assert!(Instant::now() < deadline, "{} txs never committed", missing.len());
        let b = c.next_commit_or_report(missing.len());
        let nonces: Vec<[u8; 16]> = b.nonces.iter().map(|n| n[..].try_into().unwrap()).collect();
        for n in &nonces {
            missing.remove(n);
        }
        blocks.insert(b.height, Seen { hash: b.block_hash, nonces });
    }
    blocks
}

/// Reads commits until height `h` is committed.
pub fn collect_to_height(c: &mut Client, h: u64) -> std::collections::BTreeMap<u64, Seen> {
    let mut blocks = std::collections::BTreeMap::new();
    while blocks.keys().next_back().is_none_or(|&top| top < h) {
        let b = c.next_commit_or_report(0);
        let nonces = b.nonces.iter().map(|n| n[..].try_into().unwrap()).collect();
        blocks.insert(b.height, Seen { hash: b.block_hash, nonces });
    }
    blocks
}

/// Every height both saw has the same block.
pub fn assert_same_blocks(a: &std::collections::BTreeMap<u64, Seen>, b: &std::collections::BTreeMap<u64, Seen>) {
    let mut common = 0;
    for (h, x) in a {
        if let Some(y) = b.get(h) {
            assert_eq!(x, y, "validators disagree at height {h}");
            common += 1;
        }
    }
    assert!(common > 0, "no height in common");
}

/// Sends `evs` to every client.
pub fn send_all(clients: &mut [&mut Client], evs: &[Event]) {
    for c in clients.iter_mut() {
        for e in evs {
            c.send_event(e);
        }
    }
}

/// Waits (bounded) for a log event with this message from `v`.
pub fn wait_log(v: &Validator, message: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = v.logs.recv_timeout(left).unwrap_or_else(|_| panic!("no {message:?} log within {within:?}"));
        if e["fields"]["message"] == message {
            return e;
        }
        if std::env::var_os("CYBERMESH_TEST_LOGS").is_some() {
            eprintln!("validator {} (waiting for {message:?}): {e}", v.child.id());
        }
    }
}

/// A valid anomaly event by `key`, signed now.
pub fn anomaly(key: &SigningKey, i: u64) -> Event {
    anomaly_with(key, sample_anomaly_payload(i, 300))
}

/// A valid anomaly event by `key` with this payload, signed now under a
/// fresh id and nonce (several may share one payload: distinct alerts).
pub fn anomaly_with(key: &SigningKey, payload: Vec<u8>) -> Event {
    Event::sign(TxKind::Anomaly, key, uuid::Uuid::new_v4().into_bytes(), payload, now_ms(), rand::random())
}

/// Waits (bounded) for the validator's "dlq flushed" event reporting at
/// least `count` records, then returns the DLQ file's records.
pub fn wait_dlq(v: &Validator, path: &Path, count: u64) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = v.logs.recv_timeout(left).unwrap_or_else(|_| panic!("fewer than {count} DLQ records within 60 s"));
        if e["fields"]["message"] == "dlq flushed" && e["fields"]["total"].as_u64().unwrap_or(0) >= count {
            break;
        }
    }
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).expect("DLQ line is JSON")).collect()
}

/// An evidence event for `anomaly_id` and a policy event, valid, by `key`.
pub fn evidence_and_policy(key: &SigningKey, anomaly_id: [u8; 16]) -> (Event, Event) {
    use cybermesh::proto;
    let now = now_ms();
    let ev = proto::EvidencePayload {
        anomaly_id: anomaly_id.to_vec(),
        evidence_type: "pcap".into(),
        data: vec![1, 2, 3],
        data_hash: vec![],
    };
    let pol = proto::PolicyPayload {
        policy_id: "block-10.0.0.1".into(),
        action: "block".into(),
        target: "10.0.0.1".into(),
        rule: "deny all".into(),
        ttl_seconds: 60,
    };
    (
        Event::sign(TxKind::Evidence, key, [0xe1; 16], ev.encode_to_vec(), now, [1; 4]),
        Event::sign(TxKind::Policy, key, [0xf1; 16], pol.encode_to_vec(), now, [2; 4]),
    )
}

/// One event per verification failure, by reason (`key` is the configured
/// producer; each is rejected before execution).
pub fn bad_events(key: &SigningKey) -> Vec<(&'static str, Event)> {
    let now = now_ms();
    let stranger = crypto::generate_key();
    let mut hash = anomaly(key, 100);
    hash.payload[3] ^= 1;
    let mut nonce = anomaly(key, 101);
    nonce.nonce[8] ^= 1;
    let mut sig = anomaly(key, 102);
    sig.signature[40] ^= 1;
    vec![
        ("unknown_producer", anomaly(&stranger, 1)),
        ("content_hash_mismatch", hash),
        ("nonce_mismatch", nonce),
        ("stale", Event::sign(TxKind::Anomaly, key, [3; 16], sample_anomaly_payload(3, 100), now - 600_000, [3; 4])),
        ("future", Event::sign(TxKind::Anomaly, key, [4; 16], sample_anomaly_payload(4, 100), now + 600_000, [4; 4])),
        ("bad_signature", sig),
        ("invalid_payload", Event::sign(TxKind::Anomaly, key, [5; 16], vec![0x10, 0x63], now, [5; 4])),
    ]
}

/// GET `path` from `addr`: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// A self-signed certificate for "localhost" written to `dir` as
/// `cert.pem` / `key.pem`; returns their paths and the certificate.
pub fn localhost_cert(dir: &Path) -> (PathBuf, PathBuf, rcgen::CertifiedKey) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    (cert_pem, key_pem, cert)
}

/// `cybermesh` with `args` and `env`: whether it succeeded, its stdout and stderr.
pub fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).envs(env.iter().copied()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The address the validator's HTTP API listens on (from its startup log).
pub fn api_addr(v: &Validator) -> String {
    let e = v.startup_events.iter().find(|e| e["fields"]["message"] == "HTTP API listening").expect("API enabled");
    e["fields"]["addr"].as_str().unwrap().to_string()
}

/// The value of a metric line `name value` in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{page}"))
}
