//! A circuit breaker per upstream instance: closed → open after consecutive
//! failures → half-open after a pause, letting a limited number of probes
//! through → closed when they succeed (open again when one fails).
//!
//! Time is passed in (`now`), so the state machine is tested without sleeping.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// The breaker's tuning.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Consecutive failures that open the circuit.
    pub failures_to_open: u32,
    /// How long the circuit stays open before probes are allowed.
    pub open_for: Duration,
    /// Probes allowed at once while half-open; each success counts toward closing.
    pub half_open_probes: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            failures_to_open: 5,
            open_for: Duration::from_secs(10),
            half_open_probes: 1,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

#[derive(Debug)]
pub struct Breaker {
    policy: Policy,
    inner: Mutex<Inner>,
}

/// Permission to make one call; report how it went with [`Breaker::record`].
#[derive(Debug)]
#[must_use]
pub struct Permit {
    probe: bool,
}

impl Breaker {
    pub fn new(policy: Policy) -> Self {
        Breaker {
            policy,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match &*self.inner.lock() {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { until } if now < *until => State::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// Whether a call may go to this instance now (without taking a permit).
    pub fn would_allow(&self, now: Instant) -> bool {
        match &*self.inner.lock() {
            Inner::Closed { .. } => true,
            Inner::Open { until } => now >= *until,
            Inner::HalfOpen { in_flight, .. } => *in_flight < self.policy.half_open_probes,
        }
    }

    /// A permit to call, or `None` while the circuit is open (fail fast).
    pub fn try_acquire(&self, now: Instant) -> Option<Permit> {
        let mut inner = self.inner.lock();
        match &mut *inner {
            Inner::Closed { .. } => Some(Permit { probe: false }),
            Inner::Open { until } => {
                if now < *until {
                    return None;
                }
                *inner = Inner::HalfOpen {
                    in_flight: 1,
                    successes: 0,
                };
                Some(Permit { probe: true })
            }
            Inner::HalfOpen { in_flight, .. } => {
                if *in_flight >= self.policy.half_open_probes {
                    return None;
                }
                *in_flight += 1;
                Some(Permit { probe: true })
            }
        }
    }

    /// Reports the outcome of a permitted call.
    pub fn record(&self, permit: Permit, success: bool, now: Instant) {
        let mut inner = self.inner.lock();
        let next = match &mut *inner {
            Inner::Closed { failures } => {
                if success {
                    *failures = 0;
                    None
                } else {
                    *failures += 1;
                    (*failures >= self.policy.failures_to_open).then(|| Inner::Open {
                        until: now + self.policy.open_for,
                    })
                }
            }
            Inner::HalfOpen {
                in_flight,
                successes,
            } if permit.probe => {
                *in_flight = in_flight.saturating_sub(1);
                if !success {
                    Some(Inner::Open {
                        until: now + self.policy.open_for,
                    })
                } else {
                    *successes += 1;
                    (*successes >= self.policy.half_open_probes)
                        .then_some(Inner::Closed { failures: 0 })
                }
            }
            // A call that started before the circuit opened: its outcome is
            // old news and does not move the state.
            _ => None,
        };
        if let Some(next) = next {
            *inner = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(Policy {
            failures_to_open: 3,
            open_for: Duration::from_secs(10),
            half_open_probes: 1,
        })
    }

    #[test]
    fn opens_after_consecutive_failures() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..2 {
            let p = b.try_acquire(t).unwrap();
            b.record(p, false, t);
        }
        assert_eq!(b.state(t), State::Closed);
        // A success resets the count.
        let p = b.try_acquire(t).unwrap();
        b.record(p, true, t);
        for _ in 0..3 {
            let p = b.try_acquire(t).unwrap();
            b.record(p, false, t);
        }
        assert_eq!(b.state(t), State::Open);
        assert!(b.try_acquire(t + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn half_open_admits_limited_probes_then_closes() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            let p = b.try_acquire(t).unwrap();
            b.record(p, false, t);
        }
        let later = t + Duration::from_secs(11);
        assert_eq!(b.state(later), State::HalfOpen);
        let probe = b.try_acquire(later).expect("one probe allowed");
        assert!(b.try_acquire(later).is_none(), "only one probe at a time");
        b.record(probe, true, later);
        assert_eq!(b.state(later), State::Closed);
        assert!(b.try_acquire(later).is_some());
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            let p = b.try_acquire(t).unwrap();
            b.record(p, false, t);
        }
        let later = t + Duration::from_secs(11);
        let probe = b.try_acquire(later).unwrap();
        b.record(probe, false, later);
        assert_eq!(b.state(later), State::Open);
        assert!(b.try_acquire(later + Duration::from_secs(1)).is_none());
        assert!(b.try_acquire(later + Duration::from_secs(11)).is_some());
    }
}
