//! What operators rely on (API.md, CONFIG.md): `/metrics`, readiness while
//! draining, gRPC health, and config reload, against the real server and
//! the simulator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use serde_json::{json, Value};
use switchyard::{
    config::Config,
    proto::{chat_client::ChatClient, message, ChatRequest, Message, Role},
    simulator::Faults,
};
use tonic::transport::Channel;

/// Samples of a Prometheus text exposition: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(http: &reqwest::Client, url: &str) -> HashMap<String, f64> {
    let resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "a complete exposition");
    samples(&text)
}

fn get(s: &HashMap<String, f64>, key: &str) -> f64 {
    s.get(key).copied().unwrap_or(0.0)
}

fn grpc_chat(model: &str) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        messages: vec![Message {
            role: Role::User as i32,
            content: Some(message::Content::Text("Hello".into())),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_count_what_clients_saw() {
    let h = start_with(|sim| config_toml(sim, "[[keys]]\nname = \"slow\"\nkey = \"ze_test_rpm_one\"\nrequests_per_minute = 1\n")).await;
    // oa-1 is tried first (config order) and fails: each request fails over.
    h.faults("oa-1", Faults { status: Some(500), ..Default::default() });
    let ask = json!({"model": "gpt-4o-mini", "messages": user("Hello")});
    // Failovers the clients saw, from X-Switchyard-Attempts.
    let mut failovers = 0.0;
    let attempts = |h: &reqwest::header::HeaderMap| h["x-switchyard-attempts"].to_str().unwrap().parse::<f64>().unwrap();
    for _ in 0..3 {
        let (status, headers, body) = h.chat(&ask).await;
        assert_eq!(status, 200, "{body}");
        failovers += attempts(&headers) - 1.0;
    }
    assert!(failovers >= 1.0, "the first request tries oa-1 first (config order)");
    let streamed = h
        .post_chat(&json!({"model": "gpt-4o-mini", "messages": user("Hello"), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    failovers += attempts(streamed.headers()) - 1.0;
    assert!(sse_chunks(&streamed.text().await.unwrap()).1);
    // Refused before routing: no key, an unknown model, the rate limit.
    let no_key = h.http.post(h.url("/v1/chat/completions")).json(&ask).send().await.unwrap();
    assert_eq!(no_key.status(), 401);
    let (status, _, _) = h.chat(&json!({"model": "no-such-model", "messages": user("Hello")})).await;
    assert_eq!(status, 404);
    let slow = |h: &Harness| h.http.post(h.url("/v1/chat/completions")).bearer_auth("ze_test_rpm_one").json(&ask).send();
    let first = slow(&h).await.unwrap();
    assert_eq!(first.status(), 200);
    failovers += attempts(first.headers()) - 1.0;
    assert_eq!(slow(&h).await.unwrap().status(), 429);
    // gRPC: one answer, one refusal.
    let mut grpc = ChatClient::connect(format!("http://{}", h.addr)).await.unwrap();
    let mut req = tonic::Request::new(grpc_chat("gpt-4o-mini"));
    req.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let answer = grpc.complete(req).await.unwrap();
    failovers += answer.metadata().get("x-switchyard-attempts").unwrap().to_str().unwrap().parse::<f64>().unwrap() - 1.0;
    assert_eq!(grpc.complete(tonic::Request::new(grpc_chat("gpt-4o-mini"))).await.unwrap_err().code(), tonic::Code::Unauthenticated);

    // No key needed; requests are counted once their response is over.
    let url = h.url("/metrics");
    let mut s = scrape(&h.http, &url).await;
    for _ in 0..50 {
        if get(&s, r#"switchyard_requests_total{endpoint="switchyard.v1.Chat/Complete",model="",key="",code="unauthenticated"}"#) == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = scrape(&h.http, &url).await;
    }
    let chat = "/v1/chat/completions";
    assert_eq!(get(&s, &format!(r#"switchyard_requests_total{{endpoint="{chat}",model="gpt-4o-mini",key="all",code="ok"}}"#)), 4.0, "{s:#?}");
    assert_eq!(get(&s, &format!(r#"switchyard_requests_total{{endpoint="{chat}",model="gpt-4o-mini",key="slow",code="ok"}}"#)), 1.0);
    assert_eq!(get(&s, &format!(r#"switchyard_requests_total{{endpoint="{chat}",model="gpt-4o-mini",key="slow",code="rate_limited"}}"#)), 1.0);
    assert_eq!(get(&s, &format!(r#"switchyard_requests_total{{endpoint="{chat}",model="",key="",code="unauthenticated"}}"#)), 1.0);
    assert_eq!(get(&s, &format!(r#"switchyard_requests_total{{endpoint="{chat}",model="",key="all",code="not_found"}}"#)), 1.0, "an unknown model is not a label");
    assert_eq!(get(&s, r#"switchyard_requests_total{endpoint="switchyard.v1.Chat/Complete",model="gpt-4o-mini",key="all",code="ok"}"#), 1.0);
    assert_eq!(get(&s, &format!(r#"switchyard_request_duration_seconds_count{{endpoint="{chat}",model="gpt-4o-mini"}}"#)), 6.0);
    // Six answers, all from oa-2; oa-1 failed whenever it was tried first.
    assert_eq!(get(&s, r#"switchyard_attempts_total{provider="oa-2",outcome="success"}"#), 6.0);
    assert_eq!(get(&s, r#"switchyard_attempts_total{provider="oa-1",outcome="failure"}"#), failovers);
    assert_eq!(get(&s, r#"switchyard_failovers_total{provider="oa-1"}"#), failovers);
    assert_eq!(get(&s, r#"switchyard_ttft_seconds_count{model="gpt-4o-mini"}"#), 6.0);
    assert_eq!(get(&s, r#"switchyard_limiter_decisions_total{decision="allowed"}"#), 6.0);
    assert_eq!(get(&s, r#"switchyard_limiter_decisions_total{decision="limited"}"#), 1.0);
    // Live route figures.
    assert_eq!(s.get(r#"switchyard_route_breaker_state{model="gpt-4o-mini",provider="oa-2"}"#), Some(&0.0), "closed");
    assert!(s.contains_key(r#"switchyard_route_breaker_state{model="gpt-4o-mini",provider="oa-1"}"#));
    let (good, bad) = (
        get(&s, r#"switchyard_route_score{model="gpt-4o-mini",provider="oa-2"}"#),
        s.get(r#"switchyard_route_score{model="gpt-4o-mini",provider="oa-1"}"#).copied().unwrap_or(f64::INFINITY),
    );
    assert!(good < bad, "the failing route scores worse: {good} vs {bad}");
    assert!(get(&s, r#"switchyard_route_error_rate{model="gpt-4o-mini",provider="oa-1"}"#) > 0.0);
    assert_eq!(s.get(r#"switchyard_route_in_flight{model="claude-sonnet-4",provider="an-1"}"#), Some(&0.0));
    assert!(s.contains_key("switchyard_ledger_queue_depth"));
    assert_eq!(s.get("switchyard_draining"), Some(&0.0));
}

#[tokio::test]
async fn a_stream_that_fails_midway_is_counted_with_its_error() {
    let h = start_with(|sim| config_toml(sim, "")).await;
    // Anthropic alone serves this model: a reset after content ends the
    // stream with an error event, and nobody is left to continue it.
    h.faults("an-1", Faults { reset_after: Some(2), ..Default::default() });
    let resp = h
        .post_chat(&json!({"model": "claude-sonnet-4", "messages": user("Hello"), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, done) = sse_chunks(&resp.text().await.unwrap());
    assert!(!done);
    let key = r#"switchyard_requests_total{endpoint="/v1/chat/completions",model="claude-sonnet-4",key="all",code="provider_unavailable"}"#;
    let mut s = scrape(&h.http, &h.url("/metrics")).await;
    for _ in 0..50 {
        if get(&s, key) == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = scrape(&h.http, &h.url("/metrics")).await;
    }
    assert_eq!(get(&s, key), 1.0, "{s:#?}");
}

#[tokio::test]
async fn metrics_move_to_admin_listen_when_it_is_set() {
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let h = start_with(|sim| config_toml(sim, "").replace("shutdown_grace = \"5s\"", &format!("shutdown_grace = \"5s\"\nadmin_listen = \"{admin}\""))).await;
    eventually_async(|| async { h.http.get(h.url("/healthz")).send().await.is_ok() }).await;
    assert_eq!(h.http.get(h.url("/metrics")).send().await.unwrap().status(), 404, "only on the admin port");
    let s = scrape(&h.http, &format!("http://{admin}/metrics")).await;
    assert_eq!(s.get("switchyard_draining"), Some(&0.0));
}

async fn eventually_async<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn draining_says_not_ready_while_still_serving_then_stops() {
    let mut h = start_with(|sim| config_toml(sim, "").replace("shutdown_grace = \"5s\"", "shutdown_grace = \"5s\"\ndrain_delay = \"1500ms\"")).await;
    let ready = h.http.get(h.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["telemetry"], "ok");
    assert_eq!(body["checks"]["telemetry_export"], "off");
    let channel = Channel::from_shared(format!("http://{}", h.addr)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |service: &str| tonic_health::pb::HealthCheckRequest { service: service.into() };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(health.check(check("")).await.unwrap().into_inner().status, serving);

    h.shutdown();
    // Not ready at once, on a fresh connection too, while requests are
    // still answered: the balancer's window to stop sending.
    let fresh = reqwest::Client::new();
    eventually_async(|| async { fresh.get(h.url("/readyz")).send().await.unwrap().status() == 503 }).await;
    let body: Value = fresh.get(h.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["status"], "draining");
    for service in ["", "switchyard.v1.Chat", "switchyard.v1.Generations"] {
        assert_eq!(health.check(check(service)).await.unwrap().into_inner().status, not_serving, "{service:?}");
    }
    let resp = fresh
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-4o-mini", "messages": user("Hello")}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "still serving during the drain delay");
    let s = scrape(&fresh, &h.url("/metrics")).await;
    assert_eq!(s.get("switchyard_draining"), Some(&1.0));
    // Then the listener closes and the server ends.
    let task = h.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
    assert!(reqwest::Client::new().get(h.url("/healthz")).send().await.is_err());
}

/// The config `config_toml` makes, with `edit` applied to its text.
fn edited(h: &Harness, edit: impl FnOnce(String) -> String) -> Config {
    Config::parse(&edit(config_toml(&h.sim.url(), "")), "reloaded config").unwrap()
}

async fn model_ids(h: &Harness, key: &str) -> Vec<String> {
    let resp = h.http.get(h.url("/v1/models")).bearer_auth(key).send().await.unwrap();
    let body: Value = resp.json().await.unwrap();
    body["data"].as_array().map(|a| a.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn a_reload_serves_new_requests_on_the_new_config_and_lets_streams_finish() {
    let h = start().await;
    // A stream in flight across the reload: 30 words, 40 ms apart.
    h.faults("oa-1", Faults { chunk_delay_ms: Some(40), tokens: Some(30), ..Default::default() });
    let streaming = h
        .post_chat(&json!({"model": "gpt-4o-mini", "messages": user("Keep going"), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status(), 200);
    assert_eq!(streaming.headers()["x-switchyard-provider"], "oa-1");

    // The new config: gpt-4o-mini is gone, gpt-4o (on oa-2, priced) is new,
    // the claude-only key is gone and the other key may use gpt-* only, at
    // 1,000 requests a minute.
    let new = edited(&h, |t| {
        t.replace("id = \"gpt-4o-mini\"\n  [[models.routes]]\n  provider = \"oa-1\"\n  upstream_model = \"gpt-4o-mini-2024-07-18\"\n", "id = \"gpt-4o\"\n")
            .replace("upstream_model = \"gpt-4o-mini\"\n", "upstream_model = \"gpt-4o-mini\"\n  price = { input_per_mtok = 1000.0, output_per_mtok = 1000.0 }\n")
            .replace("[[keys]]\nname = \"claude-only\"\nkey = \"ze_test_key_claude_only\"\nmodels = [\"claude-*\"]", "")
            .replace("name = \"all\"\nkey = \"ze_test_key_all_models\"", "name = \"all\"\nkey = \"ze_test_key_all_models\"\nmodels = [\"gpt-*\"]\nrequests_per_minute = 1000")
    });
    h.reload.send(new).await.unwrap();
    eventually_async(|| async { model_ids(&h, KEY).await == ["gpt-4o"] }).await;

    let (status, headers, body) = h.chat(&json!({"model": "gpt-4o", "messages": user("Hello")})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-switchyard-provider"], "oa-2");
    assert_eq!(headers["x-ratelimit-limit"], "1000", "the key's new limit applies");
    // Charged at the new price: $0.001 a token.
    let storage = switchyard::storage::Storage::connect(&h.storage_url).await.unwrap();
    let id = body["id"].as_str().unwrap();
    let mut row = None;
    for _ in 0..100 {
        row = storage.ledger_rows("all").await.unwrap().into_iter().find(|r| r.request_id == id);
        if row.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = row.expect("the answer's ledger row");
    let tokens = body["usage"]["prompt_tokens"].as_f64().unwrap() + body["usage"]["completion_tokens"].as_f64().unwrap();
    assert!((row.cost_usd - tokens / 1000.0).abs() < 1e-9, "{} for {tokens} tokens", row.cost_usd);
    let (status, _, body) = h.chat(&json!({"model": "gpt-4o-mini", "messages": user("Hello")})).await;
    assert_eq!(status, 404, "{body}");
    let (status, _, _) = h.chat(&json!({"model": "claude-sonnet-4", "messages": user("Hello")})).await;
    assert_eq!(status, 403, "the key's new models apply");
    let gone = h.http.get(h.url("/v1/models")).bearer_auth(CLAUDE_ONLY_KEY).send().await.unwrap();
    assert_eq!(gone.status(), 401, "a removed key is refused");

    // The stream admitted before the reload finished whole, on the old route.
    let (chunks, done) = sse_chunks(&streaming.text().await.unwrap());
    assert!(done, "no [DONE]");
    assert_eq!(streamed_text(&chunks), expected_answer("Keep going", 30));
    let s = scrape(&h.http, &h.url("/metrics")).await;
    assert_eq!(s.get("switchyard_config_reloads_total"), Some(&1.0));
    assert!(s.contains_key(r#"switchyard_route_score{model="gpt-4o",provider="oa-2"}"#));
    assert!(!s.keys().any(|k| k.contains("model=\"gpt-4o-mini\"") && k.starts_with("switchyard_route")), "removed routes are not reported");
}

#[tokio::test]
async fn a_route_kept_across_a_reload_keeps_its_breaker() {
    let h = start().await;
    h.faults("an-1", Faults { status: Some(500), ..Default::default() });
    for _ in 0..5 {
        let (status, _, _) = h.chat(&json!({"model": "claude-sonnet-4", "messages": user("Hello")})).await;
        assert_eq!(status, 502);
    }
    h.faults("an-1", Faults::default());
    // A price change only: the route is the same one.
    let new = edited(&h, |t| t.replace("upstream_model = \"claude-sonnet-4-20250514\"\n\n", "upstream_model = \"claude-sonnet-4-20250514\"\n  price = { input_per_mtok = 3.0, output_per_mtok = 15.0 }\n\n"));
    h.reload.send(new).await.unwrap();
    eventually_async(|| async {
        let s = scrape(&h.http, &h.url("/metrics")).await;
        s.get("switchyard_config_reloads_total") == Some(&1.0)
    })
    .await;
    let (status, _, body) = h.chat(&json!({"model": "claude-sonnet-4", "messages": user("Hello")})).await;
    assert_eq!(status, 502, "the circuit opened before the reload is still open: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("circuit"), "{body}");
}
