//! The event log on SQLite and on PostgreSQL: the same tests against both.

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, Stream, StreamExt};
use prism::{
    App, Config,
    auth::{Principal, Role},
    domain::{
        Domain, NewPost, NewProduct, NewUser, Post, PostPatch, Price,
        consumers::{Applied, OrderStats, OrderTotals},
    },
    events::{self, Event, EventFilter, Item},
};

use crate::helpers::{WAIT, postgres_url};

/// Where a test's data lives.
#[derive(Clone)]
enum Backend {
    Sqlite(Arc<tempfile::TempDir>),
    Postgres(String),
}

impl Backend {
    fn sqlite() -> Backend {
        Backend::Sqlite(Arc::new(tempfile::tempdir().unwrap()))
    }

    fn config(&self) -> Config {
        match self {
            Backend::Sqlite(dir) => Config::for_tests(dir.path()),
            Backend::Postgres(url) => Config {
                database_url: Some(url.clone()),
                ..Config::for_tests(std::env::temp_dir())
            },
        }
    }

    /// A running instance (pump included) on this backend.
    async fn instance(&self, tweak: impl FnOnce(&mut Config)) -> (App, Domain) {
        let mut config = self.config();
        tweak(&mut config);
        let app = App::build(config).await.unwrap();
        let domain = app.state().domain.clone();
        (app, domain)
    }
}

/// Runs a test body on SQLite and, when configured, on PostgreSQL.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Backend::sqlite()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(url) = crate::helpers::postgres_url().await {
                    super::$name(super::Backend::Postgres(url)).await;
                }
            }
        }
    )*};
}

on_both_databases!(
    concurrent_writers_every_subscriber_sees_every_event_once_in_order,
    resume_mid_stream_has_no_gap_or_duplicate,
    stalled_subscriber_is_cut_off_without_delaying_others,
    retention_truncates_and_resume_gets_reset,
    a_filtered_replay_gets_its_types_in_order,
    restored_order_stats_replace_what_was_applied,
    an_order_created_is_applied_once,
);

fn admin() -> Principal {
    Principal {
        user_id: 1,
        role: Role::Admin,
    }
}

/// A write that records one event (`product.created`).
async fn write(domain: &Domain, n: usize) -> i64 {
    domain
        .create_product(
            &admin(),
            NewProduct {
                name: format!("p{n}"),
                description: String::new(),
                price: Price {
                    amount: 1.0,
                    currency: "USD".into(),
                },
                category: prism::domain::Category::Food,
                tags: vec![],
                metadata: Default::default(),
            },
        )
        .await
        .unwrap()
        .id
}

/// Takes `n` events from a subscription, failing on a cut-off or a stall.
async fn take_events(stream: impl Stream<Item = Item> + Unpin, n: usize) -> Vec<Arc<Event>> {
    let mut stream = stream;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Item::Event(e))) => out.push(e),
            Ok(other) => panic!("unexpected {other:?} after {} events", out.len()),
            Err(_) => panic!("stalled after {} of {n} events", out.len()),
        }
    }
    out
}

/// The id of the product (see [`write`]) that `stream` receives next.
async fn next_product_id(stream: impl Stream<Item = Item> + Unpin) -> serde_json::Value {
    let got = take_events(stream, 1).await;
    got[0].payload_as::<serde_json::Value>().unwrap()["id"].clone()
}

/// Every event from now on, as `domain`'s process delivers them.
fn live(domain: &Domain) -> std::pin::Pin<Box<impl Stream<Item = Item> + use<'_>>> {
    Box::pin(domain.events().subscribe(None, EventFilter::all()))
}

/// Two instances on one fresh PostgreSQL database, polling off, or `None`
/// without PostgreSQL.
async fn two_postgres_instances_without_polling() -> Option<((App, Domain), (App, Domain))> {
    let backend = Backend::Postgres(postgres_url().await?);
    Some((
        backend.instance(no_polling).await,
        backend.instance(no_polling).await,
    ))
}

/// Poll timers too long to help within a test's wait: only notifications
/// wake the pumps of instances sharing a database.
fn no_polling(c: &mut Config) {
    c.event_poll = Duration::from_secs(3600);
}

