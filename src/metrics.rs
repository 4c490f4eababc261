//! Prometheus metrics (`GET /metrics`, API.md): names prefixed
//! `switchyard_`, served in the OpenMetrics text format Prometheus scrapes.
//!
//! Where each figure comes from:
//!
//! - requests and their latency: [`Outcome`], put in every request's
//!   extensions by the trace layer ([`crate::telemetry::trace_request`]),
//!   filled in by the core (key, model) and read back when the response
//!   body ends (code);
//! - attempts, failovers and time to first token: every ledger entry
//!   ([`Metrics::observe_entry`]), so chat, media and generation jobs alike;
//! - limiter decisions: the gate's rate-limit step;
//! - routes' scores, breakers and load, and the ledger queue: read at
//!   scrape time ([`Metrics::render`]).
//!
//! Label values are bounded: endpoints are the routes and gRPC methods the
//! server has (anything else is `unknown`), models are configured ones,
//! keys are key names, codes are API.md's.

use std::{
    collections::HashSet,
    sync::{atomic::AtomicU64, Arc, Mutex, OnceLock},
    time::Duration,
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use prost::Message;
use tokio::time::Instant;

use crate::{
    accounting::Entry,
    routing::{breaker, score::Kind, Router},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    model: String,
    key: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    endpoint: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    provider: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    model: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

type GaugeF = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<LatencyLabels, Histogram>,
    ttft: Family<ModelLabels, Histogram>,
    attempts: Family<AttemptLabels, Counter>,
    failovers: Family<ProviderLabels, Counter>,
    limiter: Family<DecisionLabels, Counter>,
    reloads: Counter,
    route_score: Family<RouteLabels, GaugeF>,
    route_breaker: Family<RouteLabels, Gauge>,
    route_in_flight: Family<RouteLabels, Gauge>,
    route_error_rate: Family<RouteLabels, GaugeF>,
    ledger_queue: Gauge,
    limiter_degraded: Gauge,
    draining: Gauge,
    /// gRPC methods this server has (`/package.Service/Method`).
    grpc_methods: HashSet<String>,
    /// Serialises scrapes: the route gauges are cleared and refilled.
    scrape: Mutex<()>,
}

fn latency_buckets() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    /// `descriptor_sets`: the encoded descriptor sets of the gRPC services
    /// served, whose methods are the gRPC endpoints counted by name.
    pub fn new(descriptor_sets: &[&[u8]]) -> Metrics {
        let mut registry = Registry::with_prefix("switchyard");
        let requests = Family::default();
        registry.register("requests", "Requests answered, by endpoint, model, key name and code (ok or API.md's error code)", requests.clone());
        let duration = Family::<LatencyLabels, Histogram>::new_with_constructor(latency_buckets as fn() -> Histogram);
        registry.register("request_duration_seconds", "Time from request to the end of its response (a stream's last byte)", duration.clone());
        let ttft = Family::<ModelLabels, Histogram>::new_with_constructor(latency_buckets as fn() -> Histogram);
        registry.register("ttft_seconds", "Time from admission to the first content from a provider, by model", ttft.clone());
        let attempts = Family::default();
        registry.register("attempts", "Provider attempts, by provider and outcome (success, failure, cancelled)", attempts.clone());
        let failovers = Family::default();
        registry.register("failovers", "Failed attempts that another provider took over, by the provider that failed", failovers.clone());
        let limiter = Family::default();
        registry.register("limiter_decisions", "Rate-limit decisions, allowed or limited", limiter.clone());
        let reloads = Counter::default();
        registry.register("config_reloads", "Config reloads applied", reloads.clone());
        let route_score = Family::default();
        registry.register("route_score", "A route's live score (lower is better; absent while the route is out)", route_score.clone());
        let route_breaker = Family::default();
        registry.register("route_breaker_state", "A route's circuit breaker: 0 closed, 1 half open, 2 open", route_breaker.clone());
        let route_in_flight = Family::default();
        registry.register("route_in_flight", "Attempts in flight on a route", route_in_flight.clone());
        let route_error_rate = Family::default();
        registry.register("route_error_rate", "A route's decaying error rate", route_error_rate.clone());
        let ledger_queue = Gauge::default();
        registry.register("ledger_queue_depth", "Ledger entries journaled on this replica and not yet in the database", ledger_queue.clone());
        let limiter_degraded = Gauge::default();
        registry.register("limiter_degraded", "1 while the shared limits backend is unreachable and limits hold per replica", limiter_degraded.clone());
        let draining = Gauge::default();
        registry.register("draining", "1 once this replica has begun shutting down", draining.clone());
        let grpc_methods = descriptor_sets
            .iter()
            .filter_map(|bytes| prost_types::FileDescriptorSet::decode(*bytes).ok())
            .flat_map(|set| set.file)
            .flat_map(|file| {
                let package = file.package.clone().unwrap_or_default();
                file.service.into_iter().flat_map(move |s| {
                    let service = format!("{package}.{}", s.name.unwrap_or_default());
                    s.method.into_iter().map(move |m| format!("/{service}/{}", m.name.unwrap_or_default()))
                })
            })
            .collect();
        Metrics {
            registry,
            requests,
            duration,
            ttft,
            attempts,
            failovers,
            limiter,
            reloads,
            route_score,
            route_breaker,
            route_in_flight,
            route_error_rate,
            ledger_queue,
            limiter_degraded,
            draining,
            grpc_methods,
            scrape: Mutex::new(()),
        }
    }

    /// The endpoint label for a gRPC path: the method, if this server has it.
    pub fn grpc_endpoint(&self, path: &str) -> Option<&str> {
        self.grpc_methods.get(path).map(|s| s.trim_start_matches('/'))
    }

    /// One finished request.
    pub fn request(&self, endpoint: &str, outcome: &Outcome, code: &'static str, elapsed: Duration) {
        let latency = LatencyLabels {
            endpoint: endpoint.to_owned(),
            model: outcome.model.get().cloned().unwrap_or_default(),
        };
        self.duration.get_or_create(&latency).observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: latency.endpoint,
                model: latency.model,
                key: outcome.key.get().cloned().unwrap_or_default(),
                code,
            })
            .inc();
    }

    /// Attempts, failovers and time to first content of one routed request.
    pub fn observe_entry(&self, entry: &Entry) {
        if let Some(ms) = entry.row.ttft_ms {
            self.ttft.get_or_create(&ModelLabels { model: entry.row.model.clone() }).observe(ms as f64 / 1000.0);
        }
        let last = entry.attempts.iter().map(|a| a.attempt).max().unwrap_or(0);
        for a in &entry.attempts {
            self.attempts
                .get_or_create(&AttemptLabels {
                    provider: a.provider.clone(),
                    outcome: a.outcome.clone(),
                })
                .inc();
            if a.outcome == "failure" && a.attempt < last {
                self.failovers.get_or_create(&ProviderLabels { provider: a.provider.clone() }).inc();
            }
        }
    }

    pub fn limiter_decision(&self, allowed: bool) {
        let decision = if allowed { "allowed" } else { "limited" };
        self.limiter.get_or_create(&DecisionLabels { decision }).inc();
    }

    pub fn reloaded(&self) {
        self.reloads.inc();
    }

    /// The Prometheus text of everything, with the live figures read now.
    pub fn render(&self, live: Live<'_>) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Routes come and go with reloads: only the current ones are shown.
        self.route_score.clear();
        self.route_breaker.clear();
        self.route_in_flight.clear();
        self.route_error_rate.clear();
        for model in live.router.models() {
            for route in &model.routes {
                let labels = RouteLabels {
                    model: model.id.clone(),
                    provider: route.provider.clone(),
                };
                let snap = route.stats.snapshot(now);
                if let Some(score) = route.stats.score(Kind::Sync, now) {
                    self.route_score.get_or_create(&labels).set(score);
                }
                let state = match snap.breaker {
                    breaker::State::Closed => 0,
                    breaker::State::HalfOpen => 1,
                    breaker::State::Open { .. } => 2,
                };
                self.route_breaker.get_or_create(&labels).set(state);
                self.route_in_flight.get_or_create(&labels).set(i64::from(snap.in_flight));
                self.route_error_rate.get_or_create(&labels).set(snap.error_rate);
            }
        }
        self.ledger_queue.set(live.ledger_queue as i64);
        self.limiter_degraded.set(i64::from(live.limiter_degraded));
        self.draining.set(i64::from(live.draining));
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What a scrape reads from the running server.
pub struct Live<'a> {
    pub router: &'a Router,
    pub ledger_queue: usize,
    pub limiter_degraded: bool,
    pub draining: bool,
}

