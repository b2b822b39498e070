//! Test equipment for wattgate: real OpenAI-compatible HTTP servers on loopback whose behaviour a
//! test scripts request by request, and helpers for ports that refuse or reset connections.
//!
//! Used by the integration tests, the criterion benches, the load generator and the end-to-end
//! scripts, so every one of them exercises real sockets rather than mocks.

pub mod upstream;

pub use upstream::{refused_base_url, Behavior, RecordedRequest, ResetUpstream, ScriptedUpstream};
