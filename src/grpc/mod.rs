//! The gRPC core: the one implementation of `switchyard.v1.Chat`.
//!
//! Both surfaces arrive here — gRPC clients directly, HTTP clients through
//! the façade calling the same generated trait — so admission (key,
//! validation, model, permission), deadlines and streaming behave the same
//! for both. The core never speaks JSON and never picks a provider itself:
//! it asks the [`Router`] and relays what comes back.
//!
//! A stream is relayed by a spawned producer feeding a bounded channel. The
//! producer stops the moment the client goes away (`Sender::closed`), which
//! drops the upstream response and so closes the provider's connection: an
//! abandoned stream costs nothing further.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rand::distr::{Alphanumeric, SampleString};
use tokio::{sync::mpsc, time::Instant};
use tonic::{Request, Response, Status};

use crate::{
    accounting::{chat_cost, Entry, Ledger, LedgerRow},
    config::Modality,
    auth::{Keys, Principal},
    error::Error,
    limits::{Limiter, Verdict},
    reload::Swap,
    proto::{chat_server::Chat, openai_json, ChatChunk, ChatCompletion, ChatRequest, Role, Usage},
    routing::{
        stream::{estimate_tokens, RoutedStream},
        CallOpts, Model, Router, Tries,
    },
    telemetry::RequestTrace,
};

/// Metadata the façade (or a gRPC client) uses to forbid failover.
pub const META_FAILOVER: &str = "x-switchyard-failover";
pub const META_PROVIDER: &str = "x-switchyard-provider";

pub mod generations;
pub mod speech;

/// What every service shares: who may ask, admission in API.md's order,
/// the rate-limit figures on every answer, and the ledger.
pub struct Gate {
    pub keys: Arc<Keys>,
    /// The routing table now (replaced on reload).
    pub router: Arc<Swap<Router>>,
    pub limiter: Arc<Limiter>,
    pub ledger: Arc<Ledger>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub request_timeout: Duration,
}

pub struct ChatCore {
    gate: Arc<Gate>,
}

/// What a request asks admission for.
pub(crate) struct Ask<'a> {
    pub model: &'a str,
    /// The modalities this service serves.
    pub modalities: &'a [Modality],
    /// The name of the model field in this service's requests.
    pub model_param: &'static str,
    /// Input tokens to charge the token limit with up front.
    pub estimated_tokens: u64,
    /// The request id's prefix (`chatcmpl`, `gen`, ...).
    pub id_prefix: &'static str,
    /// The request's checks that depend on its model (fields one modality
    /// takes and another does not, a format no route can produce, ...).
    pub check: &'a (dyn Fn(&Model) -> Result<(), Error> + Sync),
}

/// What admission decided about a request.
pub(crate) struct Admitted {
    pub model: Arc<Model>,
    pub opts: CallOpts,
    /// Input tokens charged to the token limit at admission.
    pub estimated_tokens: u64,
    /// The request's id: the completion's `id` and the ledger's key.
    pub id: String,
    pub client_request_id: Option<String>,
    pub started: Instant,
}

/// Who is asking, and the rate-limit figures their response will carry.
pub(crate) struct Caller {
    pub principal: Arc<Principal>,
    verdict: Option<Verdict>,
}

