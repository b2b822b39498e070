//! The ledger: one row per chat request, kept in an embedded redb database.
//!
//! Rows are queued from the request path (never blocking it) and written by one thread in a
//! single transaction per `flush_interval_s`, committed durably. redb commits are atomic and
//! checksummed, so a crash (kill -9, power loss) loses at most the rows of the batch not yet
//! committed and never leaves a half-written file. Retention (age and row count) runs on the
//! same thread (module `writer`).
//!
//! Keys are microseconds since the Unix epoch, bumped by one where two rows share an instant,
//! so rows sort by time and a time range is a key range.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::metering::Bill;

mod rollups;
mod writer;
use rollups::Unrolled;
pub use rollups::{HOUR_US, MINUTE_US};
pub use writer::{spawn_writer, LedgerSender};

/// Rows by key (see the module docs); values are JSON so columns can be added without a
/// migration.
const REQUESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("requests");

/// Request id -> the key of its (latest) row, so outcomes can be checked against and joined
/// with the request they grade.
const REQUEST_IDS: TableDefinition<&str, u64> = TableDefinition::new("request_ids");

/// (request id, outcome source) -> the outcome as JSON: one outcome per request and source, so
/// a repeated `POST /v1/feedback` replaces rather than adds.
const OUTCOMES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("outcomes");

/// Responses API response id -> the conversation it ended, as JSON `{"time_us", "messages"}`:
/// what `previous_response_id` continues after a restart (written only with
/// `ledger.store_prompts`, since it is message text; removed by retention like rows).
const CONVERSATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("conversations");

/// How often retention runs, at most.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// One chat request as the ledger records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRow {
    /// When the request arrived, microseconds since the Unix epoch.
    pub time_us: u64,
    /// The request id (`x-request-id`).
    pub request_id: String,
    /// `local` or `cloud`: where the answer came from.
    pub route: String,
    /// The backend that answered.
    pub backend: String,
    /// Why (the routing or fallback reason).
    pub reason: String,
    /// The experiment the request was enrolled in.
    #[serde(default)]
    pub experiment: Option<String>,
    /// Its arm in that experiment.
    pub arm: Option<String>,
    /// The router's estimate, when it ran.
    pub p_local: Option<f64>,
    /// The local backend that failed first, for escalated requests.
    pub fallback_from: Option<String>,
    /// HTTP status the client got (200 for streams, even ones that failed midway; 0 when no
    /// status line was sent: `abandoned`, or `shutdown` before the first byte).
    pub status: u16,
    /// `ok`; `error` (an error status, an in-band error chunk, a broken stream); `cancelled`
    /// (the client left mid-stream); `abandoned` (the client left before the first byte);
    /// `shutdown` (still in flight when the shutdown grace ran out).
    pub outcome: String,
    /// Whether the reply was streamed.
    pub stream: bool,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// `upstream` (reported usage), `tokenizer` (counted with a model tokenizer) or
    /// `chars_estimate` (characters / 4, where no tokenizer is loaded).
    pub tokens_source: String,
    /// Seconds from arrival to the last byte.
    pub latency_s: f64,
    /// Seconds from arrival to the first byte of the answer.
    pub ttft_s: Option<f64>,
    /// Where `bill.local_joules` came from (`nvml`, `rapl`, `estimate`).
    pub energy_source: String,
    /// Spend and counterfactual.
    pub bill: Bill,
    /// What the quality guard did, for local answers it was asked to check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardRow>,
    /// The conversation as the router read it (`{"role", "content"}` text messages), kept only
    /// under `[ledger] store_prompts = true`: the training text for `router train --from-ledger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<serde_json::Value>>,
}

