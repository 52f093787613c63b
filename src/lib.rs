//! CyberMesh validator: signed security alerts in, one BFT-agreed order out.
//!
//! One module per stage of the data flow (see docs/design.md):
//! `ingest` (decode, verify, DLQ reasons) → `mempool` → `block` (builder) →
//! `state` (deterministic state machine, Merkle root) → `store` (block store),
//! wired on threads by `runtime`; `node` is the sans-I/O core that owns the
//! mempool, the builder and the state machine.

/// mimalloc for every binary that links the validator: the core thread
/// allocates per tx (decoded events, Merkle nodes) and glibc malloc took ~13%
/// of its time in a devnet profile (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod api;
pub mod audit;
pub mod block;
pub mod bodies;
pub mod clock;
pub mod config;
pub mod consensus;
pub mod crypto;
pub mod devnet;
pub mod dlq;
pub mod egress;
pub mod event;
pub mod framed;
pub mod ingest;
pub mod mempool;
pub mod metrics;
pub mod net;
pub mod node;
pub mod persist;
pub mod proposal;
pub mod recovery;
pub mod reject;
pub mod reputation;
pub mod runtime;
#[cfg(test)]
mod sim;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod store;

/// Generated protobuf types (`proto/cybermesh/v1/*.proto`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/cybermesh.v1.rs"));
}

/// SHA-256 digest.
pub type Hash32 = [u8; 32];

/// SHA-256 of `data`.
#[inline]
pub fn sha256(data: &[u8]) -> Hash32 {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}
