//! A real `cybermesh run` process fed over the direct source.

mod common;
use common::*;
use cybermesh::protocol::event::Event;
use std::collections::BTreeSet;

#[test]
fn commits_valid_events_and_dead_letters_every_bad_one_with_its_reason() {
    let s = Setup::single("\n[runtime]\nverify_shards = 2\n");
    let v = s.start();
    let mut c = v.connect();
    let k = &s.producer;
    let mut good: Vec<Event> = (0..40).map(|i| anomaly(k, i)).collect();
    let (evidence, policy) = evidence_and_policy(k, good[0].id);
    good.extend([evidence, policy]);
    let bad = bad_events(k);
    for e in &good {
        c.send_event(e);
    }
    for (_, e) in &bad {
        c.send_event(e);
    }
    c.send_event(&good[0]); // an exact resend: a duplicate, no DLQ record
    c.send_raw(1, b"\xff\xff\xff not protobuf");
    c.send_raw(9, &good[1].encode()); // unknown kind tag

    let want: Vec<[u8; 16]> = good.iter().map(|e| e.nonce).collect();
    let (seen, _) = c.wait_committed(&want);
    let seen_set: BTreeSet<[u8; 16]> = seen.iter().copied().collect();
    assert_eq!(seen.len(), seen_set.len(), "a tx was committed twice");
    for (_, e) in &bad {
        assert!(!seen_set.contains(&e.nonce), "a bad event was committed");
    }

    // Oversized frame: rejected, and that connection is closed.
    let mut c2 = v.connect();
    let _ = c2.try_send_raw(1, &vec![0u8; 70_000]); // the validator may close before reading it all

    let mut expected: BTreeSet<&str> = bad.iter().map(|(r, _)| *r).collect();
    expected.extend(["malformed", "oversized"]);
    let recs = wait_dlq(&v, &s.data_dir().join("dlq.jsonl"), (bad.len() + 3) as u64);
    let got: BTreeSet<&str> = recs.iter().filter_map(|r| r["reason"].as_str()).collect();
    assert_eq!(got, expected);
    // Every record names its reason, detail, origin and validator; exactly
    // one record per bad input.
    assert_eq!(recs.len(), bad.len() + 3, "{recs:#?}");
    for r in &recs {
        assert!(!r["detail"].as_str().unwrap().is_empty());
        assert!(r["origin"].as_str().unwrap().starts_with("direct:"));
        assert_eq!(r["validator"], "1");
    }
    let status = v.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

#[test]
fn kill9_then_restart_recovers_every_block_and_commits_nothing_twice() {
    // One shard keeps arrival order into the core, so "duplicates dropped
    // before the fresh tx" is a fact the test can rely on.
    let s = Setup::single("\n[runtime]\nverify_shards = 1\n");
    let v = s.start();
    assert_eq!(v.recovered_height, 0);
    let mut c = v.connect();
    let evs: Vec<Event> = (0..60).map(|i| anomaly(&s.producer, i)).collect();
    for e in &evs {
        c.send_event(e);
    }
    let (_, last) = c.wait_committed(&evs.iter().map(|e| e.nonce).collect::<Vec<_>>());
    let height = last.height;
    v.kill9();

    let v = s.start();
    assert_eq!(v.recovered_height, height, "every durable block recovered");
    let mut c = v.connect();
    for e in &evs {
        c.send_event(e); // redelivery after a crash
    }
    let fresh = anomaly(&s.producer, 1000);
    c.send_event(&fresh);
    let (seen, last2) = c.wait_committed(&[fresh.nonce]);
    assert_eq!(seen, vec![fresh.nonce], "redelivered txs must not commit again");
    assert_eq!(last2.height, height + 1);
    assert!(v.terminate().success());

    let out =
        std::process::Command::new(BIN).args(["store", "check", "--data-dir"]).arg(s.data_dir()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{} blocks, 61 txs (0 repeated)", height + 1)), "{text}");
}

/// With AUDIT_SIGNING_KEY set, the validator keeps an HMAC-chained audit log
/// of its start, proposals and commits; `cybermesh audit verify` accepts it,
/// and names the first line of an edited copy.
#[test]
fn audit_log_records_consensus_events_and_verify_names_an_edited_line() {
    let s = Setup::single("");
    let key = "8f".repeat(32);
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&s.config).env("AUDIT_SIGNING_KEY", &key);
    let v = Validator::spawn(cmd);
    let mut c = v.connect();
    let evs: Vec<Event> = (0..30).map(|i| anomaly(&s.producer, i)).collect();
    for e in &evs {
        c.send_event(e);
    }
    let (_, last) = c.wait_committed(&evs.iter().map(|e| e.nonce).collect::<Vec<_>>());
    assert!(v.terminate().success());
    let path = s.data_dir().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let recs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs[0]["event"], "start");
    let commits: Vec<u64> =
        recs.iter().filter(|r| r["event"] == "commit").map(|r| r["fields"]["height"].as_u64().unwrap()).collect();
    assert_eq!(commits, (1..=last.height).collect::<Vec<_>>(), "one commit record per block, in order");
    assert!(recs.iter().any(|r| r["event"] == "proposal"));

    let verify = |file: &std::path::Path, key: &str| {
        std::process::Command::new(BIN).args(["audit", "verify"]).arg(file).args(["--key", key]).output().unwrap()
    };
    let out = verify(&path, &key);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{} records", recs.len())));
    // The data directory names the same log (its segments and active file).
    let out = verify(&s.data_dir(), &key);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("{} records in 1 file(s), seq 1..{}", recs.len(), recs.len())), "{said}");
    // Edit one commit record: verification fails and names that line.
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let i = lines.iter().position(|l| l.contains("\"event\":\"commit\"")).unwrap();
    lines[i] = lines[i].replace("\"txs\":", "\"txs\":1");
    let edited = s.dir.path().join("edited.jsonl");
    std::fs::write(&edited, lines.join("\n") + "\n").unwrap();
    let out = verify(&edited, &key);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {}", i + 1)) && err.contains("edited"), "{err}");
    // The wrong key fails at once.
    assert!(!verify(&path, &"00".repeat(32)).status.success());
}

