//! The simulator's OpenAI chat completions endpoint. It parses requests with
//! the gateway's own OpenAI JSON reader (so a request OpenAI would refuse is
//! refused here too) and writes answers with the gateway's own writer.

use std::sync::Arc;

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use super::{CONTINUE_INSTRUCTION, count_tokens, plan, preflight, stream_frames, sync_response, Ask, Frame, Plan, Prefix, SimState};
use crate::proto::{
    message, openai_json, tool_choice, ChatChunk, ChatCompletion, ChatRequest, Choice, ChunkChoice, Delta, FinishReason, Message, Role,
    ToolCall, Usage,
};

pub(super) fn error_body(status: u16) -> Value {
    let kind = match status {
        429 => "rate_limit_exceeded",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    json!({"error": {"message": format!("simulated failure (status {status})"), "type": kind, "param": null, "code": null}})
}

/// A 400 in OpenAI's shape, naming the offending parameter.
pub(super) fn invalid(message: &str, param: Option<&str>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}}))).into_response()
}

pub(super) async fn chat(state: State<Arc<SimState>>, req: Request) -> Response {
    chat_at(state, Prefix::None, req).await
}

pub(super) async fn chat_named(state: State<Arc<SimState>>, Path(name): Path<String>, req: Request) -> Response {
    chat_at(state, Prefix::Named(name), req).await
}

pub(super) async fn chat_inline(state: State<Arc<SimState>>, Path(spec): Path<String>, req: Request) -> Response {
    chat_at(state, Prefix::Inline(spec), req).await
}

async fn chat_at(State(state): State<Arc<SimState>>, prefix: Prefix, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let (headers, body) = match super::parse_body(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let faults = match preflight(&state, prefix, &path, &headers, &body, error_body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let parsed = match openai_json::parse_request(body.to_string().as_bytes()) {
        Ok(p) => p,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": e.to_string(), "type": "invalid_request_error", "param": e.param()}})))
                .into_response()
        }
    };
    let req = parsed.request;
    let plan = plan(state.seed, &ask(&req), &faults);
    let n = req.n.unwrap_or(1).clamp(1, 8);
    if parsed.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return stream_frames(state, frames(&plan, n, include_usage), faults, b"data: {\"choices\": [{\"delta\": \n\n");
    }
    let completion = completion(&plan, n);
    let body: Value = serde_json::from_slice(&openai_json::completion_to_json(&completion)).unwrap_or_default();
    sync_response(body, &faults)
}

fn ask(req: &ChatRequest) -> Ask {
    let mut msgs: &[Message] = &req.messages;
    // A model told to continue treats its previous message as a prefill.
    if let Some((last, rest)) = msgs.split_last() {
        let text: String = openai_json::message_text(last).collect();
        if last.role == Role::User as i32 && text == CONTINUE_INSTRUCTION {
            msgs = rest;
        }
    }
    let mut prefill = String::new();
    if let Some((last, rest)) = msgs.split_last() {
        if last.role == Role::Assistant as i32 && last.tool_calls.is_empty() {
            prefill = openai_json::message_text(last).collect();
            msgs = rest;
        }
    }
    let prompt: Vec<&str> = msgs.iter().flat_map(openai_json::message_text).collect();
    let prompt = prompt.join("\n");
    let last_is_user = msgs.last().is_some_and(|m| m.role == Role::User as i32);
    let choice = req.tool_choice.as_ref().and_then(|c| c.choice.as_ref());
    let tool = match choice {
        _ if req.tools.is_empty() || !last_is_user || !prefill.is_empty() => None,
        Some(tool_choice::Choice::Mode(m)) if m == "none" => None,
        Some(tool_choice::Choice::FunctionName(n)) => Some(n.clone()),
        _ => req.tools[0].function.as_ref().map(|f| f.name.clone()),
    };
    let last_user: String = msgs.last().map(|m| openai_json::message_text(m).collect()).unwrap_or_default();
    Ask {
        prompt_tokens: count_tokens(&prompt) + count_tokens(&prefill),
        prompt,
        prefill,
        tool: tool.map(|t| (t, last_user)),
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
    }
}

