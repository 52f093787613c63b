//! Direct-source frames: framing (read as a stream and split as bytes
//! arrive, which must agree), tag and event decoding.
#![no_main]
use cybermesh::edges::direct::{decode_frame, read_frame, split_frame, Split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = cybermesh::protocol::event::Limits::default();
    let max = limits.max_event_bytes + 1;
    let mut r = data;
    let mut rest = data;
    while let Ok(Some(frame)) = read_frame(&mut r, max) {
        match (frame, split_frame(rest, max)) {
            (Ok(body), Split::Frame { len }) => {
                assert_eq!(&rest[4..4 + len], &body[..]);
                rest = &rest[4 + len..];
                let _ = decode_frame(&body, &limits);
            }
            (Err(a), Split::Oversized { len }) => {
                assert_eq!(a, len);
                break;
            }
            (f, s) => panic!("read {f:?}, split {s:?}"),
        }
    }
});
