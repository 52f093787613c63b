//! The database mirror against a real PostgreSQL (started by
//! `scripts/setup-deps.sh`; `CYBERMESH_TEST_DB_DSN`), one database per test.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn admin_dsn() -> String {
    std::env::var("CYBERMESH_TEST_DB_DSN")
        .unwrap_or_else(|_| "postgresql://cybermesh:cybermesh@127.0.0.1:5432/cybermesh".into())
}

/// A fresh database; returns its DSN (on `port`).
fn fresh_db(port: u16) -> String {
    let db = format!("mirror_{}", uuid::Uuid::new_v4().simple());
    let out = Command::new("psql").arg(admin_dsn()).args(["-qc", &format!("CREATE DATABASE {db}")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    format!("postgresql://cybermesh:cybermesh@127.0.0.1:{port}/{db}")
}

fn pg_port() -> u16 {
    admin_dsn().rsplit_once(':').and_then(|(_, rest)| rest.split('/').next()?.parse().ok()).unwrap_or(5432)
}

/// One value from `sql`.
fn query(dsn: &str, sql: &str) -> String {
    let out = Command::new("psql").arg(dsn).args(["-tAc", sql]).output().unwrap();
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start(s: &Setup, dsn: &str) -> Validator {
    start_mode(s, dsn, "copy")
}

fn start_mode(s: &Setup, dsn: &str, mode: &str) -> Validator {
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&s.config)
        .env("ENABLE_PERSISTENCE", "true")
        .env("DB_DSN", dsn)
        .env("DB_RETRY_MIN", "50ms")
        .env("DB_RETRY_MAX", "400ms")
        .env("DB_WRITE_MODE", mode);
    Validator::spawn(cmd)
}

/// Waits (bounded) until the mirror reports `height` written.
fn wait_mirrored(v: &Validator, height: u64) {
    loop {
        let e = wait_log(v, "mirrored", Duration::from_secs(60));
        if e["fields"]["height"].as_u64().unwrap() >= height {
            return;
        }
    }
}

fn send(c: &mut Client, s: &Setup, ids: std::ops::Range<u64>) -> u64 {
    let evs: Vec<_> = ids.map(|i| anomaly(&s.producer, i)).collect();
    for e in &evs {
        c.send_event(e);
    }
    let nonces: Vec<[u8; 16]> = evs.iter().map(|e| e.nonce).collect();
    let (_, last) = c.wait_committed(&nonces);
    last.height
}

#[test]
fn mirror_writes_every_block_once_and_a_replay_changes_nothing() {
    // Both write paths: binary COPY (default) and UNNEST (for CockroachDB).
    for mode in ["copy", "unnest"] {
        mirror_once_and_replay(mode);
    }
}

fn mirror_once_and_replay(mode: &str) {
    let dsn = fresh_db(pg_port());
    // Migrations: applied once, then a no-op.
    let migrate = || Command::new(BIN).args(["db", "migrate"]).env("DB_DSN", &dsn).output().unwrap();
    let out = migrate();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied migrations [1]"));
    let out = migrate();
    assert!(String::from_utf8_lossy(&out.stdout).contains("schema up to date (version 1)"));

    let s = Setup::single("");
    let v = start_mode(&s, &dsn, mode);
    let mut c = v.connect();
    let top = send(&mut c, &s, 0..300);
    wait_mirrored(&v, top);
    let counts = |dsn: &str| {
        (
            query(dsn, "SELECT count(*) FROM blocks"),
            query(dsn, "SELECT count(*) FROM transactions"),
            query(dsn, "SELECT count(*) FROM anomalies"),
            query(dsn, "SELECT height FROM mirror_cursor"),
        )
    };
    let first = counts(&dsn);
    assert_eq!(first, (top.to_string(), "300".into(), "300".into(), top.to_string()));
    assert_eq!(query(&dsn, "SELECT count(*) FROM validators WHERE is_active"), "1");
    assert_eq!(query(&dsn, "SELECT count(*) FROM transactions WHERE status <> 'applied'"), "0");
    // Heights 1..=top, each block linking to the one before.
    assert_eq!(
        query(&dsn, "SELECT count(*) FROM blocks b JOIN blocks p ON p.height = b.height - 1 WHERE b.previous_hash = p.block_hash"),
        (top - 1).to_string()
    );
    assert!(v.terminate().success());

    // Replay: the local cursor is lost, every block is written again.
    std::fs::remove_file(s.data_dir().join("mirror.cursor")).unwrap();
    let v = start_mode(&s, &dsn, mode);
    wait_mirrored(&v, top);
    assert_eq!(counts(&dsn), first, "a replayed block changes nothing");
    assert!(v.terminate().success());
}

/// A TCP proxy in front of PostgreSQL that can cut every connection and
/// refuse new ones: a database outage as the validator sees it.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (u, cs) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                if !u.load(Ordering::SeqCst) {
                    drop(c); // refused while down
                    continue;
                }
                let Ok(db) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                cs.lock().unwrap().extend([c.try_clone().unwrap(), db.try_clone().unwrap()]);
                for (mut from, mut to) in [(c.try_clone().unwrap(), db.try_clone().unwrap()), (db, c)] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, up, conns }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[test]
