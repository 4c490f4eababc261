//! Logs and traces.
//!
//! Logs: structured, to stderr, filtered by `RUST_LOG`, installed by the
//! binary once. Traces: OpenTelemetry, one span per request and one child
//! span per provider attempt, exported over OTLP/gRPC. Each server instance
//! owns its tracer provider (no process-global tracer), so tests can run
//! several gateways with different collectors in one process.
//!
//! Trace ids exist even with no collector configured: every response
//! carries the `traceparent` of its request, and an incoming `traceparent`
//! is continued. Export runs on a background batch processor with a bounded
//! queue: it never blocks or slows the request path, and a dead collector
//! loses spans, not requests.
//!
//! Nothing here ever records a provider secret: spans carry the provider
//! id, models, outcome and token counts, never headers or bodies.

mod otlp;
pub mod text_log;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use http::HeaderValue;
use http_body_util::BodyExt;
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{SpanKind, Status, TraceContextExt, Tracer as _},
    Context, KeyValue,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanProcessor},
    Resource,
};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use tracing_subscriber::{fmt, EnvFilter};

use crate::{
    config::TelemetryConfig,
    error::{Error, ErrorCode, UpstreamError},
    metrics::{Metrics, Outcome},
    proto::Usage,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global log subscriber (the binary's, once; tests don't).
///
/// Lines are written to stderr in batches by a background thread
/// ([`crate::logs`]): a request never waits on a `write` to stderr. Keep
/// the guard until exit: dropping it writes what is buffered.
pub fn init_logs(format: LogFormat) -> std::io::Result<crate::logs::LogGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = crate::logs::batched(std::io::stderr(), crate::logs::BATCH_WINDOW, crate::logs::MAX_PENDING)?;
    // Colours only for a person at a terminal, never into a file or a pipe.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer);
    let _ = match format {
        // The default text format's bytes, written for less (text_log.rs).
        LogFormat::Text => builder
            .fmt_fields(text_log::PlainFields::default())
            .event_format(text_log::TextFormat::default())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
    };
    Ok(guard)
}

/// The request's trace context, put in request extensions by
/// [`trace_request`] for the core and the router to parent spans on; and
/// what the core learns of the request for its metrics.
#[derive(Clone, Debug)]
pub struct RequestTrace(pub Context, pub Arc<Outcome>);

