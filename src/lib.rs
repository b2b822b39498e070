//! wattgate: a local-first hybrid routing gateway for OpenAI-compatible chat traffic.
//!
//! Applications point their OpenAI base URL at the daemon. Each request is routed to a local
//! model when the router expects it to answer well, to a cloud frontier model otherwise, and the
//! gateway falls back to the cloud when the local path fails before the first byte. The request
//! pipeline reads top-down in [`gateway`]; see `docs/architecture.md` for the map.

pub mod backends;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod experiments;
pub mod gateway;
pub mod guard;
pub mod ledger;
pub mod limits;
pub mod metering;
pub mod metrics;
pub mod models;
pub mod profile;
pub mod progress;
pub mod resilience;
pub mod router;
pub mod savings;
pub mod server;
pub mod simulate;
pub mod telemetry;
pub mod wire;
