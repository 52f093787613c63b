//! Real 4-process clusters over QUIC on loopback: normal operation, a
//! genesis mismatch, the leader killed, a validator restarted behind the
//! others, one whose disk was wiped (young chain: it replays from height 1;
//! older: it joins from a snapshot), and one in its own network namespace
//! partitioned off and healed.

mod common;
use common::*;
use std::collections::{BTreeMap, HashSet};

fn nonces(evs: &[cybermesh::protocol::event::Event]) -> Vec<[u8; 16]> {
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

/// After validator `i` rejoined: new txs `ids` sent to every client commit at
/// validators 0 and `i` in the same blocks, and nobody reports misbehaviour.
fn commits_everywhere(
    c: &Cluster,
    clients: &mut [Client],
    i: usize,
    chains: (&mut BTreeMap<u64, Seen>, &mut BTreeMap<u64, Seen>),
    ids: std::ops::Range<u64>,
    vs: &[&Validator],
) {
    let d: Vec<_> = ids.map(|k| anomaly(c.producer(), k)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &d);
    merge(chains.0, collect(&mut clients[0], &nonces(&d)));
    merge(chains.1, collect(&mut clients[i], &nonces(&d)));
    assert_same_blocks(chains.0, chains.1);
    for v in vs {
        assert_no_evidence(v);
    }
}

/// Four validators with their HTTP APIs, through genesis.
fn four_with_api() -> (Cluster, Vec<Validator>) {
    let c = Cluster::new(4, |cfg| {
        cfg.api.enabled = true;
        cfg.api.listen = "127.0.0.1:0".into();
    });
    let vs: Vec<Validator> = (0..4).map(|i| c.start(i)).collect();
    for v in &vs {
        wait_log(v, "genesis complete", std::time::Duration::from_secs(60));
    }
    (c, vs)
}

#[test]
fn four_validators_commit_the_same_blocks() {
    let (c, vs) = four_with_api();
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
    // A backup's API: ready with all peers, and its vote counters moved.
    let addr = api_addr(&vs[1]);
    let (code, body) = http_get(&addr, "/ready");
    assert_eq!(code, 200, "{body}");
    let (_, page) = http_get(&addr, "/metrics");
    assert_eq!(metric(&page, "consensus_validator_count"), 4.0);
    assert_eq!(metric(&page, "consensus_quorum_size"), 3.0);
    assert_eq!(metric(&page, "p2p_peers_connected"), 3.0);
    assert_eq!(metric(&page, "consensus_height"), *chains[1].keys().next_back().unwrap() as f64);
    assert!(metric(&page, "consensus_proposals_total") >= 1.0);
    assert!(metric(&page, "consensus_prepares_total") >= 1.0);
    assert!(metric(&page, "consensus_commits_total") >= 2.0);
    // Its own view of the pipeline: one durable-stage observation per tx
    // it committed, and the consensus bytes it sent (votes: no tx bodies).
    assert_eq!(metric(&page, "tx_stage_latency_ms_count{stage=\"durable\"}"), evs.len() as f64);
    assert!(metric(&page, "tx_stage_latency_ms_count{stage=\"commit\"}") >= 1.0);
    assert!(metric(&page, "p2p_bytes_sent_total") > 0.0);
    for (i, v) in vs.into_iter().enumerate() {
        assert!(v.terminate().success());
        let text = store_check(&c.net.nodes[i].data_dir);
        assert!(text.contains("block store OK"), "{text}");
    }
}

#[test]
fn genesis_mismatch_aborts_naming_the_hash_and_the_validator() {
    // Validator 4 runs another block size limit: a different config hash.
    let c = Cluster::new(4, |cfg| {
        if cfg.node.id == 4 {
            cfg.block.max_txs = 7;
        }
    });
    let mut vs: Vec<Validator> = (0..4).map(|i| c.start(i)).collect();
    let stopped = wait_log(&vs[0], "core stopped", std::time::Duration::from_secs(60));
    let err = stopped["fields"]["error"].as_str().unwrap();
    assert!(err.contains("validator 4 has a different config hash"), "{err}");
    assert!(!vs[0].child.wait().unwrap().success(), "validator 1 exits with an error");
    assert!(!std::path::Path::new(&c.net.nodes[0].data_dir.join("genesis_state.json")).exists());
}

/// All four validators of `c` started, a client each, and `n` alerts
/// committed everywhere.
fn four_that_committed(c: &Cluster, n: u64) -> (Vec<Option<Validator>>, Vec<Client>) {
    let vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.as_ref().unwrap().connect()).collect();
    let a: Vec<_> = (0..n).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    for cl in clients.iter_mut() {
        collect(cl, &nonces(&a));
    }
    (vs, clients)
}

#[test]
fn leader_killed_the_view_changes_and_progress_resumes() {
    let c = Cluster::new(4, |_| {});
    let (mut vs, mut clients) = four_that_committed(&c, 100);
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
    let c = Cluster::new(4, |cfg| {
        cfg.block.max_txs = 10;
        // Compact the consensus log at every stable checkpoint: recovery
        // then reads a compacted log.
        cfg.runtime.consensus_log_compact_bytes = 0;
    });
    let mut vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.as_ref().unwrap().connect()).collect();
    let a: Vec<_> = (0..100).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    let mut chain0 = BTreeMap::new();
    for (i, cl) in clients.iter_mut().enumerate() {
        let ch = collect(cl, &nonces(&a));
        if i == 0 {
            chain0 = ch;
        }
    }
    wait_log(vs[3].as_ref().unwrap(), "consensus log compacted", std::time::Duration::from_secs(60));
    vs[3].take().unwrap().kill9();
    let before = *chain0.keys().next_back().unwrap();
    let b: Vec<_> = (100..400).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients[..3].iter_mut().collect::<Vec<_>>(), &b);
    merge(&mut chain0, collect(&mut clients[0], &nonces(&b)));
    for cl in clients[1..3].iter_mut() {
        collect(cl, &nonces(&b));
    }
    let top = *chain0.keys().next_back().unwrap();
    assert!(top >= before + 20, "more than a window of blocks was missed ({before} -> {top})");

    let v3 = c.start(3);
    assert!(v3.recovered_height >= before.min(1), "recovered its own blocks");
    assert!(v3.startup.iter().any(|m| m == "genesis certificate reused"), "{:?}", v3.startup);
    let mut c3 = v3.connect();
    let mut chain3 = collect_to_height(&mut c3, top);
    assert_same_blocks(&chain0, &chain3);
    // It takes part again: new txs commit everywhere, in the same blocks.
    clients[3] = c3;
    let others: Vec<&Validator> = vs.iter().flatten().collect();
    commits_everywhere(&c, &mut clients, 3, (&mut chain0, &mut chain3), 400..440, &others);
    assert!(v3.terminate().success());
    let text = store_check(&c.net.nodes[3].data_dir);
    assert!(text.contains("block store OK"), "{text}");
}

