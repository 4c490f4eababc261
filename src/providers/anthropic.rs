//! The `anthropic` kind: the Messages API (`POST {base_url}/v1/messages`),
//! sync and with its SSE event stream, translated both ways.
//!
//! OpenAI → Anthropic: system and developer messages become `system`; tool
//! results become `tool_result` blocks in a user turn; assistant tool calls
//! become `tool_use` blocks; images become `image` blocks; `max_tokens` is
//! required there, so the model's `max_output_tokens` fills in when the
//! client gave none. Anthropic → OpenAI: text and `tool_use` blocks become
//! content and tool calls (tool-call indices count tool calls, not blocks),
//! `stop_reason` becomes `finish_reason`, and cache reads are reported as
//! cached prompt tokens. What Anthropic cannot do (`n` > 1, logprobs, audio
//! input) is refused as `Unsupported`, so the router tries another provider
//! instead of returning something the client did not ask for.

use std::collections::HashMap;

use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use super::{client, ChatAdapter, ChunkStream, RouteCall, Upstream};
use crate::{
    error::{UpstreamError, UpstreamErrorKind},
    proto::{
        content_part, message, openai_json, tool_choice, ChatChunk, ChatCompletion, ChatRequest, Choice, ChunkChoice,
        Delta, FinishReason, Message, Role, ToolCall, Usage,
    },
};

const API_VERSION: &str = "2023-06-01";

pub struct Anthropic {
    up: Upstream,
    /// `{base_url}/v1/messages` and the fixed headers, made once.
    messages_url: Option<http::Uri>,
    headers: http::HeaderMap,
}

impl Anthropic {
    pub fn new(up: Upstream) -> Self {
        let messages_url = format!("{}/v1/messages", up.base_url).parse::<http::Uri>().ok();
        let mut headers = http::HeaderMap::with_capacity(4);
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        headers.insert("anthropic-version", http::HeaderValue::from_static(API_VERSION));
        if let Some(mut v) = (!up.api_key.is_empty()).then(|| http::HeaderValue::from_str(up.api_key.expose()).ok()).flatten() {
            v.set_sensitive(true);
            headers.insert("x-api-key", v);
        }
        Anthropic { up, messages_url, headers }
    }

    async fn send(&self, req: &ChatRequest, route: &RouteCall<'_>, stream: bool) -> Result<client::Response, UpstreamError> {
        let body = to_anthropic(req, route, stream).map_err(|d| self.up.err(UpstreamErrorKind::Unsupported, d))?;
        let Some(url) = &self.messages_url else {
            return Err(self.up.err(UpstreamErrorKind::Connect, "base_url is not a valid URL"));
        };
        let body = serde_json::to_vec(&body).map_err(|e| self.up.err(UpstreamErrorKind::Unsupported, e.to_string()))?;
        self.up.post_chat(url, self.headers.clone(), body, route).await
    }
}

#[async_trait::async_trait]
impl ChatAdapter for Anthropic {
    async fn complete(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChatCompletion, UpstreamError> {
        let resp = self.send(req, route, false).await?;
        let body = self.up.chat_body(resp).await?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| self.up.err(UpstreamErrorKind::Malformed, format!("unparseable message: {e}")))?;
        from_anthropic(&v).ok_or_else(|| self.up.err(UpstreamErrorKind::Malformed, "message without content"))
    }

    async fn stream(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChunkStream, UpstreamError> {
        let resp = self.send(req, route, true).await?;
        let id = self.up.id.clone();
        let events = Box::pin(self.up.chat_events(resp));
        let chunks = futures_util::stream::unfold((events, StreamState::default(), false), move |(mut events, mut st, done)| {
            let id = id.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let ev = match events.next().await {
                        None if st.stopped => return None,
                        None => return Some((Err(UpstreamError::new(&id, UpstreamErrorKind::Reset, "stream ended without message_stop")), (events, st, true))),
                        Some(Err(e)) => return Some((Err(e), (events, st, true))),
                        Some(Ok(ev)) => ev,
                    };
                    match st.on_event(&id, ev.event.as_deref(), &ev.data) {
                        Ok(Some(chunk)) => return Some((Ok(chunk), (events, st, false))),
                        Ok(None) if st.stopped => return None,
                        Ok(None) => continue,
                        Err(e) => return Some((Err(e), (events, st, true))),
                    }
                }
            }
        });
        Ok(Box::pin(chunks))
    }
}

