//! The benchmark's own load tool, for what wrk cannot measure: time to
//! first token of a stream, gRPC unary and streaming calls, a fixed request
//! rate (open loop, latency counted from when each request was due, so a
//! stalled server cannot hide its queue), and thousands of streams held
//! open at once. It also plays the OTLP collector the gateway exports its
//! spans to while measured, and turns the run's results into the markdown
//! table of BENCHMARKS.md.
//!
//! Every measuring command prints one JSON line of figures.
//! `bench/run.sh` drives it; see README "Benchmarks".
//!
//! A failure (a client that cannot be built, a task that panicked, a
//! file that cannot be read or written) ends the command with a message
//! on stderr and exit status 1; a failed request is counted, not fatal.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde_json::{json, Value};
use switchyard::proto::{chat_client::ChatClient, message, ChatRequest, Message, Role};
use tonic::metadata::{Ascii, MetadataValue};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Chat completions over HTTP/1.1 (sync or SSE).
    Http {
        #[command(flatten)]
        load: Load,
    },
    /// switchyard.v1.Chat over gRPC (Complete or CompleteStream).
    Grpc {
        #[command(flatten)]
        load: Load,
        /// HTTP/2 connections; the concurrency is spread over them.
        #[arg(long, default_value_t = 4)]
        channels: usize,
    },
    /// Opens `n` streams over HTTP/2 and holds them until each has its
    /// first content, then reports how long that took and the resident
    /// memory of `--pid`.
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "")]
        key: String,
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// HTTP/2 connections the streams are spread over.
        #[arg(long, default_value_t = 100)]
        h2_conns: usize,
        #[arg(long, default_value = "gpt-4o-mini")]
        model: String,
        /// The process whose memory is reported (the gateway, nginx, ...).
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// An OTLP/gRPC trace collector that counts and drops spans.
    OtlpSink {
        #[arg(long, default_value_t = 14317)]
        port: u16,
    },
    /// Writes the markdown report from the JSON lines of a run.
    Report {
        #[arg(long)]
        results: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// What to load, how hard and for how long.
#[derive(clap::Args)]
struct Load {
    /// Base URL, e.g. http://127.0.0.1:8080 (HTTP adds /v1/chat/completions).
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "")]
    key: String,
    /// Concurrent requests (closed loop), or the most in flight (open loop).
    #[arg(long, default_value_t = 64)]
    conns: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Requests per second (open loop); absent: as fast as `conns` allow.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many requests (closed loop), or at `duration`,
    /// whichever comes first: a fixed amount of work, for counting
    /// instructions (bench/instructions.sh).
    #[arg(long)]
    requests: Option<usize>,
    #[arg(long)]
    stream: bool,
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// A label for the report.
    #[arg(long, default_value = "")]
    label: String,
}

/// Latencies in microseconds, and what went wrong.
#[derive(Default)]
struct Samples {
    latency: Vec<u64>,
    ttft: Vec<u64>,
    errors: u64,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latency.extend(other.latency);
        self.ttft.extend(other.ttft);
        self.errors += other.errors;
    }

    fn figures(mut self, label: &str, kind: &str, elapsed: Duration) -> Value {
        self.latency.sort_unstable();
        self.ttft.sort_unstable();
        let pct = |v: &[u64], p: f64| -> Option<u64> { (!v.is_empty()).then(|| v[((v.len() as f64 * p) as usize).min(v.len() - 1)]) };
        json!({
            "label": label,
            "kind": kind,
            "requests": self.latency.len(),
            "errors": self.errors,
            "rps": self.latency.len() as f64 / elapsed.as_secs_f64(),
            "p50_us": pct(&self.latency, 0.50),
            "p99_us": pct(&self.latency, 0.99),
            "ttft_p50_us": pct(&self.ttft, 0.50),
            "ttft_p99_us": pct(&self.ttft, 0.99),
        })
    }
}

fn chat_body(model: &str, stream: bool) -> String {
    json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    })
    .to_string()
}

