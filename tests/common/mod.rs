//! Test harness: the real gateway on port 0 with the provider simulator
//! behind it, both over real HTTP on loopback.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod otlp;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde_json::Value;
use switchyard::{
    config::Config,
    simulator::{self, Faults, SimHandle, SimState},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub const KEY: &str = "ze_test_key_all_models";
pub const CLAUDE_ONLY_KEY: &str = "ze_test_key_claude_only";
pub const SEED: u64 = 7;

pub struct Harness {
    pub addr: SocketAddr,
    pub sim: SimHandle,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    /// Configs sent here are applied as a SIGHUP would apply them.
    pub reload: tokio::sync::mpsc::Sender<Config>,
    /// The store the gateway was started on.
    pub storage_url: String,
    pub task: Option<JoinHandle<Result<(), switchyard::ServeError>>>,
}

/// Providers `oa-1`, `oa-2` (openai) and `an-1` (anthropic), each at its own
/// named simulator prefix so tests can set their faults apart. Models:
/// `gpt-4o-mini` → oa-1 then oa-2; `claude-sonnet-4` → an-1; `mixed` →
/// an-1 then oa-1.
pub fn config_toml(sim: &str, extra: &str) -> String {
    let db = temp_db_url();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "10s"
max_body_bytes = 65536
shutdown_grace = "5s"

[storage]
url = "{db}"

[[providers]]
id = "oa-1"
kind = "openai"
base_url = "{sim}/p/oa-1/v1"
api_key = "sk-test-oa-1-secret"
timeout = "3s"
idle_timeout = "1s"

[[providers]]
id = "oa-2"
kind = "openai"
base_url = "{sim}/p/oa-2/v1"
api_key = "sk-test-oa-2-secret"
timeout = "3s"
idle_timeout = "1s"

[[providers]]
id = "an-1"
kind = "anthropic"
base_url = "{sim}/p/an-1"
api_key = "sk-ant-test-secret"
timeout = "3s"
idle_timeout = "1s"

[[models]]
id = "gpt-4o-mini"
  [[models.routes]]
  provider = "oa-1"
  upstream_model = "gpt-4o-mini-2024-07-18"
  [[models.routes]]
  provider = "oa-2"
  upstream_model = "gpt-4o-mini"

[[models]]
id = "claude-sonnet-4"
max_output_tokens = 777
  [[models.routes]]
  provider = "an-1"
  upstream_model = "claude-sonnet-4-20250514"

[[models]]
id = "mixed"
  [[models.routes]]
  provider = "an-1"
  upstream_model = "claude-sonnet-4-20250514"
  [[models.routes]]
  provider = "oa-1"
  upstream_model = "gpt-4o-mini"

[[keys]]
name = "all"
key = "{KEY}"

[[keys]]
name = "claude-only"
key = "{CLAUDE_ONLY_KEY}"
models = ["claude-*"]
{extra}
"#
    )
}

/// A fresh SQLite database in the temp dir, so tests never share one.
pub fn temp_db_url() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("switchyard-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/db-{n}.db", dir.display())
}

/// A fresh ledger journal path in the temp dir (one per gateway).
pub fn temp_journal() -> String {
    temp_db_url().trim_start_matches("sqlite://").replace(".db", ".jsonl")
}

pub async fn start() -> Harness {
    start_with(|sim| config_toml(sim, "")).await
}

pub async fn start_with(make_config: impl FnOnce(&str) -> String) -> Harness {
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    let config = Config::parse(&make_config(&sim.url()), "test config").unwrap();
    start_gateway(sim, config).await
}

pub async fn start_gateway(sim: SimHandle, config: Config) -> Harness {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    let storage_url = config.storage.url.clone();
    let task = tokio::spawn(switchyard::serve_reloading(
        listener,
        config,
        async move {
            let _ = rx.await;
        },
        reloads,
    ));
    Harness {
        addr,
        sim,
        http: reqwest::Client::new(),
        shutdown: Some(tx),
        reload,
        storage_url,
        task: Some(task),
    }
}

impl Harness {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn faults(&self, provider: &str, f: Faults) {
        self.sim.state.set_faults(provider, f);
    }

    pub fn post_chat(&self, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(body)
    }

    pub async fn chat(&self, body: &Value) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
        let resp = self.post_chat(body).send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, headers, json)
    }

    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Requests the simulator received on a path containing `needle`.
    pub fn upstream_requests(&self, needle: &str) -> Vec<simulator::Recorded> {
        self.sim.state.recorded().into_iter().filter(|r| r.path.contains(needle)).collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The events of a complete SSE body: `data:` payloads in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The chunks of a streamed answer, and whether it ended with `[DONE]`.
pub fn sse_chunks(body: &str) -> (Vec<Value>, bool) {
    let data = sse_data(body);
    let done = data.last().is_some_and(|d| d == "[DONE]");
    let chunks = data.iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    (chunks, done)
}

/// The text a stream's chunks carry for choice 0.
pub fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

/// The simulator's answer for a prompt: what a client should receive.
pub fn expected_answer(prompt: &str, words: u32) -> String {
    simulator::answer_words(SEED, prompt, words).join(" ")
}

pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn user(text: &str) -> Value {
    serde_json::json!([{"role": "user", "content": text}])
}

/// The machine's PostgreSQL (trust auth, database `test`).
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh schema in the machine's PostgreSQL, so tests never collide;
/// `url` points a gateway at it. Dropped by [`PgSchema::drop_now`].
pub struct PgSchema {
    pub name: String,
    pub url: String,
}

impl PgSchema {
    pub async fn new() -> PgSchema {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("sy_test_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst), rand::random::<u32>());
        let pool = sqlx::PgPool::connect(PG_URL).await.expect("the machine's PostgreSQL on 127.0.0.1:5432");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&pool).await.unwrap();
        pool.close().await;
        let url = format!("{PG_URL}?options[search_path]={name}");
        PgSchema { name, url }
    }

    pub async fn drop_now(self) {
        if let Ok(pool) = sqlx::PgPool::connect(PG_URL).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {} CASCADE", self.name))).execute(&pool).await;
            pool.close().await;
        }
    }
}

/// A unique key name, so tests sharing Redis never share a limit.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand::random::<u32>())
}

/// One provider (`oa-1`) serving `gpt-4o-mini`, storage and limits as
/// given, and `keys` (TOML `[[keys]]` tables) appended.
pub fn single_provider_config(sim: &str, storage_url: &str, limits_backend: &str, keys: &str) -> String {
    let journal = temp_journal();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "10s"
shutdown_grace = "2s"
[storage]
url = "{storage_url}"
ledger_journal = "{journal}"
[limits]
backend = "{limits_backend}"
[[providers]]
id = "oa-1"
kind = "openai"
base_url = "{sim}/p/oa-1/v1"
api_key = "sk-test-oa-1-secret"
[[models]]
id = "gpt-4o-mini"
  [[models.routes]]
  provider = "oa-1"
  upstream_model = "gpt-4o-mini"
[[models]]
id = "claude-sonnet-4"
  [[models.routes]]
  provider = "oa-1"
  upstream_model = "claude-via-openai"
{keys}
"#
    )
}
