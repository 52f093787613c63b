//! `cybermesh reconfig propose | sign | submit`: the operator's side of a
//! validator set change (`protocol::reconfig`, `docs/reconfiguration.md`).
//!
//! A change travels between operators as a JSON file: proposed once (the
//! chain and the changes), signed by each validator's operator with its own
//! validator key, submitted once q signatures are in. Every step checks what
//! it can and names what is wrong; execution decides, with the same rules.

use crate::protocol::crypto;
use crate::protocol::event::{Event, TxKind};
use crate::protocol::reconfig::{self, Change, ChangeKind, Reconfiguration};
use crate::runtime::config::Validated;
use anyhow::{bail, Context};
use prost::Message;
use std::path::Path;
use std::time::Duration;

/// The change file (`change.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeFile {
    /// The genesis config hash (hex), as `cybermesh config check` prints it.
    pub chain: String,
    /// The epoch it changes (`GET /validators` → `epoch`).
    pub epoch: u64,
    pub changes: Vec<ChangeEntry>,
    #[serde(default)]
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeEntry {
    /// `add`, `remove` or `rotate`.
    pub kind: String,
    pub id: u32,
    /// Hex; absent for a removal.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignatureEntry {
    pub id: u32,
    pub signature: String,
}

/// One change as the command line names it: `add=ID:KEY`, `remove=ID`,
/// `rotate=ID:KEY` (KEY in hex).
pub fn parse_change(kind: ChangeKind, arg: &str) -> anyhow::Result<Change> {
    let (id, key) = match (kind, arg.split_once(':')) {
        (ChangeKind::Remove, None) => (arg, None),
        (ChangeKind::Remove, Some(_)) => bail!("--remove takes a validator id only, got {arg:?}"),
        (_, Some((id, key))) => (id, Some(key)),
        (_, None) => bail!("{arg:?}: expected ID:PUBLIC_KEY_HEX"),
    };
    let id: u32 = id.trim().parse().with_context(|| format!("{id:?} is not a validator id"))?;
    let key = match key {
        Some(k) => crypto::parse_public_key_hex(k).map_err(|e| anyhow::anyhow!("validator {id}'s key: {e}"))?,
        None => [0; 32],
    };
    Ok(Change { kind, id, key })
}

impl ChangeFile {
    pub fn new(chain: &crate::Hash32, epoch: u64, changes: &[Change]) -> ChangeFile {
        ChangeFile {
            chain: hex::encode(chain),
            epoch,
            changes: changes
                .iter()
                .map(|c| ChangeEntry {
                    kind: kind_name(c.kind).into(),
                    id: c.id,
                    public_key: if c.kind == ChangeKind::Remove { String::new() } else { hex::encode(c.key) },
                })
                .collect(),
            signatures: vec![],
        }
    }

    pub fn read(path: &Path) -> anyhow::Result<ChangeFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a change file", path.display()))
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The change it carries, every field checked.
    pub fn reconfiguration(&self) -> anyhow::Result<Reconfiguration> {
        let chain: crate::Hash32 = hex::decode(&self.chain)
            .ok()
            .and_then(|b| b.try_into().ok())
            .context("chain: not 32 bytes of hex (the config hash `cybermesh config check` prints)")?;
        let mut changes = vec![];
        for c in &self.changes {
            let kind = match c.kind.as_str() {
                "add" => ChangeKind::Add,
                "remove" => ChangeKind::Remove,
                "rotate" => ChangeKind::Rotate,
                k => bail!("change of validator {}: kind {k:?} is not add, remove or rotate", c.id),
            };
            let key = match kind {
                ChangeKind::Remove => [0; 32],
                _ => crypto::parse_public_key_hex(&c.public_key)
                    .map_err(|e| anyhow::anyhow!("validator {}'s key: {e}", c.id))?,
            };
            changes.push(Change { kind, id: c.id, key });
        }
        let mut signatures = vec![];
        for s in &self.signatures {
            let sig = hex::decode(&s.signature)
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("validator {}'s signature: not 64 bytes of hex", s.id))?;
            signatures.push((s.id, sig));
        }
        Ok(Reconfiguration { chain, epoch: self.epoch, changes, signatures })
    }
}