fn usage(plan: &Plan) -> Usage {
    let mut u = Usage::new(plan.prompt_tokens, plan.completion_tokens);
    u.cached_tokens = (plan.cached_tokens > 0).then_some(plan.cached_tokens);
    u
}

fn tool_args(input: &str) -> String {
    json!({ "input": input }).to_string()
}

fn finish(plan: &Plan) -> FinishReason {
    if plan.tool.is_some() {
        FinishReason::ToolCalls
    } else if plan.truncated {
        FinishReason::Length
    } else {
        FinishReason::Stop
    }
}

fn completion(plan: &Plan, n: u32) -> ChatCompletion {
    let message = Message {
        role: Role::Assistant as i32,
        content: match plan.tool {
            Some(_) => None,
            None => Some(message::Content::Text(plan.pieces.concat())),
        },
        tool_calls: plan
            .tool
            .iter()
            .map(|(name, input)| ToolCall {
                index: 0,
                id: Some("call_sim_0".into()),
                r#type: Some("function".into()),
                name: Some(name.clone()),
                arguments: tool_args(input),
            })
            .collect(),
        ..Default::default()
    };
    ChatCompletion {
        id: "chatcmpl-sim".into(),
        created: 1_700_000_000,
        model: "sim".into(),
        choices: (0..n)
            .map(|index| Choice {
                index,
                message: Some(message.clone()),
                finish_reason: finish(plan) as i32,
                logprobs_json: String::new(),
            })
            .collect(),
        usage: Some(usage(plan)),
        system_fingerprint: Some("fp_sim".into()),
    }
}

fn chunk(choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatChunk {
    ChatChunk {
        id: "chatcmpl-sim".into(),
        created: 1_700_000_000,
        model: "sim".into(),
        choices,
        usage,
        system_fingerprint: Some("fp_sim".into()),
        failover: None,
    }
}

fn delta_frames(n: u32, delta: Delta, finish: FinishReason) -> ChatChunk {
    chunk(
        (0..n)
            .map(|index| ChunkChoice {
                index,
                delta: Some(delta.clone()),
                finish_reason: finish as i32,
                logprobs_json: String::new(),
            })
            .collect(),
        None,
    )
}

fn sse(c: &ChatChunk) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&openai_json::chunk_to_json(c));
    out.extend_from_slice(b"\n\n");
    out
}

fn frames(plan: &Plan, n: u32, include_usage: bool) -> Vec<Frame> {
    let mut out = vec![Frame::preamble(sse(&delta_frames(
        n,
        Delta {
            role: Some(Role::Assistant as i32),
            content: Some(String::new()),
            ..Default::default()
        },
        FinishReason::Unspecified,
    )))];
    if let Some((name, input)) = &plan.tool {
        let args = tool_args(input);
        let (a, b) = args.split_at(args.len() / 2);
        let first = ToolCall {
            index: 0,
            id: Some("call_sim_0".into()),
            r#type: Some("function".into()),
            name: Some(name.clone()),
            arguments: String::new(),
        };
        for call in [first, ToolCall { index: 0, arguments: a.into(), ..Default::default() }, ToolCall { index: 0, arguments: b.into(), ..Default::default() }] {
            let d = Delta {
                tool_calls: vec![call],
                ..Default::default()
            };
            out.push(Frame::content(sse(&delta_frames(n, d, FinishReason::Unspecified))));
        }
    }
    for piece in &plan.pieces {
        let d = Delta {
            content: Some(piece.clone()),
            ..Default::default()
        };
        out.push(Frame::content(sse(&delta_frames(n, d, FinishReason::Unspecified))));
    }
    out.push(Frame::preamble(sse(&delta_frames(n, Delta::default(), finish(plan)))));
    if include_usage {
        out.push(Frame::preamble(sse(&chunk(vec![], Some(usage(plan))))));
    }
    out.push(Frame::preamble(&b"data: [DONE]\n\n"[..]));
    out
}