/// The HTTP API and /metrics reflect what the validator did.
#[test]
fn http_api_and_prometheus_metrics() {
    let s = Setup::single("");
    let (v, addr) = s.start_with_api();
    let mut c = v.connect();
    let evs: Vec<Event> = (0..25).map(|i| anomaly(&s.producer, i)).collect();
    for e in &evs {
        c.send_event(e);
    }
    let mut bad = anomaly(&s.producer, 99);
    bad.signature[3] ^= 1;
    c.send_event(&bad);
    let (_, last) = c.wait_committed(&evs.iter().map(|e| e.nonce).collect::<Vec<_>>());
    wait_dlq(&v, &s.data_dir().join("dlq.jsonl"), 1);

    assert_eq!(http_get(&addr, "/health").0, 200);
    let (code, body) = http_get(&addr, "/ready");
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(&addr, "/status");
    assert_eq!(code, 200);
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["height"], last.height);
    assert_eq!(st["committed_txs"], 25);
    assert_eq!(st["validator"], 1);
    // A block's commit is published before the core records how long it
    // took to execute and build (the next pass of its loop): scrape until
    // those histograms have caught up with the last commit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let metrics = loop {
        let (code, page) = http_get(&addr, "/metrics");
        assert_eq!(code, 200);
        let m = |name: &str| metric(&page, name);
        if m("state_execution_latency_ms_count") == m("consensus_blocks_committed")
            && m("block_build_latency_ms_count") == m("consensus_blocks_committed")
        {
            break page;
        }
        assert!(std::time::Instant::now() < deadline, "latency histograms never caught up: {page}");
        std::thread::sleep(std::time::Duration::from_millis(20)); // the core's next loop pass
    };
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(value("consensus_height"), last.height as f64);
    assert_eq!(value("consensus_quorum_size"), 1.0);
    assert_eq!(value("consensus_committed_txs_total"), 25.0);
    assert_eq!(value("ingest_direct_connections"), 1.0, "the test's one client");
    assert_eq!(value("ingest_rejected_total{reason=\"bad_signature\"}"), 1.0);
    assert_eq!(value("consensus_round_latency_ms_count"), value("consensus_blocks_committed"));
    // One validator: it built and executed every block, each measured.
    assert_eq!(value("state_execution_latency_ms_count"), value("consensus_blocks_committed"));
    assert_eq!(value("block_build_latency_ms_count"), value("consensus_blocks_committed"));
    assert!(value("state_execution_latency_ms_sum") > 0.0);
    assert!(value("consensus_blocks_committed") >= 1.0);
    // Blocks: a page of headers, one block with its txs and certificate.
    let (code, body) = http_get(&addr, "/blocks?from=1&limit=500");
    assert_eq!(code, 200);
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let heights: Vec<u64> = page["blocks"].as_array().unwrap().iter().map(|b| b["height"].as_u64().unwrap()).collect();
    assert_eq!(heights, (1..=last.height.min(100)).collect::<Vec<_>>());
    let (code, body) = http_get(&addr, &format!("/blocks/{}", last.height));
    assert_eq!(code, 200);
    let b: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(b["hash"], hex::encode(&last.block_hash));
    assert_eq!(b["txs"].as_array().unwrap().len(), last.nonces.len());
    assert_eq!(b["certificate"]["commits"].as_array().unwrap().len(), 1, "N = 1: one commit vote");
    let all_txs: usize = (1..=last.height)
        .map(|h| {
            let (_, body) = http_get(&addr, &format!("/blocks/{h}"));
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["txs"].as_array().unwrap().len()
        })
        .sum();
    assert_eq!(all_txs, 25);
    assert_eq!(http_get(&addr, &format!("/blocks/{}", last.height + 1)).0, 404);
    assert_eq!(http_get(&addr, "/blocks?from=x").0, 400);
    let (code, body) = http_get(&addr, "/validators");
    assert_eq!(code, 200);
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((page["epoch"].as_u64(), page["scheduled"].is_null()), (Some(0), true), "{page}");
    let vs = &page["validators"];
    assert_eq!(vs[0]["id"], 1);
    assert_eq!(vs[0]["reputation"], 1.0);
    assert_eq!(vs[0]["quarantined"], false);
    // State with Merkle proofs: a committed anomaly (present), an unknown id (absent).
    let check_state = |key: Vec<u8>, present: bool| {
        let (code, body) = http_get(&addr, &format!("/state/{}", hex::encode(&key)));
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let h32 = |s: &serde_json::Value| -> [u8; 32] { hex::decode(s.as_str().unwrap()).unwrap().try_into().unwrap() };
        let proof = cybermesh::protocol::state::merkle::Proof {
            siblings: v["proof"]["siblings"].as_array().unwrap().iter().map(h32).collect(),
            leaf: v["proof"]["leaf"].as_object().map(|l| (h32(&l["key_hash"]), h32(&l["value_hash"]))),
        };
        let value = v["value"].as_str().map(|x| cybermesh::sha256(&hex::decode(x).unwrap()));
        assert_eq!(value.is_some(), present, "{body}");
        assert!(proof.verify(&h32(&v["state_root"]), &cybermesh::sha256(&key), value.as_ref()), "proof fails: {body}");
    };
    check_state([&b"a"[..], &evs[3].id].concat(), true);
    check_state([&b"a"[..], &[0x77; 16]].concat(), false);
    assert_eq!(http_get(&addr, "/state/zz").0, 400);
    // Every documented operation answers as `openapi.json` says.
    let anomaly_key = hex::encode([&b"a"[..], &evs[0].id].concat());
    check_openapi(&addr, &[("{height}", "1".to_string()), ("{key}", anomaly_key)]);
    let (code, body) = http_get(&addr, "/nope");
    assert_eq!(code, 404);
    assert!(body.contains("\"error\""));
    assert!(v.terminate().success());
}

