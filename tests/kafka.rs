//! The Kafka source and egress against a real Kafka-protocol broker (nisshi,
//! started by `scripts/setup-deps.sh`; `CYBERMESH_TEST_KAFKA_BROKERS`,
//! default 127.0.0.1:9092), with rdkafka on both sides. Each test uses its
//! own topics.

mod common;
use common::*;
use cybermesh::proto;
use cybermesh::protocol::crypto;
use cybermesh::protocol::event::{Event, TxKind};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

fn brokers() -> String {
    std::env::var("CYBERMESH_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Unique topic names for one test.
struct Topics {
    anomalies: String,
    evidence: String,
    policy: String,
    dlq: String,
    commits: String,
    reputation: String,
    policy_out: String,
    evidence_out: String,
    group: String,
}

impl Topics {
    fn new() -> Topics {
        let t = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Topics {
            anomalies: format!("{t}.anomalies"),
            evidence: format!("{t}.evidence"),
            policy: format!("{t}.policy"),
            dlq: format!("{t}.dlq"),
            commits: format!("{t}.commits"),
            reputation: format!("{t}.reputation-out"),
            policy_out: format!("{t}.policy-out"),
            evidence_out: format!("{t}.evidence-out"),
            group: format!("{t}-consensus"),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("INGEST_SOURCE", "kafka".into()),
            ("KAFKA_BROKERS", brokers()),
            ("KAFKA_INPUT_TOPICS", format!("{},{},{}", self.anomalies, self.evidence, self.policy)),
            ("KAFKA_CONSUMER_GROUP_ID", self.group.clone()),
            ("KAFKA_DLQ_TOPIC", self.dlq.clone()),
            ("CONTROL_COMMITS_TOPIC", self.commits.clone()),
            ("CONTROL_REPUTATION_TOPIC", self.reputation.clone()),
            ("CONTROL_POLICY_TOPIC", self.policy_out.clone()),
            ("CONTROL_EVIDENCE_TOPIC", self.evidence_out.clone()),
        ]
    }
}

fn start(s: &Setup, t: &Topics, extra_env: &[(&str, &str)]) -> Validator {
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&s.config).envs(t.env()).envs(extra_env.iter().copied());
    Validator::spawn(cmd)
}

/// A cluster validator's Kafka settings: these input topics, the test's own for the rest.
fn on_kafka(cfg: &mut cybermesh::runtime::config::Config, t: &Topics, inputs: Vec<String>) {
    cfg.ingest.source = cybermesh::runtime::config::SourceKind::Kafka;
    cfg.kafka.brokers = brokers();
    cfg.kafka.input_topics = inputs;
    cfg.kafka.consumer_group_id = t.group.clone();
    cfg.kafka.dlq_topic = t.dlq.clone();
    cfg.kafka.commits_topic = t.commits.clone();
    cfg.kafka.reputation_topic = t.reputation.clone();
    cfg.kafka.policy_topic = t.policy_out.clone();
    cfg.kafka.evidence_topic = t.evidence_out.clone();
}

fn producer() -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new().set("bootstrap.servers", brokers()).set("acks", "all").create().expect("producer")
}

fn produce(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, values: &[Vec<u8>]) {
    for v in values {
        let mut r = BaseRecord::<(), [u8]>::to(topic).payload(&v[..]);
        loop {
            match p.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    r = back;
                    p.poll(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(30)).expect("all produced messages acknowledged");
}

/// A reader of a topic from its beginning (own group).
fn reader(topic: &str) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    // Subscribe once the topic exists (its first message may still be on
    // its way): a group assigned nothing may not notice it appear.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(5));
        if md.is_ok_and(|m| m.topics().iter().any(|t| t.error().is_none() && !t.partitions().is_empty())) {
            break;
        }
        assert!(Instant::now() < deadline, "topic {topic} never appeared");
        let _ = c.poll(Duration::from_millis(100));
    }
    c.subscribe(&[topic]).expect("subscribe");
    c
}

/// Reads `topic` until `done` says so (bounded: 120 s).
fn read_until(topic: &str, mut done: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> bool) {
    let c = reader(topic);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "{topic}: not everything arrived within 120 s");
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if done(&m) => return,
            Some(Ok(_)) => {}
            Some(Err(e)) => eprintln!("reader {topic}: {e}"),
            None => {}
        }
    }
}

/// Commit events by height (one validator publishes), checked on the way:
/// signature and certificate, one block per height.
fn read_commits(topic: &str, validator: &[u8; 32], want: &BTreeSet<[u8; 16]>) -> BTreeMap<u64, proto::CommitEvent> {
    let mut by_height: BTreeMap<u64, proto::CommitEvent> = BTreeMap::new();
    let mut seen: BTreeSet<[u8; 16]> = BTreeSet::new();
    read_until(topic, |m| {
        let e = proto::CommitEvent::decode(m.payload().unwrap_or_default()).expect("a CommitEvent");
        assert_eq!(m.key(), Some(e.height.to_string().as_bytes()), "keyed by height");
        cybermesh::edges::egress::verify_commit_event(&e, &[*validator], 1).expect("commit event verifies");
        if let Some(old) = by_height.get(&e.height) {
            assert_eq!(old.block_hash, e.block_hash, "two blocks at height {}", e.height);
        }
        seen.extend(e.anomaly_ids.iter().map(|id| <[u8; 16]>::try_from(&id[..]).unwrap()));
        by_height.insert(e.height, e);
        // Every wanted id, and no height missing below the highest seen: the
        // commit topic may have several partitions (keyed by height), so a
        // block without wanted ids can arrive after a later one.
        let contiguous = by_height.keys().next_back().is_some_and(|&h| h == by_height.len() as u64);
        want.is_subset(&seen) && contiguous
    });
    by_height
}

