//! Provider adapters: one file per upstream wire format, each translating
//! proto messages to that provider's API and its answers back.
//!
//! An adapter does one attempt and classifies its failure
//! ([`UpstreamError`]); it never retries, waits out timeouts or picks
//! another provider — that is the router's job. Adapters never put their
//! credentials in an error, a log line or a span.

use std::{pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::{
    config::{ProviderConfig, ProviderKind, Secret, UpstreamProtocol},
    error::{UpstreamError, UpstreamErrorKind},
    proto::{ChatChunk, ChatCompletion, ChatRequest},
};

pub mod anthropic;
pub mod client;
pub mod deepgram;
pub mod elevenlabs;
pub mod openai;
pub mod replicate;
pub mod sse;

/// The chunks of one upstream stream, already in proto form.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, UpstreamError>> + Send>>;

/// What an adapter needs to know about the route it is called on.
#[derive(Debug, Clone)]
pub struct RouteCall<'a> {
    pub upstream_model: &'a str,
    /// Sent to providers that require a limit when the client gave none.
    pub max_output_tokens: u32,
    /// The attempt span's W3C trace context, propagated upstream.
    pub traceparent: Option<&'a str>,
}

#[async_trait::async_trait]
pub trait ChatAdapter: Send + Sync + 'static {
    /// One whole answer.
    async fn complete(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChatCompletion, UpstreamError>;

    /// Starts a stream. Resolves once the upstream accepted the request (its
    /// status and headers arrived); the chunks follow on the stream.
    async fn stream(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChunkStream, UpstreamError>;
}

/// An image or video generation, validated, as every adapter receives it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationSpec {
    pub video: bool,
    pub prompt: String,
    #[serde(default)]
    pub image_urls: Vec<String>,
    /// `W:H`.
    pub aspect_ratio: Option<String>,
    /// `WxH`.
    pub size: Option<String>,
    /// Seconds (video).
    pub duration: Option<f64>,
    /// `720p` or `1080p` (video).
    pub resolution: Option<String>,
    pub seed: Option<i64>,
    pub negative_prompt: Option<String>,
    /// Images wanted (1 for video).
    pub n: u32,
}

/// Where a generated medium is.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaData {
    /// The provider's URL, passed through to the client.
    Url(String),
    /// Bytes the provider returned inline; the gateway keeps and serves them.
    Bytes(Bytes),
}

/// One generated image or video.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedMedia {
    pub data: MediaData,
    /// `true` for a video, `false` for an image.
    pub video: bool,
    pub content_type: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Seconds (video).
    pub duration: Option<f64>,
}

/// Image and video generation: `openai` images, `replicate` predictions.
#[async_trait::async_trait]
pub trait GenerateAdapter: Send + Sync + 'static {
    /// Runs one generation to its end on this provider (creating it and,
    /// for an asynchronous API, polling it), or fails.
    async fn generate(&self, spec: &GenerationSpec, route: &RouteCall<'_>) -> Result<Vec<GeneratedMedia>, UpstreamError>;
}

/// Audio formats a TTS request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    Mp3,
    Wav,
    Opus,
    Flac,
    Aac,
}

impl AudioFormat {
    pub const ALL: [AudioFormat; 5] = [AudioFormat::Mp3, AudioFormat::Wav, AudioFormat::Opus, AudioFormat::Flac, AudioFormat::Aac];

    pub fn as_str(self) -> &'static str {
        match self {
            AudioFormat::Mp3 => "mp3",
            AudioFormat::Wav => "wav",
            AudioFormat::Opus => "opus",
            AudioFormat::Flac => "flac",
            AudioFormat::Aac => "aac",
        }
    }

    pub fn parse(s: &str) -> Option<AudioFormat> {
        AudioFormat::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// The response `Content-Type` (opus is Ogg Opus).
    pub fn content_type(self) -> &'static str {
        match self {
            AudioFormat::Mp3 => "audio/mpeg",
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Opus => "audio/opus",
            AudioFormat::Flac => "audio/flac",
            AudioFormat::Aac => "audio/aac",
        }
    }
}

/// A text-to-speech request, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechSpec {
    pub text: String,
    /// The request's voice, else the model's `default_voice`.
    pub voice: String,
    pub format: AudioFormat,
    /// Hz.
    pub sample_rate: u32,
    pub speed: f64,
}

