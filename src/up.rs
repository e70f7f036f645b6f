//! `prism up`: the whole microservice topology on one machine, one command.
//!
//! Starts this same binary four times — users service (8001, or the port of
//! `--users-url`), orders service (8002, or `--orders-url`'s), products
//! service (gRPC `--grpc-port`, 50052) and the gateway (`--port`, 8000) —
//! each with its own database under `<data-dir>/<service>`, one JWT signing
//! secret for all of them (the configured one, or one generated for this
//! topology and kept in `<data-dir>/jwt-secret`), and the gateway's registry
//! written to `<data-dir>/registry.toml`. Their logs are prefixed with the
//! service's name. With `--nats-url` the orders service relays `order.created`
//! to JetStream and the users service consumes it there; without it the users
//! service follows the orders service's `/events/feed` directly.
//! SIGINT/SIGTERM stops all four gracefully.

use std::{process::Stdio, time::Duration};

use anyhow::Context;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{
    config::Config,
    gateway::registry::{Registry, ServiceSpec},
};

struct Service {
    name: &'static str,
    args: Vec<String>,
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Installed before any service starts, so a signal always stops them all.
    let stop = crate::app::shutdown_signal();
    let exe = std::env::current_exe().context("cannot find the prism binary")?;
    std::fs::create_dir_all(&config.data_dir)?;
    let secret = match &config.jwt_secret {
        Some(s) => s.clone(),
        None => {
            let path = config.data_dir.join("jwt-secret");
            match std::fs::read_to_string(&path) {
                Ok(s) => s.trim().to_owned(),
                Err(_) => {
                    let s = crate::auth::random_token(32);
                    std::fs::write(&path, &s)?;
                    s
                }
            }
        }
    };
    let host = &config.host;
    // The services' ports come from where the others are told to find them
    // (`--users-url`, `--orders-url`, default 8001 and 8002) and `--grpc-port`.
    let port_of = |url: &str, default: u16| {
        url.rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .unwrap_or(default)
    };
    let users = port_of(&config.users_url, 8001);
    let orders = port_of(&config.orders_url, 8002);
    let products = config.grpc_port;
    let mut registry = Registry::local_default();
    registry.services.insert(
        "users".into(),
        ServiceSpec::new(vec![format!("http://{host}:{users}")]),
    );
    registry.services.insert(
        "orders".into(),
        ServiceSpec::new(vec![format!("http://{host}:{orders}")]),
    );
    registry.services.insert(
        "products".into(),
        ServiceSpec::new(vec![format!("http://{host}:{products}")]),
    );
    let registry_path = config.data_dir.join("registry.toml");
    std::fs::write(&registry_path, registry.to_toml())?;

