//! Persistence: the PostgreSQL / CockroachDB mirror of the block store.
//!
//! A thread of its own (a single-threaded tokio runtime around
//! tokio-postgres) receives committed blocks from the core in height order
//! and writes them in batches, one transaction per batch: `blocks`,
//! `transactions`, `anomalies` (multi-row `INSERT … SELECT FROM UNNEST(…)
//! ON CONFLICT DO NOTHING`, so a replayed block changes nothing) and the
//! `mirror_cursor` row. After each committed batch it writes the local
//! cursor file (`mirror.cursor`) the core resumes from after a restart.
//! Consensus never waits for it: the core's feed is bounded and non-blocking,
//! and falls back to reading the block store while the mirror is behind. A
//! database outage makes the thread retry the same batch with exponential
//! backoff (`DB_RETRY_MIN` 100 ms to `DB_RETRY_MAX` 5 s); nothing is lost and
//! the mirror catches up.
//!
//! Schema changes are versioned migrations (`migrations/*.sql`, embedded),
//! applied in order by `cybermesh db migrate` and at startup, each recorded
//! in `schema_migrations`.

use crate::protocol::block::Block;
use crate::protocol::event::{parse_payload, Payload};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

/// (version, name, SQL), in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "init", include_str!("../../migrations/0001_init.sql"))];

/// A committed block for the mirror, with the reasons of the txs the state
/// machine refused (by index).
#[derive(Debug, Clone)]
pub struct MirrorBlock {
    pub block: Arc<Block>,
    pub rejected: Vec<(u32, String)>,
}

impl MirrorBlock {
    pub fn new(block: Arc<Block>, outcome: Option<&crate::proto::BlockOutcome>) -> Self {
        let rejected = outcome.map_or(vec![], |o| o.rejected.iter().map(|r| (r.index, r.reason.clone())).collect());
        MirrorBlock { block, rejected }
    }
}

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub dsn: String,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Most blocks written in one transaction.
    pub batch_blocks: usize,
    /// Binary COPY (else multi-row UNNEST inserts).
    pub copy: bool,
    /// Validator set (id, key) for the `validators` table.
    pub validators: Vec<(u32, crate::protocol::crypto::PublicKey)>,
}

