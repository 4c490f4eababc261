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
    error::Error,
    proto::{chat_server::Chat, ChatChunk, ChatCompletion, ChatRequest, Role, Usage},
    routing::{CallOpts, Model, Router},
    telemetry::RequestTrace,
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
    opts: CallOpts,
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
        let trace = request.extensions().get::<RequestTrace>().map(|t| t.0.clone()).unwrap_or_default();
        Ok(Admitted {
            model,
            opts: CallOpts {
                deadline: Instant::now() + timeout,
                failover,
                trace,
            },
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
        let req = Arc::new(request.into_inner());
        let served = self.router.complete(&admitted.model, req.clone(), &admitted.opts).await?;
        let mut completion = served.value;
        completion.id = new_completion_id();
        completion.created = unix_now();
        completion.model.clone_from(&req.model);
        if completion.usage.is_none() {
            completion.usage = Some(Usage::default());
        }
        let mut resp = Response::new(completion);
        served_metadata(&mut resp, &served.route.provider, served.attempts);
        Ok(resp)
    }

    async fn complete_stream(&self, request: Request<ChatRequest>) -> Result<Response<Self::CompleteStreamStream>, Status> {
        let admitted = self.admit(&request)?;
        let req = Arc::new(request.into_inner());
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let served = self.router.stream(&admitted.model, req.clone(), admitted.opts).await?;
        let (tx, rx) = mpsc::channel(32);
        let relay = Relay {
            id: new_completion_id(),
            created: unix_now(),
            model: req.model.clone(),
            include_usage,
            tx,
        };
        tokio::spawn(relay.run(served.value.into_stream()));
        let mut resp = Response::new(ReceiverStream::new(rx));
        served_metadata(&mut resp, &served.route.provider, served.attempts);
        Ok(resp)
    }
}

/// Relays one routed stream to one client, rewriting every chunk to the
/// stream's own id, model and creation time.
struct Relay {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    tx: mpsc::Sender<Result<ChatChunk, Status>>,
}

impl Relay {
    async fn run(self, stream: impl futures_util::Stream<Item = Result<ChatChunk, Error>> + Send) {
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                // The client left: dropping the stream closes the upstream.
                _ = self.tx.closed() => {
                    tracing::debug!("client went away mid-stream; closing upstream");
                    return;
                }
                next = stream.next() => next,
            };
            let item = match next {
                None => return,
                Some(Err(e)) => Err(e.to_status()),
                Some(Ok(mut chunk)) => {
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
                    Ok(chunk)
                }
            };
            let last = item.is_err();
            if self.tx.send(item).await.is_err() || last {
                return;
            }
        }
    }
}
