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
    std::thread::spawn(move || for _ in lines {});
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