/// What the mirror publishes for logs and metrics.
#[derive(Debug, Default)]
pub struct MirrorStats {
    pub height: AtomicU64,
    pub rows: AtomicU64,
    pub connected: AtomicBool,
    pub failures: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database settings: {0}")]
    Config(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// An error with its causes ("…: …"), for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Connects (TLS per `split_tls`).
pub async fn connect(dsn: &str) -> Result<Client, DbError> {
    let t = split_tls(dsn).map_err(DbError::Config)?;
    if let Some(ca) = &t.verify_full_ca {
        return connect_tls(&t.dsn, ca).await;
    }
    let (client, connection) = tokio_postgres::connect(&t.dsn, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// Applies the migrations not yet recorded; returns the versions applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await?;
    let mut applied = vec![];
    for (version, name, sql) in MIGRATIONS {
        let done = client.query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[version]).await?;
        if done.is_some() {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
        tx.commit().await?;
        applied.push(*version);
    }
    Ok(applied)
}

/// Writes `blocks` (consecutive heights) in one transaction; returns the
/// rows inserted (0 for a batch already there).
pub async fn write_batch(client: &mut Client, blocks: &[MirrorBlock]) -> Result<u64, tokio_postgres::Error> {
    let (b, t, a) = rows(blocks);
    let top = blocks.last().map_or(0, |m| m.block.header.height as i64);
    let tx = client.transaction().await?;
    let mut rows = tx
        .execute(
            "INSERT INTO blocks (height, block_hash, state_root, previous_hash, timestamp_ms, tx_count, proposer_id, block_view)
             SELECT * FROM UNNEST($1::BIGINT[], $2::BYTEA[], $3::BYTEA[], $4::BYTEA[], $5::BIGINT[], $6::INT[], $7::BYTEA[], $8::BIGINT[])
             ON CONFLICT (height) DO NOTHING",
            &[&b.height, &b.hash, &b.state_root, &b.previous, &b.ts, &b.count, &b.proposer, &b.view],
        )
        .await?;
    rows += tx
        .execute(
            "INSERT INTO transactions (tx_id, block_height, tx_index, tx_type, content_hash, payload, producer_id, nonce, signature, timestamp_ms, status)
             SELECT * FROM UNNEST($1::UUID[], $2::BIGINT[], $3::INT[], $4::TEXT[], $5::BYTEA[], $6::BYTEA[], $7::BYTEA[], $8::BYTEA[], $9::BYTEA[], $10::BIGINT[], $11::TEXT[])
             ON CONFLICT (tx_id) DO NOTHING",
            &[&t.id, &t.height, &t.index, &t.kind, &t.content_hash, &t.payload, &t.producer, &t.nonce, &t.signature, &t.ts, &t.status],
        )
        .await?;
    rows += tx
        .execute(
            "INSERT INTO anomalies (anomaly_id, anomaly_type, severity, confidence, source, block_height, created_at)
             SELECT * FROM UNNEST($1::UUID[], $2::TEXT[], $3::INT[], $4::FLOAT8[], $5::TEXT[], $6::BIGINT[], $7::TIMESTAMPTZ[])
             ON CONFLICT (anomaly_id) DO NOTHING",
            &[&a.id, &a.kind, &a.severity, &a.confidence, &a.source, &a.height, &a.created],
        )
        .await?;
    tx.execute("UPDATE mirror_cursor SET height = GREATEST(height, $1) WHERE id = 1", &[&top]).await?;
    tx.commit().await?;
    Ok(rows)
}

/// `write_batch` with binary `COPY` into session temp tables, then
/// `INSERT … SELECT … ON CONFLICT DO NOTHING` (same effect; for measuring
/// against UNNEST: `loadgen mirror-bench`).
pub async fn write_batch_copy(client: &mut Client, blocks: &[MirrorBlock]) -> Result<u64, tokio_postgres::Error> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{ToSql, Type};
    let (b, t, a) = rows(blocks);
    let top = blocks.last().map_or(0, |m| m.block.header.height as i64);
    let tx = client.transaction().await?;
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS blocks_in (LIKE blocks) ON COMMIT DELETE ROWS;
         CREATE TEMP TABLE IF NOT EXISTS transactions_in (LIKE transactions) ON COMMIT DELETE ROWS;
         CREATE TEMP TABLE IF NOT EXISTS anomalies_in (LIKE anomalies) ON COMMIT DELETE ROWS;",
    )
    .await?;
    async fn copy(
        tx: &tokio_postgres::Transaction<'_>,
        sql: &str,
        types: &[Type],
        n: usize,
        row: impl Fn(usize) -> Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> Result<(), tokio_postgres::Error> {
        let sink = tx.copy_in(sql).await?;
        let w = BinaryCopyInWriter::new(sink, types);
        tokio::pin!(w);
        for i in 0..n {
            let r = row(i);
            let refs: Vec<&(dyn ToSql + Sync)> = r.iter().map(|x| &**x as &(dyn ToSql + Sync)).collect();
            w.as_mut().write(&refs).await?;
        }
        w.finish().await?;
        Ok(())
    }
    copy(
        &tx,
        "COPY blocks_in (height, block_hash, state_root, previous_hash, timestamp_ms, tx_count, proposer_id, block_view) FROM STDIN BINARY",
        &[Type::INT8, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::INT8, Type::INT4, Type::BYTEA, Type::INT8],
        b.height.len(),
        |i| vec![Box::new(b.height[i]), Box::new(b.hash[i].clone()), Box::new(b.state_root[i].clone()), Box::new(b.previous[i].clone()), Box::new(b.ts[i]), Box::new(b.count[i]), Box::new(b.proposer[i].clone()), Box::new(b.view[i])],
    )
    .await?;
    copy(
        &tx,
        "COPY transactions_in (tx_id, block_height, tx_index, tx_type, content_hash, payload, producer_id, nonce, signature, timestamp_ms, status) FROM STDIN BINARY",
        &[Type::UUID, Type::INT8, Type::INT4, Type::TEXT, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::INT8, Type::TEXT],
        t.id.len(),
        |i| vec![Box::new(t.id[i]), Box::new(t.height[i]), Box::new(t.index[i]), Box::new(t.kind[i].clone()), Box::new(t.content_hash[i].clone()), Box::new(t.payload[i].clone()), Box::new(t.producer[i].clone()), Box::new(t.nonce[i].clone()), Box::new(t.signature[i].clone()), Box::new(t.ts[i]), Box::new(t.status[i].clone())],
    )
    .await?;
    copy(
        &tx,
        "COPY anomalies_in (anomaly_id, anomaly_type, severity, confidence, source, block_height, created_at) FROM STDIN BINARY",
        &[Type::UUID, Type::TEXT, Type::INT4, Type::FLOAT8, Type::TEXT, Type::INT8, Type::TIMESTAMPTZ],
        a.id.len(),
        |i| vec![Box::new(a.id[i]), Box::new(a.kind[i].clone()), Box::new(a.severity[i]), Box::new(a.confidence[i]), Box::new(a.source[i].clone()), Box::new(a.height[i]), Box::new(a.created[i])],
    )
    .await?;
    let mut rows =
        tx.execute("INSERT INTO blocks SELECT * FROM blocks_in ON CONFLICT (height) DO NOTHING", &[]).await?;
    rows += tx
        .execute("INSERT INTO transactions SELECT * FROM transactions_in ON CONFLICT (tx_id) DO NOTHING", &[])
        .await?;
    rows +=
        tx.execute("INSERT INTO anomalies SELECT * FROM anomalies_in ON CONFLICT (anomaly_id) DO NOTHING", &[]).await?;
    tx.execute("UPDATE mirror_cursor SET height = GREATEST(height, $1) WHERE id = 1", &[&top]).await?;
    tx.commit().await?;
    Ok(rows)
}

/// The rows of `blocks`, column by column.
fn rows(blocks: &[MirrorBlock]) -> (BlockRows, TxRows, AnomalyRows) {
    let mut b = BlockRows::default();
    let mut t = TxRows::default();
    let mut a = AnomalyRows::default();
    for mb in blocks {
        let blk = &mb.block;
        let h = &blk.header;
        let height = h.height as i64;
        b.height.push(height);
        b.hash.push(blk.hash().to_vec());
        b.state_root.push(h.state_root.to_vec());
        b.previous.push(h.previous_hash.to_vec());
        b.ts.push(h.timestamp_ms as i64);
        b.count.push(h.tx_count as i32);
        b.proposer.push(h.proposer.to_vec());
        b.view.push(h.view as i64);
        for (i, tx) in blk.txs.iter().enumerate() {
            let status = mb.rejected.iter().find(|(j, _)| *j == i as u32).map_or("applied", |(_, r)| r.as_str());
            t.id.push(uuid::Uuid::from_bytes(tx.id));
            t.height.push(height);
            t.index.push(i as i32);
            t.kind.push(tx.kind.name().to_string());
            t.content_hash.push(tx.content_hash.to_vec());
            t.payload.push(tx.payload.clone());
            t.producer.push(tx.producer.to_vec());
            t.nonce.push(tx.nonce.to_vec());
            t.signature.push(tx.signature.to_vec());
            t.ts.push(tx.timestamp_ms as i64);
            t.status.push(status.to_string());
            if status != "applied" {
                continue;
            }
            if let Ok(Payload::Anomaly(p)) = parse_payload(tx.kind, &tx.payload) {
                a.id.push(uuid::Uuid::from_bytes(tx.id));
                a.kind.push(p.anomaly_type);
                a.severity.push(p.severity as i32);
                a.confidence.push(p.confidence);
                a.source.push(p.source);
                a.height.push(height);
                a.created.push(std::time::UNIX_EPOCH + Duration::from_millis(h.timestamp_ms));
            }
        }
    }
    (b, t, a)
}

#[derive(Default)]
struct BlockRows {
    height: Vec<i64>,
    hash: Vec<Vec<u8>>,
    state_root: Vec<Vec<u8>>,
    previous: Vec<Vec<u8>>,
    ts: Vec<i64>,
    count: Vec<i32>,
    proposer: Vec<Vec<u8>>,
    view: Vec<i64>,
}

#[derive(Default)]
struct TxRows {
    id: Vec<uuid::Uuid>,
    height: Vec<i64>,
    index: Vec<i32>,
    kind: Vec<String>,
    content_hash: Vec<Vec<u8>>,
    payload: Vec<Vec<u8>>,
    producer: Vec<Vec<u8>>,
    nonce: Vec<Vec<u8>>,
    signature: Vec<Vec<u8>>,
    ts: Vec<i64>,
    status: Vec<String>,
}

#[derive(Default)]
struct AnomalyRows {
    id: Vec<uuid::Uuid>,
    kind: Vec<String>,
    severity: Vec<i32>,
    confidence: Vec<f64>,
    source: Vec<String>,
    height: Vec<i64>,
    created: Vec<std::time::SystemTime>,
}

async fn upsert_validators(
    client: &Client,
    v: &[(u32, crate::protocol::crypto::PublicKey)],
) -> Result<(), tokio_postgres::Error> {
    for (id, key) in v {
        client
            .execute(
                "INSERT INTO validators (validator_id, public_key, reputation, is_active, joined_view) VALUES ($1, $2, 1.0, TRUE, 0)
                 ON CONFLICT (validator_id) DO UPDATE SET public_key = EXCLUDED.public_key, is_active = TRUE",
                &[&(*id as i64), &key.to_vec()],
            )
            .await?;
    }
    Ok(())
}

/// The persistence thread. Returns when `stop` is raised and everything
/// received is written (or the database stays unreachable).
pub fn mirror_loop(
    cfg: MirrorConfig,
    rx: std::sync::mpsc::Receiver<MirrorBlock>,
    cursor_path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    stats: Arc<MirrorStats>,
    latency: prometheus::Histogram,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "persistence: cannot start its runtime");
            return;
        }
    };
    rt.block_on(async move {
        let mut client: Option<Client> = None;
        let mut backoff = cfg.retry_min;
        let mut batch: Vec<MirrorBlock> = Vec::new();
        loop {
            // Fill the batch (a failed batch is retried as it is).
            if batch.is_empty() {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(b) => batch.push(b),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) if stop.load(Ordering::Relaxed) => return,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                while batch.len() < cfg.batch_blocks {
                    match rx.try_recv() {
                        Ok(b) => batch.push(b),
                        Err(_) => break,
                    }
                }
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                stats.connected.store(false, Ordering::Relaxed);
                match connect(&cfg.dsn).await {
                    Ok(mut c) => {
                        let ready = async {
                            migrate(&mut c).await?;
                            upsert_validators(&c, &cfg.validators).await
                        };
                        match ready.await {
                            Ok(()) => {
                                tracing::info!("persistence: connected to the database");
                                stats.connected.store(true, Ordering::Relaxed);
                                client = Some(c);
                            }
                            Err(e) => {
                                tracing::warn!(error = %error_chain(&e), "persistence: database not ready");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %error_chain(&e), retry_in = ?backoff, "persistence: cannot connect to the database")
                    }
                }
            }
            let t = std::time::Instant::now();
            let result = match client.as_mut() {
                Some(c) if cfg.copy => write_batch_copy(c, &batch).await.map_err(|e| error_chain(&e)),
                Some(c) => write_batch(c, &batch).await.map_err(|e| error_chain(&e)),
                None => Err("not connected".to_string()),
            };
            if result.is_ok() {
                latency.observe(t.elapsed().as_secs_f64() * 1000.0);
            }
            match result {
                Ok(rows) => {
                    backoff = cfg.retry_min;
                    let top = batch.last().map_or(0, |m| m.block.header.height);
                    stats.height.store(top, Ordering::Relaxed);
                    stats.rows.fetch_add(rows, Ordering::Relaxed);
                    if let Err(e) = crate::edges::framed::write_atomically(&cursor_path, top.to_string().as_bytes()) {
                        tracing::error!(error = %e, path = %cursor_path.display(), "persistence: cannot write its cursor");
                    }
                    tracing::debug!(height = top, blocks = batch.len(), rows, "mirrored");
                    batch.clear();
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        tracing::warn!(error = %e, "persistence: stopping with blocks not mirrored (the next start resumes)");
                        return;
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "persistence: write failed; retrying");
                    client = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cfg.retry_max);
                }
            }
        }
    });
}

