//! A retry budget, after tower's `retry/budget`: retries may add at most
//! `ratio` of the recent request volume (plus a small floor so a quiet
//! gateway can still retry). A fixed "max retries" multiplies the load on
//! the providers that are left when one goes down — every request becomes
//! two or three; a budget caps that at, say, 20% more, so an outage of one
//! provider cannot snowball into an outage of all.

use std::time::Duration;

use tokio::time::Instant;

const SLOTS: usize = 10;

#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Per-slot deposits (first attempts) and withdrawals (retries).
    deposits: [u32; SLOTS],
    withdrawals: [u32; SLOTS],
    slot: usize,
    slot_started: Instant,
    slot_len: Duration,
    ratio: f64,
    floor: f64,
}

impl RetryBudget {
    /// `window`: how far back requests count; `min_per_sec`: retries always
    /// allowed; `ratio`: retries allowed per request.
    pub fn new(window: Duration, min_per_sec: f64, ratio: f64, now: Instant) -> Self {
        RetryBudget {
            deposits: [0; SLOTS],
            withdrawals: [0; SLOTS],
            slot: 0,
            slot_started: now,
            slot_len: window / SLOTS as u32,
            ratio,
            floor: min_per_sec * window.as_secs_f64(),
        }
    }

    fn rotate(&mut self, now: Instant) {
        let mut elapsed = now.saturating_duration_since(self.slot_started);
        let mut turned = 0;
        while elapsed >= self.slot_len && turned < SLOTS {
            self.slot = (self.slot + 1) % SLOTS;
            self.deposits[self.slot] = 0;
            self.withdrawals[self.slot] = 0;
            self.slot_started += self.slot_len;
            elapsed -= self.slot_len;
            turned += 1;
        }
        if turned == SLOTS {
            self.slot_started = now;
        }
    }

    /// A first attempt was made.
    pub fn deposit(&mut self, now: Instant) {
        self.rotate(now);
        self.deposits[self.slot] = self.deposits[self.slot].saturating_add(1);
    }

    /// May a retry (or hedge, or continuation) be made? Counts it if so.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.rotate(now);
        let deposits: u32 = self.deposits.iter().sum();
        let withdrawals: u32 = self.withdrawals.iter().sum();
        let balance = self.floor + self.ratio * f64::from(deposits) - f64::from(withdrawals);
        if balance >= 1.0 {
            self.withdrawals[self.slot] = self.withdrawals[self.slot].saturating_add(1);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_by_the_ratio_and_recover() {
        let mut b = RetryBudget::new(Duration::from_secs(10), 0.0, 0.2, Instant::now());
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        let allowed = (0..100).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(allowed, 20, "20% of 100 requests");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.try_withdraw(Instant::now()), "old requests no longer count");
        b.deposit(Instant::now());
        for _ in 0..4 {
            b.deposit(Instant::now());
        }
        assert!(b.try_withdraw(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_retries_when_quiet() {
        let mut b = RetryBudget::new(Duration::from_secs(10), 1.0, 0.2, Instant::now());
        let allowed = (0..50).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(allowed, 10);
    }
}