pub struct Telemetry {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    export: Option<mpsc::Sender<Export>>,
    /// Whether the last export to the collector failed.
    export_failing: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("building the OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Spans waiting for export, at most; past it new spans are dropped.
const EXPORT_QUEUE: usize = 8192;
/// Spans an export carries at most. Encoding and sending run on the
/// span-export thread at background priority (`background.rs`), not on a
/// request thread, so a batch no longer stalls requests behind it (it did
/// when export ran on the request runtime: 64 was the cap then). At 7,000
/// sync requests a second, 512 against 64 took the export thread from
/// 5.0–5.7 to 2.6–3.6 µs of CPU a request, fewer calls to the collector
/// each carrying more, with TTFT p99 at 3,800 streams a second no worse
/// (medians of six alternating rounds 3.3 and 3.9 ms).
const EXPORT_BATCH: usize = 512;
/// How long spans gather before they are exported.
const EXPORT_WINDOW: Duration = Duration::from_millis(50);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

enum Export {
    Span(Box<SpanData>),
    Flush(oneshot::Sender<()>),
}

/// Hands finished spans to the export task without ever waiting: a full
/// queue drops the span. (The SDK's own batch processors block the calling
/// thread on shutdown, which deadlocks a runtime that is shutting down.)
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<Export>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let _ = self.tx.try_send(Export::Span(Box::new(span)));
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Exports queued spans in batches of at most [`EXPORT_BATCH`], a window
/// after the first arrives; a failed export loses that batch, never blocks
/// the queue.
async fn export_loop(exporter: otlp::OtlpExporter, mut rx: mpsc::Receiver<Export>, failing: Arc<AtomicBool>) {
    let mut batch: Vec<SpanData> = Vec::new();
    let send = |batch: Vec<SpanData>| {
        let exporter = exporter.clone();
        let failing = failing.clone();
        async move {
            let failed = match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(&batch)).await {
                Ok(Ok(())) => false,
                Ok(Err(e)) => {
                    tracing::debug!("span export failed: {e}");
                    true
                }
                Err(_) => {
                    tracing::debug!("span export timed out");
                    true
                }
            };
            if failing.swap(failed, Ordering::Relaxed) != failed {
                if failed {
                    tracing::warn!("span export failing; spans are being lost until the collector answers");
                } else {
                    tracing::info!("span export working again");
                }
            }
        }
    };
    let mut msgs = Vec::with_capacity(EXPORT_BATCH);
    // Woken by the first span after an idle spell; then the window's spans
    // gather before any work is done, so under load the task runs once a
    // window rather than once a span (one wake-up per span was ~1% of a
    // sync request).
    while rx.recv_many(&mut msgs, EXPORT_BATCH).await > 0 {
        if !matches!(msgs.last(), Some(Export::Flush(_))) {
            tokio::time::sleep(EXPORT_WINDOW).await;
        }
        loop {
            for msg in msgs.drain(..) {
                match msg {
                    Export::Span(s) => {
                        batch.push(*s);
                        if batch.len() >= EXPORT_BATCH {
                            send(std::mem::take(&mut batch)).await;
                        }
                    }
                    Export::Flush(done) => {
                        if !batch.is_empty() {
                            send(std::mem::take(&mut batch)).await;
                        }
                        let _ = done.send(());
                    }
                }
            }
            if rx.is_empty() {
                break;
            }
            rx.recv_many(&mut msgs, EXPORT_BATCH).await;
        }
        if !batch.is_empty() {
            send(std::mem::take(&mut batch)).await;
        }
    }
}

impl Telemetry {
    pub fn new(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        let resource = Resource::builder().with_service_name(config.service_name.clone()).build();
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
        let mut builder = SdkTracerProvider::builder().with_resource(resource.clone()).with_sampler(sampler);
        let mut export = None;
        let export_failing = Arc::new(AtomicBool::new(false));
        if let Some(endpoint) = &config.otlp_endpoint {
            let (tx, rx) = mpsc::channel(EXPORT_QUEUE);
            // Encoding and sending batches is background work: on a thread
            // of its own, where the exporter's connection lives too.
            let (made, exporter) = std::sync::mpsc::sync_channel(1);
            let (endpoint, resource, failing) = (endpoint.clone(), resource.clone(), export_failing.clone());
            crate::background::spawn("span-export", move || async move {
                match otlp::OtlpExporter::new(&endpoint, EXPORT_TIMEOUT, &resource) {
                    Ok(exporter) => {
                        let _ = made.send(Ok(()));
                        export_loop(exporter, rx, failing).await;
                    }
                    Err(e) => {
                        let _ = made.send(Err(e));
                    }
                }
            })
            .map_err(|e| TelemetryError(format!("starting span export: {e}")))?;
            exporter.recv().map_err(|_| TelemetryError("span export ended at start".into()))?.map_err(TelemetryError)?;
            builder = builder.with_span_processor(QueueProcessor { tx: tx.clone() });
            export = Some(tx);
        }
        let provider = builder.build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "switchyard");
        Ok(Telemetry {
            tracer,
            propagator: TraceContextPropagator::new(),
            export,
            export_failing,
        })
    }

