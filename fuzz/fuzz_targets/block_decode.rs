//! Stored/peer blocks.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = cybermesh::protocol::block::Block::decode(data, &Default::default()) {
        // A decoded block re-encodes to something that decodes to itself.
        let again = cybermesh::protocol::block::Block::decode(&b.encode(), &Default::default()).expect("round trip");
        assert_eq!(again, b);
    }
});
