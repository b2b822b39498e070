//! The writer thread and the request path's handle to it: rows are queued without blocking
//! and written in one durable transaction per `flush_interval_s`; retention runs here too.

use std::sync::mpsc::{
    channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError,
};
use std::time::{Duration, Instant};

use super::{Ledger, LedgerRow, OutcomeError, OutcomeReceipt, OutcomeRecord, RETENTION_EVERY};
use crate::config::LedgerConfig;

/// What the request path sends the writer thread.
enum Message {
    Row(Box<LedgerRow>),
    /// Write the rows queued so far, then the outcome, then answer (if anyone waits).
    Outcome(Box<OutcomeRecord>, Option<OutcomeReply>),
    /// Write everything queued now, then acknowledge.
    Flush(Sender<()>),
    /// Write everything queued now, acknowledge, and stop (releasing the database file).
    Close(Sender<()>),
}

type OutcomeReply = tokio::sync::oneshot::Sender<Result<OutcomeReceipt, OutcomeError>>;

/// The request path's handle: queues rows for the writer thread.
///
/// The queue holds at most `ledger.queue_rows` rows. Overflow policy: a row that finds it full
/// is dropped, counted in `wattgate_ledger_rows_dropped_total` and logged, and the request is
/// served as usual. The alternatives are worse: waiting would stall a request (and the async
/// worker thread it runs on) behind a slow disk, and an unbounded queue turns a stuck disk into
/// an out-of-memory kill that loses every queued row at once. The request is still in the
/// Prometheus counters, which do not depend on the ledger.
#[derive(Clone)]
pub struct LedgerSender {
    tx: SyncSender<Message>,
    dropped: prometheus::IntCounter,
}

impl LedgerSender {
    /// Queues a row; never blocks. A row is lost when the queue is full (counted) or the writer
    /// thread has died (logged).
    pub fn record(&self, row: LedgerRow) {
        match self.tx.try_send(Message::Row(Box::new(row))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
                // Once per power of two, so a stuck disk does not also flood the log.
                let n = self.dropped.get();
                if n.is_power_of_two() {
                    tracing::error!(dropped = n, "ledger queue full (ledger.queue_rows): rows are being dropped; is the disk stuck?");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("ledger writer has stopped; a row was not recorded");
            }
        }
    }

    /// Stores an outcome after every row queued before it (so feedback on a request just
    /// answered finds its row), and answers with the receipt.
    pub async fn record_outcome(
        &self,
        outcome: OutcomeRecord,
    ) -> Result<OutcomeReceipt, OutcomeError> {
        let (reply, receipt) = tokio::sync::oneshot::channel();
        self.tx
            .try_send(Message::Outcome(Box::new(outcome), Some(reply)))
            .map_err(|e| match e {
                TrySendError::Full(_) => OutcomeError::Storage(
                    "the ledger's queue is full (ledger.queue_rows); retry shortly".to_owned(),
                ),
                TrySendError::Disconnected(_) => {
                    OutcomeError::Storage("the ledger writer has stopped".to_owned())
                }
            })?;
        receipt
            .await
            .map_err(|_| OutcomeError::Storage("the ledger writer has stopped".to_owned()))?
    }

    /// Writes everything queued so far and stops the writer, waiting at most `timeout`; rows
    /// recorded afterwards are lost and logged. The last step of a graceful shutdown, so the
    /// file is free for the next process (or `wattgate report`) once the thread is joined.
    pub fn close(&self, timeout: Duration) {
        let (ack, done) = channel();
        if self.tx.send(Message::Close(ack)).is_ok() && done.recv_timeout(timeout).is_err() {
            tracing::warn!("ledger close did not finish within {timeout:?}");
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
/// [`LedgerSender`] is gone (graceful shutdown); the returned handle joins it. `dropped` counts
/// rows refused by a full queue.
pub fn spawn_writer(
    ledger: Ledger,
    config: &LedgerConfig,
    dropped: prometheus::IntCounter,
) -> std::io::Result<(LedgerSender, std::thread::JoinHandle<()>)> {
    let (tx, rx) = sync_channel(config.queue_rows);
    let interval = crate::config::secs(config.flush_interval_s);
    let max_age = (config.retention_days > 0.0)
        .then(|| crate::config::secs(config.retention_days * 86_400.0));
    let max_rows = config.max_rows;
    let handle = std::thread::Builder::new()
        .name("wattgate-ledger".to_owned())
        .spawn(move || writer(&ledger, &rx, interval, max_age, max_rows))?;
    Ok((LedgerSender { tx, dropped }, handle))
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
            Ok(Message::Close(done)) => {
                ack = Some(done);
                true
            }
            Ok(Message::Outcome(outcome, reply)) => {
                let result = flush(ledger, &mut batch, &mut last_key)
                    .map_err(OutcomeError::Storage)
                    .and_then(|()| ledger.store_outcome(&outcome));
                if let Err(e) = &result {
                    tracing::debug!(request_id = %outcome.request_id, error = %e, "outcome not stored");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if Instant::now() < next_flush && !closed && ack.is_none() {
            continue;
        }
        if let Err(e) = flush(ledger, &mut batch, &mut last_key) {
            // Kept and retried at the next interval: a full disk is not a reason to drop.
            tracing::error!(rows = batch.len(), error = %e, "ledger write failed; retrying at the next flush");
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

/// Writes the queued rows in one transaction; on failure they stay queued.
fn flush(ledger: &Ledger, batch: &mut Vec<LedgerRow>, last_key: &mut u64) -> Result<(), String> {
    if batch.is_empty() {
        return Ok(());
    }
    ledger.write(batch, last_key)?;
    batch.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::now_us;
    use super::super::tests::row;
    use super::*;

    #[test]
    fn writer_flushes_on_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("l.redb")).expect("open");
        let config = LedgerConfig {
            flush_interval_s: 3600.0,
            retention_days: 0.0,
            ..LedgerConfig::default()
        };
        let (tx, handle) = spawn_writer(ledger.clone(), &config, dropped()).expect("spawn");
        tx.record(row(now_us(), "x"));
        drop(tx);
        handle.join().expect("writer exits");
        assert_eq!(ledger.len().expect("len"), 1);
    }

    fn dropped() -> prometheus::IntCounter {
        prometheus::IntCounter::new("dropped", "dropped").expect("counter")
    }

    #[test]
    fn a_full_queue_drops_and_counts_rows_without_blocking() {
        let (tx, rx) = sync_channel(2);
        let sender = LedgerSender {
            tx,
            dropped: dropped(),
        };
        for i in 0..5 {
            sender.record(row(now_us(), &format!("r{i}")));
        }
        assert_eq!(sender.dropped.get(), 3);
        assert_eq!(rx.try_iter().count(), 2, "the first two were queued");
        sender.record(row(now_us(), "again"));
        assert_eq!(
            sender.dropped.get(),
            3,
            "room again once the writer drained it"
        );
    }
}
