//! Consensus: the sans-I/O PBFT replica (`pbft`) and its deterministic
//! simulator (`sim`, test-only).

pub mod genesis;
pub mod pbft;
#[cfg(test)]
pub(crate) mod sim;
pub mod wire;
