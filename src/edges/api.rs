//! HTTP API and Prometheus metrics, on a thread of their own (hyper, HTTP/1.1,
//! optional TLS by rustls, on a single-threaded tokio runtime: connections
//! cost no thread, are capped at `MAX_API_CONNECTIONS`, and an accept error
//! such as running out of file descriptors is waited out, never fatal).
//! They read what the other stages publish: atomics in `RuntimeStats` and
//! lock-free histograms, never a lock the hot path takes.
//!
//! * `GET /health`: the process is up (200).
//! * `GET /ready`: 200 once genesis is done, the validator is not joining
//!   from a snapshot nor more than a window of blocks behind what f + 1
//!   others executed, and a quorum of validators (this one included) was
//!   heard from in the last 5 s; else 503 with why (and the lag).
//! * `GET /status`: height, view, leader, peers, mempool, mirror (JSON).
//! * `GET /metrics`: Prometheus text format (names in the manual's style).
//! * `GET /blocks?from=H&limit=N`: headers from H (default: the newest N),
//!   N ≤ 100 (default 20); `GET /blocks/{height}`: one block with its txs
//!   and commit certificate (read from the block store's segment files by a
//!   read-only reader of this thread's own). A height below the lowest
//!   stored (pruned, or below the snapshot this validator joined from) is
//!   410 Gone with `lowest_retained`; pages start at the lowest stored.
//! * `GET /validators`: ids, keys, reputation, exclusion and quarantine.
//! * `GET /state/{key hex}`: the value under a state key with a Merkle proof
//!   against the current state root (answered by the core between events:
//!   the state is its own).
//!
//! Errors are JSON `{"error": "..."}` with the status code.

use crate::edges::metrics::{Figures, RuntimeStats};
pub use crate::edges::metrics::{Latencies, TX_STAGES};
use prometheus::{Encoder, Registry, TextEncoder};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What does not change while the validator runs.
#[derive(Debug, Clone)]
pub struct StaticInfo {
    pub validator: u32,
    pub validators: usize,
    pub quorum: usize,
    /// Validator ids in replica order (certificate signers are replica indexes).
    pub ids: Vec<u32>,
    /// Every validator set epoch so far, oldest first: a block's signers
    /// are named by its own epoch's ids. Empty: `ids` for every block.
    pub epochs: Vec<crate::protocol::reconfig::Epoch>,
    /// More blocks behind the cluster than this (the PBFT window: beyond
    /// it a validator cannot vote in the current rounds) is not ready.
    pub ready_lag_blocks: u64,
}

/// A state lookup for the core: it answers on `reply`.
pub struct StateQuery {
    pub key: Vec<u8>,
    pub reply: std::sync::mpsc::SyncSender<serde_json::Value>,
}

/// The answer to a `StateQuery` (value, proof, root, height).
pub fn state_answer(state: &crate::protocol::state::State, key: &[u8]) -> serde_json::Value {
    let proof = state.prove(key);
    serde_json::json!({
        "key": hex::encode(key),
        "value": state.get(key).map(hex::encode),
        "height": state.height(),
        "state_root": hex::encode(state.root()),
        "proof": {
            "key_hash": hex::encode(crate::sha256(key)),
            "siblings": proof.siblings.iter().map(hex::encode).collect::<Vec<_>>(),
            "leaf": proof.leaf.map(|(k, v)| serde_json::json!({"key_hash": hex::encode(k), "value_hash": hex::encode(v)})),
        },
    })
}

/// Most headers one `/blocks` page returns.
pub const MAX_PAGE: u64 = 100;

fn header_json(b: &crate::protocol::block::Block) -> serde_json::Value {
    let h = &b.header;
    serde_json::json!({
        "height": h.height,
        "hash": hex::encode(b.hash()),
        "previous_hash": hex::encode(h.previous_hash),
        "state_root": hex::encode(h.state_root),
        "tx_root": hex::encode(h.tx_root),
        "view": h.view,
        "timestamp_ms": h.timestamp_ms,
        "proposer": hex::encode(h.proposer),
        "tx_count": h.tx_count,
    })
}

