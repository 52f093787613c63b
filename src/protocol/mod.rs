//! The pure core: the validator's protocol logic, sans-I/O and
//! deterministic (no clocks, sockets, threads or randomness inside; time
//! comes in with each input). It imports nothing from `edges` or `runtime`.
//!
//! Data flow: `event` (decode, limits) → `verify` (a shard's checks) →
//! `mempool` → `proposal` (values naming txs, `bodies` fetches the missing)
//! → `consensus` (PBFT replica, wire format, genesis) → `block` →
//! `state` (deterministic state machine, Merkle root); `node` owns them all
//! as one state machine, with `reputation` and `snapshot` (joins).

pub mod block;
pub mod bodies;
pub mod clock;
pub mod consensus;
pub mod crypto;
pub mod event;
pub mod mempool;
pub mod node;
pub mod proposal;
pub mod reconfig;
pub mod reject;
pub mod reputation;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod verify;