/// One HTTP request; its latency and, for a stream, its time to the first
/// content delta.
async fn http_once(client: &reqwest::Client, url: &str, key: &str, body: &str, stream: bool, due: Instant) -> Result<(u64, Option<u64>), ()> {
    let resp = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .map_err(|_| ())?;
    if !resp.status().is_success() {
        return Err(());
    }
    let mut ttft = None;
    let mut body = resp.bytes_stream();
    let mut seen = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|_| ())?;
        if stream && ttft.is_none() {
            seen.extend_from_slice(&chunk);
            if has_content(&seen) {
                ttft = Some(due.elapsed().as_micros() as u64);
            }
        }
    }
    Ok((due.elapsed().as_micros() as u64, ttft))
}

/// Whether SSE bytes carry a non-empty content delta yet.
fn has_content(sse: &[u8]) -> bool {
    let needle = b"\"content\":\"";
    sse.windows(needle.len() + 1).any(|w| w.starts_with(needle) && w[needle.len()] != b'"')
}

/// Runs `one` closed-loop on `conns` workers (at most `requests` in all),
/// or open-loop at `rate`.
/// The run's outcome, or what made it stop.
type Run<T = ()> = Result<T, String>;

async fn drive<F, Fut>(conns: usize, duration: Duration, rate: Option<f64>, requests: Option<usize>, one: F) -> Run<(Samples, Duration)>
where
    F: Fn(usize, Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(u64, Option<u64>), ()>> + Send,
{
    let one = Arc::new(one);
    let started = Instant::now();
    let end = started + duration;
    let samples = Arc::new(Mutex::new(Samples::default()));
    let record = |s: &Mutex<Samples>, r: Result<(u64, Option<u64>), ()>| {
        let mut s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match r {
            Ok((lat, ttft)) => {
                s.latency.push(lat);
                s.ttft.extend(ttft);
            }
            Err(()) => s.errors += 1,
        }
    };
    match rate {
        None => {
            let mut workers = Vec::new();
            let started_requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for w in 0..conns {
                let one = one.clone();
                let samples = samples.clone();
                let started_requests = started_requests.clone();
                let another = move || requests.is_none_or(|n| started_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n);
                workers.push(tokio::spawn(async move {
                    let mut local = Samples::default();
                    while Instant::now() < end && another() {
                        match one(w, Instant::now()).await {
                            Ok((lat, ttft)) => {
                                local.latency.push(lat);
                                local.ttft.extend(ttft);
                            }
                            Err(()) => local.errors += 1,
                        }
                    }
                    samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).merge(local);
                }));
            }
            for w in workers {
                w.await.map_err(|e| format!("a load worker failed: {e}"))?;
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate);
            // Requests are released when due by a thread of their own:
            // tokio's timers tick in whole milliseconds, which released them
            // in bursts (five at once every millisecond at 5,000/s), and a
            // burst queues at the target as real traffic at that rate would
            // not. `thread::sleep` wakes within tens of microseconds.
            let (release, mut released) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                let mut due = started;
                while due < end {
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if release.send(due).is_err() {
                        return;
                    }
                    due += interval;
                }
            });
            let mut tasks = Vec::new();
            let mut i = 0usize;
            // At most `conns` in flight, as a pool of that many connections
            // would allow: a request due while all are busy waits, and its
            // wait counts in its latency (measured from when it was due).
            // Unbounded, a brief stall made the client open thousands of
            // connections and the target ran out of file descriptors.
            let in_flight = Arc::new(tokio::sync::Semaphore::new(conns.max(1)));
            while let Some(due) = released.recv().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                i += 1;
                let one = one.clone();
                let samples = samples.clone();
                tasks.push(tokio::spawn(async move {
                    let r = one(i % conns.max(1), due).await;
                    drop(permit);
                    record(&samples, r);
                }));
            }
            for t in tasks {
                t.await.map_err(|e| format!("a load task failed: {e}"))?;
            }
        }
    }
    let elapsed = started.elapsed();
    // Every task has ended; what they recorded is taken whole.
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    Ok((samples, elapsed))
}