fn database_outage_under_load_loses_nothing_and_the_mirror_catches_up() {
    let proxy = Proxy::start(pg_port());
    let dsn = fresh_db(proxy.port);
    let direct = dsn.replace(&format!(":{}/", proxy.port), &format!(":{}/", pg_port()));
    let s = Setup::single("");
    let v = start(&s, &dsn);
    let mut c = v.connect();
    let h1 = send(&mut c, &s, 0..200);
    wait_mirrored(&v, h1);

    // The database goes away; consensus does not wait for it.
    proxy.set_up(false);
    let h2 = send(&mut c, &s, 200..500);
    assert!(h2 > h1);
    wait_log(&v, "persistence: write failed; retrying", Duration::from_secs(60));
    assert_eq!(query(&direct, "SELECT height FROM mirror_cursor"), h1.to_string(), "nothing written while down");

    // Back: the mirror catches up with everything committed meanwhile.
    proxy.set_up(true);
    wait_mirrored(&v, h2);
    assert_eq!(query(&direct, "SELECT count(*) FROM transactions"), "500");
    assert_eq!(query(&direct, "SELECT count(*) FROM anomalies"), "500");
    assert_eq!(query(&direct, "SELECT max(height) FROM blocks"), h2.to_string());
    assert_eq!(query(&direct, "SELECT count(*) FROM blocks"), h2.to_string());
    assert!(v.terminate().success());
}

/// `sslmode=verify-full`: the mirror talks TLS to PostgreSQL, checking its
/// certificate (Debian's, made for "localhost") against `sslrootcert`; with
/// another CA it refuses to connect and mirrors nothing.
#[test]
fn mirror_over_tls_verify_full() {
    let ca = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    assert!(std::path::Path::new(ca).exists(), "PostgreSQL's certificate {ca} (Debian's ssl-cert)");
    let plain = fresh_db(pg_port());
    let db = plain.rsplit_once('/').unwrap().1.to_string();
    let tls =
        format!("postgresql://cybermesh:cybermesh@localhost:{}/{db}?sslmode=verify-full&sslrootcert={ca}", pg_port());

    // Another CA: refused.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap().cert.pem()).unwrap();
    let s = Setup::single("");
    let v = start(&s, &tls.replace(ca, other.to_str().unwrap()));
    let mut c = v.connect();
    send(&mut c, &s, 0..20);
    let e = wait_log(&v, "persistence: cannot connect to the database", Duration::from_secs(60));
    assert!(e["fields"]["error"].as_str().unwrap().to_lowercase().contains("certificate"), "{e}");
    assert!(v.terminate().success());
    assert_eq!(query(&plain, "SELECT count(*) FROM pg_tables WHERE tablename = 'blocks'"), "0", "nothing written");

    // The right CA: mirrored, over TLS.
    let v = start(&s, &tls);
    let mut c = v.connect();
    let top = send(&mut c, &s, 20..60);
    wait_mirrored(&v, top);
    assert_eq!(query(&plain, "SELECT count(*) FROM transactions"), "60");
    let ssl = query(
        &plain,
        &format!("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{db}' AND s.ssl AND a.pid <> pg_backend_pid()"),
    );
    assert_ne!(ssl, "0", "the validator's connection uses TLS");
    assert!(v.terminate().success());
}
