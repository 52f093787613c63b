//! `cybermesh monitor` in a real terminal (tmux): it draws a running
//! validator's figures and redraws them with rates.

mod common;
use common::*;
use std::process::Command;

fn tmux(socket: &str) -> Command {
    let mut c = Command::new("tmux");
    c.arg("-L").arg(socket);
    c
}

/// Runs `cybermesh monitor --rounds 2 ARGS` in a tmux pane `width` wide;
/// returns its screen once both rounds are drawn. The pane signals `drawn`
/// and stays open on `end`, so the screen is read then: no timing guesses.
fn monitor_screen(tag: &str, args: &str, width: u32) -> String {
    let socket = format!("cybermesh-test-{tag}-{}", std::process::id());
    struct Session(String);
    impl Drop for Session {
        fn drop(&mut self) {
            let _ = tmux(&self.0).arg("kill-server").output();
        }
    }
    let _session = Session(socket.clone());
    let tmux_cmd = format!("tmux -L {socket}");
    let script = format!("{BIN} monitor --rounds 2 {args}; {tmux_cmd} wait-for -S drawn; {tmux_cmd} wait-for end");
    let st = tmux(&socket)
        .args(["new-session", "-d", "-s", "mon", "-x", &width.to_string(), "-y", "30", &script])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(tmux(&socket).args(["wait-for", "drawn"]).status().unwrap().success());
    let out = tmux(&socket).args(["capture-pane", "-p", "-t", "mon"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn monitor_shows_a_running_validator_in_a_terminal() {
    assert!(
        Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success()),
        "tmux missing: scripts/setup-deps.sh installs it"
    );
    let s = Setup::single("");
    let (v, addr) = s.start_with_api();
    let mut c = v.connect();
    let evs: Vec<_> = (0..12).map(|i| anomaly(&s.producer, i)).collect();
    for e in &evs {
        c.send_event(e);
    }
    let (_, last) = c.wait_committed(&evs.iter().map(|e| e.nonce).collect::<Vec<_>>());
    let mut bad = anomaly(&s.producer, 99);
    bad.signature[0] ^= 1;
    c.send_event(&bad);
    wait_dlq(&v, &s.data_dir().join("dlq.jsonl"), 1);

    // Two rounds: levels, then rates.
    let text = monitor_screen("http", &format!("--interval 300ms {addr}"), 200);
    assert!(text.contains("cybermesh monitor: 1 validator(s)"), "{text}");
    let row = text.lines().find(|l| l.starts_with(&addr)).unwrap_or_else(|| panic!("no row for {addr}:\n{text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "1", "validator id: {row}");
    assert_eq!(cols[2], "yes", "ready: {row}");
    assert_eq!(cols[3].parse::<u64>().unwrap(), last.height, "height: {row}");
    assert_eq!(cols[6], "1/1", "peers: {row}");
    assert!(cols[8].parse::<f64>().is_ok(), "commit/s is a number: {row}");
    drop(v);
}

/// The monitor over HTTPS against a 4-validator devnet under load: a row per
/// validator with every peer, and the stages' latency percentiles of the
/// last interval.
#[test]
fn monitor_shows_a_four_validator_devnet_over_https_with_stage_latencies() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, _) = localhost_cert(dir.path());
    let (cert, key) = (cert_pem.display().to_string(), key_pem.display().to_string());
    let c = Cluster::new(4, move |cfg| {
        cfg.api.enabled = true;
        cfg.api.listen = "127.0.0.1:0".into();
        cfg.api.tls_enabled = true;
        cfg.api.tls_cert = cert.clone();
        cfg.api.tls_key = key.clone();
    });
    let vs: Vec<Validator> = (0..4).map(|i| c.start(i)).collect();
    for v in &vs {
        wait_log(v, "genesis complete", std::time::Duration::from_secs(60));
    }
    // The certificate names "localhost".
    let apis: Vec<String> =
        vs.iter().map(|v| format!("https://localhost:{}", api_addr(v).rsplit_once(':').unwrap().1)).collect();
    // Load while the monitor draws, so its interval sees every stage.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();
    let producer = c.producer().clone();
    let loader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Paced by commits, not by a clock: the next tx once this one committed.
                let e = anomaly(&producer, i);
                for cl in clients.iter_mut() {
                    cl.send_event(&e);
                }
                clients[0].wait_committed(&[e.nonce]);
                i += 1;
            }
            i
        })
    };

    let args = format!("--interval 1s --ca-cert {} {}", cert_pem.display(), apis.join(" "));
    let text = monitor_screen("https", &args, 220);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = loader.join().unwrap();
    assert!(sent > 0);
    assert!(text.contains("cybermesh monitor: 4 validator(s)"), "{text}");
    for (i, api) in apis.iter().enumerate() {
        let row =
            text.lines().find(|l| l.starts_with(api.as_str())).unwrap_or_else(|| panic!("no row for {api}:\n{text}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[1], (i + 1).to_string(), "validator id: {row}");
        assert_eq!(cols[2], "yes", "ready: {row}");
        assert_eq!(cols[6], "4/4", "peers: {row}");
        assert!(cols[8].parse::<f64>().unwrap() > 0.0, "committing under load: {row}");
    }
    let stages = text.lines().find(|l| l.starts_with("stage latency ms")).expect("the stage line");
    for stage in ["verify", "prepare", "commit", "execute", "durable"] {
        let figure = stages.split(&format!(" {stage} ")).nth(1).and_then(|r| r.split(' ').next()).unwrap();
        let (p50, p99) = figure.split_once('/').unwrap_or_else(|| panic!("{stage}: {stages}"));
        assert!(p50.parse::<f64>().is_ok() && p99.parse::<f64>().is_ok(), "{stage} {figure}: {stages}");
    }
    drop(vs);
}
