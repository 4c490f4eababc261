//! Routing: which provider serves a request, and what happens when it fails.
//!
//! A public model has routes (provider + upstream model + price). For now
//! candidates are tried in config order; the live scorer replaces that
//! order without changing the attempt loop. The loop tries candidates until
//! one answers, within `routing.max_attempts` and the request's deadline:
//! connection failures, timeouts to first content, 5xx and 429 move on to
//! the next provider; a request the provider refused as malformed is the
//! client's own fault and is returned at once. Every failed attempt is kept
//! for the error the client gets when none is left.
//!
//! A stream counts as started at its first *content* chunk: preamble chunks
//! (a role-only delta) are held back, so a provider that fails before
//! content is still a clean failover and the client never sees it.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::time::{timeout_at, Instant};

use crate::{
    config::{Config, Continuation, Price},
    error::{Attempts, Error, UpstreamError, UpstreamErrorKind},
    proto::{ChatChunk, ChatCompletion, ChatRequest},
    providers::{self, ChatAdapter, ChunkStream, RouteCall},
};

/// One way to serve a public model.
pub struct Route {
    pub provider: String,
    pub upstream_model: String,
    pub adapter: Arc<dyn ChatAdapter>,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub price: Price,
    pub continuation: Continuation,
}

/// A public model and its routes.
pub struct Model {
    pub id: String,
    pub max_output_tokens: u32,
    pub routes: Vec<Arc<Route>>,
}

/// What served a request.
pub struct Served<T> {
    pub value: T,
    pub route: Arc<Route>,
    /// Attempts made before the response began, the serving one included.
    pub attempts: u32,
}

/// A stream whose first content has arrived.
pub struct Started {
    /// Preamble and the first content chunk, in order.
    pub head: Vec<ChatChunk>,
    /// The rest of the upstream stream.
    pub rest: ChunkStream,
    /// `true` when the upstream already ended (all of it is in `head`).
    pub finished: bool,
}

pub struct Router {
    models: HashMap<String, Arc<Model>>,
    max_attempts: u32,
}

impl Router {
    pub fn new(config: &Config, http: reqwest::Client) -> Router {
        let adapters: HashMap<&str, (Arc<dyn ChatAdapter>, &crate::config::ProviderConfig)> = config
            .providers
            .iter()
            .filter_map(|p| providers::chat_adapter(p, http.clone()).map(|a| (p.id.as_str(), (a, p))))
            .collect();
        let models = config
            .models
            .iter()
            .map(|m| {
                let routes = m
                    .routes
                    .iter()
                    .filter_map(|r| {
                        let (adapter, p) = adapters.get(r.provider.as_str())?;
                        Some(Arc::new(Route {
                            provider: r.provider.clone(),
                            upstream_model: r.upstream_model.clone(),
                            adapter: adapter.clone(),
                            timeout: p.timeout,
                            idle_timeout: p.idle_timeout,
                            price: r.price.clone(),
                            continuation: r.continuation,
                        }))
                    })
                    .collect();
                let model = Model {
                    id: m.id.clone(),
                    max_output_tokens: m.max_output_tokens,
                    routes,
                };
                (m.id.clone(), Arc::new(model))
            })
            .collect();
        Router {
            models,
            max_attempts: config.routing.max_attempts.max(1),
        }
    }

    pub fn model(&self, id: &str) -> Option<Arc<Model>> {
        self.models.get(id).cloned()
    }

    /// The routes to try, best first, at most `max_attempts` of them (one
    /// when the client forbade failover).
    fn candidates<'a>(&'a self, model: &'a Model, failover: bool) -> impl Iterator<Item = &'a Arc<Route>> + 'a {
        let n = if failover { self.max_attempts as usize } else { 1 };
        model.routes.iter().take(n)
    }

    /// One whole answer from the first provider that gives one.
    pub async fn complete(&self, model: &Model, req: &ChatRequest, deadline: Instant, failover: bool) -> Result<Served<ChatCompletion>, Error> {
        let mut failed = Attempts::default();
        for route in self.candidates(model, failover) {
            if Instant::now() >= deadline {
                break;
            }
            let call = route_call(model, route);
            let attempt_deadline = deadline.min(Instant::now() + route.timeout);
            let outcome = match timeout_at(attempt_deadline, route.adapter.complete(req, &call)).await {
                Ok(r) => r,
                Err(_) => Err(timed_out(route)),
            };
            match outcome {
                Ok(value) => {
                    return Ok(Served {
                        value,
                        route: route.clone(),
                        attempts: failed.failures.len() as u32 + 1,
                    })
                }
                Err(e) if !e.is_retryable() => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(provider = %route.provider, class = e.class(), "attempt failed: {e}");
                    failed.push(e);
                }
            }
        }
        Err(failed.exhausted(Instant::now() >= deadline, &model.id))
    }

    /// Starts a stream on the first provider that produces content.
    pub async fn stream(&self, model: &Model, req: &ChatRequest, deadline: Instant, failover: bool) -> Result<Served<Started>, Error> {
        let mut failed = Attempts::default();
        for route in self.candidates(model, failover) {
            if Instant::now() >= deadline {
                break;
            }
            let attempt_deadline = deadline.min(Instant::now() + route.timeout);
            let outcome = match timeout_at(attempt_deadline, first_content(model, route, req)).await {
                Ok(r) => r,
                Err(_) => Err(timed_out(route)),
            };
            match outcome {
                Ok(value) => {
                    return Ok(Served {
                        value,
                        route: route.clone(),
                        attempts: failed.failures.len() as u32 + 1,
                    })
                }
                Err(e) if !e.is_retryable() => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(provider = %route.provider, class = e.class(), "attempt failed before content: {e}");
                    failed.push(e);
                }
            }
        }
        Err(failed.exhausted(Instant::now() >= deadline, &model.id))
    }
}

fn route_call<'a>(model: &Model, route: &'a Route) -> RouteCall<'a> {
    RouteCall {
        upstream_model: &route.upstream_model,
        max_output_tokens: model.max_output_tokens,
    }
}

fn timed_out(route: &Route) -> UpstreamError {
    UpstreamError::new(&route.provider, UpstreamErrorKind::Timeout, format!("no content within {:?}", route.timeout))
}

/// Opens the upstream stream and reads until its first content chunk.
async fn first_content(model: &Model, route: &Route, req: &ChatRequest) -> Result<Started, UpstreamError> {
    let mut rest = route.adapter.stream(req, &route_call(model, route)).await?;
    let mut head = Vec::new();
    loop {
        match rest.next().await {
            Some(Ok(chunk)) => {
                let content = chunk.has_content();
                head.push(chunk);
                if content {
                    return Ok(Started { head, rest, finished: false });
                }
            }
            Some(Err(e)) => return Err(e),
            None => return Ok(Started { head, rest, finished: true }),
        }
    }
}
