//! Logging setup. Verbosity comes from `WATTGATE_LOG` (tracing's filter syntax), the format from
//! `server.log_format`, so operators can turn on debug logs without editing the config.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The environment variable holding the log filter.
pub const LOG_ENV: &str = "WATTGATE_LOG";

/// Installs the global subscriber; a second call (e.g. from tests) is a no-op.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
