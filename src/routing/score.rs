//! Live figures for one (provider, model) route, and the score the
//! balancer compares.
//!
//! # The score
//!
//! A route's score is the time a new request can expect to wait there, in
//! seconds, lower being better:
//!
//! ```text
//! score   = latency × (1 + 4 · in_flight / max_concurrency)
//!         + 1 s × error_rate / (1 − error_rate)
//! latency = ttft + 256 tokens / throughput     (streams: time to first
//!                                               token, then generation)
//!         = total                              (sync: the whole answer)
//! ```
//!
//! - *Latency* is a peak-EWMA (see `ewma.rs`): one slow answer raises it at
//!   once, fast ones lower it gradually, and it fades while the route is
//!   idle so a slow route is re-tried eventually. A route with no samples
//!   yet scores 0: every route is tried early, in config order.
//! - *Load* counts requests in flight against the provider's
//!   `max_concurrency`: a provider near its capacity answers slower (and
//!   soon refuses), so it costs up to 5× its latency when full; a full
//!   provider is not chosen at all.
//! - *Errors*: a route failing a share `e` of its attempts needs on average
//!   e/(1−e) failed tries per success, and a failed try costs far more than
//!   its own latency (a retry elsewhere, often after a timeout): each is
//!   priced at a flat second. A half-failing route thus costs a second more
//!   than a healthy one and loses most traffic, however fast it fails. The
//!   rate fades while idle (`routing.decay`), so a healed provider wins its
//!   traffic back.
//!
//! Besides the score, a route can be out entirely: cooling down after an
//! upstream 429/503 with `Retry-After`, or with its circuit open.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    breaker::{self, Breaker},
    ewma::{DecayingRate, Ewma, PeakEwma},
};
use crate::error::{UpstreamError, UpstreamErrorKind};

/// What the request will need from the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stream,
    Sync,
}

/// How long the figures remember, unless configured (`routing.decay`).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// What one failed attempt is taken to cost, in seconds.
const FAILURE_COST: f64 = 1.0;
const EXPECTED_OUTPUT_TOKENS: f64 = 256.0;
const DEFAULT_TOKENS_PER_SEC: f64 = 50.0;
const LOAD_WEIGHT: f64 = 4.0;
const MAX_COOLDOWN: Duration = Duration::from_secs(600);
const TTFT_WINDOW: usize = 64;

pub struct RouteStats {
    max_concurrency: u32,
    decay: Duration,
    in_flight: AtomicU32,
    inner: Mutex<Inner>,
}

struct Inner {
    ttft: Option<PeakEwma>,
    total: Option<PeakEwma>,
    throughput: Ewma,
    errors: DecayingRate,
    cooldown_until: Option<Instant>,
    breaker: Breaker,
    recent_ttft: VecDeque<Duration>,
}

/// A snapshot, for metrics and tests.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub ttft: Option<Duration>,
    pub total: Option<Duration>,
    pub tokens_per_sec: Option<f64>,
    pub error_rate: f64,
    pub in_flight: u32,
    pub breaker: breaker::State,
    pub cooling_down: bool,
}

impl RouteStats {
    pub fn new(max_concurrency: u32, now: Instant) -> Self {
        Self::with(max_concurrency, Breaker::new(5, Duration::from_secs(5), Duration::from_secs(60)), DEFAULT_DECAY, now)
    }

    /// `decay`: the time constant of the latency and error figures.
    pub fn with(max_concurrency: u32, breaker: Breaker, decay: Duration, now: Instant) -> Self {
        RouteStats {
            max_concurrency: max_concurrency.max(1),
            decay,
            in_flight: AtomicU32::new(0),
            inner: Mutex::new(Inner {
                ttft: None,
                total: None,
                throughput: Ewma::new(decay * 3, now),
                errors: DecayingRate::new(decay, now),
                cooldown_until: None,
                breaker,
                recent_ttft: VecDeque::with_capacity(TTFT_WINDOW),
            }),
        }
    }

