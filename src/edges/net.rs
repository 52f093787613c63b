//! Validator-to-validator transport: QUIC (quinn) on its own tokio thread,
//! bridged to the synchronous core by bounded queues.
//!
//! * Mutual authentication with the validators' configured Ed25519 keys:
//!   each node presents a self-signed certificate for its validator key; the
//!   TLS 1.3 handshake proves possession, and a peer whose key is not in the
//!   validator set is refused (both directions).
//! * One long-lived unidirectional stream per direction and peer, carrying
//!   frames `u32 BE len ‖ bytes`; a frame over `max_frame` closes that
//!   connection (the sender reconnects), so a peer cannot make us buffer
//!   unbounded data.
//! * Bounded queues: a full outgoing queue drops the message (consensus
//!   retransmits); a full incoming queue drops too, counted in `NetStats`.

use crate::protocol::crypto::{self, PublicKey, SigningKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A validator to talk to.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: u32,
    /// None: not known yet (found later by mDNS: `AddressBook::set`).
    pub addr: Option<SocketAddr>,
    pub key: PublicKey,
}

/// Where each peer is reached; a change takes effect at the next
/// (re)connection, and wakes a connection attempt that waits for one.
#[derive(Clone)]
pub struct AddressBook(Arc<HashMap<u32, tokio::sync::watch::Sender<Option<SocketAddr>>>>);

impl AddressBook {
    /// Sets `id`'s address; false if it is not a peer or the address is the same.
    pub fn set(&self, id: u32, addr: SocketAddr) -> bool {
        self.0.get(&id).is_some_and(|tx| tx.send_if_modified(|a| a.replace(addr) != Some(addr)))
    }

    /// `id`'s address, if known.
    pub fn get(&self, id: u32) -> Option<SocketAddr> {
        self.0.get(&id).and_then(|tx| *tx.borrow())
    }
}

pub struct NetConfig {
    pub me: u32,
    pub key: SigningKey,
    /// Bound UDP socket (bind first, so tests and callers know the address).
    pub socket: std::net::UdpSocket,
    /// Every other validator.
    pub peers: Vec<Peer>,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Bytes the incoming queue, and each peer's outgoing queue, may hold
    /// (at least `max_frame`).
    pub max_queued_bytes: usize,
    /// Outgoing messages buffered per peer, and incoming overall.
    pub queue: usize,
    /// ALLOWED_IPS: connections from other addresses are refused before the
    /// handshake (empty: any address; keys are checked either way).
    pub allowed_ips: Vec<ipnet::IpNet>,
    /// Called after each incoming message is queued (wakes the consumer).
    pub wake: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// What happened to connections (for logs, metrics and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEvent {
    Connected {
        peer: u32,
        outgoing: bool,
    },
    /// A connection attempt or an incoming connection failed (e.g. refused
    /// for an unknown key), with the reason.
    Failed {
        addr: SocketAddr,
        reason: String,
    },
    /// A peer sent a frame over the limit; its connection was closed.
    Oversized {
        peer: u32,
        len: usize,
    },
}

#[derive(Default, Debug)]
pub struct NetStats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Frame bytes queued to peers / received from them (without the
    /// length prefix and QUIC's own overhead).
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub dropped_out: AtomicU64,
    pub dropped_in: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("TLS identity: {0}")]
    Identity(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(String),
}

const ALPN: &[u8] = b"cybermesh/1";
const SERVER_NAME: &str = "cybermesh";

/// The Ed25519 key in a certificate's SubjectPublicKeyInfo, if it is one.
fn ed25519_key_of(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let spki = c.public_key();
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return None;
    }
    spki.subject_public_key.data.as_ref().try_into().ok()
}

