//! Routing: which provider serves a request, and what happens when it fails.
//!
//! A public model has routes (provider + upstream model + price), each with
//! live figures ([`score`]). Every attempt picks its route afresh by power
//! of two choices over those scores ([`balance`]), skipping routes already
//! tried, so retries sit *above* the balancer as in linkerd: a retry goes
//! to the best route left, not to a fixed "next" one.
//!
//! The attempt loop ([`Router::complete`], [`Router::stream`]) runs until
//! one attempt produces content, within `routing.max_attempts` and the
//! request's deadline:
//!
//! - connection failures, timeouts to first content, 5xx and 429 move on
//!   to the next route; a request the provider refused as malformed is the
//!   client's own fault and is returned at once, never retried;
//! - every retry (and hedge, and continuation) is paid from the model's
//!   [`budget::RetryBudget`], so one provider's outage cannot double the
//!   load on the others;
//! - with `routing.hedge`, an attempt that has produced nothing by the hedge
//!   delay gets a rival on the next best route; the first to produce
//!   content wins and the other is dropped, which cancels its upstream
//!   request at once;
//! - every failed attempt's error is kept for the client's error when none
//!   is left.
//!
//! A stream counts as started at its first *content* chunk: preamble chunks
//! (a role-only delta, Anthropic's `message_start`) are held back, so a
//! provider that fails before content is still a clean failover. After
//! that, [`stream::RoutedStream`] carries the stream across providers when
//! one breaks mid-answer.

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use futures_util::{stream::FuturesUnordered, StreamExt};
use opentelemetry::Context;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::{
    config::{Config, Continuation, Hedge, Modality, Price, ProviderKind},
    error::{Attempts, Error, UpstreamError, UpstreamErrorKind},
    proto::{ChatChunk, ChatCompletion, ChatRequest},
    providers::{self, Adapters, ChatAdapter, ChunkStream, RouteCall},
    telemetry::{AttemptInfo, AttemptSpan, Telemetry},
};

pub mod balance;
pub mod breaker;
pub mod budget;
pub mod ewma;
pub mod media;
pub mod score;
pub mod stream;

use score::{Attempt, Kind, RouteStats};

/// One way to serve a public model.
pub struct Route {
    pub provider: String,
    pub kind: ProviderKind,
    pub upstream_model: String,
    pub adapters: Adapters,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub price: Price,
    pub continuation: Continuation,
    pub stats: Arc<RouteStats>,
}

impl Route {
    /// This route's chat adapter (every route of a chat model has one:
    /// `check` refuses a provider kind that cannot serve its model).
    pub fn chat(&self) -> Result<Arc<dyn ChatAdapter>, UpstreamError> {
        self.adapters.chat.clone().ok_or_else(|| self.unsupported("chat"))
    }

    pub fn unsupported(&self, what: &str) -> UpstreamError {
        UpstreamError::new(&self.provider, UpstreamErrorKind::Unsupported, format!("provider kind {} does not serve {what}", self.kind.as_str()))
    }
}

/// A public model and its routes.
pub struct Model {
    pub id: String,
    pub modality: Modality,
    /// TTS: the voice used when a request names none.
    pub default_voice: Option<String>,
    pub max_output_tokens: u32,
    pub routes: Vec<Arc<Route>>,
    budget: std::sync::Mutex<budget::RetryBudget>,
}

impl Model {
    fn deposit(&self) {
        if let Ok(mut b) = self.budget.lock() {
            b.deposit(Instant::now());
        }
    }

    fn withdraw(&self) -> bool {
        self.budget.lock().map(|mut b| b.try_withdraw(Instant::now())).unwrap_or(false)
    }
}

/// How one request may be routed.
#[derive(Clone)]
pub struct CallOpts {
    pub deadline: Instant,
    /// False when the client sent `X-Switchyard-Failover: off`.
    pub failover: bool,
    /// The request's trace context; attempt spans are its children.
    pub trace: Context,
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
    /// Model ids in config order.
    order: Vec<String>,
    max_attempts: u32,
    hedge: Hedge,
    mid_stream_failover: bool,
    /// What a route's live figures were built with.
    routing: RoutingFigures,
    created: i64,
    http: providers::Clients,
    telemetry: Arc<Telemetry>,
}

