//! The HTTP façade: OpenAI-compatible JSON over HTTP/1.1 and HTTP/2,
//! translated onto the gRPC core.
//!
//! The façade owns what only HTTP has — routes and methods, the
//! `Authorization` header checked before the body is read, the body size
//! limit, JSON, SSE framing — and nothing else. Every chat request becomes a
//! proto [`ChatRequest`](crate::proto::ChatRequest) handed to the core
//! through the generated `Chat` trait; what comes back (a message, a stream
//! of chunks, or a status) is written out as OpenAI JSON, SSE events, or
//! the error envelope. It holds no routing logic.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Router,
};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use tonic::metadata::MetadataValue;

mod media;

use crate::{
    auth::{Keys, Principal},
    limits::Limiter,
    storage::Storage,
    error::{Error, META_ATTEMPTS},
    grpc::{ChatCore, ModelsCore, META_FAILOVER, META_PROVIDER},
    proto::{chat_server::Chat, openai_json, ChatChunk},
    telemetry::RequestTrace,
};

/// Whether this replica should receive traffic; false while draining.
#[derive(Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// What the handlers share; one `Arc`, since axum clones the state for
/// every request (and every layer that holds it).
#[derive(Clone)]
pub struct HttpState(Arc<HttpShared>);

impl HttpState {
    pub fn new(shared: HttpShared) -> Self {
        HttpState(Arc::new(shared))
    }
}

impl std::ops::Deref for HttpState {
    type Target = HttpShared;

    fn deref(&self) -> &HttpShared {
        &self.0
    }
}

