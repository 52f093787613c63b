//! Real 4-process clusters over QUIC on loopback: normal operation, the
//! leader killed, a validator restarted behind the others.

mod common;
use common::*;
use std::collections::{BTreeMap, HashSet};

fn nonces(evs: &[cybermesh::event::Event]) -> Vec<[u8; 16]> {
    evs.iter().map(|e| e.nonce).collect()
}

fn store_check(dir: &std::path::Path) -> String {
    let out = std::process::Command::new(BIN).args(["store", "check", "--data-dir"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// No validator reported misbehaviour (e.g. a restarted one voting twice).
fn assert_no_evidence(v: &Validator) {
    for e in v.logs.try_iter() {
        assert_ne!(e["fields"]["message"], "validator misbehaviour", "{e}");
    }
}

fn merge(into: &mut BTreeMap<u64, Seen>, more: BTreeMap<u64, Seen>) {
    into.extend(more);
}

#[test]
fn four_validators_commit_the_same_blocks() {
    let c = Cluster::new(4, |_| {});
    let vs: Vec<Validator> = (0..4).map(|i| c.start(i)).collect();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();
    let evs: Vec<_> = (0..400).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &evs);
    let chains: Vec<_> = clients.iter_mut().map(|cl| collect(cl, &nonces(&evs))).collect();
    for ch in &chains[1..] {
        assert_same_blocks(&chains[0], ch);
    }
    let committed: HashSet<[u8; 16]> = chains[0].values().flat_map(|s| s.nonces.iter().copied()).collect();
    assert_eq!(committed, nonces(&evs).into_iter().collect(), "exactly the sent txs");
    for v in &vs {
        assert_no_evidence(v);
    }
    for (i, v) in vs.into_iter().enumerate() {
        assert!(v.terminate().success());
        let text = store_check(&c.net.nodes[i].data_dir);
        assert!(text.contains("block store OK"), "{text}");
    }
}

#[test]
fn leader_killed_the_view_changes_and_progress_resumes() {
    let c = Cluster::new(4, |_| {});
    let mut vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.as_ref().unwrap().connect()).collect();
    let a: Vec<_> = (0..100).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    for cl in clients.iter_mut() {
        collect(cl, &nonces(&a));
    }
    // Validator 1 leads view 0: kill it. The rest must elect a new primary.
    vs[0].take().unwrap().kill9();
    let b: Vec<_> = (100..300).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients[1..].iter_mut().collect::<Vec<_>>(), &b);
    let chains: Vec<_> = clients[1..].iter_mut().map(|cl| collect(cl, &nonces(&b))).collect();
    for ch in &chains[1..] {
        assert_same_blocks(&chains[0], ch);
    }
    for v in vs.iter().flatten() {
        assert_no_evidence(v);
    }
    for (i, v) in vs.into_iter().enumerate().skip(1) {
        assert!(v.unwrap().terminate().success());
        let text = store_check(&c.net.nodes[i].data_dir);
        assert!(!text.contains("last view 0,"), "blocks after the kill come from a later view: {text}");
    }
}

#[test]
fn restarted_validator_catches_up_and_rejoins() {
    // Small blocks, so the validator misses more than a window of them.
    let c = Cluster::new(4, |cfg| cfg.block.max_txs = 10);
    let mut vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.as_ref().unwrap().connect()).collect();
    let a: Vec<_> = (0..40).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    let mut chain0 = BTreeMap::new();
    for (i, cl) in clients.iter_mut().enumerate() {
        let ch = collect(cl, &nonces(&a));
        if i == 0 {
            chain0 = ch;
        }
    }
    vs[3].take().unwrap().kill9();
    let before = *chain0.keys().next_back().unwrap();
    let b: Vec<_> = (40..400).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients[..3].iter_mut().collect::<Vec<_>>(), &b);
    merge(&mut chain0, collect(&mut clients[0], &nonces(&b)));
    for cl in clients[1..3].iter_mut() {
        collect(cl, &nonces(&b));
    }
    let top = *chain0.keys().next_back().unwrap();
    assert!(top >= before + 20, "more than a window of blocks was missed ({before} -> {top})");

    let v3 = c.start(3);
    assert!(v3.recovered_height >= before.min(1), "recovered its own blocks");
    let mut c3 = v3.connect();
    let mut chain3 = collect_to_height(&mut c3, top);
    assert_same_blocks(&chain0, &chain3);
    // It takes part again: new txs commit everywhere, in the same blocks.
    clients[3] = c3;
    let d: Vec<_> = (400..440).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &d);
    merge(&mut chain0, collect(&mut clients[0], &nonces(&d)));
    merge(&mut chain3, collect(&mut clients[3], &nonces(&d)));
    assert_same_blocks(&chain0, &chain3);
    for v in vs.iter().flatten() {
        assert_no_evidence(v);
    }
    assert!(v3.terminate().success());
    let text = store_check(&c.net.nodes[3].data_dir);
    assert!(text.contains("block store OK"), "{text}");
}