/// The settings a route's [`RouteStats`] are made with: a reload that
/// changes them starts every route's figures afresh.
#[derive(Debug, PartialEq)]
struct RoutingFigures {
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    decay: Duration,
}

impl RoutingFigures {
    fn of(config: &Config) -> Self {
        RoutingFigures {
            breaker_threshold: config.routing.breaker_threshold,
            breaker_cooldown: config.routing.breaker_cooldown,
            decay: config.routing.decay,
        }
    }
}

/// The bookkeeping of one request's attempts, shared by the first attempts
/// and any mid-stream continuation.
#[derive(Default)]
pub struct Tries {
    /// Indices of the routes tried.
    pub(crate) tried: Vec<usize>,
    pub(crate) failed: Attempts,
    /// Every attempt launched, by number, and how each ended (an attempt
    /// with no outcome was cancelled: a hedge that lost, or the deadline).
    launched: Vec<(u32, Arc<Route>)>,
    outcomes: Vec<(u32, &'static str, u64, u64)>,
}

impl Tries {
    pub fn count(&self) -> u32 {
        self.tried.len() as u32
    }

    /// Notes how attempt `number` ended, with its input and output tokens.
    pub(crate) fn record(&mut self, number: u32, outcome: &'static str, input: u64, output: u64) {
        self.outcomes.retain(|o| o.0 != number);
        self.outcomes.push((number, outcome, input, output));
    }

    /// The ledger's attempt rows, priced at what each provider will bill.
    pub fn attempt_rows(&self) -> Vec<crate::accounting::AttemptRow> {
        self.launched
            .iter()
            .map(|(n, route)| {
                let (outcome, input, output) = self
                    .outcomes
                    .iter()
                    .find(|o| o.0 == *n)
                    .map_or(("cancelled", 0, 0), |o| (o.1, o.2, o.3));
                crate::accounting::AttemptRow {
                    attempt: *n,
                    provider: route.provider.clone(),
                    upstream_model: route.upstream_model.clone(),
                    outcome: outcome.to_owned(),
                    input_tokens: input,
                    output_tokens: output,
                    provider_cost_usd: crate::accounting::chat_cost(&route.price, input, 0, output),
                }
            })
            .collect()
    }
}

/// What the attempt loop is after.
pub struct Plan<'a> {
    pub kind: Kind,
    /// How the first attempt is labelled in its span (`first`, `continuation`).
    pub first: &'static str,
    /// Which routes may be tried at all.
    pub eligible: &'a (dyn Fn(&Route) -> bool + Sync),
    /// How long one attempt may take to produce what is asked of it; the
    /// route's `timeout` unless set (a generation runs to its end).
    pub attempt_timeout: Option<Duration>,
}

impl Plan<'static> {
    fn first(kind: Kind) -> Self {
        Plan {
            kind,
            first: "first",
            eligible: &|_| true,
            attempt_timeout: None,
        }
    }
}

/// An attempt that produced what was asked of it.
pub struct Won<T> {
    pub value: T,
    pub route: Arc<Route>,
    pub attempt: Attempt,
    pub span: AttemptSpan,
    pub number: u32,
}

type AttemptFuture<T> = Pin<Box<dyn Future<Output = Result<T, UpstreamError>> + Send>>;
/// An attempt under way: its route, its slot and span, and its outcome.
type Launched<T> = Pin<Box<dyn Future<Output = (u32, Arc<Route>, Attempt, AttemptSpan, Result<T, UpstreamError>)> + Send>>;

impl Router {
    pub fn new(config: &Config, http: providers::Clients, telemetry: Arc<Telemetry>) -> Router {
        Router::build(config, http, telemetry, None)
    }

    /// The router for a reloaded `config`: same upstream client (and its
    /// pooled connections). A route that is still there, on the same
    /// provider and upstream model with the same capacity and breaker
    /// settings, keeps its live figures and its breaker; so does a model's
    /// retry budget.
    pub fn reload(&self, config: &Config) -> Router {
        Router::build(config, self.http.clone(), self.telemetry.clone(), Some(self))
    }

