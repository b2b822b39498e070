//! The ledger: one row per chat request, kept in an embedded redb database.
//!
//! Rows are queued from the request path (never blocking it) and written by one thread in a
//! single transaction per `flush_interval_s`, committed durably. redb commits are atomic and
//! checksummed, so a crash (kill -9, power loss) loses at most the rows of the batch not yet
//! committed and never leaves a half-written file. Retention (age and row count) runs on the
//! same thread.
//!
//! Keys are microseconds since the Unix epoch, bumped by one where two rows share an instant,
//! so rows sort by time and a time range is a key range.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::config::LedgerConfig;
use crate::metering::Bill;

/// Rows by key (see the module docs); values are JSON so columns can be added without a
/// migration.
const REQUESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("requests");

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
    /// The experiment arm, once experiments assign one.
    pub arm: Option<String>,
    /// The router's estimate, when it ran.
    pub p_local: Option<f64>,
    /// The local backend that failed first, for escalated requests.
    pub fallback_from: Option<String>,
    /// HTTP status the client got (200 for streams, even ones that failed midway).
    pub status: u16,
    /// `ok`, `error` or `cancelled` (the client went away).
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
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => LedgerError::Busy(path.to_owned()),
            e => other(e.to_string()),
        })?;
        let ledger = Self {
            db: Arc::new(db),
            path: path.to_owned(),
        };
        // Create the table so readers of an empty ledger see zero rows, not an error.
        let txn = ledger.db.begin_write().map_err(|e| other(e.to_string()))?;
        txn.open_table(REQUESTS).map_err(|e| other(e.to_string()))?;
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

    /// Number of rows.
    pub fn len(&self) -> Result<u64, LedgerError> {
        self.read_table()?.len().map_err(|e| self.error(e))
    }

    /// The rows table in a read transaction of its own.
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

    /// Writes rows in one durable transaction, keyed after `last_key` (updated).
    fn write(&self, rows: &[LedgerRow], last_key: &mut u64) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(REQUESTS).map_err(|e| e.to_string())?;
            for row in rows {
                let key = row.time_us.max(last_key.saturating_add(1));
                let value = serde_json::to_vec(row).map_err(|e| e.to_string())?;
                table
                    .insert(key, value.as_slice())
                    .map_err(|e| e.to_string())?;
                *last_key = key;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }

    /// Deletes rows older than `max_age` and beyond `max_rows` (oldest first).
    fn retain(&self, max_age: Option<Duration>, max_rows: u64) -> Result<u64, String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        let mut removed = 0;
        {
            let mut table = txn.open_table(REQUESTS).map_err(|e| e.to_string())?;
            if let Some(age) = max_age {
                let cutoff = now_us().saturating_sub(age.as_micros() as u64);
                let before = table.len().map_err(|e| e.to_string())?;
                table
                    .retain_in(..cutoff, |_, _| false)
                    .map_err(|e| e.to_string())?;
                removed += before - table.len().map_err(|e| e.to_string())?;
            }
            if max_rows > 0 {
                let len = table.len().map_err(|e| e.to_string())?;
                for _ in max_rows..len {
                    table.pop_first().map_err(|e| e.to_string())?;
                    removed += 1;
                }
            }
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(removed)
    }

    fn last_key(&self) -> u64 {
        let Ok(table) = self.read_table() else {
            return 0;
        };
        table.last().ok().flatten().map_or(0, |(k, _)| k.value())
    }
}

/// What the request path sends the writer thread.
enum Message {
    Row(Box<LedgerRow>),
    /// Write everything queued now, then acknowledge.
    Flush(Sender<()>),
}

/// The request path's handle: queues rows for the writer thread.
#[derive(Clone)]
pub struct LedgerSender {
    tx: Sender<Message>,
}

