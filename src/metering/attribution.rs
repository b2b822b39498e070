//! Charging a shared energy counter to the requests that used it.
//!
//! The counter measures the whole machine (or process), not a request. As in the IPW harness's
//! batched mode, every change of the counter is split equally among the requests active while
//! it happened; a change while none is active is idle energy, reported on its own and never
//! charged to a request. Wall time is split the same way, which is how amortised hardware
//! dollars are charged.
//!
//! **Who reads the counter.** On the request path, nobody: NVML calls and RAPL sysfs reads take
//! from microseconds to milliseconds, and a read under the meter's lock at every request's
//! start and end serialised every request behind it. The sampler thread
//! ([`spawn_sampler`]) owns every reading in the daemon. A request's start and end take the
//! meter's short lock (a few arithmetic operations, no I/O) and extrapolate the counter from
//! the latest reading at the power measured over the last sampled interval; the next reading
//! settles the difference with the requests active then (or as idle). This moves up to one
//! sample interval's energy between neighbouring requests; the total is never changed.
//! `benches/meter.rs` measures both the cost (no read on the request path) and the
//! attribution error against reading at every boundary.
//!
//! Offline, one query at a time (`wattgate profile`), [`EnergyMeter::begin_measured`] and
//! [`EnergyMeter::end_measured`] read the counter at the boundaries instead, so each query's
//! charge is exact.
//!
//! Equal splitting makes every active request's charge grow by the same amount, so the meter
//! keeps one running total per request share and a request's charge is the difference between
//! its end and its start: begin and end cost the same with 1 or 10,000 requests in flight.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::counters::{EnergyCounter, EnergySource};

/// What one request was charged.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Charge {
    /// Joules of the counter's change attributed to this request.
    pub joules: f64,
    /// Seconds of wall time attributed to this request (shared intervals split equally).
    pub seconds: f64,
}

/// Totals since the meter started, for `/v1/savings` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MeterTotals {
    /// Joules charged to requests.
    pub charged_joules: f64,
    /// Joules while no request was active.
    pub idle_joules: f64,
    /// Seconds while no request was active (what idle hardware costs are priced on).
    pub idle_seconds: f64,
    /// Readings that failed (the interval is then charged at the next good reading).
    pub failed_readings: u64,
}

/// A shared counter and the requests it is charged to.
pub struct EnergyMeter {
    counter: Box<dyn EnergyCounter>,
    state: Mutex<State>,
}

struct State {
    /// The latest reading and when it was taken.
    reading: (f64, Instant),
    /// Watts over the last sampled interval: how the counter is extrapolated past `reading`.
    watts: f64,
    /// Joules accounted so far (charged or idle), and up to when.
    level: f64,
    at: Instant,
    /// Requests active now.
    active: u64,
    /// Running totals per request share: what one request active since the start would have
    /// been charged.
    per_share: Charge,
    totals: MeterTotals,
}

/// A request's place in the meter: the per-share totals when it started. Hand it back to
/// [`EnergyMeter::end`].
#[derive(Debug)]
pub struct Ticket(Charge);

