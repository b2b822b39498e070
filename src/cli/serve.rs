//! `wattgate serve`: the daemon.

use std::net::SocketAddr;
use std::process::ExitCode;

use super::{ConfigArg, Source};

/// Arguments of `wattgate serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Listen address, overriding `server.listen`.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

impl ServeArgs {
    /// Loads the config, opens the ledger and backends, and serves until SIGINT or SIGTERM.
    pub fn run(self) -> ExitCode {
        let (arg, listen) = (&self.config, self.listen);
        let (mut config, source) = match arg.load() {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        if let Some(addr) = listen {
            config.server.listen = addr;
        }
        wattgate::telemetry::init(config.server.log_format);
        match &source {
            Source::File(p) => tracing::info!("config: {}", p.display()),
            Source::Defaults => tracing::info!(
                "config: built-in defaults (no config/wattgate.toml here; pass --config)"
            ),
        }

        let runtime = match super::runtime() {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        runtime.block_on(async move {
        for b in &config.backends {
            tracing::info!(backend = %b.name, role = b.role.as_str(), kind = ?b.kind, model = %b.model, "backend");
        }
        let state = match wattgate::server::AppState::from_config(&config) {
            Ok(state) => state,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let addr = config.server.listen;
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr} (server.listen): {e}");
                return ExitCode::FAILURE;
            }
        };
        let bound = listener.local_addr().map_or(addr, |a| a);
        if !bound.ip().is_loopback() && config.auth.keys.is_empty() {
            for line in [
                format!("listening on {bound}, which is NOT loopback, and [auth] lists no client keys:"),
                "anyone who can reach this port can send requests that spend your cloud API keys,".to_owned(),
                "read /metrics and /v1/savings. Add keys (`wattgate keys new`) to [auth], or listen on 127.0.0.1.".to_owned(),
            ] {
                tracing::warn!("SECURITY: {line}");
            }
        } else if !config.auth.keys.is_empty() {
            tracing::info!(
                keys = config.auth.keys.len(),
                admin_key = config.auth.admin_key_sha256.is_some(),
                "client API keys required"
            );
        }
        tracing::info!(
            "wattgate {} listening on http://{bound}/v1 (model \"{}\" routes)",
            env!("CARGO_PKG_VERSION"),
            config.routing.alias
        );
        let grace = wattgate::config::secs(config.server.shutdown_grace_s);
        reload_on_sighup(state.clone());
        match wattgate::server::serve_app(state, listener, shutdown_signal(), grace).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
    }
}

/// Reloads the routers on each SIGHUP, as `wattgate router reload` does over HTTP (the result
/// is logged either way; a refused reload keeps the running routers).
fn reload_on_sighup(state: wattgate::server::AppState) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    "cannot listen for SIGHUP ({e}); reload routers with `wattgate router reload`"
                );
                return;
            }
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading routers");
            let state = state.clone();
            // The outcome is logged and counted inside.
            let _ = tokio::task::spawn_blocking(move || state.reload_routers()).await;
        }
    });
    #[cfg(not(unix))]
    drop(state);
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
