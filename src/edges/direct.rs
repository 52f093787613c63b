//! The `direct` source: length-prefixed protobuf over TCP, for load
//! generators and tests that feed a validator without Kafka.
//!
//! Client → validator, one frame per event:
//! `u32 BE len | u8 kind (1 anomaly, 2 evidence, 3 policy) | event bytes (len − 1)`.
//! Validator → client, one frame per committed block:
//! `u32 BE len | DirectCommit protobuf`.
//! A frame longer than the event limit is rejected (`oversized`) and the
//! connection closed, since the stream can no longer be trusted to be framed.
//! The source has no authentication: bind it to loopback.

use crate::protocol::event::{Event, Limits, TxKind};
use crate::protocol::reject::RejectReason;
use std::io::{self, Read, Write};

/// Decodes one frame body (`kind tag | event`); on failure, the reason, a
/// detail and the bytes to dead-letter.
pub fn decode_frame<'a>(body: &'a [u8], limits: &Limits) -> Result<Event, (RejectReason, String, &'a [u8])> {
    let Some((&tag, bytes)) = body.split_first() else {
        return Err((RejectReason::Malformed, "empty frame".into(), body));
    };
    let Some(kind) = TxKind::from_tag(tag) else {
        return Err((
            RejectReason::Malformed,
            format!("unknown kind tag {tag} (1 anomaly, 2 evidence, 3 policy)"),
            body,
        ));
    };
    Event::decode(kind, bytes, limits).map_err(|(r, d)| (r, d, bytes))
}

/// Reads one frame body. `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read, max_len: usize) -> io::Result<Option<Result<Vec<u8>, usize>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max_len {
        return Ok(Some(Err(len)));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(Some(Ok(buf)))
}

/// What the bytes at the front of a stream's buffer hold (a source reading
/// many connections on one thread splits each buffer as bytes arrive,
/// instead of blocking a thread per connection in [`read_frame`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// A whole frame: its body is `buf[4..4 + len]`.
    Frame { len: usize },
    /// A frame longer than the limit announced: the stream can no longer
    /// be trusted to be framed.
    Oversized { len: usize },
    /// Not a whole frame yet: read more.
    Incomplete,
}

/// Splits the next frame off the front of `buf`.
pub fn split_frame(buf: &[u8], max_len: usize) -> Split {
    let Some(head) = buf.first_chunk::<4>() else { return Split::Incomplete };
    let len = u32::from_be_bytes(*head) as usize;
    if len > max_len {
        Split::Oversized { len }
    } else if buf.len() - 4 < len {
        Split::Incomplete
    } else {
        Split::Frame { len }
    }
}

/// Writes one frame: `u32 BE len | body`.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(body)
}

/// Appends an event frame (`len | kind | bytes`) to `out`.
pub fn push_event_frame(out: &mut Vec<u8>, kind: TxKind, event: &[u8]) {
    out.extend_from_slice(&((event.len() + 1) as u32).to_be_bytes());
    out.push(kind.tag());
    out.extend_from_slice(event);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// No input from the network panics the decoders; every failure is a reason.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let limits = Limits::default();
            let _ = decode_frame(&bytes, &limits);
            let mut r = &bytes[..];
            while let Ok(Some(_)) = read_frame(&mut r, 300) {}
            let mut rest = &bytes[..];
            while let Split::Frame { len } = split_frame(rest, 300) {
                rest = &rest[4 + len..];
            }
            let _ = crate::protocol::block::Block::decode(&bytes, &limits);
            for k in TxKind::ALL {
                let _ = crate::protocol::event::parse_payload(k, &bytes);
            }
        }

        #[test]
        fn mutated_valid_events_decode_or_reject(pos in 0usize..400, byte in any::<u8>(), cut in 0usize..400) {
            let key = crate::protocol::crypto::SigningKey::from_bytes(&[7; 32]);
            let ev = Event::sign(TxKind::Anomaly, &key, [1; 16], crate::protocol::event::sample_anomaly_payload(1, 200), 5, [0; 4]);
            let mut body = vec![1u8];
            body.extend_from_slice(&ev.encode());
            let p = pos % body.len();
            body[p] = byte;
            body.truncate(cut.max(1).min(body.len()));
            match decode_frame(&body, &Limits::default()) {
                Ok(e) => prop_assert_eq!(e.nonce.len(), 16),
                Err((r, d, _)) => prop_assert!(!d.is_empty() && !r.as_str().is_empty()),
            }
        }
    }

    #[test]
    fn frames_round_trip_and_limits() {
        let mut buf = vec![];
        push_event_frame(&mut buf, TxKind::Policy, b"abc");
        write_frame(&mut buf, b"xyz").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 100).unwrap().unwrap().unwrap(), vec![3, b'a', b'b', b'c']);
        assert_eq!(read_frame(&mut r, 2).unwrap().unwrap(), Err(3));
        let mut r = &buf[..2];
        assert!(read_frame(&mut r, 100).unwrap().is_none());
        let mut r = &buf[..6];
        assert!(read_frame(&mut r, 100).is_err(), "truncated body is an error");
    }

    proptest! {
        /// Splitting a buffer and reading it as a stream see the same frames,
        /// however the bytes are cut into arrivals.
        #[test]
        fn splitting_agrees_with_reading(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8), cut in 0usize..400, max in 0usize..50) {
            let mut stream = vec![];
            for b in &bodies {
                write_frame(&mut stream, b).unwrap();
            }
            let mut r = &stream[..];
            let mut read = vec![];
            loop {
                match read_frame(&mut r, max) {
                    Ok(Some(Ok(b))) => read.push(Ok(b)),
                    Ok(Some(Err(len))) => { read.push(Err(len)); break }
                    Ok(None) | Err(_) => break,
                }
            }
            // The same bytes arriving in two parts, split after each arrival.
            let cut = cut.min(stream.len());
            let (mut buf, mut split) = (stream[..cut].to_vec(), vec![]);
            let mut pending = &stream[cut..];
            loop {
                match split_frame(&buf, max) {
                    Split::Frame { len } => {
                        split.push(Ok(buf[4..4 + len].to_vec()));
                        buf.drain(..4 + len);
                    }
                    Split::Oversized { len } => { split.push(Err(len)); break }
                    Split::Incomplete if !pending.is_empty() => {
                        buf.extend_from_slice(pending);
                        pending = &[];
                    }
                    Split::Incomplete => break,
                }
            }
            prop_assert_eq!(split, read);
        }
    }
}
