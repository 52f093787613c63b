//! Chain snapshots from a peer: verification never panics. Signatures are
//! accepted here (a permissive `Auth`) so the input reaches the reputation,
//! header and state checks behind them.
#![no_main]
use cybermesh::protocol::consensus::pbft::{Auth, EpochAuth, Params, Rid};
use cybermesh::protocol::reconfig::ChainRules;
use cybermesh::protocol::state::StateConfig;
use cybermesh::protocol::consensus::wire::WireLimits;
use cybermesh::protocol::snapshot::{verify, ReputationConfig};
use libfuzzer_sys::fuzz_target;

#[derive(Clone)]
struct AnySignature;
impl Auth for AnySignature {
    fn sign(&self, _: &[u8]) -> Vec<u8> {
        vec![0; 64]
    }
    fn verify(&self, _: Rid, _: &[u8], _: &[u8]) -> bool {
        true
    }
}

impl EpochAuth for AnySignature {
    fn for_epoch(&self, _: u64, _: &[[u8; 32]]) -> Option<(Rid, Self)> {
        Some((0, AnySignature))
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = WireLimits { n: 4, max_value_bytes: 1 << 20, window: 16 };
    let rep = ReputationConfig { floor: Some(0.7), quarantine: true };
    // Chain rules: a snapshot's epoch chain (set changes and their
    // signatures) is read and checked too.
    let genesis = (1..=4u32).map(|i| (i, [i as u8; 32])).collect();
    let rules = ChainRules { chain: [9; 32], genesis, checkpoint_interval: 8, window: 16 };
    let state = StateConfig { chain: Some(std::sync::Arc::new(rules)), ..Default::default() };
    let _ = verify(data, 0, &Params::manual_defaults(4), AnySignature, &limits, state, rep);
});