/// Raw bytes as they arrive from upstream.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// Text to speech: `openai` `/audio/speech`, `elevenlabs` `/v1/text-to-speech`.
#[async_trait::async_trait]
pub trait TtsAdapter: Send + Sync + 'static {
    /// Whether this provider can produce `format` at `sample_rate`; one
    /// that cannot is skipped by the router.
    fn supports(&self, format: AudioFormat, sample_rate: u32) -> bool;

    /// Starts synthesis. Resolves once the upstream accepted the request;
    /// the audio follows on the stream as the provider produces it.
    async fn synthesize(&self, spec: &SpeechSpec, route: &RouteCall<'_>) -> Result<ByteStream, UpstreamError>;
}

/// An uploaded audio file to transcribe.
#[derive(Debug, Clone)]
pub struct AudioUpload {
    pub bytes: Bytes,
    pub filename: String,
    pub content_type: String,
    /// ISO-639-1 hint.
    pub language: Option<String>,
}

/// One transcribed word; times in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    pub word: String,
    pub start: f64,
    pub end: f64,
    pub confidence: Option<f64>,
}

/// A transcript in the gateway's shape (API.md, speech-to-text).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transcript {
    pub text: String,
    /// Seconds of audio, as the provider reports it.
    pub duration: Option<f64>,
    /// ISO-639-1.
    pub language: Option<String>,
    pub confidence: Option<f64>,
    pub words: Option<Vec<Word>>,
}

/// Speech to text: `openai` `/audio/transcriptions`, `deepgram` `/v1/listen`.
#[async_trait::async_trait]
pub trait SttAdapter: Send + Sync + 'static {
    async fn transcribe(&self, audio: &AudioUpload, route: &RouteCall<'_>) -> Result<Transcript, UpstreamError>;
}

/// A provider's adapters, one per modality its kind serves.
#[derive(Clone, Default)]
pub struct Adapters {
    pub chat: Option<Arc<dyn ChatAdapter>>,
    pub generate: Option<Arc<dyn GenerateAdapter>>,
    pub tts: Option<Arc<dyn TtsAdapter>>,
    pub stt: Option<Arc<dyn SttAdapter>>,
}

/// Builds every adapter a provider's kind has.
pub fn adapters(config: &ProviderConfig, clients: &Clients) -> Adapters {
    let upstream = Upstream {
        id: config.id.clone(),
        base_url: config.base_url.trim_end_matches('/').to_owned(),
        api_key: config.api_key.clone(),
        http: clients.for_protocol(config.protocol).clone(),
        chat: clients.chat_for_protocol(config.protocol).clone(),
        timeout: config.timeout,
    };
    match config.kind {
        ProviderKind::Openai => {
            let a = Arc::new(openai::OpenAi::new(upstream));
            Adapters {
                chat: Some(a.clone()),
                generate: Some(a.clone()),
                tts: Some(a.clone()),
                stt: Some(a),
            }
        }
        ProviderKind::Anthropic => Adapters {
            chat: Some(Arc::new(anthropic::Anthropic::new(upstream))),
            ..Adapters::default()
        },
        ProviderKind::Replicate => Adapters {
            generate: Some(Arc::new(replicate::Replicate::new(upstream))),
            ..Adapters::default()
        },
        ProviderKind::Elevenlabs => Adapters {
            tts: Some(Arc::new(elevenlabs::ElevenLabs::new(upstream))),
            ..Adapters::default()
        },
        ProviderKind::Deepgram => Adapters {
            stt: Some(Arc::new(deepgram::Deepgram::new(upstream))),
            ..Adapters::default()
        },
    }
}

/// The upstream HTTP clients, one per [`UpstreamProtocol`], each pooled
/// with connect and keep-alive bounds; providers on the same protocol share
/// one. Per-attempt deadlines are the router's, not the client's.
///
/// Idle connections are capped per host. Uncapped, the pool kept every
/// connection a burst ever opened (a request that finds none idle dials a
/// new one, and keeps it even when an idle one came back first): a
/// benchmark left 13,000 idle connections to one provider, whose accept
/// queue then overflowed, and new dials waited out SYN retransmits (1 s,
/// 2 s): the half-load p99 spikes of BENCHMARKS.md.
///
/// Over HTTP/2 a provider's requests are streams on one connection, so a
/// stream in flight costs no connection of its own (hyper's HTTP/1.1
/// client holds about 25 KB a connection: the 10,000-stream figure of
/// BENCHMARKS.md).
#[derive(Clone)]
pub struct Clients {
    auto: reqwest::Client,
    http1: reqwest::Client,
    http2: reqwest::Client,
    chat: [client::ChatClient; 3],
}