#[derive(Debug)]
struct PeerVerifier {
    allowed: Arc<HashMap<PublicKey, u32>>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match ed25519_key_of(cert) {
            Some(k) if self.allowed.contains_key(&k) => Ok(()),
            Some(k) => Err(rustls::Error::General(format!("key {} is not a configured validator", hex::encode(k)))),
            None => Err(rustls::Error::General("certificate is not for an Ed25519 key".into())),
        }
    }
}

/// The handshake-signature half of both verifiers: TLS 1.3 only, Ed25519 only.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not used".into()))
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|_| ServerCertVerified::assertion())
    }
    handshake_signatures!();
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|_| ClientCertVerified::assertion())
    }
    handshake_signatures!();
}

/// Self-signed certificate for the validator key, and the key for rustls.
fn identity(key: &SigningKey) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), NetError> {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let kb = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: Some(ed25519_dalek::pkcs8::PublicKeyBytes(crypto::public_key(key))),
    };
    let der = kb.to_pkcs8_der().map_err(|e| NetError::Identity(e.to_string()))?.as_bytes().to_vec();
    let pkcs8 = PrivatePkcs8KeyDer::from(der.clone());
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| NetError::Identity(e.to_string()))?;
    let params =
        rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(|e| NetError::Identity(e.to_string()))?;
    let cert = params.self_signed(&kp).map_err(|e| NetError::Identity(e.to_string()))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))))
}

fn endpoint(cfg: &NetConfig, allowed: Arc<HashMap<PublicKey, u32>>) -> Result<quinn::Endpoint, NetError> {
    let e = |x: &dyn std::fmt::Display| NetError::Endpoint(x.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PeerVerifier { allowed, algs: provider.signature_verification_algorithms });
    let (cert, key) = identity(&cfg.key)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|x| e(&x))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .map_err(|x| e(&x))?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|x| e(&x))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .map_err(|x| e(&x))?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(|x| e(&x))?;
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(|x| e(&x))?;
    let mut transport = quinn::TransportConfig::default();
    // A silent peer is given up after 10 s (keep-alives every second), so
    // its queue reconnects rather than writing into a dead connection.
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("in range")));
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(4u32.into());
    // Flow-control windows sized for megabyte proposals: quinn's defaults
    // (1.25 MB per stream) are tuned for 100 ms WAN paths; here a window of
    // proposals is in flight on one stream and the sender stalled on
    // STREAM_DATA_BLOCKED hundreds of times a second. Memory stays bounded
    // by the incoming queue's byte limit, which the receiver drains into.
    transport.stream_receive_window(STREAM_WINDOW_BYTES.into());
    transport.receive_window((2 * STREAM_WINDOW_BYTES).into());
    transport.send_window(2 * STREAM_WINDOW_BYTES as u64);
    let transport = Arc::new(transport);
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server));
    server_cfg.transport_config(transport.clone());
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(client));
    client_cfg.transport_config(transport);
    let socket = cfg.socket.try_clone().map_err(|x| e(&x))?;
    socket.set_nonblocking(true).map_err(|x| e(&x))?;
    size_socket_buffers(&socket, SOCKET_BUFFER_BYTES);
    // The stateless-reset key is derived from the validator key, so after a
    // restart this node's endpoint resets peers' old connections at once (a
    // random key would leave them waiting for the idle timeout).
    let mut seed = b"cybermesh quic stateless reset v1".to_vec();
    seed.extend_from_slice(&cfg.key.to_bytes());
    let secret = crate::sha256(&seed);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let mut ep_cfg = quinn::EndpointConfig::new(Arc::new(reset_key));
    // Connection IDs carry a keyed check; with a per-process random key a
    // restarted endpoint would drop the old connections' packets as foreign
    // instead of answering them with the reset.
    let cid_key = u64::from_le_bytes(secret[..8].try_into().expect("8 bytes"));
    ep_cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    let mut ep =
        quinn::Endpoint::new(ep_cfg, Some(server_cfg), socket, Arc::new(quinn::TokioRuntime)).map_err(|x| e(&x))?;
    ep.set_default_client_config(client_cfg);
    Ok(ep)
}

