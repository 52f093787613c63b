//! kill -9 a real process in the middle of appending blocks; recovery must
//! keep every block it acknowledged as durable and leave a valid chain.

mod common;
use common::BIN;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn kill9_mid_append_loses_no_acknowledged_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = 0u64;
    for round in 1..=3u64 {
        let mut child = Command::new(BIN)
            .args(["debug", "store-writer", "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let target = acknowledged + 20 * round;
        // Wait for the writer's own acknowledgements, then kill it while it
        // is busy appending the next block.
        while acknowledged < target {
            let l = lines.next().expect("writer exited early").unwrap();
            acknowledged = l.strip_prefix("durable ").unwrap().parse().unwrap();
        }
        child.kill().unwrap();
        // Lines already written before the kill are acknowledgements too.
        for l in lines.map_while(Result::ok) {
            if let Some(h) = l.strip_prefix("durable ") {
                acknowledged = h.parse().unwrap();
            }
        }
        child.wait().unwrap();
        let out = Command::new(BIN).args(["store", "check", "--data-dir"]).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let blocks: u64 = text.split("OK: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!(blocks >= acknowledged, "round {round}: {blocks} blocks recovered, {acknowledged} acknowledged");
        assert!(blocks <= acknowledged + 1, "at most the one block being written may survive unacknowledged");
        acknowledged = blocks;
    }
}