/// What the core learns about a request for its metrics: who asked, for
/// which model, and the error code of an error it sent in-band (a stream
/// that failed after its status line).
#[derive(Debug)]
pub struct Outcome {
    key: OnceLock<String>,
    model: OnceLock<String>,
    code: OnceLock<&'static str>,
    started: Instant,
}

impl Outcome {
    pub fn new() -> Arc<Outcome> {
        Arc::new(Outcome {
            key: OnceLock::new(),
            model: OnceLock::new(),
            code: OnceLock::new(),
            started: Instant::now(),
        })
    }

    /// The key's name (the first one set counts: the façade and the core
    /// both know it).
    pub fn set_key(&self, name: &str) {
        self.key.get_or_init(|| name.to_owned());
    }

    pub fn set_model(&self, id: &str) {
        self.model.get_or_init(|| id.to_owned());
    }

    /// The request failed with `code` (the first one set counts).
    pub fn set_code(&self, code: &'static str) {
        let _ = self.code.set(code);
    }

    pub fn key(&self) -> Option<&str> {
        self.key.get().map(String::as_str)
    }

    pub fn model(&self) -> Option<&str> {
        self.model.get().map(String::as_str)
    }

    pub fn code(&self) -> Option<&'static str> {
        self.code.get().copied()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Ledger entries' figures go to the metrics once they are set; a ledger
/// without them (tools, benches) records nothing.
#[derive(Default)]
pub struct Sink(OnceLock<Arc<Metrics>>);

impl Sink {
    pub fn set(&self, metrics: Arc<Metrics>) {
        let _ = self.0.set(metrics);
    }

