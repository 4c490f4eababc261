//! Per-key rate limits: requests per minute and tokens per minute.
//!
//! Each check is one atomic step over both limits — admitted only if both
//! admit, and counted only then — with the GCRA arithmetic of [`gcra`]. The
//! `memory` backend keeps the figures in this process (the embedded
//! default); `redis://...` keeps them in Redis, checked by one Lua script, so
//! a limit holds across every replica. If Redis cannot be reached the
//! limiter keeps serving from its local figures, logs it, and reports
//! itself degraded (`/readyz`), rather than refusing traffic or taking every
//! replica out of the load balancer at once.
//!
//! Input tokens are estimated at admission and reconciled with the real
//! usage afterwards ([`Limiter::reconcile`]).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

use tokio::time::Instant;

pub mod gcra;
mod redis;

pub use gcra::{Decision, Rate};

/// A key's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests: Option<Rate>,
    pub tokens: Option<Rate>,
}

impl Limits {
    pub fn per_minute(requests: Option<u32>, tokens: Option<u64>) -> Limits {
        Limits {
            requests: requests.map(|n| Rate::per_minute(u64::from(n))),
            tokens: tokens.map(Rate::per_minute),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

/// What a check decided, with the figures for the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Verdict {
    pub allowed: bool,
    pub requests: Option<Decision>,
    pub tokens: Option<Decision>,
}

fn ceil_secs(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

impl Verdict {
    fn unlimited() -> Verdict {
        Verdict {
            allowed: true,
            requests: None,
            tokens: None,
        }
    }

    /// Whole seconds until the request would be admitted (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        let us = [self.requests, self.tokens].iter().flatten().map(|d| d.retry_after_us).max().unwrap_or(0);
        ceil_secs(us).max(1)
    }

    /// `X-RateLimit-*` headers (lower case, as gRPC metadata wants them),
    /// with names made at compile time: no allocation, no validation.
    pub fn headers(&self) -> impl Iterator<Item = (http::HeaderName, u64)> {
        use http::HeaderName;
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit"),
                HeaderName::from_static("x-ratelimit-remaining"),
                HeaderName::from_static("x-ratelimit-reset"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ],
        ];
        [self.requests, self.tokens].into_iter().zip(NAMES).flat_map(|(d, [limit, remaining, reset])| {
            d.into_iter()
                .flat_map(move |d| [(limit.clone(), d.limit), (remaining.clone(), d.remaining), (reset.clone(), ceil_secs(d.reset_us))])
        })
    }
}

/// The figures kept in this process: TATs by key, in microseconds on
/// tokio's clock.
struct Local {
    epoch: Instant,
    tats: Mutex<HashMap<Box<str>, Tats>>,
}

/// A key's theoretical arrival times, one per limit.
#[derive(Debug, Clone, Copy, Default)]
struct Tats {
    requests: Option<f64>,
    tokens: Option<f64>,
}

/// Keys idle this long have a full allowance again and are forgotten.
const MAX_LOCAL_KEYS: usize = 100_000;

impl Local {
    fn new() -> Local {
        Local {
            epoch: Instant::now(),
            tats: Mutex::new(HashMap::new()),
        }
    }

    fn now_us(&self) -> f64 {
        Instant::now().saturating_duration_since(self.epoch).as_micros() as f64
    }

    /// Changes the key's entry, made on first sight (the only allocation).
    fn update(tats: &mut HashMap<Box<str>, Tats>, key: &str, f: impl FnOnce(&mut Tats)) {
        match tats.get_mut(key) {
            Some(t) => f(t),
            None => {
                let mut t = Tats::default();
                f(&mut t);
                tats.insert(key.into(), t);
            }
        }
    }

    fn check(&self, key: &str, limits: &Limits, token_cost: u64, peek: bool) -> Verdict {
        let now = self.now_us();
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let held = tats.get(key).copied().unwrap_or_default();
        let requests = limits.requests.map(|r| gcra::check(r, held.requests, now, if peek { 0 } else { 1 }));
        let tokens = limits.tokens.map(|r| gcra::check(r, held.tokens, now, if peek { 0 } else { token_cost }));
        let allowed = requests.is_none_or(|d| d.allowed) && tokens.is_none_or(|d| d.allowed);
        if !allowed {
            // Nothing is counted: show each limit as it stands, with the
            // wait of whichever limit refused.
            let unchanged = |rate: Option<Rate>, tat: Option<f64>, d: Option<Decision>| {
                rate.zip(d).map(|(r, d)| Decision {
                    allowed: false,
                    retry_after_us: if d.allowed { 0 } else { d.retry_after_us },
                    ..gcra::check(r, tat, now, 0)
                })
            };
            return Verdict {
                allowed,
                requests: unchanged(limits.requests, held.requests, requests),
                tokens: unchanged(limits.tokens, held.tokens, tokens),
            };
        }
        if !peek && (requests.is_some() || tokens.is_some()) {
            if tats.len() >= MAX_LOCAL_KEYS {
                tats.retain(|_, t| t.requests.is_some_and(|tat| tat > now) || t.tokens.is_some_and(|tat| tat > now));
            }
            Self::update(&mut tats, key, |t| {
                if let Some(d) = requests {
                    t.requests = Some(d.tat_us);
                }
                if let Some(d) = tokens {
                    t.tokens = Some(d.tat_us);
                }
            });
        }
        Verdict { allowed, requests, tokens }
    }

