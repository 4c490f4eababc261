//! Generations, text-to-speech and speech-to-text, end to end: the real
//! gateway over real HTTP in front of the simulator speaking OpenAI images,
//! speech and transcriptions, Replicate predictions, ElevenLabs and
//! Deepgram.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchyard::{simulator::Faults, storage::Storage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMITED_KEY: &str = "ze_test_key_limited_media";
const POOR_KEY: &str = "ze_test_key_poor_media";

/// Media providers, each at its own simulator prefix:
/// `img-oa` (openai images), `rep-1`/`rep-2` (replicate), `tts-oa`
/// (openai speech), `el-1` (elevenlabs), `stt-oa` (openai
/// transcriptions), `dg-1` (deepgram).
fn media_toml(sim: &str, storage: &str, lease: &str) -> String {
    let journal = temp_journal();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "20s"
max_body_bytes = 65536
shutdown_grace = "2s"

[storage]
url = "{storage}"
ledger_journal = "{journal}"

[generations]
lease = "{lease}"

[[providers]]
id = "img-oa"
kind = "openai"
base_url = "{sim}/p/img-oa/v1"
api_key = "sk-test-img-secret"
[[providers]]
id = "rep-1"
kind = "replicate"
base_url = "{sim}/p/rep-1"
api_key = "r8_test_rep1_secret"
[[providers]]
id = "rep-2"
kind = "replicate"
base_url = "{sim}/p/rep-2"
api_key = "r8_test_rep2_secret"
[[providers]]
id = "tts-oa"
kind = "openai"
base_url = "{sim}/p/tts-oa/v1"
api_key = "sk-test-tts-secret"
idle_timeout = "2s"
[[providers]]
id = "el-1"
kind = "elevenlabs"
base_url = "{sim}/p/el-1"
api_key = "el-test-secret"
[[providers]]
id = "stt-oa"
kind = "openai"
base_url = "{sim}/p/stt-oa/v1"
api_key = "sk-test-stt-secret"
[[providers]]
id = "dg-1"
kind = "deepgram"
base_url = "{sim}/p/dg-1"
api_key = "dg-test-secret"
[[providers]]
id = "chat-oa"
kind = "openai"
base_url = "{sim}/p/chat-oa/v1"

[[models]]
id = "gpt-image-1"
modality = "image"
  [[models.routes]]
  provider = "img-oa"
  upstream_model = "gpt-image-1"
  price = {{ per_image = 0.04 }}

[[models]]
id = "flux-1.1-pro"
modality = "image"
  [[models.routes]]
  provider = "rep-1"
  upstream_model = "black-forest-labs/flux-1.1-pro"
  price = {{ per_image = 0.04 }}
  [[models.routes]]
  provider = "rep-2"
  upstream_model = "black-forest-labs/flux-1.1-pro"
  price = {{ per_image = 0.05 }}

[[models]]
id = "veo-3"
modality = "video"
  [[models.routes]]
  provider = "rep-1"
  upstream_model = "google/veo-3-video"
  price = {{ per_second = 0.5 }}

[[models]]
id = "tts-1"
modality = "tts"
default_voice = "alloy"
  [[models.routes]]
  provider = "tts-oa"
  upstream_model = "tts-1"
  price = {{ per_mchar = 15.0 }}
  [[models.routes]]
  provider = "el-1"
  upstream_model = "eleven_multilingual_v2"
  price = {{ per_mchar = 30.0 }}

[[models]]
id = "whisper-1"
modality = "stt"
  [[models.routes]]
  provider = "stt-oa"
  upstream_model = "whisper-1"
  price = {{ per_minute = 0.006 }}
  [[models.routes]]
  provider = "dg-1"
  upstream_model = "nova-2"
  price = {{ per_minute = 0.0043 }}

[[models]]
id = "gpt-4o-mini"
  [[models.routes]]
  provider = "chat-oa"
  upstream_model = "gpt-4o-mini"

[[keys]]
name = "all"
key = "{KEY}"

[[keys]]
name = "other"
key = "{CLAUDE_ONLY_KEY}"
models = ["flux-*", "claude-*"]

[[keys]]
name = "limited"
key = "{LIMITED_KEY}"
requests_per_minute = 2

[[keys]]
name = "poor"
key = "{POOR_KEY}"
budget_usd = 0.0
"#
    )
}

async fn start_media() -> (Harness, String) {
    let db = temp_db_url();
    let db2 = db.clone();
    let h = start_with(move |sim| media_toml(sim, &db2, "30s")).await;
    (h, db)
}

async fn send(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, headers, json)
}