    /// For `/readyz`: `off` with no collector configured, `degraded` while
    /// exports to it fail, else `ok`.
    pub fn export_health(&self) -> &'static str {
        match (&self.export, self.export_failing.load(Ordering::Relaxed)) {
            (None, _) => "off",
            (Some(_), true) => "degraded",
            (Some(_), false) => "ok",
        }
    }

    /// The span of work done later on behalf of a request (a generation
    /// job), in that request's trace when its `traceparent` was kept.
    pub fn job_span(&self, traceparent: Option<&str>, name: String, attributes: Vec<KeyValue>) -> Context {
        let mut headers = http::HeaderMap::new();
        if let Some(v) = traceparent.and_then(|t| http::HeaderValue::from_str(t).ok()) {
            headers.insert("traceparent", v);
        }
        self.start(&headers, name, SpanKind::Internal, attributes)
    }

    /// Starts a request's span, continuing the client's trace if it sent a
    /// `traceparent`.
    pub fn request_span(&self, headers: &http::HeaderMap, name: String, attributes: Vec<KeyValue>) -> Context {
        self.start(headers, name, SpanKind::Server, attributes)
    }

    /// A span whose parent is the `traceparent` in `headers`, if any.
    fn start(&self, headers: &http::HeaderMap, name: String, kind: SpanKind, attributes: Vec<KeyValue>) -> Context {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        let span = self.tracer.span_builder(name).with_kind(kind).with_attributes(attributes).start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// Starts the span of one provider attempt under the request's span.
    pub fn attempt_span(&self, parent: &Context, a: AttemptInfo<'_>) -> AttemptSpan {
        let span = self
            .tracer
            .span_builder(format!("{} {}", a.operation, a.upstream_model))
            .with_kind(SpanKind::Client)
            .with_attributes(vec![
                KeyValue::new("gen_ai.operation.name", a.operation),
                // Static strings: no allocation, here or when exported.
                KeyValue::new("gen_ai.provider.name", a.provider_kind),
                KeyValue::new("gen_ai.system", a.provider_kind),
                KeyValue::new("gen_ai.request.model", a.upstream_model.to_owned()),
                KeyValue::new("switchyard.model", a.public_model.to_owned()),
                KeyValue::new("switchyard.provider.id", a.provider.to_owned()),
                KeyValue::new("switchyard.attempt", i64::from(a.number)),
                KeyValue::new("switchyard.attempt.kind", a.kind),
            ])
            .start_with_context(&self.tracer, parent);
        AttemptSpan {
            cx: parent.with_span(span),
            finished: false,
        }
    }

    /// Exports what is queued, waiting at most `timeout`. Called at
    /// shutdown.
    pub async fn shutdown(&self, timeout: Duration) {
        let Some(tx) = &self.export else { return };
        let (done, wait) = oneshot::channel();
        let flushed = async {
            if tx.send(Export::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        };
        let _ = tokio::time::timeout(timeout, flushed).await;
    }
}

/// What an attempt span is labelled with.
pub struct AttemptInfo<'a> {
    /// `chat`, `generate_content`, `text_to_speech`, `speech_to_text`.
    pub operation: &'static str,
    pub provider: &'a str,
    pub provider_kind: &'static str,
    pub public_model: &'a str,
    pub upstream_model: &'a str,
    pub number: u32,
    /// `first`, `retry`, `hedge` or `continuation`.
    pub kind: &'static str,
}

/// The span of one provider attempt. Ends when finished or dropped (a
/// dropped unfinished attempt was cancelled: a hedge that lost, or a client
/// that left).
pub struct AttemptSpan {
    cx: Context,
    finished: bool,
}

impl AttemptSpan {
    /// The W3C `traceparent` to send upstream, naming this attempt's span.
    pub fn traceparent(&self) -> Option<String> {
        traceparent(&self.cx)
    }

    pub fn first_content(&self, ttft: Duration) {
        self.cx.span().set_attribute(KeyValue::new("switchyard.ttft_ms", ttft.as_secs_f64() * 1000.0));
    }

    pub fn succeed(mut self, usage: Option<&Usage>, finish_reason: Option<&'static str>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("switchyard.outcome", "success"));
        if let Some(u) = usage {
            span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", i64::from(u.prompt_tokens)));
            span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", i64::from(u.completion_tokens)));
        }
        if let Some(r) = finish_reason {
            span.set_attribute(KeyValue::new("gen_ai.response.finish_reasons", opentelemetry::Value::Array(vec![opentelemetry::StringValue::from(r)].into())));
        }
        span.set_status(Status::Ok);
        span.end();
        self.finished = true;
    }

    pub fn fail(mut self, e: &UpstreamError, output_tokens: Option<u32>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("switchyard.outcome", "failure"));
        span.set_attribute(KeyValue::new("error.type", e.class()));
        if let Some(n) = output_tokens {
            span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", i64::from(n)));
        }
        span.set_status(Status::error(e.to_string()));
        span.end();
        self.finished = true;
    }
}

impl Drop for AttemptSpan {
    fn drop(&mut self) {
        if !self.finished {
            let span = self.cx.span();
            span.set_attribute(KeyValue::new("switchyard.outcome", "cancelled"));
            span.end();
        }
    }
}

/// `00-<trace id>-<span id>-<flags>` for the span in `cx`.
pub fn traceparent(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    // Written by hand: `format!` with `{:032x}` cost about 4,000
    // instructions a request (callgrind), more than the span itself.
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, &sc.trace_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &sc.span_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &[sc.trace_flags().to_u8()]);
    Some(out)
}

/// The trace id within a [`traceparent`] string.
fn trace_id_of(traceparent: &str) -> &str {
    traceparent.get(3..35).unwrap_or("")
}

