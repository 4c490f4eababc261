//! The `switchyard` binary as an operator runs it: `check` exit codes and
//! messages, and `demo` answering the curl line it prints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    io::{BufRead, BufReader, Lines},
    process::{Child, ChildStdout, Command, Stdio},
};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Starts `switchyard demo` on port 0 in a directory of its own, with the
/// default log settings; returns it, the address its banner's first line
/// names, and the rest of the banner.
fn demo(name: &str, stderr: Stdio) -> (Child, String, Lines<BufReader<ChildStdout>>) {
    let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut banner = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = banner.next().unwrap().unwrap();
    let addr = first.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    (child, addr, banner)
}

fn check(config: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("switchyard-cli-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).envs(env.iter().copied()).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

#[test]
fn check_accepts_the_example_config() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/switchyard.example.toml")).unwrap();
    let env = [
        ("OPENAI_API_KEY", "sk-1"),
        ("TOGETHER_API_KEY", "t-1"),
        ("ANTHROPIC_API_KEY", "a-1"),
        ("SWITCHYARD_CI_KEY", "ze_ci_key_0123456789"),
        ("REPLICATE_API_TOKEN", "r8-1"),
        ("ELEVENLABS_API_KEY", "el-1"),
        ("DEEPGRAM_API_KEY", "dg-1"),
    ];
    let (code, out, err) = check(&text, &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn check_lists_every_problem_and_exits_2() {
    let text = r#"
[[providers]]
id = "p"
kind = "openai"
base_url = "ftp://nope"
api_key = "sk-very-secret-value"

[[models]]
id = "m"
  [[models.routes]]
  provider = "ghost"
  upstream_model = "x"

[[keys]]
name = "k"
key = "not-a-gateway-key"
"#;
    let (code, _, err) = check(text, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("providers[0].base_url"), "{err}");
    assert!(err.contains("unknown provider \"ghost\""), "{err}");
    assert!(err.contains("keys[0].key"), "{err}");
    assert!(!err.contains("sk-very-secret-value"), "secrets never reach errors: {err}");
}

#[test]
fn check_names_line_and_path_of_unknown_keys_and_missing_env() {
    let (code, _, err) = check("[server]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("line 3") && err.contains("listen_port"), "{err}");
    let (code, _, err) = check("[storage]\nurl = \"${SWITCHYARD_TEST_UNSET_VAR}\"\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("SWITCHYARD_TEST_UNSET_VAR") && err.contains("storage.url"), "{err}");
}

#[test]
fn demo_answers_its_own_curl_line() {
    let (mut child, addr, mut lines) = demo("demo", Stdio::null());
    // The banner names the demo key; stop reading there (stdout stays open).
    let key_line = lines.by_ref().map(Result::unwrap).find(|l| l.contains("key:")).expect("the banner names a key");
    assert!(key_line.contains(switchyard::demo::DEMO_KEY), "{key_line}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let text = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(switchyard::demo::DEMO_KEY)
            .json(&serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Hello!"}]}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

/// Text logs (the default): one access line per request, in
/// tracing-subscriber's full format, carrying the request's id and trace id.
#[test]
fn text_logs_have_an_access_line_per_request() {
    let (mut child, addr, banner) = demo("textlog", Stdio::piped());
    std::thread::spawn(move || banner.for_each(drop));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resp = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(switchyard::demo::DEMO_KEY)
            .header("x-request-id", "text-log-0001")
            .json(&serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}))
            .send()
            .await
            .unwrap()
    });
    assert_eq!(resp.status(), 200);
    let trace_id = resp.headers()["traceparent"].to_str().unwrap().split('-').nth(1).unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let access = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx.recv_timeout(left).expect("an access line within 10 s");
        if line.contains(" switchyard::access: ") {
            break line;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    // `2026-12-03T22:01:12.230988Z  INFO request{…}: switchyard::access: request …`
    let (stamp, rest) = access.split_once(' ').unwrap();
    assert!(stamp.len() == 27 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{access}");
    let head = format!(" INFO request{{request_id=\"text-log-0001\" trace_id={trace_id}}}: switchyard::access: request endpoint=/v1/chat/completions model=\"gpt-4o-mini\" key=\"");
    assert!(rest.starts_with(&head), "{access}");
    assert!(rest.contains("\" status=200 code=\"ok\" duration_ms="), "{access}");
    assert!(!access.contains('\u{1b}'), "no colours into a pipe: {access:?}");
}

/// The configs shipped in `deploy/` (compose's file, the Kubernetes
/// ConfigMap's embedded file) pass `check`, with their variables set.
#[test]
fn check_accepts_the_deploy_configs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let compose = std::fs::read_to_string(format!("{root}/deploy/compose/switchyard.toml")).unwrap();
    let (code, _, err) = check(&compose, &[("SWITCHYARD_LEDGER_JOURNAL", "/tmp/compose.ledger.jsonl")]);
    assert_eq!(code, 0, "compose: {err}");

    let configmap = std::fs::read_to_string(format!("{root}/deploy/k8s/configmap.yaml")).unwrap();
    let embedded: String = configmap
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("switchyard.toml: |"))
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(embedded.contains("[server]"), "the ConfigMap embeds a config");
    let env = [
        ("OPENAI_API_KEY", "sk-1"),
        ("TOGETHER_API_KEY", "t-1"),
        ("ANTHROPIC_API_KEY", "a-1"),
        ("REPLICATE_API_TOKEN", "r8-1"),
        ("ELEVENLABS_API_KEY", "el-1"),
        ("DEEPGRAM_API_KEY", "dg-1"),
        ("SWITCHYARD_ADMIN_KEY", "ze_admin_key_0123456789"),
        ("SWITCHYARD_DATABASE_URL", "postgres://u:p@db:5432/switchyard"),
        ("SWITCHYARD_REDIS_URL", "redis://redis:6379"),
        ("SWITCHYARD_LEDGER_JOURNAL", "/tmp/k8s.ledger.jsonl"),
    ];
    let (code, _, err) = check(&embedded, &env);
    assert_eq!(code, 0, "configmap: {err}");
}
