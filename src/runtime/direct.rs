//! The direct source on one thread, whatever the number of clients: a tokio
//! current-thread runtime accepts connections (at most
//! [`MAX_DIRECT_CONNECTIONS`]), splits each one's bytes into frames, routes
//! the decoded events to the verify shards in batches, and writes each
//! connection's commit notices. (It used to cost two threads per
//! connection: a reader blocked in `read` and a writer blocked on its queue.)
//!
//! Backpressure is the same as before: a connection whose shard ring is
//! full stops being read until the ring has room, so the client's TCP
//! window closes; other connections go on.
//!
//! This is the `runtime.executor = "threads"` path; with `glommio` each
//! verify shard's executor accepts and reads its own share of the
//! connections ([`super::executor`]), through the same [`read_events`].

use super::{mono_ms, send_reject, Shared};
use crate::edges::direct::{decode_frame, split_frame, Split};
use crate::protocol::reject::RejectReason;
use crate::protocol::verify::{shard_of, Incoming};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};

/// Most direct-source connections open at once; one more is closed at once.
pub const MAX_DIRECT_CONNECTIONS: usize = 256;
/// Commit notices queued per connection; a client that falls further
/// behind is dropped from the notices (its connection stays open).
const COMMIT_QUEUE_FRAMES: usize = 4096;
/// Bytes read from a connection at a time (a buffer holds at most one
/// unfinished frame besides).
pub(super) const READ_CHUNK_BYTES: usize = 256 * 1024;
/// How often the acceptor looks at the stop flag.
pub(super) const STOP_POLL_MS: u64 = 50;
/// How long a reader whose shard ring is full waits before trying again.
const RING_FULL_RETRY_MS: u64 = 1;
/// How long the acceptor waits after a failed accept (out of descriptors
/// repeats at once).
pub(super) const ACCEPT_RETRY_MS: u64 = 100;

/// Each direct connection's commit-notice queue, by connection id.
pub(super) type CommitSubscribers = std::sync::Mutex<Vec<(u64, mpsc::Sender<Arc<Vec<u8>>>)>>;

