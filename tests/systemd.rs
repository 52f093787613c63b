//! The validator's systemd unit (`systemd/cybermesh@.service`) passes
//! `systemd-analyze verify` without a single warning.

use std::path::Path;
use std::process::Command;

fn verify(unit_text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cybermesh@.service"), unit_text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("cybermesh@1.service"))
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (Debian package `systemd`, installed by scripts/setup-deps.sh)");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn validator_unit_verifies_without_warnings() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/cybermesh@.service");
    let unit = std::fs::read_to_string(&path).unwrap();
    // verify checks that the ExecStart binaries exist: use this build's.
    let unit = unit.replace("/usr/local/bin/cybermesh", env!("CARGO_BIN_EXE_cybermesh"));
    let (ok, stderr) = verify(&unit);
    assert!(ok && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    // It does catch mistakes (so the check above can fail).
    let (_, stderr) = verify(&unit.replace("ProtectSystem=strict", "ProtectSystem=everything"));
    assert!(stderr.contains("ProtectSystem") || stderr.contains("protect system"), "{stderr}");
}