impl Gate {
    pub(crate) async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        // The HTTP façade has already authenticated (before reading the
        // body, as the check order requires) and hands the principal over.
        let principal = match request.extensions().get::<Arc<Principal>>() {
            Some(p) => p.clone(),
            None => {
                let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
                self.keys.authenticate(auth).await.map_err(|e| e.to_status())?
            }
        };
        if let Some(t) = request.extensions().get::<RequestTrace>() {
            t.1.set_key(&principal.name);
        }
        Ok(Caller { principal, verdict: None })
    }

    /// Puts the caller's rate-limit figures on a response or error: those of
    /// its own check, or (refused before that step) the current ones.
    pub(crate) async fn finish<T>(&self, caller: Caller, out: Result<Response<T>, Error>) -> Result<Response<T>, Status> {
        let verdict = match caller.verdict {
            Some(v) => v,
            None => self.limiter.peek(&caller.principal.name, &caller.principal.limits).await,
        };
        match out {
            Ok(mut resp) => {
                put_rate_headers(resp.metadata_mut(), &verdict);
                Ok(resp)
            }
            Err(e) => {
                let mut status = e.to_status();
                put_rate_headers(status.metadata_mut(), &verdict);
                Err(status)
            }
        }
    }

    /// Model → modality → permission → budget → rate limit, in API.md's
    /// order (the key was checked by [`Gate::caller`], the request's own
    /// fields by the service before this).
    pub(crate) async fn admit<T>(&self, caller: &mut Caller, request: &Request<T>, ask: Ask<'_>) -> Result<Admitted, Error> {
        let principal = caller.principal.clone();
        let model = self
            .router
            .load()
            .model(ask.model)
            .ok_or_else(|| Error::not_found(format!("model {:?} does not exist", ask.model), Some(ask.model_param)))?;
        let trace = request.extensions().get::<RequestTrace>();
        if let Some(t) = trace {
            t.1.set_model(&model.id);
        }
        if !ask.modalities.contains(&model.modality) {
            let serves: Vec<&str> = ask.modalities.iter().map(|m| m.as_str()).collect();
            return Err(Error::invalid_param(
                format!("model {:?} is a {} model; this endpoint serves {} models", ask.model, model.modality.as_str(), serves.join(" and ")),
                ask.model_param,
            ));
        }
        (ask.check)(&model)?;
        if !principal.may_use(ask.model) {
            return Err(Error::PermissionDenied(format!("this key may not use model {:?}", ask.model)));
        }
        if let Some(budget) = principal.budget_usd {
            let spent = self.ledger.spent(&principal.name).await;
            if spent >= budget {
                return Err(Error::InsufficientQuota(format!("this key's budget of ${budget:.2} is spent")));
            }
        }
        let timeout = match client_timeout(request.metadata())? {
            Some(t) => t.min(self.request_timeout),
            None => self.request_timeout,
        };
        let failover = !request
            .metadata()
            .get(META_FAILOVER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("off"));
        let trace = trace.map(|t| t.0.clone()).unwrap_or_default();
        let estimated_tokens = ask.estimated_tokens;
        let verdict = self.limiter.check(&principal.name, &principal.limits, estimated_tokens).await;
        caller.verdict = Some(verdict);
        self.metrics.limiter_decision(verdict.allowed);
        if !verdict.allowed {
            return Err(Error::RateLimited {
                retry_after_secs: verdict.retry_after_secs(),
            });
        }
        let client_request_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(Admitted {
            model,
            opts: CallOpts {
                deadline: Instant::now() + timeout,
                failover,
                trace,
            },
            estimated_tokens,
            id: new_id(ask.id_prefix),
            client_request_id,
            started: Instant::now(),
        })
    }

    /// The ledger row of a request that reached routing.
    pub(crate) fn row(principal: &Principal, admitted: &Admitted, model: &str) -> LedgerRow {
        let mut row = LedgerRow::new(admitted.id.clone(), admitted.client_request_id.clone(), principal.name.clone(), model.to_owned());
        row.latency_ms = admitted.started.elapsed().as_millis() as u64;
        row
    }

    pub(crate) async fn record(ledger: &Ledger, entry: Entry) {
        // The answer is not withheld for want of a journal: the ledger logs
        // a row it could not write whole, so it can be recovered.
        let _ = ledger.record(entry).await;
    }

    pub(crate) async fn record_failure(&self, principal: &Principal, admitted: &Admitted, model: &str, tries: &Tries, e: &Error) {
        let mut row = Self::row(principal, admitted, model);
        row.attempts = tries.count();
        row.error_code = Some(e.code().to_owned());
        Self::record(&self.ledger, Entry { row, attempts: tries.attempt_rows() }).await;
    }

    /// Charges the token limit with what the request really used.
    pub(crate) async fn reconcile(limiter: &Limiter, principal: &Principal, estimated: u64, usage: Option<&Usage>) {
        if principal.limits.tokens.is_none() {
            return;
        }
        let used = usage.map_or(estimated, |u| u64::from(u.total_tokens));
        limiter.reconcile(&principal.name, &principal.limits, used as i64 - estimated as i64).await;
    }

}

impl ChatCore {
    pub fn new(gate: Arc<Gate>) -> Self {
        ChatCore { gate }
    }

