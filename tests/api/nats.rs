//! Reliable events between services over real NATS JetStream (SPEC §8): orders
//! are created while the broker is down and restored, and while the orders
//! service is killed and restarted; every `order.created` reaches the users
//! service and the stream, none lost, duplicates handled.

use std::{collections::BTreeSet, path::Path, sync::Arc};

use futures::StreamExt;
use prism::{App, Config, app::Role};
use serde_json::{Value, json};

use crate::helpers::{ADMIN_PASSWORD, Process, WAIT, eventually};

const SECRET: &str = "a test secret shared by the whole topology";

/// A private nats-server with JetStream, so the test can stop and start it.
struct Broker {
    child: tokio::process::Child,
}

/// The nats-server binary, or `None` (with a notice) when there is none, for
/// `test` to skip; under `CI=true` a missing binary fails the test instead.
fn nats_server(test: &str) -> Option<String> {
    let path = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    if path.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("nats-server is missing");
        }
        eprintln!("SKIPPED: {test} (no nats-server binary)");
    }
    path.map(str::to_owned)
}

impl Broker {
    async fn start(bin: &str, port: u16, store: &Path) -> Broker {
        let child = tokio::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Ready once a client can connect.
        eventually("nats-server to accept clients", || async {
            async_nats::connect(format!("nats://127.0.0.1:{port}"))
                .await
                .ok()
        })
        .await;
        Broker { child }
    }

    async fn stop(mut self) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap()
            .unwrap();
    }
}

/// For a test's private broker: the nats-server binary, a directory, a port
/// and its URL; `None` when the test is to skip (see [`nats_server`]). The
/// broker may be stopped and restarted on the same port, so the port is not
/// one the kernel hands out in between.
fn private_nats(test: &str) -> Option<(String, tempfile::TempDir, u16, String)> {
    let bin = nats_server(test)?;
    let port = crate::helpers::ports_outside_the_ephemeral_range(1)[0];
    let dir = tempfile::tempdir().unwrap();
    Some((bin, dir, port, format!("nats://127.0.0.1:{port}")))
}

