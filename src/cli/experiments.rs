//! `wattgate experiments report`: per-arm results of A/B experiments, from the ledger.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::report::{ask_daemon, existing_ledger};
use super::{ConfigArg, ReportFormat};

#[derive(Subcommand)]
pub enum ExperimentsCommand {
    /// Per arm: requests, local share, success from feedback and shadow checks (95% Wilson
    /// intervals), savings, the difference against the control with a two-proportion test, and
    /// a verdict. While the daemon holds the ledger, asks it (GET /v1/experiments).
    Report {
        /// One experiment; all (configured, or found in the ledger) when omitted.
        name: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
        /// Ledger file, overriding `ledger.path`.
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
}

impl ExperimentsCommand {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            ExperimentsCommand::Report {
                name,
                config,
                format,
                ledger,
            } => experiments_report(&config, name.as_deref(), format, ledger),
        }
    }
}

fn experiments_report(
    arg: &ConfigArg,
    name: Option<&str>,
    format: ReportFormat,
    ledger: Option<PathBuf>,
) -> ExitCode {
    let reports = match load_experiment_reports(arg, name, ledger) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match format {
        ReportFormat::Table => {
            if reports.is_empty() {
                println!("no experiments configured or recorded in the ledger");
            }
            for (i, r) in reports.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print!("{}", r.to_table());
            }
        }
        ReportFormat::Json => {
            let value = match name {
                Some(_) => serde_json::to_string_pretty(&reports.first()),
                None => serde_json::to_string_pretty(&reports),
            };
            match value {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

fn load_experiment_reports(
    arg: &ConfigArg,
    name: Option<&str>,
    ledger: Option<PathBuf>,
) -> anyhow::Result<Vec<wattgate::experiments::report::ExperimentReport>> {
    use wattgate::experiments::report;
    use wattgate::ledger::{Ledger, LedgerError};
    let (config, _) = arg.load()?;
    let path = existing_ledger(&config, ledger)?;
    match Ledger::open(&path) {
        Ok(ledger) => {
            let rows = ledger.rows_since(0)?;
            let outcomes = ledger.outcomes()?;
            let names = match name {
                Some(n) => vec![n.to_owned()],
                None => report::experiment_names(&config.experiments, &rows),
            };
            let reports: Vec<_> = names
                .iter()
                .filter_map(|n| {
                    let configured = wattgate::experiments::find(&config, n);
                    report::build(n, configured, &rows, &outcomes, 0)
                })
                .collect();
            if let (Some(n), true) = (name, reports.is_empty()) {
                let known = report::experiment_names(&config.experiments, &rows);
                anyhow::bail!(
                    "no experiment `{n}` in the config or the ledger (known: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                );
            }
            Ok(reports)
        }
        Err(LedgerError::Busy(_)) => {
            let endpoint = format!(
                "/v1/experiments{}",
                name.map(|n| format!("/{n}")).unwrap_or_default()
            );
            let (url, body) = ask_daemon(&config, &path, &endpoint)?;
            Ok(match name {
                Some(_) => vec![serde_json::from_value(body)?],
                None => serde_json::from_value(
                    body.get("data")
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("{url} answered without `data`"))?,
                )?,
            })
        }
        Err(e) => Err(e.into()),
    }
}
