//! mDNS discovery (`P2P_ENABLE_MDNS`): on a LAN, validators find each
//! other's QUIC addresses without `P2P_BOOTSTRAP_PEERS` entries.
//!
//! Each validator announces `v<id>-<chain>._cybermesh._udp.local.` (DNS-SD,
//! the `mdns-sd` crate) with its QUIC port and TXT `id`, `key` (its Ed25519
//! key, hex) and `chain` (the first 8 bytes of the consensus fingerprint,
//! hex), and browses for the others. An announcement is used only if its
//! chain matches, its id is another validator of this set and its key is
//! that validator's; the address then goes to the transport's address book.
//! Nothing here is trusted: the QUIC handshake still proves the key, and
//! `ALLOWED_IPS` still gates who may connect. A forged announcement can at
//! most point a connection attempt at the wrong address (which then fails
//! the handshake); the next genuine announcement corrects it.

use crate::edges::net::AddressBook;
use crate::protocol::crypto::PublicKey;
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// The DNS-SD service type validators announce.
pub const SERVICE_TYPE: &str = "_cybermesh._udp.local.";

/// What this validator announces.
pub struct Announce {
    pub id: u32,
    pub key: PublicKey,
    /// The consensus fingerprint (`Config::consensus_fingerprint`).
    pub chain: crate::Hash32,
    /// The QUIC address it listens on (an unspecified IP: every interface's
    /// addresses are announced).
    pub listen: SocketAddr,
}

fn chain_tag(chain: &crate::Hash32) -> String {
    hex::encode(&chain[..8])
}

/// The validator id an announcement stands for, if it is one of `validators`
/// (other than `me`) on this chain with that validator's key.
pub fn accept(
    txt_id: Option<&str>,
    txt_key: Option<&str>,
    txt_chain: Option<&str>,
    me: u32,
    chain: &crate::Hash32,
    validators: &BTreeMap<u32, PublicKey>,
) -> Option<u32> {
    let id: u32 = txt_id?.parse().ok()?;
    let key = crate::protocol::crypto::parse_public_key_hex(txt_key?).ok()?;
    (id != me && txt_chain? == chain_tag(chain) && validators.get(&id) == Some(&key)).then_some(id)
}

/// The address to dial among those announced: IPv4 before IPv6, never a
/// loopback or unspecified one (another host's loopback is not it).
pub fn pick_address(addrs: impl IntoIterator<Item = IpAddr>, port: u16) -> Option<SocketAddr> {
    let mut usable: Vec<IpAddr> =
        addrs.into_iter().filter(|a| !a.is_loopback() && !a.is_unspecified() && !a.is_multicast()).collect();
    usable.sort_by_key(|a| (a.is_ipv6(), *a));
    usable.first().map(|ip| SocketAddr::new(*ip, port))
}

/// A running announcer and browser; dropped, it stops (and unregisters).
pub struct Discovery {
    daemon: ServiceDaemon,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Discovery {
    /// Announces `me` and feeds `book` with the other validators found.
    pub fn start(me: Announce, validators: BTreeMap<u32, PublicKey>, book: AddressBook) -> Result<Discovery, String> {
        let daemon = ServiceDaemon::new().map_err(|e| format!("starting mDNS (UDP port 5353): {e}"))?;
        let tag = chain_tag(&me.chain);
        let props = [("id", me.id.to_string()), ("key", hex::encode(me.key)), ("chain", tag.clone())];
        let name = format!("v{}-{tag}", me.id);
        let host = format!("cybermesh-{name}.local.");
        let ip = me.listen.ip();
        let info = match ip.is_unspecified() {
            true => ServiceInfo::new(SERVICE_TYPE, &name, &host, "", me.listen.port(), &props[..])
                .map(|i| i.enable_addr_auto()),
            false => ServiceInfo::new(SERVICE_TYPE, &name, &host, ip, me.listen.port(), &props[..]),
        }
        .map_err(|e| format!("mDNS announcement: {e}"))?;
        daemon.register(info).map_err(|e| format!("mDNS register: {e}"))?;
        let events = daemon.browse(SERVICE_TYPE).map_err(|e| format!("mDNS browse: {e}"))?;
        let chain = me.chain;
        let thread = std::thread::Builder::new()
            .name("mdns".into())
            .spawn(move || {
                while let Ok(ev) = events.recv() {
                    let ServiceEvent::ServiceResolved(s) = ev else { continue };
                    let txt = |k: &str| s.get_property_val_str(k);
                    let Some(id) = accept(txt("id"), txt("key"), txt("chain"), me.id, &chain, &validators) else {
                        continue;
                    };
                    let ips = s.get_addresses().iter().map(|a| a.to_ip_addr());
                    let Some(addr) = pick_address(ips, s.get_port()) else { continue };
                    if book.set(id, addr) {
                        tracing::info!(peer = id, %addr, "validator found by mDNS");
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Discovery { daemon, thread: Some(thread) })
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        // Shutting down closes the browse channel: the thread ends.
        if let Ok(done) = self.daemon.shutdown() {
            let _ = done.recv_timeout(std::time::Duration::from_secs(2));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::crypto;

    #[test]
    fn only_another_validator_of_this_chain_with_its_own_key_is_accepted() {
        let keys: Vec<_> = (0..3).map(|_| crypto::public_key(&crypto::generate_key())).collect();
        let validators: BTreeMap<u32, PublicKey> = (1..=3).zip(keys.iter().copied()).collect();
        let chain = [7u8; 32];
        let tag = chain_tag(&chain);
        let k = |i: usize| hex::encode(keys[i]);
        let ok = |id: &str, key: &str, ch: &str| accept(Some(id), Some(key), Some(ch), 1, &chain, &validators);
        assert_eq!(ok("2", &k(1), &tag), Some(2));
        assert_eq!(ok("1", &k(0), &tag), None, "itself");
        assert_eq!(ok("2", &k(2), &tag), None, "validator 3's key under id 2");
        assert_eq!(ok("4", &k(1), &tag), None, "not a validator");
        assert_eq!(ok("2", &k(1), &chain_tag(&[8u8; 32])), None, "another chain");
        assert_eq!(ok("x", &k(1), &tag), None);
        assert_eq!(ok("2", "zz", &tag), None);
        assert_eq!(accept(Some("2"), None, Some(&tag), 1, &chain, &validators), None);
    }

    #[test]
    fn a_routable_ipv4_address_is_dialled_before_others() {
        let ips = |v: &[&str]| v.iter().map(|s| s.parse::<IpAddr>().unwrap()).collect::<Vec<_>>();
        assert_eq!(
            pick_address(ips(&["127.0.0.1", "fe80::1", "10.0.0.7", "0.0.0.0"]), 8001),
            Some("10.0.0.7:8001".parse().unwrap())
        );
        assert_eq!(pick_address(ips(&["fe80::1"]), 9), Some("[fe80::1]:9".parse().unwrap()));
        assert_eq!(pick_address(ips(&["127.0.0.1", "::1"]), 9), None);
    }
}
