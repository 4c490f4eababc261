//! Moving averages over irregular samples, on tokio's clock (so tests can
//! pause and advance it).
//!
//! [`PeakEwma`] is the latency estimate tower's `load/peak_ewma.rs`
//! describes: a sample above the estimate replaces it at once (a provider
//! that just got slow is treated as slow *now*), a sample below pulls it
//! down gradually, and with no samples at all it decays towards zero — so a
//! provider that was slow and then left alone is eventually tried again and
//! can win its traffic back.
//!
//! [`Ewma`] is the plain time-weighted average used for throughput, and
//! [`DecayingRate`] the error rate, which also fades while nothing is
//! observed: an old outage must not shut a provider out forever.

use std::time::Duration;

use tokio::time::Instant;

fn weight(elapsed: Duration, tau: Duration) -> f64 {
    (-elapsed.as_secs_f64() / tau.as_secs_f64().max(1e-9)).exp()
}

#[derive(Debug, Clone)]
pub struct PeakEwma {
    /// Seconds.
    estimate: f64,
    at: Instant,
    tau: Duration,
}

impl PeakEwma {
    pub fn new(initial: Duration, tau: Duration, now: Instant) -> Self {
        PeakEwma {
            estimate: initial.as_secs_f64(),
            at: now,
            tau,
        }
    }

    pub fn observe(&mut self, sample: Duration, now: Instant) {
        let sample = sample.as_secs_f64();
        let current = self.get_secs(now);
        self.estimate = if sample > current {
            sample
        } else {
            let w = weight(now.saturating_duration_since(self.at), self.tau);
            current * w + sample * (1.0 - w)
        };
        self.at = now;
    }

    fn get_secs(&self, now: Instant) -> f64 {
        self.estimate * weight(now.saturating_duration_since(self.at), self.tau)
    }

    /// The estimate, decayed for the time since the last sample.
    pub fn get(&self, now: Instant) -> Duration {
        Duration::from_secs_f64(self.get_secs(now))
    }
}

/// A time-weighted average: the weight of old samples halves every
/// `tau · ln 2`.
#[derive(Debug, Clone)]
pub struct Ewma {
    value: Option<f64>,
    at: Instant,
    tau: Duration,
}

impl Ewma {
    pub fn new(tau: Duration, now: Instant) -> Self {
        Ewma { value: None, at: now, tau }
    }

    pub fn observe(&mut self, sample: f64, now: Instant) {
        self.value = Some(match self.value {
            None => sample,
            Some(v) => {
                let w = weight(now.saturating_duration_since(self.at), self.tau);
                // A burst of samples at one instant still moves the average.
                let w = w.min(0.9);
                v * w + sample * (1.0 - w)
            }
        });
        self.at = now;
    }

    pub fn get(&self) -> Option<f64> {
        self.value
    }
}

/// The share of recent attempts that failed, fading towards zero while no
/// attempt is made.
#[derive(Debug, Clone)]
pub struct DecayingRate {
    rate: f64,
    at: Instant,
    tau: Duration,
}

impl DecayingRate {
    pub fn new(tau: Duration, now: Instant) -> Self {
        DecayingRate { rate: 0.0, at: now, tau }
    }

    pub fn observe(&mut self, failed: bool, now: Instant) {
        let current = self.get(now);
        // Each attempt moves the rate a fixed step, so a provider failing
        // every other request settles near 0.5 whatever the request rate.
        const STEP: f64 = 0.2;
        self.rate = current * (1.0 - STEP) + if failed { STEP } else { 0.0 };
        self.at = now;
    }

    pub fn get(&self, now: Instant) -> f64 {
        self.rate * weight(now.saturating_duration_since(self.at), self.tau)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let now = Instant::now();
        let mut e = PeakEwma::new(Duration::from_millis(100), Duration::from_secs(10), now);
        e.observe(Duration::from_millis(900), now);
        assert_eq!(e.get(now), Duration::from_millis(900), "a slow sample counts at once");
        tokio::time::advance(Duration::from_secs(1)).await;
        let t = Instant::now();
        e.observe(Duration::from_millis(100), t);
        let after_fast = e.get(t);
        assert!(after_fast > Duration::from_millis(700), "a fast sample pulls down slowly: {after_fast:?}");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(e.get(Instant::now()) < Duration::from_millis(5), "left alone, it fades");
    }

    #[tokio::test(start_paused = true)]
    async fn error_rate_settles_and_fades() {
        let mut r = DecayingRate::new(Duration::from_secs(10), Instant::now());
        for i in 0..50 {
            r.observe(i % 2 == 0, Instant::now());
        }
        let settled = r.get(Instant::now());
        assert!((0.35..0.65).contains(&settled), "{settled}");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(r.get(Instant::now()) < 0.01);
    }

    #[tokio::test(start_paused = true)]
    async fn ewma_averages() {
        let mut e = Ewma::new(Duration::from_secs(5), Instant::now());
        assert_eq!(e.get(), None);
        e.observe(100.0, Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        e.observe(50.0, Instant::now());
        let v = e.get().unwrap();
        assert!(v > 50.0 && v < 100.0, "{v}");
    }
}
