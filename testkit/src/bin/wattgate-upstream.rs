//! A standalone OpenAI-compatible upstream for scripts and load tests: answers every chat request
//! with a fixed reply (JSON or SSE), optionally after a delay, or with a scripted native answer
//! (`--native`, for Responses and Messages requests the gateway passes through). Prints its address on stdout.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use wattgate_testkit::{Behavior, ScriptedUpstream};

#[derive(Parser)]
#[command(about = "Scripted OpenAI-compatible upstream on loopback")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Model name reported in responses.
    #[arg(long, default_value = "testkit-model")]
    model: String,
    /// Assistant reply text (streamed word by word for stream requests).
    #[arg(long, default_value = "Hello from the wattgate testkit upstream.")]
    reply: String,
    /// Delay before answering, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Answer every n-th request with `--fail-status` instead (0: never).
    #[arg(long, default_value_t = 0)]
    fail_every: usize,
    /// The failure status: 500 (server error) or 429 (rate limited, Retry-After: 1).
    #[arg(long, default_value_t = 500)]
    fail_status: u16,
    /// Answer every request with this file's native answer instead of `--reply`: a JSON object
    /// `{"whole": <answer>, "events": [<event data>...]}` (see `Behavior::Native`).
    #[arg(long)]
    native: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let reply = match &args.native {
        None => Behavior::Reply(args.reply),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--native {}: {e}", path.display()))?;
            let mut v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("--native {}: {e}", path.display()))?;
            let events = match v.get_mut("events").map(serde_json::Value::take) {
                Some(serde_json::Value::Array(events)) => events,
                _ => anyhow::bail!("--native {}: needs an `events` array", path.display()),
            };
            let whole = v.get_mut("whole").map(serde_json::Value::take);
            let Some(whole) = whole.filter(serde_json::Value::is_object) else {
                anyhow::bail!("--native {}: needs a `whole` object", path.display())
            };
            Behavior::Native { whole, events }
        }
    };
    let behavior = if args.delay_ms > 0 {
        Behavior::Delay(Duration::from_millis(args.delay_ms), Box::new(reply))
    } else {
        reply
    };
    let upstream = if args.fail_every > 0 {
        let failure = match args.fail_status {
            429 => Behavior::rate_limited(1),
            500 => Behavior::server_error("scripted failure"),
            other => anyhow::bail!("--fail-status must be 500 or 429, got {other}"),
        };
        let mut script = vec![behavior; args.fail_every - 1];
        script.push(failure);
        ScriptedUpstream::start_cycling(args.listen, &args.model, script).await?
    } else {
        ScriptedUpstream::start_on(args.listen, &args.model, vec![behavior], false).await?
    };
    println!("{}", upstream.base_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