    /// The request's own checks, then the gate's.
    async fn admit(&self, caller: &mut Caller, request: &Request<ChatRequest>) -> Result<Admitted, Error> {
        let req = request.get_ref();
        validate(req)?;
        let estimated_tokens: u64 = req.messages.iter().flat_map(openai_json::message_text).map(|t| u64::from(estimate_tokens(t))).sum();
        let ask = Ask {
            model: &req.model,
            modalities: &[Modality::Chat],
            model_param: "model",
            estimated_tokens,
            id_prefix: "chatcmpl",
            check: &|_| Ok(()),
        };
        self.gate.admit(caller, request, ask).await
    }

    async fn do_complete(&self, caller: &mut Caller, request: Request<ChatRequest>) -> Result<Response<ChatCompletion>, Error> {
        let gate = &*self.gate;
        let admitted = self.admit(caller, &request).await?;
        let req = Arc::new(request.into_inner());
        let mut tries = Tries::default();
        let served = gate.router.load().complete(&admitted.model, req.clone(), &admitted.opts, &mut tries).await;
        let served = match served {
            Ok(s) => s,
            Err(e) => {
                gate.record_failure(&caller.principal, &admitted, &req.model, &tries, &e).await;
                Gate::reconcile(&gate.limiter, &caller.principal, admitted.estimated_tokens, Some(&Usage::default())).await;
                return Err(e);
            }
        };
        let mut completion = served.value;
        let usage = completion.usage.unwrap_or_default();
        let mut row = Gate::row(&caller.principal, &admitted, &req.model);
        row.provider = Some(served.route.provider.clone());
        row.upstream_model = Some(served.route.upstream_model.clone());
        row.input_tokens = u64::from(usage.prompt_tokens);
        row.output_tokens = u64::from(usage.completion_tokens);
        row.cached_tokens = u64::from(usage.cached_tokens.unwrap_or(0));
        row.cost_usd = chat_cost(&served.route.price, row.input_tokens, row.cached_tokens, row.output_tokens);
        row.ttft_ms = Some(row.latency_ms);
        row.attempts = served.attempts;
        row.outcome = "success".into();
        Gate::record(&gate.ledger, Entry { row, attempts: tries.attempt_rows() }).await;
        Gate::reconcile(&gate.limiter, &caller.principal, admitted.estimated_tokens, completion.usage.as_ref()).await;
        completion.id = admitted.id.clone();
        completion.created = unix_now();
        completion.model.clone_from(&req.model);
        if completion.usage.is_none() {
            completion.usage = Some(Usage::default());
        }
        let mut resp = Response::new(completion);
        served_metadata(&mut resp, &served.route.provider, served.attempts);
        Ok(resp)
    }

    async fn do_stream(&self, caller: &mut Caller, request: Request<ChatRequest>) -> Result<Response<RelayStream>, Error> {
        let gate = &*self.gate;
        let admitted = self.admit(caller, &request).await?;
        let req = Arc::new(request.into_inner());
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let mut tries = Tries::default();
        let served = match gate.router.load().stream(&admitted.model, req.clone(), admitted.opts.clone(), &mut tries).await {
            Ok(s) => s,
            Err(e) => {
                gate.record_failure(&caller.principal, &admitted, &req.model, &tries, &e).await;
                Gate::reconcile(&gate.limiter, &caller.principal, admitted.estimated_tokens, Some(&Usage::default())).await;
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel(32);
        let relay = Relay {
            id: admitted.id.clone(),
            created: unix_now(),
            model: req.model.clone(),
            include_usage,
            tx,
            limiter: gate.limiter.clone(),
            ledger: gate.ledger.clone(),
            row: Gate::row(&caller.principal, &admitted, &req.model),
            started: admitted.started,
            principal: caller.principal.clone(),
            estimated_tokens: admitted.estimated_tokens,
        };
        tokio::spawn(tracing::Instrument::in_current_span(relay.run(served.value)));
        let mut resp = Response::new(RelayStream(rx));
        served_metadata(&mut resp, &served.route.provider, served.attempts);
        Ok(resp)
    }
}

/// What the relay hands the client's side, boxed: a channel allocates its
/// slots 32 at a time when it is made, and 32 unboxed
/// `Result<ChatChunk, Status>` are 5.4 KB for every open stream (54 MB of
/// the 10,000-stream benchmark); boxed they are 512 bytes.
type Relayed = Result<Box<ChatChunk>, Box<Status>>;

/// The client's side of a relayed stream.
pub struct RelayStream(mpsc::Receiver<Relayed>);

impl tokio_stream::Stream for RelayStream {
    type Item = Result<ChatChunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|next| next.map(|r| r.map(|c| *c).map_err(|s| *s)))
    }
}

