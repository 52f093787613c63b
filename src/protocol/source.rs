//! Where an input came from: what a Kafka offset commit waits on. A leaf
//! (the mempool, rejections and the Kafka edge all name it).

use std::sync::Arc;

/// Where a Kafka message sits: what its offset commit waits on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePos {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}
