//! The `muster` binary: parses the command line, sets up logging and runs
//! one subcommand. Any error ends the process with one line on stderr.

use std::{io::IsTerminal, process::ExitCode};

use muster::{
    agent, cli,
    config::{
        Command,
        file::{self, Invocation},
    },
    coordinator,
    error::{RunError, display_chain},
    shutdown, swarm,
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// jemalloc returns freed memory by itself: its background thread purges
/// pages unused for a second, unlike glibc's malloc, which kept up to half
/// of a flood's memory resident (see RELIABILITY.md, Memory after a flood).
/// A statically linked build keeps glibc's.
#[cfg(not(target_feature = "crt-static"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, which it reads when it starts.
#[cfg(not(target_feature = "crt-static"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let cli = match file::parse(std::env::args_os()) {
        Ok(Invocation::Run(cli)) => *cli,
        Ok(Invocation::PrintConfig(toml)) => {
            print!("{toml}");
            return ExitCode::SUCCESS;
        }
        Err(error) => error.exit(),
    };
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!(
            "warning: invalid --log filter {:?} ({e}); using info",
            cli.log
        );
        EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", display_chain(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), RunError> {
    match command {
        Command::Coordinator(config) => {
            let token = CancellationToken::new();
            shutdown::run_until_signal(token.clone(), coordinator::run(config, token)).await
        }
        Command::Agent(config) => {
            let token = CancellationToken::new();
            shutdown::run_until_signal(token.clone(), agent::run(config, token)).await
        }
        Command::Swarm(config) => {
            let token = CancellationToken::new();
            shutdown::run_until_signal(token.clone(), swarm::run(config, token)).await
        }
        Command::Nodes { command } => cli::run_nodes(command, &mut std::io::stdout().lock()).await,
        Command::Leases { command } => {
            cli::run_leases(command, &mut std::io::stdout().lock()).await
        }
        Command::Health(config) => cli::run_health(config, &mut std::io::stdout().lock()).await,
        Command::Tls { command } => cli::run_tls(command, &mut std::io::stdout().lock()),
    }
}