fn generate(h: &Harness, key: &str, body: Value) -> reqwest::RequestBuilder {
    h.http.post(h.url("/v1/generations")).bearer_auth(key).json(&body)
}

fn poll(h: &Harness, key: &str, id: &str, wait: &str) -> reqwest::RequestBuilder {
    h.http.get(h.url(&format!("/v1/generations/{id}?wait={wait}"))).bearer_auth(key)
}

fn assert_envelope(body: &Value, code: &str, param: Option<&str>) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["param"].as_str(), param, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// The ledger rows of key `all` once `n` have landed.
async fn ledger(db: &str, n: usize) -> Vec<switchyard::accounting::LedgerRow> {
    let storage = Storage::connect(db).await.unwrap();
    for _ in 0..100 {
        let rows = storage.ledger_rows("all").await.unwrap();
        if rows.len() >= n {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the ledger did not reach {n} rows: {:?}", storage.ledger_rows("all").await.unwrap());
}

#[tokio::test]
async fn an_image_generation_completes_with_media_the_gateway_serves() {
    let (h, _db) = start_media().await;
    let (status, _, g) = send(generate(&h, KEY, json!({"model": "gpt-image-1", "input": {"prompt": "a red fox", "size": "64x48"}, "n": 2}))).await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["object"], "generation");
    assert_eq!(g["status"], "completed");
    assert_eq!(g["model"], "gpt-image-1");
    assert!(g["id"].as_str().unwrap().starts_with("gen-"));
    assert!(g["created_at"].as_i64().unwrap() > 1_700_000_000);
    assert!(g["completed_at"].as_i64().unwrap() >= g["created_at"].as_i64().unwrap());
    assert!(g["error"].is_null());
    assert_eq!(g["usage"]["images"], 2);
    assert!((g["usage"]["cost_usd"].as_f64().unwrap() - 0.08).abs() < 1e-9);
    let media = g["output"]["media"].as_array().unwrap();
    assert_eq!(media.len(), 2);
    assert_eq!(media[0]["type"], "image");
    assert_eq!(media[0]["content_type"], "image/png");
    assert_eq!((media[0]["width"].as_u64(), media[0]["height"].as_u64()), (Some(64), Some(48)));
    // Bytes the provider returned inline are kept and served to the owner.
    let url = media[1]["url"].as_str().unwrap();
    assert_eq!(url, h.url(&format!("/v1/generations/{}/media/1", g["id"].as_str().unwrap())));
    let resp = h.http.get(url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    assert!(resp.bytes().await.unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
    // Not to another key, and not without one.
    let other = h.http.get(url).bearer_auth(CLAUDE_ONLY_KEY).send().await.unwrap();
    assert_eq!(other.status(), 404);
    assert_eq!(h.http.get(url).send().await.unwrap().status(), 401);
    // The upstream request was OpenAI's images API with the route's model.
    let up = h.upstream_requests("/p/img-oa/v1/images/generations");
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].body["model"], "gpt-image-1");
    assert_eq!(up[0].body["n"], 2);
}

#[tokio::test]
async fn a_generation_fails_over_to_the_second_provider_and_urls_pass_through() {
    let (h, db) = start_media().await;
    h.faults("rep-1", Faults { status: Some(500), ..Faults::default() });
    let (status, _, g) = send(generate(&h, KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "a lighthouse", "seed": 3}}))).await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["status"], "completed", "{g}");
    let url = g["output"]["media"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&h.sim.url()) && url.contains("/_sim/media/"), "the provider's URL is passed through: {url}");
    assert_eq!(h.upstream_requests("/p/rep-1/v1/predictions").len(), 1);
    let created = h.upstream_requests("/p/rep-2/v1/predictions");
    assert_eq!(created[0].body["input"]["prompt"], "a lighthouse");
    assert_eq!(created[0].body["input"]["seed"], 3);
    // Charged once, at the serving route's price, with both attempts kept.
    let rows = ledger(&db, 1).await;
    assert_eq!(rows[0].provider.as_deref(), Some("rep-2"));
    assert_eq!((rows[0].unit.as_deref(), rows[0].units), (Some("images"), 1.0));
    assert!((rows[0].cost_usd - 0.05).abs() < 1e-9);
    assert_eq!(rows[0].attempts, 2);
}