pub struct HttpShared {
    pub core: Arc<ChatCore>,
    pub models: Arc<ModelsCore>,
    pub generations: Arc<crate::grpc::generations::GenerationsCore>,
    pub speech: Arc<crate::grpc::speech::SpeechCore>,
    pub keys: Arc<Keys>,
    pub limiter: Arc<Limiter>,
    pub storage: Storage,
    pub max_body_bytes: u64,
    pub readiness: Arc<Readiness>,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

/// The OpenAI-compatible routes. Unknown routes are answered by
/// [`fallback`], installed by the caller after gRPC routes are merged in.
pub fn router(state: HttpState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/generations", post(media::create_generation))
        .route("/v1/generations/{id}", get(media::get_generation))
        .route("/v1/generations/{id}/media/{n}", get(media::get_media))
        .route("/v1/tts/synthesize", post(media::synthesize))
        .route(
            "/v1/stt/transcribe",
            // The upload limit is enforced while reading (media::transcribe);
            // this only lifts axum's default below it.
            post(media::transcribe).layer(axum::extract::DefaultBodyLimit::max(media::MAX_UPLOAD_BODY)),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// What `/metrics` reads.
#[derive(Clone)]
pub struct MetricsState {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub router: Arc<crate::reload::Swap<crate::routing::Router>>,
    pub ledger: Arc<crate::accounting::Ledger>,
    pub limiter: Arc<Limiter>,
    pub readiness: Arc<Readiness>,
}

/// `GET /metrics`, with no key: on the main port, or alone on
/// `server.admin_listen`.
pub fn metrics_router(state: MetricsState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

async fn metrics(State(state): State<MetricsState>) -> Response {
    let router = state.router.load();
    let text = state.metrics.render(crate::metrics::Live {
        router: &router,
        ledger_queue: state.ledger.queue_depth(),
        limiter_degraded: state.limiter.is_degraded(),
        draining: state.readiness.is_draining(),
    });
    (
        [(http::header::CONTENT_TYPE, HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"))],
        text,
    )
        .into_response()
}

/// Unknown routes: gRPC clients get `UNIMPLEMENTED`, everyone else the
/// envelope.
pub async fn fallback(req: Request) -> Response {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        return tonic::Status::unimplemented(format!("unknown method {}", req.uri().path())).into_http();
    }
    Error::not_found(format!("unknown route {} {}", req.method(), req.uri().path()), None).into_response()
}

async fn method_not_allowed(method: Method) -> Response {
    // axum itself adds the `Allow` header listing the route's methods.
    Error::MethodNotAllowed { method: method.to_string() }.into_response()
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let draining = state.readiness.is_draining();
    let ok = |healthy: bool| if healthy { "ok" } else { "degraded" };
    // A shared backend's outage is reported, not failed: readiness must not
    // take every replica out of the load balancer at once.
    let body = serde_json::json!({
        "status": if draining { "draining" } else { "ready" },
        "checks": {
            "storage": ok(state.storage.ping().await),
            "limits": ok(!state.limiter.is_degraded()),
            "limits_backend": state.limiter.backend_name(),
            // No collector configured is not a fault.
            "telemetry": ok(state.telemetry.export_health() != "degraded"),
            "telemetry_export": state.telemetry.export_health(),
        },
    });
    let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, axum::Json(body)).into_response()
}

const RATELIMIT_LIMIT: http::HeaderName = http::HeaderName::from_static("x-ratelimit-limit");
const RATELIMIT_LIMIT_TOKENS: http::HeaderName = http::HeaderName::from_static("x-ratelimit-limit-tokens");

/// Checks the key before anything reads the body (API.md's order: key, then
/// size, then parse).
async fn authenticate(State(state): State<HttpState>, mut req: Request, next: Next) -> Response {
    let auth = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.keys.authenticate(auth).await {
        Ok(principal) => {
            if let Some(t) = req.extensions().get::<RequestTrace>() {
                t.1.set_key(&principal.name);
            }
            req.extensions_mut().insert(principal.clone());
            let mut resp = next.run(req).await;
            // Every response to a recognised key carries its rate-limit
            // figures; those refused before the core (size, JSON) get the
            // current ones, counting nothing.
            if !resp.headers().contains_key(RATELIMIT_LIMIT) && !resp.headers().contains_key(RATELIMIT_LIMIT_TOKENS) {
                let verdict = state.limiter.peek(&principal.name, &principal.limits).await;
                for (k, v) in verdict.headers() {
                    resp.headers_mut().insert(k, HeaderValue::from(v));
                }
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// Reads a body up to the limit, refusing early on a declared length.
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, limit: u64) -> Result<Bytes, Error> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::PayloadTooLarge { limit });
    }
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Error::PayloadTooLarge { limit }),
        Err(_) => Err(Error::invalid("the request body could not be read", None)),
    }
}

/// Builds the core request: the principal, and the client's routing wishes
/// as metadata.
pub(crate) fn core_request<T>(message: T, principal: Arc<Principal>, trace: Option<RequestTrace>, headers: &HeaderMap) -> Result<tonic::Request<T>, Error> {
    let mut req = tonic::Request::new(message);
    req.extensions_mut().insert(principal);
    if let Some(t) = trace {
        req.extensions_mut().insert(t);
    }
    let md = req.metadata_mut();
    if let Some(v) = headers.get("x-switchyard-timeout-ms") {
        let ms = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&ms| ms > 0 && ms < 100_000_000)
            .ok_or_else(|| Error::invalid("X-Switchyard-Timeout-Ms must be a positive whole number of milliseconds", None))?;
        // At most 8 digits, as grpc-timeout allows.
        if let Ok(v) = MetadataValue::try_from(format!("{ms}m")) {
            md.insert("grpc-timeout", v);
        }
    }
    if let Some(v) = headers.get(META_FAILOVER).and_then(|v| v.to_str().ok()).and_then(|v| MetadataValue::try_from(v).ok()) {
        md.insert(META_FAILOVER, v);
    }
    if let Some(v) = headers.get("x-request-id").and_then(|v| v.to_str().ok()).and_then(|v| MetadataValue::try_from(v).ok()) {
        md.insert("x-request-id", v);
    }
    Ok(req)
}

/// Metadata the core sets that HTTP clients get as headers.
const FORWARDED_METADATA: [&str; 9] = [
    META_PROVIDER,
    META_ATTEMPTS,
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "retry-after",
];

/// Copies what the core reported (who served, attempts, rate limits) into
/// HTTP headers: one pass over the metadata, names and values moved as they
/// are (no lookups by string, no re-validation).
pub(crate) fn copy_served(md: &tonic::metadata::MetadataMap, headers: &mut HeaderMap) {
    copy_forwarded(md.as_ref(), headers);
}

fn copy_forwarded(md: &HeaderMap, headers: &mut HeaderMap) {
    headers.reserve(md.len());
    for (name, value) in md {
        if FORWARDED_METADATA.contains(&name.as_str()) {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// The core's metadata as a response's headers: moved whole when it holds
/// only what HTTP clients get (the usual case: no entry re-hashed or
/// copied), else copied as [`copy_served`] does. Room is left for `extra`
/// more headers.
fn served_headers(md: tonic::metadata::MetadataMap, extra: usize) -> HeaderMap {
    let md = md.into_headers();
    let mut headers = if md.keys().all(|k| FORWARDED_METADATA.contains(&k.as_str())) {
        md
    } else {
        let mut h = HeaderMap::with_capacity(md.len() + extra);
        copy_forwarded(&md, &mut h);
        h
    };
    headers.reserve(extra);
    headers
}

/// The core's error as the HTTP envelope, with its headers.
pub(crate) fn core_error(status: &tonic::Status) -> Response {
    let mut resp = Error::from_status(status).into_response();
    copy_served(status.metadata(), resp.headers_mut());
    resp
}

/// `GET /v1/models`: OpenAI's list shape.
async fn list_models(State(state): State<HttpState>, Extension(principal): Extension<Arc<Principal>>) -> Response {
    use crate::proto::models_server::Models;
    let mut req = tonic::Request::new(crate::proto::ListModelsRequest {});
    req.extensions_mut().insert(principal);
    match state.models.list(req).await {
        Ok(resp) => {
            let data: Vec<serde_json::Value> = resp
                .into_inner()
                .models
                .into_iter()
                .map(|m| serde_json::json!({"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}))
                .collect();
            axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        Err(status) => core_error(&status),
    }
}

/// Takes the request whole: its headers are read in place and the key's
/// principal and trace moved out, not cloned by extractors.
async fn chat_completions(State(state): State<HttpState>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let Some(principal) = parts.extensions.remove::<Arc<Principal>>() else {
        // The authenticate layer puts it there for every route it guards.
        return Error::Internal("no principal on an authenticated route".into()).into_response();
    };
    let trace = parts.extensions.remove::<RequestTrace>();
    match chat(state, principal, trace, &parts.headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(state: HttpState, principal: Arc<Principal>, trace: Option<RequestTrace>, headers: &HeaderMap, body: Body) -> Result<Response, Error> {
    let bytes = read_body(headers, body, state.max_body_bytes).await?;
    let parsed = openai_json::parse_request(&bytes)?;
    let req = core_request(parsed.request, principal, trace.clone(), headers)?;
    if !parsed.stream {
        let resp = match state.core.complete(req).await {
            Ok(r) => r,
            Err(status) => return Ok(core_error(&status)),
        };
        let (md, completion, _) = resp.into_parts();
        let mut out = Response::new(Body::from(openai_json::completion_to_json(&completion)));
        let h = out.headers_mut();
        *h = served_headers(md, 1);
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(out);
    }
    let resp = match state.core.complete_stream(req).await {
        Ok(r) => r,
        Err(status) => return Ok(core_error(&status)),
    };
    let (md, chunks, _) = resp.into_parts();
    let outcome = trace.map(|t| t.1);
    let mut out = Response::new(Body::from_stream(sse_body(chunks, outcome)));
    let h = out.headers_mut();
    *h = served_headers(md, 3);
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(http::HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    Ok(out)
}

/// SSE framing: one `data:` event per chunk, `[DONE]` after a complete
/// stream, and for a broken one an error event and no `[DONE]` — a
/// truncated stream must never look complete.
///
/// Events already waiting when the body is polled go out together, in one
/// write (the held-back preamble and the first content, a continuation's
/// failover comment and its first chunk), and the first event is never
/// held back for company. Upstream chunks reach the relay one scheduling
/// hop at a time, through hyper's body channel, so after the first write
/// the body yields to let a burst arrive whole (a zero-latency provider's
/// 19 events went out in 19 writes, one per event, while it yielded only
/// once a wait; now in two).
fn sse_body<S>(chunks: S, outcome: Option<Arc<crate::metrics::Outcome>>) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send
where
    S: futures_util::Stream<Item = Result<ChatChunk, tonic::Status>> + Send + Unpin + 'static,
{
    use futures_util::FutureExt;
    /// Bounds one write, so a long burst still streams.
    const MAX_BATCH_BYTES: usize = 64 * 1024;
    /// Scheduler rounds a write may wait for events in all, and per event.
    const MAX_YIELDS: u32 = 32;
    const YIELDS_PER_WAIT: u32 = 4;
    let writer = openai_json::ChunkWriter::default();
    futures_util::stream::unfold((chunks, false, outcome, false, writer), |(mut chunks, done, outcome, started, mut writer)| async move {
        if done {
            return None;
        }
        let mut out = Vec::new();
        let mut yields = 0;
        let mut next = chunks.next().await;

        let done = loop {
            let end = match next {
                // A provider switch, announced as a comment SDKs ignore.
                Some(Ok(ChatChunk { failover: Some(f), .. })) => {
                    out.extend_from_slice(format!(": switchyard failover provider={} attempt={}\n\n", f.provider, f.attempt).as_bytes());
                    false
                }
                Some(Ok(chunk)) => {
                    sse_frame_into(&mut out, |out| writer.write(out, &chunk));
                    false
                }
                Some(Err(status)) => {
                    let e = Error::from_status(&status);
                    if let Some(o) = &outcome {
                        o.set_code(e.code());
                    }
                    let envelope = e.envelope_bytes();
                    sse_frame_into(&mut out, |out| out.extend_from_slice(&envelope));
                    true
                }
                None => {
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    true
                }
            };
            if end {
                break true;
            }
            if out.len() >= MAX_BATCH_BYTES {
                break false;
            }
            // Only what is ready now; otherwise write what we have. After
            // the first write, let the runtime run what is ready before
            // deciding (`yield_now` resumes this task only once the other
            // ready tasks have run): the upstream body, decoded a chunk per
            // task hop, catches up, and a burst goes out in one write
            // instead of one per event. The next event takes up to two
            // such rounds to come through, so a wait gets a few; one that
            // brings nothing ends the batch. The first event is never held
            // back.
            match chunks.next().now_or_never() {
                Some(item) => next = item,
                None if started && yields < MAX_YIELDS => {
                    let mut arrived = None;
                    for _ in 0..YIELDS_PER_WAIT {
                        yields += 1;
                        tokio::task::yield_now().await;
                        if let Some(item) = chunks.next().now_or_never() {
                            arrived = Some(item);
                            break;
                        }
                    }
                    match arrived {
                        Some(item) => next = item,
                        None => break false,
                    }
                }
                None => break false,
            }
        };
        Some((Ok(Bytes::from(out)), (chunks, done, outcome, true, writer)))
    })
}

/// One `data:` event, its JSON written in place by `json`.
fn sse_frame_into(out: &mut Vec<u8>, json: impl FnOnce(&mut Vec<u8>)) {
    out.extend_from_slice(b"data: ");
    json(out);
    out.extend_from_slice(b"\n\n");
}

/// The longest client-sent `X-Request-Id` kept as is.
const MAX_REQUEST_ID: usize = 128;

/// Gives every request and response an `X-Request-Id`: the client's own
/// when it is sane, else a new one.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.as_bytes().iter().all(|b| b.is_ascii_graphic()))
        .cloned()
        .unwrap_or_else(|| {
            let mut id = String::with_capacity(32);
            crate::telemetry::push_hex(&mut id, &rand::random::<[u8; 16]>());
            HeaderValue::try_from(id).unwrap_or(HeaderValue::from_static("0"))
        });
    req.headers_mut().insert("x-request-id", id.clone());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert("x-request-id", id);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_headers_carry_only_what_clients_get() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(crate::grpc::META_PROVIDER, "oa-1".parse().unwrap());
        md.insert("x-ratelimit-remaining", "9".parse().unwrap());
        // Taken whole when nothing else is there.
        let h = served_headers(md.clone(), 1);
        assert_eq!(h.len(), 2);
        assert_eq!(h["x-switchyard-provider"], "oa-1");
        // Anything else the core set stays behind.
        md.insert(crate::error::META_ERROR_CODE, "internal".parse().unwrap());
        let h = served_headers(md, 1);
        assert_eq!(h.len(), 2);
        assert_eq!(h["x-ratelimit-remaining"], "9");
        assert!(!h.contains_key(crate::error::META_ERROR_CODE));
    }
}
