//! Retries that cannot become a storm: exponential backoff with full jitter,
//! and a budget that lets retries add at most a fraction of the traffic.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// `base · 2^attempt`, capped, then a uniform draw below it ("full jitter"),
/// so clients that failed together do not retry together.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX));
    exp.min(cap).mul_f64(unit.clamp(0.0, 1.0))
}

/// A uniform draw in [0, 1) from the process's random source.
pub fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Allows retries up to `ratio` of the requests seen in the last window,
/// plus a small floor so a quiet service can still retry at all.
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    floor: u64,
    window: Duration,
    state: Mutex<(Instant, u64, u64)>, // (window start, requests, retries)
    pub denied: AtomicU64,
}

impl Budget {
    pub fn new(ratio: f64, floor: u64) -> Self {
        Budget {
            ratio,
            floor,
            window: Duration::from_secs(10),
            state: Mutex::new((Instant::now(), 0, 0)),
            denied: AtomicU64::new(0),
        }
    }

    fn roll(&self, s: &mut (Instant, u64, u64), now: Instant) {
        if now.duration_since(s.0) >= self.window {
            *s = (now, 0, 0);
        }
    }

    pub fn record_request(&self, now: Instant) {
        let mut s = self.state.lock();
        self.roll(&mut s, now);
        s.1 += 1;
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut s = self.state.lock();
        self.roll(&mut s, now);
        let allowed = self.floor + (s.1 as f64 * self.ratio) as u64;
        if s.2 < allowed {
            s.2 += 1;
            true
        } else {
            self.denied.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(50);
        let cap = Duration::from_secs(1);
        assert_eq!(backoff(0, base, cap, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(10, base, cap, 1.0), cap);
        assert_eq!(backoff(40, base, cap, 1.0), cap);
        assert_eq!(backoff(3, base, cap, 0.0), Duration::ZERO);
        assert!(backoff(3, base, cap, 0.5) <= Duration::from_millis(200));
    }

    #[test]
    fn budget_limits_retries_to_a_fraction_of_traffic() {
        let b = Budget::new(0.2, 2);
        let t = Instant::now();
        for _ in 0..10 {
            b.record_request(t);
        }
        // floor 2 + 20% of 10 = 4 retries
        let granted = (0..10).filter(|_| b.try_retry(t)).count();
        assert_eq!(granted, 4);
        assert_eq!(b.denied.load(Ordering::Relaxed), 6);
        // A new window starts afresh.
        assert!(b.try_retry(t + Duration::from_secs(11)));
    }

    #[test]
    fn unit_random_is_in_range() {
        for _ in 0..100 {
            let u = unit_random();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