async fn all_event_ids(domain: &Domain, after: i64) -> Vec<i64> {
    domain
        .events()
        .read_stored(after, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect()
}

async fn concurrent_writers_every_subscriber_sees_every_event_once_in_order(backend: Backend) {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 25;
    let (_app, domain) = backend.instance(|_| {}).await;
    let start = all_event_ids(&domain, 0).await.last().copied().unwrap_or(0);
    let subscribers: Vec<_> = (0..4)
        .map(|_| {
            let stream = Box::pin(domain.events().subscribe(Some(start), EventFilter::all()));
            tokio::spawn(take_events(stream, WRITERS * PER_WRITER))
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let domain = domain.clone();
            tokio::spawn(async move {
                for i in 0..PER_WRITER {
                    write(&domain, w * 1000 + i).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let expected = all_event_ids(&domain, start).await;
    assert_eq!(expected.len(), WRITERS * PER_WRITER);
    for s in subscribers {
        let got: Vec<i64> = s.await.unwrap().iter().map(|e| e.id).collect();
        assert_eq!(
            got, expected,
            "a subscriber missed, repeated or reordered events"
        );
    }
}

async fn resume_mid_stream_has_no_gap_or_duplicate(backend: Backend) {
    let (_app, domain) = backend.instance(|_| {}).await;
    let start = all_event_ids(&domain, 0).await.last().copied().unwrap_or(0);
    for i in 0..20 {
        write(&domain, i).await;
    }
    let ids = all_event_ids(&domain, start).await;
    let resume_from = ids[7];
    let mut stream = Box::pin(
        domain
            .events()
            .subscribe(Some(resume_from), EventFilter::all()),
    );
    let replayed: Vec<i64> = take_events(&mut stream, ids.len() - 8)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(replayed, ids[8..]);
    // The switch to live: the next write is the very next item.
    let fresh = write(&domain, 99).await;
    let live = take_events(&mut stream, 1).await;
    assert_eq!(live[0].kind, "product.created");
    assert_eq!(
        live[0].payload_as::<serde_json::Value>().unwrap()["id"],
        fresh
    );
    assert!(live[0].id > *ids.last().unwrap());
    // A filter sees only its types, but resumes past the others.
    let mut orders = Box::pin(
        domain
            .events()
            .subscribe(Some(start), EventFilter::parse("order.*")),
    );
    domain
        .insert_order(1, 5.0, prism::domain::OrderStatus::Pending)
        .await
        .unwrap();
    let got = take_events(&mut orders, 1).await;
    assert_eq!(got[0].kind, "order.created");
}

async fn stalled_subscriber_is_cut_off_without_delaying_others(backend: Backend) {
    const BUFFER: usize = 8;
    let (_app, domain) = backend.instance(|c| c.event_buffer = BUFFER).await;
    let mut stalled = live(&domain);
    let mut fast = live(&domain);
    // In lock-step: the fast subscriber gets each event while the stalled one
    // never reads. Neither the writer nor the fast reader waits for it.
    let mut last = 0;
    for i in 0..(BUFFER * 3) {
        write(&domain, i).await;
        let got = take_events(&mut fast, 1).await;
        assert!(got[0].id > last);
        last = got[0].id;
    }
    match tokio::time::timeout(WAIT, stalled.next()).await.unwrap() {
        Some(Item::CutOff { last_id }) => assert_eq!(last_id, None),
        other => panic!("expected a cut-off, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, stalled.next())
            .await
            .unwrap()
            .is_none()
    );
}

async fn retention_truncates_and_resume_gets_reset(backend: Backend) {
    let (_app, domain) = backend
        .instance(|c| c.event_retention = Duration::ZERO)
        .await;
    let start = all_event_ids(&domain, 0).await.last().copied().unwrap_or(0);
    for i in 0..5 {
        write(&domain, i).await;
    }
    // The retention worker may get there first (retention is zero); either
    // way, nothing written before now is left.
    domain.events().enforce_retention().await.unwrap();
    assert!(all_event_ids(&domain, start).await.is_empty());
    let mut stream = Box::pin(
        domain
            .events()
            .subscribe(Some(start + 1), EventFilter::all()),
    );
    match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        Some(Item::Reset) => {}
        other => panic!("expected a reset, got {other:?}"),
    }
    let fresh = write(&domain, 6).await;
    assert_eq!(next_product_id(&mut stream).await, fresh);
}

/// Instances sharing a database wake each other's pumps with `NOTIFY` alone:
/// their poll timers are set too long to help within the test's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_processes_see_each_others_events() {
    let Some(((_a, a), (_b, b))) = two_postgres_instances_without_polling().await else {
        return;
    };
    let mut on_b = live(&b);
    let mut on_a = live(&a);
    let written_on_a = write(&a, 1).await;
    assert_eq!(next_product_id(&mut on_b).await, written_on_a);
    let written_on_b = write(&b, 2).await;
    let got = take_events(&mut on_a, 2).await;
    let ids: Vec<_> = got
        .iter()
        .map(|e| e.payload_as::<serde_json::Value>().unwrap()["id"].clone())
        .collect();
    assert_eq!(ids, [written_on_a, written_on_b]);
}

/// A process alone on its database wakes no one: it sends no notification,
/// also for the commits of requests that finished as it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_process_alone_sends_no_notifications() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let (app, domain) = Backend::Postgres(url).instance(|_| {}).await;
    let mut stream = live(&domain);
    for i in 0..3 {
        write(&domain, i).await;
    }
    take_events(&mut stream, 3).await;
    // Stopping waits for the announcer to finish what it was given.
    tokio::time::timeout(WAIT, app.run_until_stopped(async {}))
        .await
        .expect("shutdown")
        .unwrap();
    assert_eq!(domain.events().notifications_sent(), 0);
}

/// A process that starts listening after another has looked for listeners
/// still gets that other's next commits, with polling off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_process_started_later_is_woken_too() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let backend = Backend::Postgres(url);
    let (_a, a) = backend.instance(no_polling).await;
    let mut on_a = live(&a);
    write(&a, 1).await;
    take_events(&mut on_a, 1).await;
    let (_b, b) = backend.instance(no_polling).await;
    let mut on_b = live(&b);
    let written = write(&a, 2).await;
    assert_eq!(next_product_id(&mut on_b).await, written);
}

/// A process whose notifying connection is lost (here the server ends it)
/// connects again and goes on waking the others, whose poll timers are too
/// long to help.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_notifications_resume_after_the_connection_sending_them_is_lost() {
    let Some(((_a, a), (_b, b))) = two_postgres_instances_without_polling().await else {
        return;
    };
    let mut on_b = live(&b);
    let before = write(&a, 1).await;
    assert_eq!(next_product_id(&mut on_b).await, before);

    // Every announcer's connection (both instances'), ended by the server.
    let pool = a.db().postgres().unwrap();
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid)::int * pid FROM pg_stat_activity \
         WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(events::ANNOUNCER_NAME)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!pids.is_empty() && pids.iter().all(|&p| p > 0), "{pids:?}");
    crate::helpers::eventually("the announcers' connections to end", || async {
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                .bind(&pids)
                .fetch_one(pool)
                .await
                .unwrap();
        (left == 0).then_some(())
    })
    .await;

    let after = write(&a, 2).await;
    assert_eq!(next_product_id(&mut on_b).await, after);
}

