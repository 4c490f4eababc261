//! Every error of API.md's table that chat can produce, in the check order
//! API.md gives, each as the one envelope.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use switchyard::simulator::Faults;

async fn envelope(resp: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text:?}"));
    let e = &v["error"];
    assert!(e["code"].is_string(), "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some(), "param is always present (null when none): {v}");
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.contains_key("x-request-id"));
    (status, headers, v)
}

fn chat_body() -> Value {
    json!({"model": "gpt-4o-mini", "messages": user("Hello")})
}

#[tokio::test]
async fn unknown_route_is_not_found() {
    let h = start().await;
    let (s, _, v) = envelope(h.http.get(h.url("/v1/nope")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "not_found");
    // Route comes before key.
    let (s, _, _) = envelope(h.http.post(h.url("/v2/chat/completions")).send().await.unwrap()).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let h = start().await;
    let (s, headers, v) = envelope(h.http.get(h.url("/v1/chat/completions")).send().await.unwrap()).await;
    assert_eq!(s, 405);
    assert_eq!(v["error"]["code"], "invalid_input");
    assert!(headers["allow"].to_str().unwrap().contains("POST"));
}

#[tokio::test]
async fn missing_malformed_or_unknown_keys_are_401() {
    let h = start().await;
    let url = h.url("/v1/chat/completions");
    let cases = [None, Some("Basic abc"), Some("Bearer sk-not-ours"), Some("Bearer ze_unknown_key_123")];
    for auth in cases {
        let mut rb = h.http.post(&url).json(&chat_body());
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        let (s, headers, v) = envelope(rb.send().await.unwrap()).await;
        assert_eq!(s, 401, "{auth:?}");
        assert_eq!(v["error"]["code"], "unauthenticated");
        assert!(!headers.contains_key("x-ratelimit-limit"), "a 401 has no key to count against");
    }
    // Key is checked before the body: garbage from a stranger is still 401.
    let (s, _, _) = envelope(h.http.post(&url).body("{nope").send().await.unwrap()).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn oversize_bodies_are_413() {
    let h = start().await;
    let big = "x".repeat(70_000);
    let (s, _, v) = envelope(h.post_chat(&json!({"model": "gpt-4o-mini", "messages": user(&big)})).send().await.unwrap()).await;
    assert_eq!(s, 413);
    assert_eq!(v["error"]["code"], "invalid_input");
    // Without a Content-Length (chunked), the limit holds while reading.
    let chunks = futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![b' '; 8192])));
    let resp = h.http.post(h.url("/v1/chat/completions")).bearer_auth(KEY).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
    let (s, _, _) = envelope(resp).await;
    assert_eq!(s, 413);
    // Size comes after the key.
    let (s, _, _) = envelope(h.http.post(h.url("/v1/chat/completions")).body(big).send().await.unwrap()).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn bad_input_is_400_naming_the_param() {
    let h = start().await;
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("{not json", None),
        ("[]", None),
        (r#"{"model":"gpt-4o-mini"}"#, Some("messages")),
        (r#"{"model":"gpt-4o-mini","messages":[]}"#, Some("messages")),
        (r#"{"model":"gpt-4o-mini","messages":"hi"}"#, Some("messages")),
        (r#"{"messages":[{"role":"user","content":"hi"}]}"#, Some("model")),
        (r#"{"model":"gpt-4o-mini","messages":[{"content":"hi"}]}"#, Some("messages[0].role")),
        (r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"text":"x"}]}]}"#, Some("messages[0].content[0].type")),
        (r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"n":0}"#, Some("n")),
        (r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":"yes"}"#, Some("stream")),
        (r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}"#, Some("tools[0].function")),
    ];
    for (body, param) in cases {
        let resp = h.http.post(h.url("/v1/chat/completions")).bearer_auth(KEY).header("content-type", "application/json").body(body).send().await.unwrap();
        let (s, _, v) = envelope(resp).await;
        assert_eq!(s, 400, "{body}");
        assert_eq!(v["error"]["code"], "invalid_input", "{body}");
        assert_eq!(v["error"]["param"].as_str(), param, "{body}");
    }
    assert_eq!(h.sim.state.stats().requests, 0, "nothing invalid reaches a provider");
}

#[tokio::test]
async fn unknown_model_is_404_before_permission() {
    let h = start().await;
    let (s, _, v) = envelope(h.post_chat(&json!({"model": "gpt-17", "messages": user("hi")})).send().await.unwrap()).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "not_found");
    assert_eq!(v["error"]["param"], "model");
    // The claude-only key asking for an unknown model: 404, not 403.
    let resp = h.http.post(h.url("/v1/chat/completions")).bearer_auth(CLAUDE_ONLY_KEY).json(&json!({"model": "gpt-17", "messages": user("hi")})).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_key_outside_its_model_globs_is_403() {
    let h = start().await;
    let resp = h.http.post(h.url("/v1/chat/completions")).bearer_auth(CLAUDE_ONLY_KEY).json(&chat_body()).send().await.unwrap();
    let (s, _, v) = envelope(resp).await;
    assert_eq!(s, 403);
    assert_eq!(v["error"]["code"], "permission_denied");
    let resp = h.http.post(h.url("/v1/chat/completions")).bearer_auth(CLAUDE_ONLY_KEY).json(&json!({"model": "claude-sonnet-4", "messages": user("hi")})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn every_provider_failing_is_502_listing_attempts_without_secrets() {
    let h = start().await;
    h.faults("oa-1", Faults { status: Some(500), ..Default::default() });
    h.faults("oa-2", Faults { status: Some(401), ..Default::default() });
    for stream in [false, true] {
        let mut body = chat_body();
        body["stream"] = json!(stream);
        let (s, headers, v) = envelope(h.post_chat(&body).send().await.unwrap()).await;
        assert_eq!(s, 502, "a stream that never started is a plain HTTP error");
        assert_eq!(v["error"]["code"], "provider_unavailable");
        assert_eq!(headers["x-switchyard-attempts"], "2");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("oa-1") && msg.contains("oa-2"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
    }
}

#[tokio::test]
async fn an_upstream_400_is_the_clients_fault_and_not_retried() {
    let h = start().await;
    h.faults("oa-1", Faults { status: Some(400), ..Default::default() });
    let (s, _, v) = envelope(h.post_chat(&chat_body()).send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["code"], "invalid_input");
    assert!(h.upstream_requests("/p/oa-2/").is_empty(), "not retried elsewhere");
}

#[tokio::test]
async fn the_clients_deadline_is_504() {
    let h = start().await;
    h.faults("oa-1", Faults { latency_ms: Some(2000), ..Default::default() });
    let started = std::time::Instant::now();
    let resp = h.post_chat(&chat_body()).header("x-switchyard-timeout-ms", "200").send().await.unwrap();
    let (s, headers, v) = envelope(resp).await;
    assert_eq!(s, 504);
    assert_eq!(v["error"]["code"], "timeout");
    assert_eq!(headers["x-switchyard-attempts"], "1");
    assert!(started.elapsed() < std::time::Duration::from_millis(1500), "the deadline bounds the request");
    let resp = h.post_chat(&chat_body()).header("x-switchyard-timeout-ms", "soon").send().await.unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn failover_off_tries_one_provider() {
    let h = start().await;
    h.faults("oa-1", Faults { status: Some(503), ..Default::default() });
    let (s, headers, _) = envelope(h.post_chat(&chat_body()).header("x-switchyard-failover", "off").send().await.unwrap()).await;
    assert_eq!(s, 502);
    assert_eq!(headers["x-switchyard-attempts"], "1");
}

#[tokio::test]
async fn a_stream_broken_after_content_ends_with_an_error_event_not_done() {
    let h = start().await;
    let breaks = [
        Faults { reset_after: Some(3), ..Default::default() },
        Faults { malformed_after: Some(3), ..Default::default() },
        // A stall longer than the provider's idle_timeout (1s here).
        Faults { stall_after: Some(3), ..Default::default() },
    ];
    for f in breaks {
        // Both routes break alike: whichever the scorer picks, the stream breaks.
        h.faults("oa-1", f.clone());
        h.faults("oa-2", f.clone());
        let resp = h.post_chat(&json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).header("x-switchyard-failover", "off").send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        let data = sse_data(&text);
        assert_ne!(data.last().unwrap(), "[DONE]", "a truncated stream never looks complete ({f:?}): {text}");
        let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
        assert_eq!(err["error"]["code"], "provider_unavailable", "{f:?}");
        let (chunks, _) = sse_chunks(&text.replace(&format!("data: {}\n\n", data.last().unwrap()), ""));
        let words: Vec<String> = expected_answer("Hello", 16).split(' ').map(str::to_owned).collect();
        assert_eq!(streamed_text(&chunks), words[..3].join(" "), "what was sent before the break ({f:?})");
    }
}

#[tokio::test]
async fn malformed_and_stalled_upstreams_fail_over() {
    let h = start().await;
    for f in [Faults { malformed_after: Some(0), ..Default::default() }, Faults { stall_after: Some(0), ..Default::default() }] {
        h.faults("oa-1", f.clone());
        let (s, headers, _) = h.chat(&chat_body()).await;
        assert_eq!(s, 200, "{f:?}");
        assert_eq!(headers["x-switchyard-provider"], "oa-2");
    }
}
