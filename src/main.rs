//! oxidize-relay: a kernel-bypass UDP relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use oxidize_relay::probe::HostReport;
use oxidize_relay::{log_limit, preflight, run, stats_view};
use oxidize_relay_core::config::{Config, Mode};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Exit code for configuration errors (nothing was attached).
const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "oxidize-relay", version, about = "Kernel-bypass UDP relay (XDP + AF_XDP)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay, from a config file or the quick form.
    Run {
        #[arg(long, conflicts_with_all = ["interface", "listen", "upstream"])]
        config: Option<PathBuf>,
        /// Quick form: the one interface (one-arm).
        #[arg(long, requires_all = ["listen", "upstream"])]
        interface: Option<String>,
        /// Quick form: address and port clients send to.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Quick form: upstream address and port (repeat for several).
        #[arg(long)]
        upstream: Vec<SocketAddr>,
        /// Write the counters as JSON to this file every 200 ms and at exit.
        #[arg(long)]
        stats_file: Option<PathBuf>,
        /// Where a clean stop saves the live sessions and the next start takes them over
        /// (default: systemd's $RUNTIME_DIRECTORY, if set).
        #[arg(long, env = "RUNTIME_DIRECTORY")]
        state_dir: Option<PathBuf>,
        /// Override `runtime.mode`: auto, af_xdp or socket.
        #[arg(long, value_parser = ["auto", "af_xdp", "socket"])]
        mode: Option<String>,
    },
    /// Show the running relay's counters (from its metrics endpoint) as tables.
    Stats {
        #[arg(long, default_value = "http://127.0.0.1:9184/metrics")]
        endpoint: String,
        /// Refresh every second, with per-second rates.
        #[arg(long)]
        watch: bool,
    },
    /// Show what this host supports and which backend `mode = "auto"` would choose.
    Probe {
        /// Interfaces to examine (repeat for several).
        #[arg(long)]
        interface: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file and the key files it names; exits 2 with line and column on error.
    CheckConfig {
        file: PathBuf,
        /// Check the file alone: not the key files or kernel settings it depends on (for builds
        /// that cannot see the host, such as the NixOS module's).
        #[arg(long)]
        file_only: bool,
    },
}

fn main() -> ExitCode {
    let level = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(level.and(tracing_subscriber::filter::filter_fn(log_limit::allow))),
        )
        .init();
    match Cli::parse().command {
        Command::CheckConfig { file, file_only } => match load_config(&file).and_then(|mut config| {
            if file_only {
                return Ok(config);
            }
            let warnings = preflight::load_tunnel_keys(&mut config).map_err(|e| format!("{}: {e}", file.display()))?;
            for warning in warnings.iter().chain(preflight::local_port_overlap(&config).as_ref()) {
                eprintln!("warning: {warning}");
            }
            Ok(config)
        }) {
            Ok(config) => {
                println!(
                    "{}: ok ({} interfaces, {} routes)",
                    file.display(),
                    config.interfaces.len(),
                    config.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("{message}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Stats { endpoint, watch } => match show_stats(&endpoint, watch) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Probe { interface, json } => {
            let report = HostReport::gather(&interface);
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            ExitCode::SUCCESS
        }
        Command::Run { config, interface, listen, upstream, stats_file, state_dir, mode } => {
            let config_file = config.clone();
            let config = match (config, interface, listen) {
                (Some(file), _, _) => load_config(&file),
                // The user typed flags, not a file: speak of the flags.
                (None, Some(interface), Some(listen)) => Config::quick(&interface, listen, &upstream)
                    .map_err(|e| format!("--interface/--listen/--upstream: {}", e.message)),
                _ => Err("give --config FILE, or --interface IF --listen ADDR:PORT --upstream ADDR:PORT".into()),
            };
            let config = match config {
                Ok(mut config) => {
                    config.runtime.mode = match mode.as_deref() {
                        Some("auto") => Mode::Auto,
                        Some("af_xdp") => Mode::AfXdp,
                        Some("socket") => Mode::Socket,
                        _ => config.runtime.mode,
                    };
                    config
                }
                Err(message) => {
                    eprintln!("{message}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match run::run(config, run::RunOptions { config_file, stats_file, state_dir }).context("relay setup failed")
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn show_stats(endpoint: &str, watch: bool) -> anyhow::Result<()> {
    let mut previous = stats_view::fetch(endpoint)?;
    if !watch {
        print!("{}", stats_view::render(&previous, None));
        return Ok(());
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let current = stats_view::fetch(endpoint)?;
        print!("\x1b[2J\x1b[H{endpoint}\n{}", stats_view::render(&current, Some((&previous, 1.0))));
        previous = current;
    }
}

/// Reads and validates a config file; the message names the file, line and column.
fn load_config(file: &Path) -> Result<Config, String> {
    preflight::read_config(file).map_err(|error| format!("{:#}", anyhow::Error::from(error)))
}