#[tokio::test]
async fn a_generation_every_provider_fails_is_a_failed_resource() {
    let (h, _db) = start_media().await;
    for p in ["rep-1", "rep-2"] {
        h.faults(p, Faults { status: Some(503), ..Faults::default() });
    }
    let (status, _, g) = send(generate(&h, KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "x"}}))).await;
    assert_eq!(status, 200, "a failed job is a 200 resource: {g}");
    assert_eq!(g["status"], "failed");
    assert_eq!(g["error"]["code"], "provider_unavailable");
    assert!(g["output"]["media"].as_array().unwrap().is_empty());
    // A provider that rejects the input fails the job as invalid_input.
    h.faults("rep-1", Faults { status: Some(422), ..Faults::default() });
    let (_, _, g) = send(generate(&h, KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "x"}}))).await;
    assert_eq!(g["status"], "failed");
    assert_eq!(g["error"]["code"], "invalid_input", "{g}");
}

#[tokio::test]
async fn wait_zero_answers_queued_and_a_long_poll_returns_when_the_job_ends() {
    let (h, _db) = start_media().await;
    h.faults("rep-1", Faults { predict_ms: Some(800), ..Faults::default() });
    let (status, _, g) = send(generate(&h, KEY, json!({"model": "veo-3", "input": {"prompt": "waves", "duration": 4, "resolution": "720p"}, "wait": 0}))).await;
    assert_eq!(status, 202, "{g}");
    assert!(matches!(g["status"].as_str(), Some("queued" | "running")), "{g}");
    // (Not completed: it did not wait for the 0.8 s job.)
    assert!(g["completed_at"].is_null() && g["usage"].is_null());
    let id = g["id"].as_str().unwrap();

    // A 30 s window that ends as soon as the job does.
    let started = Instant::now();
    let (status, _, g) = send(poll(&h, KEY, id, "30")).await;
    let waited = started.elapsed();
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["status"], "completed");
    assert!(waited < Duration::from_secs(4), "the long poll returned {waited:?} after it began, not at the end of its window");
    let video = &g["output"]["media"][0];
    assert_eq!(video["type"], "video");
    assert_eq!(video["content_type"], "video/mp4");
    assert_eq!(g["usage"]["video_seconds"], 4.0);
    assert_eq!(g["usage"]["cost_usd"], 2.0);
    let up = h.upstream_requests("/p/rep-1/v1/predictions");
    assert_eq!(up[0].body["input"]["resolution"], "720p");

    // Another key's id is not found, on both calls.
    let (status, _, e) = send(poll(&h, CLAUDE_ONLY_KEY, id, "0")).await;
    assert_eq!(status, 404);
    assert_envelope(&e, "not_found", None);
    let (status, _, e) = send(poll(&h, KEY, "gen-nope", "auto")).await;
    assert_eq!(status, 404);
    assert_envelope(&e, "not_found", None);
}

