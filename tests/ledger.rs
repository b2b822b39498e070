//! The ledger under a crash: kill -9 the daemon in the middle of 1,000 requests, restart it on
//! the same file, and check that every request that completed more than one flush interval
//! before the kill is there, that the file opens cleanly, and that `wattgate report` totals
//! (through the restarted daemon and from the file) equal the sum of the rows.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{backend, chat_body};
use wattgate::ledger::Ledger;
use wattgate_testkit::{Behavior, ScriptedUpstream};

const BIN: &str = env!("CARGO_BIN_EXE_wattgate");
const REQUESTS: usize = 1_000;
const FLUSH_INTERVAL_S: f64 = 0.2;
/// Time a batch may take to commit (fsync) after its interval ends, on a slow CI disk.
const COMMIT_SLACK: Duration = Duration::from_millis(300);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn spawn_daemon(config: &Path, port: u16) -> Child {
    Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(config)
        .env("WATTGATE_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wattgate")
}

async fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("daemon did not become healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_at_most_the_last_flush_interval() {
    // 40 ms per answer, 16 at a time: ~400 requests/s, so the kill lands ~1.5 s in.
    let local = ScriptedUpstream::start(
        "local",
        vec![Behavior::slow(Duration::from_millis(40), "a short answer")],
    )
    .await
    .expect("upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger_path = dir.path().join("ledger.redb");
    let config_path = dir.path().join("wattgate.toml");
    std::fs::write(
        &config_path,
        format!(
            "[ledger]\npath = \"{}\"\nflush_interval_s = {FLUSH_INTERVAL_S}\n[metering]\nenergy_meter = \"estimate\"\n{}",
            ledger_path.display(),
            backend("local", "local", &local.base_url(), "")
        ),
    )
    .expect("write config");
    let port = free_port();
    let mut daemon = spawn_daemon(&config_path, port);
    wait_healthy(port).await;

    // 1,000 requests, 16 at a time; each completion is timed. Kill -9 after 600.
    let completed: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (completed, next, client, url) =
            (completed.clone(), next.clone(), client.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= REQUESTS {
                    return;
                }
                let id = format!("load-{i}");
                let sent = client
                    .post(&url)
                    .header("x-request-id", &id)
                    .json(&chat_body("auto", "what is two plus two"))
                    .send()
                    .await;
                let Ok(response) = sent else { return };
                if response.status() == 200 && response.bytes().await.is_ok() {
                    completed.lock().expect("lock").push((id, Instant::now()));
                }
            }
        }));
    }
    while completed.lock().expect("lock").len() < 600 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let killed = Command::new("kill")
        .args(["-KILL", &daemon.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let kill_time = Instant::now();
    let _ = daemon.wait();
    for w in workers {
        let _ = w.await;
    }
    let bound = kill_time - Duration::from_secs_f64(FLUSH_INTERVAL_S) - COMMIT_SLACK;
    let must_have: HashSet<String> = completed
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, t)| *t < bound)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        must_have.len() >= 100,
        "too few requests completed well before the kill ({}) for the check to mean anything",
        must_have.len()
    );

    // Restart on the same file: it opens (not corrupted) and serves savings from it.
    let port = free_port();
    let mut daemon = spawn_daemon(&config_path, port);
    wait_healthy(port).await;
    let savings: Value = reqwest::get(format!("http://127.0.0.1:{port}/v1/savings"))
        .await
        .expect("savings")
        .json()
        .await
        .expect("json");
    let served_rows = savings["savings"]["total"]["requests"]
        .as_u64()
        .unwrap_or(0);
    // `wattgate report` while the daemon holds the file goes through the daemon.
    let config_arg = config_path
        .to_string_lossy()
        .replace("wattgate.toml", "wattgate-report.toml");
    std::fs::write(
        &config_arg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[ledger]\npath = \"{}\"\n",
            ledger_path.display()
        ),
    )
    .expect("write report config");
    let via_daemon = Command::new(BIN)
        .args(["report", "--format", "json", "--config", &config_arg])
        .output()
        .expect("report");
    assert!(
        via_daemon.status.success(),
        "{}",
        String::from_utf8_lossy(&via_daemon.stderr)
    );
    assert!(
        String::from_utf8_lossy(&via_daemon.stderr).contains("held by the running daemon"),
        "report should say it asked the daemon"
    );
    let report: Value = serde_json::from_slice(&via_daemon.stdout).expect("report JSON");
    assert_eq!(report["total"]["requests"].as_u64(), Some(served_rows));
    let stopped = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let _ = daemon.wait();

    let rows = Ledger::open(&ledger_path)
        .expect("the ledger reopens after kill -9")
        .rows_since(0)
        .expect("rows");
    assert_eq!(rows.len() as u64, served_rows);
    let have: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    let missing: Vec<&String> = must_have
        .iter()
        .filter(|id| !have.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} requests completed before the last flush interval are missing, e.g. {:?}",
        missing.len(),
        must_have.len(),
        missing.first()
    );
    eprintln!(
        "kill -9 after {} completions: {} completed before the last flush interval, all {} in the ledger of {} rows",
        completed.lock().map(|c| c.len()).unwrap_or(0),
        must_have.len(),
        must_have.len(),
        rows.len()
    );
    // Rows are whole: every one is a completed request with its tokens.
    assert!(rows.iter().all(|r| r.status == 200 && r.output_tokens == 3));

    // And the report from the file equals the sum of its rows.
    let from_file = Command::new(BIN)
        .args(["report", "--format", "json", "--ledger"])
        .arg(&ledger_path)
        .output()
        .expect("report");
    assert!(
        from_file.status.success(),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    let report: Value = serde_json::from_slice(&from_file.stdout).expect("report JSON");
    assert_eq!(
        report["total"]["requests"].as_u64(),
        Some(rows.len() as u64)
    );
    let sum_out: u64 = rows.iter().map(|r| r.output_tokens).sum();
    assert_eq!(report["total"]["output_tokens"].as_u64(), Some(sum_out));
    let sum_flops: f64 = rows.iter().map(|r| r.bill.flops).sum();
    let flops = report["total"]["compute_flops"]["actual"]
        .as_f64()
        .unwrap_or(-1.0);
    assert!(
        (flops - sum_flops).abs() <= 1e-9 * sum_flops,
        "{flops} vs {sum_flops}"
    );
    let sum_j: f64 = rows.iter().map(|r| r.bill.local_joules).sum();
    let local_j = report["total"]["local_joules_by_source"]["estimate"]
        .as_f64()
        .unwrap_or(-1.0);
    assert!(
        (local_j - sum_j).abs() <= 1e-9 * sum_j.max(1e-9),
        "{local_j} vs {sum_j}"
    );
}
