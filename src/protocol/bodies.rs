//! Tx bodies a value names that this validator lacks (proposals name txs
//! by [`TxRef`], see `proposal`): which are still missing, who to ask next
//! and when. Pure bookkeeping; the node sends the asks (`TxFetch`) and
//! offers what arrives.

use crate::protocol::consensus::pbft::Rid;
use crate::protocol::event::Event;
use crate::protocol::proposal::{Named, Proposal, TxRef};
use crate::Hash32;
use std::collections::HashMap;
use std::sync::Arc;

/// How long a validator waits for its own source to deliver a tx a value
/// names before asking a peer (validators consume the same source at
/// slightly different paces; fetching costs the peer bytes and this
/// validator a signature check).
pub const WAIT_FOR_SOURCE_MS: u64 = 10;

/// How long to wait for an answer before asking the next peer.
pub const ASK_RETRY_MS: u64 = 200;

/// The bodies of one value, found and missing.
#[derive(Debug)]
pub struct Bodies {
    named: Named,
    found: Vec<Option<Arc<Event>>>,
    /// Missing tx hash → its index in the value.
    missing: HashMap<Hash32, usize>,
    /// Peers to ask, in order (the first is the one most likely to have
    /// them: the primary, or the validator that sent the certificate).
    peers: Vec<Rid>,
    asks: usize,
    next_ask_ms: u64,
}

impl Bodies {
    /// Resolves `named` with `lookup` (bodies this validator holds, each
    /// checked against its ref); what it lacks it asks `peers` for, from
    /// `now_ms + WAIT_FOR_SOURCE_MS` on.
    pub fn new(
        named: Named,
        mut lookup: impl FnMut(&TxRef) -> Option<Arc<Event>>,
        peers: Vec<Rid>,
        now_ms: u64,
    ) -> Bodies {
        let mut missing = HashMap::new();
        let found = named
            .refs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let b = lookup(r).filter(|e| r.names(e));
                if b.is_none() {
                    missing.insert(r.tx_hash, i);
                }
                b
            })
            .collect();
        Bodies { named, found, missing, peers, asks: 0, next_ask_ms: now_ms + WAIT_FOR_SOURCE_MS }
    }

    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }

    pub fn missing_len(&self) -> usize {
        self.missing.len()
    }

    /// The value's origin and the hashes still missing (diagnosis).
    #[cfg(test)]
    pub(crate) fn describe(&self) -> String {
        let mut m: Vec<String> = self.missing.keys().map(|h| hex::encode(&h[..4])).collect();
        m.sort();
        format!("origin {:?} missing {m:?}", self.named.origin)
    }

    /// Every tx hash the value names (found or not).
    pub fn tx_hashes(&self) -> impl Iterator<Item = &Hash32> {
        self.named.refs.iter().map(|r| &r.tx_hash)
    }

    /// Takes `event` (with its tx hash) if it is a body this value misses.
    pub fn offer(&mut self, event: &Arc<Event>, tx_hash: &Hash32) -> bool {
        let Some(&i) = self.missing.get(tx_hash) else { return false };
        if !self.named.refs[i].names(event) {
            return false; // the same signed bytes under another signature
        }
        self.missing.remove(tx_hash);
        self.found[i] = Some(event.clone());
        true
    }

    /// When to ask next (ms), if anything is missing.
    pub fn next_ask_ms(&self) -> Option<u64> {
        (!self.missing.is_empty()).then_some(self.next_ask_ms)
    }

    /// If it is time: the peer to ask and (at most `max`) missing hashes;
    /// the next ask goes to the next peer, `ASK_RETRY_MS` later. While
    /// `source_busy` (this validator's own shards still hold txs: it lags,
    /// typically under load) the first ask waits: the bodies are most
    /// likely among them, and fetching would verify them twice here and
    /// cost the peer bytes just when both are busiest. If they never come,
    /// the view-change timer (running while a proposal waits) moves on.
    pub fn ask(&mut self, now_ms: u64, max: usize, source_busy: bool) -> Option<(Rid, Vec<Hash32>)> {
        if self.missing.is_empty() || now_ms < self.next_ask_ms || self.peers.is_empty() {
            return None;
        }
        if source_busy && self.asks == 0 {
            return None;
        }
        let peer = self.peers[self.asks % self.peers.len()];
        self.asks += 1;
        self.next_ask_ms = now_ms + ASK_RETRY_MS;
        let mut hashes: Vec<(usize, Hash32)> = self.missing.iter().map(|(h, i)| (*i, *h)).collect();
        hashes.sort_unstable(); // block order: deterministic asks
        Some((peer, hashes.into_iter().take(max).map(|(_, h)| h).collect()))
    }

    /// The proposal, once complete.
    pub fn into_proposal(self) -> Proposal {
        assert!(self.missing.is_empty(), "every body found");
        let txs = self.found.into_iter().map(|b| b.expect("found")).collect();
        self.named.resolve(txs)
    }
}