async fn place_order(client: &reqwest::Client, orders: &Process, token: &str, total: f64) -> i64 {
    let r = client
        .post(orders.url("/orders"))
        .bearer_auth(token)
        .json(&json!({"total": total}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
}

async fn start_orders(dir: &Path, users_url: &str, nats: &str) -> Process {
    Process::start(
        &[
            "orders-service",
            "--port",
            "0",
            "--demo",
            "--users-url",
            users_url,
            "--nats-url",
            nats,
        ],
        dir,
        &[("PRISM_JWT_SECRET", SECRET)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_order_created_is_lost_when_the_broker_or_the_service_goes_down() {
    let Some((bin, dir, port, nats)) = private_nats("NATS fault test") else {
        return;
    };
    prism::telemetry::init_tap_only("warn");
    let broker = Broker::start(&bin, port, &dir.path().join("nats")).await;

    // The users service consumes from JetStream; the orders service relays to it.
    let users = App::build_as(
        Role::Users,
        Config {
            demo: true,
            admin_password: Some(ADMIN_PASSWORD.into()),
            jwt_secret: Some(SECRET.into()),
            nats_url: Some(nats.clone()),
            ..Config::for_tests(dir.path().join("users"))
        },
    )
    .await
    .unwrap();
    let users_url = format!("http://{}", users.http_addr());
    let users_domain = users.state().domain.clone();
    let users = crate::helpers::run(users);
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let token = crate::helpers::alice_token_at(&client, &users_url).await;

    let orders_dir = dir.path().join("orders");
    let mut orders = start_orders(&orders_dir, &users_url, &nats).await;
    let mut placed = vec![1, 2]; // the demo orders
    for i in 0..3 {
        placed.push(place_order(&client, &orders, &token, 10.0 + f64::from(i)).await);
    }

    // The broker goes away: orders still commit; their events wait in the outbox.
    broker.stop().await;
    for i in 0..3 {
        placed.push(place_order(&client, &orders, &token, 20.0 + f64::from(i)).await);
    }
    let broker = Broker::start(&bin, port, &dir.path().join("nats")).await;
    placed.push(place_order(&client, &orders, &token, 30.0).await);

    // The orders service dies without warning and comes back.
    orders.signal("-KILL");
    let _ = tokio::time::timeout(WAIT, orders.child.wait())
        .await
        .unwrap();
    orders = start_orders(&orders_dir, &users_url, &nats).await;
    for i in 0..2 {
        placed.push(place_order(&client, &orders, &token, 40.0 + f64::from(i)).await);
    }

    // Every order reached the users service exactly once: Alice's count is
    // her demo order plus the nine placed here.
    let stats = eventually("every order.created to reach the users service", || async {
        let s = users_domain.order_stats(1).await.ok()?;
        (s.orders >= 10).then_some(s)
    })
    .await;
    assert_eq!(stats.orders, 10, "an order was applied twice: {stats:?}");
    assert!(
        !users_domain
            .has_applied_keys("users-service")
            .await
            .unwrap(),
        "a message id was kept: delivery is in order, a position is enough"
    );

    // And the stream holds every order id, with no gap.
    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    let stream = js.get_stream(prism::relay::STREAM).await.unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "prism.events.order.created".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seen = BTreeSet::new();
    let want: BTreeSet<i64> = placed.iter().copied().collect();
    while seen != want {
        let msg = tokio::time::timeout(WAIT, messages.next())
            .await
            .unwrap_or_else(|_| panic!("stream ended with {seen:?}, wanted {want:?}"))
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&msg.payload).unwrap();
        seen.insert(event["payload"]["order_id"].as_i64().unwrap());
        msg.ack().await.unwrap();
    }

    orders.signal("-TERM");
    assert!(orders.wait_exit().await.success());
    users.stop().await;
    broker.stop().await;
}

/// `prism serve --nats-url`: every domain event is published to JetStream,
/// named `<origin>:<event id>` so the broker drops a relay's duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_publishes_every_domain_event_to_jetstream() {
    let Some((bin, dir, port, nats)) = private_nats("NATS relay test") else {
        return;
    };
    let broker = Broker::start(&bin, port, &dir.path().join("nats")).await;
    let app = serve_relaying_to(dir.path(), nats.clone()).await;
    let user = create_user(&app, "Relayed", "relayed@example.com").await;

    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    let stream = eventually("the relay to create its stream", || async {
        js.get_stream(prism::relay::STREAM).await.ok()
    })
    .await;
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "prism.events.user.created".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    loop {
        let msg = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("user.created never reached JetStream")
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&msg.payload).unwrap();
        if event["payload"]["email"] == "relayed@example.com" {
            assert_eq!(event["type"], "user.created");
            assert_eq!(event["payload"]["id"], user["id"]);
            let id = msg
                .headers
                .as_ref()
                .unwrap()
                .get("Nats-Msg-Id")
                .unwrap()
                .to_string();
            assert!(id.ends_with(&format!(":{}", event["id"])), "{id}");
            break;
        }
    }
    app.stop().await;
    broker.stop().await;
}

/// While the broker is away, the relay's unpublished events outlive their
/// retention (they are the outbox), `/readyz` and `/metrics` say the relay is
/// reconnecting, and once the broker is back every event reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublished_events_outlive_their_retention() {
    let Some((bin, dir, port, nats)) = private_nats("NATS retention test") else {
        return;
    };
    let mut config = crate::helpers::test_config(&dir.path().join("serve"));
    config.nats_url = Some(nats.clone());
    config.event_retention = std::time::Duration::ZERO;
    let app = crate::helpers::spawn_with(config).await;
    let user = create_user(&app, "Kept", "kept@example.com").await;
    let events = app.state.domain.events();
    let logged = events.read_stored(0, 10_000).await.unwrap();
    let head = logged.last().unwrap().id;

    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(ready["nats"], "reconnecting", "{ready}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("prism_nats_relay_connected 0"),
        "{metrics}"
    );
    assert_eq!(
        events.enforce_retention().await.unwrap(),
        0,
        "events the relay has not published were deleted"
    );

    let broker = Broker::start(&bin, port, &dir.path().join("nats")).await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    // Every event up to the head, the demo's included.
    let published = eventually("the relay to publish every event", || async {
        let mut stream = js.get_stream(prism::relay::STREAM).await.ok()?;
        let messages = stream.info().await.ok()?.state.messages;
        (messages >= logged.len() as u64).then_some(messages)
    })
    .await;
    assert_eq!(
        published,
        logged.len() as u64,
        "an event was published twice"
    );
    let stream = js.get_stream(prism::relay::STREAM).await.unwrap();
    let last = stream
        .get_last_raw_message_by_subject("prism.events.user.created")
        .await
        .unwrap();
    let event: Value = serde_json::from_slice(&last.payload).unwrap();
    assert_eq!(event["payload"]["id"], user["id"]);

    eventually("the relay to report its position", || async {
        let (_, ready) = app.get_json("/readyz").await;
        let metrics = app.get("/metrics").await.text().await.unwrap();
        (ready["nats"] == "connected"
            && metrics.contains("prism_nats_relay_connected 1")
            && metrics.contains(&format!("prism_nats_relay_position {head}")))
        .then_some(())
    })
    .await;
    // Published, the events are ordinary history again.
    assert!(events.enforce_retention().await.unwrap() > 0);
    app.stop().await;
    broker.stop().await;
}

/// A private broker and a fresh PostgreSQL database, for instances that
/// share both; `None` (the test skips) when either is missing.
async fn broker_and_postgres(test: &str) -> Option<(Broker, tempfile::TempDir, String, String)> {
    let (bin, dir, port, nats) = private_nats(test)?;
    let db = crate::helpers::postgres_url().await?;
    let broker = Broker::start(&bin, port, &dir.path().join("nats")).await;
    Some((broker, dir, nats, db))
}

/// Instances sharing a PostgreSQL database share one event log, and one of
/// them relays it: the other stands by, and takes over when the first stops,
/// from where it left off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_sharing_postgres_take_turns_to_relay() {
    let Some((broker, dir, nats, db)) = broker_and_postgres("NATS relay test").await else {
        return;
    };
    let instance = |name: &str| {
        let mut config = crate::helpers::test_config(&dir.path().join(name));
        config.database_url = Some(db.clone());
        config.nats_url = Some(nats.clone());
        crate::helpers::spawn_with(config)
    };
    let relay_state = |app: &crate::helpers::TestApp| {
        let url = app.url("/readyz");
        let client = app.client.clone();
        async move {
            let body: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            body["nats"].as_str().map(str::to_owned)
        }
    };
    let a = instance("a").await;
    eventually("the first instance to relay", || async {
        (relay_state(&a).await.as_deref() == Some("connected")).then_some(())
    })
    .await;
    let b = instance("b").await;
    eventually("the second instance to stand by", || async {
        (relay_state(&b).await.as_deref() == Some("standby")).then_some(())
    })
    .await;
    let metrics = b.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("prism_nats_relay_standby 1"), "{metrics}");

    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    // Every event of the shared log, once each, whichever instance wrote it.
    let all_published = |events: prism::events::EventLog| {
        let js = js.clone();
        async move {
            let logged = events.read_stored(0, 10_000).await.ok()?.len() as u64;
            let mut stream = js.get_stream(prism::relay::STREAM).await.ok()?;
            (stream.info().await.ok()?.state.messages == logged).then_some(())
        }
    };
    create_user(&b, "Shared", "written-on-b@example.com").await;
    eventually(
        "the relaying instance to publish what the other wrote",
        || all_published(b.state.domain.events().clone()),
    )
    .await;

    a.stop().await;
    eventually("the standby to take over", || async {
        (relay_state(&b).await.as_deref() == Some("connected")).then_some(())
    })
    .await;
    create_user(&b, "Shared", "after-the-handover@example.com").await;
    eventually("the new relay to publish, with no gap", || {
        all_published(b.state.domain.events().clone())
    })
    .await;
    b.stop().await;
    broker.stop().await;
}

