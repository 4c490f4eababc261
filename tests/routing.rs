//! The router against the simulator over real HTTP: scoring moves traffic,
//! failover (before and during a stream) is transparent, hedging picks the
//! faster, the circuit opens and closes, deadlines hold across attempts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchyard::{routing::stream::CONTINUE_INSTRUCTION, simulator::Faults};

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": user("Hello")})
}

fn streamed(model: &str) -> Value {
    json!({"model": model, "stream": true, "stream_options": {"include_usage": true}, "messages": user("Hello")})
}

async fn served_by(h: &Harness, body: &Value) -> String {
    let (status, headers, b) = h.chat(body).await;
    assert_eq!(status, 200, "{b}");
    headers["x-switchyard-provider"].to_str().unwrap().to_owned()
}

async fn stream_text(h: &Harness, body: &Value) -> (reqwest::header::HeaderMap, String) {
    let resp = h.post_chat(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    (headers, resp.text().await.unwrap())
}

#[tokio::test]
async fn a_slow_provider_loses_traffic_to_a_fast_one() {
    let h = start().await;
    h.faults("oa-1", Faults { latency_ms: Some(150), ..Default::default() });
    let mut fast = 0;
    for _ in 0..20 {
        if served_by(&h, &chat()).await == "oa-2" {
            fast += 1;
        }
    }
    assert!(fast >= 17, "the fast provider served {fast} of 20");
}

#[tokio::test]
async fn a_half_failing_provider_loses_most_traffic_and_wins_it_back_when_healed() {
    // The scorer's memory is shortened so healing shows within the test.
    let h = start_with(|sim| config_toml(sim, "[routing]\ndecay = \"400ms\"\n")).await;
    h.faults("oa-1", Faults { fail_rate: Some(0.5), ..Default::default() });
    h.faults("oa-2", Faults { latency_ms: Some(20), ..Default::default() });
    let mut flaky = 0;
    for _ in 0..40 {
        // Every request succeeds: failures fail over.
        if served_by(&h, &chat()).await == "oa-1" {
            flaky += 1;
        }
    }
    let tried_flaky = h.upstream_requests("/p/oa-1/").len();
    assert!(tried_flaky < 20, "the flaky provider was tried {tried_flaky} times of 40");
    assert!(flaky < 15, "the flaky provider served {flaky} of 40");
    // Healed, and faster than the other: once its errors fade, it wins its
    // traffic back.
    h.faults("oa-1", Faults::default());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut healed = 0;
    for _ in 0..20 {
        if served_by(&h, &chat()).await == "oa-1" {
            healed += 1;
        }
    }
    assert!(healed >= 15, "the healed provider served {healed} of 20");
}

#[tokio::test]
async fn a_stream_reset_after_n_chunks_continues_on_the_next_provider() {
    let h = start().await;
    h.faults("oa-1", Faults { reset_after: Some(5), ..Default::default() });
    let (headers, text) = stream_text(&h, &streamed("gpt-4o-mini")).await;
    assert_eq!(headers["x-switchyard-provider"], "oa-1", "the provider that sent the first content");
    let (chunks, done) = sse_chunks(&text);
    assert!(done, "one complete stream: {text}");
    assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16), "no repeated or lost text");
    assert!(text.contains(": switchyard failover provider=oa-2 attempt=2\n\n"), "{text}");
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id));
    let roles = chunks.iter().filter(|c| c["choices"].get(0).is_some_and(|ch| ch["delta"].get("role").is_some())).count();
    assert_eq!(roles, 1, "the continuing provider's preamble is not repeated");
    // Usage: the first attempt's input, every output token the client got.
    let usage = &chunks.last().unwrap()["usage"];
    let first_part: String = expected_answer("Hello", 16).split(' ').take(5).collect::<Vec<_>>().join(" ");
    // (Estimated: the broken attempt never reported its usage.)
    assert_eq!(usage["prompt_tokens"], switchyard::routing::stream::estimate_tokens("Hello"));
    assert_eq!(usage["completion_tokens"], switchyard::routing::stream::estimate_tokens(&first_part) + 11);
    // The next provider was handed the text so far as an assistant prefill.
    let sent = h.upstream_requests("/p/oa-2/").pop().unwrap();
    let msgs = sent.body["messages"].as_array().unwrap();
    assert_eq!(msgs.last().unwrap(), &json!({"role": "assistant", "content": first_part}));
}