/// The `switchyard.v1.Models` service: the public models a key may use.
pub struct ModelsCore {
    keys: Arc<Keys>,
    router: Arc<Swap<Router>>,
}

impl ModelsCore {
    pub fn new(keys: Arc<Keys>, router: Arc<Swap<Router>>) -> Self {
        ModelsCore { keys, router }
    }
}

#[tonic::async_trait]
impl crate::proto::models_server::Models for ModelsCore {
    async fn list(&self, request: Request<crate::proto::ListModelsRequest>) -> Result<Response<crate::proto::ListModelsResponse>, Status> {
        let principal = match request.extensions().get::<Arc<Principal>>() {
            Some(p) => p.clone(),
            None => {
                let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
                self.keys.authenticate(auth).await.map_err(|e| e.to_status())?
            }
        };
        if let Some(t) = request.extensions().get::<RequestTrace>() {
            t.1.set_key(&principal.name);
        }
        let router = self.router.load();
        let models = router
            .models()
            .filter(|m| principal.may_use(&m.id))
            .map(|m| crate::proto::ModelInfo {
                id: m.id.clone(),
                created: router.created(),
                owned_by: "switchyard".into(),
                modality: m.modality.as_str().to_owned(),
            })
            .collect();
        Ok(Response::new(crate::proto::ListModelsResponse { models }))
    }
}

fn put_rate_headers(md: &mut tonic::metadata::MetadataMap, verdict: &Verdict) {
    let md = md.as_mut();
    for (k, v) in verdict.headers() {
        md.insert(k, http::HeaderValue::from(v));
    }
}
/// What the proto allows but the API does not.
fn validate(req: &ChatRequest) -> Result<(), Error> {
    if req.model.is_empty() {
        return Err(Error::invalid_param("'model' is required", "model"));
    }
    if req.messages.is_empty() {
        return Err(Error::invalid_param("'messages' must be a non-empty array", "messages"));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(Role::try_from(m.role), Ok(r) if r != Role::Unspecified) {
            let p = format!("messages[{i}].role");
            return Err(Error::invalid_param(format!("'{p}' must be set"), &p));
        }
    }
    if req.n == Some(0) {
        return Err(Error::invalid_param("'n' must be at least 1", "n"));
    }
    Ok(())
}