    pub fn max_concurrency(&self) -> u32 {
        self.max_concurrency
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the figures
        // inconsistent in a way that matters: keep using them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The route's score (lower is better), or `None` while it is out.
    pub fn score(&self, kind: Kind, now: Instant) -> Option<f64> {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        if in_flight >= self.max_concurrency {
            return None;
        }
        let inner = self.lock();
        if inner.cooldown_until.is_some_and(|t| now < t) || !inner.breaker.is_available(now) {
            return None;
        }
        let secs = |e: &Option<PeakEwma>| e.as_ref().map(|e| e.get(now).as_secs_f64());
        let latency = match kind {
            Kind::Sync => secs(&inner.total).unwrap_or(0.0),
            Kind::Stream => match secs(&inner.ttft) {
                None => 0.0,
                Some(ttft) => ttft + EXPECTED_OUTPUT_TOKENS / inner.throughput.get().unwrap_or(DEFAULT_TOKENS_PER_SEC).max(1e-3),
            },
        };
        let load = f64::from(in_flight) / f64::from(self.max_concurrency);
        let errors = inner.errors.get(now).min(0.99);
        Some(latency * (1.0 + LOAD_WEIGHT * load) + FAILURE_COST * errors / (1.0 - errors))
    }

    /// Claims a slot for one attempt: the breaker's probe if it is half
    /// open, and one of `max_concurrency`. `None` if the route is out.
    pub fn acquire(self: &Arc<Self>, now: Instant) -> Option<Attempt> {
        {
            let mut inner = self.lock();
            if inner.cooldown_until.is_some_and(|t| now < t) || !inner.breaker.try_acquire(now) {
                return None;
            }
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Attempt {
            stats: self.clone(),
            started: now,
            ttft: None,
            done: false,
        })
    }

    /// The 95th percentile of recent times to first token.
    pub fn p95_ttft(&self) -> Option<Duration> {
        let inner = self.lock();
        if inner.recent_ttft.len() < 5 {
            return None;
        }
        let mut v: Vec<Duration> = inner.recent_ttft.iter().copied().collect();
        v.sort_unstable();
        let i = ((v.len() as f64) * 0.95).ceil() as usize;
        v.get(i.saturating_sub(1).min(v.len() - 1)).copied()
    }

    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            ttft: inner.ttft.as_ref().map(|e| e.get(now)),
            total: inner.total.as_ref().map(|e| e.get(now)),
            tokens_per_sec: inner.throughput.get(),
            error_rate: inner.errors.get(now),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            breaker: inner.breaker.state(),
            cooling_down: inner.cooldown_until.is_some_and(|t| now < t),
        }
    }
}

fn observe(slot: &mut Option<PeakEwma>, sample: Duration, tau: Duration, now: Instant) {
    match slot {
        Some(e) => e.observe(sample, now),
        None => *slot = Some(PeakEwma::new(sample, tau, now)),
    }
}

/// One attempt in flight on a route. Reports its outcome to the route's
/// figures; dropped without an outcome (the client left, a hedge lost) it
/// only frees its slot.
pub struct Attempt {
    stats: Arc<RouteStats>,
    started: Instant,
    ttft: Option<Duration>,
    done: bool,
}

impl Attempt {
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn ttft(&self) -> Option<Duration> {
        self.ttft
    }

    /// The first content arrived.
    pub fn first_content(&mut self, now: Instant) {
        let ttft = now.saturating_duration_since(self.started);
        self.ttft = Some(ttft);
        let mut inner = self.stats.lock();
        observe(&mut inner.ttft, ttft, self.stats.decay, now);
        if inner.recent_ttft.len() == TTFT_WINDOW {
            inner.recent_ttft.pop_front();
        }
        inner.recent_ttft.push_back(ttft);
    }

    /// The answer completed with `output_tokens` generated.
    pub fn succeed(mut self, output_tokens: u32, now: Instant) {
        self.done = true;
        let total = now.saturating_duration_since(self.started);
        let mut inner = self.stats.lock();
        observe(&mut inner.total, total, self.stats.decay, now);
        let generating = total.saturating_sub(self.ttft.unwrap_or_default()).as_secs_f64();
        if output_tokens > 0 && generating > 1e-3 {
            inner.throughput.observe(f64::from(output_tokens) / generating, now);
        }
        inner.errors.observe(false, now);
        inner.breaker.on_success();
    }