fn grpc_request(model: &str, auth: &MetadataValue<Ascii>) -> tonic::Request<ChatRequest> {
    let mut r = tonic::Request::new(ChatRequest {
        model: model.into(),
        messages: vec![Message {
            role: Role::User as i32,
            content: Some(message::Content::Text("Say hello to the benchmark.".into())),
            ..Default::default()
        }],
        ..Default::default()
    });
    r.metadata_mut().insert("authorization", auth.clone());
    r
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse().cmd).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Run {
    match cmd {
        Cmd::Http {
            load: Load { url, key, conns, duration, rate, requests, stream, model, label },
        } => {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(conns.max(64))
                .tcp_nodelay(true)
                .build()
                .map_err(|e| format!("building the HTTP client: {e}"))?;
            let endpoint = format!("{}/v1/chat/completions", url.trim_end_matches('/'));
            let body = chat_body(&model, stream);
            let (samples, elapsed) = drive(conns, duration, rate, requests, move |_, due| {
                let (client, endpoint, key, body) = (client.clone(), endpoint.clone(), key.clone(), body.clone());
                async move { http_once(&client, &endpoint, &key, &body, stream, due).await }
            })
            .await?;
            let kind = if stream { "http-stream" } else { "http-sync" };
            println!("{}", with_rate(samples.figures(&label, kind, elapsed), rate));
            Ok(())
        }
        Cmd::Grpc {
            load: Load { url, key, conns, duration, rate, requests, stream, model, label },
            channels,
        } => {
            let auth: MetadataValue<Ascii> = format!("Bearer {key}").parse().map_err(|_| "--key must be a valid header value".to_owned())?;
            let mut clients = Vec::new();
            for _ in 0..channels.max(1) {
                clients.push(ChatClient::connect(url.clone()).await.map_err(|e| format!("connecting to {url}: {e}"))?);
            }
            let clients = Arc::new(clients);
            let (samples, elapsed) = drive(conns, duration, rate, requests, move |w, due| {
                let mut client = clients[w % clients.len()].clone();
                let (model, auth) = (model.clone(), auth.clone());
                async move {
                    if stream {
                        let mut s = client.complete_stream(grpc_request(&model, &auth)).await.map_err(|_| ())?.into_inner();
                        let mut ttft = None;
                        while let Some(c) = s.next().await {
                            let c = c.map_err(|_| ())?;
                            if ttft.is_none() && c.has_content() {
                                ttft = Some(due.elapsed().as_micros() as u64);
                            }
                        }
                        Ok((due.elapsed().as_micros() as u64, ttft))
                    } else {
                        client.complete(grpc_request(&model, &auth)).await.map_err(|_| ())?;
                        Ok((due.elapsed().as_micros() as u64, None))
                    }
                }
            })
            .await?;
            let kind = if stream { "grpc-stream" } else { "grpc-unary" };
            println!("{}", with_rate(samples.figures(&label, kind, elapsed), rate));
            Ok(())
        }
        Cmd::Hold { url, key, n, h2_conns, model, pid, label } => hold(url, key, n, h2_conns, model, pid, label).await,
        Cmd::OtlpSink { port } => otlp_sink(port).await,
        Cmd::Report { results, out } => report(&results, &out),
    }
}

fn with_rate(mut v: Value, rate: Option<f64>) -> Value {
    v["offered_rps"] = json!(rate);
    v
}