    let dir = |name: &str| config.data_dir.join(name).display().to_string();
    let mut common = vec![
        "--host".to_owned(),
        host.clone(),
        "--log-format".into(),
        "pretty".into(),
    ];
    if let Some(url) = &config.nats_url {
        common.extend(["--nats-url".into(), url.clone()]);
    }
    if config.demo {
        common.push("--demo".into());
    }
    let services = [
        Service {
            name: "users",
            args: vec![
                "users-service".into(),
                "--port".into(),
                users.to_string(),
                "--data-dir".into(),
                dir("users"),
                "--orders-url".into(),
                format!("http://{host}:{orders}"),
            ],
        },
        Service {
            name: "orders",
            args: vec![
                "orders-service".into(),
                "--port".into(),
                orders.to_string(),
                "--data-dir".into(),
                dir("orders"),
                "--users-url".into(),
                format!("http://{host}:{users}"),
            ],
        },
        Service {
            name: "products",
            args: vec![
                "products-service".into(),
                "--grpc-port".into(),
                products.to_string(),
                "--data-dir".into(),
                dir("products"),
            ],
        },
        Service {
            name: "gateway",
            args: vec![
                "gateway".into(),
                "--port".into(),
                config.port.to_string(),
                "--data-dir".into(),
                dir("gateway"),
                "--registry".into(),
                registry_path.display().to_string(),
            ],
        },
    ];
    // The services write to pipes, where colours would be off; they stay on
    // when the lines end up on a terminal after all.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut stop = std::pin::pin!(stop);
    let mut children: Vec<(&'static str, Child)> = Vec::new();
    let [backends @ .., gateway] = services;
    for s in &backends {
        match start(&exe, s, &common, &secret, &config, colour) {
            Ok(child) => children.push((s.name, child)),
            Err(e) => {
                stop_all(&mut children, &config).await;
                return Err(e);
            }
        }
    }
    // The gateway starts once the services listen, so that its first health
    // checks find them up, rather than logging them down and answering 503
    // for a second.
    let local = match host.as_str() {
        "0.0.0.0" => "127.0.0.1",
        "::" | "[::]" => "::1",
        h => h,
    };
    let ports = [users, orders, products];
    let waited = tokio::select! {
        r = listening(&mut children, local, &ports) => Some(r),
        _ = &mut stop => None,
    };
    let failure = match waited {
        Some(Ok(())) => match start(&exe, &gateway, &common, &secret, &config, colour) {
            Err(e) => Some(e),
            Ok(child) => {
                children.push((gateway.name, child));
                tracing::info!(gateway = %format!("http://{host}:{}", config.port), "topology started: users :{users}, orders :{orders}, products :{products} (gRPC)");
                // Wait for a signal, or for a service to die (then stop the rest).
                tokio::select! {
                    _ = &mut stop => None,
                    (name, status) = exited(&mut children) => Some(anyhow::anyhow!("the {name} service exited ({status}); stopping the others")),
                }
            }
        },
        Some(Err(e)) => Some(e),
        None => None,
    };
    stop_all(&mut children, &config).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Starts one service, its output prefixed with its name.
fn start(
    exe: &std::path::Path,
    s: &Service,
    common: &[String],
    secret: &str,
    config: &Config,
    colour: bool,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(&s.args)
        .args(common)
        .env("PRISM_JWT_SECRET", secret)
        .env_remove("PRISM_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if colour {
        cmd.env("CLICOLOR_FORCE", "1");
    }
    if let Some(p) = &config.admin_password {
        cmd.env("PRISM_ADMIN_PASSWORD", p);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start the {} service", s.name))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let name = s.name;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{name:>8}] {line}");
            }
        });
    }
    Ok(child)
}

/// How long the services may take to open their ports (migrations on a
/// large database run first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until every port on `host` accepts connections; fails when a
/// service exits first or the ports are not all open within [`START_TIMEOUT`].
async fn listening(
    children: &mut [(&'static str, Child)],
    host: &str,
    ports: &[u16],
) -> anyhow::Result<()> {
    let give_up = tokio::time::Instant::now() + START_TIMEOUT;
    let mut waiting: Vec<u16> = ports.to_vec();
    loop {
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                anyhow::bail!("the {name} service exited ({status}) while starting");
            }
        }
        let mut still = Vec::new();
        for port in waiting {
            if tokio::net::TcpStream::connect((host, port)).await.is_err() {
                still.push(port);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= give_up {
            anyhow::bail!("ports {waiting:?} on {host} did not open within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first service to exit, and how it ended.
async fn exited(
    children: &mut [(&'static str, Child)],
) -> (&'static str, std::process::ExitStatus) {
    loop {
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return (*name, status);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM to every service, then waits for each to finish draining; one
/// that takes longer than its shutdown timeout is killed.
async fn stop_all(children: &mut [(&'static str, Child)], config: &Config) {
    for (_, child) in children.iter() {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for (name, child) in children.iter_mut() {
        if tokio::time::timeout(
            config.shutdown_timeout + Duration::from_secs(2),
            child.wait(),
        )
        .await
        .is_err()
        {
            tracing::warn!(service = *name, "did not stop in time; killing it");
            let _ = child.kill().await;
        }
    }
}