/// Resolves `{"$ref": "#/components/..."}` in `doc`.
fn resolve<'a>(doc: &'a serde_json::Value, v: &'a serde_json::Value) -> &'a serde_json::Value {
    match v["$ref"].as_str() {
        Some(r) => r.trim_start_matches("#/").split('/').fold(doc, |d, k| &d[k]),
        None => v,
    }
}

/// Checks `value` against a (subset of an) OpenAPI schema: types, required
/// properties, array items, allOf, nullable.
fn check_schema(doc: &serde_json::Value, schema: &serde_json::Value, value: &serde_json::Value, at: &str) {
    let schema = resolve(doc, schema);
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check_schema(doc, s, value, at);
        }
        return;
    }
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    let ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    assert!(ok, "{at}: {value} is not a {}", schema["type"]);
    for r in schema["required"].as_array().into_iter().flatten() {
        let k = r.as_str().unwrap();
        assert!(value.get(k).is_some(), "{at}: required property {k} missing in {value}");
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), value.as_object()) {
        for (k, s) in props {
            if let Some(v) = obj.get(k) {
                check_schema(doc, s, v, &format!("{at}.{k}"));
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check_schema(doc, items, v, &format!("{at}[{i}]"));
        }
    }
}

/// Calls every GET operation of `openapi.json` (path parameters from
/// `params`) and checks the status is documented and the body matches.
fn check_openapi(addr: &str, params: &[(&str, String)]) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 8);
    for (path, item) in paths {
        let op = &item["get"];
        let mut url = path.clone();
        for (k, v) in params {
            url = url.replace(k, v);
        }
        let (code, body) = http_get(addr, &url);
        let resp = resolve(&doc, &op["responses"][code.to_string()]);
        assert!(!resp.is_null(), "{url}: status {code} is not documented");
        let content = resp["content"].as_object().unwrap();
        if let Some(json) = content.get("application/json") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: not JSON: {e}"));
            check_schema(&doc, &json["schema"], &v, &url);
        } else {
            assert!(content.contains_key("text/plain") && !body.is_empty(), "{url}");
        }
    }
}

