//! Rate limits as clients see them: exact under concurrency, headers on
//! every kind of response, honest Retry-After, one limit across gateways
//! sharing Redis, and a Redis outage that degrades instead of failing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::{json, Value};
use switchyard::{
    config::Config,
    proto::{chat_client::ChatClient, message, ChatRequest, Message, Role},
    simulator::{self, Faults, SimState},
};
use tokio::net::TcpListener;

const REDIS: &str = "redis://127.0.0.1:6379";

fn key_toml(name: &str, key: &str, rpm: Option<u32>, tpm: Option<u64>) -> String {
    let mut s = format!("[[keys]]\nname = \"{name}\"\nkey = \"{key}\"\n");
    if let Some(r) = rpm {
        s.push_str(&format!("requests_per_minute = {r}\n"));
    }
    if let Some(t) = tpm {
        s.push_str(&format!("tokens_per_minute = {t}\n"));
    }
    s
}

async fn gateway_with(backend: &str, keys: &str) -> Harness {
    let keys = keys.to_owned();
    let backend = backend.to_owned();
    start_with(move |sim| single_provider_config(sim, &temp_db_url(), &backend, &keys)).await
}

async fn send(h: &Harness, key: &str, body: &Value) -> reqwest::Response {
    h.http.post(h.url("/v1/chat/completions")).bearer_auth(key).json(body).send().await.unwrap()
}

fn hello() -> Value {
    json!({"model": "gpt-4o-mini", "messages": user("Hello")})
}

fn header(resp: &reqwest::Response, name: &str) -> Option<u64> {
    resp.headers().get(name)?.to_str().ok()?.parse().ok()
}

async fn exact_under_concurrency(backend: &str) {
    let key = format!("ze_{}", unique("limit").replace('-', "_"));
    let h = gateway_with(backend, &key_toml(&unique("k"), &key, Some(5), None)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (client, url, key) = (h.http.clone(), h.url("/v1/chat/completions"), key.clone());
        tasks.spawn(async move { client.post(url).bearer_auth(key).json(&hello()).send().await.unwrap() });
    }
    let (mut ok, mut limited) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let resp = r.unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(header(&resp, "retry-after").unwrap() >= 1);
                assert_eq!(header(&resp, "x-ratelimit-remaining"), Some(0));
                let v: Value = resp.json().await.unwrap();
                assert_eq!(v["error"]["code"], "rate_limited");
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!((ok, limited), (5, 15), "{backend}: N parallel requests against a limit of M admit exactly M");
    assert_eq!(h.sim.state.stats().requests, 5, "refused requests never reach a provider");
}

#[tokio::test]
async fn limits_are_exact_under_concurrency_in_memory() {
    exact_under_concurrency("memory").await;
}

#[tokio::test]
async fn limits_are_exact_under_concurrency_in_redis() {
    exact_under_concurrency(REDIS).await;
}

#[tokio::test]
async fn every_kind_of_response_carries_the_headers() {
    let key = "ze_headers_key_0123456";
    let h = gateway_with("memory", &key_toml("headers", key, Some(10), Some(1000))).await;
    let first = send(&h, key, &hello()).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit"), Some(10));
    assert_eq!(header(&first, "x-ratelimit-remaining"), Some(9));
    assert_eq!(header(&first, "x-ratelimit-reset"), Some(6), "seconds until full again, rounded up");
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), Some(1000));
    let second = send(&h, key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).await;
    assert_eq!(second.headers()["content-type"], "text/event-stream");
    assert_eq!(header(&second, "x-ratelimit-remaining"), Some(8), "Remaining really decreases");
    let _ = second.text().await.unwrap();
    // Refused before the rate-limit step: headers, but nothing counted.
    for (body, status) in [(json!({"model": "nope", "messages": user("x")}), 404), (json!({"model": "gpt-4o-mini"}), 400)] {
        let resp = send(&h, key, &body).await;
        assert_eq!(resp.status(), status);
        assert_eq!(header(&resp, "x-ratelimit-remaining"), Some(8), "{body}");
    }
    let raw = h.http.post(h.url("/v1/chat/completions")).bearer_auth(key).body("{oops").send().await.unwrap();
    assert_eq!(raw.status(), 400);
    assert_eq!(header(&raw, "x-ratelimit-remaining"), Some(8));
    // A 401 has no key to count against.
    let anon = send(&h, "ze_nobody_0000000000", &hello()).await;
    assert_eq!(anon.status(), 401);
    assert!(anon.headers().get("x-ratelimit-limit").is_none());

    // gRPC: initial metadata on success, and on errors.
    let mut c = ChatClient::connect(format!("http://{}", h.addr)).await.unwrap();
    let req = |model: &str| {
        let mut r = tonic::Request::new(ChatRequest {
            model: model.into(),
            messages: vec![Message { role: Role::User as i32, content: Some(message::Content::Text("Hello".into())), ..Default::default() }],
            ..Default::default()
        });
        r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    let ok = c.complete(req("gpt-4o-mini")).await.unwrap();
    assert_eq!(ok.metadata().get("x-ratelimit-remaining").unwrap(), "7");
    assert!(ok.metadata().get("x-ratelimit-remaining-tokens").is_some());
    let err = c.complete(req("nope")).await.unwrap_err();
    assert_eq!(err.metadata().get("x-ratelimit-remaining").unwrap(), "7");
}