fn block_json(
    b: &crate::protocol::block::Block,
    cert: Option<&crate::proto::PbftCommitCert>,
    info: &StaticInfo,
) -> serde_json::Value {
    let height = b.header.height;
    let (epoch, ids) = match crate::protocol::reconfig::certifying(&info.epochs, height) {
        Some(e) => (e.epoch, e.validators.keys().copied().collect()),
        None => (0, info.ids.clone()),
    };
    let mut v = header_json(b);
    v["txs"] = b
        .txs
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": uuid::Uuid::from_bytes(t.id).to_string(),
                "kind": t.kind.name(),
                "nonce": hex::encode(t.nonce),
                "producer": hex::encode(t.producer),
                "timestamp_ms": t.timestamp_ms,
                "content_hash": hex::encode(t.content_hash),
                "signature": hex::encode(t.signature),
            })
        })
        .collect();
    v["certificate"] = match cert {
        Some(c) => serde_json::json!({
            "view": c.pre_prepare.as_ref().map_or(0, |p| p.view),
            "value_digest": hex::encode(c.pre_prepare.as_ref().map(|p| p.digest.clone()).unwrap_or_default()),
            "epoch": epoch,
            "commits": c.commits.iter().map(|v| serde_json::json!({
                "validator": ids.get(v.from as usize).copied(),
                "signature": hex::encode(&v.sig),
            })).collect::<Vec<_>>(),
        }),
        None => serde_json::Value::Null,
    };
    v
}

fn query_u64(url: &str, key: &str) -> Result<Option<u64>, String> {
    let Some((_, q)) = url.split_once('?') else { return Ok(None) };
    for kv in q.split('&') {
        if let Some((k, v)) = kv.split_once('=') {
            if k == key {
                return v.parse().map(Some).map_err(|_| format!("{key} must be a non-negative integer"));
            }
        }
    }
    Ok(None)
}

/// The latency histograms' registry; the counters and gauges come from
/// `metrics::METRICS` at each scrape.
struct Histograms {
    registry: Registry,
}

impl Histograms {
    fn new(l: &Latencies) -> prometheus::Result<Histograms> {
        let registry = Registry::new();
        for h in
            [&l.consensus_round, &l.block_build, &l.state_execution, &l.persistence, &l.kafka_consume, &l.kafka_produce]
        {
            registry.register(Box::new(h.clone()))?;
        }
        registry.register(Box::new(l.tx_stage.clone()))?;
        Ok(Histograms { registry })
    }
}

/// One answer: status, content type, body.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

fn json_response(status: u16, body: serde_json::Value) -> Reply {
    Reply { status, content_type: "application/json", body: body.to_string().into_bytes() }
}

/// What the API answers from: the published stats, the metrics registry,
/// a block store reader and the core's state-query channel. Transport-free
/// (`respond`), so the routes are the same over HTTP and HTTPS.
pub struct Api {
    info: StaticInfo,
    stats: Arc<RuntimeStats>,
    histograms: Histograms,
    blocks: Option<crate::edges::store::BlockStoreReader>,
    state_queries: std::sync::mpsc::SyncSender<StateQuery>,
}

/// What the HTTP transport asks for an answer.
pub trait Respond {
    /// The answer to `method url` (url with its query string).
    fn respond(&mut self, method: &str, url: &str) -> Reply;
}

impl Respond for Api {
    fn respond(&mut self, method: &str, url: &str) -> Reply {
        Api::respond(self, method, url)
    }
}

/// The API of a validator that stopped and waits (a full data disk):
/// `/health` and `/ready` answer 503 with the reason, as does every route.
pub struct Stopped {
    pub reason: String,
}

