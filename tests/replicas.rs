//! Real gateway processes: two sharing Redis and PostgreSQL enforce one
//! rate limit and one budget together; three survive losing one to
//! SIGKILL mid-traffic; one reloads its config on SIGHUP; JSON logs carry
//! request and trace ids.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::*;
use serde_json::{json, Value};
use switchyard::simulator::{self, Faults, SimState};
use tokio::net::TcpListener;

struct Replica {
    child: Child,
    addr: String,
    /// Its config file (rewritten by reload tests).
    config: std::path::PathBuf,
    /// Its log lines so far.
    logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Replica {
    fn signal(&self, name: &str) {
        let ok = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{name}");
    }

    fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `switchyard serve` on port 0 and reads the address it bound.
fn replica(config_text: &str) -> Replica {
    let dir = std::env::temp_dir().join(unique("replica"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, config_text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&path)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("the replica logs its address").unwrap();
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["fields"]["message"] == "switchyard listening" || v["message"] == "switchyard listening" {
                break v["fields"]["addr"].as_str().or(v["addr"].as_str()).unwrap().to_owned();
            }
        }
    };
    // Keep draining its logs so it never blocks on a full pipe.
    // (SWITCHYARD_TEST_LOGS=1 shows them.)
    let show = std::env::var_os("SWITCHYARD_TEST_LOGS").is_some();
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = logs.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if show {
                eprintln!("[replica] {line}");
            }
            kept.lock().unwrap().push(line);
        }
    });
    Replica { child, addr, config: path, logs }
}

