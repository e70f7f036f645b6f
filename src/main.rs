//! The `prism` command line: parse, configure logging, build, run.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use prism::{App, config::Settings};

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
    /// Run the all-in-one server: REST, GraphQL, SSE, WebSockets and docs.
    Serve(Box<ServeArgs>),
    /// Print the GraphQL schema (SDL).
    Schema,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// A TOML file with any of the settings below (flags and PRISM_* variables win)
    #[arg(long, env = "PRISM_CONFIG")]
    config: Option<PathBuf>,

    #[command(flatten)]
    settings: Settings,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let file = match &args.config {
                Some(path) => Settings::from_toml_file(path)?,
                None => Settings::default(),
            };
            let config = args.settings.overlay(file)?.resolve()?;
            prism::telemetry::init(config.log_format, &config.log_level);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let app = App::build(config).await?;
                app.run_until_stopped(prism::app::shutdown_signal()).await
            })
        }
        Command::Schema => {
            print!("{}", prism::graphql::sdl());
            Ok(())
        }
    }
}
