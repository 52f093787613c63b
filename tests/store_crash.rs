//! kill -9 a real process in the middle of appending blocks; recovery must
//! keep every block it acknowledged as durable and leave a valid chain.

mod common;
use common::BIN;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// `cybermesh debug store-writer` appending blocks to `dir`, and its
/// "durable H" lines.
fn store_writer(dir: &std::path::Path) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = Command::new(BIN)
        .args(["debug", "store-writer", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

#[test]
fn kill9_mid_append_loses_no_acknowledged_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = 0u64;
    for round in 1..=3u64 {
        let (mut child, mut lines) = store_writer(dir.path());
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

/// `store check` reports a torn tail and corruption without touching the
/// file; `--repair` cuts it at the corrupt record and says what it dropped.
#[test]
fn store_check_tells_a_torn_tail_from_corruption_and_repairs_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines) = store_writer(dir.path());
    while lines.next().expect("writer exited early").unwrap() != "durable 10" {}
    child.kill().unwrap();
    child.wait().unwrap();
    let check = |repair: bool| {
        let mut c = Command::new(BIN);
        c.args(["store", "check", "--data-dir"]).arg(dir.path());
        if repair {
            c.arg("--repair");
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let path = cybermesh::edges::store::segment_path(dir.path(), 1);
    // Recover once (the kill may have left a torn tail), then add one.
    let (ok, _, err) = check(true);
    assert!(ok, "{err}");
    let mut bytes = std::fs::read(&path).unwrap();
    let blocks = {
        let mut offsets = vec![];
        let mut at = 8;
        while at < bytes.len() {
            offsets.push(at);
            at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        }
        offsets
    };
    assert!(blocks.len() >= 10);
    bytes.extend_from_slice(&[1, 2, 3, 4, 5]);
    std::fs::write(&path, &bytes).unwrap();
    let (ok, out, err) = check(false);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("OK: {} blocks", blocks.len())), "{out}");
    assert!(out.contains("torn tail of 5 bytes"), "{out}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "check without --repair wrote");
    // A length field damaged in the middle: refused with the offset and the
    // way out, the file untouched.
    let at = blocks[3];
    bytes[at + 3] = 0x7f;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, _, err) = check(false);
    assert!(!ok);
    assert!(err.contains(&format!("corrupt record 3 at offset {at}")), "{err}");
    assert!(err.contains(&format!("{} intact record(s) follow", blocks.len() - 4)), "{err}");
    assert!(err.contains("--repair"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let (ok, out, err) = check(true);
    assert!(ok, "{err}");
    assert!(out.contains("OK: 3 blocks"), "{out}");
    assert!(out.contains(&format!("{} intact blocks after the corrupt one dropped", blocks.len() - 4)), "{out}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), at as u64);
}