fn kind_name(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Add => "add",
        ChangeKind::Remove => "remove",
        ChangeKind::Rotate => "rotate",
    }
}

/// Adds this validator's signature (its `node.key_file`, as `node.id`);
/// for a change of epoch 0, returns how many of the genesis set's
/// validators have signed and q (a later epoch's set is the chain's, not
/// the config's: `GET /epochs`; None).
pub fn sign(file: &mut ChangeFile, v: &Validated) -> anyhow::Result<Option<(usize, usize)>> {
    let rc = file.reconfiguration()?;
    let chain = v.config.consensus_fingerprint();
    if rc.chain != chain {
        bail!(
            "the change is for chain {}, this validator's config hash is {}: sign with the config of a validator of that chain",
            file.chain,
            hex::encode(chain)
        );
    }
    let me = v.config.node.id;
    let key = crypto::read_key_file(&v.config.node.key_file, true)
        .with_context(|| format!("reading this validator's key {}", v.config.node.key_file.display()))?;
    if rc.epoch == 0 && v.validators.get(&me) != Some(&crypto::public_key(&key)) {
        bail!("node.id {me} with the key in {} is not a validator of this set", v.config.node.key_file.display());
    }
    let sig = reconfig::sign(&key, &rc.chain, rc.epoch, &rc.changes);
    file.signatures.retain(|s| s.id != me);
    file.signatures.push(SignatureEntry { id: me, signature: hex::encode(sig) });
    file.signatures.sort_by_key(|s| s.id);
    let rc = file.reconfiguration()?;
    Ok((rc.epoch == 0)
        .then(|| (reconfig::valid_signers(&rc, &v.validators), reconfig::fault_tolerance(v.validators.len()).1)))
}

/// Checks the change against the genesis set and `epoch` as execution
/// will (so a refusal is named here, not found in the DLQ later).
pub fn preflight(rc: &Reconfiguration, v: &Validated) -> anyhow::Result<()> {
    // The rules execution judges by (`Validated::state_config`).
    let Some(rules) = v.state_config().chain else {
        bail!("the validators would refuse this change: a chain of one validator takes no set changes");
    };
    if rc.epoch > 0 {
        bail!(
            "the check knows the genesis set only (epoch 0); a change of epoch {} is judged against that epoch's set \
             (GET /epochs): leave out --config to send it unchecked",
            rc.epoch
        );
    }
    reconfig::check(rc, &rules.chain, rc.epoch, &rules.genesis)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("the validators would refuse this change: {e}"))
}

/// The change as a signed tx (kind 4) from `producer` (a configured
/// producer key): what goes to the direct source or a Kafka topic.
pub fn envelope(rc: &Reconfiguration, producer: &crypto::SigningKey, now_ms: u64) -> Event {
    let id: [u8; 16] = rand::random();
    let payload = rc.to_proto().encode_to_vec();
    Event::sign(TxKind::Reconfiguration, producer, id, payload, now_ms, rand::random())
}

/// Sends `ev` to a validator's direct source and waits for the block that
/// orders it; returns its height.
pub fn submit_direct(addr: &str, ev: &Event, wait: Duration) -> anyhow::Result<u64> {
    use std::io::Write;
    let stream = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(wait))?;
    let mut w = std::io::BufWriter::new(stream.try_clone()?);
    let mut r = std::io::BufReader::new(stream);
    let mut body = vec![ev.kind.tag()];
    body.extend_from_slice(&ev.encode());
    crate::edges::direct::write_frame(&mut w, &body)?;
    w.flush()?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        if std::time::Instant::now() >= deadline {
            bail!("not ordered within {wait:?}: see the validator's DLQ (a local refusal) or its log");
        }
        let body = match crate::edges::direct::read_frame(&mut r, 64 << 20) {
            Ok(Some(Ok(body))) => body,
            Ok(Some(Err(len))) => bail!("the validator sent a {len}-byte frame"),
            Ok(None) => bail!("the validator closed the connection (a malformed or refused tx is dead-lettered)"),
            Err(e) => return Err(e).context("waiting for the block that orders the change"),
        };
        let c = crate::proto::DirectCommit::decode(&body[..]).context("a commit notice that does not decode")?;
        if c.nonces.iter().any(|n| n.as_slice() == ev.nonce) {
            return Ok(c.height);
        }
    }
}