/// The quality guard's part of a ledger row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardRow {
    /// `pass`, `escalated`, `no_signal`, `escalation_failed` or `unchecked`.
    pub decision: String,
    /// P(acceptable) of the local answer, when it had signals.
    pub confidence: Option<f64>,
    /// The threshold it was held to.
    pub threshold: f64,
    /// The signals read.
    pub signals: Option<crate::guard::Signals>,
    /// The local backend whose answer was checked.
    pub local_backend: String,
    /// The local leg's tokens (for an escalated request, the answer the client never saw;
    /// its joules are inside `bill.local_joules`, its FLOPs inside `bill.flops`).
    pub local_input_tokens: u64,
    /// See `local_input_tokens`.
    pub local_output_tokens: u64,
    /// FLOPs of the local leg (2 x active parameters x its tokens).
    pub local_flops: f64,
}

/// A ledger row and the outcomes that grade it ([`Ledger::graded`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graded {
    /// The request.
    pub row: LedgerRow,
    /// Its outcomes, one per source.
    pub outcomes: Vec<OutcomeRecord>,
}

/// Where an outcome came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeSource {
    /// `POST /v1/feedback` from the application or its users.
    Feedback,
    /// A shadow check: the local answer graded against the cloud's.
    Shadow,
}

impl OutcomeSource {
    /// The stable name used in keys, labels and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeSource::Feedback => "feedback",
            OutcomeSource::Shadow => "shadow",
        }
    }
}

/// How good one answer was, by one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    /// The graded request.
    pub request_id: String,
    /// Who graded it.
    pub source: OutcomeSource,
    /// When it was recorded, microseconds since the Unix epoch.
    pub time_us: u64,
    /// 0..1; at least 0.5 counts as a success in reports.
    pub score: f64,
    /// Feedback given as `thumbs` (`up`/`down`) rather than a score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbs: Option<String>,
    /// Free text from the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Shadow: how the verdict was reached (judge verdicts, or the similarity rule's reading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Shadow: what the check spent (never counted as savings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<ShadowSpend>,
}

impl OutcomeRecord {
    /// Whether reports count it as a success.
    pub fn success(&self) -> bool {
        self.score >= 0.5
    }

    /// The same judgement (what idempotency compares): everything but the time.
    fn same_as(&self, other: &Self) -> bool {
        self.score == other.score
            && self.thumbs == other.thumbs
            && self.comment == other.comment
            && self.detail == other.detail
    }
}

/// What one shadow check spent on cloud calls: all estimated from tokens and prices.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ShadowSpend {
    /// Tokens sent to the cloud (answer and judge).
    pub input_tokens: u64,
    /// Tokens the cloud generated (answer and judge).
    pub output_tokens: u64,
    /// Dollars at the backends' configured prices.
    pub usd: f64,
    /// Joules, tokens x J/token x PUE (an estimate, like every cloud energy figure).
    pub joules_estimated: f64,
}

/// What happened to an outcome written with [`LedgerSender::record_outcome`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stored {
    /// The first outcome of this source for the request.
    Created,
    /// The same outcome again: nothing changed.
    Unchanged,
    /// A different outcome replaced the earlier one.
    Replaced,
}

/// An outcome was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutcomeError {
    /// No ledger row has this request id (never seen, or removed by retention).
    #[error("no request with id `{0}` in the ledger")]
    UnknownRequest(String),
    /// The database failed.
    #[error("{0}")]
    Storage(String),
}

/// The stored outcome and the experiment arm of the request it grades.
#[derive(Debug, Clone)]
pub struct OutcomeReceipt {
    /// What happened.
    pub stored: Stored,
    /// The graded request's experiment and arm, when it was enrolled.
    pub arm: Option<(String, String)>,
}