/// Users services sharing a PostgreSQL database share its order statistics:
/// one applies `order.created`, the other stands by, and takes over when the
/// first stops, from where it left off; every order counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_services_sharing_postgres_take_turns_to_apply_orders() {
    let Some((broker, dir, nats, db)) = broker_and_postgres("NATS consumer test").await else {
        return;
    };
    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: prism::relay::STREAM.into(),
        subjects: vec!["prism.events.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let users = |name: &str| {
        let config = Config {
            demo: true,
            admin_password: Some(ADMIN_PASSWORD.into()),
            jwt_secret: Some(SECRET.into()),
            nats_url: Some(nats.clone()),
            database_url: Some(db.clone()),
            ..Config::for_tests(dir.path().join(name))
        };
        async move {
            let app = App::build_as(Role::Users, config).await.unwrap();
            let url = format!("http://{}", app.http_addr());
            let domain = app.state().domain.clone();
            (url, domain, crate::helpers::run(app))
        }
    };
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let consumer_state = |url: &str| {
        let (client, url) = (client.clone(), format!("{url}/readyz"));
        async move {
            let body: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            body["order_consumer"].as_str().map(str::to_owned)
        }
    };
    let orders_of_alice =
        |domain: prism::domain::Domain| async move { domain.order_stats(1).await.unwrap().orders };

    let (a_url, a_domain, a) = users("a").await;
    eventually("the first users service to consume", || async {
        (consumer_state(&a_url).await.as_deref() == Some("connected")).then_some(())
    })
    .await;
    let (b_url, b_domain, b) = users("b").await;
    eventually("the second users service to stand by", || async {
        (consumer_state(&b_url).await.as_deref() == Some("standby")).then_some(())
    })
    .await;
    let metrics = client
        .get(format!("{b_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("prism_order_consumer_standby 1"),
        "{metrics}"
    );

    let before = orders_of_alice(a_domain.clone()).await;
    for id in 1..=3 {
        publish_order_created(&js, id).await;
    }
    eventually(
        "the consuming users service to apply the orders",
        || async { (orders_of_alice(a_domain.clone()).await >= before + 3).then_some(()) },
    )
    .await;

    a.stop().await;
    eventually("the standby to take over", || async {
        (consumer_state(&b_url).await.as_deref() == Some("connected")).then_some(())
    })
    .await;
    for id in 4..=6 {
        publish_order_created(&js, id).await;
    }
    let after = eventually("the new consumer to apply the later orders", || async {
        let n = orders_of_alice(b_domain.clone()).await;
        (n >= before + 6).then_some(n)
    })
    .await;
    assert_eq!(after, before + 6, "an order was applied twice");
    b.stop().await;
    broker.stop().await;
}

