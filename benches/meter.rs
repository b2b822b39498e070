//! The energy meter on the request path, and what sampling costs in attribution accuracy.
//!
//!     cargo bench --bench meter
//!
//! 1. **Cost.** A request's begin and end against a counter that takes 1 ms per read (a slow
//!    NVML call or sysfs read), with the sampler thread reading it every 50 ms, next to the same
//!    pair reading the counter at both boundaries (how the meter worked before, and how offline
//!    profiling still works).
//! 2. **Attribution error.** A simulated workload on a virtual clock (Poisson arrivals, 20
//!    requests/s, exponential durations with a 0.4 s mean, 30 W idle plus 5-40 W per request,
//!    60 s), charged twice: reading the counter at every request boundary (exact for equal
//!    splitting) and sampling it every 10, 50 or 100 ms with the request boundaries
//!    extrapolated. Printed: each request's error relative to the exact charge, and the change
//!    in total charged energy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use wattgate::metering::attribution::spawn_sampler;
use wattgate::metering::{EnergyCounter, EnergyMeter, EnergySource};

/// Reads take 1 ms; the counter grows 100 J per second of wall time.
struct SlowCounter(Instant);

impl EnergyCounter for SlowCounter {
    fn source(&self) -> EnergySource {
        EnergySource::Estimate
    }
    fn read_joules(&self) -> Result<f64, String> {
        std::thread::sleep(Duration::from_millis(1));
        Ok(self.0.elapsed().as_secs_f64() * 100.0)
    }
}

/// A counter the simulation never reads through the trait (it settles readings itself).
struct Virtual;

impl EnergyCounter for Virtual {
    fn source(&self) -> EnergySource {
        EnergySource::Estimate
    }
    fn read_joules(&self) -> Result<f64, String> {
        Ok(0.0)
    }
}

fn cost(c: &mut Criterion) {
    let meter = Arc::new(EnergyMeter::new(Box::new(SlowCounter(Instant::now()))));
    spawn_sampler(&meter, Duration::from_millis(50));
    let mut group = c.benchmark_group("meter");
    group.bench_function("begin+end, 1 ms counter, sampler at 50 ms", |b| {
        b.iter(|| {
            let t = meter.begin();
            std::hint::black_box(meter.end(t))
        })
    });
    group.sample_size(10);
    group.bench_function("begin+end reading the 1 ms counter at both", |b| {
        b.iter(|| {
            let t = meter.begin_measured();
            std::hint::black_box(meter.end_measured(t))
        })
    });
    group.finish();
}

enum Event {
    Arrive(usize),
    Depart(usize),
    Tick,
}

/// Per-request charges (joules) of the simulated workload, exact and sampled every `tick`.
fn simulate(tick: Duration, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let horizon = 60.0;
    let mut requests = Vec::new(); // (arrive s, depart s, watts)
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.random::<f64>()).ln() / 20.0;
        if t > horizon {
            break;
        }
        let duration = -(1.0 - rng.random::<f64>()).ln() * 0.4;
        requests.push((t, t + duration, 5.0 + 35.0 * rng.random::<f64>()));
    }
    let mut events: Vec<(f64, Event)> = Vec::new();
    for (i, &(a, d, _)) in requests.iter().enumerate() {
        events.push((a, Event::Arrive(i)));
        events.push((d, Event::Depart(i)));
    }
    let mut s = 0.0;
    while s < horizon + 5.0 {
        s += tick.as_secs_f64();
        events.push((s, Event::Tick));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));

    let t0 = Instant::now();
    let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
    let exact = EnergyMeter::new(Box::new(Virtual));
    let sampled = EnergyMeter::new(Box::new(Virtual));
    let mut exact_tickets = Vec::new();
    let mut sampled_tickets = Vec::new();
    exact_tickets.resize_with(requests.len(), || None);
    sampled_tickets.resize_with(requests.len(), || None);
    let mut exact_charge = vec![0.0; requests.len()];
    let mut sampled_charge = vec![0.0; requests.len()];
    let (mut joules, mut watts, mut last) = (0.0, 30.0, 0.0);
    for (time, event) in events {
        joules += watts * (time - last);
        last = time;
        let now = at(time);
        exact.settle_at(joules, now);
        match event {
            Event::Tick => sampled.settle_at(joules, now),
            Event::Arrive(i) => {
                exact_tickets[i] = Some(exact.begin_at(now));
                sampled_tickets[i] = Some(sampled.begin_at(now));
                watts += requests[i].2;
            }
            Event::Depart(i) => {
                if let Some(ticket) = exact_tickets[i].take() {
                    exact_charge[i] = exact.end_at(ticket, now).joules;
                }
                if let Some(ticket) = sampled_tickets[i].take() {
                    sampled_charge[i] = sampled.end_at(ticket, now).joules;
                }
                watts -= requests[i].2;
            }
        }
    }
    (exact_charge, sampled_charge)
}

fn attribution_error() {
    println!("\nattribution error of sampled metering against reading at every boundary");
    println!(
        "{:>10} {:>9} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "sample ms",
        "requests",
        "mean |err|",
        "p50 |err|",
        "p95 |err|",
        "max |err|",
        "total charged"
    );
    for ms in [10, 50, 100] {
        let (exact, sampled) = simulate(Duration::from_millis(ms), 7);
        let mut errors: Vec<f64> = exact
            .iter()
            .zip(&sampled)
            .filter(|(e, _)| **e > 0.0)
            .map(|(e, s)| (s - e).abs() / e)
            .collect();
        errors.sort_by(f64::total_cmp);
        let q = |p: f64| errors[((errors.len() - 1) as f64 * p) as usize] * 100.0;
        let mean = errors.iter().sum::<f64>() / errors.len() as f64 * 100.0;
        let total_exact: f64 = exact.iter().sum();
        let total_sampled: f64 = sampled.iter().sum();
        println!(
            "{ms:>10} {:>9} {mean:>11.2}% {:>11.2}% {:>11.2}% {:>11.2}% {:>+13.3}%",
            errors.len(),
            q(0.5),
            q(0.95),
            q(1.0),
            (total_sampled - total_exact) / total_exact * 100.0
        );
    }
    println!();
}

fn benches(c: &mut Criterion) {
    attribution_error();
    cost(c);
}

criterion_group!(meter, benches);
criterion_main!(meter);