impl Respond for Stopped {
    fn respond(&mut self, _method: &str, url: &str) -> Reply {
        let body = match url.split('?').next().unwrap_or("") {
            "/ready" => serde_json::json!({"ready": false, "why": [self.reason]}),
            _ => serde_json::json!({"status": "stopped", "error": self.reason}),
        };
        json_response(503, body)
    }
}

impl Api {
    pub fn new(
        info: StaticInfo,
        stats: Arc<RuntimeStats>,
        latencies: &Latencies,
        blocks: Option<crate::edges::store::BlockStoreReader>,
        state_queries: std::sync::mpsc::SyncSender<StateQuery>,
    ) -> prometheus::Result<Api> {
        Ok(Api { info, stats, histograms: Histograms::new(latencies)?, blocks, state_queries })
    }

    /// The answer to `method url` (url with its query string).
    pub fn respond(&mut self, method: &str, url: &str) -> Reply {
        let path = url.split('?').next().unwrap_or("");
        match (method, path) {
            ("GET", "/health") => json_response(200, serde_json::json!({"status": "ok"})),
            ("GET", "/ready") => {
                let lag = self.stats.lag_blocks.load(Ordering::Relaxed);
                match self.ready_problems() {
                    p if p.is_empty() => json_response(200, serde_json::json!({"ready": true, "lag_blocks": lag})),
                    p => json_response(503, serde_json::json!({"ready": false, "why": p, "lag_blocks": lag})),
                }
            }
            ("GET", "/status") => json_response(200, self.status()),
            ("GET", "/metrics") => {
                let s = &*self.stats;
                let figures =
                    Figures { stats: s, quorum: self.info.quorum as u64, validators: self.info.validators as u64 };
                let mut families = crate::edges::metrics::collect(&figures);
                families.extend(self.histograms.registry.gather());
                let mut buf = vec![];
                let _ = TextEncoder::new().encode(&families, &mut buf);
                Reply { status: 200, content_type: "text/plain; version=0.0.4", body: buf }
            }
            ("GET", "/validators") => {
                let v = self.stats.validators_json.lock().expect("validators lock").clone();
                let none = || serde_json::json!({"epoch": 0, "validators": [], "scheduled": null});
                json_response(200, v.map_or_else(none, |v| (*v).clone()))
            }
            ("GET", "/epochs") => {
                let v = self.stats.epochs_json.lock().expect("epochs lock").clone();
                json_response(200, v.map_or_else(|| serde_json::json!({"epochs": []}), |v| (*v).clone()))
            }
            ("GET", "/blocks") => self.blocks_page(url),
            ("GET", p) if p.starts_with("/state/") => self.state_lookup(&p["/state/".len()..]),
            ("GET", p) if p.starts_with("/blocks/") => self.block(&p["/blocks/".len()..]),
            ("GET", _) => json_response(404, serde_json::json!({"error": format!("no route {path}")})),
            _ => json_response(405, serde_json::json!({"error": "only GET is served"})),
        }
    }

    /// Why this validator is not ready (empty: ready).
    fn ready_problems(&self) -> Vec<String> {
        let s = &*self.stats;
        let mut why = vec![];
        if !s.genesis_done.load(Ordering::Relaxed) {
            why.push("genesis not complete".to_string());
        }
        if s.joining.load(Ordering::Relaxed) {
            why.push("joining: waiting for or loading a chain snapshot".to_string());
        }
        let lag = s.lag_blocks.load(Ordering::Relaxed);
        if lag > self.info.ready_lag_blocks {
            why.push(format!(
                "catching up: {lag} blocks behind the cluster (ready within {})",
                self.info.ready_lag_blocks
            ));
        }
        let heard = s.peers_connected.load(Ordering::Relaxed) as usize + 1;
        if heard < self.info.quorum {
            why.push(format!(
                "{heard} of {} validators reachable, quorum is {}",
                self.info.validators, self.info.quorum
            ));
        }
        why
    }

