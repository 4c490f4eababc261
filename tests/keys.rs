//! Stored keys end to end: minted by the CLI into SQLite or PostgreSQL,
//! accepted by gateways sharing that store, revoked through one and refused
//! by all within seconds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{process::Command, sync::Arc, time::Duration};

use common::*;
use serde_json::json;
use switchyard::{
    config::Config,
    simulator::{self, Faults, SimState},
};
use tokio::net::TcpListener;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Runs the CLI against a config file holding `storage_url`.
fn cli(config_text: &str, args: &[&str]) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(unique("switchyard-keys-cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(BIN).args(args).arg("--config").arg(&path).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

async fn gateway(sim: &simulator::SimHandle, config_text: &str) -> Harness {
    let sim2 = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), sim.state.clone()).unwrap();
    start_gateway(sim2, Config::parse(config_text, "test").unwrap()).await
}

async fn status_with(h: &Harness, key: &str, model: &str) -> u16 {
    h.http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": user("Hello")}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn mint_use_revoke(storage_url: &str) {
    let sim = simulator::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::new(SimState::new(SEED, Faults::default()))).unwrap();
    let config_text = single_provider_config(&sim.url(), storage_url, "memory", "");
    let name = unique("team");
    let (code, key, err) = cli(&config_text, &["keys", "create", "--name", &name, "--models", "gpt-*", "--rpm", "100"]);
    assert_eq!(code, 0, "{err}");
    let key = key.trim().to_owned();
    assert!(key.starts_with("ze_") && key.len() > 30 && !key.contains(char::is_whitespace), "the key alone on stdout: {key:?}");

    let (code, list, _) = cli(&config_text, &["keys", "list"]);
    assert_eq!(code, 0);
    assert!(list.contains(&name) && list.contains("active"), "{list}");
    assert!(!list.contains(&key), "the secret is never listed");

    // Two gateways share the store (each with its own ledger journal).
    let a = gateway(&sim, &single_provider_config(&sim.url(), storage_url, "memory", "")).await;
    let b = gateway(&sim, &single_provider_config(&sim.url(), storage_url, "memory", "")).await;
    assert_eq!(status_with(&a, &key, "gpt-4o-mini").await, 200);
    assert_eq!(status_with(&b, &key, "gpt-4o-mini").await, 200);
    assert_eq!(status_with(&a, &key, "claude-sonnet-4").await, 403, "outside the key's globs");

    let (code, _, err) = cli(&config_text, &["keys", "revoke", &name]);
    assert_eq!(code, 0, "{err}");
    let started = std::time::Instant::now();
    loop {
        let (sa, sb) = (status_with(&a, &key, "gpt-4o-mini").await, status_with(&b, &key, "gpt-4o-mini").await);
        if sa == 401 && sb == 401 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "revocation reached every replica within seconds");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, list, _) = cli(&config_text, &["keys", "list"]);
    assert_eq!(code, 0);
    assert!(list.contains("revoked"), "{list}");
    let (code, _, _) = cli(&config_text, &["keys", "revoke", &name]);
    assert_eq!(code, 2, "revoking twice is refused");
    let (code, _, err) = cli(&config_text, &["keys", "create", "--name", &name]);
    assert_eq!(code, 2, "names are unique: {err}");
}

#[tokio::test]
async fn keys_minted_into_sqlite_work_until_revoked() {
    mint_use_revoke(&temp_db_url()).await;
}

#[tokio::test]
async fn keys_minted_into_postgres_work_on_every_replica_until_revoked() {
    let schema = PgSchema::new().await;
    mint_use_revoke(&schema.url).await;
    schema.drop_now().await;
}

#[tokio::test]
async fn config_is_found_before_or_after_the_subcommand_and_by_env() {
    let url = temp_db_url();
    let text = single_provider_config("http://127.0.0.1:9", &url, "memory", "");
    let dir = std::env::temp_dir().join(unique("switchyard-cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("custom.toml");
    std::fs::write(&path, &text).unwrap();
    let run = |args: &[&str], env: Option<&std::path::Path>| {
        let mut c = Command::new(BIN);
        c.args(args).env_remove("SWITCHYARD_CONFIG").current_dir(&dir);
        if let Some(p) = env {
            c.env("SWITCHYARD_CONFIG", p);
        }
        c.output().unwrap()
    };
    let name = unique("placed");
    let p = path.to_str().unwrap();
    // --config before the subcommand; --models defaults to every model.
    let out = run(&["--config", p, "keys", "create", "--name", &name], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // SWITCHYARD_CONFIG names the file when --config does not.
    let out = run(&["keys", "list"], Some(&path));
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(list.contains(&name), "{list}");
    let line = list.lines().find(|l| l.contains(&name)).unwrap();
    assert!(line.split_whitespace().nth(2) == Some("*"), "models default to *: {line}");
    // --log-format is accepted before or after the subcommand too.
    assert!(run(&["--log-format", "json", "--config", p, "check"], None).status.success());
    assert!(run(&["check", "--config", p, "--log-format", "json"], None).status.success());
}

#[tokio::test]
async fn bad_key_commands_exit_2() {
    let config_text = single_provider_config("http://127.0.0.1:9", &temp_db_url(), "memory", "[[keys]]\nname = \"static\"\nkey = \"ze_static_key_1234567\"\n");
    for args in [
        vec!["keys", "create", "--name", "has space"],
        vec!["keys", "create", "--name", "ok", "--rpm", "0"],
        vec!["keys", "create", "--name", "static"],
        vec!["keys", "revoke", "nobody"],
    ] {
        let (code, out, err) = cli(&config_text, &args);
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        assert!(out.is_empty(), "no key printed on failure: {out}");
    }
}