/// One peer's outgoing queue and the bytes waiting in it.
type PeerQueue = (mpsc::Sender<Arc<Vec<u8>>>, Arc<std::sync::atomic::AtomicUsize>);

/// The sending half of a transport: cheap to clone, usable from any
/// thread (the persistence thread sends what waited for a sync).
#[derive(Clone)]
pub struct NetSender {
    /// Per peer: its queue and the bytes waiting in it (bounded by
    /// `max_queued_bytes`, so a dead peer's backlog cannot grow without end).
    out: Arc<HashMap<u32, PeerQueue>>,
    max_out_bytes: usize,
    stats: Arc<NetStats>,
}

impl NetSender {
    /// Queues `bytes` for `to`; false if it was dropped (unknown peer,
    /// full queue, or the transport stopped).
    pub fn send(&self, to: u32, bytes: Arc<Vec<u8>>) -> bool {
        let n = bytes.len();
        let ok = self.out.get(&to).is_some_and(|(q, queued)| {
            if queued.fetch_add(n, Ordering::SeqCst) + n > self.max_out_bytes || q.try_send(bytes).is_err() {
                queued.fetch_sub(n, Ordering::SeqCst);
                return false;
            }
            true
        });
        let c = if ok { &self.stats.sent } else { &self.stats.dropped_out };
        c.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        ok
    }

    pub fn broadcast(&self, bytes: Arc<Vec<u8>>) {
        for id in self.out.keys() {
            self.send(*id, bytes.clone());
        }
    }
}