/// A DSN with TLS settings split out: `sslmode=verify-full` with
/// `sslrootcert=<PEM file>` (URL query or key=value form) means TLS with
/// the server's chain checked against that CA and its name against the
/// host; the rest goes to tokio-postgres as is.
#[derive(Debug, PartialEq, Eq)]
pub struct DsnTls {
    pub dsn: String,
    pub verify_full_ca: Option<String>,
}

pub fn split_tls(dsn: &str) -> Result<DsnTls, String> {
    let mut mode = None;
    let mut root = None;
    let rest = if let Some((base, query)) = dsn.split_once('?').filter(|_| dsn.contains("://")) {
        let mut keep = vec![];
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.to_string()),
                Some(("sslrootcert", v)) => root = Some(v.to_string()),
                _ => keep.push(kv),
            }
        }
        if keep.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", keep.join("&"))
        }
    } else if dsn.contains("://") {
        dsn.to_string()
    } else {
        let mut keep = vec![];
        for kv in dsn.split_whitespace() {
            match kv.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.to_string()),
                Some(("sslrootcert", v)) => root = Some(v.to_string()),
                _ => keep.push(kv),
            }
        }
        keep.join(" ")
    };
    match mode.as_deref() {
        None | Some("disable") => Ok(DsnTls { dsn: rest, verify_full_ca: None }),
        Some("verify-full") => match root {
            Some(r) => Ok(DsnTls { dsn: rest, verify_full_ca: Some(r) }),
            None => Err("sslmode=verify-full needs sslrootcert=<CA PEM file> in DB_DSN".into()),
        },
        Some(other) => Err(format!(
            "sslmode={other} is not supported: use sslmode=verify-full with sslrootcert=<CA PEM file> (or no sslmode for a plain connection)"
        )),
    }
}

