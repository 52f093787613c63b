//! Drives one PBFT replica with real I/O: QUIC messages in, ticks from the
//! clock, and the replica's actions carried out in order, durable records
//! first (`consensus.log`, one fdatasync per batch) and only then the sends
//! that depend on them. This is the glue the validator runtime uses.

use super::log::ConsensusLog;
use super::pbft::{Action, Params, Record, Replica, Rid, Seq, Value};
use super::wire::{decode, encode, Ed25519Auth, WireLimits};
use crate::net::Net;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Replica ids are indexes 0..n; on the network validator `i` is `i + 1`.
fn net_id(r: Rid) -> u32 {
    r as u32 + 1
}

pub struct Driver {
    pub replica: Replica<Ed25519Auth>,
    pub log: ConsensusLog,
    pub net: Net,
    pub limits: WireLimits,
}

impl Driver {
    /// Carries out `actions` in order: records are made durable before any
    /// later send; executions go to `executed`.
    fn perform(
        &mut self,
        actions: &mut Vec<Action>,
        executed: &Sender<(Seq, Value)>,
    ) -> Result<(), crate::framed::FramedError> {
        let mut pending: Vec<Record> = Vec::new();
        for a in actions.drain(..) {
            match a {
                Action::Persist(r) => pending.push(r),
                Action::Send(to, m) => {
                    self.log.append(&std::mem::take(&mut pending))?;
                    self.net.send(net_id(to), Arc::new(encode(&m)));
                }
                Action::Broadcast(m) => {
                    self.log.append(&std::mem::take(&mut pending))?;
                    self.net.broadcast(Arc::new(encode(&m)));
                }
                Action::Execute { seq, value, .. } => {
                    let _ = executed.send((seq, value));
                }
                Action::Evidence { culprit, what } => tracing::warn!(culprit, what, "consensus misbehaviour"),
            }
        }
        self.log.append(&pending)
    }

    /// Runs until `stop`: proposals from `proposals`, executions to `executed`.
    pub fn run(
        mut self,
        stop: Arc<AtomicBool>,
        proposals: Receiver<Value>,
        executed: Sender<(Seq, Value)>,
    ) -> Result<(), crate::framed::FramedError> {
        let start = Instant::now();
        let mut actions = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            while let Ok(v) = proposals.try_recv() {
                self.replica.propose(v, &mut actions);
            }
            // Wait briefly for a message: the tick below keeps timers moving.
            if let Ok((from, bytes)) = self.net.incoming.recv_timeout(Duration::from_millis(5)) {
                let mut batch = vec![(from, bytes)];
                batch.extend(self.net.incoming.try_iter().take(1024));
                for (_, bytes) in batch {
                    match decode(&bytes, &self.limits) {
                        Ok(m) => self.replica.on_message(m, &mut actions),
                        Err(e) => tracing::debug!(error = %e, "undecodable consensus message"),
                    }
                }
            }
            self.replica.on_tick(start.elapsed().as_millis() as u64, &mut actions);
            self.perform(&mut actions, &executed)?;
        }
        Ok(())
    }
}

/// Short timeouts for loopback tests.
pub fn params_for_tests(n: usize) -> Params {
    Params {
        window: 16,
        checkpoint_interval: 4,
        timeout_ms: 2_000,
        timeout_min_ms: 1_000,
        retransmit_ms: 200,
        heartbeat_ms: 200,
        missed_heartbeats: 25,
        ..Params::manual_defaults(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto;
    use crate::net::{NetConfig, Peer};

    #[test]
    fn four_replicas_agree_over_real_quic_with_durable_logs() {
        let n = 4;
        let keys: Vec<crypto::SigningKey> = (0..n).map(|_| crypto::generate_key()).collect();
        let pks: Vec<crypto::PublicKey> = keys.iter().map(crypto::public_key).collect();
        let socks: Vec<std::net::UdpSocket> =
            (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<_> = socks.iter().map(|s| s.local_addr().unwrap()).collect();
        let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let limits = WireLimits { n, max_value_bytes: 1 << 20, window: 16 };
        let stop = Arc::new(AtomicBool::new(false));
        let mut inputs = vec![];
        let mut outputs = vec![];
        let mut threads = vec![];
        for (i, sock) in socks.into_iter().enumerate() {
            let peers =
                (0..n).filter(|&j| j != i).map(|j| Peer { id: net_id(j), addr: addrs[j], key: pks[j] }).collect();
            let net = Net::start(NetConfig {
                me: net_id(i),
                key: keys[i].clone(),
                socket: sock,
                peers,
                max_frame: 4 << 20,
                queue: 4096,
                allowed_ips: vec![],
                wake: None,
            })
            .unwrap();
            let (log, records, _) = ConsensusLog::open(dirs[i].path(), &limits).unwrap();
            assert!(records.is_empty());
            let replica = Replica::new(i, params_for_tests(n), Ed25519Auth::new(keys[i].clone(), pks.clone()));
            let d = Driver { replica, log, net, limits };
            let (ptx, prx) = std::sync::mpsc::channel();
            let (etx, erx) = std::sync::mpsc::channel();
            inputs.push(ptx);
            outputs.push(erx);
            let st = stop.clone();
            threads.push(std::thread::spawn(move || d.run(st, prx, etx)));
        }
        let values: Vec<Value> = (0..20).map(|i| Arc::new(format!("value {i}").into_bytes())).collect();
        for v in &values {
            for p in &inputs {
                p.send(v.clone()).unwrap();
            }
        }
        // Every replica executes every value; all execute the same sequence.
        // (A view change on a loaded machine may add null values or, rarely,
        // a re-proposal: what must hold is one order and every value in it.)
        let want: std::collections::BTreeSet<Vec<u8>> = values.iter().map(|v| v.to_vec()).collect();
        let mut orders = vec![];
        for out in &outputs {
            let mut got: Vec<Value> = vec![];
            let mut seen = std::collections::BTreeSet::new();
            while !want.is_subset(&seen) {
                let (seq, v) = out.recv_timeout(Duration::from_secs(60)).expect("executions within 60 s");
                assert_eq!(seq, got.len() as u64 + 1, "in order, no gaps");
                seen.insert(v.to_vec());
                got.push(v);
            }
            orders.push(got);
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap().unwrap();
        }
        for o in &orders[1..] {
            let k = o.len().min(orders[0].len());
            assert_eq!(o[..k], orders[0][..k], "replicas disagree on the order");
        }
        // Every replica's votes are on disk and read back.
        for d in &dirs {
            let (_, records, _) = ConsensusLog::open(d.path(), &limits).unwrap();
            assert!(records.iter().any(|r| matches!(r, Record::Vote(_))), "votes were persisted");
        }
    }
}
