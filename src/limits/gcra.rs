//! GCRA (the generic cell rate algorithm): a rate limit kept as one number
//! per key, the "theoretical arrival time" (TAT) at which the key would be
//! back to a full allowance.
//!
//! With a limit of `L` per period `P`, each unit of cost advances the TAT
//! by `T = P / L`; a request of cost `n` is admitted when the advanced TAT
//! is no more than `P` ahead of now, which allows a burst of the whole `L`
//! and then a steady `L` per `P`. From the TAT follow exactly the figures
//! clients are promised: what remains now, when the allowance is full again
//! (`Reset`), and when the next request would be admitted (`Retry-After`).
//!
//! The same arithmetic runs in memory here and in Redis (`redis.rs`, as a
//! Lua script), so both backends answer alike. Times are microseconds.

/// A limit: `limit` units per `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u64,
    pub period_us: u64,
}

impl Rate {
    pub fn per_minute(limit: u64) -> Rate {
        Rate {
            limit: limit.max(1),
            period_us: 60_000_000,
        }
    }

    /// Microseconds of allowance one unit costs.
    pub fn interval_us(&self) -> f64 {
        self.period_us as f64 / self.limit as f64
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    /// Units still admissible now (after this request, if admitted).
    pub remaining: u64,
    /// Microseconds until the allowance is full again.
    pub reset_us: u64,
    /// Microseconds until this request would be admitted (0 if it was).
    pub retry_after_us: u64,
    /// The TAT to store (unchanged when denied or peeking).
    pub tat_us: f64,
}

/// Checks a request of `cost` units against `rate`, given the stored TAT
/// (`None`: never seen). A cost above the whole limit is treated as the
/// whole limit, so it can be admitted once the allowance is full.
pub fn check(rate: Rate, stored_tat: Option<f64>, now_us: f64, cost: u64) -> Decision {
    let t = rate.interval_us();
    let period = rate.period_us as f64;
    let tat = stored_tat.unwrap_or(now_us).max(now_us);
    let cost = cost.min(rate.limit) as f64;
    let new_tat = tat + cost * t;
    let allow_at = new_tat - period;
    let figures = |tat: f64| {
        let ahead = (tat - now_us).max(0.0);
        let remaining = ((period - ahead) / t).floor().max(0.0) as u64;
        (remaining.min(rate.limit), ahead.ceil() as u64)
    };
    if allow_at > now_us {
        let (remaining, reset_us) = figures(tat);
        return Decision {
            allowed: false,
            limit: rate.limit,
            remaining,
            reset_us,
            retry_after_us: (allow_at - now_us).ceil() as u64,
            tat_us: tat,
        };
    }
    let (remaining, reset_us) = figures(new_tat);
    Decision {
        allowed: true,
        limit: rate.limit,
        remaining,
        reset_us,
        retry_after_us: 0,
        tat_us: new_tat,
    }
}

/// Moves a stored TAT by `delta` units (a reconciliation: the request used
/// more, or fewer, than was charged at admission). Never before `now`.
pub fn adjust(rate: Rate, stored_tat: Option<f64>, now_us: f64, delta: i64) -> f64 {
    let tat = stored_tat.unwrap_or(now_us).max(now_us);
    (tat + delta as f64 * rate.interval_us()).max(now_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: f64 = 1_000_000.0;

    #[test]
    fn admits_the_limit_then_refuses_with_an_honest_retry_after() {
        let rate = Rate::per_minute(3);
        let mut tat = None;
        let mut remaining = vec![];
        for _ in 0..3 {
            let d = check(rate, tat, 0.0, 1);
            assert!(d.allowed);
            remaining.push(d.remaining);
            tat = Some(d.tat_us);
        }
        assert_eq!(remaining, vec![2, 1, 0], "Remaining really decreases");
        let d = check(rate, tat, 0.0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_us, 20 * SEC as u64, "one unit frees every 20s");
        assert_eq!(d.reset_us, 60 * SEC as u64, "full again in a minute");
        // Retry-After is honest: at that moment the request is admitted.
        assert!(check(rate, tat, 20.0 * SEC, 1).allowed);
        assert!(!check(rate, tat, 19.9 * SEC, 1).allowed);
    }

    #[test]
    fn token_costs_and_reconciliation() {
        let rate = Rate::per_minute(1000);
        let d = check(rate, None, 0.0, 400);
        assert!(d.allowed);
        assert_eq!(d.remaining, 600);
        // The request really used 700.
        let tat = adjust(rate, Some(d.tat_us), 0.0, 300);
        let d = check(rate, Some(tat), 0.0, 0);
        assert_eq!(d.remaining, 300);
        // A prompt larger than the whole limit waits for a full allowance.
        let d = check(rate, Some(tat), 0.0, 5000);
        assert!(!d.allowed);
        assert!(check(rate, Some(tat), 60.0 * SEC, 5000).allowed);
    }

    #[test]
    fn peeking_changes_nothing() {
        let rate = Rate::per_minute(10);
        let d = check(rate, Some(30.0 * SEC), 0.0, 0);
        assert!(d.allowed);
        assert_eq!(d.remaining, 5);
        assert_eq!(d.tat_us, 30.0 * SEC);
    }
}