/// `prism serve`, in this process, with its data under `dir` and its
/// events relayed to `nats`.
async fn serve_relaying_to(dir: &Path, nats: String) -> crate::helpers::TestApp {
    let mut config = crate::helpers::test_config(&dir.join("serve"));
    config.nats_url = Some(nats);
    crate::helpers::spawn_with(config).await
}

/// `n` broadcasts through `app`, 16 at a time.
async fn broadcasts(app: &crate::helpers::TestApp, token: &str, n: usize) {
    let sends = futures::stream::iter(0..n)
        .map(|i| {
            let request = app
                .client
                .post(app.url("/broadcast"))
                .query(&[("message", format!("burst {i}"))])
                .bearer_auth(token);
            async move { request.send().await.unwrap().status() }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    assert!(sends.iter().all(|s| s.is_success()), "{sends:?}");
}

/// Every event in `app`'s log, once its relay has published them all.
async fn relayed_log(app: &crate::helpers::TestApp) -> Vec<i64> {
    let logged: Vec<i64> = app
        .state
        .domain
        .events()
        .read_stored(0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let head = *logged.last().unwrap();
    let relay = app.state.relay.clone().unwrap();
    eventually("the relay to publish the whole log", || async {
        (relay.position() >= head).then_some(())
    })
    .await;
    logged
}

/// The message ids in the stream, in its order.
async fn stream_message_ids(js: &async_nats::jetstream::Context) -> Vec<String> {
    use async_nats::jetstream::consumer::pull;
    let mut stream = js.get_stream(prism::relay::STREAM).await.unwrap();
    let end = stream.info().await.unwrap().state.last_sequence;
    let consumer = stream
        .create_consumer(pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let (mut ids, mut at) = (Vec::new(), 0);
    while at < end {
        let msg = tokio::time::timeout(WAIT, messages.next())
            .await
            .unwrap_or_else(|_| panic!("the stream ended at {at} of {end}"))
            .unwrap()
            .unwrap();
        at = msg.info().unwrap().stream_sequence;
        let id = msg.headers.as_ref().unwrap().get("Nats-Msg-Id").unwrap();
        ids.push(id.to_string());
    }
    ids
}

/// The event ids `ours` (in the stream's order) are `logged`, the whole log
/// in its order.
fn assert_in_log_order(ours: &[i64], logged: &[i64]) {
    // The first difference, rather than two lists of hundreds of ids.
    let first = ours.iter().zip(logged).position(|(a, b)| a != b);
    assert_eq!(
        (first, ours.len()),
        (None, logged.len()),
        "the stream lost or reordered prism's events"
    );
}

/// The relay sends a batch without waiting for each acknowledgement, chaining
/// every message to the one before it. Another publisher writing to the same
/// stream meanwhile breaks the chain again and again: the refused events are
/// sent again, and the stream holds every event of prism's log, in the log's
/// order, so a consumer keeping a position per publisher misses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_the_logs_order_while_another_publisher_writes() {
    let Some((bin, dir, port, nats)) = private_nats("NATS relay order test") else {
        return;
    };
    let broker = Broker::start(&bin, port, &dir.path().join("nats")).await;
    let app = serve_relaying_to(dir.path(), nats.clone()).await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    eventually("the relay to create its stream", || async {
        js.get_stream(prism::relay::STREAM).await.ok()
    })
    .await;

    // Another system publishes to the stream, one message after another,
    // until the test has what it wants.
    let foreign = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn({
        let (js, foreign) = (js.clone(), foreign.clone());
        async move {
            let mut n = 0;
            while !foreign.is_cancelled() {
                n += 1;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("foreign:{n}").as_str());
                let ack = js
                    .publish_with_headers("prism.events.foreign", headers, "{}".into())
                    .await
                    .unwrap();
                tokio::time::timeout(WAIT, ack).await.unwrap().unwrap();
            }
        }
    });
    broadcasts(&app, &app.alice_token().await, 600).await;
    let logged = relayed_log(&app).await;
    foreign.cancel();
    tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap()
        .unwrap();

    let prefix = format!("{}:", app.state.domain.origin().await.unwrap());
    let (mut ours, mut interleaved, mut foreign_since_ours) = (Vec::new(), 0, false);
    for id in stream_message_ids(&js).await {
        match id.strip_prefix(&prefix) {
            Some(event) => {
                interleaved += usize::from(foreign_since_ours && !ours.is_empty());
                foreign_since_ours = false;
                ours.push(event.parse::<i64>().unwrap());
            }
            None => foreign_since_ours = true,
        }
    }
    assert_in_log_order(&ours, &logged);
    // The other publisher's messages did land between prism's.
    assert!(
        interleaved > 0,
        "no message of the other publisher came between prism's"
    );
    app.stop().await;
    broker.stop().await;
}

/// A TCP relay to the broker whose connections the test can cut at once, as
/// a network fault would, while the broker itself runs on.
struct Cutter {
    port: u16,
    links: Arc<std::sync::Mutex<Vec<tokio_util::task::AbortOnDropHandle<()>>>>,
    _accept: tokio_util::task::AbortOnDropHandle<()>,
}

impl Cutter {
    async fn start(broker_port: u16) -> Cutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let links = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let links = links.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let link = tokio::spawn(async move {
                        if let Ok(mut broker) =
                            tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                        }
                    });
                    links
                        .lock()
                        .unwrap()
                        .push(tokio_util::task::AbortOnDropHandle::new(link));
                }
            }
        });
        Cutter {
            port,
            links,
            _accept: tokio_util::task::AbortOnDropHandle::new(accept),
        }
    }

    /// Drops every connection made so far, both ends, mid-stream.
    fn cut(&self) {
        self.links.lock().unwrap().clear();
    }
}