/// A running transport. Dropping it stops the network thread.
pub struct Net {
    out: NetSender,
    book: AddressBook,
    /// The UDP address QUIC listens on.
    pub local_addr: SocketAddr,
    incoming: std::sync::mpsc::Receiver<(u32, Vec<u8>)>,
    pub events: std::sync::mpsc::Receiver<NetEvent>,
    pub stats: Arc<NetStats>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Net {
    pub fn start(cfg: NetConfig) -> Result<Net, NetError> {
        let mut allowed: HashMap<PublicKey, u32> = cfg.peers.iter().map(|p| (p.key, p.id)).collect();
        allowed.insert(crypto::public_key(&cfg.key), cfg.me);
        let allowed = Arc::new(allowed);
        let (in_tx, incoming) = std::sync::mpsc::sync_channel(cfg.queue);
        let (ev_tx, events) = std::sync::mpsc::channel();
        let stats = Arc::new(NetStats::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let mut out = HashMap::new();
        let mut queues = vec![];
        let mut book = HashMap::new();
        for p in &cfg.peers {
            let (tx, rx) = mpsc::channel(cfg.queue);
            let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            out.insert(p.id, (tx, bytes.clone()));
            let (addr_tx, addr_rx) = tokio::sync::watch::channel(p.addr);
            book.insert(p.id, addr_tx);
            queues.push((p.clone(), rx, bytes, addr_rx));
        }
        let book = AddressBook(Arc::new(book));
        let local_addr = cfg.socket.local_addr().map_err(|e| NetError::Endpoint(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::Endpoint(e.to_string()))?;
        let ep = {
            let _guard = rt.enter();
            endpoint(&cfg, allowed.clone())?
        };
        let st = stats.clone();
        let max_frame = cfg.max_frame;
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let queued_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = Arc::new(Gate {
            allowed_ips: cfg.allowed_ips.clone(),
            wake: cfg.wake.clone(),
            queued: queued.clone(),
            queued_bytes: queued_bytes.clone(),
            max_queued_bytes: cfg.max_queued_bytes.max(cfg.max_frame),
        });
        let thread = std::thread::Builder::new()
            .name("net".into())
            .spawn(move || {
                rt.block_on(async move {
                    for (peer, rx, bytes, addr) in queues {
                        tokio::spawn(send_loop(ep.clone(), peer, addr, rx, bytes, ev_tx.clone(), st.clone()));
                    }
                    let acceptor = tokio::spawn(accept_loop(ep.clone(), allowed, gate, in_tx, ev_tx, st, max_frame));
                    let _ = stop_rx.await;
                    acceptor.abort();
                    ep.close(0u32.into(), b"shutdown");
                    // Let peers see the close, but never hang on a dead one.
                    let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
                })
            })
            .map_err(|e| NetError::Endpoint(e.to_string()))?;
        let max_out_bytes = cfg.max_queued_bytes.max(cfg.max_frame);
        Ok(Net {
            out: NetSender { out: Arc::new(out), max_out_bytes, stats: stats.clone() },
            book,
            local_addr,
            incoming,
            events,
            stats,
            queued,
            queued_bytes,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Where each peer is reached (mDNS discovery updates it).
    pub fn address_book(&self) -> AddressBook {
        self.book.clone()
    }

    /// Queues `bytes` for `to`; false if it was dropped (unknown peer or full queue).
    pub fn send(&self, to: u32, bytes: Arc<Vec<u8>>) -> bool {
        self.out.send(to, bytes)
    }

    /// A sending handle for another thread.
    pub fn sender(&self) -> NetSender {
        self.out.clone()
    }

    /// Whether messages wait in `incoming` (counted by `take_incoming`).
    pub fn has_incoming(&self) -> bool {
        self.queued.load(Ordering::SeqCst) > 0
    }

    /// The next incoming message, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<(u32, Vec<u8>)> {
        let m = self.incoming.recv_timeout(timeout).ok()?;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.queued_bytes.fetch_sub(m.1.len(), Ordering::SeqCst);
        Some(m)
    }

    /// Up to `max` queued incoming messages, without waiting.
    pub fn take_incoming(&self, max: usize) -> Vec<(u32, Vec<u8>)> {
        let v: Vec<_> = self.incoming.try_iter().take(max).collect();
        self.queued.fetch_sub(v.len(), Ordering::SeqCst);
        self.queued_bytes.fetch_sub(v.iter().map(|(_, b)| b.len()).sum(), Ordering::SeqCst);
        v
    }

    pub fn broadcast(&self, bytes: Arc<Vec<u8>>) {
        self.out.broadcast(bytes)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per-stream QUIC flow-control window (bytes a peer may send ahead of
/// this node reading them).
const STREAM_WINDOW_BYTES: u32 = 32 << 20;

/// UDP buffer each way. A proposal is up to a few MB in ~1,200-byte
/// datagrams; Linux's default 208 KB receive buffer overflows while the net
/// thread waits for a core, and every datagram lost there is a QUIC loss
/// that halves the congestion window (measured: 4.4% of datagrams dropped,
/// commits stalling in bursts, the machine 28% idle at full load).
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Sizes the socket's kernel buffers: past `net.core.rmem_max`/`wmem_max`
/// when allowed (root/CAP_NET_ADMIN, `SO_*BUFFORCE`), else up to those
/// limits, with a warning naming the sysctl to raise. Returns the receive
/// and send sizes the kernel reports (it doubles the request for its own
/// bookkeeping).
pub fn size_socket_buffers(socket: &std::net::UdpSocket, want: usize) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let sock = socket2::SockRef::from(socket);
    let force = |opt: libc::c_int| {
        let v = want.min(i32::MAX as usize) as libc::c_int;
        // SAFETY: a valid fd owned by `socket`, an int option of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !force(libc::SO_RCVBUFFORCE) {
        let _ = sock.set_recv_buffer_size(want);
    }
    if !force(libc::SO_SNDBUFFORCE) {
        let _ = sock.set_send_buffer_size(want);
    }
    let rcv = sock.recv_buffer_size().unwrap_or(0);
    let snd = sock.send_buffer_size().unwrap_or(0);
    if rcv < want {
        tracing::warn!(
            have = rcv,
            want,
            "QUIC UDP receive buffer below its target: datagrams may be dropped under load; raise net.core.rmem_max (tuning/sysctl.sh)"
        );
    }
    (rcv, snd)
}

fn peer_id(conn: &quinn::Connection, allowed: &HashMap<PublicKey, u32>) -> Option<u32> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    allowed.get(&ed25519_key_of(certs.first()?)?).copied()
}

async fn send_loop(
    ep: quinn::Endpoint,
    peer: Peer,
    mut addr_rx: tokio::sync::watch::Receiver<Option<SocketAddr>>,
    mut rx: mpsc::Receiver<Arc<Vec<u8>>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    ev: std::sync::mpsc::Sender<NetEvent>,
    stats: Arc<NetStats>,
) {
    let mut backoff = Duration::from_millis(20);
    'reconnect: loop {
        // The newest address (none yet: wait until discovery finds one).
        let addr = loop {
            if let Some(a) = *addr_rx.borrow_and_update() {
                break a;
            }
            if addr_rx.changed().await.is_err() {
                return;
            }
        };
        let conn = match ep.connect(addr, SERVER_NAME) {
            Ok(c) => c.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let conn = match conn {
            Ok(c) if peer_id(&c, &HashMap::from([(peer.key, peer.id)])) == Some(peer.id) => c,
            Ok(c) => {
                c.close(1u32.into(), b"unexpected key");
                let _ = ev.send(NetEvent::Failed { addr, reason: "peer presented another validator's key".into() });
                // A new address (from discovery) is tried at once.
                let _ = tokio::time::timeout(backoff, addr_rx.changed()).await;
                continue;
            }
            Err(e) => {
                let _ = ev.send(NetEvent::Failed { addr, reason: e });
                let _ = tokio::time::timeout(backoff, addr_rx.changed()).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        let _ = ev.send(NetEvent::Connected { peer: peer.id, outgoing: true });
        let Ok(mut stream) = conn.open_uni().await else { continue };
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = conn.closed() => continue 'reconnect,
            };
            queued.fetch_sub(msg.len(), Ordering::SeqCst);
            let len = (msg.len() as u32).to_be_bytes();
            if stream.write_all(&len).await.is_err() || stream.write_all(&msg).await.is_err() {
                stats.dropped_out.fetch_add(1, Ordering::Relaxed);
                continue 'reconnect;
            }
        }
    }
}

/// Who may connect, and whom to wake.
struct Gate {
    allowed_ips: Vec<ipnet::IpNet>,
    wake: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Messages queued in `incoming` (for `Net::has_incoming`), and their bytes.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
    max_queued_bytes: usize,
}

impl Gate {
    /// Room for `n` more queued bytes (taken if so).
    fn reserve(&self, n: usize) -> bool {
        if self.queued_bytes.fetch_add(n, Ordering::SeqCst) + n > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(n, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn admits(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.allowed_ips.is_empty() || self.allowed_ips.iter().any(|n| n.contains(&ip))
    }
}

async fn accept_loop(
    ep: quinn::Endpoint,
    allowed: Arc<HashMap<PublicKey, u32>>,
    gate: Arc<Gate>,
    in_tx: std::sync::mpsc::SyncSender<(u32, Vec<u8>)>,
    ev: std::sync::mpsc::Sender<NetEvent>,
    stats: Arc<NetStats>,
    max_frame: usize,
) {
    while let Some(incoming) = ep.accept().await {
        let (allowed, in_tx, ev, stats, gate) =
            (allowed.clone(), in_tx.clone(), ev.clone(), stats.clone(), gate.clone());
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            if !gate.admits(addr) {
                incoming.refuse();
                let _ = ev.send(NetEvent::Failed { addr, reason: "address not in ALLOWED_IPS".into() });
                return;
            }
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ev.send(NetEvent::Failed { addr, reason: e.to_string() });
                    return;
                }
            };
            let Some(peer) = peer_id(&conn, &allowed) else {
                conn.close(1u32.into(), b"unknown key");
                return;
            };
            let _ = ev.send(NetEvent::Connected { peer, outgoing: false });
            while let Ok(mut stream) = conn.accept_uni().await {
                loop {
                    let mut len = [0u8; 4];
                    if stream.read_exact(&mut len).await.is_err() {
                        break;
                    }
                    let len = u32::from_be_bytes(len) as usize;
                    if len > max_frame {
                        let _ = ev.send(NetEvent::Oversized { peer, len });
                        conn.close(2u32.into(), b"frame too large");
                        return;
                    }
                    let mut buf = vec![0u8; len];
                    if stream.read_exact(&mut buf).await.is_err() {
                        break;
                    }
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_received.fetch_add(len as u64, Ordering::Relaxed);
                    // Bounded in bytes as well as messages: a flooding peer
                    // loses its messages (consensus retransmits), the node
                    // keeps its memory.
                    let n = buf.len();
                    if !gate.reserve(n) {
                        stats.dropped_in.fetch_add(1, Ordering::Relaxed);
                    } else if in_tx.try_send((peer, buf)).is_err() {
                        gate.queued_bytes.fetch_sub(n, Ordering::SeqCst);
                        stats.dropped_in.fetch_add(1, Ordering::Relaxed);
                    } else {
                        gate.queued.fetch_add(1, Ordering::SeqCst);
                        if let Some(w) = &gate.wake {
                            w();
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn socket_buffers_are_raised_past_the_kernel_default() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = socket2::SockRef::from(&sock).recv_buffer_size().unwrap();
        let want = 4 * default.max(1 << 20);
        let (rcv, snd) = size_socket_buffers(&sock, want);
        // Root may pass net.core.*mem_max; anyone else gets up to it.
        let cap = |f: &str| std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse::<usize>().ok());
        let root = unsafe { libc::geteuid() } == 0;
        let floor = |max: Option<usize>| if root { want } else { want.min(max.unwrap_or(0)) };
        assert!(rcv >= floor(cap("/proc/sys/net/core/rmem_max")), "receive buffer {rcv} < wanted {want}");
        assert!(snd >= floor(cap("/proc/sys/net/core/wmem_max")), "send buffer {snd} < wanted {want}");
        assert!(rcv > default || !root, "receive buffer not raised above the default {default}");
    }

    fn cfg(me: u32, key: SigningKey, socket: std::net::UdpSocket, peers: Vec<Peer>) -> NetConfig {
        NetConfig {
            me,
            key,
            socket,
            peers,
            max_frame: 1 << 20,
            max_queued_bytes: 4 << 20,
            queue: 1024,
            allowed_ips: vec![],
            wake: None,
        }
    }

    fn node(me: u32, key: SigningKey, socket: std::net::UdpSocket, peers: Vec<Peer>) -> Net {
        Net::start(cfg(me, key, socket, peers)).unwrap()
    }

    fn sockets(n: usize) -> (Vec<std::net::UdpSocket>, Vec<SocketAddr>) {
        let s: Vec<_> = (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let a = s.iter().map(|s| s.local_addr().unwrap()).collect();
        (s, a)
    }

    /// Receives until `want` messages arrived (bounded: fails rather than hangs).
    fn recv_n(net: &Net, want: usize) -> Vec<(u32, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = vec![];
        while got.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            got.push(net.recv_timeout(left).expect("messages arrive within 30 s"));
        }
        got
    }

    #[test]
    fn three_validators_exchange_authenticated_messages() {
        let keys: Vec<SigningKey> = (0..3).map(|_| crypto::generate_key()).collect();
        let (socks, addrs) = sockets(3);
        let peers = |me: usize| -> Vec<Peer> {
            (0..3)
                .filter(|&i| i != me)
                .map(|i| Peer { id: i as u32 + 1, addr: Some(addrs[i]), key: crypto::public_key(&keys[i]) })
                .collect()
        };
        let nets: Vec<Net> =
            socks.into_iter().enumerate().map(|(i, s)| node(i as u32 + 1, keys[i].clone(), s, peers(i))).collect();
        // Messages queued before the connection is up are delivered once it is.
        for (i, n) in nets.iter().enumerate() {
            for j in 0..3u32 {
                if j as usize != i {
                    assert!(n.send(j + 1, Arc::new(format!("{}->{}", i + 1, j + 1).into_bytes())));
                }
            }
        }
        for (i, n) in nets.iter().enumerate() {
            let mut got: Vec<(u32, String)> =
                recv_n(n, 2).into_iter().map(|(f, b)| (f, String::from_utf8(b).unwrap())).collect();
            got.sort();
            let want: Vec<(u32, String)> =
                (0..3u32).filter(|&j| j as usize != i).map(|j| (j + 1, format!("{}->{}", j + 1, i + 1))).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_peer_without_an_address_is_reached_once_its_address_is_set() {
        let (k1, k2) = (crypto::generate_key(), crypto::generate_key());
        let (mut socks, addrs) = sockets(2);
        let n2 =
            node(2, k2.clone(), socks.pop().unwrap(), vec![Peer { id: 1, addr: None, key: crypto::public_key(&k1) }]);
        let n1 = node(1, k1, socks.pop().unwrap(), vec![Peer { id: 2, addr: None, key: crypto::public_key(&k2) }]);
        // Queued while no address is known; nothing is tried meanwhile.
        assert!(n1.send(2, Arc::new(b"hello".to_vec())));
        assert!(n1.events.recv_timeout(Duration::from_millis(300)).is_err(), "no attempt without an address");
        let book = n1.address_book();
        assert!(!book.set(9, addrs[1]), "not a peer");
        assert!(book.set(2, addrs[1]));
        assert!(!book.set(2, addrs[1]), "unchanged");
        assert_eq!(book.get(2), Some(addrs[1]));
        assert_eq!(recv_n(&n2, 1), vec![(1, b"hello".to_vec())]);
    }

    #[test]
    fn unknown_key_is_refused_and_oversized_frames_close_the_connection() {
        let (k1, k2, stranger) = (crypto::generate_key(), crypto::generate_key(), crypto::generate_key());
        let (socks, addrs) = sockets(3);
        let mut socks = socks.into_iter();
        let p = |id: u32, i: usize, k: &SigningKey| Peer { id, addr: Some(addrs[i]), key: crypto::public_key(k) };
        let a = Net::start(NetConfig {
            max_frame: 64,
            queue: 16,
            ..cfg(1, k1.clone(), socks.next().unwrap(), vec![p(2, 1, &k2)])
        })
        .unwrap();
        let b = node(2, k2.clone(), socks.next().unwrap(), vec![p(1, 0, &k1)]);
        // The stranger knows node 1's key, but node 1 does not know it.
        let s = node(9, stranger, socks.next().unwrap(), vec![p(1, 0, &k1)]);
        s.send(1, Arc::new(b"let me in".to_vec()));
        // (In TLS 1.3 the client finishes its side of the handshake before the
        // server checks its certificate, so the refusal shows on node 1.)
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match a
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("a refusal within 30 s")
            {
                NetEvent::Failed { addr, reason } if addr == addrs[2] => {
                    assert!(reason.contains("not a configured validator"), "{reason}");
                    break;
                }
                NetEvent::Connected { outgoing: false, peer } => assert_eq!(peer, 2, "only validator 2 may connect in"),
                _ => {}
            }
        }
        // A frame over node 1's limit closes that connection; node 1 keeps serving.
        b.send(1, Arc::new(vec![0u8; 1000]));
        loop {
            let e = a.events.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("oversized seen");
            assert!(!matches!(e, NetEvent::Connected { outgoing: false, peer: 9 }));
            if e == (NetEvent::Oversized { peer: 2, len: 1000 }) {
                break;
            }
        }
        // The sender reconnects; like consensus, it resends until delivered
        // (a message written just as the connection closed is lost).
        let got = loop {
            assert!(Instant::now() < deadline, "small frame never arrived");
            b.send(1, Arc::new(b"small".to_vec()));
            if let Some((2, m)) = a.recv_timeout(Duration::from_millis(200)) {
                break m;
            }
        };
        assert_eq!(got, b"small");
        assert!(a.take_incoming(usize::MAX).iter().all(|(from, _)| *from == 2), "nothing from the stranger");
    }

    #[test]
    fn address_outside_allowed_ips_is_refused_before_the_handshake() {
        let (k1, k2) = (crypto::generate_key(), crypto::generate_key());
        let (socks, addrs) = sockets(2);
        let mut socks = socks.into_iter();
        let p = |id: u32, i: usize, k: &SigningKey| Peer { id, addr: Some(addrs[i]), key: crypto::public_key(k) };
        // Validator 2 has a configured key but connects from 127.0.0.1,
        // outside node 1's allowlist.
        let a = Net::start(NetConfig {
            queue: 16,
            allowed_ips: vec!["10.9.0.0/16".parse().unwrap()],
            ..cfg(1, k1.clone(), socks.next().unwrap(), vec![p(2, 1, &k2)])
        })
        .unwrap();
        let b = node(2, k2, socks.next().unwrap(), vec![p(1, 0, &k1)]);
        b.send(1, Arc::new(b"hello".to_vec()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // (Node 1's own outgoing connection to 2 is allowed: the list
            // filters who may connect in.)
            match a.events.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("refusal in 30 s") {
                NetEvent::Failed { addr, reason } if addr == addrs[1] => {
                    assert_eq!(reason, "address not in ALLOWED_IPS");
                    break;
                }
                NetEvent::Connected { outgoing: false, .. } => panic!("an incoming connection was accepted"),
                _ => {}
            }
        }
        assert!(a.take_incoming(1).is_empty(), "nothing delivered");
        let gate = Gate {
            allowed_ips: vec!["127.0.0.0/8".parse().unwrap()],
            wake: None,
            queued: Default::default(),
            queued_bytes: Default::default(),
            max_queued_bytes: 100,
        };
        assert!(gate.admits(addrs[1]));
        assert!(gate.admits("[::ffff:127.0.0.1]:5".parse().unwrap()), "v4-mapped addresses match v4 nets");
        // The incoming queue is bounded in bytes.
        assert!(gate.reserve(60) && gate.reserve(40));
        assert!(!gate.reserve(1), "budget spent");
        gate.queued_bytes.fetch_sub(50, Ordering::SeqCst); // the consumer took some
        assert!(gate.reserve(50) && !gate.reserve(1));
    }

    #[test]
    fn a_dead_peers_queue_is_bounded_in_bytes() {
        let (k1, k2) = (crypto::generate_key(), crypto::generate_key());
        let (mut socks, addrs) = sockets(2);
        let dead = Peer { id: 2, addr: Some(addrs[1]), key: crypto::public_key(&k2) };
        drop(socks.pop()); // nobody listens for validator 2
        let a = Net::start(NetConfig {
            max_frame: 100,
            max_queued_bytes: 400,
            ..cfg(1, k1, socks.pop().unwrap(), vec![dead])
        })
        .unwrap();
        // Four frames' worth may wait; the fifth is dropped and counted.
        for i in 0..4 {
            assert!(a.send(2, Arc::new(vec![i; 100])), "frame {i} queued");
        }
        assert!(!a.send(2, Arc::new(vec![9; 100])));
        assert_eq!(a.stats.dropped_out.load(Ordering::Relaxed), 1);
    }
}