impl EnergyMeter {
    /// Starts metering from the counter's current reading.
    pub fn new(counter: Box<dyn EnergyCounter>) -> Self {
        let first = counter.read_joules();
        let failed = u64::from(first.is_err());
        let joules = first.unwrap_or(0.0);
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                reading: (joules, now),
                watts: 0.0,
                level: joules,
                at: now,
                active: 0,
                per_share: Charge::default(),
                totals: MeterTotals {
                    failed_readings: failed,
                    ..MeterTotals::default()
                },
            }),
            counter,
        }
    }

    /// Which kind of figure this meter produces.
    pub fn source(&self) -> EnergySource {
        self.counter.source()
    }

    /// Reads the counter (outside the lock) and settles the energy since the last reading.
    /// The sampler thread's job.
    pub fn sample(&self) {
        let reading = self.read();
        self.lock().settle(reading, Instant::now());
    }

    /// Reads the counter; a failed reading is counted (and logged now and then) and returns
    /// None, so the interval is charged at the next good reading.
    fn read(&self) -> Option<f64> {
        match self.counter.read_joules() {
            Ok(joules) => Some(joules),
            Err(e) => {
                let mut state = self.lock();
                state.totals.failed_readings += 1;
                if state.totals.failed_readings.is_power_of_two() {
                    tracing::warn!(error = %e, failures = state.totals.failed_readings, "energy counter reading failed; the interval is charged at the next good reading");
                }
                None
            }
        }
    }

    /// A request starts (no counter read: see the module docs).
    pub fn begin(&self) -> Ticket {
        self.begin_at(Instant::now())
    }

    /// A request ends: its charge, extrapolated from the latest reading up to now.
    pub fn end(&self, ticket: Ticket) -> Charge {
        self.end_at(ticket, Instant::now())
    }

    /// A query starts, with the counter read now and nothing extrapolated: exact for one
    /// query at a time (profiling), where a read per boundary costs nothing that matters.
    pub fn begin_measured(&self) -> Ticket {
        let reading = self.read();
        let mut state = self.lock();
        state.settle(reading, Instant::now());
        state.active += 1;
        Ticket(state.per_share)
    }

    /// A query ends, with the counter read now.
    pub fn end_measured(&self, ticket: Ticket) -> Charge {
        let reading = self.read();
        let mut state = self.lock();
        state.settle(reading, Instant::now());
        state.finish(&ticket)
    }

    /// [`Self::begin`] at a given instant.
    pub fn begin_at(&self, now: Instant) -> Ticket {
        let mut state = self.lock();
        state.advance(now);
        state.active += 1;
        Ticket(state.per_share)
    }

    /// [`Self::end`] at a given instant.
    pub fn end_at(&self, ticket: Ticket, now: Instant) -> Charge {
        let mut state = self.lock();
        state.advance(now);
        state.finish(&ticket)
    }

    /// [`Self::sample`] with a reading taken elsewhere, at a given instant.
    pub fn settle_at(&self, joules: f64, now: Instant) {
        self.lock().settle(Some(joules), now);
    }

    /// Totals since start.
    pub fn totals(&self) -> MeterTotals {
        self.lock().totals
    }

    /// The state is plain numbers, each update complete before the lock is released, so a
    /// panic elsewhere cannot leave it half-written: a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// A request leaves: its charge since its ticket.
    fn finish(&mut self, ticket: &Ticket) -> Charge {
        self.active = self.active.saturating_sub(1);
        Charge {
            joules: self.per_share.joules - ticket.0.joules,
            seconds: self.per_share.seconds - ticket.0.seconds,
        }
    }

    /// Accounts `joules` and the wall time from `at` to `now` to the requests active now.
    fn account(&mut self, joules: f64, now: Instant) {
        let seconds = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.level += joules;
        if self.active == 0 {
            self.totals.idle_joules += joules;
            self.totals.idle_seconds += seconds;
            return;
        }
        let n = self.active as f64;
        self.per_share.joules += joules / n;
        self.per_share.seconds += seconds / n;
        self.totals.charged_joules += joules;
    }

    /// Extrapolates the counter to `now` at the last measured power and accounts the part not
    /// accounted yet (nothing while an earlier extrapolation ran ahead of the counter).
    fn advance(&mut self, now: Instant) {
        let (joules, read_at) = self.reading;
        let since = now.saturating_duration_since(read_at).as_secs_f64();
        let estimate = joules + self.watts * since;
        self.account((estimate - self.level).max(0.0), now);
    }

    /// A new reading: what it shows beyond what was accounted goes to the requests active now.
    /// Counters are monotonic; a smaller reading than the last one is a reset counter and
    /// charges nothing for that interval.
    /// A failed reading (None) accounts nothing: the next good one covers the interval.
    fn settle(&mut self, reading: Option<f64>, now: Instant) {
        let Some(joules) = reading else {
            return;
        };
        let (last, last_at) = self.reading;
        if joules < last {
            self.reading = (joules, now);
            self.level = joules;
            self.account(0.0, now);
            return;
        }
        let dt = now.saturating_duration_since(last_at).as_secs_f64();
        if dt > 0.0 {
            self.watts = (joules - last) / dt;
        }
        self.reading = (joules, now);
        self.account((joules - self.level).max(0.0), now);
        self.level = self.level.max(joules);
    }
}