/// The relay's connection to the broker is cut again and again while it
/// publishes batches: messages sent on the broken connection are lost, later
/// ones go out on the next, and JetStream refuses any whose predecessor did
/// not arrive. The stream ends up with every event of the log, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_loses_nothing_when_its_connection_is_cut_mid_batch() {
    let Some((bin, dir, port, nats)) = private_nats("NATS connection cut test") else {
        return;
    };
    let broker = Broker::start(&bin, port, &dir.path().join("nats")).await;
    let cutter = Cutter::start(port).await;
    let app = serve_relaying_to(dir.path(), format!("nats://127.0.0.1:{}", cutter.port)).await;
    let token = app.alice_token().await;
    let start = *relayed_log(&app).await.last().unwrap();
    // Each cut comes as the relay stores a position, while clients write: on
    // its way through the next batch.
    let relay = app.state.relay.clone().unwrap();
    let cuts = async {
        for k in 1..=10 {
            eventually("the relay to get further", || async {
                (relay.position() >= start + k * 100).then_some(())
            })
            .await;
            cutter.cut();
        }
    };
    tokio::join!(broadcasts(&app, &token, 1200), cuts);
    let logged = relayed_log(&app).await;

    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    let prefix = format!("{}:", app.state.domain.origin().await.unwrap());
    let ours: Vec<i64> = stream_message_ids(&js)
        .await
        .iter()
        .map(|id| id.strip_prefix(&prefix).unwrap().parse().unwrap())
        .collect();
    assert_in_log_order(&ours, &logged);
    app.stop().await;
    broker.stop().await;
}

/// Creates a user as Alice; returns it.
async fn create_user(app: &crate::helpers::TestApp, name: &str, email: &str) -> Value {
    let token = app.alice_token().await;
    app.create(
        "/users/",
        Some(&token),
        json!({"name": name, "email": email}),
    )
    .await
}

