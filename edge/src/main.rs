//! `outpost-edge`: parse flags into a validated config, install logging, run the agent.

use clap::{Parser, Subcommand};
use outpost_edge::config::{self, Config, FileConfig, Overrides};
use std::path::PathBuf;
use std::process::ExitCode;

/// The outpost agent: obeys signed commands from the hub and reports every outcome.
#[derive(Parser)]
#[command(version = outpost_edge::VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect to the fleet's NATS and serve commands until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Validate the configuration and print it, then exit.
    CheckConfig(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file; flags and environment variables override its keys.
    #[arg(long, short, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    /// This unit's name (A-Z a-z 0-9 _ -), as the hub addresses it.
    #[arg(long, env = "OUTPOST_NODE")]
    node: Option<String>,
    /// NATS server URL(s), comma-separated; must be tls://.
    #[arg(long, env = "OUTPOST_NATS_URL")]
    nats_url: Option<String>,
    /// The fleet CA certificate (PEM) that the NATS server's certificate must chain to.
    #[arg(long, env = "OUTPOST_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// This unit's NATS nkey seed file (from its `outpost-hub enroll` bundle).
    #[arg(long, env = "OUTPOST_NKEY_FILE")]
    nkey_file: Option<PathBuf>,
    /// The hub's command-signing public key (64 hex digits, from hub-signing.pub).
    #[arg(long, env = "OUTPOST_HUB_KEY")]
    hub_key: Option<String>,
    /// Where the agent keeps accepted commands and undelivered outcomes [default: /var/lib/outpost].
    #[arg(long, env = "OUTPOST_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Subject prefix shared with the hub [default: outpost].
    #[arg(long, env = "OUTPOST_PREFIX")]
    prefix: Option<String>,
    /// A label key=value reported in hellos; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Seconds between hellos [default: 15].
    #[arg(long, env = "OUTPOST_HELLO_INTERVAL")]
    hello_interval: Option<u32>,
    /// Start TLS before the broker speaks (the broker must allow it: `handshake_first`).
    #[arg(long, env = "OUTPOST_TLS_FIRST", action = clap::ArgAction::Set)]
    tls_first: Option<bool>,
}

fn build(a: RunArgs) -> Result<Config, config::ConfigError> {
    let file = match &a.config {
        Some(p) => config::load_file(p)?,
        None => FileConfig::default(),
    };
    Config::build(
        Overrides {
            config_file: a.config,
            node: a.node,
            nats_url: a.nats_url,
            ca_file: a.ca_file,
            nkey_file: a.nkey_file,
            hub_key: a.hub_key,
            state_dir: a.state_dir,
            prefix: a.prefix,
            labels: a.labels,
            hello_interval_s: a.hello_interval,
            tls_first: a.tls_first,
        },
        file,
    )
}

fn init_logging() {
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "info,async_nats=warn".parse().expect("valid filter"));
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let (args, check_only) = match cli.cmd {
        Cmd::Run(a) => (a, false),
        Cmd::CheckConfig(a) => (a, true),
    };
    let cfg = match build(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost-edge: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!("{cfg:#?}");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost-edge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(outpost_edge::agent::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}