/// The outbox trap: transaction A draws the lower event id, B the higher, and
/// B commits first. B does not wait for A (writers never take turns), nor does
/// C, written while the pumps wait for A, yet no reader gets B before A's fate
/// is known: not the live feed, not a replay, not the relay's reads. When A
/// commits, all three arrive, in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_transactions_committing_out_of_id_order_lose_no_event() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let backend = Backend::Postgres(url.clone());
    let (_app, domain) = backend.instance(|_| {}).await;
    let (_reader_app, reader) = backend.instance(|_| {}).await;
    let mut stream = live(&reader);
    let db = domain.db().clone();
    let (tx_a, id_a, id_b) = b_committed_while_a_is_open(&db).await;

    // Both pumps find A's id missing below B's and, after a while, settle the
    // gap, which waits for A: from then on neither can have delivered B.
    crate::helpers::eventually("both pumps to wait for A", || async {
        (domain.events().settling() && reader.events().settling()).then_some(())
    })
    .await;
    assert!(
        stream.next().now_or_never().is_none(),
        "B delivered before A"
    );
    // Settling only watches: a write goes through while it waits, long before
    // settling would give up on A.
    let c = tokio::time::timeout(Duration::from_secs(2), write(&domain, 1))
        .await
        .expect("a write waited for the pumps settling");
    assert!(
        stream.next().now_or_never().is_none(),
        "an event delivered before A"
    );
    assert!(reader.events().head() < id_a);
    assert!(
        reader
            .events()
            .read_after(0, 100_000)
            .await
            .unwrap()
            .iter()
            .all(|e| e.id < id_a)
    );
    assert!(
        reader
            .events()
            .read_stored(0, 100_000)
            .await
            .unwrap()
            .iter()
            .any(|e| e.id == id_b)
    );

    tokio::time::timeout(WAIT, tx_a.commit())
        .await
        .expect("A's commit")
        .unwrap();
    let got = take_events(&mut stream, 3).await;
    assert_eq!(
        ids_and_kinds(&got[..2]),
        [(id_a, "test.a".to_owned()), (id_b, "test.b".to_owned())]
    );
    assert_eq!(got[2].payload_as::<serde_json::Value>().unwrap()["id"], c);
}

