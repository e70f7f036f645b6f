//! The `prism` command line: parse, configure logging, build, run.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use prism::{
    App,
    app::Role,
    config::{Config, Settings},
    gateway::{GatewayApp, registry::Registry},
};

// Many small, short-lived allocations per request (headers, JSON, frames)
// from several threads: mimalloc's per-thread free lists beat glibc's arenas
// here (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc asks the kernel for transparent huge pages, and then every
/// 2 MiB of heap that a connection touches a few KiB of is resident whole.
/// A server holding many long-lived connections (SSE, WebSockets, gRPC
/// streams) pays for that: 10,000 SSE subscribers held 31.5 KiB each with
/// huge pages and 19.9 KiB without, while request throughput measured the
/// same (docs/benchmarks.md, fan-out). Child processes inherit the setting.
fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("prism: could not opt out of transparent huge pages: {e}");
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "prism",
    version,
    about = "One domain over REST, GraphQL, gRPC, SSE and WebSockets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the all-in-one server: REST, GraphQL, gRPC, SSE, WebSockets and docs.
    Serve(Box<Args>),
    /// Run the users microservice (HTTP, default port 8001).
    UsersService(Box<Args>),
    /// Run the orders microservice (HTTP, default port 8002); it calls the users service.
    OrdersService(Box<Args>),
    /// Run the products microservice (gRPC product.ProductService, default port 50052).
    ProductsService(Box<Args>),
    /// Run the API gateway over the microservices (default port 8000).
    Gateway(Box<Args>),
    /// Run the whole microservice topology on this machine: users, orders,
    /// products and the gateway, as child processes with prefixed logs.
    Up(Box<Args>),
    /// Print the GraphQL schema (SDL).
    Schema,
}

#[derive(Debug, clap::Args)]
struct Args {
    /// A TOML file with any of the settings below (flags and PRISM_* variables win)
    #[arg(long, env = "PRISM_CONFIG")]
    config: Option<PathBuf>,

    #[command(flatten)]
    settings: Settings,
}

impl Args {
    /// The configuration, with this command's default ports.
    fn resolve(self, port: u16, grpc_port: u16) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => Settings::from_toml_file(path)?,
            None => Settings::default(),
        };
        let mut settings = self.settings.overlay(file)?;
        settings.port.get_or_insert(port);
        settings.grpc_port.get_or_insert(grpc_port);
        settings.resolve()
    }
}

/// Runs `f` on a runtime with `config.worker_threads` threads, or on this
/// thread alone when `alone` (the gateway starts its other workers itself).
fn run(
    config: Config,
    alone: bool,
    f: impl AsyncFnOnce(Config) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    prism::telemetry::init(config.log_format, &config.log_level);
    raise_open_file_limit();
    // One worker means one thread: the current-thread scheduler skips the
    // work-stealing machinery (and its cross-thread atomics) that has nobody
    // to steal from.
    let mut runtime = match config.worker_threads {
        _ if alone || config.worker_threads == Some(1) => {
            tokio::runtime::Builder::new_current_thread()
        }
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all().build()?.block_on(f(config))
}

/// Every connection is a file descriptor (two for each request the gateway
/// passes on), and the usual soft limit, 1024, is far below what the hard
/// limit allows: it is raised as far as allowed, as Go's runtime does for
/// its servers.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
}

fn service(role: Role, config: Config) -> anyhow::Result<()> {
    run(config, false, async move |config| {
        // Before anything else: a signal during start-up is then a graceful stop.
        let stop = prism::app::shutdown_signal();
        let app = App::build_as(role, config).await?;
        app.run_until_stopped(stop).await
    })
}

fn main() -> anyhow::Result<()> {
    without_transparent_huge_pages();
    match Cli::parse().command {
        Command::Serve(args) => service(Role::Serve, args.resolve(8000, 50051)?),
        Command::UsersService(args) => service(Role::Users, args.resolve(8001, 0)?),
        Command::OrdersService(args) => service(Role::Orders, args.resolve(8002, 0)?),
        Command::ProductsService(args) => service(Role::Products, args.resolve(0, 50052)?),
        Command::Gateway(args) => {
            let config = args.resolve(8000, 0)?;
            run(config, true, async move |config| {
                let stop = prism::app::shutdown_signal();
                let registry = match &config.registry {
                    Some(path) => Registry::from_file(path)?,
                    None => Registry::local_default(),
                };
                let app = GatewayApp::build(&config, &registry).await?;
                app.run_until_stopped(stop).await
            })
        }
        Command::Up(args) => {
            let config = args.resolve(8000, 50052)?;
            run(config, false, async move |config| {
                prism::up::run(config).await
            })
        }
        Command::Schema => {
            print!("{}", prism::graphql::sdl());
            Ok(())
        }
    }
}