async fn connect_tls(dsn: &str, ca: &str) -> Result<Client, DbError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let bad = |e: &dyn std::fmt::Display| DbError::Config(format!("sslrootcert {ca}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
        roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| DbError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut cfg: tokio_postgres::Config = dsn.parse()?;
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = cfg.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_split_from_both_dsn_forms() {
        let url = "postgresql://u:p@db:5432/x?sslmode=verify-full&sslrootcert=/ca.pem&application_name=v";
        assert_eq!(
            split_tls(url).unwrap(),
            DsnTls {
                dsn: "postgresql://u:p@db:5432/x?application_name=v".into(),
                verify_full_ca: Some("/ca.pem".into())
            }
        );
        let kv = "host=db user=u sslmode=verify-full sslrootcert=/ca.pem dbname=x";
        assert_eq!(
            split_tls(kv).unwrap(),
            DsnTls { dsn: "host=db user=u dbname=x".into(), verify_full_ca: Some("/ca.pem".into()) }
        );
        assert_eq!(split_tls("postgresql://u@h/x").unwrap().verify_full_ca, None);
        assert!(split_tls("postgresql://u@h/x?sslmode=verify-full").unwrap_err().contains("sslrootcert"));
        assert!(split_tls("postgresql://u@h/x?sslmode=require").unwrap_err().contains("not supported"));
    }
}