/// A validator restarted after the others changed view asks the new
/// primary for its new-view and votes in that view at once: with it, the
/// cluster survives losing another backup without a further view change.
#[test]
fn a_restarted_validator_joins_the_current_view_and_its_votes_count() {
    let c = Cluster::new(4, |_| {});
    let (mut vs, mut clients) = four_that_committed(&c, 50);
    // The primary of view 0 goes; the others move to view 1 and commit.
    vs[0].take().unwrap().kill9();
    let b: Vec<_> = (50..100).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients[1..].iter_mut().collect::<Vec<_>>(), &b);
    for cl in clients[1..].iter_mut() {
        collect(cl, &nonces(&b));
    }
    // It comes back in view 0 and learns view 1 from its primary, while
    // load keeps the primary executing (an idle primary re-sends its
    // new-view by itself once execution stalls).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let mut cls: Vec<Client> = vs[1..].iter().map(|v| v.as_ref().unwrap().connect()).collect();
        let key = c.producer().clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = vec![];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let evs: Vec<_> = (0..5).map(|j| anomaly(&key, 10_000 + sent.len() as u64 + j)).collect();
                send_all(&mut cls.iter_mut().collect::<Vec<_>>(), &evs);
                sent.extend(evs);
                std::thread::sleep(std::time::Duration::from_millis(10)); // pacing the load, not waiting for it
            }
            sent
        })
    };
    let v0 = c.start(0);
    let mut c0 = v0.connect();
    let e = wait_log(&v0, "view changed", std::time::Duration::from_secs(60));
    assert_eq!(e["fields"]["view"], 1, "{e}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = load.join().unwrap();
    // It catches up with what was committed meanwhile (the last block
    // not at a checkpoint: the primary's heartbeat tells it) and orders
    // new txs with the others.
    collect(&mut c0, &nonces(&sent));
    let e2: Vec<_> = (150..160).map(|i| anomaly(c.producer(), i)).collect();
    clients[0] = c0;
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &e2);
    for cl in clients.iter_mut() {
        collect(cl, &nonces(&e2));
    }
    vs[0] = Some(v0);
    // A backup of view 1 goes: the restarted validator's votes make the quorum.
    vs[2].take().unwrap().kill9();
    let d: Vec<_> = (100..150).map(|i| anomaly(c.producer(), i)).collect();
    let mut live: Vec<&mut Client> =
        clients.iter_mut().enumerate().filter(|(i, _)| *i != 2).map(|(_, cl)| cl).collect();
    send_all(&mut live, &d);
    let chains: Vec<_> = live.iter_mut().map(|cl| collect(cl, &nonces(&d))).collect();
    for ch in &chains[1..] {
        assert_same_blocks(&chains[0], ch);
    }
    for (i, v) in vs.into_iter().enumerate() {
        let Some(v) = v else { continue };
        assert!(v.terminate().success());
        let text = store_check(&c.net.nodes[i].data_dir);
        assert!(text.contains("last view 1,"), "validator {}: the last blocks come from view 1: {text}", i + 1);
    }
}

/// A network namespace joined to the host by a veth pair: a validator
/// started inside is reachable at `inner` from the host and reaches the
/// host at `outer`; taking the host end down partitions it. Removed on drop.
struct Netns {
    name: String,
    host_if: String,
    outer: std::net::Ipv4Addr,
    inner: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("the `ip` tool (iproute2) is installed");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    fn new() -> Netns {
        let tag = std::process::id();
        let octet = (tag % 250 + 1) as u8;
        let ns = Netns {
            name: format!("cmns{tag}"),
            host_if: format!("cmh{tag}"),
            outer: std::net::Ipv4Addr::new(10, 213, octet, 1),
            inner: std::net::Ipv4Addr::new(10, 213, octet, 2),
        };
        let ns_if = format!("cmn{tag}");
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.outer), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&["-n", &ns.name, "addr", "add", &format!("{}/30", ns.inner), "dev", &ns_if]);
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = std::process::Command::new("ip").args(["link", "del", &self.host_if]).status();
    }
}

/// Rewrites `id@ip:port` entries' IPs.
fn with_ip(addr: &str, ip: std::net::Ipv4Addr) -> String {
    let port = addr.rsplit(':').next().unwrap();
    format!("{ip}:{port}")
}

#[test]
fn partitioned_validator_rejoins_after_the_partition_heals() {
    let ns = Netns::new();
    let (outer, inner) = (ns.outer, ns.inner);
    // Validators 1-3 on the host (talking over loopback among themselves),
    // validator 4 inside the namespace, reached over the veth pair.
    let c = Cluster::new(4, move |cfg| {
        cfg.cluster.allowed_ips = vec!["127.0.0.0/8".into(), format!("{outer}/30")];
        if cfg.node.id == 4 {
            cfg.cluster.listen = with_ip(&cfg.cluster.listen, inner);
            cfg.ingest.direct_listen = with_ip(&cfg.ingest.direct_listen, inner);
            cfg.cluster.peers = cfg
                .cluster
                .peers
                .iter()
                .map(|p| {
                    let (id, a) = p.split_once('@').unwrap();
                    format!("{id}@{}", with_ip(a, outer))
                })
                .collect();
        } else {
            cfg.cluster.listen = with_ip(&cfg.cluster.listen, std::net::Ipv4Addr::UNSPECIFIED);
            cfg.cluster.peers = cfg
                .cluster
                .peers
                .iter()
                .map(|p| match p.split_once('@').unwrap() {
                    ("4", a) => format!("4@{}", with_ip(a, inner)),
                    (id, a) => format!("{id}@{a}"),
                })
                .collect();
        }
    });
    let mut vs: Vec<Validator> = (0..3).map(|i| c.start(i)).collect();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, BIN, "run", "--config"]).arg(&c.net.nodes[3].config);
    vs.push(Validator::spawn(cmd));
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();
    let a: Vec<_> = (0..60).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    let mut chain0 = collect(&mut clients[0], &nonces(&a));
    let mut chain3 = collect(&mut clients[3], &nonces(&a));
    assert_same_blocks(&chain0, &chain3);

    // Cut validator 4 off: the other three are a quorum and go on.
    ns.link(false);
    let direct4: std::net::SocketAddr = with_ip(&c.net.nodes[3].direct.to_string(), inner).parse().unwrap();
    assert!(
        std::net::TcpStream::connect_timeout(&direct4, std::time::Duration::from_millis(500)).is_err(),
        "the partition cuts validator 4 off"
    );
    let b: Vec<_> = (60..300).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients[..3].iter_mut().collect::<Vec<_>>(), &b);
    merge(&mut chain0, collect(&mut clients[0], &nonces(&b)));
    let top = *chain0.keys().next_back().unwrap();
    assert!(top > *chain3.keys().next_back().unwrap());

    // Heal: validator 4 fetches what it missed and takes part again.
    ns.link(true);
    merge(&mut chain3, collect_to_height(&mut clients[3], top));
    let all: Vec<&Validator> = vs.iter().collect();
    commits_everywhere(&c, &mut clients, 3, (&mut chain0, &mut chain3), 300..340, &all);
    assert!(chain3.keys().next_back() > Some(&top));
}

