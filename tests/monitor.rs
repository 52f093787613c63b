//! `cybermesh monitor` in a real terminal (tmux): it draws a running
//! validator's figures and redraws them with rates.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn tmux(socket: &str) -> Command {
    let mut c = Command::new("tmux");
    c.arg("-L").arg(socket);
    c
}

#[test]
fn monitor_shows_a_running_validator_in_a_terminal() {
    assert!(
        Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success()),
        "tmux missing: scripts/setup-deps.sh installs it"
    );
    let s = Setup::single("");
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&s.config).env("ENABLE_API", "true").env("API_LISTEN_ADDR", "127.0.0.1:0");
    let v = Validator::spawn(cmd);
    let addr = api_addr(&v);
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

    let socket = format!("cybermesh-test-{}", std::process::id());
    struct Session(String);
    impl Drop for Session {
        fn drop(&mut self) {
            let _ = tmux(&self.0).arg("kill-server").output();
        }
    }
    let _session = Session(socket.clone());
    let st = tmux(&socket)
        .args(["new-session", "-d", "-s", "mon", "-x", "200", "-y", "30"])
        .arg(format!("{BIN} monitor --interval 300ms {addr}"))
        .status()
        .unwrap();
    assert!(st.success());
    let screen = || {
        let out = tmux(&socket).args(["capture-pane", "-p", "-t", "mon"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // The first screen has levels; from the second on, rates.
    let deadline = Instant::now() + Duration::from_secs(30);
    let row = loop {
        let text = screen();
        let row = text.lines().find(|l| l.starts_with(&addr)).map(str::to_string);
        if let Some(r) = row.filter(|r| r.split_whitespace().nth(8).is_some_and(|c| c != "-")) {
            assert!(text.contains("cybermesh monitor: 1 validator(s)"), "{text}");
            break r;
        }
        assert!(Instant::now() < deadline, "no rates on the screen within 30 s:\n{text}");
        std::thread::sleep(Duration::from_millis(100)); // the monitor's next redraw
    };
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "1", "validator id: {row}");
    assert_eq!(cols[2], "yes", "ready: {row}");
    assert_eq!(cols[3].parse::<u64>().unwrap(), last.height, "height: {row}");
    assert_eq!(cols[6], "1/1", "peers: {row}");
    assert!(cols[8].parse::<f64>().is_ok(), "commit/s is a number: {row}");
    drop(v);
}
