//! The routers a request is decided by, and swapping them while the daemon serves.
//!
//! A request takes one snapshot ([`Routes::current`]) before it enrolls and routes, so the arm
//! it is enrolled in and the router that decides it always come from the same load. A reload
//! builds every router afresh from the router files the config names (the `[routing]` one and
//! every experiment arm's) and swaps them all at once, only when every one loads: a router
//! directory that is missing, truncated or of another format leaves the running routers in
//! place, and the error names it. In-flight requests keep the snapshot they took.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::config::Config;
use crate::experiments::Experiments;
use crate::router::Router;

/// One load of every router.
pub struct Routing {
    /// The `[routing]` router.
    pub router: Router,
    /// Every experiment, with its arms' routers.
    pub experiments: Experiments,
}

impl Routing {
    fn load(config: &Config) -> Result<Self, String> {
        Ok(Self {
            router: Router::new(&config.routing, &config.backends)?,
            experiments: Experiments::new(config)?,
        })
    }
}

/// What a reload loaded: each local backend's router file, as `/v1/router/reload` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Loaded {
    /// The local backend.
    pub backend: String,
    /// Its router's directory, as resolved.
    pub path: String,
    /// The name recorded in its router.json.
    pub name: String,
    /// The serving threshold.
    pub threshold: f64,
}

/// The current routers, replaceable as a whole.
pub struct Routes {
    current: RwLock<Arc<Routing>>,
    /// The config the routers are built from (the daemon's, as it started): a reload re-reads
    /// the files it names, not a new config.
    config: Config,
}

impl Routes {
    /// Loads every router `config` names; an error names the one that failed.
    pub fn new(config: &Config) -> Result<Self, String> {
        Ok(Self {
            current: RwLock::new(Arc::new(Routing::load(config)?)),
            config: config.clone(),
        })
    }

    /// The routers to decide one request with.
    pub fn current(&self) -> Arc<Routing> {
        // A poisoned lock only means a thread panicked while swapping in a fully built value;
        // the value inside is whole.
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads every router file and swaps them in when all load; otherwise keeps the
    /// current ones and returns why.
    pub fn reload(&self) -> Result<Vec<Loaded>, String> {
        let fresh = Routing::load(&self.config)?;
        let loaded = fresh
            .router
            .heads()
            .map(|(backend, model, threshold)| Loaded {
                backend: self.config.backends[backend].name.clone(),
                path: model.path.display().to_string(),
                name: model.meta.name.clone(),
                threshold,
            })
            .collect();
        let fresh = Arc::new(fresh);
        match self.current.write() {
            Ok(mut guard) => *guard = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(loaded)
    }
}