impl LedgerSender {
    /// Queues a row; never blocks. A row is lost only if the writer thread has died, which is
    /// logged when it happens.
    pub fn record(&self, row: LedgerRow) {
        if self.tx.send(Message::Row(Box::new(row))).is_err() {
            tracing::error!("ledger writer has stopped; a row was not recorded");
        }
    }

    /// Writes everything queued so far, waiting at most `timeout` (graceful shutdown).
    pub fn flush(&self, timeout: Duration) {
        let (ack, done) = channel();
        if self.tx.send(Message::Flush(ack)).is_ok() && done.recv_timeout(timeout).is_err() {
            tracing::warn!("ledger flush did not finish within {timeout:?}");
        }
    }
}

/// Starts the writer thread. It flushes every `flush_interval_s` and once more when every
/// [`LedgerSender`] is gone (graceful shutdown); the returned handle joins it.
pub fn spawn_writer(
    ledger: Ledger,
    config: &LedgerConfig,
) -> std::io::Result<(LedgerSender, std::thread::JoinHandle<()>)> {
    let (tx, rx) = channel();
    let interval = crate::config::secs(config.flush_interval_s);
    let max_age = (config.retention_days > 0.0)
        .then(|| crate::config::secs(config.retention_days * 86_400.0));
    let max_rows = config.max_rows;
    let handle = std::thread::Builder::new()
        .name("wattgate-ledger".to_owned())
        .spawn(move || writer(&ledger, &rx, interval, max_age, max_rows))?;
    Ok((LedgerSender { tx }, handle))
}

fn writer(
    ledger: &Ledger,
    rx: &Receiver<Message>,
    interval: Duration,
    max_age: Option<Duration>,
    max_rows: u64,
) {
    let mut last_key = ledger.last_key();
    let mut batch: Vec<LedgerRow> = Vec::new();
    let mut next_flush = Instant::now() + interval;
    let mut next_retention = Instant::now();
    loop {
        let mut ack = None;
        let closed = match rx.recv_timeout(next_flush.saturating_duration_since(Instant::now())) {
            Ok(Message::Row(row)) => {
                batch.push(*row);
                false
            }
            Ok(Message::Flush(done)) => {
                ack = Some(done);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if Instant::now() < next_flush && !closed && ack.is_none() {
            continue;
        }
        if !batch.is_empty() {
            match ledger.write(&batch, &mut last_key) {
                Ok(()) => batch.clear(),
                // Kept and retried at the next interval: a full disk is not a reason to drop.
                Err(e) => {
                    tracing::error!(rows = batch.len(), error = %e, "ledger write failed; retrying at the next flush")
                }
            }
        }
        if Instant::now() >= next_retention {
            match ledger.retain(max_age, max_rows) {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "ledger retention removed old rows"),
                Err(e) => tracing::warn!(error = %e, "ledger retention failed"),
            }
            next_retention = Instant::now() + RETENTION_EVERY;
        }
        next_flush = Instant::now() + interval;
        if let Some(done) = ack {
            let _ = done.send(());
        }
        if closed {
            if !batch.is_empty() {
                tracing::error!(
                    rows = batch.len(),
                    "ledger rows could not be written at shutdown"
                );
            }
            return;
        }
    }
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

    fn row(time_us: u64, id: &str) -> LedgerRow {
        LedgerRow {
            time_us,
            request_id: id.to_owned(),
            route: "local".to_owned(),
            backend: "b".to_owned(),
            reason: "prefer_local".to_owned(),
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

    #[test]
    fn writer_flushes_on_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("l.redb")).expect("open");
        let config = LedgerConfig {
            flush_interval_s: 3600.0,
            retention_days: 0.0,
            ..LedgerConfig::default()
        };
        let (tx, handle) = spawn_writer(ledger.clone(), &config).expect("spawn");
        tx.record(row(now_us(), "x"));
        drop(tx);
        handle.join().expect("writer exits");
        assert_eq!(ledger.len().expect("len"), 1);
    }
}
