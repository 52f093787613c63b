//! Operations: the validator's systemd unit (`systemd/cybermesh@.service`)
//! passes `systemd-analyze verify` without a single warning, and the host
//! tuning scripts (`tuning/`) are dry runs by default and idempotent, and
//! the criterion comparison (`scripts/bench_compare.py`) flags a regression
//! but not a uniformly slower machine.

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

fn tuning(script: &str, args: &[&str]) -> (i32, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning").join(script);
    let out = Command::new("bash").arg(&path).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn tuning_scripts_are_dry_runs_by_default_and_idempotent() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    // Dry run: the plan is printed, nothing is written.
    let (code, text) = tuning("all.sh", &["--root", r]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("would write /etc/sysctl.d/90-cybermesh.conf"), "{text}");
    assert!(text.contains("run with --apply"), "{text}");
    assert!(files_under(root.path()).is_empty(), "a dry run wrote {:?}", files_under(root.path()));
    // Apply: the files appear; applying again finds nothing to do.
    let (code, text) = tuning("all.sh", &["--root", r, "--apply"]);
    assert_eq!(code, 0, "{text}");
    let sysctl = std::fs::read_to_string(root.path().join("etc/sysctl.d/90-cybermesh.conf")).unwrap();
    assert!(sysctl.contains("net.core.rmem_max = 8388608"), "{sysctl}");
    assert!(files_under(root.path()).contains(&"etc/security/limits.d/90-cybermesh.conf".to_string()));
    let (code, text) = tuning("all.sh", &["--root", r, "--apply"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(text.matches("nothing to change").count(), 6, "every script idempotent: {text}");
    assert!(!text.contains("wrote"), "{text}");
    // irqbalance (when present) keeps off every core but the housekeeping ones.
    let irq = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(irq.path().join("etc/default")).unwrap();
    std::fs::write(irq.path().join("etc/default/irqbalance"), "").unwrap();
    let (code, text) =
        tuning("irq-affinity.sh", &["--housekeeping", "0", "--root", irq.path().to_str().unwrap(), "--apply"]);
    assert_eq!(code, 0, "{text}");
    let nproc = Command::new("nproc").arg("--all").output().unwrap();
    let cores: usize = String::from_utf8_lossy(&nproc.stdout).trim().parse().unwrap();
    let banned: Vec<String> = (1..cores).map(|c| c.to_string()).collect();
    let conf = irq.path().join("etc/default/irqbalance.d/90-cybermesh.conf");
    if cores > 1 {
        let conf = std::fs::read_to_string(conf).unwrap();
        assert!(conf.contains(&format!("IRQBALANCE_BANNED_CPULIST={}\n", banned.join(","))), "{conf}");
    } else {
        assert!(!conf.exists(), "one core: nothing to ban");
    }
    // A bad option is refused with a reason.
    let (code, text) = tuning("cpu-layout.sh", &["--shards", "two"]);
    assert_eq!(code, 2);
    assert!(text.contains("--shards must be a number"), "{text}");
}

#[test]
fn cpu_layout_gives_each_validator_its_cores_and_a_valid_affinity() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let args = ["--cores", "8", "--instances", "2", "--shards", "2", "--root", r, "--apply"];
    let (code, text) = tuning("cpu-layout.sh", &args);
    assert_eq!(code, 0, "{text}");
    // Core 0 housekeeping; validator 1 on 1 (consensus) + 2, 3; validator 2 on 4 + 5, 6.
    assert!(text.contains("core_core = 1\n    verify_cores = [2, 3]"), "{text}");
    assert!(text.contains("core_core = 4\n    verify_cores = [5, 6]"), "{text}");
    let dropin = |i: u32| {
        std::fs::read_to_string(root.path().join(format!("etc/systemd/system/cybermesh@{i}.service.d/10-cpu.conf")))
            .unwrap()
    };
    assert!(dropin(1).contains("CPUAffinity=0-0 1-3"), "{}", dropin(1));
    assert!(dropin(2).contains("CPUAffinity=0-0 4-6"), "{}", dropin(2));
    let grub = std::fs::read_to_string(root.path().join("etc/default/grub.d/90-cybermesh-isolcpus.cfg")).unwrap();
    assert!(grub.contains("isolcpus=managed_irq,domain,1-3,4-6"), "{grub}");
    // The affinity line is one systemd accepts in the unit.
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/cybermesh@.service")).unwrap();
    let affinity = dropin(2).lines().find(|l| l.starts_with("CPUAffinity=")).unwrap().to_string();
    let unit = unit
        .replace("#CPUAffinity=2 3", &affinity)
        .replace("/usr/local/bin/cybermesh", env!("CARGO_BIN_EXE_cybermesh"));
    assert!(unit.contains(&affinity));
    let (ok, stderr) = verify(&unit);
    assert!(ok && stderr.trim().is_empty(), "systemd-analyze verify with {affinity}: {stderr}");
    // Too few cores: pinning is not advised and nothing is written.
    let small = tempfile::tempdir().unwrap();
    let (code, text) = tuning("cpu-layout.sh", &["--cores", "2", "--root", small.path().to_str().unwrap(), "--apply"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("leave runtime.pin_cores = false"), "{text}");
    assert!(files_under(small.path()).is_empty());
}

/// A fake criterion results dir: `bench id -> mean ns`.
fn criterion_dir(root: &Path, means: &[(&str, f64)]) {
    for (id, ns) in means {
        let d = root.join(id.replace('/', "_")).join("new");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("benchmark.json"), serde_json::json!({ "full_id": id }).to_string()).unwrap();
        let est = serde_json::json!({ "mean": { "point_estimate": ns } });
        std::fs::write(d.join("estimates.json"), est.to_string()).unwrap();
    }
}

fn bench_compare(criterion: &Path, baseline: &Path, args: &[&str]) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_compare.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .env("CRITERION_DIR", criterion)
        .env("BENCH_BASELINE", baseline)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn bench_compare_flags_a_regression_but_not_a_slower_machine() {
    let dir = tempfile::tempdir().unwrap();
    let baseline = dir.path().join("baseline.json");
    let base = [("a/x", 100.0), ("a/y", 200.0), ("b/z", 1000.0), ("c/w", 50.0), ("c/v", 10.0)];
    criterion_dir(&dir.path().join("base"), &base);
    let (code, text) = bench_compare(&dir.path().join("base"), &baseline, &["--save"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("wrote 5 benches"), "{text}");
    // A machine twice as slow on everything: nothing flagged.
    let slow: Vec<(&str, f64)> = base.iter().map(|(id, ns)| (*id, ns * 2.0)).collect();
    criterion_dir(&dir.path().join("slow"), &slow);
    let (code, text) = bench_compare(&dir.path().join("slow"), &baseline, &["--strict"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("machine factor (median raw ratio over 5 benches): 2.00"), "{text}");
    assert!(!text.contains("SLOWER"), "{text}");
    // One bench 2x slower on the same machine: flagged; --strict fails.
    let mut reg = base.to_vec();
    reg[2].1 *= 2.0;
    criterion_dir(&dir.path().join("reg"), &reg);
    let (code, text) = bench_compare(&dir.path().join("reg"), &baseline, &[]);
    assert_eq!(code, 0, "warn only: {text}");
    assert!(text.lines().any(|l| l.starts_with("b/z") && l.ends_with("SLOWER")), "{text}");
    let (code, _) = bench_compare(&dir.path().join("reg"), &baseline, &["--strict"]);
    assert_eq!(code, 1);
    // Within the noise threshold: not flagged.
    let mut noisy = base.to_vec();
    noisy[2].1 *= 1.25;
    criterion_dir(&dir.path().join("noisy"), &noisy);
    let (code, text) = bench_compare(&dir.path().join("noisy"), &baseline, &["--strict"]);
    assert_eq!(code, 0, "{text}");
}