/// Opening or reading the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Another process (normally the running daemon) has the database open.
    #[error("the ledger {0} is open in another process (the running daemon?)")]
    Busy(PathBuf),
    /// Anything else redb or the file system reported.
    #[error("ledger {path}: {message}")]
    Other {
        /// The database file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// The open database, shared by the writer thread and readers.
/// redb's page cache. Its default (1 GiB) lets the daemon's memory grow with the ledger file
/// under steady traffic (scripts/soak.sh measured +24 MiB in 30 s at 1,000 req/s); 16 MiB
/// holds the pages that appends and the index touch, and reports read the rest from disk.
const LEDGER_CACHE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct Ledger {
    db: Arc<Database>,
    path: PathBuf,
}

impl Ledger {
    /// Opens (creating if needed) the database at `path`, creating its directory.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let other = |message: String| LedgerError::Other {
            path: path.to_owned(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| other(e.to_string()))?;
        }
        let db = redb::Builder::new()
            .set_cache_size(LEDGER_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => LedgerError::Busy(path.to_owned()),
                e => other(e.to_string()),
            })?;
        let ledger = Self {
            db: Arc::new(db),
            path: path.to_owned(),
        };
        // Create the tables so readers of an empty ledger see zero rows, not an error.
        let txn = ledger.db.begin_write().map_err(|e| other(e.to_string()))?;
        txn.open_table(REQUESTS).map_err(|e| other(e.to_string()))?;
        txn.open_table(REQUEST_IDS)
            .map_err(|e| other(e.to_string()))?;
        txn.open_table(OUTCOMES).map_err(|e| other(e.to_string()))?;
        txn.open_table(CONVERSATIONS)
            .map_err(|e| other(e.to_string()))?;
        txn.open_table(rollups::MINUTES)
            .map_err(|e| other(e.to_string()))?;
        txn.open_table(rollups::HOURS)
            .map_err(|e| other(e.to_string()))?;
        txn.open_table(rollups::META)
            .map_err(|e| other(e.to_string()))?;
        index_unindexed_rows(&txn).map_err(other)?;
        rollups::build_missing(&txn).map_err(other)?;
        rollups::roll_up_stragglers(&txn).map_err(other)?;
        txn.commit().map_err(|e| other(e.to_string()))?;
        Ok(ledger)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows whose time is at or after `since_us`, oldest first.
    pub fn rows_since(&self, since_us: u64) -> Result<Vec<LedgerRow>, LedgerError> {
        let table = self.read_table()?;
        let mut rows = Vec::new();
        for entry in table.range(since_us..).map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            match serde_json::from_slice::<LedgerRow>(value.value()) {
                Ok(row) => rows.push(row),
                // A row this version cannot read is skipped and named, never fatal.
                Err(e) => {
                    tracing::warn!(key = key.value(), error = %e, "unreadable ledger row skipped")
                }
            }
        }
        Ok(rows)
    }

    /// Every outcome (feedback and shadow checks), by request id.
    pub fn outcomes(&self) -> Result<Vec<OutcomeRecord>, LedgerError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(OUTCOMES).map_err(|e| self.error(e))?;
        let mut outcomes = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            match serde_json::from_slice::<OutcomeRecord>(value.value()) {
                Ok(outcome) => outcomes.push(outcome),
                Err(e) => {
                    let (id, source) = key.value();
                    tracing::warn!(request_id = id, source, error = %e, "unreadable outcome skipped");
                }
            }
        }
        Ok(outcomes)
    }

    /// Every row that has an outcome, with its outcomes (feedback and shadow checks), oldest
    /// row first: the labels `router train --from-ledger` learns from. Outcomes whose row is
    /// gone (retention) or unreadable are left out.
    pub fn graded(&self) -> Result<Vec<Graded>, LedgerError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let outcomes = txn.open_table(OUTCOMES).map_err(|e| self.error(e))?;
        let ids = txn.open_table(REQUEST_IDS).map_err(|e| self.error(e))?;
        let rows = txn.open_table(REQUESTS).map_err(|e| self.error(e))?;
        let mut by_key: std::collections::BTreeMap<u64, Graded> = Default::default();
        for entry in outcomes.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            let Ok(outcome) = serde_json::from_slice::<OutcomeRecord>(value.value()) else {
                continue;
            };
            let id = key.value().0;
            let Some(row_key) = ids.get(id).map_err(|e| self.error(e))?.map(|k| k.value()) else {
                continue;
            };
            if let Some(graded) = by_key.get_mut(&row_key) {
                graded.outcomes.push(outcome);
                continue;
            }
            let Some(bytes) = rows.get(row_key).map_err(|e| self.error(e))? else {
                continue;
            };
            if let Ok(row) = serde_json::from_slice::<LedgerRow>(bytes.value()) {
                by_key.insert(
                    row_key,
                    Graded {
                        row,
                        outcomes: vec![outcome],
                    },
                );
            }
        }
        Ok(by_key.into_values().collect())
    }

    /// Number of rows.
    pub fn len(&self) -> Result<u64, LedgerError> {
        self.read_table()?.len().map_err(|e| self.error(e))
    }

    /// The rows table in a read transaction of its own.
    /// Keeps the conversation a Responses API answer `id` ended (see [`CONVERSATIONS`]).
    pub(super) fn store_conversation(&self, id: &str, record: &[u8]) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(CONVERSATIONS)
            .map_err(|e| e.to_string())?
            .insert(id, record)
            .map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())
    }

    /// The conversation stored for response `id`: when it was stored (microseconds since the
    /// epoch) and its messages.
    pub fn conversation(
        &self,
        id: &str,
    ) -> Result<Option<(u64, Vec<serde_json::Value>)>, LedgerError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(CONVERSATIONS).map_err(|e| self.error(e))?;
        let Some(value) = table.get(id).map_err(|e| self.error(e))? else {
            return Ok(None);
        };
        let record: serde_json::Value =
            serde_json::from_slice(value.value()).map_err(|e| self.error(e))?;
        let time_us = record
            .get("time_us")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let messages = match record.get("messages") {
            Some(serde_json::Value::Array(m)) => m.clone(),
            _ => return Err(self.error(format!("conversation {id} has no messages"))),
        };
        Ok(Some((time_us, messages)))
    }

    fn read_table(&self) -> Result<redb::ReadOnlyTable<u64, &'static [u8]>, LedgerError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        txn.open_table(REQUESTS).map_err(|e| self.error(e))
    }

    fn error(&self, e: impl std::fmt::Display) -> LedgerError {
        LedgerError::Other {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Whether the ledger has no rows.
    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        Ok(self.len()? == 0)
    }

    /// Writes rows in one durable transaction, keyed after `last_key` (updated), with their
    /// rollups. The daemon writes through its writer thread; this is for tools that build a
    /// ledger (benchmarks, imports).
    pub fn write(&self, rows: &[LedgerRow], last_key: &mut u64) -> Result<(), String> {
        self.write_part(rows, last_key, &mut Unrolled::default(), true)
    }

    /// Writes rows keyed after `last_key` (updated on success) in one transaction.
    ///
    /// Without `settle` it commits without waiting for the disk (redb makes it durable with
    /// the next durable commit; a crash before that loses it whole) and adds the rows to
    /// `unrolled` instead of the rollups. With `settle` it commits durably, with the rollups of
    /// these rows and of everything in `unrolled`, which it then empties. A failed
    /// transaction changes nothing, `unrolled` and `last_key` included.
    fn write_part(
        &self,
        rows: &[LedgerRow],
        last_key: &mut u64,
        unrolled: &mut Unrolled,
        settle: bool,
    ) -> Result<(), String> {
        let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
        if !settle {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| e.to_string())?;
        }
        let mut key = *last_key;
        {
            let mut table = txn.open_table(REQUESTS).map_err(|e| e.to_string())?;
            let mut ids = txn.open_table(REQUEST_IDS).map_err(|e| e.to_string())?;
            for row in rows {
                key = row.time_us.max(key.saturating_add(1));
                let value = serde_json::to_vec(row).map_err(|e| e.to_string())?;
                table
                    .insert(key, value.as_slice())
                    .map_err(|e| e.to_string())?;
                ids.insert(row.request_id.as_str(), key)
                    .map_err(|e| e.to_string())?;
            }
        }
        if settle {
            let mut sums = unrolled.clone();
            sums.add(rows);
            sums.write(&txn)?;
            rollups::mark_rolled_up(&txn, key)?;
            txn.commit().map_err(|e| e.to_string())?;
            *unrolled = Unrolled::default();
        } else {
            txn.commit().map_err(|e| e.to_string())?;
            unrolled.add(rows);
        }
        *last_key = key;
        Ok(())
    }

    /// Stores an outcome of a request in the ledger (one durable transaction), replacing an
    /// earlier one of the same source. Fails for a request id no row has.
    pub(super) fn store_outcome(
        &self,
        outcome: &OutcomeRecord,
    ) -> Result<OutcomeReceipt, OutcomeError> {
        let storage = |e: &dyn std::fmt::Display| OutcomeError::Storage(e.to_string());
        let txn = self.db.begin_write().map_err(|e| storage(&e))?;
        let receipt = {
            let ids = txn.open_table(REQUEST_IDS).map_err(|e| storage(&e))?;
            let Some(key) = ids
                .get(outcome.request_id.as_str())
                .map_err(|e| storage(&e))?
                .map(|k| k.value())
            else {
                return Err(OutcomeError::UnknownRequest(outcome.request_id.clone()));
            };
            let requests = txn.open_table(REQUESTS).map_err(|e| storage(&e))?;
            let arm = requests
                .get(key)
                .map_err(|e| storage(&e))?
                .and_then(|v| serde_json::from_slice::<LedgerRow>(v.value()).ok())
                .and_then(|row| Some((row.experiment?, row.arm?)));
            let mut outcomes = txn.open_table(OUTCOMES).map_err(|e| storage(&e))?;
            let slot = (outcome.request_id.as_str(), outcome.source.as_str());
            let earlier = outcomes
                .get(slot)
                .map_err(|e| storage(&e))?
                .and_then(|v| serde_json::from_slice::<OutcomeRecord>(v.value()).ok());
            let stored = match earlier {
                Some(e) if e.same_as(outcome) => Stored::Unchanged,
                Some(_) => Stored::Replaced,
                None => Stored::Created,
            };
            if stored != Stored::Unchanged {
                let value = serde_json::to_vec(outcome).map_err(|e| storage(&e))?;
                outcomes
                    .insert(slot, value.as_slice())
                    .map_err(|e| storage(&e))?;
            }
            OutcomeReceipt { stored, arm }
        };
        txn.commit().map_err(|e| storage(&e))?;
        Ok(receipt)
    }

    /// Deletes rows older than `max_age` and beyond `max_rows` (oldest first), with their
    /// request-id index entries and outcomes.
    pub(super) fn retain(&self, max_age: Option<Duration>, max_rows: u64) -> Result<u64, String> {
        let cutoff = max_age.map_or(0, |age| now_us().saturating_sub(age.as_micros() as u64));
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        let mut removed = 0;
        {
            let mut table = txn.open_table(REQUESTS).map_err(|e| e.to_string())?;
            let mut ids = txn.open_table(REQUEST_IDS).map_err(|e| e.to_string())?;
            let mut outcomes = txn.open_table(OUTCOMES).map_err(|e| e.to_string())?;
            let len = table.len().map_err(|e| e.to_string())?;
            let excess = if max_rows > 0 {
                len.saturating_sub(max_rows)
            } else {
                0
            };
            // Keys are times, so both rules select a prefix of the table.
            let mut doomed: Vec<(u64, Option<LedgerRow>)> = Vec::new();
            for entry in table.iter().map_err(|e| e.to_string())? {
                let (key, value) = entry.map_err(|e| e.to_string())?;
                let key = key.value();
                if key >= cutoff && doomed.len() as u64 >= excess {
                    break;
                }
                doomed.push((key, serde_json::from_slice::<LedgerRow>(value.value()).ok()));
            }
            for (key, row) in &doomed {
                table.remove(key).map_err(|e| e.to_string())?;
                let Some(row) = row else {
                    removed += 1;
                    continue;
                };
                let id = &row.request_id;
                let indexed = ids
                    .get(id.as_str())
                    .map_err(|e| e.to_string())?
                    .map(|k| k.value());
                // A later row may reuse a client-chosen id; its index and outcomes stay.
                if indexed == Some(*key) {
                    ids.remove(id.as_str()).map_err(|e| e.to_string())?;
                    for source in [OutcomeSource::Feedback, OutcomeSource::Shadow] {
                        outcomes
                            .remove((id.as_str(), source.as_str()))
                            .map_err(|e| e.to_string())?;
                    }
                }
                removed += 1;
            }
            drop((table, ids, outcomes));
            // Conversations past the age limit (they are few beside rows: one per stored
            // Responses answer, and only with store_prompts).
            if max_age.is_some() {
                let mut conversations = txn.open_table(CONVERSATIONS).map_err(|e| e.to_string())?;
                let mut old: Vec<String> = Vec::new();
                for entry in conversations.iter().map_err(|e| e.to_string())? {
                    let (key, value) = entry.map_err(|e| e.to_string())?;
                    let time_us = serde_json::from_slice::<serde_json::Value>(value.value())
                        .ok()
                        .and_then(|v| v.get("time_us").and_then(serde_json::Value::as_u64))
                        .unwrap_or(0);
                    if time_us < cutoff {
                        old.push(key.value().to_owned());
                    }
                }
                for id in &old {
                    conversations
                        .remove(id.as_str())
                        .map_err(|e| e.to_string())?;
                }
            }
            let rows: Vec<&LedgerRow> = doomed.iter().filter_map(|(_, r)| r.as_ref()).collect();
            rollups::subtract(&txn, &rows)?;
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(removed)
    }

    pub(super) fn last_key(&self) -> u64 {
        let Ok(table) = self.read_table() else {
            return 0;
        };
        table.last().ok().flatten().map_or(0, |(k, _)| k.value())
    }
}