    fn build(config: &Config, http: providers::Clients, telemetry: Arc<Telemetry>, previous: Option<&Router>) -> Router {
        let now = Instant::now();
        let adapters: HashMap<&str, (Adapters, &crate::config::ProviderConfig)> =
            config.providers.iter().map(|p| (p.id.as_str(), (providers::adapters(p, &http), p))).collect();
        let same_routing = previous.is_some_and(|old| old.routing == RoutingFigures::of(config));
        let models = config
            .models
            .iter()
            .map(|m| {
                let old = previous.and_then(|r| r.models.get(&m.id));
                let routes = m
                    .routes
                    .iter()
                    .filter_map(|r| {
                        let (adapter, p) = adapters.get(r.provider.as_str())?;
                        let kept = old
                            .and_then(|old| old.routes.iter().find(|o| o.provider == r.provider && o.upstream_model == r.upstream_model))
                            .filter(|o| same_routing && o.stats.max_concurrency() == p.max_concurrency.max(1))
                            .map(|o| o.stats.clone());
                        let stats = kept.unwrap_or_else(|| {
                            Arc::new(RouteStats::with(
                                p.max_concurrency,
                                breaker::Breaker::new(config.routing.breaker_threshold, config.routing.breaker_cooldown, Duration::from_secs(60).max(config.routing.breaker_cooldown)),
                                config.routing.decay,
                                now,
                            ))
                        });
                        Some(Arc::new(Route {
                            provider: r.provider.clone(),
                            kind: p.kind,
                            upstream_model: r.upstream_model.clone(),
                            adapters: adapter.clone(),
                            timeout: p.timeout,
                            idle_timeout: p.idle_timeout,
                            price: r.price.clone(),
                            continuation: r.continuation,
                            stats,
                        }))
                    })
                    .collect();
                // Retries may add 20% to the model's recent traffic, and
                // always at least one a second.
                let budget = old
                    .and_then(|o| o.budget.lock().ok().map(|b| b.clone()))
                    .unwrap_or_else(|| budget::RetryBudget::new(Duration::from_secs(10), 1.0, 0.2, now));
                let model = Model {
                    id: m.id.clone(),
                    modality: m.modality,
                    default_voice: m.default_voice.clone(),
                    max_output_tokens: m.max_output_tokens,
                    routes,
                    budget: std::sync::Mutex::new(budget),
                };
                (m.id.clone(), Arc::new(model))
            })
            .collect();
        Router {
            models,
            order: config.models.iter().map(|m| m.id.clone()).collect(),
            max_attempts: config.routing.max_attempts.max(1),
            hedge: config.routing.hedge,
            mid_stream_failover: config.routing.mid_stream_failover,
            routing: RoutingFigures::of(config),
            created: crate::storage::unix_now(),
            http,
            telemetry,
        }
    }

