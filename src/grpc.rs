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

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use rand::distr::{Alphanumeric, SampleString};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataValue, Request, Response, Status};

use crate::{
    auth::{Keys, Principal},
    error::{Error, UpstreamError},
    proto::{chat_server::Chat, ChatChunk, ChatCompletion, ChatRequest, Role, Usage},
    routing::{Model, Router, Started},
};

/// Metadata the façade (or a gRPC client) uses to forbid failover.
pub const META_FAILOVER: &str = "x-switchyard-failover";
pub const META_PROVIDER: &str = "x-switchyard-provider";

pub struct ChatCore {
    keys: Arc<Keys>,
    router: Arc<Router>,
    request_timeout: Duration,
}

/// What admission decided about a request.
struct Admitted {
    model: Arc<Model>,
    deadline: Instant,
    failover: bool,
}

impl ChatCore {
    pub fn new(keys: Arc<Keys>, router: Arc<Router>, request_timeout: Duration) -> Self {
        ChatCore {
            keys,
            router,
            request_timeout,
        }
    }

    /// Key → validation → model → permission, in API.md's order.
    fn admit(&self, request: &Request<ChatRequest>) -> Result<Admitted, Error> {
        // The HTTP façade has already authenticated (before reading the
        // body, as the check order requires) and hands the principal over.
        let principal = match request.extensions().get::<Arc<Principal>>() {
            Some(p) => p.clone(),
            None => {
                let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
                self.keys.authenticate(auth)?
            }
        };
        let req = request.get_ref();
        validate(req)?;
        let model = self
            .router
            .model(&req.model)
            .ok_or_else(|| Error::not_found(format!("model {:?} does not exist", req.model), Some("model")))?;
        if !principal.may_use(&req.model) {
            return Err(Error::PermissionDenied(format!("this key may not use model {:?}", req.model)));
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
        Ok(Admitted {
            model,
            deadline: Instant::now() + timeout,
            failover,
        })
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
fn client_timeout(md: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, Error> {
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

fn new_completion_id() -> String {
    format!("chatcmpl-{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn served_metadata<T>(resp: &mut Response<T>, provider: &str, attempts: u32) {
    let md = resp.metadata_mut();
    if let Ok(v) = MetadataValue::try_from(provider) {
        md.insert(META_PROVIDER, v);
    }
    md.insert(crate::error::META_ATTEMPTS, MetadataValue::from(attempts));
}

#[tonic::async_trait]
impl Chat for ChatCore {
    type CompleteStreamStream = ReceiverStream<Result<ChatChunk, Status>>;

    async fn complete(&self, request: Request<ChatRequest>) -> Result<Response<ChatCompletion>, Status> {
        let admitted = self.admit(&request)?;
        let req = request.into_inner();
        let served = self
            .router
            .complete(&admitted.model, &req, admitted.deadline, admitted.failover)
            .await?;
        let mut completion = served.value;
        completion.id = new_completion_id();
        completion.created = unix_now();
        completion.model = req.model;
        if completion.usage.is_none() {
            completion.usage = Some(Usage::default());
        }
        let mut resp = Response::new(completion);
        served_metadata(&mut resp, &served.route.provider, served.attempts);
        Ok(resp)
    }

    async fn complete_stream(&self, request: Request<ChatRequest>) -> Result<Response<Self::CompleteStreamStream>, Status> {
        let admitted = self.admit(&request)?;
        let req = request.into_inner();
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let served = self
            .router
            .stream(&admitted.model, &req, admitted.deadline, admitted.failover)
            .await?;
        let (tx, rx) = mpsc::channel(32);
        let relay = Relay {
            provider: served.route.provider.clone(),
            id: new_completion_id(),
            created: unix_now(),
            model: req.model,
            include_usage,
            usage: None,
            tx,
        };
        let idle = served.route.idle_timeout;
        tokio::spawn(relay.run(served.value, idle, admitted.deadline));
        let mut resp = Response::new(ReceiverStream::new(rx));
        served_metadata(&mut resp, &served.route.provider, served.attempts);
        Ok(resp)
    }
}

/// Relays one upstream stream to one client, rewriting every chunk to the
/// stream's own id, model and creation time.
struct Relay {
    provider: String,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    usage: Option<Usage>,
    tx: mpsc::Sender<Result<ChatChunk, Status>>,
}

enum Sent {
    Ok,
    ClientGone,
}

impl Relay {
    async fn send(&mut self, mut chunk: ChatChunk) -> Sent {
        // Usage is held back and sent once, last, and only to clients that
        // asked for it; the chunk that carried it may also carry content.
        if let Some(u) = chunk.usage.take() {
            self.usage = Some(u);
        }
        if chunk.choices.is_empty() {
            return Sent::Ok;
        }
        chunk.id.clone_from(&self.id);
        chunk.model.clone_from(&self.model);
        chunk.created = self.created;
        match self.tx.send(Ok(chunk)).await {
            Ok(()) => Sent::Ok,
            Err(_) => Sent::ClientGone,
        }
    }

    async fn fail(&self, e: Error) {
        let _ = self.tx.send(Err(e.to_status())).await;
    }

    async fn run(mut self, started: Started, idle: Duration, deadline: Instant) {
        let Started { head, mut rest, finished } = started;
        for chunk in head {
            if let Sent::ClientGone = self.send(chunk).await {
                return;
            }
        }
        if !finished {
            loop {
                let wait = deadline.min(Instant::now() + idle);
                let next = tokio::select! {
                    // The client left: dropping `rest` closes the upstream.
                    _ = self.tx.closed() => {
                        tracing::debug!("client went away mid-stream; closing upstream");
                        return;
                    }
                    next = tokio::time::timeout_at(wait, rest.next()) => next,
                };
                match next {
                    Ok(Some(Ok(chunk))) => {
                        if let Sent::ClientGone = self.send(chunk).await {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => return self.fail(mid_stream(e)).await,
                    Err(_) if Instant::now() >= deadline => {
                        return self
                            .fail(Error::Timeout {
                                message: "the request's deadline passed mid-stream".into(),
                                attempts: 1,
                            })
                            .await
                    }
                    Err(_) => return self.fail(mid_stream(UpstreamError::new(&self.provider, crate::error::UpstreamErrorKind::Stall, format!("no event within {idle:?}")))).await,
                }
            }
        }
        if self.include_usage {
            let usage = ChatChunk {
                id: self.id.clone(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(self.usage.unwrap_or_default()),
                system_fingerprint: None,
            };
            let _ = self.tx.send(Ok(usage)).await;
        }
    }
}

fn mid_stream(e: UpstreamError) -> Error {
    tracing::warn!(class = e.class(), "stream failed after content: {e}");
    Error::ProviderUnavailable {
        message: format!("the stream broke after content was sent: {e}"),
        attempts: 1,
    }
}
