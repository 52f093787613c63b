//! The operator-facing commands: keygen and config check.

mod common;
use common::BIN;
use std::process::Command;

#[test]
fn keygen_writes_an_openssl_readable_0600_key_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    let out = Command::new(BIN).args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(printed.len(), 64);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    // openssl agrees on the public key.
    let der = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&path)
        .output()
        .expect("openssl installed");
    assert!(der.status.success(), "{}", String::from_utf8_lossy(&der.stderr));
    assert_eq!(hex::encode(&der.stdout[der.stdout.len() - 32..]), printed);
    let again = Command::new(BIN).args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
}

#[test]
fn config_check_explains_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[node]\nid = 7\n[cluster]\nnodes = [1, 2, 3, 4]\nquorum_size = 2\n[block]\nbuild_interval = \"500ms\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .env("VALIDATOR_1_PUBKEY_HEX", "00")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "NODE_ID (node.id)",
        "QUORUM_SIZE",
        "below N − f = 3",
        "VALIDATOR_1_PUBKEY_HEX",
        "VALIDATOR_2_PUBKEY_HEX",
        "PRODUCER_PUBKEYS",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let bad_env = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .env("BLOCK_BUILD_INTERVAL", "often")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad_env.stderr).contains("BLOCK_BUILD_INTERVAL: bad duration"));

    // A complete config passes.
    let k = |n: &str| {
        let p = dir.path().join(n);
        String::from_utf8(Command::new(BIN).args(["keygen", "--out"]).arg(&p).output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string()
    };
    let ok = format!(
        "[node]\nid = 1\n[cluster]\nnodes = [1]\nvalidators = {{ \"1\" = \"{}\" }}\n[producers]\nkeys = [\"{}\"]\n",
        k("v.pem"),
        k("p.pem")
    );
    std::fs::write(&cfg, ok).unwrap();
    let out = Command::new(BIN).args(["config", "check", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("config OK"));
}
