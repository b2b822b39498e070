//! The HTTP surface: routes, middleware, and the serve loop with graceful shutdown.
//!
//! Handlers are thin: they turn HTTP into calls on the [`Gateway`] and its answers back into
//! OpenAI-shaped responses with `x-wattgate-*` headers. Everything a client can get wrong, and
//! every path that does not exist, ends in an [`ApiError`].

mod access;
mod edges;
mod experiments;
mod handlers;
mod layers;
mod listen;
mod observe;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

use crate::config::{secs, Config, LedgerConfig};
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::ledger::{spawn_writer, Ledger, LedgerSender};
use crate::metering::Metering;
use crate::metrics::Metrics;

pub use access::key_digest;
pub use observe::RequestContext;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    gateway: Gateway,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
    body_timeout: Duration,
    doors: listen::DoorPolicy,
    readiness: handlers::ReadinessCache,
    ledger: Option<Ledger>,
    ledger_writer: Option<LedgerSender>,
    ledger_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    idle: Option<Arc<crate::metering::idle::IdleRecorder>>,
    baseline_backend: Option<String>,
    experiments: Vec<crate::config::ExperimentConfig>,
    access: access::Access,
    conversations: Arc<crate::wire::responses::Conversations>,
    embeddings: crate::embeddings::Embeddings,
}

impl AppState {
    /// Builds metrics, the energy meter, the ledger, backends and the gateway from a validated
    /// config. Fails when the ledger cannot be opened (another daemon has it, or the directory
    /// is not writable): running without the configured ledger would lose data silently.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let backends = crate::backends::build_all(&config.backends, &config.models)?;
        Self::with_backends(config, backends)
    }

    /// [`AppState::from_config`] with backends built by the caller (one per `config.backends`
    /// entry, same order): for embedding the gateway with a custom [`crate::backends::Backend`].
    pub fn with_backends(
        config: &Config,
        backends: Vec<Arc<dyn crate::backends::Backend>>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            backends.len() == config.backends.len(),
            "{} backends built for {} configured",
            backends.len(),
            config.backends.len()
        );
        let metrics = Arc::new(Metrics::new()?);
        let metering = Arc::new(Metering::new(config).map_err(anyhow::Error::msg)?);
        let (ledger, ledger_writer, ledger_thread) = open_ledger(&config.ledger, &metrics)?;
        let gateway = Gateway::new(
            config,
            backends,
            metrics.clone(),
            metering.clone(),
            ledger_writer.clone(),
        )
        .map_err(anyhow::Error::msg)?;
        let embeddings = crate::embeddings::Embeddings::new(
            config,
            metering.clone(),
            metrics.clone(),
            ledger_writer.clone(),
        )?;
        // Conversations are message text: on disk only where the operator keeps prompts.
        let mut conversations = crate::wire::responses::Conversations::new(
            config.server.responses_stored,
            Duration::from_secs(config.server.responses_ttl_s),
        );
        if let (true, Some(l), Some(w)) = (config.ledger.store_prompts, &ledger, &ledger_writer) {
            conversations = conversations.persisted(l.clone(), w.clone());
        }
        let idle = ledger_writer
            .clone()
            .map(|w| crate::metering::idle::IdleRecorder::spawn(metering.clone(), w));
        Ok(Self {
            inner: Arc::new(Shared {
                gateway,
                metrics,
                max_body_bytes: config.server.max_body_bytes,
                body_timeout: secs(config.server.body_timeout_s),
                doors: listen::DoorPolicy {
                    header_timeout: secs(config.server.header_timeout_s),
                    max_connections_per_ip: config.server.max_connections_per_ip,
                },
                readiness: handlers::ReadinessCache::new(secs(config.server.readiness_cache_s)),
                baseline_backend: metering.baseline_name(config).map(str::to_owned),
                ledger,
                ledger_writer,
                ledger_thread: std::sync::Mutex::new(ledger_thread),
                idle,
                experiments: config.experiments.clone(),
                access: access::Access::new(&config.auth, &config.limits),
                embeddings,
                conversations: Arc::new(conversations),
            }),
        })
    }

    /// Re-reads every router file the config names and swaps them in when all load; otherwise
    /// the running routers keep serving and the error says why. Counted in
    /// `wattgate_router_reloads_total` and logged either way.
    pub fn reload_routers(&self) -> Result<Vec<crate::gateway::Loaded>, String> {
        let result = self.inner.gateway.reload_routers();
        let label = if result.is_ok() { "ok" } else { "refused" };
        self.inner
            .metrics
            .router_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(loaded) => {
                for l in loaded {
                    tracing::info!(backend = %l.backend, router = %l.path, name = %l.name, threshold = l.threshold, "router reloaded");
                }
                tracing::info!(routers = loaded.len(), "routers reloaded");
            }
            Err(why) => {
                tracing::error!("router reload refused, the running routers keep serving: {why}")
            }
        }
        result
    }

    /// Writes every ledger row queued so far and waits for the write.
    pub fn flush_ledger(&self) {
        if let Some(w) = &self.inner.ledger_writer {
            w.flush(Duration::from_secs(10));
        }
    }

    /// Writes every queued row, stops the ledger writer and waits for its thread, so the file
    /// is released when this returns (graceful shutdown).
    pub fn close_ledger(&self) {
        if let Some(idle) = &self.inner.idle {
            idle.finish();
        }
        if let Some(w) = &self.inner.ledger_writer {
            w.close(Duration::from_secs(10));
        }
        let thread = self
            .inner
            .ledger_thread
            .lock()
            .ok()
            .and_then(|mut t| t.take());
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("the ledger writer thread panicked");
            }
        }
    }
}

