//! The I/O edges: files, sockets, Kafka, PostgreSQL and HTTP, each
//! translating between the outside world and the `protocol` core's types.
//! Edges import the core and each other, never `runtime`.
//!
//! Disk: `storage` (the seam the simulator replaces) → `framed` (checksummed
//! record files) → `store` (block store), `consensus_log`. Network: `net`
//! (QUIC between validators), `mdns` (finding peers on a LAN), `direct` (TCP source), `kafka` (source
//! settings and offsets), `dlq`, `egress` (commit events). Mirror: `persist`
//! (PostgreSQL). Operators: `api` (HTTP), `metrics`, `audit`.

pub mod api;
pub mod audit;
pub mod consensus_log;
pub mod direct;
pub mod dlq;
pub mod egress;
pub mod framed;
pub mod kafka;
pub mod mdns;
pub mod metrics;
pub mod net;
pub mod persist;
pub mod storage;
pub mod store;
