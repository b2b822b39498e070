//! Builds a synthetic ledger for benchmarks: `ROWS` rows spread evenly over the last `DAYS`
//! days, a mix of local and cloud answers over two backends and two experiment arms, with bills
//! shaped like real ones (cloud rows priced, local rows metered).
//!
//!     cargo run --release --example make_ledger -- PATH [ROWS=5000000] [DAYS=90]
//!
//! Used by `scripts/bench_savings.sh`. Rows are written through `Ledger::write` in
//! transactions of 20,000, so the per-minute and per-hour rollups are built as the daemon
//! would build them.

use std::time::Instant;

use wattgate::ledger::{now_us, Ledger, LedgerRow};
use wattgate::metering::{Bill, Counterfactual};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: make_ledger PATH [ROWS] [DAYS]")?;
    let rows: u64 = args.next().map_or(Ok(5_000_000), |a| a.parse())?;
    let days: f64 = args.next().map_or(Ok(90.0), |a| a.parse())?;
    let ledger = Ledger::open(std::path::Path::new(&path))?;
    let span_us = (days * 86_400e6) as u64;
    let start = now_us().saturating_sub(span_us);
    let step = (span_us / rows.max(1)).max(1);
    let began = Instant::now();
    let mut last_key = 0;
    let mut batch = Vec::with_capacity(20_000);
    for i in 0..rows {
        batch.push(row(i, start + i * step));
        if batch.len() == 20_000 || i + 1 == rows {
            ledger.write(&batch, &mut last_key)?;
            batch.clear();
        }
        if (i + 1).is_multiple_of(500_000) {
            eprintln!("{} rows in {:.0} s", i + 1, began.elapsed().as_secs_f64());
        }
    }
    eprintln!(
        "wrote {rows} rows over {days} days to {path} in {:.0} s",
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

fn row(i: u64, time_us: u64) -> LedgerRow {
    let local = !i.is_multiple_of(4);
    let input = 40 + i % 400;
    let output = 20 + i % 300;
    let cf = Counterfactual {
        joules: (input + output) as f64 * 0.6,
        flops: 2.0 * 2.2e10 * (input + output) as f64,
        usd: input as f64 * 2e-6 + output as f64 * 8e-6,
    };
    let bill = if local {
        Bill {
            local_joules: output as f64 * 0.45,
            flops: 2.0 * 2.7e8 * (input + output) as f64,
            local_usd: output as f64 * 0.45 * 0.165 / 3.6e6,
            counterfactual: Some(cf),
            ..Bill::default()
        }
    } else {
        Bill {
            local_joules: 0.01,
            cloud_joules: cf.joules,
            flops: cf.flops,
            cloud_usd: cf.usd,
            counterfactual: Some(cf),
            ..Bill::default()
        }
    };
    LedgerRow {
        time_us,
        request_id: format!("bench-{i:016x}"),
        route: if local { "local" } else { "cloud" }.to_owned(),
        backend: if local { "gemma" } else { "gpt-4.1" }.to_owned(),
        reason: if local {
            "router_local"
        } else {
            "router_cloud"
        }
        .to_owned(),
        experiment: i.is_multiple_of(2).then(|| "router-v2".to_owned()),
        arm: i.is_multiple_of(2).then(|| {
            if i.is_multiple_of(4) {
                "control"
            } else {
                "treatment"
            }
            .to_owned()
        }),
        p_local: Some((i % 100) as f64 / 100.0),
        fallback_from: None,
        status: 200,
        outcome: "ok".to_owned(),
        stream: i.is_multiple_of(3),
        input_tokens: input,
        output_tokens: output,
        tokens_source: "upstream".to_owned(),
        latency_s: 0.2 + (i % 50) as f64 / 100.0,
        ttft_s: Some(0.05),
        energy_source: "estimate".to_owned(),
        bill,
        guard: None,
        prompt: None,
    }
}