/// Samples the meter every `interval` until the meter is the last reference left.
pub fn spawn_sampler(meter: &Arc<EnergyMeter>, interval: Duration) {
    let weak = Arc::downgrade(meter);
    let spawned = std::thread::Builder::new()
        .name("wattgate-energy".to_owned())
        .spawn(move || loop {
            std::thread::sleep(interval);
            match weak.upgrade() {
                Some(meter) => meter.sample(),
                None => return,
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the energy sampler thread; energy is not metered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A counter that returns scripted readings in order (the last one repeats).
    struct Scripted {
        readings: Vec<f64>,
        next: AtomicUsize,
    }

    impl EnergyCounter for Scripted {
        fn source(&self) -> EnergySource {
            EnergySource::Estimate
        }
        fn read_joules(&self) -> Result<f64, String> {
            let i = self.next.fetch_add(1, Ordering::SeqCst);
            self.readings
                .get(i.min(self.readings.len() - 1))
                .copied()
                .ok_or_else(|| "no readings".to_owned())
        }
    }

    fn meter(readings: &[f64]) -> EnergyMeter {
        EnergyMeter::new(Box::new(Scripted {
            readings: readings.to_vec(),
            next: AtomicUsize::new(0),
        }))
    }

    #[test]
    fn measured_boundaries_split_shared_intervals_and_idle_is_separate() {
        // Reading order: open 0; idle sample 5; begin A 10; begin B 16; sample 26; end A 30;
        // end B 40; idle sample 47.
        let m = meter(&[0.0, 5.0, 10.0, 16.0, 26.0, 30.0, 40.0, 47.0]);
        m.sample(); // 0 -> 5 with nobody active: idle.
        let a = m.begin_measured(); // 5 -> 10 idle.
        let b = m.begin_measured(); // 10 -> 16: A alone, 6.
        m.sample(); // 16 -> 26: A and B, 5 each.
        let ca = m.end_measured(a); // 26 -> 30: A and B, 2 each. A = 6 + 5 + 2 = 13.
        let cb = m.end_measured(b); // 30 -> 40: B alone. B = 5 + 2 + 10 = 17.
        m.sample(); // 40 -> 47: idle.
        assert_eq!(ca.joules, 13.0);
        assert_eq!(cb.joules, 17.0);
        let t = m.totals();
        assert_eq!(t.charged_joules, 30.0);
        assert_eq!(t.idle_joules, 17.0);
        assert_eq!(t.charged_joules + t.idle_joules, 47.0);
    }

    #[test]
    fn a_counter_reset_charges_nothing_for_that_interval() {
        let m = meter(&[100.0, 110.0, 3.0, 8.0]);
        let a = m.begin_measured(); // 100 -> 110 idle
        m.sample(); // 110 -> 3: reset, 0
        let c = m.end_measured(a); // 3 -> 8: 5
        assert_eq!(c.joules, 5.0);
    }

    /// Counts its reads; reads 0 J.
    struct Counting(AtomicUsize);

    impl EnergyCounter for Counting {
        fn source(&self) -> EnergySource {
            EnergySource::Estimate
        }
        fn read_joules(&self) -> Result<f64, String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(0.0)
        }
    }

    #[test]
    fn requests_never_read_the_counter() {
        let counter = Arc::new(Counting(AtomicUsize::new(0)));
        struct Shared(Arc<Counting>);
        impl EnergyCounter for Shared {
            fn source(&self) -> EnergySource {
                EnergySource::Estimate
            }
            fn read_joules(&self) -> Result<f64, String> {
                self.0.read_joules()
            }
        }
        let m = EnergyMeter::new(Box::new(Shared(counter.clone())));
        let opened = counter.0.load(Ordering::SeqCst);
        for _ in 0..1000 {
            let t = m.begin();
            let _ = m.end(t);
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), opened);
        m.sample();
        assert_eq!(counter.0.load(Ordering::SeqCst), opened + 1);
    }

    #[test]
    fn between_readings_a_request_is_charged_at_the_last_measured_power() {
        // 100 W throughout, read every 50 ms; a request from 70 ms to 170 ms is charged 10 J,
        // though no reading happened at either boundary, and the total stays the counter's.
        let m = meter(&[0.0]);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let joules = |ms: u64| ms as f64 * 0.1;
        m.settle_at(joules(50), at(50));
        let ticket = m.begin_at(at(70));
        m.settle_at(joules(100), at(100));
        m.settle_at(joules(150), at(150));
        let charge = m.end_at(ticket, at(170));
        m.settle_at(joules(200), at(200));
        // (The meter opened a few microseconds before t0, so the first power is a hair low.)
        assert!((charge.joules - 10.0).abs() < 1e-3, "{charge:?}");
        assert!((charge.seconds - 0.1).abs() < 1e-9, "{charge:?}");
        let t = m.totals();
        assert!(
            (t.charged_joules + t.idle_joules - 20.0).abs() < 1e-3,
            "{t:?}"
        );
        assert!((t.idle_seconds - 0.1).abs() < 1e-4, "{t:?}");
    }

    #[test]
    fn an_extrapolation_ahead_of_the_counter_is_taken_back_from_what_follows() {
        // 100 W for the first 100 ms, then nothing: a request ending at 130 ms is charged at
        // 100 W (3 J too much); the meter accounts nothing more until the counter catches up,
        // so the total never exceeds the counter for longer than that.
        let m = meter(&[0.0]);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        m.settle_at(10.0, at(100));
        let ticket = m.begin_at(at(100));
        let charge = m.end_at(ticket, at(130));
        assert!((charge.joules - 3.0).abs() < 1e-3, "{charge:?}");
        m.settle_at(10.0, at(150));
        m.settle_at(12.0, at(200));
        let t = m.totals();
        assert!(
            (t.charged_joules + t.idle_joules - 13.0).abs() < 1e-3,
            "{t:?}"
        );
        m.settle_at(20.0, at(250));
        let t = m.totals();
        assert!(
            (t.charged_joules + t.idle_joules - 20.0).abs() < 1e-3,
            "{t:?}"
        );
    }
}
