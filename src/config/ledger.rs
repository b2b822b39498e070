//! `[ledger]`: the per-request ledger on disk.

use std::path::PathBuf;

use serde::Deserialize;

use super::{check_non_negative, check_seconds, invalid, ConfigError};

/// The per-request ledger (an embedded redb database).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Record every request; off means savings exist only in Prometheus.
    pub enabled: bool,
    /// Database file; unset means `$XDG_DATA_HOME/wattgate/ledger.redb` or
    /// `~/.local/share/wattgate/ledger.redb`.
    pub path: Option<PathBuf>,
    /// Seconds between batch writes: a crash loses at most this much.
    pub flush_interval_s: f64,
    /// Rows older than this many days are deleted; 0 keeps them forever.
    pub retention_days: f64,
    /// At most this many rows are kept (oldest deleted first); 0 means no limit.
    pub max_rows: u64,
    /// Rows that may wait for the writer thread; past it rows are dropped and counted in
    /// `wattgate_ledger_rows_dropped_total` (see [`crate::ledger::LedgerSender`]).
    pub queue_rows: usize,
    /// The committer thread's CPU priority: `normal` (the default; it commits in small
    /// transactions and yields between them) or `idle` (Linux `SCHED_IDLE`: commits use only
    /// CPU the request threads leave free; the receiver commits at normal priority when the
    /// committer falls behind, but a committer starved mid-transaction delays that).
    pub writer_priority: WriterPriority,
    /// Keep each request's conversation text (its messages' text, images left out) in its row,
    /// so `wattgate router train --from-ledger` can learn from this traffic's shadow verdicts
    /// and feedback. Off by default: a ledger then holds no prompt text at all. The text lives
    /// and dies with its row (retention, `max_rows`) and is never logged.
    pub store_prompts: bool,
}

/// How the ledger writer competes with request threads for the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriterPriority {
    /// `SCHED_IDLE` on Linux (see [`crate::ledger`]'s writer).
    Idle,
    /// The same priority as request threads.
    Normal,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            flush_interval_s: 1.0,
            retention_days: 90.0,
            // About 1 KB per row: ~5 GB at most.
            max_rows: 5_000_000,
            // The writer flushes every second; 100,000 rows is about four seconds of the
            // gateway's measured peak (21,600-26,700 requests/s, README "Overhead") and, at
            // about 1 KB a row, 100 MB at most.
            queue_rows: 100_000,
            // scripts/bench_ledger.sh, p99 at one connection, ledger on / off: 2.06 with one
            // transaction per second; 1.12-1.53 with 32-row transactions and a yield between
            // them (normal priority); 0.79-1.04 under SCHED_IDLE, which can starve under
            // saturation and then hold the database while starved. Normal is the default for
            // that reason; its transactions are now 8 rows (README "The ledger on against off").
            writer_priority: WriterPriority::Normal,
            store_prompts: false,
        }
    }
}

impl LedgerConfig {
    /// The database file this config names, or the per-user default.
    pub fn resolved_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.path {
            return Some(p.clone());
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
        Some(base.join("wattgate").join("ledger.redb"))
    }
}

impl LedgerConfig {
    /// Checks the `[ledger]` values.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_non_negative("ledger.retention_days", self.retention_days)?;
        check_seconds("ledger.flush_interval_s", self.flush_interval_s, false)?;
        if self.queue_rows == 0 {
            return Err(invalid("ledger.queue_rows", "must be greater than 0"));
        }
        if self.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid(
                "ledger.path",
                "must not be empty (set ledger.enabled = false to run without a ledger)",
            ));
        }
        Ok(())
    }
}