/// Publishes an `order.created` for user 1 as a relay of database `777`
/// would, and returns JetStream's acknowledgement.
async fn publish_order_created(
    js: &async_nats::jetstream::Context,
    id: i64,
) -> async_nats::jetstream::publish::PublishAck {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("777:{id}").as_str());
    let event = json!({
        "id": id,
        "type": "order.created",
        "payload": {"order_id": id, "user_id": 1, "total": id as f64},
    });
    js.publish_with_headers(
        "prism.events.order.created",
        headers,
        event.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap()
}

/// The users service reads JetStream in order (an ordered consumer started
/// past the stream sequence it stores with its changes) and keeps a position
/// per publisher instead of every message id it applied. A build before that
/// used a durable consumer and kept the ids: they still count for the
/// messages that build was sent, and then become positions. Redelivered
/// messages, and one a relay published again after the broker forgot its id,
/// are applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_delivery_takes_over_from_kept_message_ids() {
    use async_nats::jetstream::{self, AckKind, consumer::pull};
    let Some((bin, dir, port, nats)) = private_nats("NATS consumer test") else {
        return;
    };
    let broker = Broker::start(&bin, port, &dir.path().join("nats")).await;
    let client = async_nats::connect(&nats).await.unwrap();
    let js = jetstream::new(client.clone());
    // The broker forgets a message id after a second, so that a republished
    // event can be seen past it without waiting two minutes.
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: prism::relay::STREAM.into(),
            subjects: vec!["prism.events.>".into()],
            duplicate_window: std::time::Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();
    for id in 1..=4 {
        publish_order_created(&js, id).await;
    }

    // The earlier build: sent all four at once, it applied 1 to 3 and
    // recorded their ids, but only 1 and 2 were acknowledged before it
    // stopped.
    let old: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("users-service".into()),
            filter_subject: "prism.events.order.created".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: std::time::Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = old.fetch().max_messages(4).messages().await.unwrap();
    for id in 1..=4 {
        let msg = tokio::time::timeout(WAIT, batch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(event["id"], id);
        if id <= 2 {
            msg.double_ack().await.unwrap();
        } else {
            msg.ack_with(AckKind::Nak(None)).await.unwrap();
        }
    }
    tokio::time::timeout(WAIT, client.flush())
        .await
        .unwrap()
        .unwrap();
    let users_dir = dir.path().join("users");
    let earlier = App::build(Config::for_tests(users_dir.clone()))
        .await
        .unwrap();
    let earlier_domain = earlier.state().domain.clone();
    for id in 1..=3 {
        let key = format!("777:{id}");
        let once = prism::domain::consumers::Applied::Key {
            consumer: "users-service",
            key: &key,
        };
        assert!(
            earlier_domain
                .apply_order_created(once, 1, id as f64)
                .await
                .unwrap()
        );
    }
    drop(earlier_domain);
    tokio::time::timeout(WAIT, earlier.run_until_stopped(async {}))
        .await
        .unwrap()
        .unwrap();

    // Published after the upgrade: order 2 again once the broker has
    // forgotten its id, as a relay restarted late would (only the kept ids
    // know it was applied), then new orders.
    eventually("the broker to forget order 2's message id", || async {
        (!publish_order_created(&js, 2).await.duplicate).then_some(())
    })
    .await;
    for id in 5..=6 {
        publish_order_created(&js, id).await;
    }

    let users = App::build_as(
        Role::Users,
        Config {
            nats_url: Some(nats.clone()),
            ..Config::for_tests(users_dir)
        },
    )
    .await
    .unwrap();
    let domain = users.state().domain.clone();
    let users = crate::helpers::run(users);
    // 6 is the last in the stream: once it is applied, every message before
    // it has been taken.
    let stats = eventually("order 6 to be applied", || async {
        let s = domain.order_stats(1).await.ok()?;
        (s.orders >= 6).then_some(s)
    })
    .await;
    assert_eq!((stats.orders, stats.total), (6, 21.0), "{stats:?}");
    assert!(
        !domain.has_applied_keys("users-service").await.unwrap(),
        "message ids are still kept"
    );
    assert_eq!(
        domain.offset("users-service:jetstream:777").await.unwrap(),
        6
    );
    // Seven messages: order 2 is in the stream twice.
    assert_eq!(domain.offset("users-service:jetstream").await.unwrap(), 7);
    // The earlier build's durable consumer is gone.
    assert!(stream.consumer_info("users-service").await.is_err());

    users.stop().await;
    broker.stop().await;
}
