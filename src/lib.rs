//! CyberMesh validator: signed security alerts in, one BFT-agreed order out.
//!
//! Three folders, each a layer of the data flow (see docs/design.md):
//! `protocol` is the pure, deterministic core (decode → verify → mempool →
//! proposal → PBFT → block → state, owned by the sans-I/O `node`); `edges`
//! are the I/O (disk, QUIC, TCP, Kafka, PostgreSQL, HTTP); `runtime` wires
//! them on threads. No folder imports one above it (`tests/layout.rs`).

/// mimalloc for every binary that links the validator: the core thread
/// allocates per tx (decoded events, Merkle nodes) and glibc malloc took ~13%
/// of its time in a devnet profile (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod edges;
pub mod protocol;
pub mod runtime;
#[cfg(test)]
mod sim;

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