#[tokio::test]
async fn generation_requests_get_each_error_of_the_table() {
    let (h, _db) = start_media().await;
    let post = |key: &str, body: Value| send(generate(&h, key, body));
    let (s, _, e) = post(KEY, json!({"model": "flux-1.1-pro", "input": {"promt": "x"}})).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("input.promt"));
    let (s, _, e) = post(KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": ""}})).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("input.prompt"));
    let (s, _, e) = post(KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "x"}, "n": 11})).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("n"));
    let (s, _, e) = post(KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "x"}, "wait": 61})).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("wait"));
    let (s, _, e) = post(KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "x", "duration": 5}})).await;
    assert_eq!(s, 400, "a video-only field to an image model");
    assert_envelope(&e, "invalid_input", Some("input.duration"));
    let (s, _, e) = post(KEY, json!({"model": "veo-3", "input": {"prompt": "x", "size": "64x64"}})).await;
    assert_eq!(s, 400, "an image-only field to a video model");
    assert_envelope(&e, "invalid_input", Some("input.size"));
    let (s, _, e) = post(KEY, json!({"model": "gpt-4o-mini", "input": {"prompt": "x"}})).await;
    assert_eq!(s, 400, "a chat model");
    assert_envelope(&e, "invalid_input", Some("model"));
    let (s, _, e) = post(KEY, json!({"model": "nope", "input": {"prompt": "x"}})).await;
    assert_eq!(s, 404);
    assert_envelope(&e, "not_found", Some("model"));
    let (s, _, e) = post(CLAUDE_ONLY_KEY, json!({"model": "gpt-image-1", "input": {"prompt": "x"}})).await;
    assert_eq!(s, 403);
    assert_envelope(&e, "permission_denied", None);
    let (s, _, e) = post(POOR_KEY, json!({"model": "gpt-image-1", "input": {"prompt": "x"}})).await;
    assert_eq!(s, 402);
    assert_envelope(&e, "insufficient_quota", None);
    let (s, _, e) = post("ze_not_a_key_at_all", json!({"model": "gpt-image-1", "input": {"prompt": "x"}})).await;
    assert_eq!(s, 401);
    assert_envelope(&e, "unauthenticated", None);
    let big = "x".repeat(70_000);
    let (s, _, e) = post(KEY, json!({"model": "gpt-image-1", "input": {"prompt": big}})).await;
    assert_eq!(s, 413);
    assert_envelope(&e, "invalid_input", None);
    let resp = h.http.put(h.url("/v1/generations")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert!(resp.headers()["allow"].to_str().unwrap().contains("POST"));
    // Two a minute: the third is refused with Retry-After.
    for _ in 0..2 {
        let (s, h2, _) = post(LIMITED_KEY, json!({"model": "gpt-image-1", "input": {"prompt": "x"}, "wait": 0})).await;
        assert_eq!(s, 202);
        assert!(h2.contains_key("x-ratelimit-remaining"));
    }
    let (s, headers, e) = post(LIMITED_KEY, json!({"model": "gpt-image-1", "input": {"prompt": "x"}})).await;
    assert_eq!(s, 429);
    assert_envelope(&e, "rate_limited", None);
    assert!(headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn speech_streams_audio_before_the_provider_has_finished() {
    let (h, db) = start_media().await;
    h.faults("tts-oa", Faults { chunk_delay_ms: Some(150), ..Faults::default() });
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let started = Instant::now();
    let mut resp = h
        .http
        .post(h.url("/v1/tts/synthesize"))
        .bearer_auth(KEY)
        .json(&json!({"model_id": "tts-1", "text": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    assert_eq!(resp.headers()["x-switchyard-provider"], "tts-oa");
    let first = resp.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(first.starts_with(b"ID3"), "mp3 audio");
    let mut total = first.len();
    let mut chunks = 1;
    while let Some(c) = resp.chunk().await.unwrap() {
        total += c.len();
        chunks += 1;
    }
    let done_at = started.elapsed();
    assert!(chunks >= 4, "streamed in pieces, not buffered: {chunks} chunks");
    assert!(first_at * 2 < done_at, "the first bytes ({first_at:?}) came long before the last ({done_at:?})");
    assert!(total >= 4096);
    // The default voice went upstream.
    let up = h.upstream_requests("/p/tts-oa/v1/audio/speech");
    assert_eq!(up[0].body["voice"], "alloy");
    assert_eq!(up[0].body["input"], text.as_str());
    let rows = ledger(&db, 1).await;
    assert_eq!((rows[0].unit.as_deref(), rows[0].units), (Some("characters"), text.chars().count() as f64));
    assert!((rows[0].cost_usd - text.chars().count() as f64 * 15.0 / 1e6).abs() < 1e-12);
}

#[tokio::test]
async fn speech_picks_a_provider_that_can_make_the_format_and_rate() {
    let (h, _db) = start_media().await;
    let tts = |body: Value| h.http.post(h.url("/v1/tts/synthesize")).bearer_auth(KEY).json(&body).send();
    // Only ElevenLabs makes 44.1 kHz mp3.
    let resp = tts(json!({"model_id": "tts-1", "text": "hello", "sample_rate": 44100, "voice_id": "voice-1"})).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "el-1");
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    let up = h.upstream_requests("/p/el-1/v1/text-to-speech/voice-1");
    assert_eq!(up.len(), 1);
    assert!(up[0].query.as_deref().is_some_and(|q| q.contains("output_format=mp3_44100")), "{:?}", up[0].query);
    for (format, ct, magic) in [("wav", "audio/wav", &b"RIFF"[..]), ("opus", "audio/opus", b"OggS"), ("flac", "audio/flac", b"fLaC"), ("aac", "audio/aac", b"\xff\xf1")] {
        let resp = tts(json!({"model_id": "tts-1", "text": "hello", "format": format})).await.unwrap();
        assert_eq!(resp.status(), 200, "{format}");
        assert_eq!(resp.headers()["content-type"], ct);
        assert!(resp.bytes().await.unwrap().starts_with(magic), "{format}");
    }
    // flac exists, but not at 44.1 kHz; no provider makes flac at 8 kHz either.
    let (s, _, e) = send(h.http.post(h.url("/v1/tts/synthesize")).bearer_auth(KEY).json(&json!({"model_id": "tts-1", "text": "hi", "format": "flac", "sample_rate": 44100}))).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("sample_rate"));
    let (s, _, e) = send(h.http.post(h.url("/v1/tts/synthesize")).bearer_auth(KEY).json(&json!({"model_id": "tts-1", "text": "hi", "format": "ogg"}))).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("format"));
    let (s, _, e) = send(h.http.post(h.url("/v1/tts/synthesize")).bearer_auth(KEY).json(&json!({"model_id": "tts-1", "txt": "hi"}))).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("txt"));
    let (s, _, e) = send(h.http.post(h.url("/v1/tts/synthesize")).bearer_auth(KEY).json(&json!({"model_id": "whisper-1", "text": "hi"}))).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("model_id"));
    let (s, _, e) = send(h.http.post(h.url("/v1/tts/synthesize")).bearer_auth(KEY).json(&json!({"model_id": "nope", "text": "hi"}))).await;
    assert_eq!(s, 404);
    assert_envelope(&e, "not_found", Some("model_id"));
    // Every provider failing before any audio: one clean 502.
    h.faults("tts-oa", Faults { status: Some(500), ..Faults::default() });
    h.faults("el-1", Faults { status: Some(500), ..Faults::default() });
    let (s, headers, e) = send(h.http.post(h.url("/v1/tts/synthesize")).bearer_auth(KEY).json(&json!({"model_id": "tts-1", "text": "hi"}))).await;
    assert_eq!(s, 502);
    assert_envelope(&e, "provider_unavailable", None);
    assert!(headers.contains_key("x-switchyard-attempts"));
}

