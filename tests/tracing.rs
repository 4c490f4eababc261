//! Traces as an operator sees them in their OpenTelemetry backend: an
//! in-process OTLP collector receives one span per request and one child
//! span per provider attempt, continuing the client's trace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{otlp::*, *};
use serde_json::json;
use switchyard::simulator::Faults;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_failed_over_request_exports_its_span_and_one_span_per_attempt() {
    let (endpoint, collected) = collector().await;
    let mut h = start_with(|sim| config_toml(sim, &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"switchyard-test\"\n"))).await;
    h.faults("oa-1", Faults { status: Some(500), ..Default::default() });
    let resp = h
        .post_chat(&json!({"model": "gpt-4o-mini", "messages": user("Hello")}))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let tp = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    assert!(tp.starts_with(&format!("00-{TRACE_ID}-")), "the client's trace is continued: {tp}");
    let request_span_id = tp.split('-').nth(2).unwrap().to_owned();

    // The trace context went upstream, naming each attempt's own span.
    let upstream_tp = h.upstream_requests("/p/oa-2/")[0].headers["traceparent"].clone();
    assert!(upstream_tp.starts_with(&format!("00-{TRACE_ID}-")), "{upstream_tp}");

    h.shutdown(); // flushes the exporter
    let spans = collected.spans.clone();
    eventually("spans reach the collector", || spans.lock().unwrap().len() >= 3).await;
    let spans = collected.spans.lock().unwrap().clone();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let request = spans.iter().find(|s| hex(&s.span_id) == request_span_id).expect("the request span");
    assert_eq!(hex(&request.trace_id), TRACE_ID);
    assert_eq!(hex(&request.parent_span_id), PARENT_SPAN);
    assert_eq!(attr_int(request, "http.response.status_code"), Some(200));

    let mut attempts: Vec<&Span> = spans.iter().filter(|s| hex(&s.parent_span_id) == request_span_id).collect();
    attempts.sort_by_key(|s| attr_int(s, "switchyard.attempt"));
    assert_eq!(attempts.len(), 2, "one span per attempt");
    let (failed, served) = (attempts[0], attempts[1]);
    assert_eq!(attr_str(failed, "switchyard.provider.id").as_deref(), Some("oa-1"));
    assert_eq!(attr_str(failed, "switchyard.outcome").as_deref(), Some("failure"));
    assert_eq!(attr_str(failed, "error.type").as_deref(), Some("server_error"));
    assert_eq!(attr_str(served, "switchyard.provider.id").as_deref(), Some("oa-2"));
    assert_eq!(attr_str(served, "switchyard.outcome").as_deref(), Some("success"));
    assert_eq!(attr_str(served, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(attr_str(served, "gen_ai.request.model").as_deref(), Some("gpt-4o-mini"));
    assert_eq!(attr_str(served, "gen_ai.provider.name").as_deref(), Some("openai"));
    assert_eq!(attr_int(served, "gen_ai.usage.output_tokens"), Some(16));
    assert!(attr(served, "switchyard.ttft_ms").is_some());
    assert!(upstream_tp.contains(&hex(&served.span_id)), "upstream saw the attempt's span");
    for s in spans.iter() {
        for a in &s.attributes {
            let v = format!("{:?}", a.value);
            assert!(!v.contains("secret"), "no provider secret in spans: {} = {v}", a.key);
        }
    }
}

#[tokio::test]
async fn a_dead_collector_loses_spans_not_requests() {
    // A port with nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let h = start_with(|sim| config_toml(sim, &format!("[telemetry]\notlp_endpoint = \"http://{dead}\"\n"))).await;
    let started = Instant::now();
    for _ in 0..20 {
        let (status, headers, _) = h.chat(&json!({"model": "gpt-4o-mini", "messages": user("Hello")})).await;
        assert_eq!(status, 200);
        assert!(headers.contains_key("traceparent"));
    }
    assert!(started.elapsed() < Duration::from_secs(3), "export never slows requests: {:?}", started.elapsed());
}

#[tokio::test]
async fn every_response_carries_a_traceparent_even_without_a_collector() {
    let h = start().await;
    for resp in [
        h.http.get(h.url("/healthz")).send().await.unwrap(),
        h.http.get(h.url("/nope")).send().await.unwrap(),
        h.http.post(h.url("/v1/chat/completions")).send().await.unwrap(),
        h.post_chat(&json!({"model": "gpt-4o-mini", "messages": user("Hello")})).send().await.unwrap(),
    ] {
        let tp = resp.headers()["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55, "{tp}");
    }
}