/// The pool and connection bounds of every upstream client. Idle
/// connections kept per host: enough for a burst of several hundred
/// requests to find one warm.
const POOL: client::PoolSettings = client::PoolSettings {
    connect_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(90),
    max_idle_per_host: 256,
    // A dead HTTP/2 connection is found before a request waits on it.
    h2_keep_alive_interval: Duration::from_secs(20),
    h2_keep_alive_timeout: Duration::from_secs(10),
};

#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error("{0}")]
    Reqwest(#[from] reqwest::Error),
    #[error("TLS: {0}")]
    Tls(#[from] std::io::Error),
}

impl Clients {
    pub fn new() -> Result<Clients, ClientsError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(POOL.connect_timeout)
                .pool_idle_timeout(POOL.idle_timeout)
                .pool_max_idle_per_host(POOL.max_idle_per_host)
                .tcp_nodelay(true)
                // An API answers; it does not redirect a POST elsewhere
                // (and following one would cost every request a clone).
                .redirect(reqwest::redirect::Policy::none())
        };
        let chat = |p| client::ChatClient::new(p, &POOL);
        Ok(Clients {
            auto: builder().build()?,
            http1: builder().http1_only().build()?,
            http2: builder()
                .http2_prior_knowledge()
                .http2_keep_alive_interval(POOL.h2_keep_alive_interval)
                .http2_keep_alive_timeout(POOL.h2_keep_alive_timeout)
                .build()?,
            chat: [chat(UpstreamProtocol::Auto)?, chat(UpstreamProtocol::Http1)?, chat(UpstreamProtocol::Http2)?],
        })
    }

    pub fn for_protocol(&self, protocol: UpstreamProtocol) -> &reqwest::Client {
        match protocol {
            UpstreamProtocol::Auto => &self.auto,
            UpstreamProtocol::Http1 => &self.http1,
            UpstreamProtocol::Http2 => &self.http2,
        }
    }

    /// The chat adapters' client for `protocol` ([`client`]).
    pub fn chat_for_protocol(&self, protocol: UpstreamProtocol) -> &client::ChatClient {
        let [auto, http1, http2] = &self.chat;
        match protocol {
            UpstreamProtocol::Auto => auto,
            UpstreamProtocol::Http1 => http1,
            UpstreamProtocol::Http2 => http2,
        }
    }
}

/// The largest non-streamed upstream body accepted.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How much of an upstream error body is read to find its message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// What every HTTP adapter shares: where the provider is, how to reach it,
/// and how to turn its HTTP failures into classified errors.
pub struct Upstream {
    pub id: String,
    pub base_url: String,
    pub api_key: Secret,
    pub http: reqwest::Client,
    /// The chat adapters' lean client, on the same protocol.
    pub chat: client::ChatClient,
    /// The provider's `timeout`: for asynchronous APIs (a generation
    /// created, then polled), the bound on each upstream call.
    pub timeout: Duration,
}

impl Upstream {
    pub fn err(&self, kind: UpstreamErrorKind, detail: impl Into<String>) -> UpstreamError {
        UpstreamError::new(&self.id, kind, detail)
    }

