//! Whole-node simulation (test builds): validators made of the real
//! [`crate::protocol::node::Node`], the real block store and consensus log on a
//! fault-injecting in-memory disk ([`disk::SimDisk`]), restarted through the
//! real recovery ([`crate::runtime::recovery::recover`]), on a seeded network with
//! skewed clocks and one Byzantine validator ([`cluster`]).

pub mod cluster;
pub mod disk;
