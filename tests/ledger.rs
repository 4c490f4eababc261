//! The accounting ledger: one row per request with the right cost (streams
//! too, cached tokens at the cached price, a failed-over request charged
//! once), each attempt recorded beside it, budgets enforced from the same
//! figures, and rows that survive a crash exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::{json, Value};
use switchyard::{
    accounting::{Entry, Ledger, LedgerRow},
    config::Config,
    simulator::{self, Faults, SimState},
    storage::Storage,
};
use tokio::net::TcpListener;

const KEY: &str = "ze_ledger_key_000000000";

/// `gpt-4o-mini` on oa-1 (in $1/M, cached in $0.25/M, out $2/M) then
/// oa-2 (in $3/M, out $4/M).
fn priced_config(sim: &str, storage_url: &str, journal: &str, key_extra: &str) -> String {
    format!(
        r#"
[server]
request_timeout = "10s"
shutdown_grace = "2s"
[storage]
url = "{storage_url}"
ledger_journal = "{journal}"
[[providers]]
id = "oa-1"
kind = "openai"
base_url = "{sim}/p/oa-1/v1"
[[providers]]
id = "oa-2"
kind = "openai"
base_url = "{sim}/p/oa-2/v1"
[[models]]
id = "gpt-4o-mini"
  [[models.routes]]
  provider = "oa-1"
  upstream_model = "up-1"
  price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0, cached_input_per_mtok = 0.25 }}
  [[models.routes]]
  provider = "oa-2"
  upstream_model = "up-2"
  price = {{ input_per_mtok = 3.0, output_per_mtok = 4.0 }}
[[keys]]
name = "ledger"
key = "{KEY}"
{key_extra}
"#
    )
}

async fn harness(storage_url: &str, key_extra: &str) -> Harness {
    let (url, extra) = (storage_url.to_owned(), key_extra.to_owned());
    start_with(move |sim| priced_config(sim, &url, &temp_journal(), &extra)).await
}