/// API_TLS_ENABLED: the API speaks HTTPS with the configured certificate; a
/// client that trusts it gets answers, a plain HTTP request gets none.
#[test]
fn http_api_over_tls() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, cert) = localhost_cert(dir.path());
    let s = Setup::single("");
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&s.config)
        .env("ENABLE_API", "true")
        .env("API_LISTEN_ADDR", "127.0.0.1:0")
        .env("API_TLS_ENABLED", "true")
        .env("API_TLS_CERT", &cert_pem)
        .env("API_TLS_KEY", &key_pem);
    let v = Validator::spawn(cmd);
    let addr = api_addr(&v);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(&addr).unwrap());
    write!(tls, "GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = tls.read_to_string(&mut text); // the server may close without close_notify
    assert!(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"validator\":1"), "{text}");
    // Plain HTTP on the TLS port: no HTTP answer.
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    write!(plain, "GET /status HTTP/1.0\r\n\r\n").unwrap();
    let mut back = vec![];
    let _ = plain.read_to_end(&mut back);
    assert!(!String::from_utf8_lossy(&back).contains("\"validator\""));
    assert!(v.terminate().success());
}

/// The direct source holds at most `MAX_DIRECT_CONNECTIONS` at once, all
/// on one thread (no thread per connection); one more is closed at once,
/// and a client that goes away frees its slot.
#[test]
fn direct_connections_are_capped_and_a_closed_one_frees_its_slot() {
    use cybermesh::edges::direct;
    use cybermesh::runtime::MAX_DIRECT_CONNECTIONS;
    use std::time::Duration;
    let s = Setup::single("");
    let v = s.start();
    let mut open: Vec<Client> = (0..MAX_DIRECT_CONNECTIONS).map(|_| v.connect()).collect();
    // Each shard accepts its own share (SO_REUSEPORT): once every slot is
    // taken, the next connection is the one refused, whichever shard gets it.
    while wait_log(&v, "direct source: connection opened", Duration::from_secs(60))["fields"]["open"]
        != MAX_DIRECT_CONNECTIONS as u64
    {}
    let mut extra = v.connect();
    wait_log(&v, "direct source: too many connections; closing this one", Duration::from_secs(60));
    // Every one of them is open and served, and none costs a thread (the
    // validator runs a few dozen whatever the number of clients).
    let count = |what: &str| std::fs::read_dir(format!("/proc/{}/{what}", v.child.id())).unwrap().count();
    assert!(count("fd") > MAX_DIRECT_CONNECTIONS, "{} descriptors with every slot taken", count("fd"));
    assert!(count("task") < 100, "{} threads for {MAX_DIRECT_CONNECTIONS} connections", count("task"));
    extra.r.get_ref().set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert!(matches!(direct::read_frame(&mut extra.r, 1 << 20), Ok(None)), "closed at once");
    // One client leaves; a new connection is served once the validator has
    // seen it go (until then it may still be refused: try again).
    drop(open.pop());
    // Each refused attempt is a round trip with the validator (its
    // connection closed at once); a loaded machine may take seconds to
    // notice the close, so the bound is time, not a count.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for i in 0.. {
        assert!(std::time::Instant::now() < deadline, "no slot came free within 60 s ({i} attempts)");
        let mut c = v.connect();
        let ev = anomaly(&s.producer, i);
        if c.try_send_raw(ev.kind.tag(), &ev.encode()).is_err() {
            continue;
        }
        c.r.get_ref().set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        match direct::read_frame(&mut c.r, 64 << 20) {
            Ok(Some(Ok(_))) => break, // its tx committed and it heard of it
            Ok(None) | Err(_) => {
                wait_log(&v, "direct source: too many connections; closing this one", Duration::from_secs(60));
            }
            Ok(Some(Err(e))) => panic!("bad frame: {e:?}"),
        }
    }
    // Every connection closes: the validator gives back its descriptors
    // without waiting for a commit to notice.
    drop(open);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count("task") > 100 || count("fd") > 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} threads and {} descriptors left after every client left",
            count("task"),
            count("fd")
        );
        std::thread::sleep(Duration::from_millis(50)); // the kernel has no event for a thread's exit
    }
    assert!(v.terminate().success());
}

