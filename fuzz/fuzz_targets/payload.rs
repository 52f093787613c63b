//! Typed payloads (anomaly, evidence, policy).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for k in cybermesh::event::TxKind::ALL {
        let _ = cybermesh::event::parse_payload(k, data);
    }
});
