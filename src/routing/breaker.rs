//! A circuit breaker per route: after `threshold` consecutive failures the
//! route is taken out for a cool-down; then exactly one probe is let
//! through. A successful probe closes the circuit; a failed one opens it
//! again for twice as long (up to `max_cooldown`).

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    /// The cool-down is over and one probe is in flight.
    HalfOpen,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    consecutive_failures: u32,
    threshold: u32,
    cooldown: Duration,
    base_cooldown: Duration,
    max_cooldown: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, base_cooldown: Duration, max_cooldown: Duration) -> Self {
        Breaker {
            state: State::Closed,
            consecutive_failures: 0,
            threshold: threshold.max(1),
            cooldown: base_cooldown,
            base_cooldown,
            max_cooldown,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a request may use the route now, without claiming anything.
    pub fn is_available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } => now >= until,
            State::HalfOpen => false,
        }
    }

    /// Claims the right to send a request: always when closed; once, as the
    /// probe, when the cool-down is over.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen;
                true
            }
            _ => false,
        }
    }

    pub fn on_success(&mut self) {
        self.state = State::Closed;
        self.consecutive_failures = 0;
        self.cooldown = self.base_cooldown;
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.state {
            State::HalfOpen => {
                self.cooldown = (self.cooldown * 2).min(self.max_cooldown);
                self.state = State::Open { until: now + self.cooldown };
            }
            State::Closed if self.consecutive_failures >= self.threshold => {
                self.state = State::Open { until: now + self.cooldown };
            }
            _ => {}
        }
    }

    /// A probe that ended without a verdict (the client left): let another
    /// request probe.
    pub fn on_abandoned(&mut self, now: Instant) {
        if self.state == State::HalfOpen {
            self.state = State::Open { until: now };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_probes_after_cooldown() {
        let mut b = Breaker::new(3, Duration::from_secs(5), Duration::from_secs(60));
        for _ in 0..2 {
            assert!(b.try_acquire(Instant::now()));
            b.on_failure(Instant::now());
        }
        assert_eq!(b.state(), State::Closed);
        b.on_failure(Instant::now());
        assert!(!b.try_acquire(Instant::now()), "open after 3 failures");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_acquire(Instant::now()), "one probe after the cool-down");
        assert!(!b.try_acquire(Instant::now()), "only one");
        b.on_failure(Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.try_acquire(Instant::now()), "a failed probe doubles the cool-down");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_acquire(Instant::now()));
        b.on_success();
        assert_eq!(b.state(), State::Closed);
        assert!(b.try_acquire(Instant::now()));
    }
}
