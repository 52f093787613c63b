//! Direct-source frames: framing, tag and event decoding.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = cybermesh::protocol::event::Limits::default();
    let mut r = data;
    while let Ok(Some(frame)) = cybermesh::edges::direct::read_frame(&mut r, limits.max_event_bytes + 1) {
        if let Ok(body) = frame {
            let _ = cybermesh::edges::direct::decode_frame(&body, &limits);
        }
    }
});