/// Translates a proto request into a Messages API body.
fn to_anthropic(req: &ChatRequest, route: &RouteCall<'_>, stream: bool) -> Result<Value, String> {
    if req.n.unwrap_or(1) > 1 {
        return Err("n > 1 is not supported by the Messages API".into());
    }
    if req.logprobs == Some(true) {
        return Err("logprobs are not supported by the Messages API".into());
    }
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in &req.messages {
        let role = Role::try_from(m.role).unwrap_or(Role::User);
        match role {
            Role::System | Role::Developer => system.extend(openai_json::message_text(m).map(str::to_owned)),
            Role::User | Role::Unspecified => push_turn(&mut messages, "user", content_blocks(m)?),
            Role::Assistant => {
                let mut blocks = content_blocks(m)?;
                for c in &m.tool_calls {
                    let input: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
                    blocks.push(json!({"type": "tool_use", "id": c.id.clone().unwrap_or_default(), "name": c.name.clone().unwrap_or_default(), "input": input}));
                }
                push_turn(&mut messages, "assistant", blocks);
            }
            Role::Tool => {
                let text: String = openai_json::message_text(m).collect::<Vec<_>>().join("");
                let block = json!({"type": "tool_result", "tool_use_id": m.tool_call_id.clone().unwrap_or_default(), "content": text});
                push_turn(&mut messages, "user", vec![block]);
            }
        }
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(route.max_output_tokens);
    let mut body = Map::new();
    body.insert("model".into(), route.upstream_model.into());
    body.insert("max_tokens".into(), max_tokens.into());
    body.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        body.insert("system".into(), system.join("\n\n").into());
    }
    if let Some(t) = req.temperature {
        // OpenAI's range is 0–2, Anthropic's 0–1: clamp rather than rescale,
        // so the common values (0, 0.2, 0.7, 1) mean what the client meant.
        body.insert("temperature".into(), t.clamp(0.0, 1.0).into());
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), p.into());
    }
    if !req.stop.is_empty() {
        body.insert("stop_sequences".into(), req.stop.clone().into());
    }
    if let Some(u) = &req.user {
        body.insert("metadata".into(), json!({"user_id": u}));
    }
    let tools_off = matches!(req.tool_choice.as_ref().and_then(|c| c.choice.as_ref()), Some(tool_choice::Choice::Mode(m)) if m == "none");
    if !req.tools.is_empty() && !tools_off {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .filter_map(|t| t.function.as_ref())
            .map(|f| {
                let schema: Value = serde_json::from_str(&f.parameters_json).unwrap_or_else(|_| json!({"type": "object"}));
                let mut t = json!({"name": f.name, "input_schema": schema});
                if let Some(d) = &f.description {
                    t["description"] = d.clone().into();
                }
                t
            })
            .collect();
        body.insert("tools".into(), tools.into());
        let parallel_off = req.parallel_tool_calls == Some(false);
        let choice = match req.tool_choice.as_ref().and_then(|c| c.choice.as_ref()) {
            Some(tool_choice::Choice::Mode(m)) if m == "required" => Some(json!({"type": "any"})),
            Some(tool_choice::Choice::FunctionName(n)) => Some(json!({"type": "tool", "name": n})),
            _ if parallel_off => Some(json!({"type": "auto"})),
            _ => None,
        };
        if let Some(mut c) = choice {
            if parallel_off {
                c["disable_parallel_tool_use"] = true.into();
            }
            body.insert("tool_choice".into(), c);
        }
    }
    // Anthropic-specific parameters a client may pass through.
    if let Ok(Value::Object(extra)) = serde_json::from_str::<Value>(&req.extra_json) {
        for k in ["top_k", "thinking"] {
            if let Some(v) = extra.get(k) {
                body.insert(k.into(), v.clone());
            }
        }
    }
    if stream {
        body.insert("stream".into(), true.into());
    }
    Ok(Value::Object(body))
}