async fn rows(storage_url: &str, n: usize) -> Vec<LedgerRow> {
    let storage = Storage::connect(storage_url).await.unwrap();
    for _ in 0..100 {
        let rows = storage.ledger_rows("ledger").await.unwrap();
        if rows.len() >= n {
            storage.close().await;
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the ledger did not reach {n} rows: {:?}", storage.ledger_rows("ledger").await.unwrap());
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// What a row should cost at the price of the route that served it.
fn priced(row: &LedgerRow) -> f64 {
    let (input, cached_price, output) = match row.provider.as_deref() {
        Some("oa-1") => (1.0, 0.25, 2.0),
        Some("oa-2") => (3.0, 3.0, 4.0),
        _ => return 0.0,
    };
    ((row.input_tokens - row.cached_tokens) as f64 * input + row.cached_tokens as f64 * cached_price + row.output_tokens as f64 * output) / 1e6
}

async fn rows_match_requests(storage_url: &str) {
    let h = harness(storage_url, "").await;
    let post = |body: Value| h.http.post(h.url("/v1/chat/completions")).bearer_auth(KEY).json(&body).send();
    let id_of = |v: &Value| v["id"].as_str().unwrap().to_owned();
    // 0. Failed over before the first byte (oa-1, listed first, is tried
    // first): charged once, at oa-2's price.
    h.faults("oa-1", Faults { status: Some(500), ..Default::default() });
    let resp = post(json!({"model": "gpt-4o-mini", "messages": user("Hello")})).await.unwrap();
    assert_eq!(resp.headers()["x-switchyard-provider"], "oa-2");
    let failed_over_id = id_of(&resp.json().await.unwrap());
    h.faults("oa-1", Faults::default());
    // 1. Sync.
    let sync_id = id_of(&post(json!({"model": "gpt-4o-mini", "messages": user("Hello")})).await.unwrap().json().await.unwrap());
    // 2. Streamed, the client not asking for usage: still priced.
    let t = post(json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).await.unwrap().text().await.unwrap();
    assert!(t.ends_with("data: [DONE]\n\n"));
    let stream_id = id_of(&sse_chunks(&t).0[0]);
    // 3. Cached input (both routes report one cached token).
    h.faults("oa-1", Faults { cached_tokens: Some(1), ..Default::default() });
    h.faults("oa-2", Faults { cached_tokens: Some(1), ..Default::default() });
    let cached_id = id_of(&post(json!({"model": "gpt-4o-mini", "messages": user("Hello there friend")})).await.unwrap().json().await.unwrap());
    // 4. Every provider down: a row with the error, costing nothing.
    h.faults("oa-1", Faults { status: Some(500), ..Default::default() });
    h.faults("oa-2", Faults { status: Some(500), ..Default::default() });
    assert_eq!(post(json!({"model": "gpt-4o-mini", "messages": user("Hello")})).await.unwrap().status(), 502);

    let rows = rows(storage_url, 5).await;
    assert_eq!(rows.len(), 5, "one row per request: {rows:#?}");
    let row = |id: &str| rows.iter().find(|r| r.request_id == id).unwrap_or_else(|| panic!("a row keyed by the response id {id}"));
    let sync = row(&sync_id);
    assert_eq!((sync.outcome.as_str(), sync.input_tokens, sync.output_tokens), ("success", 1, 16));
    assert!(sync.upstream_model.as_deref().is_some_and(|m| m.starts_with("up-")));
    assert!(close(sync.cost_usd, priced(sync)), "{sync:?}");
    let stream = row(&stream_id);
    assert_eq!((stream.input_tokens, stream.output_tokens), (1, 16), "streamed usage is exact");
    assert!(stream.cost_usd > 0.0 && close(stream.cost_usd, priced(stream)), "a stream is never free: {stream:?}");
    assert!(stream.ttft_ms.is_some());
    let cached = row(&cached_id);
    assert_eq!((cached.input_tokens, cached.cached_tokens), (3, 1));
    assert!(close(cached.cost_usd, priced(cached)), "cached input at the cached price, not on top: {cached:?}");
    let failed = rows.iter().find(|r| r.outcome == "error").unwrap();
    assert_eq!((failed.error_code.as_deref(), failed.attempts, failed.cost_usd), (Some("provider_unavailable"), 2, 0.0));
    let over = row(&failed_over_id);
    assert_eq!((over.provider.as_deref(), over.attempts), (Some("oa-2"), 2));
    assert!(close(over.cost_usd, (1.0 * 3.0 + 16.0 * 4.0) / 1e6), "charged once, for the attempt that served: {over:?}");
    let storage = Storage::connect(storage_url).await.unwrap();
    let attempts = storage.attempt_rows(&failed_over_id).await.unwrap();
    assert_eq!(attempts.iter().map(|a| (a.provider.as_str(), a.outcome.as_str())).collect::<Vec<_>>(), vec![("oa-1", "failure"), ("oa-2", "success")]);
    storage.close().await;
}

#[tokio::test]
async fn ledger_rows_match_requests_on_sqlite() {
    rows_match_requests(&temp_db_url()).await;
}

#[tokio::test]
async fn ledger_rows_match_requests_on_postgres() {
    let schema = PgSchema::new().await;
    rows_match_requests(&schema.url).await;
    schema.drop_now().await;
}

#[tokio::test]
async fn a_stream_continued_elsewhere_pays_input_once_and_each_output_at_its_price() {
    let url = temp_db_url();
    let h = harness(&url, "").await;
    h.faults("oa-1", Faults { reset_after: Some(6), ..Default::default() });
    let resp = h.http.post(h.url("/v1/chat/completions")).bearer_auth(KEY).json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).send().await.unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("switchyard failover") && text.ends_with("data: [DONE]\n\n"));
    let row = rows(&url, 1).await.remove(0);
    // oa-1, listed first and untried, serves first.
    let first: String = expected_answer("Hello", 16).split(' ').take(6).collect::<Vec<_>>().join(" ");
    let out1 = u64::from(switchyard::routing::stream::estimate_tokens(&first));
    let input = u64::from(switchyard::routing::stream::estimate_tokens("Hello"));
    assert_eq!(row.output_tokens, out1 + 10);
    let expected = (input as f64 * 1.0 + out1 as f64 * 2.0 + 10.0 * 4.0) / 1e6;
    assert!(close(row.cost_usd, expected), "{} vs {expected}", row.cost_usd);
    assert_eq!(row.attempts, 2);
}

#[tokio::test]
async fn an_abandoned_stream_is_charged_for_what_was_produced() {
    let url = temp_db_url();
    let h = harness(&url, "").await;
    h.faults("oa-1", Faults { tokens: Some(400), chunk_delay_ms: Some(10), ..Default::default() });
    let mut resp = h.http.post(h.url("/v1/chat/completions")).bearer_auth(KEY).json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": user("Hello")})).send().await.unwrap();
    for _ in 0..5 {
        resp.chunk().await.unwrap();
    }
    drop(resp);
    let row = rows(&url, 1).await.remove(0);
    assert_eq!(row.outcome, "abandoned");
    assert!(row.output_tokens > 0 && row.output_tokens < 400, "{row:?}");
    assert!(row.cost_usd > 0.0);
}

#[tokio::test]
async fn a_spent_budget_is_402() {
    let url = temp_db_url();
    // One answer costs $0.000033: the budget allows one.
    let h = harness(&url, "budget_usd = 0.00004").await;
    let post = || h.http.post(h.url("/v1/chat/completions")).bearer_auth(KEY).json(&json!({"model": "gpt-4o-mini", "messages": user("Hello")})).send();
    assert_eq!(post().await.unwrap().status(), 200);
    let mut refused = None;
    for _ in 0..40 {
        let resp = post().await.unwrap();
        if resp.status() == 402 {
            refused = Some(resp.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = refused.expect("the spent budget is enforced");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    let rows = rows(&url, 2).await;
    assert!(rows.len() <= 3, "at most a request or two over, never unbounded: {}", rows.len());
}

/// A priced row for key `ledger`.
fn entry(i: u32) -> Entry {
    Entry {
        row: LedgerRow {
            request_id: format!("req-{i}"),
            client_request_id: None,
            key_name: "ledger".into(),
            model: "m".into(),
            provider: Some("p".into()),
            upstream_model: Some("u".into()),
            input_tokens: 1,
            output_tokens: 2,
            cached_tokens: 0,
            cost_usd: 0.5,
            latency_ms: 3,
            ttft_ms: Some(1),
            attempts: 1,
            outcome: "success".into(),
            error_code: None,
            created_at: 1,
            unit: None,
            units: 0.0,
        },
        attempts: vec![],
    }
}

#[tokio::test]
async fn journaled_rows_reach_the_database_exactly_once_after_a_crash() {
    let url = temp_db_url();
    let journal = std::path::PathBuf::from(temp_journal());
    let storage = Storage::connect(&url).await.unwrap();
    // A "crash": lines journaled, the process gone before the writer ran.
    {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (s, j) = (storage.clone(), journal.clone());
        std::thread::spawn(move || {
            rt.block_on(async {
                let ledger = Ledger::open(&j, s, None).unwrap();
                for i in 0..5 {
                    ledger.record(entry(i)).await.unwrap();
                }
            });
            // Dropping the runtime kills the writer mid-flight.
        })
        .join()
        .unwrap();
    }
    // The next start replays the journal; a second replay changes nothing.
    for _ in 0..2 {
        let ledger = Ledger::open(&journal, storage.clone(), None).unwrap();
        ledger.record(entry(4)).await.unwrap();
        ledger.flush().await;
        drop(ledger);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = storage.ledger_rows("ledger").await.unwrap();
    assert_eq!(rows.len(), 5, "each request id exactly once");
    assert_eq!(storage.spent("ledger").await.unwrap(), 2.5);
}

#[tokio::test]
async fn under_steady_load_the_journal_is_replaced_and_no_row_is_lost() {
    let url = temp_db_url();
    let journal = std::path::PathBuf::from(temp_journal());
    let storage = Storage::connect(&url).await.unwrap();
    let ledger = Ledger::open(&journal, storage.clone(), None).unwrap();
    // Rows keep coming while the writer inserts, so something is always
    // pending when it finishes: the journal must still be replaced.
    let (mut n, mut last, mut shrank) = (0u32, 0u64, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while shrank < 2 && std::time::Instant::now() < deadline {
        ledger.record(entry(n)).await.unwrap();
        n += 1;
        if n % 50 == 0 {
            let len = std::fs::metadata(&journal).unwrap().len();
            shrank += usize::from(len < last);
            last = len;
            tokio::task::yield_now().await;
        }
    }
    assert!(shrank >= 2, "the journal grew with the traffic: {n} rows, {last} bytes");
    // A crash now: the next start replays what the journal holds.
    drop(ledger);
    let ledger = Ledger::open(&journal, storage.clone(), None).unwrap();
    ledger.flush().await;
    let rows = storage.ledger_rows("ledger").await.unwrap();
    assert_eq!(rows.len(), n as usize, "every row exactly once");
}

#[tokio::test]
async fn usage_command_summarises_per_key_and_model() {
    let url = temp_db_url();
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    let text = priced_config(&sim.url(), &url, &temp_journal(), "");
    let mut h = start_gateway(sim, Config::parse(&text, "t").unwrap()).await;
    for _ in 0..3 {
        let _ = h.http.post(h.url("/v1/chat/completions")).bearer_auth(KEY).json(&json!({"model": "gpt-4o-mini", "messages": user("Hello")})).send().await.unwrap().text().await;
    }
    let total: f64 = rows(&url, 3).await.iter().map(|r| r.cost_usd).sum();
    h.shutdown();
    let dir = std::env::temp_dir().join(unique("usage"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("switchyard.toml");
    std::fs::write(&cfg, priced_config("http://127.0.0.1:9", &url, &temp_journal(), "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["usage", "--format", "json", "--since", "1h", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["key"], "ledger");
    assert_eq!(v[0]["model"], "gpt-4o-mini");
    assert_eq!(v[0]["requests"], 3);
    assert_eq!(v[0]["output_tokens"], 48);
    assert!((v[0]["cost_usd"].as_f64().unwrap() - total).abs() < 1e-12);
}

#[tokio::test]
async fn a_shutdown_under_load_loses_no_rows() {
    let url = temp_db_url();
    let mut h = harness(&url, "").await;
    h.faults("oa-1", Faults { chunk_delay_ms: Some(5), ..Default::default() });
    h.faults("oa-2", Faults { chunk_delay_ms: Some(5), ..Default::default() });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let (client, u) = (h.http.clone(), h.url("/v1/chat/completions"));
        tasks.spawn(async move {
            let body = json!({"model": "gpt-4o-mini", "stream": i % 2 == 0, "messages": user("Hello")});
            match client.post(u).bearer_auth(KEY).json(&body).send().await {
                Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|t| t.contains("chat.completion")),
                _ => false,
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    h.shutdown();
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        if r.unwrap() {
            served += 1;
        }
    }
    tokio::time::timeout(Duration::from_secs(10), h.task.take().unwrap()).await.unwrap().unwrap().unwrap();
    assert!(served > 0);
    let storage = Storage::connect(&url).await.unwrap();
    let rows = storage.ledger_rows("ledger").await.unwrap();
    assert_eq!(rows.iter().filter(|r| r.outcome == "success").count(), served, "every answered request has its row once the server has stopped");
}

#[tokio::test]
async fn rows_in_the_shared_stream_outlive_the_replica_that_wrote_them() {
    use switchyard::accounting::redis_stream::{stream_key, RedisLedger};
    let schema = PgSchema::new().await;
    let storage = Storage::connect(&schema.url).await.unwrap();
    let key = stream_key(&schema.url);
    // A replica appended three rows and was killed before draining any.
    let dead = RedisLedger::new("redis://127.0.0.1:6379", key.clone()).unwrap();
    for i in 0..3 {
        let mut row = LedgerRow {
            request_id: format!("stream-req-{i}"),
            client_request_id: None,
            key_name: "ledger".into(),
            model: "m".into(),
            provider: None,
            upstream_model: None,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            cost_usd: 0.25,
            latency_ms: 0,
            ttft_ms: None,
            attempts: 1,
            outcome: "success".into(),
            error_code: None,
            created_at: 1,
            unit: None,
            units: 0.0,
        };
        row.output_tokens = i;
        dead.append(&Entry { row, attempts: vec![] }).await.unwrap();
    }
    drop(dead);
    // Another replica of the same database drains them.
    let _survivor = Ledger::open(std::path::Path::new(&temp_journal()), storage.clone(), Some(("redis://127.0.0.1:6379", key))).unwrap();
    let mut rows = vec![];
    for _ in 0..100 {
        rows = storage.ledger_rows("ledger").await.unwrap();
        if rows.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(storage.spent("ledger").await.unwrap(), 0.75);
    storage.close().await;
    schema.drop_now().await;
}