/// Out of file descriptors (a flood of idle connections under a low fd
/// limit), the API waits and accepts again: once the flood ends `/health`
/// answers, and the validator kept committing throughout.
#[test]
fn the_api_survives_running_out_of_file_descriptors() {
    let s = Setup::single("");
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg("--nofile=160:160")
        .arg(BIN)
        .arg("run")
        .arg("--config")
        .arg(&s.config)
        .env("ENABLE_API", "true")
        .env("API_LISTEN_ADDR", "127.0.0.1:0");
    let mut v = Validator::spawn(cmd);
    let addr = api_addr(&v);
    assert_eq!(http_get(&addr, "/health").0, 200);
    let mut c = v.connect();
    // Accepted (a commit came back on it) before the descriptors run out:
    // one still queued in the kernel then could not be set up.
    let first = anomaly(&s.producer, 100);
    c.send_event(&first);
    c.wait_committed(&[first.nonce]);
    // More connections than the process has descriptors left.
    let flood: Vec<std::net::TcpStream> = (0..400).filter_map(|_| std::net::TcpStream::connect(&addr).ok()).collect();
    assert!(flood.len() > 160, "the kernel queues connections the process cannot accept");
    wait_log(&v, "API: accept failed; retrying", std::time::Duration::from_secs(30));
    assert!(v.child.try_wait().unwrap().is_none(), "the validator is still running");
    drop(flood);
    // The API serves again, and the core was never held up by it.
    let evs: Vec<Event> = (0..5).map(|i| anomaly(&s.producer, i)).collect();
    for e in &evs {
        c.send_event(e);
    }
    c.wait_committed(&evs.iter().map(|e| e.nonce).collect::<Vec<_>>());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        // Connections the kernel had queued are accepted and closed first.
        let health = || -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut t = std::net::TcpStream::connect(&addr)?;
            t.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            write!(t, "GET /health HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut text = String::new();
            t.read_to_string(&mut text)?;
            Ok(text)
        };
        if health().is_ok_and(|t| t.starts_with("HTTP/1.0 200") || t.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the API never came back");
        std::thread::sleep(std::time::Duration::from_millis(100)); // polling a server that recovers by itself
    }
    assert!(v.terminate().success());
}