    /// Sends a request; a non-success status becomes a classified error.
    pub async fn send(&self, mut req: reqwest::RequestBuilder, route: &RouteCall<'_>) -> Result<reqwest::Response, UpstreamError> {
        if let Some(tp) = route.traceparent {
            req = req.header("traceparent", tp);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let (status, retry_after) = (resp.status(), retry_after(resp.headers()));
        let body = read_bounded(resp.content_length(), resp.bytes_stream(), MAX_ERROR_BODY_BYTES).await.unwrap_or_default();
        Err(self.status_error(status, retry_after, &body))
    }

    /// [`Self::send`] for the chat adapters' client: a JSON POST to `uri`.
    pub async fn post_chat(&self, uri: &http::Uri, mut headers: http::HeaderMap, body: Vec<u8>, route: &RouteCall<'_>) -> Result<client::Response, UpstreamError> {
        if let Some(tp) = route.traceparent.and_then(|tp| http::HeaderValue::from_str(tp).ok()) {
            headers.insert(TRACEPARENT, tp);
        }
        let resp = self.chat.post(uri.clone(), headers, body).await.map_err(|e| {
            if e.is_connect() {
                self.err(UpstreamErrorKind::Connect, "connection failed")
            } else {
                self.err(UpstreamErrorKind::Reset, "request failed")
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let (status, retry_after) = (resp.status(), retry_after(resp.headers()));
        let declared = http_body::Body::size_hint(resp.body()).exact();
        let body = read_bounded(declared, http_body_util::BodyDataStream::new(resp.into_body()), MAX_ERROR_BODY_BYTES).await.unwrap_or_default();
        Err(self.status_error(status, retry_after, &body))
    }

    fn status_error(&self, status: http::StatusCode, retry_after: Option<Duration>, body: &[u8]) -> UpstreamError {
        let message = self.scrub(&error_message(body));
        UpstreamError::from_status(&self.id, status.as_u16(), retry_after, &message)
    }

    /// Reads a whole (non-streamed) success body of the chat client, bounded.
    pub async fn chat_body(&self, resp: client::Response) -> Result<Bytes, UpstreamError> {
        let declared = http_body::Body::size_hint(resp.body()).exact();
        read_bounded(declared, http_body_util::BodyDataStream::new(resp.into_body()), MAX_RESPONSE_BYTES).await.map_err(|e| match e {
            ReadError::TooLarge => self.err(UpstreamErrorKind::Malformed, "response body over the size limit"),
            ReadError::Transport(_) => self.err(UpstreamErrorKind::Reset, "response body broke"),
        })
    }


    /// Reads a whole (non-streamed) success body, bounded.
    pub async fn body(&self, resp: reqwest::Response) -> Result<Bytes, UpstreamError> {
        read_bounded(resp.content_length(), resp.bytes_stream(), MAX_RESPONSE_BYTES).await.map_err(|e| match e {
            ReadError::TooLarge => self.err(UpstreamErrorKind::Malformed, "response body over the size limit"),
            ReadError::Transport(e) => self.transport_error(&e),
        })
    }

    /// The SSE events of a streamed success body of the chat client.
    pub fn chat_events(&self, resp: client::Response) -> impl Stream<Item = Result<sse::SseEvent, UpstreamError>> + Send + 'static {
        let body = http_body_util::BodyDataStream::new(resp.into_body());
        let id = self.id.clone();
        sse::events(body).map(move |r| {
            r.map_err(|e| match e {
                sse::SseError::Transport(d) => UpstreamError::new(&id, UpstreamErrorKind::Reset, format!("stream broke: {d}")),
                sse::SseError::Malformed(d) => UpstreamError::new(&id, UpstreamErrorKind::Malformed, d),
            })
        })
    }

    /// A streamed success body as raw bytes, passed on as they arrive.
    pub fn byte_stream(&self, resp: reqwest::Response) -> ByteStream {
        let id = self.id.clone();
        Box::pin(resp.bytes_stream().map(move |r| r.map_err(|_| UpstreamError::new(&id, UpstreamErrorKind::Reset, "stream broke"))))
    }

    fn transport_error(&self, e: &reqwest::Error) -> UpstreamError {
        // reqwest's Display can include the URL; ours carry no secrets
        // (keys travel in headers), but keep the detail to the class.
        let kind = if e.is_connect() {
            UpstreamErrorKind::Connect
        } else if e.is_timeout() {
            UpstreamErrorKind::Timeout
        } else {
            UpstreamErrorKind::Reset
        };
        let what = if e.is_connect() {
            "connection failed"
        } else if e.is_body() || e.is_decode() {
            "response body broke"
        } else {
            "request failed"
        };
        self.err(kind, what)
    }

    /// Removes our own credential from anything a provider echoes back.
    pub fn scrub(&self, s: &str) -> String {
        let key = self.api_key.expose();
        if key.len() >= 4 && s.contains(key) {
            s.replace(key, "***")
        } else {
            s.to_owned()
        }
    }
}

enum ReadError<E> {
    TooLarge,
    Transport(E),
}

/// A `Retry-After` in seconds, if the provider sent one.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Reads a body to its end, refusing one declared or grown past `max`.
async fn read_bounded<S, E>(declared: Option<u64>, mut body: S, max: usize) -> Result<Bytes, ReadError<E>>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ReadError::TooLarge);
    }
    // One chunk (the usual small answer) is passed on without a copy.
    let (mut first, mut out, mut len) = (None::<Bytes>, Vec::new(), 0);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(ReadError::Transport)?;
        len += chunk.len();
        if len > max {
            return Err(ReadError::TooLarge);
        }
        if first.is_none() && out.is_empty() {
            first = Some(chunk);
            continue;
        }
        if let Some(p) = first.take() {
            out.extend_from_slice(&p);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(first.unwrap_or_else(|| Bytes::from(out)))
}

/// Finds the human message in an error body of any of the formats we speak:
/// `{"error":{"message"}}`, `{"error":"..."}`, `{"message":"..."}` (OpenAI,
/// Anthropic, Deepgram's newer shape), `{"detail":{"status","message"}}`
/// and `{"detail":"..."}` (ElevenLabs; Replicate's problem+json),
/// `{"detail":[{"msg"}]}` (a FastAPI validation error), and
/// `{"err_code","err_msg"}` (Deepgram).
pub fn error_message(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let candidates = [
        v.pointer("/error/message"),
        v.get("error"),
        v.get("message"),
        v.pointer("/detail/message"),
        v.get("detail"),
        v.pointer("/detail/0/msg"),
        v.get("err_msg"),
    ];
    let message = candidates.into_iter().flatten().find_map(serde_json::Value::as_str);
    message.map(|s| crate::error::truncate(s, 300).to_owned()).unwrap_or_default()
}

/// `WxH` (as in `1024x1536`) as width and height.
pub(crate) fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.trim().split_once(['x', 'X'])?;
    let (w, h) = (w.trim().parse().ok()?, h.trim().parse().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

/// A language tag reduced to ISO-639-1 (`en`, `EN`, `en-US`, `pt_BR` →
/// `en`, `en`, `en`, `pt`); `None` when it does not start with two letters.
pub(crate) fn iso639_1(tag: &str) -> Option<String> {
    let primary = tag.trim().split(['-', '_']).next()?;
    (primary.len() == 2 && primary.bytes().all(|b| b.is_ascii_alphabetic())).then(|| primary.to_ascii_lowercase())
}

/// The media type of a file extension we may be handed (`png`, `jpg`,
/// `jpeg`, `webp`, `gif`, `mp4`, `webm`, `mov`), case-insensitively.
pub(crate) fn media_type_for_extension(ext: &str) -> Option<&'static str> {
    Some(match ext.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        _ => return None,
    })
}

