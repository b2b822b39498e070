//! The `wattgate` binary itself: config errors at start, and graceful shutdown on SIGTERM.

mod support;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::apis::{for_each_api, Api};
use support::{backend, chat_body};
use wattgate_testkit::{Behavior, ScriptedUpstream};

const BIN: &str = env!("CARGO_BIN_EXE_wattgate");

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write config");
    f
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn an_invalid_config_fails_at_start_naming_the_key() {
    let cases = [
        (
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_body = 5\n",
            "max_body",
        ),
        ("[routing]\npolicy = \"fastest\"\n", "policy"),
        (
            &backend(
                "a",
                "local",
                "http://127.0.0.1:9/v1",
                "first_byte_timeout_s = -1",
            ),
            "backends[0].first_byte_timeout_s",
        ),
        (&backend("a", "local", "not a url", ""), "base_url"),
    ];
    for (text, key) in cases {
        let config = write_config(text);
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config.path())
            .output()
            .expect("run wattgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {stderr}");
        assert!(stderr.contains(key), "stderr should name {key}: {stderr}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/wattgate.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/wattgate.toml"));
}

#[test]
fn config_check_accepts_the_shipped_config() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/wattgate.toml");
    let out = Command::new(BIN)
        .args(["config", "check", "--config", shipped])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("valid")
            && stdout.contains("gemma-3-270m")
            && stdout.contains("OPENAI_API_KEY"),
        "{stdout}"
    );
}

struct Daemon {
    child: Child,
    port: u16,
    _config: tempfile::NamedTempFile,
    _data: tempfile::TempDir,
}

impl Daemon {
    async fn start(config_text: &str) -> Self {
        let config = write_config(config_text);
        let port = free_port();
        // The ledger's default location is under XDG_DATA_HOME: one per daemon, never $HOME.
        let data = tempfile::tempdir().expect("tempdir");
        let child = Command::new(BIN)
            .env("XDG_DATA_HOME", data.path())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--config",
            ])
            .arg(config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn wattgate");
        let daemon = Self {
            child,
            port,
            _config: config,
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if reqwest::get(daemon.url("/healthz"))
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return daemon;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("daemon did not become healthy");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn sigterm_finishes_in_flight_requests_then_exits(api: Api) {
    let up = ScriptedUpstream::start(
        "u",
        vec![Behavior::slow(
            Duration::from_millis(1500),
            "finished despite shutdown",
        )],
    )
    .await
    .expect("upstream");
    let mut daemon = Daemon::start(&backend("cloud", "cloud", &up.base_url(), "")).await;

    let url = daemon.url(api.path());
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&api.body("hi", false))
            .send()
            .await?
            .text()
            .await
    });
    while up.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    daemon.sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // New connections are refused while the in-flight request is still being served.
    let fresh = reqwest::Client::new()
        .get(daemon.url("/healthz"))
        .send()
        .await;
    assert!(
        fresh.is_err(),
        "accepted a new connection after SIGTERM: {fresh:?}"
    );

    let body = in_flight
        .await
        .expect("join")
        .expect("in-flight request completed");
    assert_eq!(api.text_of(false, &body), "finished despite shutdown");
    let status = daemon.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_millis(1000),
        "exited before the request finished"
    );
}

// Shutdown holds for an in-flight request of every API.
for_each_api!(multi_thread: sigterm_finishes_in_flight_requests_then_exits);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_waiting_at_the_grace_deadline() {
    let up = ScriptedUpstream::start("u", vec![Behavior::slow(Duration::from_secs(60), "never")])
        .await
        .expect("upstream");
    let config = format!(
        "[server]\nshutdown_grace_s = 0.5\n{}",
        backend("cloud", "cloud", &up.base_url(), "")
    );
    let mut daemon = Daemon::start(&config).await;
    let url = daemon.url("/v1/chat/completions");
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&chat_body("auto", "hi"))
            .send()
            .await
    });
    while up.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    daemon.sigterm();
    let status = daemon.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
    let waited = signalled.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(
        in_flight.await.expect("join").is_err(),
        "the hung request was cut at the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_router_files() {
    let up = ScriptedUpstream::start("u", vec![Behavior::Reply("hi".into())])
        .await
        .expect("upstream");
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("router-models");
    let routers = tempfile::tempdir().expect("tempdir");
    let live = routers.path().join("live");
    let install = |name: &str| {
        std::fs::create_dir_all(&live).expect("mkdir");
        for f in ["router.json", "weights.bin"] {
            std::fs::copy(shipped.join(name).join(f), live.join(f)).expect("copy router");
        }
    };
    install("8b-class");
    let config = format!(
        "[routing]\npolicy = \"router\"\nrouter_dir = \"{}\"\n{}{}",
        routers.path().display(),
        backend("local", "local", &up.base_url(), "router = \"live\""),
        backend("cloud", "cloud", &up.base_url(), "")
    );
    let daemon = Daemon::start(&config).await;
    let p_local = || async {
        let response = reqwest::Client::new()
            .post(daemon.url("/v1/chat/completions"))
            .json(&chat_body("auto", "Explain how a bicycle stays upright."))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        support::header(&response, "x-wattgate-p-local")
    };
    let before = p_local().await;
    install("llama-3.1-8b-instruct");
    // The files alone change nothing until the daemon is told.
    assert_eq!(p_local().await, before);
    let ok = Command::new("kill")
        .args(["-HUP", &daemon.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while p_local().await == before {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the router"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = reqwest::get(daemon.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("wattgate_router_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
}