    /// The public models, in config order.
    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.order.iter().filter_map(|id| self.models.get(id))
    }

    /// When this routing table was built (a model's `created`).
    pub fn created(&self) -> i64 {
        self.created
    }

    pub fn model(&self, id: &str) -> Option<Arc<Model>> {
        self.models.get(id).cloned()
    }

    /// One whole answer from the first provider that gives one.
    pub async fn complete(&self, model: &Arc<Model>, req: Arc<ChatRequest>, opts: &CallOpts, tries: &mut Tries) -> Result<Served<ChatCompletion>, Error> {
        let won = self
            .run(model, &Plan::first(Kind::Sync), opts, tries, |route, call| {
                let req = req.clone();
                let adapter = route.chat();
                Box::pin(async move { adapter?.complete(&req, &call.as_ref()).await })
            })
            .await?;
        let now = Instant::now();
        let usage = won.value.usage;
        let finish = won.value.choices.first().and_then(|c| crate::proto::FinishReason::try_from(c.finish_reason).ok()).and_then(|f| f.openai_name());
        won.span.first_content(now.saturating_duration_since(won.attempt.started()));
        won.span.succeed(usage.as_ref(), finish);
        won.attempt.succeed(usage.map_or(0, |u| u.completion_tokens), now);
        tries.record(won.number, "success", usage.map_or(0, |u| u64::from(u.prompt_tokens)), usage.map_or(0, |u| u64::from(u.completion_tokens)));
        Ok(Served {
            value: won.value,
            route: won.route,
            attempts: tries.count(),
        })
    }

    /// Starts a stream on the best provider that produces content, and
    /// keeps it going across providers if one breaks mid-answer.
    /// On failure, `tries` tells what was attempted; on success it moves
    /// into the stream, which reports it at the end.
    pub async fn stream(self: &Arc<Self>, model: &Arc<Model>, req: Arc<ChatRequest>, opts: CallOpts, tries: &mut Tries) -> Result<Served<stream::RoutedStream>, Error> {
        let won = self
            .run(model, &Plan::first(Kind::Stream), &opts, tries, |route, call| {
                let req = req.clone();
                let route = route.clone();
                Box::pin(async move { first_content(&route, &req, call).await })
            })
            .await?;
        let route = won.route.clone();
        let attempts = tries.count();
        let routed = stream::RoutedStream::new(self.clone(), model.clone(), req, opts, std::mem::take(tries), won);
        Ok(Served {
            value: routed,
            route,
            attempts,
        })
    }

    /// The attempt loop: launches attempts on the best routes left (with a
    /// hedge when configured) until one succeeds, one fails for good, or
    /// attempts, budget, routes or time run out.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        model: &Arc<Model>,
        plan: &Plan<'_>,
        opts: &CallOpts,
        tries: &mut Tries,
        launch: impl Fn(&Arc<Route>, OwnedRouteCall) -> AttemptFuture<T>,
    ) -> Result<Won<T>, Error> {
        if tries.tried.is_empty() {
            model.deposit();
        }
        let mut in_flight = FuturesUnordered::new();
        let mut last_launch = Instant::now();
        let mut budget_spent = false;
        loop {
            if in_flight.is_empty() {
                let attempt_kind = if tries.tried.is_empty() { plan.first } else { "retry" };
                match self.launch(model, plan, opts, tries, attempt_kind, &launch, &mut budget_spent) {
                    Some(f) => {
                        in_flight.push(f);
                        last_launch = Instant::now();
                    }
                    None => break,
                }
            }
            let hedge_at = (in_flight.len() == 1).then(|| self.hedge_delay(model, tries)).flatten().map(|d| last_launch + d);
            tokio::select! {
                // An attempt that ends at the deadline is reported as such.
                biased;
                Some((number, route, attempt, span, result)) = in_flight.next() => {
                    let now = Instant::now();
                    match result {
                        Ok(value) => return Ok(Won { value, route, attempt, span, number }),
                        Err(e) => {
                            tries.record(number, "failure", 0, 0);
                            attempt.fail(&e, now);
                            span.fail(&e, None);
                            if !e.is_retryable() {
                                return Err(e.into());
                            }
                            tracing::warn!(provider = %route.provider, class = e.class(), "attempt failed: {e}");
                            tries.failed.push(e);
                        }
                    }
                }
                _ = sleep_until(hedge_at.unwrap_or(opts.deadline)), if hedge_at.is_some() => {
                    if let Some(f) = self.launch(model, plan, opts, tries, "hedge", &launch, &mut budget_spent) {
                        in_flight.push(f);
                    }
                    last_launch = Instant::now();
                }
                _ = sleep_until(opts.deadline) => break,
            }
        }
        let deadline_passed = Instant::now() >= opts.deadline;
        if tries.tried.is_empty() && !deadline_passed {
            return Err(Error::ProviderUnavailable {
                message: format!("no provider for {} is available right now (all cooling down or with open circuits)", model.id),
                attempts: 0,
            });
        }
        let mut err = tries.failed.exhausted(tries.count(), deadline_passed, &model.id);
        if budget_spent {
            if let Error::ProviderUnavailable { message, .. } = &mut err {
                message.push_str("; the retry budget allowed no further attempt");
            }
        }
        Err(err)
    }

    /// Starts one attempt on the best eligible route left, if any may start.
    #[allow(clippy::too_many_arguments)]
    fn launch<T: Send + 'static>(
        &self,
        model: &Arc<Model>,
        plan: &Plan<'_>,
        opts: &CallOpts,
        tries: &mut Tries,
        attempt_kind: &'static str,
        launch: &impl Fn(&Arc<Route>, OwnedRouteCall) -> AttemptFuture<T>,
        budget_spent: &mut bool,
    ) -> Option<Launched<T>> {
        let now = Instant::now();
        if tries.count() >= self.max_attempts || now >= opts.deadline {
            return None;
        }
        if !tries.tried.is_empty() {
            if !opts.failover {
                return None;
            }
            if !model.withdraw() {
                *budget_spent = true;
                return None;
            }
        }
        let mut skip: Vec<usize> = tries.tried.clone();
        skip.extend(model.routes.iter().enumerate().filter(|(_, r)| !(plan.eligible)(r)).map(|(i, _)| i));
        let (index, attempt) = loop {
            let i = balance::pick(model.routes.iter().map(|r| &*r.stats), &skip, plan.kind, now, &mut rand::rng())?;
            match model.routes[i].stats.acquire(now) {
                Some(a) => break (i, a),
                // Raced with another request for a half-open probe.
                None => skip.push(i),
            }
        };
        tries.tried.push(index);
        let route = model.routes[index].clone();
        let number = tries.count();
        tries.launched.push((number, route.clone()));
        let span = self.telemetry.attempt_span(
            &opts.trace,
            AttemptInfo {
                operation: match model.modality {
                    Modality::Chat => "chat",
                    Modality::Image | Modality::Video => "generate_content",
                    Modality::Tts => "text_to_speech",
                    Modality::Stt => "speech_to_text",
                },
                provider: &route.provider,
                provider_kind: route.kind.as_str(),
                public_model: &model.id,
                upstream_model: &route.upstream_model,
                number: tries.count(),
                kind: attempt_kind,
            },
        );
        let call = OwnedRouteCall {
            upstream_model: route.upstream_model.clone(),
            max_output_tokens: model.max_output_tokens,
            traceparent: span.traceparent(),
        };
        let fut = launch(&route, call);
        let attempt_deadline = opts.deadline.min(now + plan.attempt_timeout.unwrap_or(route.timeout));
        Some(Box::pin(async move {
            let result = match timeout_at(attempt_deadline, fut).await {
                Ok(r) => r,
                Err(_) => Err(timed_out(&route)),
            };
            (number, route, attempt, span, result)
        }))
    }

    /// When to start a hedge beside the single attempt in flight.
    fn hedge_delay(&self, model: &Model, tries: &Tries) -> Option<Duration> {
        if tries.count() >= self.max_attempts {
            return None;
        }
        match self.hedge {
            Hedge::Off => None,
            Hedge::After(d) => Some(d),
            Hedge::P95 => tries.tried.last().and_then(|&i| model.routes[i].stats.p95_ttft()),
        }
    }

    pub fn mid_stream_failover(&self) -> bool {
        self.mid_stream_failover
    }
}

/// A [`RouteCall`] that owns its strings, so attempt futures are `'static`.
#[derive(Debug, Clone)]
pub struct OwnedRouteCall {
    pub upstream_model: String,
    pub max_output_tokens: u32,
    pub traceparent: Option<String>,
}

impl OwnedRouteCall {
    pub fn as_ref(&self) -> RouteCall<'_> {
        RouteCall {
            upstream_model: &self.upstream_model,
            max_output_tokens: self.max_output_tokens,
            traceparent: self.traceparent.as_deref(),
        }
    }
}

fn timed_out(route: &Route) -> UpstreamError {
    UpstreamError::new(&route.provider, UpstreamErrorKind::Timeout, format!("no content within {:?}", route.timeout))
}

/// Opens the upstream stream and reads until its first content chunk.
async fn first_content(route: &Route, req: &ChatRequest, call: OwnedRouteCall) -> Result<Started, UpstreamError> {
    let mut rest = route.chat()?.stream(req, &call.as_ref()).await?;
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
