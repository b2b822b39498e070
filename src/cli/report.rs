//! `wattgate report`: savings against cloud-only, from the ledger (or the daemon holding it).

use std::path::PathBuf;
use std::process::ExitCode;

use super::{ConfigArg, ReportFormat};

/// Arguments of `wattgate report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only requests from this long ago on: 30m, 24h, 7d.
    #[arg(long)]
    pub since: Option<String>,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
    /// Ledger file, overriding `ledger.path`.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
}

impl ReportArgs {
    /// Prints the savings as a table or JSON.
    pub fn run(self) -> ExitCode {
        report(
            &self.config,
            self.since.as_deref(),
            self.format,
            self.ledger,
        )
    }
}

fn report(
    arg: &ConfigArg,
    since: Option<&str>,
    format: ReportFormat,
    ledger: Option<PathBuf>,
) -> ExitCode {
    match report_savings(arg, since, ledger) {
        Ok(savings) => {
            match format {
                ReportFormat::Table => print!("{}", savings.to_table()),
                ReportFormat::Json => match serde_json::to_string_pretty(&savings) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report_savings(
    arg: &ConfigArg,
    since: Option<&str>,
    ledger: Option<PathBuf>,
) -> anyhow::Result<wattgate::savings::Savings> {
    use wattgate::ledger::{Ledger, LedgerError};
    let (config, _) = arg.load()?;
    let since_us = match since {
        Some(text) => {
            let seconds = wattgate::savings::parse_duration(text)
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            wattgate::ledger::now_us().saturating_sub((seconds * 1e6) as u64)
        }
        None => 0,
    };
    let path = existing_ledger(&config, ledger)?;
    match Ledger::open(&path) {
        Ok(ledger) => Ok(ledger.savings_since(since_us)?),
        Err(LedgerError::Busy(_)) => {
            let endpoint = format!(
                "/v1/savings{}",
                since.map(|s| format!("?since={s}")).unwrap_or_default()
            );
            let (url, body) = ask_daemon(&config, &path, &endpoint)?;
            let savings = body
                .get("savings")
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{url} answered without `savings`"))?;
            Ok(serde_json::from_value(savings)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The ledger file `--ledger` or the config names, which must exist.
pub(super) fn existing_ledger(
    config: &wattgate::config::Config,
    ledger: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let Some(path) = ledger.or_else(|| config.ledger.resolved_path()) else {
        anyhow::bail!("no ledger path: set ledger.path or pass --ledger");
    };
    if !path.is_file() {
        anyhow::bail!(
            "no ledger at {} (the daemon creates it on its first start; pass --ledger or --config)",
            path.display()
        );
    }
    Ok(path)
}

/// While the daemon holds the ledger at `path`, GETs `endpoint` from it instead (saying so on
/// stderr); returns the URL asked and the JSON answer. A non-2xx status is an error carrying
/// its body.
pub(super) fn ask_daemon(
    config: &wattgate::config::Config,
    path: &std::path::Path,
    endpoint: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let url = format!("http://{}{endpoint}", config.server.listen);
    eprintln!(
        "{} is held by the running daemon; reading {url} instead",
        path.display()
    );
    let body = daemon_json(reqwest::Method::GET, &url)?;
    Ok((url, body))
}

/// The variable holding the key the CLI sends when it asks the daemon's admin endpoints (with
/// `[auth]` keys configured, those need the admin key, or a client key without one).
const ADMIN_KEY_ENV: &str = "WATTGATE_API_KEY";

/// Calls one of the daemon's admin endpoints and returns its JSON; a non-2xx status is an error
/// carrying the daemon's message.
pub(super) fn daemon_json(method: reqwest::Method, url: &str) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut request = reqwest::Client::new().request(method, url);
        if let Ok(key) = std::env::var(ADMIN_KEY_ENV) {
            request = request.bearer_auth(key.trim());
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            anyhow::bail!(
                "{url} answered {status}: the daemon requires a key; set {ADMIN_KEY_ENV} to its admin key (or a client key when no admin key is configured)"
            );
        }
        if !status.is_success() {
            anyhow::bail!("{url} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    })
}