fn wav(bytes: usize) -> Vec<u8> {
    let mut v = b"RIFF\0\0\0\0WAVEfmt ".to_vec();
    v.resize(bytes, 7);
    v
}

fn upload(h: &Harness, file: Vec<u8>, name: &str, fields: &[(&str, &str)]) -> reqwest::RequestBuilder {
    let mut form = reqwest::multipart::Form::new().part("audio", reqwest::multipart::Part::bytes(file).file_name(name.to_owned()));
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    h.http.post(h.url("/v1/stt/transcribe")).bearer_auth(KEY).multipart(form)
}

#[tokio::test]
async fn transcription_returns_the_transcript_shape() {
    let (h, db) = start_media().await;
    let (s, headers, t) = send(upload(&h, wav(64_000), "hello.wav", &[("model_id", "whisper-1"), ("language", "en")])).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(headers["x-switchyard-provider"], "stt-oa");
    assert_eq!(t["model"], "whisper-1");
    assert_eq!(t["language"], "en");
    assert_eq!(t["duration"], 2.0);
    assert!(!t["text"].as_str().unwrap().is_empty());
    let words = t["words"].as_array().unwrap();
    assert!(!words.is_empty());
    for w in words {
        assert!(w["word"].is_string() && w["start"].as_f64().unwrap() <= w["end"].as_f64().unwrap());
        assert!(w.as_object().unwrap().contains_key("confidence"));
    }
    let up = h.upstream_requests("/p/stt-oa/v1/audio/transcriptions");
    assert_eq!(up.len(), 1);
    // Forcing Deepgram: its confidences come through.
    let (s, headers, t) = send(upload(&h, wav(32_000), "a.wav", &[("model_id", "whisper-1"), ("provider_id", "dg-1")])).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(headers["x-switchyard-provider"], "dg-1");
    assert!((0.0..=1.0).contains(&t["confidence"].as_f64().unwrap()));
    assert!(t["words"][0]["confidence"].as_f64().is_some());
    assert_eq!(t["duration"], 1.0);
    // A forced provider is not failed over.
    h.faults("dg-1", Faults { status: Some(500), ..Faults::default() });
    let (s, headers, e) = send(upload(&h, wav(32_000), "a.wav", &[("model_id", "whisper-1"), ("provider_id", "dg-1")])).await;
    assert_eq!(s, 502, "{e}");
    assert_eq!(headers["x-switchyard-attempts"], "1");
    // Accounting in audio seconds.
    let rows = ledger(&db, 3).await;
    let first = rows.iter().find(|r| r.provider.as_deref() == Some("stt-oa")).unwrap();
    assert_eq!((first.unit.as_deref(), first.units), (Some("audio_seconds"), 2.0));
    assert!((first.cost_usd - 2.0 / 60.0 * 0.006).abs() < 1e-12);
}

