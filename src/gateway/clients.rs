//! The gateway's client connections: each one is closed once no request has
//! started on it for the registry's `client_idle_timeout_ms`, and all of
//! them drain on shutdown.
//!
//! That covers an idle keep-alive connection and one whose request head
//! never completes (a slow-headers attack), and leaves alone a connection
//! whose request is still being served, however long. Closing is graceful
//! first: an idle HTTP/1 connection closes at once, an HTTP/2 one is sent
//! GOAWAY. A connection still open half a timeout later with nothing in
//! flight (a head that never completed) is dropped.
//!
//! hyper can time out request heads itself, but it arms and disarms a timer
//! for every request on every connection; that cost 2–3% of the gateway's
//! CPU per proxied request. Here a request costs two counter updates, and
//! one task looks at every connection twice per timeout.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// What the reaper knows of one connection, and how it tells it to close.
#[derive(Debug)]
pub struct Conn {
    started: AtomicU64,
    in_flight: AtomicU32,
    /// Graceful: finish what is in flight, then close.
    close: CancellationToken,
    /// Drop the connection now.
    kill: CancellationToken,
}

impl Conn {
    /// Marks a request started on this connection; it counts as in flight
    /// until the guard is dropped (answered, or abandoned by the client).
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn close_requested(&self) -> &CancellationToken {
        &self.close
    }

    pub fn kill_requested(&self) -> &CancellationToken {
        &self.kill
    }
}

#[derive(Debug)]
pub struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Entry {
    conn: Arc<Conn>,
    /// `started` at the last look, and how many looks in a row found it
    /// unchanged with nothing in flight.
    last_started: u64,
    idle_looks: u32,
}

/// Every open client connection.
#[derive(Debug)]
pub struct Clients {
    idle_timeout: Duration,
    /// Cancelled at shutdown: every connection's `close` is its child.
    stop: CancellationToken,
    open: parking_lot::Mutex<(u64, HashMap<u64, Entry>)>,
}

/// Keeps a connection in the register while its task runs.
#[derive(Debug)]
pub struct Registered {
    clients: Arc<Clients>,
    id: u64,
    pub conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.clients.open.lock().1.remove(&self.id);
    }
}

impl Clients {
    pub fn new(idle_timeout: Duration) -> Arc<Clients> {
        Arc::new(Clients {
            idle_timeout,
            stop: CancellationToken::new(),
            open: parking_lot::Mutex::new((0, HashMap::new())),
        })
    }

    pub fn register(self: &Arc<Self>) -> Registered {
        let conn = Arc::new(Conn {
            started: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            close: self.stop.child_token(),
            kill: CancellationToken::new(),
        });
        let mut open = self.open.lock();
        open.0 += 1;
        let id = open.0;
        open.1.insert(
            id,
            Entry {
                conn: conn.clone(),
                // Never a count: the first look only takes the mark, as
                // after a request, so a new connection gets a whole timeout.
                last_started: u64::MAX,
                idle_looks: 0,
            },
        );
        Registered {
            clients: self.clone(),
            id,
            conn,
        }
    }

    /// Asks every connection to finish what it is serving and close.
    pub fn close_all(&self) {
        self.stop.cancel();
    }

    /// Closes idle connections until `stop`. Looks twice per timeout, so a
    /// connection is closed after between one and one and a half timeouts
    /// without a new request, and dropped half a timeout later if it has
    /// not closed by then with nothing in flight.
    pub async fn reap(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.idle_timeout.max(Duration::from_millis(20)) / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.look();
        }
    }

    fn look(&self) {
        let mut open = self.open.lock();
        for e in open.1.values_mut() {
            let started = e.conn.started.load(Ordering::Relaxed);
            if started != e.last_started || e.conn.in_flight.load(Ordering::Relaxed) > 0 {
                e.last_started = started;
                e.idle_looks = 0;
                continue;
            }
            // Looks are half a timeout apart and the last request may have
            // ended just before the first of them: two idle looks make at
            // least a whole timeout.
            e.idle_looks += 1;
            if e.idle_looks == 2 {
                e.conn.close.cancel();
            } else if e.idle_looks > 2 {
                e.conn.kill.cancel();
            }
        }
    }

    /// Connections now open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock().1.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_connection_without_requests_for_two_looks_is_closed_then_killed() {
        let clients = Clients::new(Duration::from_secs(60));
        let idle = clients.register();
        let busy = clients.register();
        let chatty = clients.register();
        let _in_flight = busy.conn.request();
        for look in 1..=5 {
            drop(chatty.conn.request());
            clients.look();
            assert_eq!(idle.conn.close.is_cancelled(), look >= 3, "look {look}");
            assert_eq!(idle.conn.kill.is_cancelled(), look >= 4, "look {look}");
            for c in [&busy, &chatty] {
                assert!(!c.conn.close.is_cancelled() && !c.conn.kill.is_cancelled());
            }
        }
        assert_eq!(clients.len(), 3);
        drop(idle);
        assert_eq!(clients.len(), 2);
        clients.close_all();
        assert!(busy.conn.close.is_cancelled() && chatty.conn.close.is_cancelled());
        assert!(
            !busy.conn.kill.is_cancelled(),
            "shutdown lets requests finish"
        );
    }
}