/// The ledger for readers, its writer's sender and thread (kept so shutdown can close it).
type OpenLedger = (
    Option<Ledger>,
    Option<LedgerSender>,
    Option<std::thread::JoinHandle<()>>,
);

fn open_ledger(config: &LedgerConfig, metrics: &Metrics) -> anyhow::Result<OpenLedger> {
    if !config.enabled {
        tracing::warn!("ledger disabled (ledger.enabled = false): /v1/savings and `wattgate report` have no data");
        return Ok((None, None, None));
    }
    let Some(path) = config.resolved_path() else {
        anyhow::bail!(
            "ledger.path is unset and neither XDG_DATA_HOME nor HOME is set; set ledger.path"
        );
    };
    let ledger = Ledger::open(&path)?;
    let (sender, thread) = spawn_writer(
        ledger.clone(),
        config,
        metrics.ledger_rows_dropped.clone(),
        metrics.ledger_catchups.clone(),
    )?;
    tracing::info!(path = %path.display(), "ledger open");
    Ok((Some(ledger), Some(sender), Some(thread)))
}

/// The axum application: every route, the 404/405 fallbacks, and the layers every request
/// passes, composed here and nowhere else. Outermost first:
///
/// 1. panic catch: a bug in any layer below answers 500 in the API's shape, not a reset;
/// 2. trace: a span per request (method, URI, version) around every log line below, enabled
///    with `WATTGATE_LOG=tower_http=debug` (off at the default level, where it costs a check);
/// 3. observe: the request id (the client's when sane), arrival time, per-endpoint metrics;
/// 4. body deadline: the whole body within `server.body_timeout_s`, else 408;
/// 5. auth: the key an endpoint needs, and who the request is charged to.
///
/// The body size cap and the concurrency slot are taken in the handlers, after the body is in:
/// a layer would take the slot before the body is read, and a client trickling its body would
/// hold it (that is how 1,100 slow connections used to lock everyone out). Connection-level
/// limits (header deadline, per-IP cap) are in [`listen`].
pub fn app(state: AppState) -> Router {
    let stack = tower::ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::internal(
                "The gateway hit an internal error (a bug: please report it with the x-request-id).",
            ))
        }))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .on_request(())
                .on_response(())
                .on_failure(()),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .layer(layers::BodyDeadlineLayer::new(
            state.inner.body_timeout,
            state
                .inner
                .metrics
                .connections_refused
                .with_label_values(&["body_timeout"]),
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::authenticate,
        ));
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_apis))
        .route("/v1/responses", post(handlers::chat_apis))
        .route("/v1/messages", post(handlers::chat_apis))
        .route("/v1/embeddings", post(handlers::embeddings))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{*id}", get(handlers::get_model))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/savings", get(handlers::savings))
        .route("/v1/savings/series", get(handlers::savings_series))
        .route("/dashboard", get(handlers::dashboard))
        .route("/v1/router/reload", post(handlers::reload_routers))
        .route("/v1/ledger/graded", get(handlers::graded))
        .route("/v1/feedback", post(experiments::post_feedback))
        .route("/v1/experiments", get(experiments::list_experiments))
        .route("/v1/experiments/{name}", get(experiments::get_experiment))
        .fallback(handlers::unknown_endpoint)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        // The handlers read bodies with their own limits (`read_body`).
        .layer(DefaultBodyLimit::disable())
        .layer(stack)
        // Outermost: errors on /v1/messages, from any layer, in Anthropic's shape.
        .layer(axum::middleware::from_fn(edges::anthropic_errors))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting and gives in-flight
/// requests `server.shutdown_grace_s` to finish.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::from_config(config)?;
    serve_app(
        state,
        listener,
        shutdown,
        secs(config.server.shutdown_grace_s),
    )
    .await
}

/// [`serve`] for an already built state.
pub async fn serve_app(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let kept = state.clone();
    let doors = state.inner.doors.clone();
    let metrics = state.inner.metrics.clone();
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
    let stopping = async move {
        shutdown.await;
        tracing::info!(
            "shutdown requested: no longer accepting; waiting up to {:.1}s for in-flight requests",
            grace.as_secs_f64()
        );
        let _ = began_tx.send(());
    };
    let server = listen::serve_connections(listener, app(state), doors, metrics, stopping, cut_rx);
    tokio::pin!(server);
    let deadline = async move {
        match began_rx.await {
            Ok(()) => tokio::time::sleep(grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = &mut server => tracing::info!("all connections closed; exiting"),
        () = deadline => {
            tracing::warn!("shutdown grace period expired; closing the remaining connections");
            // The requests still in flight are dropped now, while the ledger is open, and
            // their meters record them as `shutdown`.
            kept.inner.gateway.cut_for_shutdown();
            let _ = cut_tx.send(true);
            if tokio::time::timeout(Duration::from_secs(2), &mut server)
                .await
                .is_err()
            {
                tracing::warn!("connections did not close within 2 s of being cut");
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || kept.close_ledger()).await;
    Ok(())
}