/// Produces `ev` to `topic` with the validator config's Kafka settings
/// (brokers, TLS, SASL) and waits for the broker's acknowledgement;
/// returns its partition and offset. The validators read it if `topic` is
/// among their `KAFKA_INPUT_TOPICS`.
pub fn submit_kafka(
    k: &crate::runtime::config::KafkaConfig,
    topic: &str,
    ev: &Event,
    wait: Duration,
) -> anyhow::Result<(i32, i64)> {
    use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
    use rdkafka::Message as _;
    type Delivered = std::sync::Mutex<Option<Result<(i32, i64), String>>>;
    struct Ack(Delivered);
    impl rdkafka::ClientContext for Ack {}
    impl ProducerContext for Ack {
        type DeliveryOpaque = ();
        fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
            *self.0.lock().unwrap() = Some(match r {
                Ok(m) => Ok((m.partition(), m.offset())),
                Err((e, _)) => Err(e.to_string()),
            });
        }
    }
    let mut cfg = crate::edges::kafka::client_config(k);
    cfg.set("acks", "all").set("message.timeout.ms", wait.as_millis().max(1).to_string());
    let p: BaseProducer<Ack> =
        cfg.create_with_context(Ack(Default::default())).context("creating a Kafka producer (KAFKA_BROKERS)")?;
    let key = hex::encode(ev.nonce);
    let bytes = ev.encode();
    p.send(BaseRecord::to(topic).key(&key).payload(&bytes)).map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
    p.flush(wait).with_context(|| format!("no acknowledgement from {} within {wait:?}", k.brokers))?;
    let acked = p.context().0.lock().unwrap().take();
    match acked {
        Some(Ok(at)) => Ok(at),
        Some(Err(e)) => bail!("producing to {topic}: {e}"),
        None => bail!("producing to {topic}: no delivery report"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_file_round_trips_and_names_bad_fields() {
        let key = crypto::public_key(&crypto::generate_key());
        let changes = [
            parse_change(ChangeKind::Add, &format!("5:{}", hex::encode(key))).unwrap(),
            parse_change(ChangeKind::Remove, "2").unwrap(),
        ];
        let mut f = ChangeFile::new(&[9; 32], 3, &changes);
        f.signatures.push(SignatureEntry { id: 1, signature: hex::encode([1; 64]) });
        let rc = f.reconfiguration().unwrap();
        assert_eq!((rc.epoch, rc.changes.as_slice(), rc.signatures.len()), (3, &changes[..], 1));
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<ChangeFile>(&text).unwrap(), f);
        assert!(!text.contains("\"public_key\":\"\""), "a removal carries no key: {text}");
        let err = |f: ChangeFile| format!("{:#}", f.reconfiguration().unwrap_err());
        assert!(err(ChangeFile { chain: "ab".into(), ..f.clone() }).contains("chain"));
        let mut bad = f.clone();
        bad.changes[0].kind = "swap".into();
        assert!(err(bad).contains("\"swap\" is not add, remove or rotate"));
        let mut bad = f.clone();
        bad.signatures[0].signature = "00".into();
        assert!(err(bad).contains("validator 1's signature"));
        assert!(parse_change(ChangeKind::Remove, "2:ab").is_err());
        assert!(format!("{:#}", parse_change(ChangeKind::Rotate, "3:zz").unwrap_err()).contains("validator 3's key"));
        assert!(parse_change(ChangeKind::Add, "5").is_err());
    }
}