/// Transaction A draws an event id, then B draws the next and commits; A is
/// left open. B neither draws its id nor commits behind A.
async fn b_committed_while_a_is_open(db: &prism::db::Db) -> (prism::db::Tx, i64, i64) {
    let mut tx_a = tokio::time::timeout(WAIT, db.begin())
        .await
        .unwrap()
        .unwrap();
    let id_a = tokio::time::timeout(
        WAIT,
        events::append(&mut tx_a, "test.a", &serde_json::json!({"tx": "a"})),
    )
    .await
    .unwrap()
    .unwrap();
    let mut tx_b = tokio::time::timeout(WAIT, db.begin())
        .await
        .unwrap()
        .unwrap();
    let id_b = tokio::time::timeout(
        WAIT,
        events::append(&mut tx_b, "test.b", &serde_json::json!({"tx": "b"})),
    )
    .await
    .expect("B waited for A to draw its id")
    .unwrap();
    assert!(id_a < id_b);
    tokio::time::timeout(WAIT, tx_b.commit())
        .await
        .expect("B waited for A to commit")
        .unwrap();
    (tx_a, id_a, id_b)
}

/// Waits until `n` sessions wait for an advisory lock in this test's
/// database: as PostgreSQL sees it, they are blocked.
async fn advisory_lock_waiters(db: &prism::db::Db, n: i64, what: &str) {
    lock_waiters(db, "advisory", n, what).await;
}

/// Waits until `n` sessions wait for a lock of `locktype` in this test's
/// database (`transactionid`: a row another transaction changed).
async fn lock_waiters(db: &prism::db::Db, locktype: &str, n: i64, what: &str) {
    let pool = db.postgres().unwrap();
    crate::helpers::eventually(what, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = $1 AND NOT granted \
             AND (database IS NULL \
                  OR database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        )
        .bind(locktype)
        .fetch_one(pool)
        .await
        .unwrap();
        (waiting == n).then_some(())
    })
    .await;
}

fn ids_and_kinds(events: &[Arc<Event>]) -> Vec<(i64, String)> {
    events.iter().map(|e| (e.id, e.kind.clone())).collect()
}

/// A transaction that draws an event id and then rolls back leaves a gap for
/// good: the pumps settle it and deliver what came after, on every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_rolled_back_event_does_not_hold_back_later_ones() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let backend = Backend::Postgres(url.clone());
    let (_app, domain) = backend.instance(|_| {}).await;
    let (_reader_app, reader) = backend.instance(|_| {}).await;
    let mut here = live(&domain);
    let mut there = live(&reader);
    let (tx_a, _, id_b) = b_committed_while_a_is_open(domain.db()).await;
    drop(tx_a); // rolled back
    for stream in [&mut here, &mut there] {
        assert_eq!(
            ids_and_kinds(&take_events(stream, 1).await),
            [(id_b, "test.b".to_owned())]
        );
    }
    // Only settling could have told the pumps that A's id is not coming.
    assert!(domain.events().gaps_settled() >= 1);
    assert!(reader.events().gaps_settled() >= 1);
    let fresh = write(&domain, 1).await;
    let next = take_events(&mut there, 1).await;
    assert_eq!(
        next[0].payload_as::<serde_json::Value>().unwrap()["id"],
        fresh
    );
}