#[tokio::test]
async fn stalls_and_malformed_events_mid_stream_fail_over_too() {
    let h = start().await;
    for f in [Faults { stall_after: Some(4), ..Default::default() }, Faults { malformed_after: Some(4), ..Default::default() }] {
        h.faults("oa-1", f.clone());
        h.faults("oa-2", Faults::default());
        let (_, text) = stream_text(&h, &streamed("gpt-4o-mini")).await;
        let (chunks, done) = sse_chunks(&text);
        assert!(done, "{f:?}: {text}");
        assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16), "{f:?}");
        // Make oa-1 the better route again for the next case.
        h.faults("oa-2", Faults { latency_ms: Some(1), ..Default::default() });
    }
}

/// A config where `first` is tried first (it is listed first and both are
/// untried), continuing onto `second` with the given continuation mode.
fn pair_config(sim: &str, first_kind: &str, second_kind: &str, second_continuation: &str) -> String {
    let base = |kind: &str, name: &str| match kind {
        "anthropic" => format!("{sim}/p/{name}"),
        _ => format!("{sim}/p/{name}/v1"),
    };
    format!(
        r#"
[server]
request_timeout = "10s"
[storage]
url = "{}"
[[providers]]
id = "first"
kind = "{first_kind}"
base_url = "{}"
idle_timeout = "500ms"
[[providers]]
id = "second"
kind = "{second_kind}"
base_url = "{}"
[[models]]
id = "m"
  [[models.routes]]
  provider = "first"
  upstream_model = "up-first"
  [[models.routes]]
  provider = "second"
  upstream_model = "up-second"
  continuation = "{second_continuation}"
[[keys]]
name = "all"
key = "{KEY}"
"#,
        temp_db_url(),
        base(first_kind, "first"),
        base(second_kind, "second")
    )
}

#[tokio::test]
async fn continuation_by_instruction_where_the_route_takes_no_prefill() {
    let h = start_with(|sim| pair_config(sim, "anthropic", "openai", "instruction")).await;
    h.faults("first", Faults { reset_after: Some(3), ..Default::default() });
    let (_, text) = stream_text(&h, &json!({"model": "m", "stream": true, "messages": user("Hello")})).await;
    let (chunks, done) = sse_chunks(&text);
    assert!(done, "{text}");
    assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16));
    let sent = h.upstream_requests("/p/second/").pop().unwrap();
    let msgs = sent.body["messages"].as_array().unwrap();
    assert_eq!(msgs.last().unwrap()["role"], "user", "no prefill is sent to a route that rejects it");
    assert_eq!(msgs.last().unwrap()["content"], CONTINUE_INSTRUCTION);
    assert_eq!(msgs[msgs.len() - 2]["role"], "assistant");
}

#[tokio::test]
async fn an_anthropic_stream_continues_on_openai_by_prefill() {
    let h = start_with(|sim| pair_config(sim, "anthropic", "openai", "prefill")).await;
    h.faults("first", Faults { reset_after: Some(6), ..Default::default() });
    let (_, text) = stream_text(&h, &json!({"model": "m", "stream": true, "messages": user("Hello")})).await;
    let (chunks, done) = sse_chunks(&text);
    assert!(done);
    assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16));
    assert!(text.contains(": switchyard failover provider=second attempt=2"));
}

#[tokio::test]
async fn no_route_that_can_continue_ends_with_the_error_event() {
    let h = start_with(|sim| pair_config(sim, "openai", "openai", "off")).await;
    h.faults("first", Faults { reset_after: Some(3), ..Default::default() });
    let (_, text) = stream_text(&h, &json!({"model": "m", "stream": true, "messages": user("Hello")})).await;
    let data = sse_data(&text);
    assert_ne!(data.last().unwrap(), "[DONE]", "never a silent truncated 200: {text}");
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "provider_unavailable");
    assert!(h.upstream_requests("/p/second/").is_empty());
}

#[tokio::test]
async fn what_cannot_be_continued_faithfully_ends_with_the_error_event() {
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    let cases = [
        // A tool call half sent: never continued as prose.
        (json!({"model": "m", "stream": true, "messages": user("find"), "tools": tools}), 1),
        (json!({"model": "m", "stream": true, "messages": user("Hello"), "n": 2}), 3),
        (json!({"model": "m", "stream": true, "messages": user("Hello"), "logprobs": true}), 3),
    ];
    for (body, after) in cases {
        let h = start_with(|sim| pair_config(sim, "openai", "openai", "prefill")).await;
        h.faults("first", Faults { reset_after: Some(after), ..Default::default() });
        let (_, text) = stream_text(&h, &body).await;
        let data = sse_data(&text);
        assert_ne!(data.last().unwrap(), "[DONE]", "{body}: {text}");
        let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
        assert_eq!(err["error"]["code"], "provider_unavailable", "{body}");
        assert!(!text.contains("switchyard failover"), "{body}");
        assert!(h.upstream_requests("/p/second/").is_empty(), "nothing was handed over: {body}");
    }
}

