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

    let socket = format!("cybermesh-test-{}", std::process::id());
    struct Session(String);
    impl Drop for Session {
        fn drop(&mut self) {
            let _ = tmux(&self.0).arg("kill-server").output();
        }
    }
    let _session = Session(socket.clone());
    // Two rounds (levels, then rates), then the pane signals `drawn` and
    // stays open on `end` so its screen can be read: no timing guesses.
    let tmux_cmd = format!("tmux -L {socket}");
    let script = format!(
        "{BIN} monitor --rounds 2 --interval 300ms {addr}; {tmux_cmd} wait-for -S drawn; {tmux_cmd} wait-for end"
    );
    let st = tmux(&socket).args(["new-session", "-d", "-s", "mon", "-x", "200", "-y", "30", &script]).status().unwrap();
    assert!(st.success());
    assert!(tmux(&socket).args(["wait-for", "drawn"]).status().unwrap().success());
    let out = tmux(&socket).args(["capture-pane", "-p", "-t", "mon"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
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