/// Runs the direct source until `sh.stop`; then every connection hands on
/// its partial batches and closes.
pub(super) fn serve(listener: std::net::TcpListener, sh: Arc<Shared>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build();
    let started = rt.and_then(|rt| {
        listener.set_nonblocking(true)?;
        Ok((rt.block_on(async { tokio::net::TcpListener::from_std(listener) })?, rt))
    });
    match started {
        Ok((listener, rt)) => rt.block_on(accept_loop(listener, sh)),
        Err(e) => {
            tracing::error!(error = %e, "direct source: could not start its event loop; stopping");
            sh.stop.store(true, Ordering::SeqCst);
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, sh: Arc<Shared>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut stop_poll = tokio::time::interval(Duration::from_millis(STOP_POLL_MS));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                while conns.try_join_next().is_some() {}
                match accepted {
                    Ok((stream, addr)) => {
                        let peer = addr.to_string();
                        let Some(slot) = OpenConnection::take(&sh, &peer) else {
                            continue; // dropped: closed
                        };
                        let _ = stream.set_nodelay(true);
                        let origin: Arc<str> = format!("direct:{peer}").into();
                        conns.spawn(connection(stream, slot, origin, stop_rx.clone()));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "direct source: accept failed");
                        tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                    }
                }
            }
            _ = stop_poll.tick() => {
                while conns.try_join_next().is_some() {}
                if sh.stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// One client: its events in, its commit notices out. Ends when the client
/// closes (or breaks the framing) or at shutdown; a failed or dropped
/// notice queue ends only the notices.
async fn connection(
    stream: tokio::net::TcpStream,
    slot: OpenConnection,
    origin: Arc<str>,
    stop: watch::Receiver<bool>,
) {
    let (rd, wr) = stream.into_split();
    let rx = slot.subscribe();
    let mut rd = TokioConn { rd, stop };
    let reader = read_events(&mut rd, &origin, &slot.sh);
    let writer = write_commits(tokio::io::BufWriter::new(wr), rx);
    tokio::pin!(reader, writer);
    tokio::select! {
        _ = &mut reader => {}
        _ = &mut writer => reader.await,
    }
}

/// One of the [`MAX_DIRECT_CONNECTIONS`] slots, held by a connection for
/// its life (with its commit subscription, dropped with it);
/// `ingest_direct_connections` counts them over every shard.
pub(super) struct OpenConnection {
    pub(super) sh: Arc<Shared>,
    id: u64,
}

impl OpenConnection {
    /// A slot for a new connection from `peer`, or `None` (with a warning)
    /// when every slot is taken.
    pub(super) fn take(sh: &Arc<Shared>, peer: &str) -> Option<OpenConnection> {
        let open = &sh.stats.direct_connections;
        let before = open.fetch_add(1, Ordering::SeqCst);
        if before >= MAX_DIRECT_CONNECTIONS as u64 {
            open.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(peer, max = MAX_DIRECT_CONNECTIONS, "direct source: too many connections; closing this one");
            return None;
        }
        let id = sh.connection_ids.fetch_add(1, Ordering::Relaxed) + 1;
        // Each opening logs a distinct count: tests wait for the cap's.
        tracing::debug!(peer, open = before + 1, "direct source: connection opened");
        Some(OpenConnection { sh: sh.clone(), id })
    }

    /// The connection's commit notices (at most [`COMMIT_QUEUE_FRAMES`]
    /// queued; a client further behind is dropped from them).
    pub(super) fn subscribe(&self) -> mpsc::Receiver<Arc<Vec<u8>>> {
        let (tx, rx) = mpsc::channel(COMMIT_QUEUE_FRAMES);
        self.sh.subscribers.lock().unwrap().push((self.id, tx));
        rx
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.sh.subscribers.lock().unwrap().retain(|(c, _)| *c != self.id);
        self.sh.stats.direct_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What [`read_events`] needs of a connection, whichever event loop runs it.
pub(super) trait ReadConn {
    /// Appends the next bytes to `buf`: false at the end of the stream, on
    /// an error, or at shutdown.
    async fn read_more(&mut self, buf: &mut Vec<u8>) -> bool;
    /// Waits `ms` without holding the thread.
    async fn pause_ms(&mut self, ms: u64);
}

struct TokioConn {
    rd: OwnedReadHalf,
    stop: watch::Receiver<bool>,
}

impl ReadConn for TokioConn {
    async fn read_more(&mut self, buf: &mut Vec<u8>) -> bool {
        buf.reserve(READ_CHUNK_BYTES);
        tokio::select! {
            read = self.rd.read_buf(buf) => matches!(read, Ok(n) if n > 0),
            _ = self.stop.changed() => false,
        }
    }

    async fn pause_ms(&mut self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await
    }
}

/// Frames → decoded events → per-shard batches, handed on when full or
/// when nothing more is buffered.
pub(super) async fn read_events(rd: &mut impl ReadConn, origin: &Arc<str>, sh: &Shared) {
    let n = sh.shard_in.len();
    let max_len = sh.limits.max_event_bytes + 1;
    let mut batches: Vec<Vec<Incoming>> = (0..n).map(|_| Vec::with_capacity(sh.batch)).collect();
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    'conn: loop {
        let mut at = 0;
        loop {
            match split_frame(&buf[at..], max_len) {
                Split::Frame { len } => {
                    sh.stats.received.fetch_add(1, Ordering::Relaxed);
                    let body = &buf[at + 4..at + 4 + len];
                    at += 4 + len;
                    match decode_frame(body, &sh.limits) {
                        Ok(event) => {
                            let i = shard_of(&event.nonce, n);
                            batches[i].push(Incoming {
                                event,
                                origin: origin.clone(),
                                pos: None,
                                received_ms: mono_ms(),
                            });
                            if batches[i].len() >= sh.batch && !hand_on(rd, sh, &mut batches, i).await {
                                return;
                            }
                        }
                        Err((reason, detail, original)) => send_reject(sh, reason, detail, origin, original),
                    }
                }
                Split::Oversized { len } => {
                    sh.stats.received.fetch_add(1, Ordering::Relaxed);
                    let detail = format!("frame of {len} bytes exceeds {max_len}; connection closed");
                    send_reject(sh, RejectReason::Oversized, detail, origin, &[]);
                    break 'conn;
                }
                Split::Incomplete => break,
            }
        }
        // Nothing more buffered: hand partial batches on rather than wait.
        for i in 0..n {
            if !batches[i].is_empty() && !hand_on(rd, sh, &mut batches, i).await {
                return;
            }
        }
        buf.drain(..at);
        if !rd.read_more(&mut buf).await {
            break;
        }
    }
    for (ring, batch) in sh.shard_in.iter().zip(batches) {
        if !batch.is_empty() {
            let _ = ring.try_push(batch);
        }
    }
}

/// Pushes shard `i`'s batch, waiting (without holding the thread) while
/// its ring is full. False once the validator stops.
async fn hand_on(rd: &mut impl ReadConn, sh: &Shared, batches: &mut [Vec<Incoming>], i: usize) -> bool {
    let mut batch = std::mem::replace(&mut batches[i], Vec::with_capacity(sh.batch));
    loop {
        match sh.shard_in[i].try_push(batch) {
            Ok(()) => return true,
            Err(back) if !stopped(&sh.stop) => {
                batch = back;
                rd.pause_ms(RING_FULL_RETRY_MS).await;
            }
            Err(_) => return false,
        }
    }
}

fn stopped(stop: &AtomicBool) -> bool {
    stop.load(Ordering::Relaxed)
}

/// What [`write_commits`] needs of a connection, whichever event loop runs it.
pub(super) trait WriteConn {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()>;
    async fn flush(&mut self) -> std::io::Result<()>;
}

impl WriteConn for tokio::io::BufWriter<OwnedWriteHalf> {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        AsyncWriteExt::write_all(self, buf).await
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        AsyncWriteExt::flush(self).await
    }
}

/// Commit notices, written as they come (flushed once the queue is empty).
pub(super) async fn write_commits(mut w: impl WriteConn, mut rx: mpsc::Receiver<Arc<Vec<u8>>>) {
    while let Some(frame) = rx.recv().await {
        if w.write_all(&frame).await.is_err() {
            return;
        }
        while let Ok(f) = rx.try_recv() {
            if w.write_all(&f).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}