    /// The attempt failed with `err`. Failures that say nothing about the
    /// provider's health (the request was bad, or asked for something this
    /// provider lacks) leave its figures alone.
    pub fn fail(mut self, err: &UpstreamError, now: Instant) {
        self.done = true;
        let mut inner = self.stats.lock();
        match &err.kind {
            UpstreamErrorKind::ClientFault { .. } | UpstreamErrorKind::Unsupported => {
                inner.breaker.on_abandoned(now);
                return;
            }
            UpstreamErrorKind::RateLimited { retry_after: Some(d) } => {
                // The provider said how long: sit out exactly that, and
                // don't also count it as broken.
                inner.cooldown_until = Some(now + (*d).min(MAX_COOLDOWN));
                inner.breaker.on_abandoned(now);
                return;
            }
            UpstreamErrorKind::Timeout if self.ttft.is_none() => {
                // It took at least this long: a real (if censored) sample.
                let waited = now.saturating_duration_since(self.started);
                observe(&mut inner.ttft, waited, self.stats.decay, now);
                observe(&mut inner.total, waited, self.stats.decay, now);
            }
            _ => {}
        }
        inner.errors.observe(true, now);
        inner.breaker.on_failure(now);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.done {
            self.stats.lock().breaker.on_abandoned(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError::new("p", kind, "x")
    }

    #[tokio::test(start_paused = true)]
    async fn slow_routes_score_worse_and_unknown_routes_first() {
        let fast = Arc::new(RouteStats::new(100, Instant::now()));
        let slow = Arc::new(RouteStats::new(100, Instant::now()));
        assert_eq!(fast.score(Kind::Sync, Instant::now()), Some(0.0), "untried routes are tried first");
        let a = fast.acquire(Instant::now()).unwrap();
        let b = slow.acquire(Instant::now()).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        a.succeed(10, Instant::now());
        tokio::time::advance(Duration::from_millis(290)).await;
        b.succeed(10, Instant::now());
        let now = Instant::now();
        assert!(fast.score(Kind::Sync, now).unwrap() < slow.score(Kind::Sync, now).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_load_raise_the_score() {
        let s = Arc::new(RouteStats::new(4, Instant::now()));
        let a = s.acquire(Instant::now()).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        a.succeed(1, Instant::now());
        let base = s.score(Kind::Sync, Instant::now()).unwrap();
        let held: Vec<_> = (0..2).map(|_| s.acquire(Instant::now()).unwrap()).collect();
        let loaded = s.score(Kind::Sync, Instant::now()).unwrap();
        assert!(loaded > base * 2.5, "{loaded} vs {base}");
        let more: Vec<_> = (0..2).map(|_| s.acquire(Instant::now()).unwrap()).collect();
        assert_eq!(s.score(Kind::Sync, Instant::now()), None, "a full provider is not chosen");
        drop(held);
        drop(more);
        for _ in 0..3 {
            s.acquire(Instant::now()).unwrap().fail(&err(UpstreamErrorKind::Server { status: 500 }), Instant::now());
        }
        assert!(s.score(Kind::Sync, Instant::now()).unwrap() > base + 0.5, "failures cost far more than latency");
    }

    #[tokio::test(start_paused = true)]
    async fn a_healed_route_wins_back_as_its_errors_fade() {
        let flaky = Arc::new(RouteStats::new(100, Instant::now()));
        let steady = Arc::new(RouteStats::new(100, Instant::now()));
        for i in 0..20 {
            let a = flaky.acquire(Instant::now()).unwrap();
            if i % 2 == 0 {
                a.fail(&err(UpstreamErrorKind::Server { status: 500 }), Instant::now());
            } else {
                a.succeed(1, Instant::now());
            }
            let b = steady.acquire(Instant::now()).unwrap();
            tokio::time::advance(Duration::from_millis(50)).await;
            b.succeed(1, Instant::now());
        }
        let now = Instant::now();
        assert!(flaky.score(Kind::Sync, now).unwrap() > steady.score(Kind::Sync, now).unwrap() * 5.0);
        tokio::time::advance(Duration::from_secs(40)).await;
        let now = Instant::now();
        assert!(flaky.score(Kind::Sync, now).unwrap() < 0.02, "faded: {:?}", flaky.score(Kind::Sync, now));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_takes_the_route_out_for_that_long() {
        let s = Arc::new(RouteStats::new(4, Instant::now()));
        s.acquire(Instant::now())
            .unwrap()
            .fail(&err(UpstreamErrorKind::RateLimited { retry_after: Some(Duration::from_secs(3)) }), Instant::now());
        assert_eq!(s.score(Kind::Sync, Instant::now()), None);
        assert!(s.acquire(Instant::now()).is_none());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(s.score(Kind::Sync, Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn client_faults_do_not_count_against_the_provider() {
        let s = Arc::new(RouteStats::new(4, Instant::now()));
        for _ in 0..10 {
            s.acquire(Instant::now()).unwrap().fail(&err(UpstreamErrorKind::ClientFault { status: 400 }), Instant::now());
        }
        assert_eq!(s.snapshot(Instant::now()).error_rate, 0.0);
        assert_eq!(s.snapshot(Instant::now()).breaker, breaker::State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn p95_of_recent_ttft() {
        let s = Arc::new(RouteStats::new(100, Instant::now()));
        for ms in 1..=20u64 {
            let mut a = s.acquire(Instant::now()).unwrap();
            tokio::time::advance(Duration::from_millis(ms)).await;
            a.first_content(Instant::now());
            a.succeed(1, Instant::now());
        }
        assert_eq!(s.p95_ttft(), Some(Duration::from_millis(19)));
    }
}
