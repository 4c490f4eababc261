//! The provider simulator (`switchyard simulate`): fake providers that speak
//! the real wire formats over real HTTP, so tests, the demo and benchmarks
//! exchange real bytes with the gateway.
//!
//! One port serves every kind: OpenAI `POST /v1/chat/completions` and
//! Anthropic `POST /v1/messages`, sync and SSE. Answers are deterministic:
//! the reply to a conversation is a fixed sequence of words derived from the
//! seed and the prompt, so a conversation handed over mid-answer (an
//! assistant prefill) is continued exactly where it stopped.
//!
//! Media kinds, in the vendors' own wire formats:
//!
//! - OpenAI images, `POST /v1/images/generations`: PNGs of the requested
//!   size (a solid colour drawn from the prompt), inline as `b64_json` or,
//!   with `response_format: "url"`, as links to `GET /_sim/media/{token}`.
//! - OpenAI speech, `POST /v1/audio/speech`: audio streamed in 1 KiB chunks
//!   (one per 16 characters of input, at least 4), starting with the
//!   format's magic bytes.
//! - OpenAI transcriptions, `POST /v1/audio/transcriptions` (multipart):
//!   `json`, `verbose_json` (segments, and words on request), `text`, `srt`,
//!   `vtt`. The transcript is derived from the audio bytes' SHA-256, and its
//!   duration is bytes / 32000 s (16 kHz 16-bit mono).
//! - Replicate predictions, `POST /v1/predictions` (and
//!   `POST /v1/models/{owner}/{name}/predictions`), polled with
//!   `GET /v1/predictions/{id}` and cancelled with
//!   `POST /v1/predictions/{id}/cancel`. A prediction whose version contains
//!   `video`, or whose input has `duration`, makes one video (an MP4 URL);
//!   any other makes `num_outputs` images (a list of PNG URLs).
//! - ElevenLabs text to speech, `POST /v1/text-to-speech/{voice_id}` and
//!   `.../stream`, audio streamed like OpenAI speech.
//! - Deepgram pre-recorded transcription, `POST /v1/listen` with the raw
//!   audio as the body: the same transcript as OpenAI's.
//!
//! Every kind is served at the bare path and under `/p/{name}` and
//! `/f/{spec}`, honours the same faults, and is recorded; a binary or
//! multipart body is recorded as a summary (`{"bytes": N, ...}`) and the
//! query string in `query`. Media URLs (`/_sim/media/...`) are stateless:
//! the token says what to serve.
//!
//! Faults ([`Faults`]) come from four layers, later ones winning: the
//! process profile (`--profile`), a named set (`/p/{name}/...`, changeable
//! at run time), an inline set in the path (`/f/status=500,latency_ms=50/...`)
//! and `x-sim-*` request headers. A provider in a gateway config points its
//! `base_url` at a prefix, so one simulator can play many providers that
//! behave differently.
//!
//! Audio streams count each chunk as a content event: `chunk_delay_ms`
//! delays every chunk, and `reset_after`, `stall_after` and
//! `malformed_after` count chunks, 0 meaning right after the headers.
//! Replicate predictions take `predict_ms` to run (default 200) and end
//! `failed` with `predict_fail=true`.
//!
//! It reports what it received (`GET /_sim/requests`) and what happened to
//! its streams (`GET /_sim/stats`), so tests can assert on the exact upstream
//! request and on a stream the gateway abandoned.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, Path, Request, State},
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post, put, MethodRouter},
    Json, Router,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;

mod anthropic;
mod audio;
mod deepgram;
mod elevenlabs;
mod images;
mod media;
mod openai;
mod replicate;

use crate::routing::stream::CONTINUE_INSTRUCTION;