/// `cybermesh store check` on the validator's data: intact, no tx twice.
fn assert_store_ok_without_repeats(s: &Setup) {
    let out = Command::new(BIN).args(["store", "check", "--data-dir"]).arg(s.data_dir()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("block store OK") && text.contains("(0 repeated)"), "{text}");
}

fn validator_key(s: &Setup) -> [u8; 32] {
    let k = crypto::read_key_file(&s.dir.path().join("v1.pem"), false).unwrap();
    crypto::public_key(&k)
}

#[test]
fn kafka_source_commits_dead_letters_each_bad_message_and_publishes_signed_events() {
    let s = Setup::single("");
    let t = Topics::new();
    let k = &s.producer;
    let now = now_ms();
    let good: Vec<Event> = (0..40).map(|i| anomaly(k, i)).collect();
    let (evidence, policy) = evidence_and_policy(k, good[0].id);
    let mut bad: Vec<(&str, Vec<u8>)> = bad_events(k).into_iter().map(|(r, e)| (r, e.encode())).collect();
    bad.extend([("malformed", b"\xff\xff\xff not protobuf".to_vec()), ("oversized", vec![0u8; 70_000])]);
    let p = producer();
    let mut values: Vec<Vec<u8>> = good.iter().map(|e| e.encode()).collect();
    values.extend(bad.iter().map(|(_, b)| b.clone()));
    // An exact resend: a duplicate of the tx, counted, not dead-lettered.
    values.push(good[0].encode());
    produce(&p, &t.anomalies, &values);
    produce(&p, &t.evidence, &[evidence.encode()]);
    produce(&p, &t.policy, &[policy.encode()]);
    // An evidence event on the anomalies topic is read as an anomaly: its
    // signature (over another domain) fails.
    produce(&p, &t.anomalies, &[Event::sign(TxKind::Evidence, k, [6; 16], vec![], now, [6; 4]).encode()]);

    let v = start(&s, &t, &[]);
    let key = validator_key(&s);
    let want: BTreeSet<[u8; 16]> = good.iter().map(|e| e.id).collect();
    let commits = read_commits(&t.commits, &key, &want);
    let committed: Vec<[u8; 16]> =
        commits.values().flat_map(|e| e.anomaly_ids.iter()).map(|i| i[..].try_into().unwrap()).collect();
    assert_eq!(committed.len(), want.len(), "every valid anomaly exactly once, no bad one");
    let all_txs = commits.values().map(|e| e.tx_count).sum::<u32>();
    assert_eq!(commits.keys().copied().collect::<Vec<_>>(), (1..=commits.len() as u64).collect::<Vec<_>>());

    // One DLQ record per bad message, with its reason and source position.
    let mut recs: Vec<HashMap<String, String>> = vec![];
    read_until(&t.dlq, |m| {
        let h = m.headers().expect("DLQ records carry headers");
        let map: HashMap<String, String> = h
            .iter()
            .map(|x| (x.key.to_string(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned()))
            .collect();
        assert!(!m.payload().unwrap_or_default().is_empty(), "the original message travels with it");
        recs.push(map);
        recs.len() == bad.len() + 1
    });
    let mut expected: Vec<&str> = bad.iter().map(|(r, _)| *r).collect();
    expected.push("bad_signature");
    expected.sort();
    let mut got: Vec<&str> = recs.iter().map(|r| r["reason"].as_str()).collect();
    got.sort();
    assert_eq!(got, expected);
    for r in &recs {
        assert_eq!(r["source_topic"], t.anomalies);
        assert_eq!(r["validator_id"], "1");
        assert!(r["source_offset"].parse::<i64>().unwrap() >= 0);
        assert!(r["source_partition"].parse::<i32>().unwrap() >= 0);
        assert!(!r["detail"].is_empty());
    }

    // Derived events, each signed: the policy update; an evidence request
    // for each high-severity, low-confidence anomaly; the producer's
    // reputation, whose totals end at every tx the state machine applied.
    read_until(&t.policy_out, |m| {
        let e = proto::PolicyUpdateEvent::decode(m.payload().unwrap()).unwrap();
        assert_eq!((e.policy_id.as_str(), e.tx_id.as_slice()), ("block-10.0.0.1", &policy.id[..]));
        let sig: [u8; 64] = e.signature[..].try_into().unwrap();
        crypto::verify_one(&key, &cybermesh::edges::egress::policy_signed_bytes(&e), &sig).expect("signed");
        true
    });
    let flagged: BTreeSet<Vec<u8>> = good
        .iter()
        .filter(|e| {
            let a = proto::AnomalyPayload::decode(&e.payload[..]).unwrap();
            a.severity >= 8 && a.confidence < 0.7
        })
        .map(|e| e.id.to_vec())
        .collect();
    assert!(!flagged.is_empty());
    let mut requested = BTreeSet::new();
    read_until(&t.evidence_out, |m| {
        let e = proto::EvidenceRequestEvent::decode(m.payload().unwrap()).unwrap();
        let sig: [u8; 64] = e.signature[..].try_into().unwrap();
        crypto::verify_one(&key, &cybermesh::edges::egress::evidence_request_signed_bytes(&e), &sig).expect("signed");
        requested.insert(e.anomaly_id);
        requested.len() == flagged.len()
    });
    assert_eq!(requested, flagged);
    read_until(&t.reputation, |m| {
        let e = proto::ReputationEvent::decode(m.payload().unwrap()).unwrap();
        assert_eq!(e.producer_pubkey, crypto::public_key(k).to_vec());
        let sig: [u8; 64] = e.signature[..].try_into().unwrap();
        crypto::verify_one(&key, &cybermesh::edges::egress::reputation_signed_bytes(&e), &sig).expect("signed");
        e.accepted == all_txs as u64
    });
    assert_eq!(all_txs, 42, "40 anomalies, the evidence and the policy");

    // Every message is finished: the group's committed offsets reach the end.
    wait_committed_offsets(&format!("{}-node-1", t.group), &t.anomalies);
    assert!(v.terminate().success());
}

/// A group's committed offsets and the high watermarks of every non-empty
/// partition of `topic`.
fn offsets(group: &str, topic: &str) -> (BaseConsumer, BTreeMap<i32, i64>, BTreeMap<i32, i64>) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    assert!(!parts.is_empty());
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for &p in &parts {
        tpl.add_partition(topic, p);
        let end = c.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks").1;
        if end > 0 {
            ends.insert(p, end); // an empty partition has nothing to commit
        }
    }
    let got: BTreeMap<i32, i64> = c
        .committed_offsets(tpl, Duration::from_secs(5))
        .map(|l| {
            l.elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (c, got, ends)
}

/// Messages committed by `group` on `topic`, and messages in it.
fn group_progress(group: &str, topic: &str) -> (i64, i64) {
    let (_, got, ends) = offsets(group, topic);
    (got.values().sum(), ends.values().sum())
}

/// Waits (bounded) until `group` has committed, on every non-empty
/// partition of `topic`, the offset after its last message.
fn wait_committed_offsets(group: &str, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (c, got, ends) = offsets(group, topic);
        if got == ends {
            return;
        }
        assert!(Instant::now() < deadline, "group {group} committed {got:?} on {topic}, not {ends:?}");
        // The broker answers the queries; each round trip is the wait.
        let _ = c.poll(Duration::from_millis(200));
    }
}

#[test]
fn kill9_mid_stream_then_restart_processes_every_message_and_commits_none_twice() {
    let s = Setup::single("");
    let t = Topics::new();
    let evs: Vec<Event> = (0..20_000).map(|i| anomaly(&s.producer, i)).collect();
    let p = producer();
    produce(&p, &t.anomalies, &evs.iter().map(|e| e.encode()).collect::<Vec<_>>());
    let key = validator_key(&s);

    // Small blocks (1,000 of them, one fsync each): the kill lands mid-stream.
    let small_blocks = [("BLOCK_MAX_TXS", "20")];
    let v = start(&s, &t, &small_blocks);
    loop {
        let e = wait_log(&v, "committed", Duration::from_secs(60));
        if e["fields"]["height"].as_u64().unwrap() >= 20 {
            break;
        }
    }
    v.kill9();
    // Killed mid-stream: not every message was finished (and committed).
    let (committed, end) = group_progress(&format!("{}-node-1", t.group), &t.anomalies);
    assert!(committed < end, "the stream was already finished ({committed} of {end}) when the validator was killed");

    let v = start(&s, &t, &small_blocks);
    let all: BTreeSet<[u8; 16]> = evs.iter().map(|e| e.id).collect();
    let commits = read_commits(&t.commits, &key, &all);
    // Each id in exactly one block (a height republished after the restart
    // is the same block).
    let mut count: HashMap<[u8; 16], u32> = HashMap::new();
    for e in commits.values() {
        for id in &e.anomaly_ids {
            *count.entry(id[..].try_into().unwrap()).or_default() += 1;
        }
    }
    assert_eq!(count.len(), all.len());
    assert!(count.values().all(|&c| c == 1), "a tx committed twice");
    wait_committed_offsets(&format!("{}-node-1", t.group), &t.anomalies);
    assert!(v.terminate().success());
    assert_store_ok_without_repeats(&s);
}

/// The README's wire contract is enough for another language: the Python
/// example producer (confluent-kafka, cryptography, the .proto files)
/// publishes signed anomalies; a 4-validator cluster consumes them from
/// Kafka; the Python commit consumer checks every commit event it reads
/// (publisher signature and a quorum's commit votes) and finds every id.
#[test]
fn cluster_python_producer_and_commit_consumer_interoperate() {
    let t = Topics::new();
    let c = Cluster::new(4, |cfg| {
        cfg.ingest.source = cybermesh::runtime::config::SourceKind::Kafka;
        cfg.kafka.brokers = brokers();
        cfg.kafka.input_topics = vec![t.anomalies.clone(), t.evidence.clone(), t.policy.clone()];
        cfg.kafka.consumer_group_id = t.group.clone();
        cfg.kafka.dlq_topic = t.dlq.clone();
        cfg.kafka.commits_topic = t.commits.clone();
    });
    let vs: Vec<Validator> = (0..4).map(|i| c.start(i)).collect();
    for v in &vs {
        wait_log(v, "genesis complete", Duration::from_secs(60));
    }
    let key_file = c.dir.path().join("producer.pem"); // written by the devnet
    assert_eq!(
        crypto::read_key_file(&key_file, false).map(|k| crypto::public_key(&k)).ok(),
        Some(crypto::public_key(c.producer()))
    );
    let py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python");
    let out = Command::new("python3")
        .arg(py.join("producer.py"))
        .args(["--brokers", &brokers(), "--topic", &t.anomalies, "--count", "60", "--key"])
        .arg(&key_file)
        .output()
        .expect("python3");
    assert!(out.status.success(), "producer.py: {}", String::from_utf8_lossy(&out.stderr));
    let ids = String::from_utf8(out.stdout).unwrap();
    assert_eq!(ids.lines().count(), 60);
    let ids_file = c.dir.path().join("ids.txt");
    std::fs::write(&ids_file, &ids).unwrap();
    let v = cybermesh::runtime::config::Config::load(Some(&c.net.nodes[0].config)).unwrap().validate().unwrap();
    let keys: Vec<String> = v.validators.values().map(hex::encode).collect();
    let out = Command::new("python3")
        .arg(py.join("commit_consumer.py"))
        .args(["--brokers", &brokers(), "--topic", &t.commits, "--quorum", "3", "--timeout", "120"])
        .args(["--validators", &keys.join(","), "--expect"])
        .arg(&ids_file)
        .output()
        .expect("python3");
    let report = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        for e in vs[0].logs.try_iter() {
            eprintln!("validator 1: {e}");
        }
    }
    assert!(out.status.success(), "commit_consumer.py: {report} {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(r["anomalies"], 60);
    assert!(r["verified_heights"].as_u64().unwrap() >= 1);
    drop(vs);
}

/// A Kafka-protocol broker of this test's own (nisshi, in PATH after
/// `scripts/setup-deps.sh`), killed on drop.
struct Broker(std::process::Child);

impl Broker {
    /// Starts `nisshi broker` with `args` and waits for its "ready" line.
    fn start(args: &[&str]) -> Broker {
        use std::io::BufRead;
        let mut child = Command::new("nisshi")
            .arg("broker")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("nisshi is installed (scripts/setup-deps.sh)");
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("ready") => break,
                Some(Ok(_)) => {}
                _ => panic!("nisshi exited before it was ready"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Broker(child)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// TLS and SASL/SCRAM-SHA-512 as the manual's variables set them: a broker
/// that only accepts TLS connections from authenticated users; the
/// validator consumes and publishes over it; a wrong password stops the
/// validator at startup with an error naming the settings.
#[test]
fn kafka_over_tls_with_scram_sha_512() {
    let dir = tempfile::tempdir().unwrap();
    // A certificate for "localhost", trusted through KAFKA_CA_LOCATION.
    let (cert_pem, key_pem, _) = localhost_cert(dir.path());
    // SCRAM users live in the broker's storage: PostgreSQL (a database of
    // this test's own). Users are created through a plain listener first.
    let db = format!("nisshi_{}", uuid::Uuid::new_v4().simple());
    let dsn = std::env::var("CYBERMESH_TEST_DB_DSN")
        .unwrap_or_else(|_| "postgresql://cybermesh:cybermesh@127.0.0.1:5432/cybermesh".into());
    let out = Command::new("psql").arg(&dsn).args(["-qc", &format!("CREATE DATABASE {db}")]).output().expect("psql");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // nisshi checks PostgreSQL's own certificate, which names localhost.
    let storage = format!("postgres://cybermesh:cybermesh@localhost/{db}");
    let plain = free_port();
    {
        let url = format!("tcp://127.0.0.1:{plain}");
        let _b =
            Broker::start(&["--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", &storage]);
        let out = Command::new("nisshi")
            .args(["user", "create", "validator", "s3cret-Pw", "--mechanism", "scram512", "--broker", &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let port = free_port();
    let _broker = Broker::start(&[
        "--listener-url",
        &format!("tcp://127.0.0.1:{port}"),
        "--advertised-listener-url",
        &format!("tcp://localhost:{port}"),
        "--storage-engine",
        &storage,
        "--authentication",
        "--cert",
        cert_pem.to_str().unwrap(),
        "--key",
        key_pem.to_str().unwrap(),
        "--group-initial-rebalance-delay",
        "100ms",
    ]);
    let brokers = format!("localhost:{port}");
    let client = |password: &str| {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &brokers)
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanisms", "SCRAM-SHA-512")
            .set("sasl.username", "validator")
            .set("sasl.password", password)
            .set("ssl.ca.location", cert_pem.to_str().unwrap());
        c
    };
    let s = Setup::single("");
    let t = Topics::new();
    let evs: Vec<Event> = (0..50).map(|i| anomaly(&s.producer, i)).collect();
    let p: ThreadedProducer<DefaultProducerContext> = client("s3cret-Pw").set("acks", "all").create().unwrap();
    for e in &evs {
        let bytes = e.encode();
        p.send(BaseRecord::<(), [u8]>::to(&t.anomalies).payload(&bytes[..])).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).expect("produced over TLS with SCRAM");

    let security = |password: &'static str| {
        vec![
            ("KAFKA_BROKERS", brokers.clone()),
            ("KAFKA_TLS_ENABLED", "true".to_string()),
            ("KAFKA_CA_LOCATION", cert_pem.display().to_string()),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".to_string()),
            ("KAFKA_SASL_USERNAME", "validator".to_string()),
            ("KAFKA_SASL_PASSWORD", password.to_string()),
        ]
    };
    // A wrong password: the validator stops at startup and says why.
    let out = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&s.config)
        .envs(t.env())
        .envs(security("wrong"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach Kafka") && err.contains("SASL"), "{err}");

    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&s.config).envs(t.env()).envs(security("s3cret-Pw"));
    let v = Validator::spawn(cmd);
    let key = validator_key(&s);
    let want: BTreeSet<[u8; 16]> = evs.iter().map(|e| e.id).collect();
    let c: BaseConsumer = client("s3cret-Pw")
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    c.subscribe(&[&t.commits]).unwrap();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !want.is_subset(&seen) {
        assert!(Instant::now() < deadline, "commit events did not arrive over TLS");
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let e = proto::CommitEvent::decode(m.payload().unwrap()).unwrap();
            cybermesh::edges::egress::verify_commit_event(&e, &[key], 1).unwrap();
            seen.extend(e.anomaly_ids.iter().map(|i| <[u8; 16]>::try_from(&i[..]).unwrap()));
        }
    }
    assert!(v.terminate().success());
    drop(_broker);
    let _ = Command::new("psql").arg(&dsn).args(["-qc", &format!("DROP DATABASE {db}")]).output();
}

/// A pipeline far smaller than the stream: the consumer pauses its
/// partitions while the shards are full (instead of buffering), resumes,
/// and every message still commits once.
#[test]
fn backpressure_pauses_partitions_and_nothing_is_lost() {
    let s = Setup::single("");
    let t = Topics::new();
    let evs: Vec<Event> = (0..1500).map(|i| anomaly(&s.producer, i)).collect();
    produce(&producer(), &t.anomalies, &evs.iter().map(|e| e.encode()).collect::<Vec<_>>());
    let tiny = [
        ("RUNTIME_RING_CAPACITY", "1"),
        ("RUNTIME_VERIFY_BATCH", "8"),
        ("MEMPOOL_MAX_TXS", "20"),
        ("BLOCK_MAX_TXS", "10"),
    ];
    let v = start(&s, &t, &tiny);
    wait_log(&v, "verify shards full: Kafka partitions paused", Duration::from_secs(60));
    let all: BTreeSet<[u8; 16]> = evs.iter().map(|e| e.id).collect();
    let commits = read_commits(&t.commits, &validator_key(&s), &all);
    let n: usize = commits.values().map(|e| e.anomaly_ids.len()).sum();
    assert_eq!(n, all.len(), "each tx once");
    wait_committed_offsets(&format!("{}-node-1", t.group), &t.anomalies);
    assert!(v.terminate().success());
}

/// A producer over its rate: the excess is refused by execution (charged
/// against block time) and goes to the DLQ as `rate_limited`; the rest
/// commits; together, every message, and the commit events list only the
/// applied ones.
#[test]
fn rate_limited_messages_are_dead_lettered_and_finished() {
    let s = Setup::single("");
    let t = Topics::new();
    let evs: Vec<Event> = (0..40).map(|i| anomaly(&s.producer, i)).collect();
    produce(&producer(), &t.anomalies, &evs.iter().map(|e| e.encode()).collect::<Vec<_>>());
    let v = start(&s, &t, &[("MEMPOOL_RATE_PER_SECOND", "1"), ("MEMPOOL_RATE_BURST", "5")]);
    wait_committed_offsets(&format!("{}-node-1", t.group), &t.anomalies);
    // The verdicts come from executed blocks and are published with the
    // blocks' events: read both until every message is accounted for.
    let all: BTreeSet<[u8; 16]> = evs.iter().map(|e| e.id).collect();
    let (mut limited, mut committed) = (BTreeSet::<[u8; 16]>::new(), BTreeSet::<[u8; 16]>::new());
    let c = reader(&t.commits);
    c.subscribe(&[t.commits.as_str(), t.dlq.as_str()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while limited.union(&committed).count() < all.len() {
        assert!(
            Instant::now() < deadline,
            "{} committed + {} dead-lettered of {}",
            committed.len(),
            limited.len(),
            all.len()
        );
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else { continue };
        let bytes = m.payload().unwrap_or_default();
        if m.topic() == t.dlq {
            let reason = m.headers().and_then(|h| h.iter().find(|x| x.key == "reason").and_then(|x| x.value));
            assert_eq!(reason, Some(&b"rate_limited"[..]));
            let e = proto::AnomalyEvent::decode(bytes).unwrap();
            assert!(limited.insert(e.id[..].try_into().unwrap()), "one DLQ record per tx");
        } else {
            let e = proto::CommitEvent::decode(bytes).unwrap();
            for id in &e.anomaly_ids {
                assert!(committed.insert(id[..].try_into().unwrap()), "an id listed twice");
            }
        }
    }
    assert!(limited.len() >= 30, "{} rate limited", limited.len());
    assert!(committed.is_disjoint(&limited));
    assert_eq!(committed.len() + limited.len(), evs.len(), "every message committed or dead-lettered");
    assert!(v.terminate().success());
}

/// Messages now in `topic`, summed over its partitions (0 if it has none).
fn topic_len(topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    md.topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| c.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).map_or(0, |(lo, hi)| hi - lo))
        .sum()
}

/// Identity is the tx, not the payload: alerts with one payload under
/// distinct ids and nonces all commit; exact resends (while pending, and
/// after a kill -9 and restart, when they are redeliveries of committed
/// txs) are duplicates, neither committed again nor dead-lettered.
#[test]
fn identical_payloads_commit_once_each_and_resends_are_duplicates_across_a_kill9() {
    let s = Setup::single("");
    let t = Topics::new();
    let k = &s.producer;
    let payload = cybermesh::protocol::event::sample_anomaly_payload(7, 300);
    let same: Vec<Event> = (0..30).map(|_| anomaly_with(k, payload.clone())).collect();
    let bytes: Vec<Vec<u8>> = same.iter().map(|e| e.encode()).collect();
    let p = producer();
    // Each message twice, back to back.
    let twice: Vec<Vec<u8>> = bytes.iter().flat_map(|b| [b.clone(), b.clone()]).collect();
    produce(&p, &t.anomalies, &twice);
    let key = validator_key(&s);
    let v = start(&s, &t, &[]);
    let ids: BTreeSet<[u8; 16]> = same.iter().map(|e| e.id).collect();
    read_commits(&t.commits, &key, &ids);
    wait_committed_offsets(&format!("{}-node-1", t.group), &t.anomalies);
    v.kill9();
    // After the restart every message comes again: redeliveries of txs
    // already committed, and 20 new alerts with that payload too.
    let more: Vec<Event> = (0..20).map(|_| anomaly_with(k, payload.clone())).collect();
    let mut again = bytes.clone();
    again.extend(more.iter().map(|e| e.encode()));
    produce(&p, &t.anomalies, &again);
    let v = start(&s, &t, &[]);
    let all: BTreeSet<[u8; 16]> = same.iter().chain(&more).map(|e| e.id).collect();
    let commits = read_commits(&t.commits, &key, &all);
    wait_committed_offsets(&format!("{}-node-1", t.group), &t.anomalies);
    let mut count: HashMap<[u8; 16], u32> = HashMap::new();
    for e in commits.values() {
        for id in &e.anomaly_ids {
            *count.entry(id[..].try_into().unwrap()).or_default() += 1;
        }
    }
    assert_eq!(count.len(), all.len(), "every alert committed");
    assert!(count.values().all(|&c| c == 1), "an id listed twice: {count:?}");
    assert_eq!(topic_len(&t.dlq), 0, "duplicates are not dead-lettered");
    assert!(v.terminate().success());
    assert_store_ok_without_repeats(&s);
}

/// At startup the validator creates every missing input, DLQ and control
/// topic with the configured partitions (KAFKA_TOPIC_PARTITIONS).
#[test]
fn missing_topics_are_created_at_startup_with_the_configured_partitions() {
    let s = Setup::single("");
    let t = Topics::new();
    let v = start(&s, &t, &[("KAFKA_TOPIC_PARTITIONS", "3")]);
    // Created before the source subscribed, itself before the validator
    // reported itself up.
    assert!(v.startup.iter().any(|m| m == "Kafka topic created"), "{:?}", v.startup);
    assert!(v.startup.iter().any(|m| m == "Kafka source subscribed"), "{:?}", v.startup);
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let md = c.fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
    for topic in
        [&t.anomalies, &t.evidence, &t.policy, &t.dlq, &t.commits, &t.reputation, &t.policy_out, &t.evidence_out]
    {
        let found = md.topics().iter().find(|x| x.name() == topic.as_str());
        let parts = found.map(|x| x.partitions().len());
        assert_eq!(parts, Some(3), "topic {topic}");
    }
    assert!(v.terminate().success());
}

/// What one validator published: the ids its commit events list as
/// applied, and the block hash per height.
#[derive(Default, Debug)]
struct Published {
    applied: HashMap<[u8; 16], u32>,
    blocks: BTreeMap<u64, Vec<u8>>,
}

/// The whole promise on 4 real processes reading Kafka: alerts sharing a
/// payload, exact resends, a producer over its rate, the leader killed
/// (-9) and restarted, then a backup, then every early message sent again.
/// Each validator's commit events list every applied id exactly once, all
/// agree block by block, every other id is dead-lettered, and every
/// validator's DLQ records are the same.
#[test]
fn cluster_commits_each_alert_once_with_the_same_verdicts_everywhere_across_leader_and_backup_kill9() {
    let t = Topics::new();
    let c = Cluster::new(4, |cfg| {
        on_kafka(cfg, &t, vec![t.anomalies.clone(), t.evidence.clone(), t.policy.clone()]);
        // A rate the first burst exceeds (verdicts charged at block time).
        cfg.mempool.rate_per_second = 40;
        cfg.mempool.rate_burst = 60;
    });
    let mut vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    for v in vs.iter().flatten() {
        wait_log(v, "genesis complete", Duration::from_secs(60));
    }
    let k = c.producer();
    let payload = cybermesh::protocol::event::sample_anomaly_payload(3, 300);
    let alert = |same: bool, i: u64| {
        anomaly_with(k, if same { payload.clone() } else { cybermesh::protocol::event::sample_anomaly_payload(i, 300) })
    };
    let p = producer();
    // Phase 1: 120 alerts, half of them with one payload, each sent twice.
    let first: Vec<Event> = (0..120).map(|i| alert(i % 2 == 0, i)).collect();
    let first_bytes: Vec<Vec<u8>> = first.iter().map(|e| e.encode()).collect();
    produce(&p, &t.anomalies, &first_bytes.iter().flat_map(|b| [b.clone(), b.clone()]).collect::<Vec<_>>());
    read_until(&t.commits, |_| true); // something committed
    vs[0].take().unwrap().kill9(); // the leader of view 0
                                   // Phase 2, without the leader.
    let second: Vec<Event> = (0..60).map(|i| alert(i % 3 == 0, 1000 + i)).collect();
    produce(&p, &t.anomalies, &second.iter().map(|e| e.encode()).collect::<Vec<_>>());
    vs[0] = Some(c.start(0));
    vs[2].take().unwrap().kill9(); // a backup
                                   // Phase 3: new alerts, and every phase-1 message once more.
    let third: Vec<Event> = (0..60).map(|i| alert(i % 2 == 1, 2000 + i)).collect();
    let mut again: Vec<Vec<u8>> = third.iter().map(|e| e.encode()).collect();
    again.extend(first_bytes.iter().cloned());
    produce(&p, &t.anomalies, &again);
    vs[2] = Some(c.start(2));

    let all: BTreeSet<[u8; 16]> = first.iter().chain(&second).chain(&third).map(|e| e.id).collect();
    let setup = cybermesh::runtime::config::Config::load(Some(&c.net.nodes[0].config)).unwrap().validate().unwrap();
    let keys: Vec<[u8; 32]> = setup.validators.values().copied().collect();
    let mut by_key: HashMap<Vec<u8>, Published> = HashMap::new();
    let mut dead_by_validator: HashMap<String, BTreeMap<[u8; 16], String>> = HashMap::new();
    let consumer = reader(&t.commits);
    consumer.subscribe(&[t.commits.as_str(), t.dlq.as_str()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let done = |by_key: &HashMap<Vec<u8>, Published>, dead: &HashMap<String, BTreeMap<[u8; 16], String>>| {
        by_key.len() == 4
            && by_key.values().all(|p| {
                let v = p.blocks.keys().next_back().copied().unwrap_or(0);
                p.blocks.len() as u64 == v
            })
            && (1..=4).all(|id| {
                let d = dead.get(&id.to_string()).cloned().unwrap_or_default();
                let key = keys[id - 1].to_vec();
                by_key.get(&key).is_some_and(|p| all.iter().all(|i| p.applied.contains_key(i) || d.contains_key(i)))
            })
    };
    while !done(&by_key, &dead_by_validator) {
        assert!(Instant::now() < deadline, "not every validator published every id within 240 s");
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let bytes = m.payload().unwrap_or_default();
        if m.topic() == t.commits {
            let e = proto::CommitEvent::decode(bytes).expect("a CommitEvent");
            cybermesh::edges::egress::verify_commit_event(&e, &keys, 3).expect("commit event verifies");
            let p = by_key.entry(e.public_key.clone()).or_default();
            // A height published again after a restart is the same block,
            // with the same ids: count each height once.
            if let Some(old) = p.blocks.insert(e.height, e.block_hash.clone()) {
                assert_eq!(old, e.block_hash, "one validator published two blocks at height {}", e.height);
                continue;
            }
            for id in &e.anomaly_ids {
                *p.applied.entry(id[..].try_into().unwrap()).or_default() += 1;
            }
        } else {
            let h: HashMap<String, String> = m
                .headers()
                .expect("DLQ headers")
                .iter()
                .map(|x| (x.key.to_string(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned()))
                .collect();
            let e = proto::AnomalyEvent::decode(bytes).expect("the original event");
            let id: [u8; 16] = e.id[..].try_into().unwrap();
            let d = dead_by_validator.entry(h["validator_id"].clone()).or_default();
            if let Some(old) = d.insert(id, h["reason"].clone()) {
                assert_eq!(old, h["reason"], "two verdicts on one tx");
            }
        }
    }
    // The same chain everywhere.
    let chains: Vec<&BTreeMap<u64, Vec<u8>>> = by_key.values().map(|p| &p.blocks).collect();
    let top = chains.iter().map(|c| c.len()).min().unwrap() as u64;
    for h in 1..=top {
        assert!(chains.iter().all(|c| c[&h] == chains[0][&h]), "validators disagree at height {h}");
    }
    // Each applied id once per validator, the same set everywhere; the rest
    // dead-lettered, the same way by every validator, never also applied.
    let applied: Vec<BTreeSet<[u8; 16]>> = by_key.values().map(|p| p.applied.keys().copied().collect()).collect();
    for p in by_key.values() {
        assert!(p.applied.values().all(|&n| n == 1), "an id listed twice");
    }
    assert!(applied.iter().all(|a| *a == applied[0]), "validators applied different txs");
    let dead: Vec<&BTreeMap<[u8; 16], String>> = dead_by_validator.values().collect();
    assert_eq!(dead.len(), 4, "every validator wrote the committed verdicts");
    assert!(dead.iter().all(|d| *d == dead[0]), "DLQ records differ between validators");
    assert!(dead[0].values().all(|r| r == "rate_limited"), "{:?}", dead[0]);
    assert!(!dead[0].is_empty(), "the first burst exceeded the rate");
    assert!(applied[0].is_disjoint(&dead[0].keys().copied().collect()));
    assert_eq!(applied[0].len() + dead[0].len(), all.len(), "every alert applied or dead-lettered");
    drop(vs);
}

/// A validator whose disk was replaced joins from a snapshot while the
/// cluster runs on Kafka: its commit-event feed starts above the snapshot
/// (it used to read block 1 of a store that starts above it, and the core
/// stopped), so it publishes signed events for the new blocks and runs on.
#[test]
fn a_validator_joined_from_a_snapshot_publishes_commit_events_above_it() {
    let t = Topics::new();
    let c = Cluster::new(4, |cfg| {
        on_kafka(cfg, &t, vec![t.anomalies.clone()]);
        cfg.block.max_txs = 10;
        cfg.consensus.snapshot_interval = 8;
    });
    let mut vs: Vec<Option<Validator>> = (0..4).map(|i| Some(c.start(i))).collect();
    let (k, p) = (c.producer(), producer());
    produce(&p, &t.anomalies, &(0..200).map(|i| anomaly(k, i).encode()).collect::<Vec<_>>());
    wait_log(vs[0].as_ref().unwrap(), "chain snapshot ready", Duration::from_secs(60));
    vs[3].take().unwrap().kill9();
    std::fs::remove_dir_all(&c.net.nodes[3].data_dir).unwrap();
    let v3 = c.start(3);
    let joined = wait_log(&v3, "joined from a snapshot; catching up with the blocks above it", Duration::from_secs(60));
    let base = joined["fields"]["height"].as_u64().unwrap();
    let more: Vec<Event> = (1000..1040).map(|i| anomaly(k, i)).collect();
    produce(&p, &t.anomalies, &more.iter().map(|e| e.encode()).collect::<Vec<_>>());
    let setup = cybermesh::runtime::config::Config::load(Some(&c.net.nodes[0].config)).unwrap().validate().unwrap();
    let keys: Vec<[u8; 32]> = setup.validators.values().copied().collect();
    let key3 = keys[3];
    let want: BTreeSet<[u8; 16]> = more.iter().map(|e| e.id).collect();
    let (mut seen, mut lowest) = (BTreeSet::new(), u64::MAX);
    read_until(&t.commits, |m| {
        let e = proto::CommitEvent::decode(m.payload().unwrap_or_default()).expect("a CommitEvent");
        if e.public_key != key3 {
            return false;
        }
        cybermesh::edges::egress::verify_commit_event(&e, &keys, 3).expect("commit event verifies");
        // (Events of its first life, before the kill, are on the topic too.)
        let ids: Vec<[u8; 16]> = e.anomaly_ids.iter().map(|id| <[u8; 16]>::try_from(&id[..]).unwrap()).collect();
        if ids.iter().any(|id| want.contains(id)) {
            lowest = lowest.min(e.height);
        }
        seen.extend(ids);
        want.is_subset(&seen)
    });
    assert!(lowest > base, "validator 4 executed the new alerts at height {lowest}, not above its snapshot at {base}");
    assert!(v3.terminate().success(), "validator 4 kept running after the join");
}

/// `cybermesh reconfig submit --kafka-topic`: the change goes through the
/// broker like any tx, is consumed from an input topic naming `reconfig`,
/// ordered and executed; a single validator takes no set changes, so its
/// verdict is a `reconfiguration_refused` record on the DLQ topic, which the
/// command's own check named before `--force` sent it anyway.
#[test]
fn a_set_change_submitted_through_kafka_is_ordered_and_judged_by_execution() {
    let s = Setup::single("");
    let t = Topics::new();
    let reconfig_topic = format!("{}.reconfig", t.group);
    let inputs = format!("{},{},{},{reconfig_topic}", t.anomalies, t.evidence, t.policy);
    let env: Vec<(&str, String)> = t
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "KAFKA_INPUT_TOPICS")
        .chain([("KAFKA_INPUT_TOPICS", inputs)])
        .collect();
    let v = {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(&s.config).envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        Validator::spawn(cmd)
    };
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cli = |args: &[&str]| cli(args, &env_refs);
    let dir = s.dir.path();
    let (config, change, producer) = (s.config.to_str().unwrap(), dir.join("change.json"), dir.join("producer.pem"));
    crypto::write_key_file(&producer, &s.producer).unwrap();
    let new = hex::encode(crypto::public_key(&crypto::generate_key()));
    let (ok, out, err) = cli(&[
        "reconfig",
        "propose",
        "--config",
        config,
        "--epoch",
        "0",
        "--add",
        &format!("5:{new}"),
        "--out",
        change.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&["reconfig", "sign", change.to_str().unwrap(), "--config", config]);
    assert!(ok && out.contains("1 of 1"), "{out}{err}");
    let submit = |force: bool| {
        let mut args = vec![
            "reconfig",
            "submit",
            change.to_str().unwrap(),
            "--producer-key",
            producer.to_str().unwrap(),
            "--kafka-topic",
            &reconfig_topic,
            "--config",
            config,
        ];
        if force {
            args.push("--force");
        }
        cli(&args)
    };
    // The check names why the validator will refuse it.
    let (ok, _, err) = submit(false);
    assert!(!ok && err.contains("a chain of one validator takes no set changes"), "{err}");
    let (ok, out, err) = submit(true);
    assert!(ok && out.contains("produced to") && err.contains("sending it anyway"), "{out}{err}");
    let c = reader(&t.dlq);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no DLQ record for the change");
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else { continue };
        let reason = m.headers().and_then(|h| h.iter().find(|x| x.key == "reason").and_then(|x| x.value));
        assert_eq!(reason, Some(&b"reconfiguration_refused"[..]));
        let ev = proto::SignedEvent::decode(m.payload().unwrap()).unwrap();
        let payload = proto::ReconfigurationPayload::decode(&ev.payload[..]).unwrap();
        assert_eq!((payload.epoch, payload.changes.len(), payload.signatures.len()), (0, 1, 1));
        break;
    }
    assert!(v.terminate().success());
}
