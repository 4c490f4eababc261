//! Chat over the OpenAI-compatible HTTP façade, end to end against the
//! simulator: what a client sees, and what the provider received.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use switchyard::simulator::Faults;

#[tokio::test]
async fn sync_chat_through_the_openai_adapter() {
    let h = start().await;
    let (status, headers, body) = h.chat(&json!({"model": "gpt-4o-mini", "messages": user("Hello")})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini", "the public id, not the upstream model");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], expected_answer("Hello", 16));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(body["usage"]["total_tokens"], 17);
    assert_eq!(headers["x-switchyard-provider"], "oa-1");
    assert_eq!(headers["x-switchyard-attempts"], "1");
    assert!(!headers["x-request-id"].is_empty());
}

#[tokio::test]
async fn sync_chat_through_the_anthropic_adapter() {
    let h = start().await;
    let (status, headers, body) = h
        .chat(&json!({"model": "claude-sonnet-4", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "claude-sonnet-4");
    assert_eq!(body["choices"][0]["message"]["content"], expected_answer("Be brief.\nHello", 16));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(headers["x-switchyard-provider"], "an-1");

    // What Anthropic received: its own shape, with our credential.
    let up = h.upstream_requests("/p/an-1/v1/messages");
    assert_eq!(up.len(), 1);
    let sent = &up[0];
    assert_eq!(sent.headers["x-api-key"], "sk-ant-test-secret");
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    assert!(!sent.headers.contains_key("authorization"), "the client's key never goes upstream");
    assert_eq!(sent.body["model"], "claude-sonnet-4-20250514");
    assert_eq!(sent.body["system"], "Be brief.");
    assert_eq!(sent.body["max_tokens"], 777, "the model's max_output_tokens fills the required limit");
    assert_eq!(sent.body["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]));
}

async fn stream(h: &Harness, body: Value) -> (reqwest::header::HeaderMap, Vec<Value>, bool) {
    let resp = h.post_chat(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let (chunks, done) = sse_chunks(&text);
    (headers, chunks, done)
}

fn assert_one_stream(chunks: &[Value], model: &str) {
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in chunks {
        assert_eq!(c["id"], id, "one id from first chunk to last");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], model);
        assert_eq!(c["created"], chunks[0]["created"]);
    }
}

#[tokio::test]
async fn streamed_chat_through_the_openai_adapter() {
    let h = start().await;
    let (headers, chunks, done) = stream(&h, json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).await;
    assert!(done, "a complete stream ends with [DONE]");
    assert_eq!(headers["x-switchyard-provider"], "oa-1");
    assert_one_stream(&chunks, "gpt-4o-mini");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "no usage chunk unless asked for");
    // The gateway asked for usage anyway, for its own accounting.
    let up = h.upstream_requests("/p/oa-1/");
    assert_eq!(up[0].body["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn streamed_usage_chunk_comes_last_when_asked_for() {
    let h = start().await;
    for model in ["gpt-4o-mini", "claude-sonnet-4"] {
        let (_, chunks, done) = stream(&h, json!({"model": model, "stream": true, "stream_options": {"include_usage": true}, "messages": user("Hello")})).await;
        assert!(done);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]), "{model}");
        assert_eq!(last["usage"]["completion_tokens"], 16, "{model}");
        assert!(last["usage"]["prompt_tokens"].as_u64().unwrap() >= 1);
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.get("usage").is_none()));
    }
}

#[tokio::test]
async fn streamed_chat_through_the_anthropic_adapter() {
    let h = start().await;
    let (headers, chunks, done) = stream(&h, json!({"model": "claude-sonnet-4", "stream": true, "messages": user("Hello")})).await;
    assert!(done);
    assert_eq!(headers["x-switchyard-provider"], "an-1");
    assert_one_stream(&chunks, "claude-sonnet-4");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    assert_eq!(h.upstream_requests("/p/an-1/")[0].body["stream"], true);
}

#[tokio::test]
async fn named_and_unknown_parameters_reach_the_provider() {
    let h = start().await;
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "developer", "content": "terse"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}]}
        ],
        "temperature": 0.3, "top_p": 0.9, "max_tokens": 50, "max_completion_tokens": 60, "stop": ["END"], "seed": 42,
        "n": 1, "user": "u-1", "presence_penalty": 0.1, "frequency_penalty": 0.2, "logprobs": false,
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "d", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
        "tool_choice": "none",
        "metadata": {"team": "search"}, "service_tier": "flex", "logit_bias": {"1": 5}, "x_custom": [1, 2.5, "three", null, {"deep": true}]
    });
    let (status, _, resp) = h.chat(&body).await;
    assert_eq!(status, 200, "{resp}");
    let up = h.upstream_requests("/p/oa-1/");
    let sent = &up[0];
    assert_eq!(sent.headers["authorization"], "Bearer sk-test-oa-1-secret");
    let mut expected = body.clone();
    expected["model"] = json!("gpt-4o-mini-2024-07-18");
    // Content parts, tools and everything unknown arrive as sent.
    for k in ["messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n", "user", "presence_penalty", "frequency_penalty", "logprobs", "response_format", "tools", "tool_choice", "metadata", "service_tier", "logit_bias", "x_custom", "model"] {
        assert_eq!(sent.body[k], expected[k], "parameter {k}");
    }
}

