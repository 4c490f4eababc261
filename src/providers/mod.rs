//! Provider adapters: one file per upstream wire format, each translating
//! proto messages to that provider's API and its answers back.
//!
//! An adapter does one attempt and classifies its failure
//! ([`UpstreamError`]); it never retries, waits out timeouts or picks
//! another provider — that is the router's job. Adapters never put their
//! credentials in an error, a log line or a span.

use std::{pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::{
    config::{ProviderConfig, ProviderKind, Secret},
    error::{UpstreamError, UpstreamErrorKind},
    proto::{ChatChunk, ChatCompletion, ChatRequest},
};

pub mod anthropic;
pub mod openai;
pub mod sse;

/// The chunks of one upstream stream, already in proto form.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, UpstreamError>> + Send>>;

/// What an adapter needs to know about the route it is called on.
#[derive(Debug, Clone)]
pub struct RouteCall<'a> {
    pub upstream_model: &'a str,
    /// Sent to providers that require a limit when the client gave none.
    pub max_output_tokens: u32,
    /// The attempt span's W3C trace context, propagated upstream.
    pub traceparent: Option<&'a str>,
}

#[async_trait::async_trait]
pub trait ChatAdapter: Send + Sync + 'static {
    /// One whole answer.
    async fn complete(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChatCompletion, UpstreamError>;

    /// Starts a stream. Resolves once the upstream accepted the request (its
    /// status and headers arrived); the chunks follow on the stream.
    async fn stream(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChunkStream, UpstreamError>;
}

/// Builds the chat adapter for a provider, if its kind serves chat.
pub fn chat_adapter(config: &ProviderConfig, http: reqwest::Client) -> Option<Arc<dyn ChatAdapter>> {
    let upstream = Upstream {
        id: config.id.clone(),
        base_url: config.base_url.trim_end_matches('/').to_owned(),
        api_key: config.api_key.clone(),
        http,
    };
    match config.kind {
        ProviderKind::Openai => Some(Arc::new(openai::OpenAi::new(upstream))),
        ProviderKind::Anthropic => Some(Arc::new(anthropic::Anthropic::new(upstream))),
        _ => None,
    }
}

/// The largest non-streamed upstream body accepted.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How much of an upstream error body is read to find its message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// What every HTTP adapter shares: where the provider is, how to reach it,
/// and how to turn its HTTP failures into classified errors.
pub struct Upstream {
    pub id: String,
    pub base_url: String,
    pub api_key: Secret,
    pub http: reqwest::Client,
}

impl Upstream {
    pub fn err(&self, kind: UpstreamErrorKind, detail: impl Into<String>) -> UpstreamError {
        UpstreamError::new(&self.id, kind, detail)
    }

    /// Sends a request; a non-success status becomes a classified error.
    pub async fn send(&self, mut req: reqwest::RequestBuilder, route: &RouteCall<'_>) -> Result<reqwest::Response, UpstreamError> {
        if let Some(tp) = route.traceparent {
            req = req.header("traceparent", tp);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_bounded(resp, MAX_ERROR_BODY_BYTES).await.unwrap_or_default();
        let message = self.scrub(&error_message(&body));
        Err(UpstreamError::from_status(&self.id, status.as_u16(), retry_after, &message))
    }

    /// Reads a whole (non-streamed) success body, bounded.
    pub async fn body(&self, resp: reqwest::Response) -> Result<Bytes, UpstreamError> {
        read_bounded(resp, MAX_RESPONSE_BYTES).await.map_err(|e| match e {
            ReadError::TooLarge => self.err(UpstreamErrorKind::Malformed, "response body over the size limit"),
            ReadError::Transport(e) => self.transport_error(&e),
        })
    }

    /// The SSE events of a streamed success body.
    pub fn events(&self, resp: reqwest::Response) -> impl Stream<Item = Result<sse::SseEvent, UpstreamError>> + Send + 'static {
        let id = self.id.clone();
        sse::events(resp.bytes_stream()).map(move |r| {
            r.map_err(|e| match e {
                sse::SseError::Transport(d) => UpstreamError::new(&id, UpstreamErrorKind::Reset, format!("stream broke: {d}")),
                sse::SseError::Malformed(d) => UpstreamError::new(&id, UpstreamErrorKind::Malformed, d),
            })
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> UpstreamError {
        // reqwest's Display can include the URL; ours carry no secrets
        // (keys travel in headers), but keep the detail to the class.
        let kind = if e.is_connect() {
            UpstreamErrorKind::Connect
        } else if e.is_timeout() {
            UpstreamErrorKind::Timeout
        } else {
            UpstreamErrorKind::Reset
        };
        let what = if e.is_connect() {
            "connection failed"
        } else if e.is_body() || e.is_decode() {
            "response body broke"
        } else {
            "request failed"
        };
        self.err(kind, what)
    }

    /// Removes our own credential from anything a provider echoes back.
    pub fn scrub(&self, s: &str) -> String {
        let key = self.api_key.expose();
        if key.len() >= 4 && s.contains(key) {
            s.replace(key, "***")
        } else {
            s.to_owned()
        }
    }
}

enum ReadError {
    TooLarge,
    Transport(reqwest::Error),
}

async fn read_bounded(resp: reqwest::Response, max: usize) -> Result<Bytes, ReadError> {
    if resp.content_length().is_some_and(|n| n as usize > max) {
        return Err(ReadError::TooLarge);
    }
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(ReadError::Transport)?;
        if out.len() + chunk.len() > max {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// Finds the human message in an error body of any of the formats we speak
/// (`{"error":{"message"}}`, `{"error":"..."}`, `{"message":"..."}`).
pub fn error_message(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let m = v
        .pointer("/error/message")
        .or_else(|| v.get("error").filter(|e| e.is_string()))
        .or_else(|| v.get("message"))
        .or_else(|| v.get("detail"));
    m.and_then(|m| m.as_str()).map(|s| crate::error::truncate(s, 300).to_owned()).unwrap_or_default()
}