/// Misbehaviour to inject. Every field is optional so layers can override
/// one another field by field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Delay before the response starts (time to first byte).
    pub latency_ms: Option<u64>,
    /// Delay before each content event.
    pub chunk_delay_ms: Option<u64>,
    /// Answer with this HTTP error status.
    pub status: Option<u16>,
    /// `Retry-After` seconds sent with `status`.
    pub retry_after: Option<u64>,
    /// Close the connection before any response.
    pub hangup: Option<bool>,
    /// Reset the connection after this many content events. For a stream,
    /// 0 means after the preamble (headers and role / message_start events
    /// are sent); for a sync answer, before the response.
    pub reset_after: Option<u32>,
    /// Go silent, connection open, after this many content events (0, as
    /// for `reset_after`).
    pub stall_after: Option<u32>,
    /// Send an unparseable event (or body) after this many content events.
    pub malformed_after: Option<u32>,
    /// Fail this fraction of requests with a 500, drawn from the seed.
    pub fail_rate: Option<f64>,
    /// Words in each answer.
    pub tokens: Option<u32>,
    /// Prompt tokens reported as served from cache.
    pub cached_tokens: Option<u32>,
    /// How long a Replicate prediction runs before it ends (default 200).
    pub predict_ms: Option<u64>,
    /// End Replicate predictions `failed` instead of `succeeded`.
    pub predict_fail: Option<bool>,
}

impl Faults {
    /// Overrides the fields `other` sets.
    pub fn merge(&mut self, other: &Faults) {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f.clone(); } )* };
        }
        take!(latency_ms, chunk_delay_ms, status, retry_after, hangup, reset_after, stall_after, malformed_after, fail_rate, tokens, cached_tokens, predict_ms, predict_fail);
    }

    /// Parses `key=value,key=value` (path segments and headers).
    pub fn parse_inline(spec: &str) -> Result<Faults, String> {
        let mut obj = serde_json::Map::new();
        for pair in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("expected key=value, got {pair:?}"))?;
            let v: Value = match v {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => v.parse::<u64>().map(Value::from).or_else(|_| v.parse::<f64>().map(Value::from)).map_err(|_| format!("{k}: not a number: {v:?}"))?,
            };
            obj.insert(k.to_owned(), v);
        }
        serde_json::from_value(Value::Object(obj)).map_err(|e| e.to_string())
    }

    fn from_headers(h: &HeaderMap) -> Result<Faults, String> {
        let spec: Vec<String> = h
            .iter()
            .filter_map(|(k, v)| {
                let k = k.as_str().strip_prefix("x-sim-")?;
                Some(format!("{}={}", k.replace('-', "_"), v.to_str().ok()?))
            })
            .collect();
        Faults::parse_inline(&spec.join(","))
    }

    /// A named process profile for `--profile`.
    pub fn profile(name: &str) -> Option<Faults> {
        Some(match name {
            "default" | "fast" => Faults::default(),
            "realistic" => Faults {
                latency_ms: Some(200),
                chunk_delay_ms: Some(20),
                ..Default::default()
            },
            "slow" => Faults {
                latency_ms: Some(1500),
                chunk_delay_ms: Some(100),
                ..Default::default()
            },
            "flaky" => Faults {
                fail_rate: Some(0.3),
                ..Default::default()
            },
            _ => return None,
        })
    }
}

/// One request as the simulator received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub path: String,
    /// The query string, if the request had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body: Value,
}

/// What happened to streams, for tests that check a client's departure
/// reached the provider.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub streams_started: u64,
    pub streams_completed: u64,
    /// Streams whose reader went away before the end.
    pub streams_cancelled: u64,
    /// Requests that came over HTTP/2.
    #[serde(default)]
    pub http2_requests: u64,
}

/// How many recorded requests are kept (oldest dropped first).
const MAX_RECORDED: usize = 512;

pub struct SimState {
    seed: u64,
    profile: Faults,
    draws: AtomicU64,
    named: Mutex<HashMap<String, Faults>>,
    recorded: Mutex<VecDeque<Recorded>>,
    requests: AtomicU64,
    http2_requests: AtomicU64,
    streams_started: AtomicU64,
    streams_completed: AtomicU64,
    streams_cancelled: AtomicU64,
    /// The listener's address, for absolute URLs when a request has no Host.
    addr: OnceLock<SocketAddr>,
    predictions: Mutex<replicate::Predictions>,
}

impl SimState {
    pub fn new(seed: u64, profile: Faults) -> Self {
        SimState {
            seed,
            profile,
            draws: AtomicU64::new(0),
            named: Mutex::default(),
            recorded: Mutex::default(),
            requests: AtomicU64::new(0),
            http2_requests: AtomicU64::new(0),
            streams_started: AtomicU64::new(0),
            streams_completed: AtomicU64::new(0),
            streams_cancelled: AtomicU64::new(0),
            addr: OnceLock::new(),
            predictions: Mutex::default(),
        }
    }