async fn hold(url: String, key: String, n: usize, h2_conns: usize, model: String, pid: u32, label: String) -> Run {
    let clients = (0..h2_conns.max(1))
        .map(|_| reqwest::Client::builder().http2_prior_knowledge().build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("building the HTTP/2 client: {e}"))?;
    let endpoint = format!("{}/v1/chat/completions", url.trim_end_matches('/'));
    let body = chat_body(&model, true);
    let before = rss(pid);
    let started = Instant::now();
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<bool>(n.max(1));
    let release = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = clients[i % clients.len()].clone();
        let (endpoint, key, body, opened, release) = (endpoint.clone(), key.clone(), body.clone(), opened_tx.clone(), release.clone());
        tasks.push(tokio::spawn(async move {
            let resp = client.post(&endpoint).bearer_auth(&key).header("content-type", "application/json").body(body).send().await;
            let Ok(resp) = resp else {
                let _ = opened.send(false).await;
                return;
            };
            let mut stream = resp.bytes_stream();
            let mut seen = Vec::new();
            let mut told = false;
            let wait = release.notified();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    chunk = stream.next() => match chunk {
                        Some(Ok(c)) if !told => {
                            seen.extend_from_slice(&c);
                            if has_content(&seen) {
                                told = true;
                                let _ = opened.send(true).await;
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => {
                            if !told {
                                let _ = opened.send(false).await;
                            }
                            return;
                        }
                    },
                    _ = &mut wait => return,
                }
            }
        }));
    }
    drop(opened_tx);
    let (mut ok, mut failed) = (0usize, 0usize);
    while ok + failed < n {
        match opened_rx.recv().await {
            Some(true) => ok += 1,
            Some(false) => failed += 1,
            None => break,
        }
    }
    let all_open = started.elapsed();
    // Let the allocator settle, then read memory with every stream open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss(pid);
    release.notify_waiters();
    for t in tasks {
        let _ = t.await;
    }
    println!(
        "{}",
        json!({"label": label, "kind": "hold", "streams": ok, "errors": failed, "open_s": all_open.as_secs_f64(), "rss_before": before, "rss_bytes": during})
    );
    Ok(())
}

async fn otlp_sink(port: u16) -> Run {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    #[derive(Default)]
    struct Sink(AtomicU64);
    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(&self, r: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = r.into_inner().resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum();
            self.0.fetch_add(n as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink::default()))
        .serve(addr)
        .await
        .map_err(|e| format!("OTLP sink on {addr}: {e}"))
}

/// Rows measured more than once (same kind and label) become one, in the
/// place of the first, each figure the median of its rounds (the upper one
/// of an even count), errors the sum, and `rounds` saying how many there
/// were.
fn medians(rows: Vec<Value>) -> Vec<Value> {
    let mut merged: Vec<(Value, Vec<Value>)> = Vec::new();
    for row in rows {
        match merged.iter_mut().find(|(first, _)| first["kind"] == row["kind"] && first["label"] == row["label"]) {
            Some((_, rounds)) => rounds.push(row),
            None => merged.push((row.clone(), vec![row])),
        }
    }
    merged
        .into_iter()
        .map(|(mut first, rounds)| {
            if rounds.len() > 1 {
                let errors: u64 = rounds.iter().filter_map(|r| r["errors"].as_u64()).sum();
                first["errors"] = json!(errors);
                for field in ["rps", "p50_us", "p99_us", "ttft_p50_us", "ttft_p99_us", "cpu_us_per_req"] {
                    let mut values: Vec<f64> = rounds.iter().filter_map(|r| r[field].as_f64()).collect();
                    if values.len() == rounds.len() {
                        values.sort_by(f64::total_cmp);
                        first[field] = json!(values[values.len() / 2]);
                    }
                }
                first["rounds"] = json!(rounds.len());
            }
            first
        })
        .collect()
}