#[tokio::test]
async fn transcription_requests_get_each_error_of_the_table() {
    let (h, _db) = start_media().await;
    let (s, _, e) = send(upload(&h, wav(1000), "a.wav", &[("model_id", "whisper-1"), ("provider_id", "el-1")])).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("provider_id"));
    let (s, _, e) = send(upload(&h, wav(1000), "a.wav", &[("model_id", "whisper-1"), ("provider_id", "nobody")])).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("provider_id"));
    let (s, _, e) = send(upload(&h, b"plain text".to_vec(), "notes.txt", &[("model_id", "whisper-1")])).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("audio"));
    let (s, _, e) = send(upload(&h, wav(1000), "a.wav", &[])).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("model_id"));
    let (s, _, e) = send(upload(&h, wav(1000), "a.wav", &[("model_id", "whisper-1"), ("language", "english")])).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("language"));
    let (s, _, e) = send(upload(&h, wav(1000), "a.wav", &[("model_id", "tts-1")])).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", Some("model_id"));
    let (s, _, e) = send(upload(&h, wav(1000), "a.wav", &[("model_id", "nope")])).await;
    assert_eq!(s, 404);
    assert_envelope(&e, "not_found", Some("model_id"));
    let (s, _, e) = send(h.http.post(h.url("/v1/stt/transcribe")).bearer_auth(KEY).json(&json!({"model_id": "whisper-1"}))).await;
    assert_eq!(s, 400);
    assert_envelope(&e, "invalid_input", None);
    // Just over 25 MiB of file, sent whole: 413.
    let (s, _, e) = send(upload(&h, wav(26_214_401), "big.wav", &[("model_id", "whisper-1")])).await;
    assert_eq!(s, 413);
    assert_envelope(&e, "invalid_input", None);
    // Exactly 25 MiB is accepted.
    let (s, _, t) = send(upload(&h, wav(26_214_400), "max.wav", &[("model_id", "whisper-1")])).await;
    assert_eq!(s, 200, "{t}");
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_two_gigabyte_upload_is_refused_early_with_memory_flat() {
    let (h, _db) = start_media().await;
    // Declared: refused from the headers, before a byte of body is read.
    let mut tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /v1/stt/transcribe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 2147483648\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.expect("answered without the body").unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Undeclared (chunked): read only until the limit passes, then refused.
    let before = rss();
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /v1/stt/transcribe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut sent: u64 = 0;
        let part = b"--b\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"big.wav\"\r\nContent-Type: audio/wav\r\n\r\n";
        wr.write_all(head.as_bytes()).await.unwrap();
        wr.write_all(format!("{:x}\r\n", part.len()).as_bytes()).await.unwrap();
        wr.write_all(part).await.unwrap();
        wr.write_all(b"\r\n").await.unwrap();
        let block = vec![0x55u8; 1 << 20];
        // Up to 2 GiB, made as it goes: never held here either.
        while sent < 2 << 30 {
            let frame = [format!("{:x}\r\n", block.len()).as_bytes(), &block, b"\r\n"].concat();
            if wr.write_all(&frame).await.is_err() {
                break;
            }
            sent += block.len() as u64;
        }
        sent
    });
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf)).await.expect("an answer").unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    drop(rd);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let sent = writer.await.unwrap();
    assert!(sent < 512 << 20, "the gateway stopped reading early: {} MiB sent of 2048", sent >> 20);
    let grown = rss().saturating_sub(before);
    assert!(grown < 200 << 20, "memory stayed flat: grew {} MiB", grown >> 20);
}

#[tokio::test]
async fn a_job_running_at_shutdown_is_finished_after_the_restart() {
    let db = temp_db_url();
    let db2 = db.clone();
    let mut first = start_with(move |sim| media_toml(sim, &db2, "30s")).await;
    first.faults("rep-1", Faults { predict_ms: Some(1500), ..Faults::default() });
    let (status, _, g) = send(generate(&first, KEY, json!({"model": "veo-3", "input": {"prompt": "rain", "duration": 2}, "wait": 0}))).await;
    assert_eq!(status, 202);
    let id = g["id"].as_str().unwrap().to_owned();
    for _ in 0..100 {
        let (_, _, g) = send(poll(&first, KEY, &id, "0")).await;
        if g["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A graceful stop puts the job back in the queue rather than leaving it
    // under a 30 s lease...
    first.shutdown();
    first.task.take().unwrap().await.unwrap().unwrap();
    // ...so the restarted gateway runs it at once.
    let config = switchyard::config::Config::parse(&media_toml(&first.sim.url(), &db, "30s"), "restart").unwrap();
    let sim = std::mem::replace(&mut first.sim, switchyard::simulator::spawn(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), std::sync::Arc::new(switchyard::simulator::SimState::new(SEED, Faults::default()))).unwrap());
    let second = start_gateway(sim, config).await;
    let (status, _, g) = send(poll(&second, KEY, &id, "15")).await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["status"], "completed", "{g}");
    assert_eq!(g["usage"]["video_seconds"], 2.0);
}

fn grpc_request<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

