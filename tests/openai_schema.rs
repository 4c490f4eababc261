//! "OpenAI-compatible" checked against OpenAI's own published OpenAPI
//! document (shared/spec/openai/openapi.yaml): what the gateway returns
//! validates against its response schemas, and what the openai adapter
//! sends upstream against its request schema.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::OnceLock;

use common::*;
use serde_json::{json, Value};

/// The document's `components`, loaded once per test binary.
fn components() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/spec/openai/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        // The document has integers beyond i64 (seed's bounds written as
        // ±9223372036854776000), which serde_yaml refuses: read them as floats.
        let text: String = text
            .lines()
            .map(|l| match l.rsplit_once(": ") {
                Some((k, v)) if v.parse::<i128>().is_ok() && v.parse::<i64>().is_err() => format!("{k}: {v}.0\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        let mut doc: Value = serde_yaml::from_str(&text).unwrap();
        let mut components = doc["components"].take();
        honour_nullable(&mut components);
        components
    })
}

/// The document still marks optional-null values with OpenAPI 3.0's
/// `nullable: true`, which JSON Schema ignores: give it its meaning
/// (`anyOf: [schema, null]`), or every `finish_reason: null` would fail.
fn honour_nullable(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(honour_nullable),
        Value::Object(map) => {
            map.values_mut().for_each(honour_nullable);
            if map.get("nullable") == Some(&Value::Bool(true)) {
                map.remove("nullable");
                let inner = Value::Object(std::mem::take(map));
                map.insert("anyOf".into(), json!([inner, {"type": "null"}]));
            }
        }
        _ => {}
    }
}

/// Validates `instance` against `#/components/schemas/{name}`.
fn assert_valid(name: &str, instance: &Value) {
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{name}"),
        "components": components(),
    });
    let validator = jsonschema::options().with_draft(jsonschema::Draft::Draft202012).build(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{name} rejects {instance}:\n{}", errors.join("\n"));
}

#[tokio::test]
async fn responses_validate_against_openais_schemas() {
    let h = start().await;
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    for model in ["gpt-4o-mini", "claude-sonnet-4"] {
        for extra in [json!({}), json!({"tools": tools})] {
            let mut body = json!({"model": model, "messages": user("Hello")});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let (status, _, resp) = h.chat(&body).await;
            assert_eq!(status, 200);
            assert_valid("CreateChatCompletionResponse", &resp);

            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let text = h.post_chat(&body).send().await.unwrap().text().await.unwrap();
            let (chunks, done) = sse_chunks(&text);
            assert!(done);
            for c in &chunks {
                assert_valid("CreateChatCompletionStreamResponse", c);
            }
        }
    }
    // Error envelopes are OpenAI's ErrorResponse too.
    let (status, _, err) = h.chat(&json!({"model": "nope", "messages": user("x")})).await;
    assert_eq!(status, 404);
    assert_valid("ErrorResponse", &err);
}

#[tokio::test]
async fn requests_sent_upstream_validate_against_openais_request_schema() {
    let h = start().await;
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"}
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "temperature": 0.5, "stop": "END", "seed": 1, "response_format": {"type": "json_object"}, "stream": true
    });
    let text = h.post_chat(&body).send().await.unwrap().text().await.unwrap();
    assert!(sse_chunks(&text).1);
    let sent = h.upstream_requests("/p/oa-1/").pop().unwrap();
    assert_valid("CreateChatCompletionRequest", &sent.body);
}

#[tokio::test]
async fn models_lists_what_the_key_may_use_in_openais_shape() {
    let h = start().await;
    let all: Value = h.http.get(h.url("/v1/models")).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
    assert_valid("ListModelsResponse", &all);
    let ids: Vec<&str> = all["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["gpt-4o-mini", "claude-sonnet-4", "mixed"]);
    let some: Value = h.http.get(h.url("/v1/models")).bearer_auth(CLAUDE_ONLY_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(some["data"].as_array().unwrap().len(), 1, "only the key's own globs: {some}");
    assert_eq!(h.http.get(h.url("/v1/models")).send().await.unwrap().status(), 401);
    assert_eq!(h.http.post(h.url("/v1/models")).bearer_auth(KEY).send().await.unwrap().status(), 405);
}
