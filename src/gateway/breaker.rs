//! A circuit breaker per upstream instance: closed → open after consecutive
//! failures → half-open after a pause, letting a limited number of probes
//! through → closed when they succeed (open again when one fails).
//!
//! Time is passed in (`now`), so the state machine is tested without sleeping.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

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

/// How a permitted call went, as far as the instance is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The instance answered that it is unavailable, or took longer than
    /// its timeout.
    Failed,
    /// The instance could not be reached: nothing listened, or the
    /// connection broke.
    Unreachable,
    /// Nothing is known about the instance: the caller gave up first (its
    /// deadline, not the instance's timeout, cut the call short; counting
    /// that would let a client open circuits by sending short deadlines),
    /// or the call failed for reasons of the gateway's or of one answer's.
    Inconclusive,
}

#[derive(Debug)]
enum Inner {
    Closed {
        failures: u32,
    },
    /// `unreachable`: the failure that opened it was the instance not being
    /// reached, so a health check that reaches it again ends the wait.
    Open {
        until: Instant,
        unreachable: bool,
    },
    HalfOpen {
        in_flight: u32,
        successes: u32,
    },
}

#[derive(Debug)]
pub struct Breaker {
    policy: Policy,
    inner: Mutex<Inner>,
    /// Times the circuit opened (for `/metrics`).
    opened: AtomicU64,
}

/// Permission to make one call; report how it went with [`Permit::record`].
/// A probe's permit dropped unreported (its caller went away) gives its
/// half-open slot back, or the circuit would wait for it forever.
#[derive(Debug)]
#[must_use]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Permit<'_> {
    pub fn record(mut self, outcome: Outcome, now: Instant) {
        self.breaker.settle(self.probe, outcome, now);
        self.probe = false;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker
                .settle(true, Outcome::Inconclusive, Instant::now());
        }
    }
}