/// The peers to ask, `first` first, then the others after it in id order,
/// never `me`.
pub fn ask_order(n: usize, first: Rid, me: Rid) -> Vec<Rid> {
    (0..n).map(|k| (first + k) % n).filter(|&r| r != me).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::crypto;
    use crate::protocol::event::{sample_anomaly_payload, TxKind};

    fn ev(k: &crypto::SigningKey, i: u32) -> Arc<Event> {
        let mut nonce = [0u8; 16];
        nonce[12..].copy_from_slice(&i.to_be_bytes());
        Arc::new(Event::sign(TxKind::Anomaly, k, nonce, sample_anomaly_payload(i as u64, 50), 1000, i.to_be_bytes()))
    }

    #[test]
    fn missing_bodies_are_asked_of_each_peer_in_turn_and_taken_only_if_named() {
        let k = crypto::generate_key();
        let txs: Vec<Arc<Event>> = (0..3).map(|i| ev(&k, i)).collect();
        let refs: Vec<TxRef> = txs.iter().map(|t| TxRef::of(t, t.tx_hash())).collect();
        let named = Named { origin: None, timestamp_ms: 1000, refs, evidence: vec![] };
        let held = txs[1].clone();
        let mut b =
            Bodies::new(named, |r| (r.tx_hash == held.tx_hash()).then(|| held.clone()), ask_order(4, 2, 1), 100);
        assert_eq!(b.missing_len(), 2);
        assert_eq!(b.ask(105, 10, false), None, "waits for its own source first");
        assert_eq!(b.ask(110, 10, true), None, "not while its own source has txs to verify");
        assert_eq!(b.ask(5_000, 10, true), None);
        let (peer, hashes) = b.ask(110, 10, false).unwrap();
        assert_eq!((peer, hashes), (2, vec![txs[0].tx_hash(), txs[2].tx_hash()]));
        assert_eq!(b.ask(200, 10, false), None, "the first peer has until the retry");
        assert_eq!(b.ask(310, 1, true).unwrap(), (3, vec![txs[0].tx_hash()]), "retries do not wait");
        // Another signature over the same bytes is not the named body.
        let mut resigned = (*txs[0]).clone();
        resigned.signature[5] ^= 1;
        assert!(!b.offer(&Arc::new(resigned), &txs[0].tx_hash()));
        assert!(!b.offer(&txs[1], &txs[1].tx_hash()), "already found");
        assert!(b.offer(&txs[0], &txs[0].tx_hash()));
        assert!(b.offer(&txs[2], &txs[2].tx_hash()));
        assert!(b.is_complete());
        assert_eq!(b.next_ask_ms(), None);
        assert_eq!(b.into_proposal().txs, txs);
        assert_eq!(ask_order(4, 3, 0), vec![3, 1, 2]);
    }
}