/// Appends `bytes` as lowercase hex.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Ends the request span when the response body is done (or dropped), so a
/// stream's span covers the whole stream.
/// Ends the request's span and counts the request when its response body
/// is done with (sent whole, or dropped because the client left).
struct Finish {
    cx: Context,
    metrics: Arc<Metrics>,
    endpoint: String,
    outcome: Arc<Outcome>,
    /// The response's own error code, if its head carried one.
    code: Option<&'static str>,
    status: u16,
    /// The request's log span (request id, trace id).
    log: tracing::Span,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.cx.span().end();
        let code = self.outcome.code().or(self.code).unwrap_or("ok");
        let elapsed = self.outcome.elapsed();
        self.metrics.request(&self.endpoint, &self.outcome, code, elapsed);
        tracing::info!(
            target: text_log::ACCESS_TARGET,
            parent: &self.log,
            endpoint = %self.endpoint,
            model = self.outcome.model().unwrap_or(""),
            key = self.outcome.key().unwrap_or(""),
            status = self.status,
            code,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// A gRPC error in headers or trailers, as its public code: read back
/// the way the HTTP façade reads the core's errors ([`Error::from_status`]).
fn grpc_code(headers: &http::HeaderMap) -> Option<&'static str> {
    let status = tonic::Status::from_header_map(headers)?;
    (status.code() != tonic::Code::Ok).then(|| Error::from_status(&status).code())
}

/// Middleware: a span for every request, its context in the request's
/// extensions, and its `traceparent` on the response; and the request's
/// count and latency in the metrics once its response is over.
pub async fn trace_request(State((telemetry, metrics)): State<(Arc<Telemetry>, Arc<Metrics>)>, mut req: Request, next: Next) -> Response {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = req.uri().path();
    // Span names and metric labels stay low-cardinality: unknown paths are
    // not named.
    let endpoint = if is_grpc {
        metrics.grpc_endpoint(path).map(str::to_owned)
    } else {
        req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned())
    };
    let name = match (is_grpc, &endpoint) {
        (true, Some(e)) => e.clone(),
        (false, Some(e)) => format!("{} {e}", req.method()),
        (_, None) => format!("{} unknown route", req.method()),
    };
    let attributes = vec![
        KeyValue::new("http.request.method", req.method().to_string()),
        KeyValue::new("url.path", path.to_owned()),
    ];
    let cx = telemetry.request_span(req.headers(), name, attributes);
    let tp = traceparent(&cx);
    // Every log line of the request carries its request id and trace id.
    let log = tracing::info_span!(
        "request",
        request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or(""),
        trace_id = %tp.as_deref().map_or("", trace_id_of),
    );
    let outcome = Outcome::new();
    req.extensions_mut().insert(RequestTrace(cx.clone(), outcome.clone()));
    let resp = next.run(req).instrument(log.clone()).await;
    let (mut parts, body) = resp.into_parts();
    cx.span().set_attribute(KeyValue::new("http.response.status_code", i64::from(parts.status.as_u16())));
    if parts.status.is_server_error() {
        cx.span().set_status(Status::error(parts.status.to_string()));
    }
    if let Some(v) = tp.and_then(|t| HeaderValue::try_from(t).ok()) {
        parts.headers.insert("traceparent", v);
    }
    let code = parts.extensions.get::<ErrorCode>().map(|c| c.0).or_else(|| grpc_code(&parts.headers)).or_else(|| {
        // A response the façade did not make from an error (a 503 from
        // /readyz, axum's own rejections).
        (!parts.status.is_success() && !parts.status.is_redirection()).then_some("error")
    });
    let finish = Finish {
        cx,
        metrics,
        endpoint: endpoint.unwrap_or_else(|| "unknown".into()),
        outcome,
        code,
        status: parts.status.as_u16(),
        log,
    };
    let body = Body::new(body.map_frame(move |frame| {
        // A gRPC stream's status comes last, in its trailers.
        if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
            finish.outcome.set_code(code);
        }
        frame
    }));
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn continues_an_incoming_trace_and_mints_one_otherwise() {
        let t = Telemetry::new(&TelemetryConfig::default()).unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let cx = t.request_span(&h, "x".into(), vec![]);
        let tp = traceparent(&cx).unwrap();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{tp}");
        assert!(!tp.contains("00f067aa0ba902b7"), "a new span of the same trace");
        let fresh = traceparent(&t.request_span(&http::HeaderMap::new(), "y".into(), vec![])).unwrap();
        assert_eq!(fresh.len(), 55);
        let sc = t.request_span(&http::HeaderMap::new(), "z".into(), vec![]).span().span_context().clone();
        let want = format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
        let cx = Context::new().with_remote_span_context(sc);
        assert_eq!(traceparent(&cx).unwrap(), want, "the same as the Display forms");
        assert_eq!(trace_id_of(&want), format!("{}", cx.span().span_context().trace_id()));
        assert!(!fresh.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    }
}
