//! Typed payloads (anomaly, evidence, policy, reconfiguration).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for k in cybermesh::protocol::event::TxKind::ALL {
        let _ = cybermesh::protocol::event::parse_payload(k, data);
    }
});