/// The client's own deadline: gRPC's `grpc-timeout` (the façade translates
/// `X-Switchyard-Timeout-Ms` into it).
pub(crate) fn client_timeout(md: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, Error> {
    let Some(v) = md.get("grpc-timeout") else { return Ok(None) };
    let bad = || Error::invalid("malformed grpc-timeout", None);
    let s = v.to_str().map_err(|_| bad())?;
    if s.len() < 2 || s.len() > 9 {
        return Err(bad());
    }
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// A new request (or job) id: `prefix-` and 24 characters, the first 8 the
/// time in milliseconds (base 62, so ids sort by creation) and 16 random.
/// Ordered ids go in at the end of the ledger's indexes instead of at
/// random pages: the SQLite writer spends 6–10 µs an entry on them against
/// 50–60 µs on random ones (`cargo bench --bench ledger`).
pub(crate) fn new_id(prefix: &str) -> String {
    const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let mut time = [b'0'; 8];
    for slot in time.iter_mut().rev() {
        *slot = DIGITS[(ms % 62) as usize];
        ms /= 62;
    }
    let mut id = String::with_capacity(prefix.len() + 25);
    id.push_str(prefix);
    id.push('-');
    id.extend(time.iter().map(|&b| char::from(b)));
    id.push_str(&Alphanumeric.sample_string(&mut rand::rng(), 16));
    id
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

pub(crate) fn served_metadata<T>(resp: &mut Response<T>, provider: &str, attempts: u32) {
    let md = resp.metadata_mut();
    // These two and the six rate-limit figures, in one allocation.
    md.reserve(8);
    const PROVIDER: http::HeaderName = http::HeaderName::from_static(META_PROVIDER);
    const ATTEMPTS: http::HeaderName = http::HeaderName::from_static(crate::error::META_ATTEMPTS);
    let md = md.as_mut();
    // ASCII metadata, as `MetadataValue::try_from` would insist.
    match http::HeaderValue::from_str(provider) {
        Ok(v) if provider.is_ascii() => {
            md.insert(PROVIDER, v);
        }
        _ => {}
    }
    md.insert(ATTEMPTS, http::HeaderValue::from(attempts));
}

#[tonic::async_trait]
impl Chat for ChatCore {
    type CompleteStreamStream = RelayStream;

    async fn complete(&self, request: Request<ChatRequest>) -> Result<Response<ChatCompletion>, Status> {
        let mut caller = self.gate.caller(&request).await?;
        let out = self.do_complete(&mut caller, request).await;
        self.gate.finish(caller, out).await
    }

    async fn complete_stream(&self, request: Request<ChatRequest>) -> Result<Response<Self::CompleteStreamStream>, Status> {
        let mut caller = self.gate.caller(&request).await?;
        let out = self.do_stream(&mut caller, request).await;
        self.gate.finish(caller, out).await
    }
}

/// Relays one routed stream to one client, rewriting every chunk to the
/// stream's own id, model and creation time, and records the stream in the
/// ledger before the client gets its last byte.
struct Relay {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    tx: mpsc::Sender<Relayed>,
    limiter: Arc<Limiter>,
    ledger: Arc<Ledger>,
    row: LedgerRow,
    started: Instant,
    principal: Arc<Principal>,
    estimated_tokens: u64,
}

enum End {
    Complete,
    Failed(Error),
    ClientLeft,
}

impl Relay {
    async fn run(self, mut routed: RoutedStream) {
        let end = self.relay(&mut routed).await;
        let summary = routed.summary();
        // Done with the upstream before the bookkeeping.
        drop(routed);
        let mut row = self.row.clone();
        row.provider = summary.provider;
        row.upstream_model = summary.upstream_model;
        row.input_tokens = summary.input_tokens;
        row.output_tokens = summary.output_tokens;
        row.cached_tokens = summary.cached_tokens;
        // Charged for what was produced, whether the client stayed or not.
        row.cost_usd = summary.cost_usd;
        row.ttft_ms = summary.ttft.map(|t| t.as_millis() as u64);
        row.latency_ms = self.started.elapsed().as_millis() as u64;
        row.attempts = summary.attempts;
        let (outcome, failure) = match end {
            End::Complete => ("success", None),
            End::ClientLeft => ("abandoned", None),
            End::Failed(e) => ("error", Some(e)),
        };
        row.outcome = outcome.into();
        row.error_code = failure.as_ref().map(|e| e.code().to_owned());
        let used = Usage::new(
            u32::try_from(row.input_tokens).unwrap_or(u32::MAX),
            u32::try_from(row.output_tokens).unwrap_or(u32::MAX),
        );
        Gate::record(&self.ledger, Entry { row, attempts: summary.attempt_rows }).await;
        Gate::reconcile(&self.limiter, &self.principal, self.estimated_tokens, Some(&used)).await;
        // Only now the error event (or, when `tx` drops, `[DONE]`): the row
        // is durable before the client's last byte.
        if let Some(e) = failure {
            let _ = self.tx.send(Err(Box::new(e.to_status()))).await;
        }
    }

    async fn relay(&self, routed: &mut RoutedStream) -> End {
        loop {
            let next = tokio::select! {
                // In this order, without drawing a random number a chunk.
                biased;
                // The client left: the caller drops the stream, which
                // closes the upstream.
                _ = self.tx.closed() => {
                    tracing::debug!("client went away mid-stream; closing upstream");
                    return End::ClientLeft;
                }
                next = routed.next() => next,
            };
            let mut chunk = match next {
                None => return End::Complete,
                Some(Err(e)) => return End::Failed(e),
                Some(Ok(chunk)) => chunk,
            };
            // Usage is sent only to clients that asked for it.
            if chunk.usage.is_some() && !self.include_usage {
                chunk.usage = None;
                if chunk.choices.is_empty() && chunk.failover.is_none() {
                    continue;
                }
            }
            chunk.id.clone_from(&self.id);
            chunk.model.clone_from(&self.model);
            chunk.created = self.created;
            if self.tx.send(Ok(Box::new(chunk))).await.is_err() {
                return End::ClientLeft;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_sort_by_creation_and_differ() {
        let a = super::new_id("chatcmpl");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::new_id("chatcmpl");
        assert!(a < b, "{a} {b}");
        assert_eq!(a.len(), "chatcmpl-".len() + 24);
        assert!(a["chatcmpl-".len()..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(super::new_id("x"), super::new_id("x"));
    }
}