/// The orders service's totals, which a users service that missed events
/// starts again from, wait for an order still being placed: an order is in
/// them exactly when its event is at or below their `through`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_order_totals_wait_for_an_order_being_placed() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let (_app, domain) = Backend::Postgres(url).instance(|_| {}).await;
    let db = domain.db().clone();
    let mut tx = tokio::time::timeout(WAIT, db.begin())
        .await
        .unwrap()
        .unwrap();
    let placing = async {
        let prism::db::Tx::Postgres(t) = &mut tx else {
            unreachable!()
        };
        sqlx::query(
            "INSERT INTO orders (user_id, total, status, created_at) \
             VALUES (7, 3.5, 'pending', now())",
        )
        .execute(&mut **t)
        .await
        .unwrap();
        events::append(&mut tx, "order.created", &serde_json::json!({"user_id": 7}))
            .await
            .unwrap()
    };
    let id = tokio::time::timeout(WAIT, placing).await.unwrap();
    let totals = tokio::spawn({
        let domain = domain.clone();
        async move { domain.order_totals().await }
    });
    advisory_lock_waiters(&db, 1, "the totals to wait for the order").await;
    assert!(!totals.is_finished());
    tokio::time::timeout(WAIT, tx.commit())
        .await
        .unwrap()
        .unwrap();
    let totals = tokio::time::timeout(WAIT, totals)
        .await
        .expect("the totals")
        .unwrap()
        .unwrap();
    assert_eq!(totals.through, id);
    assert_eq!(
        totals.users,
        [OrderStats {
            user_id: 7,
            orders: 1,
            total: 3.5
        }]
    );
}

/// Events written while the server starts (the demo data) are delivered
/// before it serves, so a subscriber asking for "live from now" is never sent
/// them: the live feed's head is the log's last event once `build` returns.
#[tokio::test]
async fn start_up_events_are_history_before_anyone_can_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let app = prism::App::build(crate::helpers::test_config(dir.path()))
        .await
        .unwrap();
    let events = app.state().domain.events();
    let head = events.head();
    let stored = events.read_stored(0, 10_000).await.unwrap();
    assert!(!stored.is_empty(), "the demo wrote events");
    assert_eq!(head, stored.last().unwrap().id);
}

/// A filtered resume is read from the database with the filter applied there
/// (exact types and prefixes): only the matching events, every one, in order,
/// then live.
async fn a_filtered_replay_gets_its_types_in_order(backend: Backend) {
    let (_app, domain) = backend.instance(|_| {}).await;
    let start = all_event_ids(&domain, 0).await.last().copied().unwrap_or(0);
    for i in 0..30 {
        let product = write(&domain, i).await;
        domain
            .insert_order(1, i as f64, prism::domain::OrderStatus::Pending)
            .await
            .unwrap();
        if i % 10 == 0 {
            domain.delete_product(&admin(), product).await.unwrap();
        }
    }
    let filter = "order.*, product.deleted";
    let wanted: Vec<i64> = domain
        .events()
        .read_stored(start, 100_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| EventFilter::parse(filter).matches(&e.kind))
        .map(|e| e.id)
        .collect();
    assert_eq!(wanted.len(), 33);
    let mut stream = Box::pin(
        domain
            .events()
            .subscribe(Some(start), EventFilter::parse(filter)),
    );
    let got: Vec<i64> = take_events(&mut stream, wanted.len())
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(got, wanted);
    write(&domain, 99).await;
    domain
        .insert_order(1, 99.0, prism::domain::OrderStatus::Pending)
        .await
        .unwrap();
    let live = take_events(&mut stream, 1).await;
    assert_eq!(live[0].kind, "order.created");
    assert!(live[0].id > *wanted.last().unwrap());
}

/// Restoring the users service's order statistics from the orders service's
/// totals replaces every user's, those the totals leave out included, and
/// moves the feed position with them.
async fn restored_order_stats_replace_what_was_applied(backend: Backend) {
    let (_app, domain) = backend.instance(|_| {}).await;
    for (id, user, total) in [(2, 1, 5.0), (3, 2, 6.0)] {
        let once = Applied::Position { stream: "feed", id };
        assert!(domain.apply_order_created(once, user, total).await.unwrap());
    }
    // More users than one statement inserts.
    let users: Vec<OrderStats> = (1..=1201)
        .map(|user_id| OrderStats {
            user_id: user_id * 3,
            orders: user_id,
            total: user_id as f64 * 1.5,
        })
        .collect();
    let totals = OrderTotals { through: 42, users };
    domain.restore_order_stats("feed", &totals).await.unwrap();
    assert_eq!(domain.offset("feed").await.unwrap(), 42);
    for expected in [&totals.users[0], &totals.users[600], &totals.users[1200]] {
        assert_eq!(
            &domain.order_stats(expected.user_id).await.unwrap(),
            expected
        );
    }
    // User 1 had an order applied; the totals say it has none.
    assert_eq!(domain.order_stats(1).await.unwrap().orders, 0);
    assert_eq!(domain.order_stats(2).await.unwrap().orders, 0);
}