#[tokio::test]
async fn token_limits_charge_real_usage() {
    let key = "ze_tokens_key_01234567";
    let h = gateway_with("memory", &key_toml("tokens", key, None, Some(100))).await;
    let first = send(&h, key, &hello()).await;
    assert_eq!(header(&first, "x-ratelimit-remaining-tokens"), Some(98), "input estimated at admission");
    assert!(first.headers().get("x-ratelimit-limit").is_none(), "no request limit, no request headers");
    let _ = first.text().await;
    let second = send(&h, key, &hello()).await;
    // The first really used 17 (1 in, 16 out): 100 - 17 - 2 = 81, give or
    // take one token replenished meanwhile.
    let left = header(&second, "x-ratelimit-remaining-tokens").unwrap();
    assert!((81..=82).contains(&left), "{left}");
    for _ in 0..4 {
        let _ = send(&h, key, &hello()).await.text().await;
    }
    let over = send(&h, key, &hello()).await;
    assert_eq!(over.status(), 429, "over the token limit");
    assert!(header(&over, "retry-after").unwrap() >= 1);
}

#[tokio::test]
async fn retry_after_is_honest() {
    let key = "ze_retry_after_key_0123";
    let h = gateway_with("memory", &key_toml("retry", key, Some(120), None)).await;
    let mut limited = None;
    for _ in 0..130 {
        let resp = send(&h, key, &hello()).await;
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
    }
    let resp = limited.expect("the limit is reached");
    let wait = header(&resp, "retry-after").unwrap();
    assert_eq!(wait, 1, "one request frees every half second, rounded up");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(send(&h, key, &hello()).await.status(), 200, "admitted after Retry-After");
}

#[tokio::test]
async fn two_gateways_sharing_redis_enforce_one_limit() {
    let key = format!("ze_{}", unique("shared").replace('-', "_"));
    let keys = key_toml(&unique("shared"), &key, Some(6), None);
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    let text = single_provider_config(&sim.url(), &temp_db_url(), REDIS, &keys);
    let text_b = single_provider_config(&sim.url(), &temp_db_url(), REDIS, &keys);
    let sim_b = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), sim.state.clone()).unwrap();
    let a = start_gateway(sim, Config::parse(&text, "a").unwrap()).await;
    let b = start_gateway(sim_b, Config::parse(&text_b, "b").unwrap()).await;
    let mut ok = 0;
    for i in 0..10 {
        let h = if i % 2 == 0 { &a } else { &b };
        if send(h, &key, &hello()).await.status() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 6, "one limit across both replicas");
}

#[tokio::test]
async fn an_unreachable_redis_degrades_but_keeps_serving() {
    let key = "ze_degraded_key_012345";
    let h = gateway_with("redis://127.0.0.1:1", &key_toml("degraded", key, Some(3), None)).await;
    let statuses: Vec<u16> = {
        let mut v = vec![];
        for _ in 0..4 {
            v.push(send(&h, key, &hello()).await.status().as_u16());
        }
        v
    };
    assert_eq!(statuses, vec![200, 200, 200, 429], "limits still hold, per replica");
    let ready = h.http.get(h.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "a shared backend's outage does not pull the replica");
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["limits"], "degraded", "{body}");
    assert_eq!(body["checks"]["storage"], "ok");
}
