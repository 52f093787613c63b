//! Verify shards as glommio executors (`RUNTIME_EXECUTOR=glommio`, the
//! default): thread-per-core.
//!
//! ```text
//! verify shard i = one thread, one glommio LocalExecutor (pinned to
//! runtime.verify_cores[i] when RUNTIME_PIN_CORES), running:
//!   acceptor   its own SO_REUSEPORT listener on DIRECT_LISTEN_ADDR: the
//!              kernel spreads new connections over the shards
//!   connection × its share: io_uring reads → frames → decode → per-shard
//!              batches → Ring<Vec<Incoming>> of the nonce's shard (most
//!              stay on this core) · commit notices written back
//!   verifier   its Ring<Vec<Incoming>> (also fed by Kafka's threads) →
//!              checks → batched Ed25519 → Ring<Vec<VerifiedTx>> → core
//! ```
//! No reader thread hands bytes over to the shard, and a connection costs a
//! task, not a thread. The rings and the core thread are the same as with
//! `threads`; a task waiting on a ring is woken by the pusher's doorbell
//! through glommio's cross-thread wakers ([`Doorbell::rung`]).
//!
//! Idle: the executor sleeps in io_uring when it has nothing to do
//! (`RUNTIME_SPIN_BEFORE_PARK`, 0 by default, so several validators share
//! cores). Memory: each executor registers `RUNTIME_IO_MEMORY_BYTES` with
//! io_uring, which counts against the memlock limit; [`start`] names the
//! limit and the fixes when an executor cannot start.

use super::direct::{
    read_events, write_commits, OpenConnection, ReadConn, WriteConn, ACCEPT_RETRY_MS, READ_CHUNK_BYTES, STOP_POLL_MS,
};
use super::ring::{Doorbell, IdlePolicy, Ring};
use super::{set_nice, take_batch, verify_batch, Shared};
use crate::protocol::mempool::VerifiedTx;
use crate::protocol::verify::{Incoming, Verifier};
use crate::runtime::config::Config;
use anyhow::Context as _;
use futures_lite::future::or;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::cell::Cell;
use std::os::fd::IntoRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long an idle verifier sleeps before it looks at the stop flag again
/// (a push wakes it at once).
const IDLE_RECHECK_MS: u64 = 100;
/// How long a verifier whose output ring is full waits before trying again.
const OUTPUT_FULL_RETRY_MS: u64 = 1;
/// `RUNTIME_SPIN_BEFORE_PARK` when `RUNTIME_IDLE=spin` leaves it at 0.
const SPIN_DEFAULT: Duration = Duration::from_millis(100);

