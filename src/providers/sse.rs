//! A bounded Server-Sent Events decoder for upstream streams.
//!
//! Turns a byte stream into events (`event:` type and joined `data:` lines)
//! as the bytes arrive, never holding more than one event. An event larger
//! than the bound is a malformed stream, not a reason to grow without limit.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

/// The largest single event accepted from a provider.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SseError {
    /// The transport failed (reset, truncated body).
    Transport(String),
    /// An event over [`MAX_EVENT_BYTES`] or not UTF-8.
    Malformed(String),
}

#[derive(Default)]
pub struct SseDecoder {
    buf: BytesMut,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event in what was fed, if any.
    pub fn next_event(&mut self) -> Option<Result<SseEvent, SseError>> {
        loop {
            let Some(pos) = memchr::memchr2(b'\n', b'\r', &self.buf) else {
                if self.buf.len() + self.data.len() > MAX_EVENT_BYTES {
                    return Some(Err(SseError::Malformed("event over the size limit".into())));
                }
                return None;
            };
            // A lone '\r' at the end of the buffer may be half of "\r\n".
            let skip = match (self.buf[pos], self.buf.get(pos + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => return None,
                _ => 1,
            };
            let line = self.buf.split_to(pos);
            self.buf.advance(skip);
            let Ok(line) = std::str::from_utf8(&line) else {
                return Some(Err(SseError::Malformed("event is not UTF-8".into())));
            };
            if line.is_empty() {
                if self.has_data || self.event.is_some() {
                    self.has_data = false;
                    return Some(Ok(SseEvent {
                        event: self.event.take(),
                        data: std::mem::take(&mut self.data),
                    }));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    self.has_data = true;
                    if self.data.len() > MAX_EVENT_BYTES {
                        return Some(Err(SseError::Malformed("event over the size limit".into())));
                    }
                }
                "event" => self.event = Some(value.to_owned()),
                _ => {}
            }
        }
    }
}

/// Decodes a byte stream into SSE events. A stream that ends in the middle
/// of an event yields a transport error: a truncated event is not an event.
pub fn events<S, E>(body: S) -> impl Stream<Item = Result<SseEvent, SseError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    futures_util::stream::unfold((body, SseDecoder::default(), false), |(mut body, mut dec, done)| async move {
        if done {
            return None;
        }
        loop {
            match dec.next_event() {
                Some(Ok(ev)) => return Some((Ok(ev), (body, dec, false))),
                Some(Err(e)) => return Some((Err(e), (body, dec, true))),
                None => {}
            }
            match body.next().await {
                Some(Ok(bytes)) => dec.feed(&bytes),
                Some(Err(e)) => return Some((Err(SseError::Transport(e.to_string())), (body, dec, true))),
                None => {
                    if dec.has_data || !dec.buf.iter().all(|b| b.is_ascii_whitespace()) {
                        return Some((Err(SseError::Transport("stream ended inside an event".into())), (body, dec, true)));
                    }
                    return None;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_events_split_anywhere() {
        let text = b"event: message_start\ndata: {\"a\":1}\n\n: comment\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        for split in 0..text.len() {
            let mut d = SseDecoder::default();
            let mut out = vec![];
            d.feed(&text[..split]);
            while let Some(e) = d.next_event() {
                out.push(e.unwrap());
            }
            d.feed(&text[split..]);
            while let Some(e) = d.next_event() {
                out.push(e.unwrap());
            }
            assert_eq!(out.len(), 3, "split at {split}");
            assert_eq!(out[0].event.as_deref(), Some("message_start"));
            assert_eq!(out[1].data, "x\ny");
            assert_eq!(out[2].data, "[DONE]");
        }
    }

    #[test]
    fn oversize_event_is_malformed() {
        let mut d = SseDecoder::default();
        d.feed(b"data: ");
        d.feed(&vec![b'a'; MAX_EVENT_BYTES + 1]);
        assert!(matches!(d.next_event(), Some(Err(SseError::Malformed(_)))));
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error() {
        let body = futures_util::stream::iter(vec![Ok::<_, String>(Bytes::from_static(b"data: {\"a\""))]);
        let evs: Vec<_> = events(body).collect().await;
        assert!(matches!(evs.last(), Some(Err(SseError::Transport(_)))));
    }
}