/// A ledger written before the request-id index existed gets one on first open, so feedback
/// can name requests recorded before an upgrade.
fn index_unindexed_rows(txn: &redb::WriteTransaction) -> Result<(), String> {
    let rows = txn.open_table(REQUESTS).map_err(|e| e.to_string())?;
    let mut ids = txn.open_table(REQUEST_IDS).map_err(|e| e.to_string())?;
    if !ids.is_empty().map_err(|e| e.to_string())? || rows.is_empty().map_err(|e| e.to_string())? {
        return Ok(());
    }
    let mut indexed = 0u64;
    for entry in rows.iter().map_err(|e| e.to_string())? {
        let (key, value) = entry.map_err(|e| e.to_string())?;
        if let Ok(row) = serde_json::from_slice::<LedgerRow>(value.value()) {
            ids.insert(row.request_id.as_str(), key.value())
                .map_err(|e| e.to_string())?;
            indexed += 1;
        }
    }
    tracing::info!(
        rows = indexed,
        "ledger: indexed request ids of rows from an earlier version"
    );
    Ok(())
}

/// Microseconds since the Unix epoch now.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row for tests.
    pub(super) fn row(time_us: u64, id: &str) -> LedgerRow {
        LedgerRow {
            time_us,
            request_id: id.to_owned(),
            route: "local".to_owned(),
            backend: "b".to_owned(),
            reason: "prefer_local".to_owned(),
            experiment: None,
            arm: None,
            p_local: Some(0.7),
            fallback_from: None,
            status: 200,
            outcome: "ok".to_owned(),
            stream: false,
            input_tokens: 3,
            output_tokens: 4,
            tokens_source: "upstream".to_owned(),
            latency_s: 0.5,
            ttft_s: Some(0.1),
            energy_source: "estimate".to_owned(),
            bill: Bill::default(),
            guard: None,
            prompt: None,
        }
    }

    #[test]
    fn rows_survive_reopen_in_order_with_equal_times_kept_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/ledger.redb");
        let ledger = Ledger::open(&path).expect("open");
        let mut last = 0;
        ledger
            .write(&[row(100, "a"), row(100, "b"), row(50, "c")], &mut last)
            .expect("write");
        drop(ledger);
        let ledger = Ledger::open(&path).expect("reopen");
        let ids: Vec<String> = ledger
            .rows_since(0)
            .expect("read")
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(ledger.last_key(), 102);
        assert_eq!(ledger.rows_since(101).expect("read").len(), 2);
    }

    #[test]
    fn rows_from_before_the_index_are_indexed_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.redb");
        let ledger = Ledger::open(&path).expect("open");
        let mut last = 0;
        ledger.write(&[row(10, "old")], &mut last).expect("write");
        // Simulate a ledger from before the index: drop it.
        let txn = ledger.db.begin_write().expect("txn");
        txn.delete_table(REQUEST_IDS).expect("drop index");
        txn.commit().expect("commit");
        drop(ledger);
        let ledger = Ledger::open(&path).expect("reopen");
        let feedback = OutcomeRecord {
            request_id: "old".to_owned(),
            source: OutcomeSource::Feedback,
            time_us: 11,
            score: 1.0,
            thumbs: None,
            comment: None,
            detail: None,
            spend: None,
        };
        let receipt = ledger
            .store_outcome(&feedback)
            .expect("known after reindex");
        assert_eq!(receipt.stored, Stored::Created);
        assert!(matches!(
            ledger.store_outcome(&OutcomeRecord {
                request_id: "new".to_owned(),
                ..feedback
            }),
            Err(OutcomeError::UnknownRequest(_))
        ));
        // Retention removes the row's index entry and outcomes with it.
        assert_eq!(ledger.retain(None, 0).expect("retain"), 0);
        assert_eq!(
            ledger
                .retain(Some(Duration::from_secs(1)), 0)
                .expect("retain"),
            1
        );
        assert!(ledger.outcomes().expect("outcomes").is_empty());
    }

    #[test]
    fn rows_committed_without_their_rollups_are_rolled_up_on_the_next_open() {
        // A flush whose last (durable, rollup-writing) transaction failed, then a shutdown.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.redb");
        let ledger = Ledger::open(&path).expect("open");
        let mut last = 0;
        ledger.write(&[row(10, "a")], &mut last).expect("write");
        let mut unrolled = Unrolled::default();
        ledger
            .write_part(
                &[row(20, "b"), row(30, "c")],
                &mut last,
                &mut unrolled,
                false,
            )
            .expect("write");
        assert_eq!(ledger.len().expect("len"), 3);
        assert_eq!(ledger.savings_since(0).expect("savings").total.requests, 1);
        drop(ledger);
        let ledger = Ledger::open(&path).expect("reopen");
        assert_eq!(ledger.savings_since(0).expect("savings").total.requests, 3);
        drop(ledger);
        // Rolled up once: a second open adds nothing.
        let ledger = Ledger::open(&path).expect("reopen");
        assert_eq!(ledger.savings_since(0).expect("savings").total.requests, 3);
    }

    #[test]
    fn retention_removes_conversations_past_the_age_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("l.redb")).expect("open");
        let record = |time_us: u64| {
            serde_json::to_vec(&serde_json::json!({"time_us": time_us, "messages": [{"role": "user", "content": "x"}]}))
                .expect("json")
        };
        ledger
            .store_conversation("resp_old", &record(1))
            .expect("store");
        ledger
            .store_conversation("resp_new", &record(now_us()))
            .expect("store");
        ledger
            .retain(Some(Duration::from_secs(86_400)), 0)
            .expect("retain");
        assert!(ledger.conversation("resp_old").expect("read").is_none());
        let (_, messages) = ledger
            .conversation("resp_new")
            .expect("read")
            .expect("kept");
        assert_eq!(messages.len(), 1);
        // Without an age limit (retention by count only) conversations are not touched.
        ledger.retain(None, 1).expect("retain");
        assert!(ledger.conversation("resp_new").expect("read").is_some());
    }

    #[test]
    fn retention_by_count_drops_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("l.redb")).expect("open");
        let mut last = 0;
        let rows: Vec<LedgerRow> = (0..10).map(|i| row(1000 + i, &i.to_string())).collect();
        ledger.write(&rows, &mut last).expect("write");
        assert_eq!(ledger.retain(None, 4).expect("retain"), 6);
        let ids: Vec<String> = ledger
            .rows_since(0)
            .expect("read")
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(ids, ["6", "7", "8", "9"]);
        // Age: every row is from 1970, far older than a day.
        assert_eq!(
            ledger
                .retain(Some(Duration::from_secs(86_400)), 0)
                .expect("retain"),
            4
        );
        assert!(ledger.is_empty().expect("len"));
    }
}