    fn status(&self) -> serde_json::Value {
        let s = &*self.stats;
        serde_json::json!({
            "validator": self.info.validator,
            "validators": self.info.validators,
            "quorum": self.info.quorum,
            "height": s.height.load(Ordering::Relaxed),
            "view": s.view.load(Ordering::Relaxed),
            "leader": s.leader.load(Ordering::Relaxed),
            "peers_connected": s.peers_connected.load(Ordering::Relaxed),
            "genesis_done": s.genesis_done.load(Ordering::Relaxed),
            "joining": s.joining.load(Ordering::Relaxed),
            "lag_blocks": s.lag_blocks.load(Ordering::Relaxed),
            "mempool": {"size": s.mempool_size.load(Ordering::Relaxed), "bytes": s.mempool_bytes.load(Ordering::Relaxed)},
            "committed_txs": s.committed_txs.load(Ordering::Relaxed),
            "rejected": s.rejected.total(),
            "mirror": {"height": s.mirror.height.load(Ordering::Relaxed), "connected": s.mirror.connected.load(Ordering::Relaxed)},
            "ready": self.ready_problems().is_empty(),
        })
    }

    /// `GET /blocks?from=&limit=`: a page of headers.
    fn blocks_page(&mut self, url: &str) -> Reply {
        let s = &*self.stats;
        let top = s.height.load(Ordering::Relaxed);
        match (query_u64(url, "from"), query_u64(url, "limit")) {
            (Err(e), _) | (_, Err(e)) => json_response(400, serde_json::json!({"error": e})),
            (Ok(from), Ok(limit)) => {
                let limit = limit.unwrap_or(20).clamp(1, MAX_PAGE);
                let lowest = s.lowest_stored.load(Ordering::Acquire).max(1);
                // Pruned heights are skipped: the page starts at the lowest stored.
                let from = from.unwrap_or_else(|| top.saturating_sub(limit - 1)).max(lowest);
                if let Some(r) = self.blocks.as_mut() {
                    r.forget_below(lowest);
                }
                let mut out = vec![];
                let mut err = None;
                for h in from..=top.min(from.saturating_add(limit - 1)) {
                    match self.blocks.as_mut().map(|r| r.read(h)) {
                        Some(Ok(Some((b, _)))) => out.push(header_json(&b)),
                        Some(Ok(None)) | None => {}
                        Some(Err(e)) => err = Some(e),
                    }
                }
                match err {
                    Some(e) => json_response(500, serde_json::json!({"error": e})),
                    None => {
                        json_response(200, serde_json::json!({"blocks": out, "height": top, "lowest_retained": lowest}))
                    }
                }
            }
        }
    }