    /// Sets (or with `Faults::default()`, clears) the faults of `/p/{name}`.
    pub fn set_faults(&self, name: &str, faults: Faults) {
        if let Ok(mut m) = self.named.lock() {
            m.insert(name.to_owned(), faults);
        }
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            requests: self.requests.load(Ordering::SeqCst),
            streams_started: self.streams_started.load(Ordering::SeqCst),
            streams_completed: self.streams_completed.load(Ordering::SeqCst),
            streams_cancelled: self.streams_cancelled.load(Ordering::SeqCst),
            http2_requests: self.http2_requests.load(Ordering::SeqCst),
        }
    }

    /// Records a request; `path` may carry its query (`/v1/listen?model=x`).
    fn record(&self, path: &str, headers: &HeaderMap, body: &Value) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (path, None),
        };
        let headers = headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        if let Ok(mut r) = self.recorded.lock() {
            if r.len() == MAX_RECORDED {
                r.pop_front();
            }
            r.push_back(Recorded {
                path: path.to_owned(),
                query,
                headers,
                body: body.clone(),
            });
        }
    }

    /// The next draw in `[0, 1)` of the seeded sequence.
    fn draw(&self) -> f64 {
        let n = self.draws.fetch_add(1, Ordering::SeqCst);
        (splitmix64(self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn faults_for(&self, prefix: &Prefix, headers: &HeaderMap) -> Result<Faults, String> {
        let mut f = self.profile.clone();
        match prefix {
            Prefix::None => {}
            Prefix::Named(name) => {
                if let Some(n) = self.named.lock().ok().and_then(|m| m.get(name).cloned()) {
                    f.merge(&n);
                }
            }
            Prefix::Inline(spec) => f.merge(&Faults::parse_inline(spec)?),
        }
        f.merge(&Faults::from_headers(headers)?);
        Ok(f)
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

enum Prefix {
    None,
    Named(String),
    Inline(String),
}

/// Marks a response the connection layer must turn into a reset.
#[derive(Clone, Copy)]
struct ResetConnection;

/// The words answers are made of.
const WORDS: &[&str] = &[
    "the", "gateway", "routes", "every", "request", "to", "a", "healthy", "provider", "and", "streams", "tokens", "back", "while",
    "scoring", "latency", "throughput", "errors", "with", "care", "so", "clients", "see", "one", "clean", "answer", "from", "many",
    "models", "in", "order", "quickly",
];

/// The full deterministic answer for a conversation: `n` words.
pub fn answer_words(seed: u64, prompt: &str, n: u32) -> Vec<&'static str> {
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in prompt.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    (0..u64::from(n)).map(|i| WORDS[(splitmix64(h ^ i) % WORDS.len() as u64) as usize]).collect()
}

/// Joins words as the answer text: words separated by single spaces.
fn join_from(words: &[&str], start: usize) -> Vec<String> {
    words
        .iter()
        .enumerate()
        .skip(start)
        .map(|(i, w)| if i == 0 { (*w).to_owned() } else { format!(" {w}") })
        .collect()
}

/// What a conversation asks of the simulator, independent of wire format.
pub(crate) struct Ask {
    /// The text the answer is derived from (everything but a trailing
    /// assistant prefill).
    pub prompt: String,
    /// A trailing assistant message: the answer so far, to be continued.
    pub prefill: String,
    pub prompt_tokens: u32,
    /// The tool to call instead of answering, with the last user text.
    pub tool: Option<(String, String)>,
    pub max_tokens: Option<u32>,
}

/// The planned answer: the text pieces still to send, or a tool call.
pub(crate) struct Plan {
    pub pieces: Vec<String>,
    pub tool: Option<(String, String)>,
    pub truncated: bool,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
}

fn plan(seed: u64, ask: &Ask, faults: &Faults) -> Plan {
    let n = faults.tokens.unwrap_or(16);
    let words = answer_words(seed, &ask.prompt, n);
    // The prefill is the answer so far: count its words and carry on.
    let done = ask.prefill.split_whitespace().count().min(words.len());
    let mut pieces = join_from(&words, done);
    let mut truncated = false;
    if let Some(max) = ask.max_tokens {
        if pieces.len() > max as usize {
            pieces.truncate(max as usize);
            truncated = true;
        }
    }
    let completion_tokens = if ask.tool.is_some() { 8 } else { pieces.len() as u32 };
    Plan {
        tool: ask.tool.clone(),
        pieces: if ask.tool.is_some() { vec![] } else { pieces },
        truncated,
        prompt_tokens: ask.prompt_tokens,
        completion_tokens,
        cached_tokens: faults.cached_tokens.unwrap_or(0).min(ask.prompt_tokens),
    }
}

/// A rough token count: words.
pub(crate) fn count_tokens(s: &str) -> u32 {
    s.split_whitespace().count() as u32
}

/// One frame of a streamed answer.
pub(crate) struct Frame {
    pub bytes: Bytes,
    /// Content frames are the ones faults count.
    pub content: bool,
}

impl Frame {
    pub fn preamble(bytes: impl Into<Bytes>) -> Frame {
        Frame {
            bytes: bytes.into(),
            content: false,
        }
    }

    pub fn content(bytes: impl Into<Bytes>) -> Frame {
        Frame {
            bytes: bytes.into(),
            content: true,
        }
    }
}

/// Counts a stream as completed or cancelled when it is dropped.
struct StreamGuard {
    state: Arc<SimState>,
    completed: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let counter = if self.completed {
            &self.state.streams_completed
        } else {
            &self.state.streams_cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// Streams frames with the configured delays and faults applied.
fn stream_frames(state: Arc<SimState>, frames: Vec<Frame>, faults: Faults, malformed: &'static [u8]) -> Response {
    state.streams_started.fetch_add(1, Ordering::SeqCst);
    let guard = StreamGuard { state, completed: false };
    let delay = Duration::from_millis(faults.chunk_delay_ms.unwrap_or(0));
    let s = futures_util::stream::unfold((frames.into_iter(), 0u32, guard, false), move |(mut frames, sent, mut guard, done)| {
        let faults = faults.clone();
        async move {
            if done {
                return None;
            }
            let Some(frame) = frames.next() else {
                guard.completed = true;
                drop(guard);
                return None;
            };
            if frame.content {
                if faults.reset_after == Some(sent) {
                    // Let what was sent reach the client first, as it would
                    // from a provider that flushes every event.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return Some((Err(std::io::Error::other("simulated reset")), (frames, sent, guard, true)));
                }
                if faults.stall_after == Some(sent) {
                    std::future::pending::<()>().await;
                }
                if faults.malformed_after == Some(sent) {
                    return Some((Ok(Bytes::from_static(malformed)), (frames, sent, guard, false)));
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
            let sent = sent + u32::from(frame.content);
            Some((Ok(frame.bytes), (frames, sent, guard, false)))
        }
    });
    let mut resp = Response::new(Body::from_stream(s));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    resp
}

/// What every handler does first: read the prefix's faults, record the
/// request, wait the latency, and answer the injected error if any. Returns
/// the faults for the handler to apply to its answer.
async fn preflight(state: &Arc<SimState>, prefix: Prefix, path: &str, headers: &HeaderMap, body: &Value, error_body: fn(u16) -> Value) -> Result<Faults, Response> {
    let streaming = body.get("stream").and_then(Value::as_bool) == Some(true);
    preflight_as(state, prefix, path, headers, body, streaming, error_body).await
}

/// [`preflight`] for an answer that streams (or not) whatever its body says,
/// such as audio, which always streams. `body` is what is recorded.
async fn preflight_as(
    state: &Arc<SimState>,
    prefix: Prefix,
    path: &str,
    headers: &HeaderMap,
    body: &Value,
    streaming: bool,
    error_body: fn(u16) -> Value,
) -> Result<Faults, Response> {
    let faults = state.faults_for(&prefix, headers).map_err(|e| (StatusCode::BAD_REQUEST, format!("bad simulator faults: {e}")).into_response())?;
    state.record(path, headers, body);
    if let Some(ms) = faults.latency_ms.filter(|&ms| ms > 0) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // Streams fail at their first content event (after the preamble); a
    // sync answer has no preamble, so it fails before the response.
    if faults.hangup == Some(true) || (!streaming && faults.reset_after == Some(0)) {
        let mut r = Response::new(Body::empty());
        r.extensions_mut().insert(ResetConnection);
        return Err(r);
    }
    if !streaming && faults.stall_after == Some(0) {
        std::future::pending::<()>().await;
    }
    let failed = faults.fail_rate.is_some_and(|rate| state.draw() < rate);
    let status = faults.status.or(failed.then_some(500));
    if let Some(code) = status {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (code, Json(error_body(code.as_u16()))).into_response();
        if let Some(s) = faults.retry_after {
            r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(s));
        }
        return Err(r);
    }
    Ok(faults)
}

/// A sync answer with the faults that apply to a whole body.
fn sync_response(body: Value, faults: &Faults) -> Response {
    sync_bytes(body.to_string().into(), "application/json", faults)
}

/// A sync answer of any type with the faults that apply to a whole body.
fn sync_bytes(body: Bytes, content_type: &'static str, faults: &Faults) -> Response {
    if faults.malformed_after.is_some() {
        return ([(http::header::CONTENT_TYPE, content_type)], "{\"id\": \"broken").into_response();
    }
    if faults.reset_after.is_some() || faults.stall_after.is_some() {
        // Headers, half a body, then the fault.
        let half = body.slice(..body.len() / 2);
        let reset = faults.reset_after.is_some();
        let s = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(half)]).chain(futures_util::stream::once(async move {
            if !reset {
                std::future::pending::<()>().await;
            }
            Err(std::io::Error::other("simulated reset"))
        }));
        let mut r = Response::new(Body::from_stream(s));
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        return r;
    }
    ([(http::header::CONTENT_TYPE, content_type)], body).into_response()
}

use futures_util::StreamExt;

async fn parse_body(req: Request) -> Result<(HeaderMap, Value), Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 32 * 1024 * 1024)
        .await
        .map_err(|_| (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response())?;
    let v = serde_json::from_slice(&bytes).map_err(|e| {
        (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": {"message": format!("invalid JSON: {e}"), "type": "invalid_request_error"}}))).into_response()
    })?;
    Ok((parts.headers, v))
}

/// The most a media request may send (audio uploads, mostly).
const MAX_MEDIA_BODY: usize = 64 * 1024 * 1024;

/// Reads a whole body, at most `limit` bytes.
async fn read_body(req: Request, limit: usize) -> Result<(http::request::Parts, Bytes), Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response())?;
    Ok((parts, bytes))
}

/// The fault prefix of a route served by [`served`], from its path captures.
fn prefix_of(params: &HashMap<String, String>) -> Prefix {
    if let Some(name) = params.get("name") {
        Prefix::Named(name.clone())
    } else if let Some(spec) = params.get("spec") {
        Prefix::Inline(spec.clone())
    } else {
        Prefix::None
    }
}

/// The path with its query, as recorded.
fn path_and_query(uri: &Uri) -> String {
    uri.path_and_query().map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned())
}

/// The raw `/p/{name}` or `/f/{spec}` a request came in under ("" for none).
fn raw_prefix(uri: &Uri, prefix: &Prefix) -> String {
    match prefix {
        Prefix::None => String::new(),
        _ => uri.path().split('/').take(3).collect::<Vec<_>>().join("/"),
    }
}

/// `http://host:port` as the client reached the simulator, for absolute
/// URLs in answers: the Host header, the URI's authority (HTTP/2), or the
/// listener's own address.
fn origin(state: &SimState, uri: &Uri, headers: &HeaderMap) -> String {
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
        .or_else(|| state.addr.get().map(SocketAddr::to_string))
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    format!("http://{host}")
}

/// Serves `route` at `path` and under both fault prefixes, `/p/{name}` and
/// `/f/{spec}`; the handler finds which with [`prefix_of`].
fn served(router: Router<Arc<SimState>>, path: &str, route: MethodRouter<Arc<SimState>>) -> Router<Arc<SimState>> {
    router
        .route(path, route.clone())
        .route(&format!("/p/{{name}}{path}"), route.clone())
        .route(&format!("/f/{{spec}}{path}"), route)
}

/// The simulator's routes.
pub fn app(state: Arc<SimState>) -> Router {
    let mut kinds = Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/messages", post(anthropic::messages));
    for (path, route) in [
        ("/v1/images/generations", post(images::generations)),
        ("/v1/audio/speech", post(audio::speech)),
        ("/v1/audio/transcriptions", post(audio::transcriptions).layer(DefaultBodyLimit::max(MAX_MEDIA_BODY))),
        ("/v1/predictions", post(replicate::create)),
        ("/v1/models/{owner}/{model}/predictions", post(replicate::create)),
        ("/v1/predictions/{id}", get(replicate::get)),
        ("/v1/predictions/{id}/cancel", post(replicate::cancel)),
        ("/v1/text-to-speech/{voice_id}", post(elevenlabs::tts)),
        ("/v1/text-to-speech/{voice_id}/stream", post(elevenlabs::tts)),
        ("/v1/listen", post(deepgram::listen)),
    ] {
        kinds = served(kinds, path, route);
    }
    let named = Router::new()
        .route("/p/{name}/v1/chat/completions", post(openai::chat_named))
        .route("/p/{name}/v1/messages", post(anthropic::messages_named))
        .route("/f/{spec}/v1/chat/completions", post(openai::chat_inline))
        .route("/f/{spec}/v1/messages", post(anthropic::messages_inline));
    Router::new()
        .merge(kinds)
        .merge(named)
        .route("/_sim/requests", get(|State(s): State<Arc<SimState>>| async move { Json(s.recorded()) }))
        .route("/_sim/stats", get(|State(s): State<Arc<SimState>>| async move { Json(s.stats()) }))
        .route("/_sim/media/{token}", get(media::serve))
        .route(
            "/_sim/faults/{name}",
            put(|State(s): State<Arc<SimState>>, Path(name): Path<String>, Json(f): Json<Faults>| async move {
                s.set_faults(&name, f);
                StatusCode::NO_CONTENT
            }),
        )
        .with_state(state)
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub state: Arc<SimState>,
    task: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    /// `http://127.0.0.1:port`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a simulator on `listener` in the background.
pub fn spawn(listener: TcpListener, state: Arc<SimState>) -> std::io::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let _ = state.addr.set(addr);
    let task = tokio::spawn(run(listener, state.clone()));
    Ok(SimHandle { addr, state, task })
}

/// Serves the simulator until the task is dropped. Its own accept loop, so
/// that a handler can reset the connection (hyper closes a connection whose
/// service fails), which axum's server does not allow.
pub async fn run(listener: TcpListener, state: Arc<SimState>) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
    };
    use tower::ServiceExt;
    if let Ok(addr) = listener.local_addr() {
        let _ = state.addr.set(addr);
    }
    let app = app(state.clone());
    // HTTP/1.1 and h2c. A real provider caps streams per HTTP/2 connection
    // (100 to 256); this one does not, so one gateway connection can carry
    // a benchmark's 10,000 streams.
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http2().max_concurrent_streams(None);
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let (app, http, state) = (app.clone(), http.clone(), state.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                if req.version() == hyper::Version::HTTP_2 {
                    state.http2_requests.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    let resp = app.oneshot(req.map(Body::new)).await.unwrap_or_else(|e: Infallible| match e {});
                    if resp.extensions().get::<ResetConnection>().is_some() {
                        return Err(std::io::Error::other("simulated reset"));
                    }
                    Ok::<_, std::io::Error>(resp)
                }
            });
            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

