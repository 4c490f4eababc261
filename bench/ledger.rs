//! What accounting costs on the request path: the time `Ledger::record`
//! holds a request before its last byte, for the local journal (the
//! embedded default) and the Redis stream (replicas). Run with
//! `cargo bench --bench ledger` (needs the Redis on 127.0.0.1:6379 for the
//! second figure). The rows are written to a throwaway SQLite database.

//!
//! A failure ends the run with a message on stderr and exit status 1.

use std::time::{Duration, Instant};

use switchyard::{
    accounting::{redis_stream::stream_key, AttemptRow, Entry, Ledger, LedgerRow},
    storage::Storage,
};

fn entry(i: usize) -> Entry {
    entry_with_id(format!("bench-{i}-{}", rand::random::<u64>()))
}

fn entry_with_id(request_id: String) -> Entry {
    Entry {
        row: LedgerRow {
            request_id: request_id.clone(),
            client_request_id: Some("client-id".into()),
            key_name: "bench".into(),
            model: "gpt-4o-mini".into(),
            provider: Some("openai-east".into()),
            upstream_model: Some("gpt-4o-mini-2024-07-18".into()),
            input_tokens: 812,
            output_tokens: 256,
            cached_tokens: 0,
            cost_usd: 0.000_275,
            latency_ms: 912,
            ttft_ms: Some(180),
            attempts: 1,
            outcome: "success".into(),
            error_code: None,
            created_at: 1_700_000_000,
            unit: None,
            units: 0.0,
        },
        attempts: vec![AttemptRow {
            attempt: 1,
            provider: "openai-east".into(),
            upstream_model: "gpt-4o-mini-2024-07-18".into(),
            outcome: "success".into(),
            input_tokens: 812,
            output_tokens: 256,
            provider_cost_usd: 0.000_275,
        }],
    }
}

/// The database writer's cost per entry (a row and its attempt), in
/// batches of `batch` as the ledger writer sends them.
async fn writer(label: &str, storage: &Storage, batches: usize, batch: usize, id: impl Fn(usize) -> String) -> Result<(), String> {
    let mut busy = Duration::ZERO;
    for b in 0..batches {
        let entries: Vec<Entry> = (0..batch).map(|i| entry_with_id(id(b * batch + i))).collect();
        let t = Instant::now();
        storage.insert_entries(&entries).await.map_err(|e| format!("inserting a batch: {e}"))?;
        busy += t.elapsed();
    }
    let n = batches * batch;
    println!("| {label} | {n} | {batch} | {:.1} |", busy.as_secs_f64() * 1e6 / n as f64);
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn measure(label: &str, ledger: &Ledger, n: usize) -> Result<(), String> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let e = entry(i);
        let t = Instant::now();
        ledger.record(e).await.map_err(|e| format!("recording an entry: {e}"))?;
        samples.push(t.elapsed());
    }
    samples.sort();
    println!(
        "| {label} | {n} | {:.1} | {:.1} | {:.1} |",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        percentile(&samples, 0.999).as_secs_f64() * 1e6,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
    let result = run(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ledger bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let url = format!("sqlite://{}/bench.db", dir.display());
    let storage = Storage::connect(&url).await.map_err(|e| format!("opening {url}: {e}"))?;
    println!("| ledger path | records | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---|---|---|---|");
    let journal = Ledger::open(&dir.join("a.jsonl"), storage.clone(), None).map_err(|e| e.to_string())?;
    measure("local journal (one write)", &journal, 20_000).await?;
    drop(journal);
    let redis = "redis://127.0.0.1:6379";
    let shared = Ledger::open(&dir.join("b.jsonl"), storage.clone(), Some((redis, stream_key(&url)))).map_err(|e| e.to_string())?;
    measure("Redis stream (one XADD)", &shared, 5_000).await?;
    drop(shared);
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!();
    println!("| database writer (SQLite) | entries | per batch | µs per entry |");
    println!("|---|---|---|---|");
    let random = |_| format!("chatcmpl-{}", rand::distr::SampleString::sample_string(&rand::distr::Alphanumeric, &mut rand::rng(), 24));
    for batch in [50, 250, 1000] {
        writer("random ids", &storage, 100_000 / batch, batch, random).await?;
    }
    let ordered = |i: usize| format!("chatcmpl-{:012x}{}", 1_700_000_000_000u64 + i as u64, rand::distr::SampleString::sample_string(&rand::distr::Alphanumeric, &mut rand::rng(), 12));
    for batch in [50, 250, 1000] {
        writer("time-ordered ids", &storage, 100_000 / batch, batch, ordered).await?;
    }
    Ok(())
}
