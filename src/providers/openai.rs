//! The `openai` kind: OpenAI itself and every OpenAI-compatible host (vLLM,
//! Together, Groq, Fireworks, Azure-style). `base_url` ends in `/v1`; chat
//! is `POST {base_url}/chat/completions`.
//!
//! The request is the client's own, re-addressed to the route's upstream
//! model, with every parameter the client sent (named or not) forwarded. A
//! streamed request always asks for usage so accounting is exact.

use futures_util::StreamExt;

use super::{ChatAdapter, ChunkStream, RouteCall, Upstream};
use crate::{
    error::{UpstreamError, UpstreamErrorKind},
    proto::{openai_json, ChatCompletion, ChatRequest},
};

pub struct OpenAi {
    up: Upstream,
}

impl OpenAi {
    pub fn new(up: Upstream) -> Self {
        OpenAi { up }
    }

    fn request(&self, req: &ChatRequest, route: &RouteCall<'_>, stream: bool) -> reqwest::RequestBuilder {
        let body = openai_json::request_to_json(req, route.upstream_model, stream);
        let mut rb = self
            .up
            .http
            .post(format!("{}/chat/completions", self.up.base_url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if stream {
            rb = rb.header(http::header::ACCEPT, "text/event-stream");
        }
        if !self.up.api_key.is_empty() {
            rb = rb.bearer_auth(self.up.api_key.expose());
        }
        rb
    }
}

#[async_trait::async_trait]
impl ChatAdapter for OpenAi {
    async fn complete(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChatCompletion, UpstreamError> {
        let resp = self.up.send(self.request(req, route, false), route).await?;
        let body = self.up.body(resp).await?;
        openai_json::completion_from_json(&body)
            .map_err(|e| self.up.err(UpstreamErrorKind::Malformed, format!("unparseable chat.completion: {e}")))
    }

    async fn stream(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChunkStream, UpstreamError> {
        let resp = self.up.send(self.request(req, route, true), route).await?;
        let id = self.up.id.clone();
        let events = self.up.events(resp);
        // `[DONE]` ends the stream; a stream that ends without it was cut.
        let chunks = futures_util::stream::unfold((Box::pin(events), false), move |(mut events, done)| {
            let id = id.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let item = match events.next().await {
                        None => Err(UpstreamError::new(&id, UpstreamErrorKind::Reset, "stream ended without [DONE]")),
                        Some(Err(e)) => Err(e),
                        Some(Ok(ev)) if ev.data == "[DONE]" => return None,
                        Some(Ok(ev)) if ev.data.is_empty() => continue,
                        Some(Ok(ev)) => parse_event(&id, &ev.data),
                    };
                    let done = item.is_err();
                    return Some((item, (events, done)));
                }
            }
        });
        Ok(Box::pin(chunks))
    }
}

fn parse_event(id: &str, data: &str) -> Result<crate::proto::ChatChunk, UpstreamError> {
    // A mid-stream error event: {"error": {...}}.
    if data.starts_with("{\"error\"") {
        let message = super::error_message(data.as_bytes());
        return Err(UpstreamError::new(id, UpstreamErrorKind::Server { status: 200 }, format!("error event: {message}")));
    }
    openai_json::chunk_from_json(data.as_bytes())
        .map_err(|e| UpstreamError::new(id, UpstreamErrorKind::Malformed, format!("unparseable chunk: {e}")))
}

#[async_trait::async_trait]
impl super::GenerateAdapter for OpenAi {
    async fn generate(&self, _spec: &super::GenerationSpec, _route: &super::RouteCall<'_>) -> Result<Vec<super::GeneratedMedia>, crate::error::UpstreamError> {
        Err(self.up.err(crate::error::UpstreamErrorKind::Unsupported, "not yet"))
    }
}

#[async_trait::async_trait]
impl super::TtsAdapter for OpenAi {
    fn supports(&self, _format: super::AudioFormat, _sample_rate: u32) -> bool {
        false
    }

    async fn synthesize(&self, _spec: &super::SpeechSpec, _route: &super::RouteCall<'_>) -> Result<super::ByteStream, crate::error::UpstreamError> {
        Err(self.up.err(crate::error::UpstreamErrorKind::Unsupported, "not yet"))
    }
}

#[async_trait::async_trait]
impl super::SttAdapter for OpenAi {
    async fn transcribe(&self, _audio: &super::AudioUpload, _route: &super::RouteCall<'_>) -> Result<super::Transcript, crate::error::UpstreamError> {
        Err(self.up.err(crate::error::UpstreamErrorKind::Unsupported, "not yet"))
    }
}