    pub fn observe_entry(&self, entry: &Entry) {
        if let Some(m) = self.0.get() {
            m.observe_entry(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{AttemptRow, LedgerRow};

    fn attempt(n: u32, provider: &str, outcome: &str) -> AttemptRow {
        AttemptRow {
            attempt: n,
            provider: provider.into(),
            upstream_model: "m".into(),
            outcome: outcome.into(),
            input_tokens: 0,
            output_tokens: 0,
            provider_cost_usd: 0.0,
        }
    }

    #[test]
    fn a_failed_attempt_another_took_over_is_a_failover() {
        let m = Metrics::new(&[crate::proto::FILE_DESCRIPTOR_SET]);
        let mut row = LedgerRow::new("r".into(), None, "k".into(), "gpt".into());
        row.ttft_ms = Some(12);
        m.observe_entry(&Entry {
            row,
            attempts: vec![attempt(1, "a", "failure"), attempt(2, "b", "failure"), attempt(3, "c", "success")],
        });
        // The last attempt failing is not a failover: nobody took over.
        m.observe_entry(&Entry {
            row: LedgerRow::new("s".into(), None, "k".into(), "gpt".into()),
            attempts: vec![attempt(1, "c", "failure")],
        });
        let text = m.render(Live {
            router: &Router::new(&crate::Config::default(), crate::providers::Clients::new().unwrap(), Arc::new(crate::telemetry::Telemetry::new(&Default::default()).unwrap())),
            ledger_queue: 3,
            limiter_degraded: false,
            draining: false,
        });
        assert!(text.contains("switchyard_failovers_total{provider=\"a\"} 1"), "{text}");
        assert!(text.contains("switchyard_failovers_total{provider=\"b\"} 1"), "{text}");
        assert!(!text.contains("switchyard_failovers_total{provider=\"c\"}"), "{text}");
        assert!(text.contains("switchyard_attempts_total{provider=\"c\",outcome=\"failure\"} 1"), "{text}");
        assert!(text.contains("switchyard_ttft_seconds_count{model=\"gpt\"} 1"), "{text}");
        assert!(text.contains("switchyard_ledger_queue_depth 3"), "{text}");
    }

    #[test]
    fn only_the_servers_own_grpc_methods_are_endpoints() {
        let m = Metrics::new(&[crate::proto::FILE_DESCRIPTOR_SET]);
        assert_eq!(m.grpc_endpoint("/switchyard.v1.Chat/CompleteStream"), Some("switchyard.v1.Chat/CompleteStream"));
        assert_eq!(m.grpc_endpoint("/switchyard.v1.Chat/Nope"), None);
    }
}