/// `n` listening sockets on `addr`, all with `SO_REUSEPORT` (the first
/// picks the port when `addr`'s is 0; the others take the same).
pub(super) fn bind_listeners(addr: &str, n: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut at: std::net::SocketAddr =
        addr.parse().with_context(|| format!("DIRECT_LISTEN_ADDR {addr:?} is not host:port"))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let sk = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        sk.set_reuse_port(true)?;
        sk.set_reuse_address(true)?;
        sk.bind(&at.into()).with_context(|| format!("binding the direct source on {at} (DIRECT_LISTEN_ADDR)"))?;
        sk.listen(1024)?;
        let l: std::net::TcpListener = sk.into();
        at = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// What [`start`] needs of the runtime, per shard.
pub(super) struct ShardIo {
    pub input: Arc<Ring<Vec<Incoming>>>,
    pub output: Arc<Ring<Vec<VerifiedTx>>>,
    pub bell: Arc<Doorbell>,
    pub verifier: Verifier,
    pub listener: std::net::TcpListener,
}

/// Starts one executor per shard; returns once every one runs, or the
/// first one's failure to start (the others are stopped).
pub(super) fn start(
    c: &Config,
    shards: Vec<ShardIo>,
    sh: &Arc<Shared>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), (usize, String)>>();
    let n = shards.len();
    let mut threads = vec![];
    for (i, io) in shards.into_iter().enumerate() {
        let core = c.runtime.pin_cores.then(|| c.runtime.verify_cores.get(i).copied()).flatten();
        let placement = match core {
            Some(core) => glommio::Placement::Fixed(core),
            None => glommio::Placement::Unbound,
        };
        let spin = match (c.runtime.spin_before_park, c.runtime.idle) {
            (d, IdlePolicy::Spin) if d.is_zero() => SPIN_DEFAULT,
            (d, _) => d,
        };
        let mut builder = glommio::LocalExecutorBuilder::new(placement)
            .name(&format!("verify-{i}"))
            .io_memory(c.runtime.io_memory_bytes);
        if !spin.is_zero() {
            builder = builder.spin_before_park(spin);
        }
        let nice = c.runtime.verify_nice;
        let (sh, started) = (sh.clone(), started_tx.clone());
        threads.push(std::thread::Builder::new().name(format!("verify-{i}")).spawn(move || {
            if nice > 0 {
                set_nice("verify", nice); // runtime.verify_nice
            }
            let ex = match builder.make() {
                Ok(ex) => ex,
                Err(e) => {
                    let _ = started.send(Err((i, e.to_string())));
                    return;
                }
            };
            let _ = started.send(Ok(()));
            drop(started);
            ex.run(shard_main(io, sh));
        })?);
    }
    drop(started_tx);
    for _ in 0..n {
        let (i, failed) = match started_rx.recv() {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => (0, "an executor's thread ended before starting it".to_string()),
        };
        sh.stop.store(true, Ordering::SeqCst);
        for t in threads {
            let _ = t.join();
        }
        anyhow::bail!(start_failure(c, i, &failed));
    }
    Ok(threads)
}

/// The error when an executor cannot start: what it needs, the limit in
/// force, and the three fixes.
fn start_failure(c: &Config, i: usize, error: &str) -> String {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    let memlock = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 {
        if lim.rlim_cur == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} bytes", lim.rlim_cur)
        }
    } else {
        "unknown".to_string()
    };
    format!(
        "starting verify shard {i}'s glommio executor (io_uring) failed: {error}. Each of the {shards} shards \
         registers RUNTIME_IO_MEMORY_BYTES = {io} bytes of locked memory with io_uring; the memlock limit here is \
         {memlock}. Fix: raise the limit to at least {need} bytes (systemd: LimitMEMLOCK= in the unit; a shell: \
         ulimit -l), or lower RUNTIME_IO_MEMORY_BYTES (≥ 65536), or set RUNTIME_EXECUTOR=threads (also where \
         io_uring is unavailable, e.g. under Docker's default seccomp profile)",
        shards = c.runtime.verify_shards,
        io = c.runtime.io_memory_bytes,
        need = c.runtime.verify_shards * c.runtime.io_memory_bytes + (1 << 20),
    )
}

/// A shard's tasks: the acceptor (with its connections) and the verifier,
/// which stops only once the acceptor has and its ring is drained, so the
/// connections' last batches are verified.
async fn shard_main(io: ShardIo, sh: Arc<Shared>) {
    let accepting = Rc::new(Cell::new(true));
    let acceptor = {
        let (sh, accepting) = (sh.clone(), accepting.clone());
        glommio::spawn_local(async move {
            accept_loop(io.listener, &sh).await;
            accepting.set(false);
        })
    };
    verify_loop(io.verifier, &io.input, &io.output, &io.bell, &sh, &accepting).await;
    acceptor.await;
}

async fn verify_loop(
    mut v: Verifier,
    input: &Ring<Vec<Incoming>>,
    output: &Ring<Vec<VerifiedTx>>,
    bell: &Doorbell,
    sh: &Shared,
    accepting: &Cell<bool>,
) {
    loop {
        let batch = take_batch(input, sh.batch);
        if batch.is_empty() {
            if sh.stop.load(Ordering::Relaxed) && !accepting.get() {
                return;
            }
            or(bell.rung(|| !input.is_empty()), glommio::timer::sleep(Duration::from_millis(IDLE_RECHECK_MS))).await;
            continue;
        }
        let taken = batch.len();
        sh.verifying.fetch_add(taken, Ordering::Relaxed);
        let mut ok = verify_batch(&mut v, batch, sh);
        let pushed = loop {
            if ok.is_empty() {
                break true;
            }
            match output.try_push(ok) {
                Ok(()) => break true,
                Err(_) if sh.stop.load(Ordering::Relaxed) => break false,
                Err(back) => {
                    ok = back;
                    glommio::timer::sleep(Duration::from_millis(OUTPUT_FULL_RETRY_MS)).await;
                }
            }
        };
        sh.verifying.fetch_sub(taken, Ordering::Relaxed);
        if !pushed {
            return;
        }
        // A batch is milliseconds of CPU: let this core's connections read.
        glommio::executor().yield_task_queue_now().await;
    }
}

