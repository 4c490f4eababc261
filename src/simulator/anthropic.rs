//! The simulator's Anthropic Messages endpoint, sync and with the event
//! stream (`message_start`, `content_block_*`, `message_delta`,
//! `message_stop`, `ping`). Like the real API it requires `max_tokens`.

use std::sync::Arc;

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use super::{CONTINUE_INSTRUCTION, count_tokens, plan, preflight, stream_frames, sync_response, Ask, Frame, Plan, Prefix, SimState};

fn error_body(status: u16) -> Value {
    let kind = match status {
        429 => "rate_limit_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": format!("simulated failure (status {status})")}})
}

fn invalid(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}}))).into_response()
}

pub(super) async fn messages(state: State<Arc<SimState>>, req: Request) -> Response {
    messages_at(state, Prefix::None, req).await
}

pub(super) async fn messages_named(state: State<Arc<SimState>>, Path(name): Path<String>, req: Request) -> Response {
    messages_at(state, Prefix::Named(name), req).await
}

pub(super) async fn messages_inline(state: State<Arc<SimState>>, Path(spec): Path<String>, req: Request) -> Response {
    messages_at(state, Prefix::Inline(spec), req).await
}

/// The text of a message's content: a string or text / tool_result blocks.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b.get("text").and_then(Value::as_str).unwrap_or_default().to_owned(),
                Some("tool_result") => text_of(b.get("content").unwrap_or(&Value::Null)),
                _ => String::new(),
            })
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

async fn messages_at(State(state): State<Arc<SimState>>, prefix: Prefix, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let (headers, body) = match super::parse_body(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let faults = match preflight(&state, prefix, &path, &headers, &body, error_body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    if body.get("model").and_then(Value::as_str).is_none() {
        return invalid("model: Field required");
    }
    let Some(max_tokens) = body.get("max_tokens").and_then(Value::as_u64) else {
        return invalid("max_tokens: Field required");
    };
    let Some(msgs) = body.get("messages").and_then(Value::as_array).filter(|m| !m.is_empty()) else {
        return invalid("messages: at least one message is required");
    };
    let ask = ask(&body, msgs, max_tokens);
    let plan = plan(state.seed, &ask, &faults);
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return stream_frames(state, frames(&plan), faults, b"event: content_block_delta\ndata: {\"type\": \n\n");
    }
    sync_response(message(&plan), &faults)
}

fn ask(body: &Value, msgs: &[Value], max_tokens: u64) -> Ask {
    let mut msgs = msgs;
    // A model told to continue treats its previous message as a prefill.
    if let Some((last, rest)) = msgs.split_last() {
        if last.get("role").and_then(Value::as_str) == Some("user") && text_of(last.get("content").unwrap_or(&Value::Null)) == CONTINUE_INSTRUCTION {
            msgs = rest;
        }
    }
    let mut prefill = String::new();
    if let Some((last, rest)) = msgs.split_last() {
        if last.get("role").and_then(Value::as_str) == Some("assistant") {
            prefill = text_of(last.get("content").unwrap_or(&Value::Null));
            msgs = rest;
        }
    }
    // The same prompt text as the OpenAI side builds (system first, one
    // message a line), so both kinds give one conversation the same answer
    // and can continue each other's.
    let system = text_of(body.get("system").unwrap_or(&Value::Null));
    let prompt = (!system.is_empty())
        .then_some(system)
        .into_iter()
        .chain(msgs.iter().map(|m| text_of(m.get("content").unwrap_or(&Value::Null))))
        .collect::<Vec<_>>()
        .join("\n");
    let last = msgs.last();
    let last_is_plain_user = last.is_some_and(|m| {
        m.get("role").and_then(Value::as_str) == Some("user")
            && !m
                .get("content")
                .and_then(Value::as_array)
                .is_some_and(|b| b.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result")))
    });
    let tools = body.get("tools").and_then(Value::as_array).filter(|t| !t.is_empty());
    let tool = match (tools, body.pointer("/tool_choice/type").and_then(Value::as_str)) {
        (None, _) | (_, Some("none")) => None,
        _ if !last_is_plain_user || !prefill.is_empty() => None,
        (Some(_), Some("tool")) => body.pointer("/tool_choice/name").and_then(Value::as_str).map(str::to_owned),
        (Some(t), _) => t[0].get("name").and_then(Value::as_str).map(str::to_owned),
    };
    let last_text = last.map(|m| text_of(m.get("content").unwrap_or(&Value::Null))).unwrap_or_default();
    Ask {
        prompt_tokens: count_tokens(&prompt) + count_tokens(&prefill),
        prompt,
        prefill,
        tool: tool.map(|t| (t, last_text)),
        max_tokens: Some(max_tokens.min(u64::from(u32::MAX)) as u32),
    }
}

fn stop_reason(plan: &Plan) -> &'static str {
    if plan.tool.is_some() {
        "tool_use"
    } else if plan.truncated {
        "max_tokens"
    } else {
        "end_turn"
    }
}

fn usage(plan: &Plan, output: u32) -> Value {
    json!({
        "input_tokens": plan.prompt_tokens - plan.cached_tokens,
        "cache_read_input_tokens": plan.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": output,
    })
}

fn message(plan: &Plan) -> Value {
    let content = match &plan.tool {
        Some((name, input)) => json!([{"type": "tool_use", "id": "toolu_sim_0", "name": name, "input": {"input": input}}]),
        None => json!([{"type": "text", "text": plan.pieces.concat()}]),
    };
    json!({
        "id": "msg_sim", "type": "message", "role": "assistant", "model": "sim",
        "content": content, "stop_reason": stop_reason(plan), "stop_sequence": null,
        "usage": usage(plan, plan.completion_tokens),
    })
}

fn event(name: &str, data: Value) -> Vec<u8> {
    format!("event: {name}\ndata: {data}\n\n").into_bytes()
}

fn frames(plan: &Plan) -> Vec<Frame> {
    let mut out = vec![
        Frame::preamble(event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_sim", "type": "message", "role": "assistant", "model": "sim", "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage(plan, 1)}}),
        )),
        Frame::preamble(event("ping", json!({"type": "ping"}))),
    ];
    match &plan.tool {
        Some((name, input)) => {
            out.push(Frame::content(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_sim_0", "name": name, "input": {}}}),
            )));
            let args = json!({ "input": input }).to_string();
            let (a, b) = args.split_at(args.len() / 2);
            for part in [a, b] {
                out.push(Frame::content(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": part}}),
                )));
            }
        }
        None => {
            out.push(Frame::preamble(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            )));
            for piece in &plan.pieces {
                out.push(Frame::content(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
                )));
            }
        }
    }
    out.push(Frame::preamble(event("content_block_stop", json!({"type": "content_block_stop", "index": 0}))));
    out.push(Frame::preamble(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason(plan), "stop_sequence": null}, "usage": {"output_tokens": plan.completion_tokens}}),
    )));
    out.push(Frame::preamble(event("message_stop", json!({"type": "message_stop"}))));
    out
}