impl Breaker {
    pub fn new(policy: Policy) -> Self {
        Breaker {
            policy,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            opened: AtomicU64::new(0),
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match &*self.inner.lock() {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { until, .. } if now < *until => State::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// A permit to call, or `None` while the circuit is open (fail fast).
    pub fn try_acquire(&self, now: Instant) -> Option<Permit<'_>> {
        let permit = |probe| {
            Some(Permit {
                breaker: self,
                probe,
            })
        };
        let mut inner = self.inner.lock();
        match &mut *inner {
            Inner::Closed { .. } => permit(false),
            Inner::Open { until, .. } => {
                if now < *until {
                    return None;
                }
                *inner = Inner::HalfOpen {
                    in_flight: 1,
                    successes: 0,
                };
                permit(true)
            }
            Inner::HalfOpen { in_flight, .. } => {
                if *in_flight >= self.policy.half_open_probes {
                    return None;
                }
                *in_flight += 1;
                permit(true)
            }
        }
    }

    /// A health check reached the instance. A circuit opened because the
    /// instance could not be reached lets a probe through at once: the
    /// instance was gone and is back (a restart, say), and waiting out the
    /// open period would keep a serving instance out of rotation, or, when
    /// every instance was restarted in turn, fail every request. A circuit
    /// opened by bad answers waits as usual: `/healthz` passing says little
    /// about why the instance's answers failed.
    pub fn reached(&self, now: Instant) {
        if let Inner::Open {
            until,
            unreachable: true,
        } = &mut *self.inner.lock()
        {
            *until = (*until).min(now);
        }
    }

    /// Times the circuit has opened.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn open(&self, outcome: Outcome, now: Instant) -> Inner {
        self.opened.fetch_add(1, Ordering::Relaxed);
        Inner::Open {
            until: now + self.policy.open_for,
            unreachable: outcome == Outcome::Unreachable,
        }
    }

    fn settle(&self, probe: bool, outcome: Outcome, now: Instant) {
        let mut inner = self.inner.lock();
        let next = match (&mut *inner, outcome) {
            (Inner::HalfOpen { in_flight, .. }, Outcome::Inconclusive) if probe => {
                *in_flight = in_flight.saturating_sub(1);
                None
            }
            (_, Outcome::Inconclusive) => None,
            (Inner::Closed { failures }, Outcome::Success) => {
                *failures = 0;
                None
            }
            (Inner::Closed { failures }, _) => {
                *failures += 1;
                (*failures >= self.policy.failures_to_open).then(|| self.open(outcome, now))
            }
            (
                Inner::HalfOpen {
                    in_flight,
                    successes,
                },
                _,
            ) if probe => {
                *in_flight = in_flight.saturating_sub(1);
                if outcome != Outcome::Success {
                    Some(self.open(outcome, now))
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

    /// `n` calls that each end with `outcome`.
    fn calls(b: &Breaker, n: usize, outcome: Outcome, t: Instant) {
        for _ in 0..n {
            b.try_acquire(t).unwrap().record(outcome, t);
        }
    }

    #[test]
    fn opens_after_consecutive_failures() {
        let b = breaker();
        let t = Instant::now();
        calls(&b, 2, Outcome::Failed, t);
        assert_eq!(b.state(t), State::Closed);
        // A success resets the count.
        calls(&b, 1, Outcome::Success, t);
        calls(&b, 2, Outcome::Failed, t);
        calls(&b, 1, Outcome::Unreachable, t);
        assert_eq!(b.state(t), State::Open);
        assert_eq!(b.opened(), 1);
        assert!(b.try_acquire(t + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn half_open_admits_limited_probes_then_closes() {
        let b = breaker();
        let t = Instant::now();
        calls(&b, 3, Outcome::Failed, t);
        let later = t + Duration::from_secs(11);
        assert_eq!(b.state(later), State::HalfOpen);
        let probe = b.try_acquire(later).expect("one probe allowed");
        assert!(b.try_acquire(later).is_none(), "only one probe at a time");
        probe.record(Outcome::Success, later);
        assert_eq!(b.state(later), State::Closed);
        assert!(b.try_acquire(later).is_some());
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = breaker();
        let t = Instant::now();
        calls(&b, 3, Outcome::Failed, t);
        let later = t + Duration::from_secs(11);
        b.try_acquire(later).unwrap().record(Outcome::Failed, later);
        assert_eq!(b.state(later), State::Open);
        assert!(b.try_acquire(later + Duration::from_secs(1)).is_none());
        assert!(b.try_acquire(later + Duration::from_secs(11)).is_some());
    }

    #[test]
    fn inconclusive_calls_count_neither_way() {
        let b = breaker();
        let t = Instant::now();
        calls(&b, 10, Outcome::Inconclusive, t);
        assert_eq!(
            b.state(t),
            State::Closed,
            "a caller's deadline is not a failure"
        );
        calls(&b, 2, Outcome::Failed, t);
        calls(&b, 1, Outcome::Inconclusive, t);
        calls(&b, 1, Outcome::Failed, t);
        assert_eq!(b.state(t), State::Open, "nor does it reset the count");
        let later = t + Duration::from_secs(11);
        b.try_acquire(later)
            .unwrap()
            .record(Outcome::Inconclusive, later);
        assert_eq!(b.state(later), State::HalfOpen);
        let probe = b
            .try_acquire(later)
            .expect("the inconclusive probe's slot is free again");
        probe.record(Outcome::Success, later);
        assert_eq!(b.state(later), State::Closed);
    }

    #[test]
    fn a_probe_dropped_unreported_frees_its_slot() {
        let b = breaker();
        let t = Instant::now();
        calls(&b, 3, Outcome::Failed, t);
        let later = t + Duration::from_secs(11);
        drop(b.try_acquire(later).unwrap());
        assert!(
            b.try_acquire(later).is_some(),
            "a probe whose caller went away does not hold the circuit half-open"
        );
    }

    #[test]
    fn a_health_check_ends_the_wait_only_of_a_circuit_opened_by_unreachability() {
        let t = Instant::now();
        let soon = t + Duration::from_secs(1);
        let unreachable = breaker();
        calls(&unreachable, 3, Outcome::Unreachable, t);
        let failing = breaker();
        calls(&failing, 3, Outcome::Failed, t);
        for b in [&unreachable, &failing] {
            b.reached(soon);
        }
        assert_eq!(unreachable.state(soon), State::HalfOpen);
        assert!(unreachable.try_acquire(soon).is_some());
        assert_eq!(
            failing.state(soon),
            State::Open,
            "bad answers wait out the period"
        );
        assert!(failing.try_acquire(soon).is_none());
        // A closed circuit is left alone.
        let closed = breaker();
        closed.reached(soon);
        assert_eq!(closed.state(soon), State::Closed);
    }
}