/// A simulator on a free port with no faults and seed 1, for tests.
#[cfg(test)]
pub(crate) async fn test_sim() -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    spawn(listener, Arc::new(SimState::new(1, Faults::default())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_deterministic_and_continuable() {
        let a = answer_words(7, "hello", 10);
        assert_eq!(a, answer_words(7, "hello", 10));
        assert_ne!(a, answer_words(8, "hello", 10));
        let ask = Ask {
            prompt: "hello".into(),
            prefill: join_from(&a, 0)[..4].concat(),
            prompt_tokens: 1,
            tool: None,
            max_tokens: None,
        };
        let p = plan(7, &ask, &Faults { tokens: Some(10), ..Default::default() });
        let whole = format!("{}{}", ask.prefill, p.pieces.concat());
        assert_eq!(whole, join_from(&a, 0).concat());
    }

    #[test]
    fn faults_layer_field_by_field() {
        let mut f = Faults::parse_inline("status=503,retry_after=2").unwrap();
        f.merge(&Faults::parse_inline("latency_ms=5").unwrap());
        assert_eq!(f.status, Some(503));
        assert_eq!(f.latency_ms, Some(5));
        assert!(Faults::parse_inline("bogus=1").is_err());
    }

    #[test]
    fn fail_rate_draws_are_seeded() {
        let a = SimState::new(42, Faults::default());
        let b = SimState::new(42, Faults::default());
        let xs: Vec<f64> = (0..20).map(|_| a.draw()).collect();
        let ys: Vec<f64> = (0..20).map(|_| b.draw()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
    }
}