/// The markdown report: one table per measurement kind, targets beside.
fn report(results: &std::path::Path, out: &std::path::Path) -> Run {
    let text = std::fs::read_to_string(results).map_err(|e| format!("reading {}: {e}", results.display()))?;
    let rows = medians(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect());
    let us = |v: &Value| v.as_f64().map_or("–".to_owned(), |u| format!("{:.2}", u / 1000.0));
    let find = |kind: &str, label: &str| rows.iter().find(|r| r["kind"] == kind && r["label"] == label);
    let mut md = String::new();
    let meta = rows.iter().find(|r| r["kind"] == "meta");
    md.push_str("# Benchmarks\n\nMade by `bench/run.sh`");
    if let Some(m) = meta {
        md.push_str(&format!(" on {} ({}); {}.", m["date"].as_str().unwrap_or("?"), m["machine"].as_str().unwrap_or("?"), m["pinning"].as_str().unwrap_or("")));
    }
    md.push_str("\nLatencies in milliseconds. \"Added\" is against calling the simulator directly with the same tool and concurrency.\n\n");
    for (kind, title) in [("wrk-sync", "Sync chat, HTTP/1.1, closed loop (wrk)"), ("http-sync", "Sync chat, HTTP/1.1 (loadgen)"), ("http-stream", "Streaming chat, SSE (loadgen)"), ("grpc-unary", "gRPC unary"), ("grpc-stream", "gRPC streaming")] {
        let of_kind: Vec<&Value> = rows.iter().filter(|r| r["kind"] == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        // Each row against the simulator called directly at the same offered
        // rate (or both at their peak).
        let direct_for = |r: &Value| of_kind.iter().find(|d| d["label"].as_str().is_some_and(|l| l.starts_with("simulator")) && d["offered_rps"] == r["offered_rps"]).copied();
        md.push_str(&format!("## {title}\n\n| target | offered rps | rps | p50 | p99 | added p50 | added p99 | TTFT p50 | TTFT p99 | added TTFT p99 | CPU µs / request | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"));
        for r in &of_kind {
            let direct = direct_for(r);
            let added = |field: &str| match (r[field].as_f64(), direct.and_then(|d| d[field].as_f64())) {
                (Some(a), Some(b)) if !r["label"].as_str().unwrap_or("").starts_with("simulator") => format!("{:+.2}", (a - b) / 1000.0),
                _ => "–".to_owned(),
            };
            md.push_str(&format!(
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r["label"].as_str().unwrap_or(""),
                r["offered_rps"].as_f64().map_or("max".to_owned(), |v| format!("{v:.0}")),
                r["rps"].as_f64().unwrap_or(0.0),
                us(&r["p50_us"]),
                us(&r["p99_us"]),
                added("p50_us"),
                added("p99_us"),
                us(&r["ttft_p50_us"]),
                us(&r["ttft_p99_us"]),
                added("ttft_p99_us"),
                r["cpu_us_per_req"].as_f64().map_or("–".to_owned(), |v| format!("{v:.1}")),
                r["errors"]
            ));
        }
        md.push('\n');
    }
    if let (Some(g), Some(n)) = (find("wrk-sync", "gateway"), find("wrk-sync", "nginx")) {
        let ratio = g["rps"].as_f64().unwrap_or(0.0) / n["rps"].as_f64().unwrap_or(1.0);
        md.push_str(&format!("**Gateway / nginx sync throughput on the same core: {ratio:.2}×** (target ≥ 0.7×).\n\n"));
        if let (Some(gc), Some(nc)) = (g["cpu_us_per_req"].as_f64(), n["cpu_us_per_req"].as_f64()) {
            // CPU time × rate: how busy each proxy kept its core.
            let busy = |cpu: f64, r: &Value| cpu * r["rps"].as_f64().unwrap_or(0.0) / 10_000.0;
            md.push_str(&format!(
                "CPU per request at that peak: gateway {gc:.1} µs (its core {:.0}% busy), nginx {nc:.1} µs (its core {:.0}% busy); \
                 by CPU per request the gateway is **{:.2}×** nginx. Where nginx's core is not saturated, its rate was set by the load core, \
                 and the throughput ratio flatters the gateway.\n\n",
                busy(gc, g),
                busy(nc, n),
                nc / gc
            ));
        }
    }
    let holds: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "hold").collect();
    if !holds.is_empty() {
        md.push_str("## Streams held open at once\n\n| target | streams | errors | all open after (s) | resident memory (MB) |\n|---|---|---|---|---|\n");
        for r in holds {
            md.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.0} |\n",
                r["label"].as_str().unwrap_or(""),
                r["streams"],
                r["errors"],
                r["open_s"].as_f64().unwrap_or(0.0),
                r["rss_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0
            ));
        }
        md.push('\n');
    }
    // The targets of issue 7, each against this run's figure, for the
    // gateway as configured by default and with HTTP/2 to its providers.
    let added_at_half = |kind: &str, field: &str, target: &str, suffix: &str| -> Option<f64> {
        let g = find(kind, &format!("{target}{suffix}"))?;
        let d = rows.iter().find(|r| r["kind"] == kind && r["label"].as_str().is_some_and(|l| l.starts_with("simulator @ half")) && r["offered_rps"] == g["offered_rps"])?;
        Some((g[field].as_f64()? - d[field].as_f64()?) / 1000.0)
    };
    let ratio = |gw: &str| match (find("wrk-sync", gw), find("wrk-sync", "nginx")) {
        (Some(g), Some(n)) => g["rps"].as_f64().zip(n["rps"].as_f64()).map(|(g, n)| g / n),
        _ => None,
    };
    let rss = |gw: &str| find("hold", gw).and_then(|r| r["rss_bytes"].as_f64()).map(|b| b / 1_048_576.0);
    let verdict = |v: Option<f64>, ok: fn(f64) -> bool, fmt: &dyn Fn(f64) -> String| match v {
        Some(v) => format!("{} | {}", fmt(v), if ok(v) { "met" } else { "**not met**" }),
        None => "– | not measured".to_owned(),
    };
    // Added latency below zero: the direct call had the worse tail, so the
    // run says nothing about the target.
    let added_verdict = |v: Option<f64>, limit: f64| match v {
        Some(v) if v < 0.0 => format!("{v:+.2} ms | inconclusive (the direct call's tail was worse)"),
        Some(v) => format!("{v:+.2} ms | {}", if v < limit { "met" } else { "**not met**" }),
        None => "– | not measured".to_owned(),
    };
    let gateways = ["gateway", "gateway (HTTP/2 upstream)"];
    // What nginx adds at the same rate: the floor of the latency targets on this machine.
    let nginx_at_half = |kind: &str, field: &str, gw: &str| -> String {
        added_at_half(kind, field, &format!("nginx @ half {gw}"), " peak").map_or("–".to_owned(), |v| format!("{v:+.2} ms"))
    };
    md.push_str("## Targets\n\n| target | configuration | this run | | nginx at the same rate |\n|---|---|---|---|---|\n");
    let mut line = |target: &str, gw: &str, cell: String, floor: String| md.push_str(&format!("| {target} | {gw} | {cell} | {floor} |\n"));
    for gw in gateways {
        line("sync throughput ≥ 0.7× nginx on the same core", gw, verdict(ratio(gw), |v| v >= 0.7, &|v| format!("{v:.2}×")), "–".to_owned());
    }
    for gw in gateways {
        let v = added_at_half("http-sync", "p99_us", gw, " @ half peak");
        line("added p99 < 1 ms at half the gateway's peak (sync)", gw, added_verdict(v, 1.0), nginx_at_half("http-sync", "p99_us", gw));
    }
    for gw in gateways {
        let v = added_at_half("http-stream", "ttft_p99_us", gw, " @ half peak");
        line("streaming TTFT overhead < 0.5 ms at p99 (half peak)", gw, added_verdict(v, 0.5), nginx_at_half("http-stream", "ttft_p99_us", gw));
    }
    for r in rows.iter().filter(|r| r["kind"] == "hold") {
        let gw = r["label"].as_str().unwrap_or("");
        line("10,000 open streams < 300 MB resident", gw, verdict(rss(gw), |v| v < 300.0, &|v| format!("{v:.0} MB")), "–".to_owned());
    }
    md.push('\n');
    if let Some(m) = meta {
        if let Some(notes) = m["notes"].as_str() {
            md.push_str(notes);
            md.push('\n');
        }
    }
    std::fs::write(out, md).map_err(|e| format!("writing {}: {e}", out.display()))
}