    /// `GET /state/{key hex}`: answered by the core, with its proof.
    fn state_lookup(&mut self, key_hex: &str) -> Reply {
        match hex::decode(key_hex) {
            Err(_) => json_response(400, serde_json::json!({"error": "the key must be hex"})),
            Ok(key) if key.is_empty() || key.len() > 1024 => {
                json_response(400, serde_json::json!({"error": "the key must be 1 to 1024 bytes"}))
            }
            Ok(key) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                match self.state_queries.try_send(StateQuery { key, reply: tx }) {
                    Err(_) => json_response(503, serde_json::json!({"error": "busy; retry"})),
                    Ok(()) => match rx.recv_timeout(std::time::Duration::from_secs(5)) {
                        Ok(v) => json_response(200, v),
                        Err(_) => json_response(504, serde_json::json!({"error": "the core did not answer in time"})),
                    },
                }
            }
        }
    }

    /// `GET /blocks/{height}`: one block with its txs and certificate.
    fn block(&mut self, height: &str) -> Reply {
        let s = &*self.stats;
        let top = s.height.load(Ordering::Relaxed);
        match height.parse::<u64>() {
            Err(_) => json_response(400, serde_json::json!({"error": "the height must be a number"})),
            Ok(h) if h == 0 || h > top => {
                json_response(404, serde_json::json!({"error": format!("no block {h} (height is {top})")}))
            }
            Ok(h) if h < s.lowest_stored.load(Ordering::Acquire) => {
                let lowest = s.lowest_stored.load(Ordering::Acquire);
                json_response(
                    410,
                    serde_json::json!({
                        "error": format!(
                            "block {h} is not stored here: pruned (STORAGE_RETAIN_BLOCKS) or below the snapshot this \
                             validator joined from; the lowest stored is {lowest}"
                        ),
                        "lowest_retained": lowest,
                    }),
                )
            }
            Ok(h) => match self.blocks.as_mut().map(|r| {
                r.forget_below(s.lowest_stored.load(Ordering::Acquire));
                r.read(h)
            }) {
                Some(Ok(Some((b, cert)))) => json_response(200, block_json(&b, cert.as_ref(), &self.info)),
                Some(Ok(None)) | None => {
                    json_response(404, serde_json::json!({"error": format!("block {h} is not stored here")}))
                }
                Some(Err(e)) => json_response(500, serde_json::json!({"error": e})),
            },
        }
    }
}

/// Connections served at once; one more is closed on accept (each costs a
/// socket and a little memory, no thread).
pub const MAX_API_CONNECTIONS: usize = 256;
/// A client that does not send its request headers (or finish its TLS
/// handshake) within this is disconnected.
const API_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Pause after an accept error (e.g. EMFILE: the process is out of file
/// descriptors) before accepting again.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// TLS for the API from PEM files (API_TLS_CERT, API_TLS_KEY).
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("the certificate file holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("the key file: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `listener` (HTTPS if `tls`) until `stop` is raised.
pub fn serve<R: Respond + 'static>(
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    api: R,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "API: no runtime; the API is off");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, accept_loop(listener, tls, api, stop));
}