#[tokio::test]
async fn tool_calls_round_trip_sync_and_streamed() {
    let h = start().await;
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    for model in ["gpt-4o-mini", "claude-sonnet-4"] {
        let (status, _, body) = h.chat(&json!({"model": model, "messages": user("find cats"), "tools": tools})).await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{model}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "lookup");
        assert_eq!(serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(), json!({"input": "find cats"}));
        assert!(!call["id"].as_str().unwrap().is_empty());

        let (_, chunks, done) = stream(&h, json!({"model": model, "stream": true, "messages": user("find cats"), "tools": tools})).await;
        assert!(done);
        let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"].get("tool_calls")).flat_map(|t| t.as_array().unwrap()).collect();
        assert_eq!(deltas[0]["function"]["name"], "lookup", "{model}");
        assert_eq!(deltas[0]["type"], "function");
        let args: String = deltas.iter().map(|d| d["function"]["arguments"].as_str().unwrap()).collect();
        assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"input": "find cats"}), "{model}");
        assert!(deltas.iter().all(|d| d["index"] == 0));
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    }
    // A tool result goes back to Anthropic as a tool_result block.
    let (status, _, _) = h
        .chat(&json!({"model": "claude-sonnet-4", "tools": tools, "messages": [
            {"role": "user", "content": "find cats"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"cats\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "3 cats"}
        ]}))
        .await;
    assert_eq!(status, 200);
    let sent = h.upstream_requests("/p/an-1/").pop().unwrap();
    assert_eq!(sent.body["messages"][1]["content"][0], json!({"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "cats"}}));
    assert_eq!(sent.body["messages"][2]["content"][0], json!({"type": "tool_result", "tool_use_id": "toolu_1", "content": "3 cats"}));
}

#[tokio::test]
async fn fails_over_before_first_byte_to_the_next_provider() {
    let h = start().await;
    h.faults("oa-1", Faults { status: Some(500), ..Default::default() });
    let (status, headers, body) = h.chat(&json!({"model": "gpt-4o-mini", "messages": user("Hello")})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-switchyard-provider"], "oa-2");
    assert_eq!(headers["x-switchyard-attempts"], "2");

    for f in [Faults { hangup: Some(true), ..Default::default() }, Faults { status: Some(429), retry_after: Some(1), ..Default::default() }] {
        h.faults("oa-1", f);
        let (headers, chunks, done) = stream(&h, json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).await;
        assert!(done);
        assert_eq!(headers["x-switchyard-provider"], "oa-2");
        assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16));
    }
}

#[tokio::test]
async fn a_stream_failing_before_content_is_a_clean_failover() {
    let h = start().await;
    // an-1 sends its preamble (message_start, ping, block start) then resets.
    h.faults("an-1", Faults { reset_after: Some(0), ..Default::default() });
    let sim = reqwest::Client::new();
    let raw = sim
        .post(format!("{}/p/an-1/v1/messages", h.sim.url()))
        .json(&json!({"model": "m", "max_tokens": 5, "stream": true, "messages": user("Hello")}))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200, "the simulator starts the stream before failing");
    assert!(raw.text().await.is_err(), "and then resets it");
    let resp = h.post_chat(&json!({"model": "mixed", "stream": true, "messages": user("Hello")})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "oa-1");
    let (chunks, done) = sse_chunks(&resp.text().await.unwrap());
    assert!(done);
    assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16));
}

#[tokio::test]
async fn a_client_disconnecting_mid_stream_closes_the_upstream() {
    let h = start().await;
    h.faults("oa-1", Faults { tokens: Some(500), chunk_delay_ms: Some(20), ..Default::default() });
    let mut resp = h.post_chat(&json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(h.sim.state.stats().streams_started, 1);
    drop(resp);
    let sim = h.sim.state.clone();
    eventually("the simulator sees its stream cancelled", || sim.stats().streams_cancelled == 1).await;
    assert_eq!(h.sim.state.stats().streams_completed, 0);
}

#[tokio::test]
async fn graceful_shutdown_lets_a_stream_finish() {
    let mut h = start().await;
    h.faults("oa-1", Faults { tokens: Some(30), chunk_delay_ms: Some(20), ..Default::default() });
    let resp = h.post_chat(&json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    h.shutdown();
    let (chunks, done) = sse_chunks(&resp.text().await.unwrap());
    assert!(done, "the in-flight stream completes after shutdown began");
    assert_eq!(streamed_text(&chunks), expected_answer("Hello", 30));
    let served = h.task.take().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), served).await.unwrap().unwrap().unwrap();
    assert!(reqwest::Client::new().get(h.url("/healthz")).send().await.is_err(), "no longer accepting");
}

#[tokio::test]
async fn request_ids_are_echoed_or_minted() {
    let h = start().await;
    let resp = h.http.get(h.url("/healthz")).header("x-request-id", "trace-me-123").send().await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-me-123");
    let a = h.http.get(h.url("/nope")).send().await.unwrap();
    let b = h.http.get(h.url("/nope")).send().await.unwrap();
    assert_ne!(a.headers()["x-request-id"], b.headers()["x-request-id"]);
    let long = "x".repeat(500);
    let c = h.http.get(h.url("/healthz")).header("x-request-id", &long).send().await.unwrap();
    assert_ne!(c.headers()["x-request-id"], long.as_str(), "oversize ids are replaced");
}
