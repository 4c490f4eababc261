//! Two real gateway processes sharing Redis and PostgreSQL enforce one rate
//! limit and one budget together.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
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
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if show {
                eprintln!("[replica] {line}");
            }
        }
    });
    Replica { child, addr }
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
    let post = |addr: &str, key: &str| {
        http.post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": "gpt-4o-mini", "messages": user("Hello")}))
            .send()
    };
    let mut admitted = 0;
    for i in 0..10 {
        let r = if i % 2 == 0 { &a } else { &b };
        if post(&r.addr, &limited).await.unwrap().status() == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "one limit across two processes");

    let mut served = 0;
    let mut refused_by = std::collections::HashSet::new();
    for i in 0..30 {
        let r = if i % 2 == 0 { &a } else { &b };
        match post(&r.addr, &budgeted).await.unwrap().status().as_u16() {
            200 => served += 1,
            402 => {
                refused_by.insert(i % 2);
            }
            s => panic!("unexpected {s}"),
        }
        if refused_by.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(refused_by.len(), 2, "both processes refuse the spent budget");
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
        assert_eq!(post(&r.addr, &minted).await.unwrap().status(), 200);
    }
    assert!(cli(&["keys", "revoke", &name]).status.success());
    let started = std::time::Instant::now();
    loop {
        let (sa, sb) = (post(&a.addr, &minted).await.unwrap().status(), post(&b.addr, &minted).await.unwrap().status());
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
fn generation_config(sim: &str, storage: &str) -> String {
    let journal = temp_journal();
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
[[providers]]
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
[[keys]]
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
