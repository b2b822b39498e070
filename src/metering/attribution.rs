//! Charging a shared energy counter to the requests that used it.
//!
//! The counter measures the whole machine (or process), not a request. As in the IPW harness's
//! batched mode, every change of the counter between two readings is split equally among the
//! requests active during that interval; a change while none is active is idle energy, reported
//! on its own and never charged to a request. Readings happen in the background every
//! `sample_interval_ms`, and also when a request starts and ends, so a request's window is
//! exact: nothing from before it arrived or after it left is charged to it. Wall time is split
//! the same way, which is how amortised hardware dollars are charged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    /// Readings that failed (the interval is then charged at the next good reading).
    pub failed_readings: u64,
}

/// A shared counter and the requests it is charged to.
pub struct EnergyMeter {
    counter: Box<dyn EnergyCounter>,
    state: Mutex<State>,
}

struct State {
    last_joules: f64,
    last_time: Instant,
    active: HashMap<u64, Charge>,
    next_id: u64,
    totals: MeterTotals,
}

/// A request's place in the meter; hand it back to [`EnergyMeter::end`].
#[derive(Debug)]
pub struct Ticket(u64);

impl EnergyMeter {
    /// Starts metering from the counter's current reading.
    pub fn new(counter: Box<dyn EnergyCounter>) -> Self {
        let first = counter.read_joules();
        let failed = u64::from(first.is_err());
        Self {
            state: Mutex::new(State {
                last_joules: first.unwrap_or(0.0),
                last_time: Instant::now(),
                active: HashMap::new(),
                next_id: 0,
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

    /// Reads the counter and charges the change since the previous reading.
    pub fn sample(&self) {
        if let Ok(mut state) = self.state.lock() {
            self.charge_interval(&mut state);
        }
    }

    /// A request starts: the interval up to now is charged to the requests already active.
    pub fn begin(&self) -> Ticket {
        let Ok(mut state) = self.state.lock() else {
            return Ticket(u64::MAX);
        };
        self.charge_interval(&mut state);
        let id = state.next_id;
        state.next_id += 1;
        state.active.insert(id, Charge::default());
        Ticket(id)
    }

    /// A request ends: the interval up to now is charged (this request included), and its
    /// total is returned.
    pub fn end(&self, ticket: Ticket) -> Charge {
        let Ok(mut state) = self.state.lock() else {
            return Charge::default();
        };
        self.charge_interval(&mut state);
        state.active.remove(&ticket.0).unwrap_or_default()
    }

    /// Totals since start.
    pub fn totals(&self) -> MeterTotals {
        self.state.lock().map(|s| s.totals).unwrap_or_default()
    }

    fn charge_interval(&self, state: &mut State) {
        let now = Instant::now();
        let joules = match self.counter.read_joules() {
            Ok(j) => j,
            Err(e) => {
                state.totals.failed_readings += 1;
                if state.totals.failed_readings.is_power_of_two() {
                    tracing::warn!(error = %e, failures = state.totals.failed_readings, "energy counter reading failed; the interval is charged at the next good reading");
                }
                return;
            }
        };
        // Counters are monotonic; a smaller reading (a reset counter) charges nothing.
        let delta = (joules - state.last_joules).max(0.0);
        let seconds = now.saturating_duration_since(state.last_time).as_secs_f64();
        state.last_joules = joules;
        state.last_time = now;
        if state.active.is_empty() {
            state.totals.idle_joules += delta;
            return;
        }
        let n = state.active.len() as f64;
        for charge in state.active.values_mut() {
            charge.joules += delta / n;
            charge.seconds += seconds / n;
        }
        state.totals.charged_joules += delta;
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
        tracing::warn!(error = %e, "could not start the energy sampler thread; energy is read only at request boundaries");
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
    fn overlapping_requests_split_shared_intervals_and_idle_is_separate() {
        // Reading order: open 0; idle sample 5; begin A 10; begin B 16; sample 26; end A 30;
        // end B 40; idle sample 47.
        let m = meter(&[0.0, 5.0, 10.0, 16.0, 26.0, 30.0, 40.0, 47.0]);
        m.sample(); // 0 -> 5 with nobody active: idle.
        let a = m.begin(); // 5 -> 10 idle.
        let b = m.begin(); // 10 -> 16: A alone, 6.
        m.sample(); // 16 -> 26: A and B, 5 each.
        let ca = m.end(a); // 26 -> 30: A and B, 2 each. A = 6 + 5 + 2 = 13.
        let cb = m.end(b); // 30 -> 40: B alone. B = 5 + 2 + 10 = 17.
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
        let a = m.begin(); // 100 -> 110 idle
        m.sample(); // 110 -> 3: reset, 0
        let c = m.end(a); // 3 -> 8: 5
        assert_eq!(c.joules, 5.0);
    }
}