/// Appends blocks to the last turn when it has the same role: the Messages
/// API wants user and assistant turns to alternate.
fn push_turn(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut() {
        if last["role"] == role {
            if let Some(arr) = last["content"].as_array_mut() {
                arr.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

fn content_blocks(m: &Message) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    match &m.content {
        None => {}
        Some(message::Content::Text(t)) if t.is_empty() => {}
        Some(message::Content::Text(t)) => out.push(json!({"type": "text", "text": t})),
        Some(message::Content::Parts(p)) => {
            for part in &p.parts {
                match &part.part {
                    Some(content_part::Part::Text(t)) => out.push(json!({"type": "text", "text": t})),
                    Some(content_part::Part::ImageUrl(img)) => out.push(image_block(&img.url)),
                    Some(content_part::Part::InputAudio(_)) => return Err("audio input is not supported by the Messages API".into()),
                    Some(content_part::Part::OtherJson(_)) => return Err("a content part type the Messages API does not accept".into()),
                    None => {}
                }
            }
        }
    }
    Ok(out)
}

fn image_block(url: &str) -> Value {
    // data:image/png;base64,AAAA
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((meta, data)) = rest.split_once(',') {
            let media_type = meta.trim_end_matches(";base64");
            return json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}});
        }
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

fn finish_reason(stop_reason: Option<&str>) -> FinishReason {
    match stop_reason {
        Some("max_tokens") => FinishReason::Length,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

fn usage_from(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    let cache_read = n("cache_read_input_tokens");
    // OpenAI's prompt_tokens include cached ones; Anthropic reports them apart.
    let prompt = n("input_tokens") + cache_read + n("cache_creation_input_tokens");
    let mut usage = Usage::new(prompt, n("output_tokens"));
    usage.cached_tokens = (cache_read > 0).then_some(cache_read);
    usage
}

fn from_anthropic(v: &Value) -> Option<ChatCompletion> {
    let blocks = v.get("content")?.as_array()?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("tool_use") => tool_calls.push(ToolCall {
                index: tool_calls.len() as u32,
                id: b.get("id").and_then(Value::as_str).map(str::to_owned),
                r#type: Some("function".into()),
                name: b.get("name").and_then(Value::as_str).map(str::to_owned),
                arguments: b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into()),
            }),
            _ => {}
        }
    }
    let has_tools = !tool_calls.is_empty();
    Some(ChatCompletion {
        id: v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
        choices: vec![Choice {
            index: 0,
            message: Some(Message {
                role: Role::Assistant as i32,
                content: (!text.is_empty() || !has_tools).then_some(message::Content::Text(text)),
                tool_calls,
                ..Default::default()
            }),
            finish_reason: finish_reason(v.get("stop_reason").and_then(Value::as_str)) as i32,
            logprobs_json: String::new(),
        }],
        usage: v.get("usage").map(usage_from),
        ..Default::default()
    })
}

/// Turns the Messages event stream into chunks, one event at a time.
#[derive(Default)]
struct StreamState {
    message_id: String,
    usage: Usage,
    /// Content block index → tool call index.
    tool_blocks: HashMap<u64, u32>,
    tools_seen: u32,
    stopped: bool,
}