async fn accept_loop<R: Respond + 'static>(
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    api: R,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::cell::RefCell;
    use std::rc::Rc;
    let listener = match listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(listener)) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "API: listener; the API is off");
            return;
        }
    };
    let api = Rc::new(RefCell::new(api));
    let open = Rc::new(std::cell::Cell::new(0usize));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut last_error_log: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tokio::time::sleep(std::time::Duration::from_millis(200)) => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: wait and accept again.
                if last_error_log.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "API: accept failed; retrying");
                    last_error_log = Some(std::time::Instant::now());
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        if open.get() >= MAX_API_CONNECTIONS {
            drop(stream); // closed: over the cap
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.set(open.get() + 1);
        let (api, open, acceptor) = (api.clone(), open.clone(), acceptor.clone());
        tokio::task::spawn_local(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let reply = api.borrow_mut().respond(req.method().as_str(), &req.uri().to_string());
                let resp = hyper::Response::builder()
                    .status(reply.status)
                    .header("Content-Type", reply.content_type)
                    .body(http_body_util::Full::new(bytes::Bytes::from(reply.body)));
                async move { resp }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(API_HEADER_TIMEOUT);
            match acceptor {
                None => {
                    let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                }
                Some(acceptor) => {
                    if let Ok(Ok(tls)) = tokio::time::timeout(API_HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        let _ = http.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
                    }
                }
            }
            open.set(open.get() - 1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Validator 1 of four.
    fn info() -> StaticInfo {
        StaticInfo {
            validator: 1,
            validators: 4,
            quorum: 3,
            ids: vec![1, 2, 3, 4],
            epochs: vec![],
            ready_lag_blocks: 8,
        }
    }

    fn api(stats: Arc<RuntimeStats>) -> Api {
        let info = info();
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let latencies = Latencies::default();
        Api::new(info, stats, &latencies, None, tx).unwrap()
    }

    fn ready(api: &mut Api) -> (u16, serde_json::Value) {
        let r = api.respond("GET", "/ready");
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    #[test]
    fn ready_waits_for_the_join_and_the_catch_up_and_tells_the_lag() {
        let stats = Arc::new(RuntimeStats::default());
        stats.genesis_done.store(true, Ordering::Relaxed);
        stats.peers_connected.store(3, Ordering::Relaxed);
        let mut api = api(stats.clone());
        assert_eq!(ready(&mut api), (200, serde_json::json!({"ready": true, "lag_blocks": 0})));
        // Within the window: still voting in the current rounds.
        stats.lag_blocks.store(8, Ordering::Relaxed);
        assert_eq!(ready(&mut api).0, 200);
        stats.lag_blocks.store(9, Ordering::Relaxed);
        let (code, body) = ready(&mut api);
        assert_eq!(code, 503);
        assert_eq!(body["lag_blocks"], 9);
        assert_eq!(body["why"][0], "catching up: 9 blocks behind the cluster (ready within 8)");
        stats.lag_blocks.store(0, Ordering::Relaxed);
        stats.joining.store(true, Ordering::Relaxed);
        let (code, body) = ready(&mut api);
        assert_eq!(code, 503);
        assert_eq!(body["why"][0], "joining: waiting for or loading a chain snapshot");
        let status: serde_json::Value = serde_json::from_slice(&api.respond("GET", "/status").body).unwrap();
        assert_eq!((status["joining"].clone(), status["ready"].clone()), (true.into(), false.into()));
        stats.joining.store(false, Ordering::Relaxed);
        stats.peers_connected.store(1, Ordering::Relaxed);
        let (code, body) = ready(&mut api);
        assert_eq!(code, 503);
        assert_eq!(body["why"][0], "2 of 4 validators reachable, quorum is 3");
    }

    #[test]
    fn a_pruned_height_is_gone_with_the_lowest_stored_and_pages_start_there() {
        use crate::edges::store::{BlockStore, BlockStoreReader};
        let dir = tempfile::tempdir().unwrap();
        let blocks = crate::edges::store::tests::chain(9);
        let (mut store, _) = BlockStore::open(dir.path(), Default::default()).unwrap();
        store.set_segment_bytes(1);
        for g in blocks.chunks(3) {
            store.append(&g.iter().map(|b| (b, None)).collect::<Vec<_>>()).unwrap();
        }
        let reader = BlockStoreReader::open(dir.path(), Default::default()).unwrap();
        store.rebase(blocks[6].header.clone());
        store.prune_through(5).unwrap();
        assert_eq!(store.lowest(), 4);
        let stats = Arc::new(RuntimeStats::default());
        stats.height.store(9, Ordering::Relaxed);
        stats.lowest_stored.store(store.lowest(), Ordering::Relaxed);
        let info = info();
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let mut api = Api::new(info, stats, &Latencies::default(), Some(reader), tx).unwrap();
        let get = |api: &mut Api, path: &str| {
            let r = api.respond("GET", path);
            (r.status, serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
        };
        let (code, body) = get(&mut api, "/blocks/3");
        assert_eq!((code, body["lowest_retained"].clone()), (410, 4.into()), "{body}");
        assert!(body["error"].as_str().unwrap().contains("the lowest stored is 4"), "{body}");
        let (code, body) = get(&mut api, "/blocks/4");
        assert_eq!((code, body["height"].clone()), (200, 4.into()), "{body}");
        assert_eq!(get(&mut api, "/blocks/10").0, 404);
        let (code, body) = get(&mut api, "/blocks?from=1&limit=3");
        assert_eq!(code, 200);
        let heights: Vec<u64> =
            body["blocks"].as_array().unwrap().iter().map(|b| b["height"].as_u64().unwrap()).collect();
        assert_eq!((heights, body["lowest_retained"].clone()), (vec![4, 5, 6], 4.into()));
    }
}