#[tokio::test]
async fn hedging_picks_the_faster_and_cancels_the_other() {
    let h = start_with(|sim| config_toml(sim, "[routing]\nhedge = \"100ms\"\n")).await;
    h.faults("oa-1", Faults { latency_ms: Some(2000), ..Default::default() });
    let started = Instant::now();
    let (headers, text) = stream_text(&h, &streamed("gpt-4o-mini")).await;
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    assert_eq!(headers["x-switchyard-provider"], "oa-2");
    assert_eq!(headers["x-switchyard-attempts"], "2");
    assert!(sse_chunks(&text).1);
    // Sync requests hedge the same way.
    h.faults("oa-2", Faults { latency_ms: Some(2000), ..Default::default() });
    h.faults("oa-1", Faults::default());
    let started = Instant::now();
    let (status, _, _) = h.chat(&chat()).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_dead_providers_circuit_opens_and_a_probe_closes_it() {
    let h = start_with(|sim| config_toml(sim, "[routing]\nbreaker_threshold = 3\nbreaker_cooldown = \"300ms\"\n")).await;
    h.faults("an-1", Faults { hangup: Some(true), ..Default::default() });
    let claude = json!({"model": "claude-sonnet-4", "messages": user("Hello")});
    for _ in 0..3 {
        let (status, _, _) = h.chat(&claude).await;
        assert_eq!(status, 502);
    }
    let before = h.upstream_requests("/p/an-1/").len();
    let (status, _, body) = h.chat(&claude).await;
    assert_eq!(status, 502);
    assert!(body["error"]["message"].as_str().unwrap().contains("circuit"), "{body}");
    assert_eq!(h.upstream_requests("/p/an-1/").len(), before, "an open circuit sends nothing");
    h.faults("an-1", Faults::default());
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (status, _, _) = h.chat(&claude).await;
    assert_eq!(status, 200, "the probe succeeds and closes the circuit");
    for _ in 0..3 {
        assert_eq!(h.chat(&claude).await.0, 200);
    }
}

#[tokio::test]
async fn retry_after_takes_a_provider_out_for_that_long() {
    let h = start().await;
    h.faults("oa-1", Faults { status: Some(429), retry_after: Some(1), ..Default::default() });
    assert_eq!(served_by(&h, &chat()).await, "oa-2");
    h.faults("oa-1", Faults::default());
    h.faults("oa-2", Faults { latency_ms: Some(50), ..Default::default() });
    for _ in 0..3 {
        assert_eq!(served_by(&h, &chat()).await, "oa-2", "oa-1 is out for its Retry-After");
    }
    assert_eq!(h.upstream_requests("/p/oa-1/").len(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(served_by(&h, &chat()).await, "oa-1", "and back after it");
}

#[tokio::test]
async fn the_deadline_holds_across_attempts() {
    let h = start().await;
    h.faults("oa-1", Faults { latency_ms: Some(700), ..Default::default() });
    h.faults("oa-2", Faults { latency_ms: Some(700), ..Default::default() });
    for stream in [false, true] {
        let mut body = chat();
        body["stream"] = json!(stream);
        let started = Instant::now();
        let resp = h.post_chat(&body).header("x-switchyard-timeout-ms", "500").send().await.unwrap();
        assert_eq!(resp.status(), 504);
        assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
    }
}

#[tokio::test]
async fn chaos_every_request_succeeds_while_one_provider_is_healthy() {
    let h = start_with(|sim| config_toml(sim, "")).await;
    // oa-1 fails half its requests at random (seeded), before or during
    // the answer; oa-2 is healthy.
    h.faults("oa-1", Faults { fail_rate: Some(0.5), ..Default::default() });
    let url = h.url("/v1/chat/completions");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..240 {
        let client = h.http.clone();
        let url = url.clone();
        tasks.spawn(async move {
            let stream = i % 2 == 0;
            let body = json!({"model": "gpt-4o-mini", "stream": stream, "messages": user(&format!("question {i}"))});
            let resp = client.post(&url).bearer_auth(KEY).json(&body).send().await.unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            (i, status, stream, text)
        });
        if tasks.len() >= 12 {
            let (i, status, stream, text) = tasks.join_next().await.unwrap().unwrap();
            check(i, status, stream, &text);
        }
    }
    while let Some(r) = tasks.join_next().await {
        let (i, status, stream, text) = r.unwrap();
        check(i, status, stream, &text);
    }
    assert!(!h.upstream_requests("/p/oa-1/").is_empty(), "the flaky provider took part");

    fn check(i: usize, status: reqwest::StatusCode, stream: bool, text: &str) {
        assert_eq!(status, 200, "request {i}: {text}");
        let expected = expected_answer(&format!("question {i}"), 16);
        if stream {
            let (chunks, done) = sse_chunks(text);
            assert!(done, "request {i}: {text}");
            assert_eq!(streamed_text(&chunks), expected);
        } else {
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], expected);
        }
    }
}

#[tokio::test]
async fn the_retry_budget_keeps_an_outage_from_doubling_upstream_load() {
    let h = start().await;
    h.faults("oa-1", Faults { status: Some(500), ..Default::default() });
    h.faults("oa-2", Faults { status: Some(500), ..Default::default() });
    let n = 100;
    for _ in 0..n {
        let (status, _, _) = h.chat(&chat()).await;
        assert_eq!(status, 502);
    }
    let upstream = h.sim.state.stats().requests as usize;
    // Without a budget every request would cost two attempts (200). The
    // budget allows 20% more than the requests, plus 1 a second.
    assert!(upstream <= n + n / 5 + 12, "{upstream} upstream attempts for {n} requests");
}

/// `protocol = "http2"` on oa-1 (h2c to the simulator), `"http1"` on oa-2;
/// `h2-only` is served by oa-1 alone.
fn http2_config(sim: &str) -> String {
    let h2_only = "[[models]]\nid = \"h2-only\"\n  [[models.routes]]\n  provider = \"oa-1\"\n  upstream_model = \"gpt-4o-mini\"\n";
    config_toml(sim, h2_only)
        .replacen("id = \"oa-1\"\nkind = \"openai\"\n", "id = \"oa-1\"\nkind = \"openai\"\nprotocol = \"http2\"\n", 1)
        .replacen("id = \"oa-2\"\nkind = \"openai\"\n", "id = \"oa-2\"\nkind = \"openai\"\nprotocol = \"http1\"\n", 1)
}

#[tokio::test]
async fn an_http2_provider_carries_concurrent_streams_and_its_resets_fail_over() {
    let h = start_with(http2_config).await;
    // A stream the HTTP/2 provider resets mid-answer (RST_STREAM, the
    // connection lives on) continues on the HTTP/1.1 one, whole.
    h.faults("oa-1", Faults { reset_after: Some(5), ..Default::default() });
    let (headers, text) = stream_text(&h, &streamed("gpt-4o-mini")).await;
    assert_eq!(headers["x-switchyard-provider"], "oa-1");
    let (chunks, done) = sse_chunks(&text);
    assert!(done, "{text}");
    assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16));
    assert!(text.contains(": switchyard failover provider=oa-2 attempt=2\n\n"), "{text}");
    h.faults("oa-1", Faults::default());

    // Concurrent streams and a sync answer, each whole, all over oa-1's
    // one connection. (On the shared model the scorer may rightly send
    // them all to oa-2 after oa-1's reset.)
    let body = streamed("h2-only");
    let answers = futures_util::future::join_all((0..24).map(|_| stream_text(&h, &body))).await;
    for (_, text) in &answers {
        let (chunks, done) = sse_chunks(text);
        assert!(done, "{text}");
        assert_eq!(streamed_text(&chunks), expected_answer("Hello", 16));
    }
    let mut sync = chat();
    sync["model"] = json!("h2-only");
    let (status, _, body) = h.chat(&sync).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], expected_answer("Hello", 16));

    // Every request oa-1 got came over HTTP/2, and none of oa-2's did.
    let to_oa1 = h.upstream_requests("/p/oa-1/").len() as u64;
    let to_oa2 = h.upstream_requests("/p/oa-2/").len();
    assert!(to_oa1 >= 26 && to_oa2 >= 1, "oa-1 {to_oa1}, oa-2 {to_oa2}");
    assert_eq!(h.sim.state.stats().http2_requests, to_oa1);
}