impl StreamState {
    fn chunk(&self, delta: Delta, finish: FinishReason) -> ChatChunk {
        ChatChunk {
            id: self.message_id.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta: Some(delta),
                finish_reason: finish as i32,
                logprobs_json: String::new(),
            }],
            ..Default::default()
        }
    }

    fn on_event(&mut self, provider: &str, event: Option<&str>, data: &str) -> Result<Option<ChatChunk>, UpstreamError> {
        let malformed = |d: String| UpstreamError::new(provider, UpstreamErrorKind::Malformed, d);
        let v: Value = serde_json::from_str(data).map_err(|e| malformed(format!("unparseable event: {e}")))?;
        let kind = event.or_else(|| v.get("type").and_then(Value::as_str)).unwrap_or_default();
        match kind {
            "message_start" => {
                let msg = v.get("message").ok_or_else(|| malformed("message_start without message".into()))?;
                self.message_id = msg.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                if let Some(u) = msg.get("usage") {
                    self.usage = usage_from(u);
                }
                Ok(Some(self.chunk(
                    Delta {
                        role: Some(Role::Assistant as i32),
                        content: Some(String::new()),
                        ..Default::default()
                    },
                    FinishReason::Unspecified,
                )))
            }
            "content_block_start" => {
                let block = v.get("content_block").ok_or_else(|| malformed("content_block_start without block".into()))?;
                if block.get("type").and_then(Value::as_str) != Some("tool_use") {
                    return Ok(None);
                }
                let index = self.tools_seen;
                self.tools_seen += 1;
                self.tool_blocks.insert(v.get("index").and_then(Value::as_u64).unwrap_or(0), index);
                Ok(Some(self.chunk(
                    Delta {
                        tool_calls: vec![ToolCall {
                            index,
                            id: block.get("id").and_then(Value::as_str).map(str::to_owned),
                            r#type: Some("function".into()),
                            name: block.get("name").and_then(Value::as_str).map(str::to_owned),
                            arguments: String::new(),
                        }],
                        ..Default::default()
                    },
                    FinishReason::Unspecified,
                )))
            }
            "content_block_delta" => {
                let d = v.get("delta").ok_or_else(|| malformed("content_block_delta without delta".into()))?;
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => Ok(Some(self.chunk(
                        Delta {
                            content: Some(d.get("text").and_then(Value::as_str).unwrap_or_default().to_owned()),
                            ..Default::default()
                        },
                        FinishReason::Unspecified,
                    ))),
                    Some("input_json_delta") => {
                        let block = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let index = *self.tool_blocks.get(&block).ok_or_else(|| malformed("input_json_delta for an unknown block".into()))?;
                        Ok(Some(self.chunk(
                            Delta {
                                tool_calls: vec![ToolCall {
                                    index,
                                    arguments: d.get("partial_json").and_then(Value::as_str).unwrap_or_default().to_owned(),
                                    ..Default::default()
                                }],
                                ..Default::default()
                            },
                            FinishReason::Unspecified,
                        )))
                    }
                    // thinking and signature deltas are not part of the OpenAI shape.
                    _ => Ok(None),
                }
            }
            "message_delta" => {
                if let Some(out) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.usage.completion_tokens = out as u32;
                    self.usage.total_tokens = self.usage.prompt_tokens + out as u32;
                }
                let reason = finish_reason(v.pointer("/delta/stop_reason").and_then(Value::as_str));
                Ok(Some(self.chunk(Delta::default(), reason)))
            }
            "message_stop" => {
                self.stopped = true;
                Ok(Some(ChatChunk {
                    id: self.message_id.clone(),
                    usage: Some(self.usage),
                    ..Default::default()
                }))
            }
            "error" => {
                let msg = v.pointer("/error/message").and_then(Value::as_str).unwrap_or("error event");
                let kind = match v.pointer("/error/type").and_then(Value::as_str) {
                    Some("overloaded_error") => UpstreamErrorKind::RateLimited { retry_after: None },
                    _ => UpstreamErrorKind::Server { status: 200 },
                };
                Err(UpstreamError::new(provider, kind, format!("error event: {}", crate::error::truncate(msg, 300))))
            }
            // ping, content_block_stop, and event types added later.
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::openai_json::parse_request;

    fn route() -> RouteCall<'static> {
        RouteCall {
            upstream_model: "claude-up",
            max_output_tokens: 1024,
            traceparent: None,
        }
    }

    #[test]
    fn translates_system_tools_and_tool_results() {
        let body = json!({
            "model": "claude", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "cold"}
            ],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
            "tool_choice": "required", "stop": ["END"]
        });
        let req = parse_request(body.to_string().as_bytes()).unwrap().request;
        let a = to_anthropic(&req, &route(), false).unwrap();
        assert_eq!(a["system"], "be brief");
        assert_eq!(a["max_tokens"], 1024);
        assert_eq!(a["messages"][1]["content"][0]["input"]["city"], "Oslo");
        assert_eq!(a["messages"][2]["content"][0]["type"], "tool_result");
        assert_eq!(a["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(a["tool_choice"]["type"], "any");
        assert_eq!(a["stop_sequences"][0], "END");
    }

    #[test]
    fn stream_events_become_chunks_with_tool_indices() {
        let mut st = StreamState::default();
        let evs = [
            ("message_start", r#"{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":10,"output_tokens":1}}}"#),
            ("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#),
            ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#),
            ("content_block_start", r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"tu_1","name":"w","input":{}}}"#),
            ("content_block_delta", r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\":1}"}}"#),
            ("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":7}}"#),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ];
        let chunks: Vec<_> = evs.iter().filter_map(|(e, d)| st.on_event("p", Some(e), d).unwrap()).collect();
        assert!(!chunks[0].has_content());
        assert_eq!(chunks[1].choices[0].delta.as_ref().unwrap().content.as_deref(), Some("Hi"));
        assert_eq!(chunks[2].choices[0].delta.as_ref().unwrap().tool_calls[0].index, 0);
        assert_eq!(chunks[3].choices[0].delta.as_ref().unwrap().tool_calls[0].arguments, "{\"a\":1}");
        assert_eq!(chunks[4].choices[0].finish_reason, FinishReason::ToolCalls as i32);
        assert_eq!(chunks[5].usage.unwrap().completion_tokens, 7);
        assert_eq!(chunks[5].usage.unwrap().prompt_tokens, 10);
        assert!(st.stopped);
    }
}
