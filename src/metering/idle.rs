//! The machine's idle spend, recorded into the ledger every 10 s so that savings over any
//! window can be reported net of it: the energy drawn while no request was active (measured or
//! estimated, like every local figure) and the hardware hours nobody used.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{MeterTotals, Metering};
use crate::ledger::{now_us, LedgerSender};

/// How often idle spend is written to the ledger (the resolution of net savings per window).
pub const IDLE_EVERY: Duration = Duration::from_secs(10);

/// Records idle spend into the ledger, from its own thread and once more at shutdown.
pub struct IdleRecorder {
    metering: Arc<Metering>,
    ledger: LedgerSender,
    last: Mutex<MeterTotals>,
    stop: AtomicBool,
}

impl IdleRecorder {
    /// Starts recording every [`IDLE_EVERY`]; [`IdleRecorder::finish`] records the last
    /// interval and stops.
    pub fn spawn(metering: Arc<Metering>, ledger: LedgerSender) -> Arc<Self> {
        let recorder = Arc::new(Self {
            last: Mutex::new(metering.totals()),
            metering,
            ledger,
            stop: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&recorder);
        let spawned = std::thread::Builder::new()
            .name("wattgate-idle".to_owned())
            .spawn(move || loop {
                for _ in 0..(IDLE_EVERY.as_millis() / 100) {
                    std::thread::sleep(Duration::from_millis(100));
                    match weak.upgrade() {
                        Some(r) if !r.stop.load(Ordering::SeqCst) => {}
                        _ => return,
                    }
                }
                match weak.upgrade() {
                    Some(r) => r.record(),
                    None => return,
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the idle recorder; net savings will not subtract idle energy");
        }
        recorder
    }

    /// Records the idle spend since the last record.
    pub fn record(&self) {
        let now = self.metering.totals();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let idle = self.metering.idle_spend(&last, &now);
        *last = now;
        drop(last);
        if idle.joules > 0.0 || idle.seconds > 0.0 {
            self.ledger.record_idle(now_us(), idle);
        }
    }

    /// Records the last interval and stops the thread (before the ledger closes).
    pub fn finish(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.metering.sample();
        self.record();
    }
}
