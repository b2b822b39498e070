//! The command line: one module per command group. `main.rs` parses and dispatches; each
//! group's module holds its arguments and what it does; the library does the work.

pub mod config;
pub mod experiments;
pub mod keys;
pub mod models;
pub mod profile;
pub mod report;
pub mod router;
pub mod serve;
pub mod simulate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wattgate::config::Config;

/// Local-first hybrid routing gateway for OpenAI-compatible chat traffic.
#[derive(Parser)]
#[command(name = "wattgate", version, about)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Every command.
#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway daemon.
    Serve(serve::ServeArgs),
    /// Inspect the configuration.
    Config {
        /// What to do with it.
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// Fetch and list model weights.
    Models {
        /// What to do with them.
        #[command(subcommand)]
        command: models::ModelsCommand,
    },
    /// Train, apply and evaluate routers.
    Router {
        /// What to do with them.
        #[command(subcommand)]
        command: router::RouterCommand,
    },
    /// Savings against cloud-only (energy, compute, cost), local share, by backend and arm,
    /// summed from the ledger. While the daemon holds the ledger, asks it (GET /v1/savings).
    Report(report::ReportArgs),
    /// Client API keys for `[auth]`: make one, or hash one you have.
    Keys {
        /// What to do.
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// A/B experiments on routing: per-arm reports from the ledger.
    Experiments {
        /// What to do.
        #[command(subcommand)]
        command: experiments::ExperimentsCommand,
    },
    /// Measure a model on a labeled workload: accuracy, joules and seconds per query, IPW and
    /// IPJ, by source and category. Writes queries.jsonl (router training data for the
    /// model), summary.json and accuracy_vs_energy.svg; re-running resumes.
    Profile(profile::ProfileArgs),
    /// Replay labeled routing data through the savings accounting: cloud-only, the oracle,
    /// a router at its threshold, and routers of accuracy p. Prices, J/token and parameter
    /// counts come from the config (local: its first local backend; cloud: the baseline).
    Simulate(simulate::SimulateArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct RouterDirArg {
    /// Where router names are looked up.
    #[arg(long, env = "WATTGATE_ROUTER_DIR", default_value = "router-models")]
    pub router_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct ConfigArg {
    /// Config file. Default: ./config/wattgate.toml if present, else built-in defaults.
    #[arg(long, short, env = "WATTGATE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Where the configuration came from, for the startup log.
pub enum Source {
    /// This file.
    File(PathBuf),
    /// No file: the built-in defaults.
    Defaults,
}

impl ConfigArg {
    /// The config this argument names, and where it came from.
    pub fn load(&self) -> Result<(Config, Source), wattgate::config::ConfigError> {
        let path = match &self.config {
            Some(p) => p.clone(),
            None => {
                let local = Path::new("config/wattgate.toml");
                if !local.is_file() {
                    return Ok((Config::default(), Source::Defaults));
                }
                local.to_owned()
            }
        };
        Ok((Config::load(&path)?, Source::File(path)))
    }
}

/// Reports a configuration or argument problem; exit status 2, like clap's own usage errors.
pub fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

/// The multi-threaded runtime a long-running command runs on; a failure to start it is reported
/// and becomes the exit status.
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}