/// A redelivered `order.created` changes nothing, whether it is known by its
/// broker message id or by its place in an ordered feed.
async fn an_order_created_is_applied_once(backend: Backend) {
    let (_app, domain) = backend.instance(|_| {}).await;
    let by_key = |key| Applied::Key {
        consumer: "users-service",
        key,
    };
    let at = |id| Applied::Position { stream: "feed", id };
    let applied = [
        (by_key("o:1"), true),
        (by_key("o:2"), true),
        (by_key("o:1"), false),
        (at(5), true),
        (at(5), false),
        (at(4), false),
        (at(6), true),
    ];
    for (once, fresh) in applied {
        assert_eq!(
            domain.apply_order_created(once, 9, 1.5).await.unwrap(),
            fresh,
            "{once:?}"
        );
    }
    assert_eq!(
        domain.order_stats(9).await.unwrap(),
        OrderStats {
            user_id: 9,
            orders: 4,
            total: 6.0
        }
    );
    assert_eq!(domain.offset("feed").await.unwrap(), 6);

    // Keys become positions: each stream at its highest key, the keys gone.
    assert!(domain.has_applied_keys("users-service").await.unwrap());
    domain
        .keys_to_positions("users-service", |key| {
            let (stream, id) = key.split_once(':')?;
            Some((format!("keyed:{stream}"), id.parse().ok()?))
        })
        .await
        .unwrap();
    assert!(!domain.has_applied_keys("users-service").await.unwrap());
    assert_eq!(domain.offset("keyed:o").await.unwrap(), 2);
    let keyed = |id| Applied::Position {
        stream: "keyed:o",
        id,
    };
    assert!(!domain.apply_order_created(keyed(2), 9, 1.5).await.unwrap());
    assert!(domain.apply_order_created(keyed(3), 9, 1.5).await.unwrap());
}

/// A patch whose post another transaction changes between the patch's read
/// and its write keeps that change, and announces the post as stored: the
/// other transaction is held open until the patch waits for its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_patch_keeps_a_change_made_between_its_read_and_its_write() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let (_app, domain) = Backend::Postgres(url).instance(|_| {}).await;
    let db = domain.db().clone();
    let author = domain
        .create_user(
            &admin(),
            NewUser {
                name: "Author".into(),
                email: "author@example.com".into(),
                age: None,
            },
        )
        .await
        .unwrap();
    let post = domain
        .create_post(
            &admin(),
            NewPost {
                title: "as written".into(),
                content: "as written".into(),
                author_id: Some(author.id),
            },
        )
        .await
        .unwrap();
    let mut updates = Box::pin(
        domain
            .events()
            .subscribe(None, EventFilter::parse("post.updated")),
    );
    let mut other = tokio::time::timeout(WAIT, db.postgres().unwrap().begin())
        .await
        .unwrap()
        .unwrap();
    let changing = sqlx::query("UPDATE posts SET title = 'changed meanwhile' WHERE id = $1")
        .bind(post.id)
        .execute(&mut *other);
    tokio::time::timeout(WAIT, changing).await.unwrap().unwrap();
    let patching = tokio::spawn({
        let domain = domain.clone();
        async move {
            let patch = PostPatch {
                title: None,
                content: Some("patched".into()),
            };
            domain.update_post(&admin(), post.id, patch).await
        }
    });
    lock_waiters(
        &db,
        "transactionid",
        1,
        "the patch to wait for the post's row",
    )
    .await;
    tokio::time::timeout(WAIT, other.commit())
        .await
        .unwrap()
        .unwrap();
    let patched = tokio::time::timeout(WAIT, patching)
        .await
        .expect("the patch")
        .unwrap()
        .unwrap();
    assert_eq!(
        (patched.title.as_str(), patched.content.as_str()),
        ("changed meanwhile", "patched")
    );
    assert_eq!(domain.get_post(post.id).await.unwrap(), patched);
    let announced = take_events(&mut updates, 1).await;
    assert_eq!(announced[0].payload_as::<Post>().unwrap(), patched);
}
