//! The stock ticker of `/stock-prices` and `WS /ws/stock-prices`.
//!
//! **Simulated**: prices are a random walk generated here, not market data.
//! There is one feed per process, so every SSE and WebSocket client sees the
//! same price at the same tick (the seed drew a fresh random number for every
//! client).

use std::{sync::Arc, time::Duration};

use chrono::{SecondsFormat, Utc};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// One shared feed of ticks, each pre-serialised JSON:
/// `{"symbol": "AAPL", "price": 123.45, "timestamp": "…"}`.
#[derive(Clone, Debug)]
pub struct Ticker {
    ticks: broadcast::Sender<Arc<str>>,
    interval: Duration,
}

impl Ticker {
    pub fn new(interval: Duration) -> Self {
        // A slow client skips ticks rather than holding memory for them.
        let (ticks, _) = broadcast::channel(16);
        Ticker { ticks, interval }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.ticks.subscribe()
    }

    /// Generates ticks until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut rng = XorShift::seeded();
        let mut price = 150.0_f64;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            // A bounded random walk: ±1% per tick, kept between 100 and 200
            // as the seed's prices were.
            let step = (rng.next_f64() - 0.5) * 0.02 * price;
            price = (price + step).clamp(100.0, 200.0);
            let json = serde_json::json!({
                "symbol": "AAPL",
                "price": (price * 100.0).round() / 100.0,
                "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            })
            .to_string();
            // Nobody listening is fine.
            let _ = self.ticks.send(json.into());
        }
    }
}

/// xorshift64*: plenty for a simulated price, and no extra dependency.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        XorShift(u64::from_le_bytes(seed) | 1)
    }

    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::XorShift;

    #[test]
    fn random_numbers_are_in_unit_interval() {
        let mut r = XorShift(42);
        for _ in 0..1000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