    fn reconcile(&self, key: &str, rate: Rate, delta: i64) {
        let now = self.now_us();
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        Self::update(&mut tats, key, |t| t.tokens = Some(gcra::adjust(rate, t.tokens, now, delta)));
    }
}

pub struct Limiter {
    local: Local,
    redis: Option<redis::RedisLimiter>,
    degraded: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("limits backend: {0}")]
pub struct LimitsError(String);

impl Limiter {
    /// `backend`: `memory` or a `redis://` URL. Redis is connected lazily,
    /// so a gateway starts (degraded) while Redis is down.
    pub fn new(backend: &str) -> Result<Limiter, LimitsError> {
        let redis = if backend == "memory" {
            None
        } else {
            Some(redis::RedisLimiter::new(backend).map_err(|e| LimitsError(e.to_string()))?)
        };
        Ok(Limiter {
            local: Local::new(),
            redis,
            degraded: AtomicBool::new(false),
        })
    }

    pub fn backend_name(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "memory"
        }
    }

    /// Whether the shared backend is unreachable and local figures serve.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn set_degraded(&self, degraded: bool, why: &str) {
        if self.degraded.swap(degraded, Ordering::Relaxed) != degraded {
            if degraded {
                tracing::error!("rate limits: Redis unreachable ({why}); enforcing per replica until it is back");
            } else {
                tracing::info!("rate limits: Redis reachable again; limits hold across replicas");
            }
        }
    }

    /// Checks (and, if admitted, counts) one request of `token_cost`
    /// estimated tokens.
    pub async fn check(&self, key: &str, limits: &Limits, token_cost: u64) -> Verdict {
        self.decide(key, limits, token_cost, false).await
    }

    /// The figures now, counting nothing (for responses to requests refused
    /// before the rate-limit step).
    pub async fn peek(&self, key: &str, limits: &Limits) -> Verdict {
        self.decide(key, limits, 0, true).await
    }

    async fn decide(&self, key: &str, limits: &Limits, token_cost: u64, peek: bool) -> Verdict {
        if limits.is_empty() {
            return Verdict::unlimited();
        }
        if let Some(r) = &self.redis {
            match r.check(key, limits, token_cost, peek).await {
                Ok(v) => {
                    self.set_degraded(false, "");
                    return v;
                }
                Err(e) => self.set_degraded(true, &e),
            }
        }
        self.local.check(key, limits, token_cost, peek)
    }

    /// Corrects the token count charged at admission by `delta` (actual
    /// minus estimated).
    pub async fn reconcile(&self, key: &str, limits: &Limits, delta: i64) {
        let Some(rate) = limits.tokens else { return };
        if delta == 0 {
            return;
        }
        if let Some(r) = &self.redis {
            match r.reconcile(key, rate, delta).await {
                Ok(()) => return,
                Err(e) => self.set_degraded(true, &e),
            }
        }
        self.local.reconcile(key, rate, delta);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn both_limits_admit_or_nothing_counts() {
        let l = Limiter::new("memory").unwrap();
        let limits = Limits::per_minute(Some(10), Some(100));
        assert!(l.check("k", &limits, 90).await.allowed);
        let v = l.check("k", &limits, 50).await;
        assert!(!v.allowed, "over the token limit");
        assert_eq!(v.requests.unwrap().remaining, 9, "the refused request did not count");
        let h: Vec<_> = l.peek("k", &limits).await.headers().collect();
        assert!(h.iter().any(|(k, v)| k == "x-ratelimit-remaining" && *v == 9), "{h:?}");
        assert!(h.iter().any(|(k, v)| k == "x-ratelimit-remaining-tokens" && *v == 10), "{h:?}");
        assert_eq!(h.len(), 6);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(l.check("k", &limits, 50).await.allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn reconciliation_charges_real_usage() {
        let l = Limiter::new("memory").unwrap();
        let limits = Limits::per_minute(None, Some(1000));
        l.check("k", &limits, 100).await;
        l.reconcile("k", &limits, 400).await;
        assert_eq!(l.peek("k", &limits).await.tokens.unwrap().remaining, 500);
        l.reconcile("k", &limits, -200).await;
        assert_eq!(l.peek("k", &limits).await.tokens.unwrap().remaining, 700);
    }

    #[tokio::test]
    async fn an_unreachable_redis_degrades_to_local_limits() {
        // Nothing listens on port 1.
        let l = Limiter::new("redis://127.0.0.1:1").unwrap();
        let limits = Limits::per_minute(Some(2), None);
        assert!(l.check("k", &limits, 0).await.allowed);
        assert!(l.is_degraded());
        assert!(l.check("k", &limits, 0).await.allowed);
        assert!(!l.check("k", &limits, 0).await.allowed, "still limited, per replica");
    }
}