#[tokio::test]
async fn the_grpc_surface_carries_generations_and_speech() {
    use switchyard::proto::{
        generations_client::GenerationsClient, speech_client::SpeechClient, CreateGenerationRequest, GenerationInput, GenerationStatus, GetGenerationRequest,
        GetMediaRequest, SynthesizeRequest, TranscribeRequest,
    };
    use tokio_stream::StreamExt;
    let (h, _db) = start_media().await;
    let url = format!("http://{}", h.addr);
    let mut gens = GenerationsClient::connect(url.clone()).await.unwrap();
    let create = CreateGenerationRequest {
        model: "gpt-image-1".into(),
        input: Some(GenerationInput {
            prompt: "a kite".into(),
            ..Default::default()
        }),
        n: Some(1),
        wait_seconds: Some(20.0),
    };
    let g = gens.create(grpc_request(create.clone(), KEY)).await.unwrap().into_inner();
    assert_eq!(g.status, GenerationStatus::Completed as i32);
    assert_eq!(g.media[0].url, format!("/v1/generations/{}/media/0", g.id));
    let media = gens.get_media(grpc_request(GetMediaRequest { id: g.id.clone(), n: 0 }, KEY)).await.unwrap().into_inner();
    assert_eq!(media.content_type, "image/png");
    assert!(media.data.starts_with(b"\x89PNG"));
    let again = gens.get(grpc_request(GetGenerationRequest { id: g.id.clone(), wait_seconds: Some(0.0) }, KEY)).await.unwrap().into_inner();
    assert_eq!(again, g);
    let e = gens.get(grpc_request(GetGenerationRequest { id: g.id.clone(), wait_seconds: None }, CLAUDE_ONLY_KEY)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(e.metadata().get("switchyard-error-code").unwrap(), "not_found");
    let mut bad = create;
    bad.input.as_mut().unwrap().duration = Some(3.0);
    let e = gens.create(grpc_request(bad, KEY)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.metadata().get("switchyard-error-param").unwrap(), "input.duration");

    let mut speech = SpeechClient::connect(url).await.unwrap();
    let resp = speech
        .synthesize(grpc_request(
            SynthesizeRequest {
                model_id: "tts-1".into(),
                text: "hello over grpc".into(),
                format: Some("wav".into()),
                ..Default::default()
            },
            KEY,
        ))
        .await
        .unwrap();
    assert_eq!(resp.metadata().get("x-switchyard-provider").unwrap(), "tts-oa");
    let chunks: Vec<_> = resp.into_inner().collect::<Result<_, _>>().await.unwrap();
    assert_eq!(chunks[0].content_type, "audio/wav");
    assert!(chunks[0].data.starts_with(b"RIFF"));
    assert!(chunks.len() > 1 && chunks[1..].iter().all(|c| c.content_type.is_empty()));

    let upload = |audio: Vec<u8>| TranscribeRequest {
        model_id: "whisper-1".into(),
        audio: audio.into(),
        filename: "clip.wav".into(),
        content_type: "audio/wav".into(),
        language: Some("en".into()),
        provider_id: None,
    };
    let t = speech.transcribe(grpc_request(upload(wav(48_000)), KEY)).await.unwrap().into_inner();
    assert_eq!((t.model.as_str(), t.language.as_deref(), t.duration), ("whisper-1", Some("en"), Some(1.5)));
    assert!(!t.text.is_empty() && !t.words.unwrap().words.is_empty());
    let e = speech.transcribe(grpc_request(upload(wav(26_214_401)), KEY)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.metadata().get("switchyard-error-code").unwrap(), "invalid_input");
}

#[tokio::test]
async fn a_generation_is_traced_in_the_trace_of_the_request_that_created_it() {
    use common::otlp::*;
    let (endpoint, collected) = collector().await;
    let db = temp_db_url();
    let h = start_with(move |sim| media_toml(sim, &db, "30s").replace("[generations]", &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n\n[generations]"))).await;
    h.faults("rep-1", Faults { status: Some(500), ..Faults::default() });
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let resp = generate(&h, KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "x"}}))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = collected.spans.lock().unwrap().iter().filter(|s| hex(&s.trace_id) == trace_id).cloned().collect::<Vec<_>>();
        if spans.iter().filter(|s| s.name.starts_with("generate_content")).count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job = spans.iter().find(|s| s.name == "generation flux-1.1-pro").expect("the job's span, in the creating request's trace");
    let attempts: Vec<&Span> = spans.iter().filter(|s| s.name == "generate_content black-forest-labs/flux-1.1-pro").collect();
    assert_eq!(attempts.len(), 2, "one span per provider attempt: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    let providers: Vec<String> = attempts.iter().map(|s| attr_str(s, "switchyard.provider.id").unwrap()).collect();
    assert!(providers.contains(&"rep-1".to_owned()) && providers.contains(&"rep-2".to_owned()), "{providers:?}");
    assert!(attempts.iter().all(|s| s.parent_span_id == job.span_id));
    assert!(attempts.iter().all(|s| attr_str(s, "gen_ai.operation.name").as_deref() == Some("generate_content")));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_client_leaving_mid_speech_stops_the_upstream() {
    let (h, _db) = start_media().await;
    h.faults("tts-oa", Faults { chunk_delay_ms: Some(200), ..Faults::default() });
    let mut resp = h
        .http
        .post(h.url("/v1/tts/synthesize"))
        .bearer_auth(KEY)
        .json(&json!({"model_id": "tts-1", "text": "a long text to speak slowly ".repeat(8)}))
        .send()
        .await
        .unwrap();
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    let sim = h.sim.state.clone();
    for _ in 0..100 {
        if sim.stats().streams_cancelled >= 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the simulator's audio stream was not abandoned: {:?}", sim.stats());
}

#[tokio::test]
async fn speech_endpoints_share_the_key_budget_limit_and_method_errors() {
    let (h, _db) = start_media().await;
    let tts = |key: &str| h.http.post(h.url("/v1/tts/synthesize")).bearer_auth(key).json(&json!({"model_id": "tts-1", "text": "hi"}));
    let stt = |key: &str| {
        let form = reqwest::multipart::Form::new()
            .part("audio", reqwest::multipart::Part::bytes(wav(1000)).file_name("a.wav"))
            .text("model_id", "whisper-1");
        h.http.post(h.url("/v1/stt/transcribe")).bearer_auth(key).multipart(form)
    };
    for (name, req) in [("tts", tts("ze_not_a_key_at_all")), ("stt", stt("ze_not_a_key_at_all"))] {
        let (s, _, e) = send(req).await;
        assert_eq!(s, 401, "{name}");
        assert_envelope(&e, "unauthenticated", None);
    }
    for (name, req) in [("tts", tts(CLAUDE_ONLY_KEY)), ("stt", stt(CLAUDE_ONLY_KEY))] {
        let (s, _, e) = send(req).await;
        assert_eq!(s, 403, "{name}");
        assert_envelope(&e, "permission_denied", None);
    }
    for (name, req) in [("tts", tts(POOR_KEY)), ("stt", stt(POOR_KEY))] {
        let (s, _, e) = send(req).await;
        assert_eq!(s, 402, "{name}");
        assert_envelope(&e, "insufficient_quota", None);
    }
    // Two a minute across both endpoints: the third is refused.
    let first = tts(LIMITED_KEY).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit"], "2");
    let _ = first.bytes().await;
    assert_eq!(stt(LIMITED_KEY).send().await.unwrap().status(), 200);
    let (s, headers, e) = send(tts(LIMITED_KEY)).await;
    assert_eq!(s, 429);
    assert_envelope(&e, "rate_limited", None);
    assert!(headers.contains_key("retry-after"));
    for path in ["/v1/tts/synthesize", "/v1/stt/transcribe"] {
        let resp = h.http.get(h.url(path)).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(resp.status(), 405, "{path}");
        assert!(resp.headers()["allow"].to_str().unwrap().contains("POST"));
    }
}

#[tokio::test]
async fn a_generation_honours_the_clients_deadline_and_failover_off() {
    let (h, _db) = start_media().await;
    // The client's deadline bounds the wait: the job runs on, the answer is 202.
    h.faults("rep-2", Faults { predict_ms: Some(3000), ..Faults::default() });
    h.faults("rep-1", Faults { status: Some(500), ..Faults::default() });
    let resp = generate(&h, KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "x"}, "wait": 30}))
        .header("x-switchyard-timeout-ms", "300")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "the 300 ms deadline ended the wait, not the job");
    // Failover off (a fresh gateway, so the job above cannot interfere): with
    // both providers failing, one attempt, then the job fails.
    let (h, _db) = start_media().await;
    h.faults("rep-1", Faults { status: Some(503), ..Faults::default() });
    h.faults("rep-2", Faults { status: Some(503), ..Faults::default() });
    let (s, _, g) = send(
        generate(&h, KEY, json!({"model": "flux-1.1-pro", "input": {"prompt": "y"}})).header("x-switchyard-failover", "off"),
    )
    .await;
    assert_eq!(s, 200, "{g}");
    assert_eq!(g["status"], "failed");
    assert_eq!(g["error"]["code"], "provider_unavailable");
    let tried = h.upstream_requests("/p/rep-1/v1/predictions").len() + h.upstream_requests("/p/rep-2/v1/predictions").len();
    assert_eq!(tried, 1, "one attempt, no failover");
}
