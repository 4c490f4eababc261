//! Choosing a route: power of two choices over the routes' scores.
//!
//! Comparing two routes drawn at random, rather than always taking the
//! single best, keeps a burst of requests from stampeding the route that
//! happened to score best a moment ago (its score only catches up once the
//! requests are in flight). With two candidates both are compared; ties go
//! to the route listed first in the config, so an idle gateway is
//! predictable.

use rand::Rng;
use tokio::time::Instant;

use super::score::{Kind, RouteStats};

/// The index of the route to try next among `routes`, skipping `tried`;
/// `None` when every untried route is out.
pub fn pick<'a>(routes: impl Iterator<Item = &'a RouteStats>, tried: &[usize], kind: Kind, now: Instant, rng: &mut impl Rng) -> Option<usize> {
    let scored: Vec<(usize, f64)> = routes
        .enumerate()
        .filter(|(i, _)| !tried.contains(i))
        .filter_map(|(i, s)| s.score(kind, now).map(|score| (i, score)))
        .collect();
    let better = |a: (usize, f64), b: (usize, f64)| if b.1 < a.1 || (b.1 == a.1 && b.0 < a.0) { b } else { a };
    match scored.len() {
        0 => None,
        1 => Some(scored[0].0),
        2 => Some(better(scored[0], scored[1]).0),
        n => {
            let i = rng.random_range(0..n);
            let mut j = rng.random_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            Some(better(scored[i], scored[j]).0)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use rand::{rngs::StdRng, SeedableRng};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn picks_the_better_of_two_and_spreads_over_many() {
        let routes: Vec<Arc<RouteStats>> = (0..3).map(|_| Arc::new(RouteStats::new(100, Instant::now()))).collect();
        let mut rng = StdRng::seed_from_u64(1);
        // Untried routes tie at 0: the first listed wins between two.
        assert_eq!(pick(routes[..2].iter().map(|r| &**r), &[], Kind::Sync, Instant::now(), &mut rng), Some(0));
        assert_eq!(pick(routes[..2].iter().map(|r| &**r), &[0], Kind::Sync, Instant::now(), &mut rng), Some(1));
        // Make route 0 slow.
        let a = routes[0].acquire(Instant::now()).unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        a.succeed(1, Instant::now());
        let b = routes[1].acquire(Instant::now()).unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
        b.succeed(1, Instant::now());
        let c = routes[2].acquire(Instant::now()).unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
        c.succeed(1, Instant::now());
        let mut counts = [0; 3];
        for _ in 0..300 {
            let i = pick(routes.iter().map(|r| &**r), &[], Kind::Sync, Instant::now(), &mut rng).unwrap();
            counts[i] += 1;
        }
        assert!(counts[0] < counts[1] && counts[0] < counts[2], "{counts:?}");
        assert!(counts[1] > 50 && counts[2] > 50, "both fast routes get traffic: {counts:?}");
    }
}