/// Like [`media_type_for_extension`], images only (an `output_format`).
pub(crate) fn image_type_for_extension(ext: &str) -> Option<&'static str> {
    media_type_for_extension(ext).filter(|t| t.starts_with("image/"))
}

/// The media type a URL's path ends in (query and fragment ignored).
pub(crate) fn media_type_for_url(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let path = path.split_once("://").map_or(path, |(_, rest)| rest.split_once('/').map_or("", |(_, p)| p));
    let last = path.rsplit('/').next().unwrap_or_default();
    let (_, ext) = last.rsplit_once('.')?;
    media_type_for_extension(ext)
}

/// The image type its first bytes announce (PNG, JPEG, WebP, GIF).
pub(crate) fn sniff_image(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("image/webp")
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some("image/gif")
    } else {
        None
    }
}

/// Width and height from a PNG's `IHDR` chunk.
pub(crate) fn png_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    if sniff_image(b) != Some("image/png") || b.get(12..16)? != b"IHDR" {
        return None;
    }
    let be = |r: std::ops::Range<usize>| b.get(r).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(u32::from_be_bytes);
    let (w, h) = (be(16..20)?, be(20..24)?);
    (w > 0 && h > 0).then_some((w, h))
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the adapter tests share: an [`Upstream`] with a recognisable
    //! key, and a throwaway HTTP server on a loopback port.

    use super::*;

    pub const KEY: &str = "sk-test-secret-0123456789";

    pub fn upstream(base_url: &str) -> std::io::Result<Upstream> {
        Ok(Upstream {
            id: "p".into(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: Secret::new(KEY),
            http: reqwest::Client::new(),
            chat: client::ChatClient::new(UpstreamProtocol::Auto, &POOL)?,
            timeout: Duration::from_secs(5),
        })
    }

    pub fn route(model: &'static str) -> RouteCall<'static> {
        RouteCall {
            upstream_model: model,
            max_output_tokens: 1024,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        }
    }

    /// Serves `app` on `127.0.0.1:0`; returns its base URL. (A server
    /// that stops with an error only makes the test's requests fail.)
    pub async fn serve(app: axum::Router) -> std::io::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("test upstream stopped: {e}");
            }
        });
        Ok(format!("http://{addr}"))
    }

    /// The JSON body of a built request; `Null` when it has none or it is
    /// not JSON, which the test's assertions then report.
    pub fn json_body(req: &reqwest::Request) -> serde_json::Value {
        req.body()
            .and_then(|b| b.as_bytes())
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static str]) -> impl Stream<Item = Result<Bytes, &'static str>> + Unpin {
        futures_util::stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p.as_bytes()))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn a_body_is_read_whole_in_order_and_bounded() {
        let one = read_bounded(None, chunks(&["{\"a\":1}"]), 64).await.ok().unwrap();
        assert_eq!(&one[..], b"{\"a\":1}");
        let many = read_bounded(None, chunks(&["ab", "", "cd", "e"]), 64).await.ok().unwrap();
        assert_eq!(&many[..], b"abcde");
        let empty = read_bounded(None, chunks(&[]), 64).await.ok().unwrap();
        assert!(empty.is_empty());
        // Exactly at the bound is allowed; one byte past is not, whether
        // declared up front or found while reading.
        assert_eq!(read_bounded(Some(5), chunks(&["abc", "de"]), 5).await.ok().unwrap().len(), 5);
        assert!(matches!(read_bounded(Some(6), chunks(&["abc"]), 5).await, Err(ReadError::TooLarge)));
        assert!(matches!(read_bounded(None, chunks(&["abc", "def"]), 5).await, Err(ReadError::TooLarge)));
        assert!(matches!(read_bounded(None, chunks(&["abcdef"]), 5).await, Err(ReadError::TooLarge)));
        let broken = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"ab")), Err("reset")]);
        assert!(matches!(read_bounded(None, broken, 64).await, Err(ReadError::Transport("reset"))));
    }

    #[test]
    fn error_message_reads_every_vendor_shape() {
        let cases: [(&str, &str); 8] = [
            (r#"{"error":{"message":"bad model","type":"invalid_request_error"}}"#, "bad model"),
            (r#"{"error":"nope"}"#, "nope"),
            (r#"{"message":"plain"}"#, "plain"),
            (r#"{"detail":{"status":"voice_not_found","message":"A voice with that ID does not exist"}}"#, "A voice with that ID does not exist"),
            (r#"{"detail":"Invalid API key"}"#, "Invalid API key"),
            (r#"{"title":"Input validation failed","detail":"- input: prompt is required","status":422}"#, "- input: prompt is required"),
            (r#"{"detail":[{"loc":["body","text"],"msg":"field required","type":"value_error.missing"}]}"#, "field required"),
            (r#"{"err_code":"Bad Request","err_msg":"Bad Request: failed to process audio: corrupt or unsupported data","request_id":"r1"}"#, "Bad Request: failed to process audio: corrupt or unsupported data"),
        ];
        for (body, want) in cases {
            assert_eq!(error_message(body.as_bytes()), want, "{body}");
        }
        assert_eq!(error_message(b"<html>502</html>"), "");
        assert_eq!(error_message(br#"{"error":{"code":1}}"#), "");
    }

    #[test]
    fn sizes_and_language_tags() {
        assert_eq!(parse_size("1024x1536"), Some((1024, 1536)));
        assert_eq!(parse_size("auto"), None);
        assert_eq!(parse_size("0x5"), None);
        assert_eq!(iso639_1("en-US").as_deref(), Some("en"));
        assert_eq!(iso639_1("PT_br").as_deref(), Some("pt"));
        assert_eq!(iso639_1("english"), None);
        assert_eq!(iso639_1("multi"), None);
    }

    #[test]
    fn media_types_from_urls_and_bytes() {
        assert_eq!(media_type_for_url("https://replicate.delivery/x/out-0.webp"), Some("image/webp"));
        assert_eq!(media_type_for_url("https://cdn.example/a/b.JPG?sig=a.png#f"), Some("image/jpeg"));
        assert_eq!(media_type_for_url("https://cdn.example/v.mov"), Some("video/quicktime"));
        assert_eq!(media_type_for_url("https://cdn.example/noext"), None);
        assert_eq!(media_type_for_url("https://host.png"), None);
        assert_eq!(media_type_for_url("https://cdn.example/dir.png/file"), None);
        assert_eq!(image_type_for_extension("mp4"), None);
        assert_eq!(sniff_image(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff_image(b"GIF89a.."), Some("image/gif"));
        assert_eq!(sniff_image(b"\x89PN"), None);
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&[0, 0, 4, 0, 0, 0, 6, 0]);
        assert_eq!(png_dimensions(&png), Some((1024, 1536)));
        assert_eq!(png_dimensions(&png[..20]), None);
    }
}