/// A LAN of network namespaces: each has a veth into one bridge on the host
/// (multicast floods across it), at 10.215.x.i/24; the host is .254.
struct Lan {
    bridge: String,
    spaces: Vec<(String, String, std::net::Ipv4Addr)>,
    net: String,
}

impl Lan {
    fn new(n: usize) -> Lan {
        let tag = std::process::id() % 100_000;
        let octet = (tag % 250 + 1) as u8;
        let bridge = format!("cmb{tag}");
        ip(&["link", "add", &bridge, "type", "bridge", "mcast_snooping", "0"]);
        ip(&["addr", "add", &format!("10.215.{octet}.254/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let mut spaces = vec![];
        for i in 1..=n {
            let (ns, host_if, ns_if) = (format!("cml{tag}x{i}"), format!("cmh{tag}x{i}"), format!("cmn{tag}x{i}"));
            let addr = std::net::Ipv4Addr::new(10, 215, octet, i as u8);
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
            ip(&["link", "set", &ns_if, "netns", &ns]);
            ip(&["link", "set", &host_if, "master", &bridge]);
            ip(&["link", "set", &host_if, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &ns_if]);
            ip(&["-n", &ns, "link", "set", &ns_if, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // mDNS sends to 224.0.0.251: route multicast out of the veth.
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", &ns_if]);
            spaces.push((ns, host_if, addr));
        }
        Lan { bridge, spaces, net: format!("10.215.{octet}.0/24") }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for (ns, host_if, _) in &self.spaces {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::process::Command::new("ip").args(["link", "del", host_if]).status();
        }
        let _ = std::process::Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

#[test]
fn validators_on_a_lan_find_each_other_by_mdns_and_commit_together() {
    let lan = Lan::new(4);
    let addrs: Vec<std::net::Ipv4Addr> = lan.spaces.iter().map(|s| s.2).collect();
    let net = lan.net.clone();
    // No peer addresses at all: every validator learns them by mDNS.
    let c = Cluster::new(4, move |cfg| {
        let me = addrs[cfg.node.id as usize - 1];
        cfg.cluster.listen = with_ip(&cfg.cluster.listen, me);
        cfg.ingest.direct_listen = with_ip(&cfg.ingest.direct_listen, me);
        cfg.cluster.peers = vec![];
        cfg.cluster.enable_mdns = true;
        cfg.cluster.allowed_ips = vec![net.clone()];
    });
    let vs: Vec<Validator> = (0..4)
        .map(|i| {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", &lan.spaces[i].0, BIN, "run", "--config"]).arg(&c.net.nodes[i].config);
            Validator::spawn(cmd)
        })
        .collect();
    // Each finds the other three (in any order with its genesis: the
    // others' connections to it may complete genesis first).
    for v in &vs {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let (mut found, mut genesis) = (std::collections::BTreeSet::new(), false);
        while found.len() < 3 || !genesis {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let e = v.logs.recv_timeout(left).unwrap_or_else(|_| panic!("found {found:?}, genesis {genesis}"));
            match e["fields"]["message"].as_str() {
                Some("genesis complete") => genesis = true,
                Some("validator found by mDNS") => {
                    let addr: std::net::SocketAddr = e["fields"]["addr"].as_str().unwrap().parse().unwrap();
                    assert!(
                        lan.spaces.iter().any(|s| std::net::IpAddr::V4(s.2) == addr.ip()),
                        "{addr} is not on the LAN"
                    );
                    found.insert(e["fields"]["peer"].as_u64().unwrap());
                }
                _ => {}
            }
        }
    }
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();
    let a: Vec<_> = (0..100).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    let chains: Vec<_> = clients.iter_mut().map(|cl| collect(cl, &nonces(&a))).collect();
    for ch in &chains[1..] {
        assert_same_blocks(&chains[0], ch);
    }
    for v in &vs {
        assert_no_evidence(v);
    }
}

#[test]
fn validator_with_a_wiped_disk_rejoins_through_genesis_and_catch_up() {
    let c = Cluster::new(4, |cfg| cfg.block.max_txs = 20);
    let mut vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.as_ref().unwrap().connect()).collect();
    let a: Vec<_> = (0..200).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    let mut chain0 = collect(&mut clients[0], &nonces(&a));
    for cl in clients[1..].iter_mut() {
        collect(cl, &nonces(&a));
    }
    // The disk is replaced: no blocks, no consensus log, no genesis certificate.
    vs[3].take().unwrap().kill9();
    std::fs::remove_dir_all(&c.net.nodes[3].data_dir).unwrap();
    let v3 = c.start(3);
    assert_eq!(v3.recovered_height, 0);
    // Connected before catch-up starts: every block is seen. The others
    // finished genesis long ago; they answer its attestation.
    let mut c3 = v3.connect();
    wait_log(&v3, "genesis complete", std::time::Duration::from_secs(60));
    // The chain is younger than the snapshot interval: nobody has one.
    wait_log(&v3, "no peer offered a snapshot; catching up from height 1", std::time::Duration::from_secs(30));
    let top = *chain0.keys().next_back().unwrap();
    let mut chain3 = collect_to_height(&mut c3, top);
    assert_eq!(chain3.len() as u64, top, "every block from height 1");
    assert_same_blocks(&chain0, &chain3);
    clients[3] = c3;
    let others: Vec<&Validator> = vs.iter().flatten().collect();
    commits_everywhere(&c, &mut clients, 3, (&mut chain0, &mut chain3), 200..240, &others);
    drop(v3);
}

/// Validator `i` gets a new disk (nothing but its config and key) and
/// starts again: it joins from a peer's snapshot. Returns it, a client
/// connected before the join (every block after it is seen) and the
/// snapshot's height.
fn wiped_joins(c: &Cluster, vs: &mut [Option<Validator>], i: usize) -> (Validator, Client, u64) {
    vs[i].take().unwrap().kill9();
    std::fs::remove_dir_all(&c.net.nodes[i].data_dir).unwrap();
    let v = c.start(i);
    let client = v.connect();
    let joined = wait_log(
        &v,
        "joined from a snapshot; catching up with the blocks above it",
        std::time::Duration::from_secs(60),
    );
    let base = joined["fields"]["height"].as_u64().unwrap();
    (v, client, base)
}

#[test]
fn fresh_validator_joins_from_a_snapshot_plus_later_blocks() {
    // A snapshot every 8 blocks (the checkpoint interval), small blocks.
    let c = Cluster::new(4, |cfg| {
        cfg.block.max_txs = 10;
        cfg.consensus.snapshot_interval = 8;
    });
    let mut vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.as_ref().unwrap().connect()).collect();
    let a: Vec<_> = (0..300).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    let mut chain0 = collect(&mut clients[0], &nonces(&a));
    for cl in clients[1..].iter_mut() {
        collect(cl, &nonces(&a));
    }
    wait_log(vs[0].as_ref().unwrap(), "chain snapshot ready", std::time::Duration::from_secs(30));
    let (v3, mut c3, base) = wiped_joins(&c, &mut vs, 3);
    assert!(base >= 8 && base % 8 == 0, "joined at height {base}");
    // Only the blocks above the snapshot are fetched and executed.
    let top = *chain0.keys().next_back().unwrap();
    let mut chain3 = collect_to_height(&mut c3, top.max(base + 1));
    assert_eq!(*chain3.keys().next().unwrap(), base + 1, "first block executed after the snapshot");
    assert_same_blocks(&chain0, &chain3);
    clients[3] = c3;
    let others: Vec<&Validator> = vs.iter().flatten().collect();
    commits_everywhere(&c, &mut clients, 3, (&mut chain0, &mut chain3), 300..340, &others);
    assert!(v3.terminate().success());
    let text = store_check(&c.net.nodes[3].data_dir);
    assert!(text.contains("block store OK") && text.contains(&format!("from a snapshot at height {base}")), "{text}");
    // It restarts from the snapshot it keeps plus its own blocks.
    let v3 = c.start(3);
    assert!(v3.startup.iter().any(|m| m == "starting above the snapshot in blocks.base"), "{:?}", v3.startup);
    assert!(v3.recovered_height > base);
    clients[3] = v3.connect();
    commits_everywhere(&c, &mut clients, 3, (&mut chain0, &mut chain3), 340..360, &others);
    drop(v3);
}

/// Waits (on its log, bounded) until `v` has pruned up to at least
/// `lowest`: its lowest stored block is then `lowest` or above.
fn wait_pruned_from(v: &Validator, lowest: u64) {
    loop {
        let e = wait_log(v, "pruned block segments", std::time::Duration::from_secs(60));
        if e["fields"]["lowest"].as_u64().unwrap() >= lowest {
            return;
        }
    }
}

/// The block segment files in `dir` by first height, with their sizes.
fn segments(dir: &std::path::Path) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let first = name.strip_prefix("blocks-")?.strip_suffix(".dat")?.parse().ok()?;
            Some((first, e.metadata().unwrap().len()))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn retention_keeps_the_store_bounded_restarts_on_its_snapshot_and_a_wiped_validator_joins() {
    // Small blocks and segments (~13 blocks each), a snapshot every 8
    // blocks, 16 blocks retained.
    const RETAIN: u64 = 16;
    const SNAPSHOT: u64 = 8;
    let c = Cluster::new(4, |cfg| {
        cfg.block.max_txs = 10;
        cfg.consensus.snapshot_interval = SNAPSHOT;
        cfg.storage.retain_blocks = RETAIN;
        cfg.storage.segment_bytes = 64 * 1024;
        cfg.api.enabled = true;
        cfg.api.listen = "127.0.0.1:0".into();
    });
    let mut vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.as_ref().unwrap().connect()).collect();
    let a: Vec<_> = (0..1500).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    let mut chain0 = collect(&mut clients[0], &nonces(&a));
    for cl in clients[1..].iter_mut() {
        collect(cl, &nonces(&a));
    }
    let top = *chain0.keys().next_back().unwrap();
    assert!(top >= 150, "{top} blocks");
    // Pruned once a snapshot at or above top - RETAIN is kept as the base.
    let v1 = vs[1].as_ref().unwrap();
    let addr = api_addr(v1);
    wait_pruned_from(v1, top.saturating_sub(RETAIN + SNAPSHOT + 2 * 13));
    let (code, body) = http_get(&addr, "/blocks/1");
    assert_eq!(code, 410, "{body}");
    let lowest = serde_json::from_str::<serde_json::Value>(&body).unwrap()["lowest_retained"].as_u64().unwrap();
    let dir1 = &c.net.nodes[1].data_dir;
    let segs = segments(dir1);
    assert_eq!(segs[0].0, lowest, "the lowest stored is the first segment's first block");
    let per_segment = segs.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    assert!(per_segment >= 5, "{segs:?}");
    let bytes: u64 = segs.iter().map(|s| s.1).sum();
    // What is kept: the retained blocks, up to a snapshot interval more, and
    // the partial segments at both ends.
    assert!(top - lowest < RETAIN + SNAPSHOT + 2 * per_segment, "kept {lowest}..{top} with {per_segment} per segment");
    assert!(segs.len() as u64 <= (RETAIN + SNAPSHOT) / per_segment + 3, "{segs:?}");
    let (code, _) = http_get(&addr, &format!("/blocks/{lowest}"));
    assert_eq!(code, 200);
    let page = http_get(&addr, "/metrics").1;
    assert_eq!(metric(&page, "storage_lowest_block_height") as u64, lowest);
    assert!(metric(&page, "storage_pruned_blocks_total") as u64 >= lowest - 1);
    assert!(metric(&page, "storage_block_store_bytes") as u64 <= bytes + 64 * 1024 * 2);
    eprintln!("pruned store after {top} blocks: {} segments, {bytes} bytes from height {lowest}", segs.len());

    // A restart starts on the kept snapshot and catches up.
    vs[1].take().unwrap().kill9();
    let text = store_check(dir1);
    assert!(text.contains("block store OK") && text.contains("from a snapshot at height"), "{text}");
    let stored_from: u64 = text.split("; blocks ").nth(1).unwrap().split("..").next().unwrap().parse().unwrap();
    assert!(stored_from > 1, "pruned: {text}");
    let b: Vec<_> = (1500..1600).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().enumerate().filter(|(i, _)| *i != 1).map(|(_, c)| c).collect::<Vec<_>>(), &b);
    merge(&mut chain0, collect(&mut clients[0], &nonces(&b)));
    let v1 = c.start(1);
    assert!(v1.startup.iter().any(|m| m == "starting above the snapshot in blocks.base"), "{:?}", v1.startup);
    assert!(v1.recovered_height >= top, "recovered {} of {top}", v1.recovered_height);
    let mut c1 = v1.connect();
    let top = *chain0.keys().next_back().unwrap();
    let mut chain1 = collect_to_height(&mut c1, top);
    clients[1] = c1;
    vs[1] = Some(v1);
    {
        let others: Vec<&Validator> = vs.iter().flatten().collect();
        commits_everywhere(&c, &mut clients, 1, (&mut chain0, &mut chain1), 1600..1640, &others);
    }

    // A wiped validator joins the pruned cluster from a snapshot (blocks
    // from height 1 are gone everywhere) and takes part again.
    let (v3, mut c3, base) = wiped_joins(&c, &mut vs, 3);
    assert!(base >= lowest, "joined at {base}, below the retained range from {lowest}");
    let top = *chain0.keys().next_back().unwrap();
    let mut chain3 = collect_to_height(&mut c3, top.max(base + 1));
    assert_same_blocks(&chain0, &chain3);
    clients[3] = c3;
    let others: Vec<&Validator> = vs.iter().flatten().collect();
    commits_everywhere(&c, &mut clients, 3, (&mut chain0, &mut chain3), 1640..1700, &others);
    drop(v3);
}

#[test]
fn a_validator_behind_every_retained_block_moves_its_store_aside_and_joins_from_a_snapshot() {
    // Retention by a byte budget here: three 64 KiB segments.
    let c = Cluster::new(4, |cfg| {
        cfg.block.max_txs = 10;
        cfg.consensus.snapshot_interval = 8;
        cfg.storage.retain_bytes = 3 * 64 * 1024;
        cfg.storage.segment_bytes = 64 * 1024;
        cfg.api.enabled = true;
        cfg.api.listen = "127.0.0.1:0".into();
    });
    let (mut vs, mut clients) = four_that_committed(&c, 100);
    vs[2].take().unwrap().kill9();
    let behind = store_check(&c.net.nodes[2].data_dir);
    let height: u64 = behind.split("OK: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    // The others go on until they pruned past it.
    let b: Vec<_> = (100..1500).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().enumerate().filter(|(i, _)| *i != 2).map(|(_, c)| c).collect::<Vec<_>>(), &b);
    let mut chain0 = collect(&mut clients[0], &nonces(&b));
    for (v, addr) in vs.iter().flatten().map(|v| (v, api_addr(v))) {
        wait_pruned_from(v, height + 2);
        let (code, body) = http_get(&addr, "/blocks/1");
        let lowest = serde_json::from_str::<serde_json::Value>(&body).unwrap()["lowest_retained"].as_u64();
        assert!(code == 410 && lowest.is_some_and(|l| l > height + 1), "{addr}: {code} {body}");
    }
    // The budget holds, give or take the segments above the newest base,
    // once validator 0 pruned after its last block (the wait above may have
    // seen an earlier pruning: the store grew after it).
    let v0 = vs[0].as_ref().unwrap();
    loop {
        let kept: u64 = segments(&c.net.nodes[0].data_dir).iter().map(|s| s.1).sum();
        if kept <= 6 * 64 * 1024 {
            break;
        }
        let e = wait_log(v0, "pruned block segments", std::time::Duration::from_secs(60));
        eprintln!("{kept} bytes kept against a 192 KiB budget; pruned again to {}", e["fields"]["lowest"]);
    }
    let v2 = c.start(2);
    assert!(v2.recovered_height >= height.min(1));
    let e = wait_log(&v2, "starting again to join from a snapshot", std::time::Duration::from_secs(60));
    assert!(e["fields"]["message"].is_string());
    let joined = wait_log(
        &v2,
        "joined from a snapshot; catching up with the blocks above it",
        std::time::Duration::from_secs(60),
    );
    let base = joined["fields"]["height"].as_u64().unwrap();
    assert!(base > height, "joined at {base}, behind at {height}");
    // Its old store is kept aside, not deleted.
    let aside = c.net.nodes[2].data_dir.join(format!("behind-{height}"));
    assert!(std::fs::read_dir(&aside).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("blocks-")));
    // The start again closed the direct connections: connect anew. New
    // txs commit in the same blocks here and at validator 1 (so it caught
    // up through every block above its snapshot first).
    clients[2] = v2.connect();
    let mut chain2 = BTreeMap::new();
    let others: Vec<&Validator> = vs.iter().flatten().collect();
    commits_everywhere(&c, &mut clients, 2, (&mut chain0, &mut chain2), 1500..1540, &others);
    drop(v2);
}

/// A cluster with nothing to do stays whole: for a minute, sampled each
/// second, every validator hears all three peers, is ready, and no view
/// changes (the primary's heartbeats and every validator's liveness
/// beacons; QUIC keep-alives hold the connections).
#[test]
fn an_idle_cluster_keeps_every_peer_and_its_view_for_a_minute() {
    let (_cluster, vs) = four_with_api();
    let addrs: Vec<String> = vs.iter().map(api_addr).collect();
    // Until each has heard every peer once (beacons start with the core).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for a in &addrs {
        while metric(&http_get(a, "/metrics").1, "p2p_peers_connected") < 3.0 {
            assert!(std::time::Instant::now() < deadline, "{a}: peers never all heard");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let start = std::time::Instant::now();
    let mut samples = 0;
    while start.elapsed() < std::time::Duration::from_secs(60) {
        for a in &addrs {
            let (code, body) = http_get(a, "/ready");
            assert_eq!(code, 200, "{a} not ready after {:?} idle: {body}", start.elapsed());
            let page = http_get(a, "/metrics").1;
            assert_eq!(metric(&page, "p2p_peers_connected"), 3.0, "{a} after {:?}", start.elapsed());
            assert_eq!(metric(&page, "consensus_view_changes_total"), 0.0, "{a} after {:?}", start.elapsed());
        }
        samples += 1;
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(samples >= 30);
    for v in &vs {
        assert_no_evidence(v);
    }
    for v in vs {
        assert!(v.terminate().success());
    }
}

#[test]
fn a_set_change_signed_by_a_quorum_is_scheduled_on_every_validator_and_one_short_is_refused() {
    use std::ffi::OsStr;
    let c = Cluster::new(4, |cfg| {
        cfg.api.enabled = true;
        cfg.api.listen = "127.0.0.1:0".into();
        cfg.log.level = "debug".into(); // `dlq flushed`, waited on below
    });
    let vs: Vec<Validator> = (0..4).map(|i| c.start(i)).collect();
    let apis: Vec<String> = vs.iter().map(api_addr).collect();
    let cli = |args: &[&OsStr]| cli(args, &[]);
    let dir = c.dir.path();
    let (change, key5, producer) = (dir.join("change.json"), dir.join("v5.pem"), dir.join("producer.pem"));
    let cfg = |i: usize| c.net.nodes[i].config.as_os_str();
    let direct = c.net.nodes[0].direct.to_string();
    let s = OsStr::new;

    let (ok, pubkey, err) = cli(&[s("keygen"), s("--out"), key5.as_os_str()]);
    assert!(ok, "{err}");
    let add = format!("5:{}", pubkey.trim());
    let (ok, out, err) = cli(&[
        s("reconfig"),
        s("propose"),
        s("--config"),
        cfg(0),
        s("--epoch"),
        s("0"),
        s("--add"),
        s(&add),
        s("--out"),
        change.as_os_str(),
    ]);
    assert!(ok && out.contains("1 change(s) of epoch 0"), "{out}{err}");
    for (i, want) in [(0, "1 of 3"), (1, "2 of 3")] {
        let (ok, out, err) = cli(&[s("reconfig"), s("sign"), change.as_os_str(), s("--config"), cfg(i)]);
        assert!(ok && out.contains(want), "{out}{err}");
    }
    let submit = |check: bool| {
        let mut args = vec![
            s("reconfig"),
            s("submit"),
            change.as_os_str(),
            s("--producer-key"),
            producer.as_os_str(),
            s("--direct"),
            s(&direct),
        ];
        if check {
            args.extend([s("--config"), cfg(0)]);
        }
        cli(&args)
    };
    // Two of the three needed: named before anything is sent.
    let (ok, _, err) = submit(true);
    assert!(!ok && err.contains("2 valid signatures of current validators; 3 needed"), "{err}");
    // Sent anyway: ordered, and refused by execution on every validator.
    let (ok, out, err) = submit(false);
    assert!(ok && out.contains("ordered in block"), "{out}{err}");
    let refused_at: u64 = out.split("ordered in block ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    // Every validator dead-letters it at its block, alike (its only DLQ record).
    for (i, v) in vs.iter().enumerate() {
        let recs = wait_dlq(v, &c.net.nodes[i].data_dir.join("dlq.jsonl"), 1);
        assert_eq!(recs.len(), 1, "validator {}: {recs:?}", i + 1);
        assert_eq!(
            (&recs[0]["reason"], &recs[0]["origin"]),
            (&"reconfiguration_refused".into(), &format!("block/{refused_at}").into())
        );
        let counted =
            metric(&http_get(&apis[i], "/metrics").1, "ingest_rejected_total{reason=\"reconfiguration_refused\"}");
        assert_eq!(counted, 1.0, "validator {}", i + 1);
    }
    // The third signature, then it is scheduled everywhere.
    let (ok, out, err) = cli(&[s("reconfig"), s("sign"), change.as_os_str(), s("--config"), cfg(2)]);
    assert!(ok && out.contains("3 of 3"), "{out}{err}");
    let (ok, out, err) = submit(true);
    assert!(ok, "{out}{err}");
    let height: u64 = out.split("ordered in block ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert!(height > refused_at);
    let (interval, window) = (8, 16); // CONSENSUS_CHECKPOINT_INTERVAL's and CONSENSUS_WINDOW's defaults
    let switch = (height + window).div_ceil(interval) * interval;
    for (v, addr) in vs.iter().zip(&apis) {
        // Logged once `/validators` shows it.
        let e = wait_log(
            v,
            "validator set change scheduled; it takes effect above the switch height",
            std::time::Duration::from_secs(60),
        );
        assert_eq!(
            (e["fields"]["epoch"].as_u64(), e["fields"]["switch_height"].as_u64()),
            (Some(1), Some(switch)),
            "{e}"
        );
        let page: serde_json::Value = serde_json::from_str(&http_get(addr, "/validators").1).unwrap();
        assert_eq!(page["epoch"], 0, "{page}");
        let next = &page["scheduled"];
        assert_eq!((next["epoch"].as_u64(), next["switch_height"].as_u64()), (Some(1), Some(switch)), "{page}");
        let ids: Vec<u64> = next["validators"].as_array().unwrap().iter().map(|v| v["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(next["validators"][4]["public_key"], pubkey.trim());
    }
    drop(vs);
}

/// Block `h` as validator API `api` serves it.
fn api_block(api: &str, h: u64) -> serde_json::Value {
    serde_json::from_str(&http_get(api, &format!("/blocks/{h}")).1).unwrap()
}

/// The chain's height at validator API `api`.
fn api_top(api: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(&http_get(api, "/blocks?limit=1").1).unwrap()["height"].as_u64().unwrap()
}

/// How many times each tx nonce (hex) is in blocks 1..=`to` at `api`.
fn api_nonces(api: &str, to: u64) -> BTreeMap<String, u64> {
    let mut seen = BTreeMap::new();
    for h in 1..=to {
        for t in api_block(api, h)["txs"].as_array().unwrap() {
            *seen.entry(t["nonce"].as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    seen
}

/// A set change proposed with validator 1's config (`--epoch epoch`, then
/// `change`: e.g. `["--remove", "3"]`), signed by the validators at
/// `signers` (indexes), and submitted to the direct source at `direct`
/// (checked first with validator 1's config if `check`): the height that
/// ordered it, and the switch height it gives with the default checkpoint
/// interval (8) and window (16).
fn set_change(c: &Cluster, epoch: u64, change: &[&str], signers: &[usize], direct: &str, check: bool) -> (u64, u64) {
    use std::ffi::OsStr;
    let s = OsStr::new;
    let file = c.dir.path().join(format!("change-{epoch}.json"));
    let producer = c.dir.path().join("producer.pem");
    let cfg = |i: usize| c.net.nodes[i].config.as_os_str();
    let epoch = epoch.to_string();
    let mut args = vec![s("reconfig"), s("propose"), s("--config"), cfg(0), s("--epoch"), s(&epoch)];
    args.extend(change.iter().map(|a| s(a)));
    args.extend([s("--out"), file.as_os_str()]);
    let (ok, out, err) = cli(&args, &[]);
    assert!(ok, "{out}{err}");
    for &i in signers {
        let (ok, out, err) = cli(&[s("reconfig"), s("sign"), file.as_os_str(), s("--config"), cfg(i)], &[]);
        assert!(ok, "{out}{err}");
    }
    let mut args = vec![
        s("reconfig"),
        s("submit"),
        file.as_os_str(),
        s("--producer-key"),
        producer.as_os_str(),
        s("--direct"),
        s(direct),
    ];
    if check {
        args.extend([s("--config"), cfg(0)]);
    }
    let (ok, out, err) = cli(&args, &[]);
    assert!(ok, "{out}{err}");
    let h: u64 = out.split("ordered in block ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    (h, (h + 16).div_ceil(8) * 8)
}

/// A key rotation under load: validator 4 holds the key it rotates to; a
/// `rotate` change signed by three of four is ordered at some height h and
/// takes effect above the switch height H (the first checkpoint at least a
/// window and an interval past h). Every validator hands over to the new
/// set there and starts again on it; blocks up to H carry the old key's
/// commits, blocks above it the new key's, never the old one; every tx
/// sent before, across and after the switch commits exactly once.
#[test]
fn a_rotated_key_takes_effect_at_the_switch_height_under_load_and_nothing_is_lost() {
    use cybermesh::protocol::consensus::pbft::in_epoch;
    use cybermesh::protocol::crypto;
    let c = Cluster::new(4, |cfg| {
        cfg.api.enabled = true;
        cfg.api.listen = "127.0.0.1:0".into();
        cfg.block.max_txs = 10; // many blocks: the load runs past the switch
    });
    let next = c.dir.path().join("v4-next.pem");
    let (ok, next_pub, err) = cli(&[std::ffi::OsStr::new("keygen"), "--out".as_ref(), next.as_os_str()], &[]);
    assert!(ok, "{err}");
    let next_pub = next_pub.trim().to_string();
    let mut vs: Vec<Validator> = (0..3).map(|i| c.start(i)).collect();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&c.net.nodes[3].config).env("CYBERMESH_NEXT_KEY_FILE", &next);
    vs.push(Validator::spawn(cmd));
    for v in &vs {
        wait_log(v, "genesis complete", std::time::Duration::from_secs(60));
    }
    let page: serde_json::Value = serde_json::from_str(&http_get(&api_addr(&vs[0]), "/validators").1).unwrap();
    let old_pub = page["validators"][3]["public_key"].as_str().unwrap().to_string();
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();

    // Before: committed by the genesis set.
    let a: Vec<_> = (0..100).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    collect(&mut clients[0], &nonces(&a));

    // The change, signed by validators 1, 2 and 3 (checked first).
    let rotate = format!("4:{next_pub}");
    let (_, switch) = set_change(&c, 0, &["--rotate", &rotate], &[0, 1, 2], &vs[0].addr.to_string(), true);

    // Load across the switch: each validator starts again on the new set
    // there (its direct connections close with it).
    let b: Vec<_> = (100..800).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &b);
    let mut apis = vec![];
    for v in vs.iter_mut() {
        let e = wait_log(v, "validator set change took effect", std::time::Duration::from_secs(60));
        assert_eq!((e["fields"]["epoch"].as_u64(), e["fields"]["height"].as_u64()), (Some(1), Some(switch)), "{e}");
        apis.push(restarted(v));
    }
    for addr in &apis {
        let page: serde_json::Value = serde_json::from_str(&http_get(addr, "/validators").1).unwrap();
        assert_eq!((page["epoch"].as_u64(), page["from_height"].as_u64()), (Some(1), Some(switch)), "{page}");
        assert_eq!(page["validators"][3]["public_key"], next_pub.as_str(), "{page}");
        assert!(page["scheduled"].is_null(), "{page}");
        // The chain of epochs: the genesis set, then the rotated one with
        // the change that made it (signed by three of the genesis set).
        let epochs: serde_json::Value = serde_json::from_str(&http_get(addr, "/epochs").1).unwrap();
        let e = epochs["epochs"].as_array().unwrap();
        assert_eq!(e.len(), 2, "{epochs}");
        assert_eq!((e[0]["from_height"].as_u64(), e[0]["change"].is_null()), (Some(0), true), "{epochs}");
        assert_eq!(e[0]["validators"][3]["public_key"], old_pub.as_str(), "{epochs}");
        assert_eq!((e[1]["epoch"].as_u64(), e[1]["from_height"].as_u64()), (Some(1), Some(switch)), "{epochs}");
        assert_eq!(e[1]["validators"][3]["public_key"], next_pub.as_str(), "{epochs}");
        let change = hex::decode(e[1]["change"].as_str().unwrap()).unwrap();
        let rc = <cybermesh::proto::ReconfigurationPayload as prost::Message>::decode(&change[..]).unwrap();
        assert_eq!(rc.signatures.len(), 3, "{rc:?}");
    }

    // After: what the switch cut off (its mempools started again empty) is
    // sent again, as a client does on a closed connection (a repeat of a
    // committed tx is refused as such), and new txs commit.
    let api = &apis[0];
    let d: Vec<_> = (800..900).map(|i| anomaly(c.producer(), i)).collect();
    let all: Vec<_> = a.iter().chain(&b).chain(&d).cloned().collect();
    let top = resend_what_was_cut_off(&vs, api, &all);
    assert!(top > switch + 1, "the chain went on past the switch ({top})");

    // Each block certified by its epoch's keys: validator 4's old key up
    // to the switch, its new key above.
    let key = |hex_key: &str| -> crypto::PublicKey { hex::decode(hex_key).unwrap().try_into().unwrap() };
    let (old, new) = (key(&old_pub), key(&next_pub));
    for hh in 1..=top {
        let cert = api_block(api, hh)["certificate"].clone();
        let msg = cybermesh::edges::egress::commit_vote_bytes(
            cert["view"].as_u64().unwrap(),
            hh,
            &hex::decode(cert["value_digest"].as_str().unwrap()).unwrap(),
        );
        let signed = in_epoch(u64::from(hh > switch), &msg);
        let commits = cert["commits"].as_array().unwrap();
        let by = |k: &crypto::PublicKey| {
            commits.iter().any(|v| {
                let sig: [u8; 64] = hex::decode(v["signature"].as_str().unwrap()).unwrap().try_into().unwrap();
                v["validator"] == 4 && crypto::verify_one(k, &signed, &sig).is_ok()
            })
        };
        assert!(commits.len() >= 3, "block {hh}: {} commits", commits.len());
        assert!(!by(if hh > switch { &old } else { &new }), "block {hh}: a commit by the wrong key of validator 4");
        // Validator 4's commit, when the certificate carries one, is by its
        // key of that block's epoch.
        if commits.iter().any(|v| v["validator"] == 4) {
            assert!(by(if hh > switch { &new } else { &old }), "block {hh}: validator 4's commit does not verify");
        }
    }
    for v in &vs {
        assert_no_evidence(v);
    }
}

/// After a switch (validators started again, mempools empty): connects to
/// each of `vs`, sends every tx of `sent` not in the chain (as a client does
/// on a closed connection) and waits for them; returns the height then,
/// with every tx of `sent` in the chain exactly once. `api` is `vs[0]`'s,
/// whose commit stream is read: what it had not committed when the stream
/// opened is in the stream.
fn resend_what_was_cut_off(vs: &[Validator], api: &str, sent: &[cybermesh::protocol::event::Event]) -> u64 {
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();
    let before = api_nonces(api, api_top(api));
    let cut_off: Vec<_> = sent.iter().filter(|e| !before.contains_key(&hex::encode(e.nonce))).cloned().collect();
    eprintln!("{} of {} txs sent again", cut_off.len(), sent.len());
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &cut_off);
    collect(&mut clients[0], &nonces(&cut_off));
    let top = api_top(api);
    let seen = api_nonces(api, top);
    for e in sent {
        assert_eq!(seen.get(&hex::encode(e.nonce)), Some(&1), "tx {} committed once", hex::encode(e.nonce));
    }
    top
}

/// The validator's API address once it has started again on a new set (it
/// logs it as it starts), with its direct address updated.
fn restarted(v: &mut Validator) -> String {
    let e = wait_log(v, "HTTP API listening", std::time::Duration::from_secs(60));
    let api = e["fields"]["addr"].as_str().unwrap().to_string();
    let e = wait_log(v, "direct source listening", std::time::Duration::from_secs(60));
    v.addr = e["fields"]["addr"].as_str().unwrap().parse().unwrap();
    api
}

/// Waits for validator `removed` to stop at `switch` (a change removed it),
/// cleanly, and for each of `vs` to take epoch `epoch` there and start again;
/// returns their API addresses.
fn switched(removed: Option<Validator>, vs: &mut [Validator], epoch: u64, switch: u64) -> Vec<String> {
    if let Some(mut r) = removed {
        let e = wait_log(
            &r,
            "this validator is not in the new set: it orders nothing more",
            std::time::Duration::from_secs(60),
        );
        assert_eq!(e["fields"]["height"].as_u64(), Some(switch), "{e}");
        assert!(r.child.wait().unwrap().success(), "a removed validator exits cleanly");
    }
    let mut apis = vec![];
    for v in vs.iter_mut() {
        let e = wait_log(v, "validator set change took effect", std::time::Duration::from_secs(60));
        assert_eq!((e["fields"]["epoch"].as_u64(), e["fields"]["height"].as_u64()), (Some(epoch), Some(switch)), "{e}");
        apis.push(restarted(v));
    }
    apis
}

/// The ids `/validators` at `api` lists, with its epoch.
fn api_set(api: &str) -> (Option<u64>, Vec<u64>) {
    let page: serde_json::Value = serde_json::from_str(&http_get(api, "/validators").1).unwrap();
    let ids = page["validators"].as_array().unwrap().iter().map(|v| v["id"].as_u64().unwrap()).collect();
    (page["epoch"].as_u64(), ids)
}

/// A removal under load, five validators to four: validator 3 (in the
/// middle of the id order, so the ids after it take other replica ids) is
/// removed by a change signed by four of five. Above the switch height it
/// orders nothing: it stops cleanly (exit 0, naming why), the other four
/// go on as a set of four (quorum 3) and nothing sent is lost.
#[test]
fn a_removed_validator_stops_at_the_switch_and_four_go_on_under_load() {
    let c = Cluster::new(5, |cfg| {
        cfg.api.enabled = true;
        cfg.api.listen = "127.0.0.1:0".into();
        cfg.block.max_txs = 10;
    });
    let mut vs: Vec<Validator> = (0..5).map(|i| c.start(i)).collect();
    for v in &vs {
        wait_log(v, "genesis complete", std::time::Duration::from_secs(60));
    }
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();
    let a: Vec<_> = (0..100).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &a);
    collect(&mut clients[0], &nonces(&a));

    let (_, switch) = set_change(&c, 0, &["--remove", "3"], &[0, 1, 3, 4], &vs[0].addr.to_string(), true);
    let b: Vec<_> = (100..800).map(|i| anomaly(c.producer(), i)).collect();
    send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &b);
    let removed = vs.remove(2);
    let apis = switched(Some(removed), &mut vs, 1, switch);
    for addr in &apis {
        assert_eq!(api_set(addr), (Some(1), vec![1, 2, 4, 5]));
    }

    // What the switch cut off is sent again; new txs commit with four.
    let d: Vec<_> = (800..900).map(|i| anomaly(c.producer(), i)).collect();
    let all: Vec<_> = a.iter().chain(&b).chain(&d).cloned().collect();
    let top = resend_what_was_cut_off(&vs, &apis[0], &all);
    assert!(top > switch + 1, "the chain went on past the switch ({top})");
    // Above the switch, certificates of four (quorum 3), none by validator 3.
    for hh in switch + 1..=top {
        let commits = api_block(&apis[0], hh)["certificate"]["commits"].as_array().unwrap().clone();
        assert!(commits.len() >= 3 && commits.iter().all(|v| v["validator"] != 3), "block {hh}: {commits:?}");
    }
    for v in &vs {
        assert_no_evidence(v);
    }
}

/// 4 → 5 → 4 under load: validator 5 is configured as one a set change
/// adds (not in the genesis set); an `add` change signed by three of four
/// makes the set five above its switch height, and validator 5 joins from
/// the first snapshot whose set names it, then orders with the others.
/// A `remove` of validator 2 signed by four of five makes it four again:
/// validator 2 stops cleanly, the rest go on. Every tx commits once.
#[test]
fn four_to_five_to_four_validators_under_load_loses_nothing() {
    let c = Cluster::new(5, |cfg| {
        cfg.api.enabled = true;
        cfg.api.listen = "127.0.0.1:0".into();
        cfg.block.max_txs = 10;
        cfg.consensus.snapshot_interval = 8;
        // Genesis is validators 1-4; validator 5's address stays known.
        cfg.cluster.nodes.retain(|&i| i != 5);
        cfg.cluster.validators.remove("5");
        cfg.node.added_by_set_change = cfg.node.id == 5;
    });
    let key5 = cybermesh::protocol::crypto::read_key_file(&c.dir.path().join("validator-5.pem"), false).unwrap();
    let pub5 = hex::encode(cybermesh::protocol::crypto::public_key(&key5));
    let mut vs: Vec<Validator> = (0..4).map(|i| c.start(i)).collect();
    for v in &vs {
        wait_log(v, "genesis complete", std::time::Duration::from_secs(60));
    }
    vs.push(c.start(4)); // waits for a snapshot naming it
    let mut clients: Vec<Client> = vs[..4].iter().map(|v| v.connect()).collect();
    let mut sent = vec![];
    let mut load = |clients: &mut [Client], range: std::ops::Range<u64>| {
        let evs: Vec<_> = range.map(|i| anomaly(c.producer(), i)).collect();
        send_all(&mut clients.iter_mut().collect::<Vec<_>>(), &evs);
        sent.extend(evs.iter().cloned());
        evs
    };
    let a = load(&mut clients, 0..100);
    collect(&mut clients[0], &nonces(&a));

    // 4 → 5.
    let add = format!("5:{pub5}");
    let (_, switch1) = set_change(&c, 0, &["--add", &add], &[0, 1, 2], &vs[0].addr.to_string(), true);
    load(&mut clients, 100..500);
    switched(None, &mut vs[..4], 1, switch1);
    // More blocks, for a snapshot of the five to join from.
    let mut clients: Vec<Client> = vs[..4].iter().map(|v| v.connect()).collect();
    let b = load(&mut clients, 500..700);
    collect(&mut clients[0], &nonces(&b));
    let e = wait_log(
        &vs[4],
        "joined from a snapshot; catching up with the blocks above it",
        std::time::Duration::from_secs(60),
    );
    assert!(e["fields"]["height"].as_u64().unwrap() >= switch1, "{e}");
    let api5 = restarted(&mut vs[4]);
    assert_eq!(api_set(&api5), (Some(1), vec![1, 2, 3, 4, 5]));
    // Validator 5 orders with the others: new txs sent to it alone commit.
    let mut c5 = vs[4].connect();
    let e5 = load(std::slice::from_mut(&mut c5), 700..760);
    collect(&mut c5, &nonces(&e5));

    // 5 → 4: validator 2 removed (a change of epoch 1, judged against its set).
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();
    let (_, switch2) = set_change(&c, 1, &["--remove", "2"], &[0, 2, 3, 4], &vs[0].addr.to_string(), false);
    load(&mut clients, 760..1200);
    let removed = vs.remove(1);
    let apis = switched(Some(removed), &mut vs, 2, switch2);
    assert_eq!(api_set(&apis[0]), (Some(2), vec![1, 3, 4, 5]));

    // Nothing lost: what the switches cut off is sent again, and the last
    // txs commit with the four.
    let mut clients: Vec<Client> = vs.iter().map(|v| v.connect()).collect();
    load(&mut clients, 1200..1300);
    let top = resend_what_was_cut_off(&vs, &apis[0], &sent);
    // Each certificate names its epoch and that set's signers: validator 5
    // none before the first switch, validator 2 none after the second.
    for hh in 1..=top {
        let cert = api_block(&apis[0], hh)["certificate"].clone();
        let epoch = u64::from(hh > switch1) + u64::from(hh > switch2);
        let signers: Vec<u64> =
            cert["commits"].as_array().unwrap().iter().map(|v| v["validator"].as_u64().unwrap()).collect();
        let (set, quorum): (&[u64], usize) = match epoch {
            0 => (&[1, 2, 3, 4], 3),
            1 => (&[1, 2, 3, 4, 5], 4),
            _ => (&[1, 3, 4, 5], 3),
        };
        assert_eq!(cert["epoch"].as_u64(), Some(epoch), "block {hh}: {cert}");
        assert!(signers.len() >= quorum && signers.iter().all(|v| set.contains(v)), "block {hh}: {signers:?}");
    }
    for v in &vs {
        assert_no_evidence(v);
    }
}