/// Sends one chat request to `addr` with `key`; its status.
async fn chat_status(http: &reqwest::Client, addr: &str, key: &str) -> u16 {
    http.post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-4o-mini", "messages": user("Hello")}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Of `n` requests sent to `addrs` in turn, how many were admitted.
async fn admitted_in_turn(http: &reqwest::Client, addrs: [&str; 2], key: &str, n: usize) -> usize {
    let mut admitted = 0;
    for i in 0..n {
        if chat_status(http, addrs[i % 2], key).await == 200 {
            admitted += 1;
        }
    }
    admitted
}

/// Spends a budgeted key through `addrs` in turn until both refuse it
/// (402); how many answers were served. Paced so the ledger keeps up.
async fn served_until_both_refuse(http: &reqwest::Client, addrs: [&str; 2], key: &str) -> usize {
    let mut served = 0;
    let mut refused_by = std::collections::HashSet::new();
    for i in 0..40 {
        match chat_status(http, addrs[i % 2], key).await {
            200 => served += 1,
            402 => {
                refused_by.insert(i % 2);
            }
            s => panic!("unexpected {s}"),
        }
        if refused_by.len() == 2 {
            return served;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("both replicas should refuse the spent budget ({served} served)");
}

#[tokio::test]
async fn two_processes_enforce_one_limit_and_one_budget() {
    let schema = PgSchema::new().await;
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    let limited = format!("ze_{}", unique("rpl").replace('-', "_"));
    let budgeted = format!("ze_{}", unique("bud").replace('-', "_"));
    // One answer costs 1 + 16·2 = 33 µ$: the budget allows three.
    let keys = format!(
        "[[keys]]\nname = \"{}\"\nkey = \"{limited}\"\nrequests_per_minute = 5\n[[keys]]\nname = \"{}\"\nkey = \"{budgeted}\"\nbudget_usd = 0.0001\n",
        unique("limited"),
        unique("budgeted")
    );
    let config = |_: ()| {
        single_provider_config(&sim.url(), &schema.url, "redis://127.0.0.1:6379", &keys)
            .replace("upstream_model = \"gpt-4o-mini\"", "upstream_model = \"gpt-4o-mini\"\n  price = { input_per_mtok = 1.0, output_per_mtok = 2.0 }")
    };
    let a = replica(&config(()));
    let b = replica(&config(()));
    let http = reqwest::Client::new();
    assert_eq!(admitted_in_turn(&http, [&a.addr, &b.addr], &limited, 10).await, 5, "one limit across two processes");
    let served = served_until_both_refuse(&http, [&a.addr, &b.addr], &budgeted).await;
    assert!((4..=5).contains(&served), "one budget across two processes: {served} answers where four fit (the fourth starts under the budget)");

    // A key minted and revoked through the CLI: refused by both within seconds.
    let dir = std::env::temp_dir().join(unique("replica-cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("switchyard.toml");
    std::fs::write(&cfg, config(())).unwrap();
    let cli = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).arg("--config").arg(&cfg).output().unwrap();
    let name = unique("minted");
    let out = cli(&["keys", "create", "--name", &name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let minted = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    for r in [&a, &b] {
        assert_eq!(chat_status(&http, &r.addr, &minted).await, 200);
    }
    assert!(cli(&["keys", "revoke", &name]).status.success());
    let started = std::time::Instant::now();
    loop {
        let (sa, sb) = (chat_status(&http, &a.addr, &minted).await, chat_status(&http, &b.addr, &minted).await);
        if sa == 401 && sb == 401 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "a revoked key is refused by every process within seconds");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a, b));
    schema.drop_now().await;
}

/// One Replicate provider and an image model on `storage`, with a short
/// lease so a dead process's job is retaken quickly.
/// The Replicate provider `rep-1` and the image model `flux` on it.
fn flux(sim: &str) -> String {
    format!(
        r#"[[providers]]
id = "rep-1"
kind = "replicate"
base_url = "{sim}/p/rep-1"
api_key = "r8_test_secret"
[[models]]
id = "flux"
modality = "image"
  [[models.routes]]
  provider = "rep-1"
  upstream_model = "black-forest-labs/flux-1.1-pro"
  price = {{ per_image = 0.04 }}
"#
    )
}

fn generation_config(sim: &str, storage: &str) -> String {
    let journal = temp_journal();
    let flux = flux(sim);
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "40s"
shutdown_grace = "1s"
[storage]
url = "{storage}"
ledger_journal = "{journal}"
[generations]
lease = "1s"
{flux}[[keys]]
name = "gen"
key = "{KEY}"
[[keys]]
name = "other"
key = "{CLAUDE_ONLY_KEY}"
"#
    )
}

async fn generation(http: &reqwest::Client, addr: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let req = match body {
        Some(b) => http.post(format!("http://{addr}{path}")).json(&b),
        None => http.get(format!("http://{addr}{path}")),
    };
    let resp = req.bearer_auth(key).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Polls `addr` until the job is running (a worker holds its lease).
async fn until_running(http: &reqwest::Client, addr: &str, id: &str) {
    for _ in 0..100 {
        let (_, g) = generation(http, addr, &format!("/v1/generations/{id}?wait=0"), KEY, None).await;
        if g["status"] == "running" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("generation {id} never started");
}

#[tokio::test]
async fn generations_outlive_a_killed_process_and_long_polls_cross_processes() {
    let schema = PgSchema::new().await;
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    sim.state.set_faults("rep-1", Faults { predict_ms: Some(2500), ..Faults::default() });
    // Each process its own journal: generation_config makes a new one.
    let config = || generation_config(&sim.url(), &schema.url);
    // No pooled connections: a restarted process may get the dead one's port.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let body = json!({"model": "flux", "input": {"prompt": "a harbour at dusk"}, "wait": 0});

    // A job running on a process killed with SIGKILL...
    let a = replica(&config());
    let (status, g) = generation(&http, &a.addr, "/v1/generations", KEY, Some(body.clone())).await;
    assert_eq!(status, 202, "{g}");
    let first = g["id"].as_str().unwrap().to_owned();
    until_running(&http, &a.addr, &first).await;
    drop(a);
    // ...is taken up by the next process once its lease runs out.
    let b = replica(&config());
    let (status, g) = generation(&http, &b.addr, &format!("/v1/generations/{first}?wait=30"), KEY, None).await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["status"], "completed", "{g}");
    assert_eq!(g["usage"]["images"], 1);

    // A job running on B, long-polled from C: C's poll ends as soon as B
    // finishes it (a NOTIFY), not at C's next re-read five seconds on.
    let (_, g) = generation(&http, &b.addr, "/v1/generations", KEY, Some(body)).await;
    let second = g["id"].as_str().unwrap().to_owned();
    until_running(&http, &b.addr, &second).await;
    let c = replica(&config());
    let started = std::time::Instant::now();
    let (status, g) = generation(&http, &c.addr, &format!("/v1/generations/{second}?wait=30"), KEY, None).await;
    let waited = started.elapsed();
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["status"], "completed");
    assert!(waited < Duration::from_millis(4000), "the poll on another process returned {waited:?} after it began");
    // Only the owner sees it, on every process.
    let (status, e) = generation(&http, &c.addr, &format!("/v1/generations/{second}?wait=0"), CLAUDE_ONLY_KEY, None).await;
    assert_eq!(status, 404, "{e}");

    // Each job is charged once, whoever ran it and however often it started.
    let storage = switchyard::storage::Storage::connect(&schema.url).await.unwrap();
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = storage.ledger_rows("gen").await.unwrap();
        if rows.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![first.as_str(), second.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert!(rows.iter().all(|r| r.outcome == "success" && (r.cost_usd - 0.04).abs() < 1e-9));
    storage.close().await;
    drop((b, c));
    schema.drop_now().await;
}

/// Chat on `oa-1`, images on `rep-1`, limits in Redis, one store; key
/// names unique to this run (Redis outlives it).
fn cluster_config(sim: &str, storage: &str, keys: &str) -> String {
    let flux = flux(sim);
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "20s"
shutdown_grace = "1s"
[storage]
url = "{storage}"
[limits]
backend = "redis://127.0.0.1:6379"
[generations]
lease = "1s"
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
  price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}
{flux}{keys}
"#
    )
}

/// One logical request as a client with a list of replicas makes it: on a
/// refused connection, an error status or a cut-off answer it tries the
/// next replica with the same `X-Request-Id`. Returns the answer's id and
/// the number of tries.
async fn retrying(http: &reqwest::Client, addrs: &[String], first: usize, key: &str, request_id: &str, stream: bool) -> (String, usize) {
    let body = json!({"model": "gpt-4o-mini", "messages": user(request_id), "stream": stream});
    for tries in 1..=8 {
        let addr = &addrs[(first + tries - 1) % addrs.len()];
        let sent = http
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-request-id", request_id)
            .json(&body)
            .send()
            .await;
        let Ok(resp) = sent else { continue };
        if resp.status() != 200 {
            continue;
        }
        let Ok(text) = resp.text().await else { continue };
        let id = if stream {
            match sse_chunks_lenient(&text) {
                Some(id) => id,
                None => continue,
            }
        } else {
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => v["id"].as_str().unwrap().to_owned(),
                Err(_) => continue,
            }
        };
        return (id, tries);
    }
    panic!("{request_id}: no replica answered in 8 tries");
}

/// A complete stream's id; `None` for one cut off (no `[DONE]`).
fn sse_chunks_lenient(body: &str) -> Option<String> {
    let data = sse_data(body);
    if data.last().map(String::as_str) != Some("[DONE]") {
        return None;
    }
    let first: Value = serde_json::from_str(data.first()?).ok()?;
    first["id"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn three_replicas_lose_one_to_sigkill_and_nothing_is_lost() {
    let schema = PgSchema::new().await;
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    // Answers take ~100 ms, so some are always in flight; generations 5 s.
    sim.state.set_faults("oa-1", Faults { latency_ms: Some(20), chunk_delay_ms: Some(5), tokens: Some(16), ..Faults::default() });
    sim.state.set_faults("rep-1", Faults { predict_ms: Some(5000), ..Faults::default() });
    let (load, limited, budgeted) = (unique("load"), unique("limited"), unique("budgeted"));
    let (limited_key, budgeted_key) = (format!("ze_{}", unique("l").replace('-', "_")), format!("ze_{}", unique("b").replace('-', "_")));
    // One answer costs about 16 µ$ in and 32 µ$ out: the budget fits a few.
    let keys = format!(
        "[[keys]]\nname = \"{load}\"\nkey = \"{KEY}\"\n[[keys]]\nname = \"{limited}\"\nkey = \"{limited_key}\"\nrequests_per_minute = 6\n\
         [[keys]]\nname = \"{budgeted}\"\nkey = \"{budgeted_key}\"\nbudget_usd = 0.00015\n"
    );
    let config = cluster_config(&sim.url(), &schema.url, &keys);
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    // Generations started on the replica that will die: it is alone when
    // they are created, so its worker holds them.
    let c = replica(&config);
    let mut jobs = Vec::new();
    for i in 0..2 {
        let body = json!({"model": "flux", "input": {"prompt": format!("harbour {i}")}, "wait": 0});
        let (status, g) = generation(&http, &c.addr, "/v1/generations", KEY, Some(body)).await;
        assert_eq!(status, 202, "{g}");
        jobs.push(g["id"].as_str().unwrap().to_owned());
    }
    for id in &jobs {
        until_running(&http, &c.addr, id).await;
    }
    let a = replica(&config);
    let b = replica(&config);
    let addrs = vec![a.addr.clone(), b.addr.clone(), c.addr.clone()];

    // Load over all three: 8 clients, 15 requests each, sync and streamed;
    // C is killed once 30 have been answered.
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..8 {
        let (http, addrs, done) = (http.clone(), addrs.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for n in 0..15 {
                let request_id = format!("load-{client}-{n}");
                let (id, tries) = retrying(&http, &addrs, client + n, KEY, &request_id, n % 2 == 0).await;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                out.push((request_id, id, tries));
            }
            out
        }));
    }
    while done.load(std::sync::atomic::Ordering::SeqCst) < 30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c = c;
    c.child.kill().unwrap(); // SIGKILL
    c.child.wait().unwrap();
    let killed_at = done.load(std::sync::atomic::Ordering::SeqCst);
    let mut answered = Vec::new();
    for client in clients {
        answered.extend(client.await.unwrap());
    }
    assert_eq!(answered.len(), 120, "every client request succeeded, retried elsewhere when it had to");
    assert!(killed_at < 120, "the kill came mid-traffic ({killed_at} answered before it)");
    assert!(answered.iter().any(|(_, _, tries)| *tries > 1), "some requests had to be retried");

    // Limits and budgets hold across the two left.
    assert_eq!(admitted_in_turn(&http, [&a.addr, &b.addr], &limited_key, 12).await, 6, "one rate limit across the replicas left");
    served_until_both_refuse(&http, [&a.addr, &b.addr], &budgeted_key).await;

    // The generations the dead replica held are completed by the others.
    for id in &jobs {
        let (status, g) = generation(&http, &a.addr, &format!("/v1/generations/{id}?wait=30"), KEY, None).await;
        assert_eq!(status, 200, "{g}");
        assert_eq!(g["status"], "completed", "{g}");
    }

    // The ledger: every answer a client got has exactly one row (rows the
    // dead replica put in the shared stream are drained by the others,
    // after CLAIM_IDLE); no row is doubled; a logical request has no more
    // rows than tries (a try cut off after its row was written is a real,
    // separate request); the budget's spend is what its rows say.
    let storage = switchyard::storage::Storage::connect(&schema.url).await.unwrap();
    let wanted: std::collections::HashSet<&str> = answered.iter().map(|(_, id, _)| id.as_str()).chain(jobs.iter().map(String::as_str)).collect();
    let mut rows = Vec::new();
    for _ in 0..300 {
        rows = storage.ledger_rows(&load).await.unwrap();
        let have: std::collections::HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
        if wanted.is_subset(&have) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *by_id.entry(r.request_id.as_str()).or_default() += 1;
    }
    for id in &wanted {
        assert_eq!(by_id.get(id), Some(&1), "answer {id}: one ledger row");
    }
    assert!(by_id.values().all(|&n| n == 1), "no row doubled");
    for (request_id, _, tries) in &answered {
        let n = rows.iter().filter(|r| r.client_request_id.as_deref() == Some(request_id.as_str())).count();
        assert!((1..=*tries).contains(&n), "{request_id}: {n} rows for {tries} tries");
    }
    for id in &jobs {
        let row = rows.iter().find(|r| &r.request_id == id).unwrap();
        assert_eq!(row.outcome, "success");
        assert!((row.cost_usd - 0.04).abs() < 1e-9);
    }
    let spent: f64 = storage.ledger_rows(&budgeted).await.unwrap().iter().map(|r| r.cost_usd).sum();
    assert!((0.00015..0.00025).contains(&spent), "the budget stopped spending within two answers of it: {spent}");
    storage.close().await;
    drop((a, b));
    schema.drop_now().await;
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_refuses_an_invalid_one() {
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    let keys = format!("[[keys]]\nname = \"k\"\nkey = \"{KEY}\"\n");
    let config = single_provider_config(&sim.url(), &temp_db_url(), "memory", &keys);
    let r = replica(&config);
    let http = reqwest::Client::new();
    let models = || async {
        let body: Value = http.get(format!("http://{}/v1/models", r.addr)).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
        body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(models().await, ["gpt-4o-mini", "claude-sonnet-4"]);

    // A valid new file: a model added.
    let added = config.replace("[[models]]\nid = \"claude-sonnet-4\"", "[[models]]\nid = \"gpt-4o\"\n  [[models.routes]]\n  provider = \"oa-1\"\n  upstream_model = \"gpt-4o\"\n[[models]]\nid = \"claude-sonnet-4\"");
    std::fs::write(&r.config, &added).unwrap();
    r.signal("HUP");
    let mut now = Vec::new();
    for _ in 0..100 {
        now = models().await;
        if now.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(now, ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4"]);

    // An invalid one: refused, logged with its problem, the running config kept.
    std::fs::write(&r.config, added.replace("provider = \"oa-1\"\n  upstream_model = \"gpt-4o\"", "provider = \"nowhere\"\n  upstream_model = \"gpt-4o\"")).unwrap();
    r.signal("HUP");
    let mut refused = None;
    for _ in 0..100 {
        refused = r.logs().into_iter().find(|l| l["message"] == "config reload refused; the running config stays");
        if refused.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.expect("the refusal is logged");
    assert_eq!(refused["level"], "ERROR");
    assert!(refused["problem"].as_str().unwrap().contains("nowhere"), "{refused}");
    assert_eq!(models().await, ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4"], "the running config stays");
    let resp = http
        .post(format!("http://{}/v1/chat/completions", r.addr))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-4o", "messages": user("Hello")}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "still serving, on the last good config");
}

#[tokio::test]
async fn json_logs_carry_the_request_id_and_trace_id() {
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    // A provider that fails, so the request logs a warning of its own.
    sim.state.set_faults("oa-1", Faults { status: Some(503), ..Faults::default() });
    let keys = format!("[[keys]]\nname = \"k\"\nkey = \"{KEY}\"\n");
    let r = replica(&single_provider_config(&sim.url(), &temp_db_url(), "memory", &keys));
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", r.addr))
        .bearer_auth(KEY)
        .header("x-request-id", "req-json-logs-1")
        .json(&json!({"model": "gpt-4o-mini", "messages": user("Hello")}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let trace_id = resp.headers()["traceparent"].to_str().unwrap().split('-').nth(1).unwrap().to_owned();
    let mut mine = Vec::new();
    for _ in 0..100 {
        mine = r.logs().into_iter().filter(|l| l["span"]["request_id"] == "req-json-logs-1").collect();
        if mine.iter().any(|l| l["target"] == "switchyard::access") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = mine.iter().find(|l| l["level"] == "WARN").unwrap_or_else(|| panic!("the attempt's warning: {mine:#?}"));
    assert_eq!(failed["span"]["trace_id"], trace_id.as_str());
    assert_eq!(failed["provider"], "oa-1");
    let access = mine.iter().find(|l| l["target"] == "switchyard::access").expect("an access log line");
    assert_eq!(access["span"]["trace_id"], trace_id.as_str());
    assert_eq!(access["status"], 502);
    assert_eq!(access["code"], "provider_unavailable");
    assert_eq!(access["model"], "gpt-4o-mini");
    assert_eq!(access["key"], "k");
    assert!(!r.logs.lock().unwrap().iter().any(|l| l.contains("sk-test-oa-1-secret")), "no provider secret in the logs");
}