/// Mounts a tmpfs of `mib` MiB at a fresh directory; unmounted on drop.
struct Tmpfs(tempfile::TempDir);
impl Tmpfs {
    fn new(mib: u64) -> Tmpfs {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mounting a tmpfs needs root");
        Tmpfs(d)
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

/// A data disk that fills: the validator stops appending with the path and
/// the free space, keeps answering `/health` (503, with the reason), and
/// starts again by itself once space is freed, with every block intact.
#[test]
fn a_full_data_disk_stops_the_validator_cleanly_and_it_resumes_once_space_is_freed() {
    let disk = Tmpfs::new(8);
    let data = disk.0.path().join("data");
    let s = Setup::single("");
    let filler = disk.0.path().join("filler");
    std::fs::write(&filler, vec![7u8; 6 << 20]).unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&s.config)
        .env("CYBERMESH_DATA_DIR", &data)
        .env("ENABLE_API", "true")
        .env("API_LISTEN_ADDR", "127.0.0.1:0");
    let mut v = Validator::spawn(cmd);
    let mut c = v.connect();
    let first: Vec<Event> = (0..20).map(|i| anomaly(&s.producer, i)).collect();
    for e in &first {
        c.send_event(e);
    }
    c.wait_committed(&first.iter().map(|e| e.nonce).collect::<Vec<_>>());
    // Fill the rest of the disk with big alerts.
    let big: Vec<Event> = (0..2000)
        .map(|i| anomaly_with(&s.producer, cybermesh::protocol::event::sample_anomaly_payload(i, 3000)))
        .collect();
    for e in &big {
        if c.try_send_raw(e.kind.tag(), &e.encode()).is_err() {
            break; // the validator stopped reading: it stopped
        }
    }
    let full = wait_log(
        &v,
        "the data disk is full: the validator stopped appending and starts again once space is freed",
        std::time::Duration::from_secs(60),
    );
    assert!(full["fields"]["data_dir"].as_str().unwrap().contains("data"), "{full}");
    assert!(full["fields"]["free_bytes"].as_u64().unwrap() < 1 << 20, "{full}");
    let api = wait_log(&v, "HTTP API listening", std::time::Duration::from_secs(30));
    let addr = api["fields"]["addr"].as_str().unwrap().to_string();
    let (code, body) = http_get(&addr, "/health");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("the data disk is full") && body.contains(data.to_str().unwrap()), "{body}");
    assert_eq!(http_get(&addr, "/ready").0, 503);
    assert!(v.child.try_wait().unwrap().is_none(), "it waits; it does not exit");
    // Space freed: it starts again on its own, and commits new alerts.
    std::fs::remove_file(&filler).unwrap();
    wait_log(&v, "disk space freed; starting again", std::time::Duration::from_secs(30));
    let listening = wait_log(&v, "direct source listening", std::time::Duration::from_secs(60));
    v.addr = listening["fields"]["addr"].as_str().unwrap().parse().unwrap();
    let mut c = v.connect();
    let after: Vec<Event> = (5000..5010).map(|i| anomaly(&s.producer, i)).collect();
    for e in &after {
        c.send_event(e);
    }
    c.wait_committed(&after.iter().map(|e| e.nonce).collect::<Vec<_>>());
    assert!(v.terminate().success());
    let out = std::process::Command::new(BIN).args(["store", "check", "--data-dir"]).arg(&data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The glommio shards register io memory with io_uring, which counts as
/// locked memory for a user without CAP_IPC_LOCK. Under a memlock limit too
/// low for it the validator stops at startup naming the limit and the
/// fixes; with `RUNTIME_EXECUTOR=threads` it runs under the same limit and
/// commits. (Needs root, to run the validator as `nobody` with the limit.)
#[test]
fn a_memlock_limit_too_low_for_glommio_is_named_with_its_fixes_and_threads_run_under_it() {
    use std::process::{Command, Stdio};
    let s = Setup::single("");
    // A copy of the binary beside the config: `nobody` may not reach the
    // build directory.
    let bin = s.dir.path().join("cybermesh");
    std::fs::copy(BIN, &bin).unwrap();
    let owned = Command::new("chown").arg("-R").arg("65534:65534").arg(s.dir.path()).status().unwrap();
    assert!(owned.success(), "chown needs root");
    let as_nobody = |executor: &str| {
        let mut cmd = Command::new("prlimit");
        cmd.args(["--memlock=65536:65536", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin)
            .arg("run")
            .arg("--config")
            .arg(&s.config)
            .env("RUNTIME_EXECUTOR", executor);
        cmd
    };
    let out = as_nobody("glommio").stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started under a 64 KiB memlock limit: {err}");
    for needed in [
        "glommio executor (io_uring) failed",
        "RUNTIME_IO_MEMORY_BYTES = 1048576",
        "the memlock limit here is 65536 bytes",
        "LimitMEMLOCK",
        "RUNTIME_EXECUTOR=threads",
    ] {
        assert!(err.contains(needed), "the error does not say {needed:?}: {err}");
    }

    let v = Validator::spawn(as_nobody("threads"));
    assert!(v.startup_events.iter().any(|e| e["fields"]["executor"] == "Threads"), "{:?}", v.startup);
    let mut c = v.connect();
    let ev = anomaly(&s.producer, 1);
    c.send_event(&ev);
    let (got, _) = c.wait_committed(&[ev.nonce]);
    assert_eq!(got, vec![ev.nonce]);
    assert!(v.terminate().success());
}

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap(); // utime, stime
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Several validators share two cores: an idle one must sleep, not spin,
/// with either runtime (glommio executors park in io_uring by default).
/// This measures a rate, so it waits a fixed wall interval by nature; a
/// spinning thread would use the whole interval, the bound is a tenth.
#[test]
fn an_idle_validator_sleeps_with_either_runtime() {
    use std::time::{Duration, Instant};
    for executor in ["glommio", "threads"] {
        let s = Setup::single("");
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("run").arg("--config").arg(&s.config).env("RUNTIME_EXECUTOR", executor);
        let v = Validator::spawn(cmd);
        // Up and through genesis: one tx committed, then nothing to do.
        let mut c = v.connect();
        let ev = anomaly(&s.producer, 1);
        c.send_event(&ev);
        c.wait_committed(&[ev.nonce]);
        let (cpu0, t0) = (cpu_seconds(v.child.id()), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        let used = cpu_seconds(v.child.id()) - cpu0;
        let wall = t0.elapsed().as_secs_f64();
        assert!(used < wall / 10.0, "{executor}: an idle validator used {used:.2} s of CPU in {wall:.2} s");
        assert!(v.terminate().success());
    }
}