/// Accepts this shard's share of the direct connections (at most
/// [`super::MAX_DIRECT_CONNECTIONS`] over all shards) until the validator stops;
/// then tells its connections to end and waits for them.
async fn accept_loop(listener: std::net::TcpListener, sh: &Arc<Shared>) {
    // SAFETY: the descriptor is a bound, listening TCP socket whose
    // ownership moves here (into_raw_fd).
    let listener =
        unsafe { <glommio::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(listener.into_raw_fd()) };
    let (stop_tx, stop_rx) = watch::channel(false);
    let live = Rc::new(Cell::new(0usize));
    // One accept in flight for the listener's life: a dropped accept could
    // lose a connection the kernel had already handed over.
    let mut accept = Box::pin(listener.accept());
    loop {
        let tick = async {
            glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)).await;
            None
        };
        let accepted = or(async { Some((&mut accept).await) }, tick).await;
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let Some(accepted) = accepted else { continue };
        accept = Box::pin(listener.accept());
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "direct source: accept failed");
                glommio::timer::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                continue;
            }
        };
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let Some(slot) = OpenConnection::take(sh, &peer) else {
            continue; // dropped: closed
        };
        let _ = stream.set_nodelay(true);
        let origin: Arc<str> = format!("direct:{peer}").into();
        live.set(live.get() + 1);
        let (stop, live) = (stop_rx.clone(), live.clone());
        glommio::spawn_local(async move {
            connection(stream, slot, origin, stop).await;
            live.set(live.get() - 1);
        })
        .detach();
    }
    let _ = stop_tx.send(true);
    while live.get() > 0 {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// One client, as in the threads path: events in (ends the connection when
/// the client closes or breaks the framing, or at shutdown), commit notices
/// out (a failed or dropped notice queue ends only the notices).
async fn connection(
    stream: glommio::net::TcpStream,
    slot: OpenConnection,
    origin: Arc<str>,
    stop: watch::Receiver<bool>,
) {
    let (rd, wr) = futures_lite::io::split(stream);
    let rx = slot.subscribe();
    let mut conn = GlommioConn { rd, stop, scratch: vec![0; READ_CHUNK_BYTES] };
    let reader = read_events(&mut conn, &origin, &slot.sh);
    let writer = async {
        write_commits(futures_lite::io::BufWriter::new(wr), rx).await;
        std::future::pending::<()>().await
    };
    or(reader, writer).await;
}

struct GlommioConn<R> {
    rd: R,
    stop: watch::Receiver<bool>,
    scratch: Vec<u8>,
}

impl<R: AsyncRead + Unpin> ReadConn for GlommioConn<R> {
    async fn read_more(&mut self, buf: &mut Vec<u8>) -> bool {
        let (rd, scratch, stop) = (&mut self.rd, &mut self.scratch, &mut self.stop);
        let read = async {
            match rd.read(scratch).await {
                Ok(n) if n > 0 => {
                    buf.extend_from_slice(&scratch[..n]);
                    true
                }
                _ => false,
            }
        };
        or(read, async {
            let _ = stop.changed().await;
            false
        })
        .await
    }

    async fn pause_ms(&mut self, ms: u64) {
        glommio::timer::sleep(Duration::from_millis(ms)).await
    }
}

impl<W: AsyncWrite + Unpin> WriteConn for futures_lite::io::BufWriter<W> {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        AsyncWriteExt::write_all(self, buf).await
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        AsyncWriteExt::flush(self).await
    }
}
