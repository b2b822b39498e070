//! The doors and the bounds: slow clients cannot lock anyone out (header and body deadlines,
//! the per-IP connection cap, the concurrency slot taken only once a body is in), and nothing a
//! client or an upstream sends can grow without bound (upstream bodies, SSE lines, roles).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{backend, chat_body, expect_error, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wattgate_testkit::{Behavior, ScriptedUpstream};

/// How a slow connection misbehaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slow {
    /// Complete headers, then a body one byte every 500 ms.
    Body,
    /// Headers one byte every 500 ms, never complete.
    Headers,
}

/// What a slow connection was told before it closed.
#[derive(Debug, PartialEq, Eq)]
enum Told {
    /// This status line's code.
    Status(u16),
    /// Nothing: closed or reset without a reply.
    Nothing,
}

async fn connect_from(local: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((local, 0)))?;
    socket.connect(to).await
}

/// Opens one slow connection from `local` and trickles until the server closes it; returns what
/// the server answered (read concurrently with the trickle).
async fn slow_client(local: [u8; 4], to: SocketAddr, kind: Slow) -> Told {
    let Ok(stream) = connect_from(local, to).await else {
        return Told::Nothing;
    };
    let (mut read, mut write) = stream.into_split();
    let body = r#"{"model":"cloud","messages":[{"role":"user","content":"slow"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let (first, rest): (Vec<u8>, Vec<u8>) = match kind {
        Slow::Body => (head.into_bytes(), body.as_bytes().to_vec()),
        Slow::Headers => {
            let bytes = head.into_bytes();
            (bytes[..10].to_vec(), bytes[10..bytes.len() - 4].to_vec())
        }
    };
    let trickle = tokio::spawn(async move {
        if write.write_all(&first).await.is_err() {
            return;
        }
        for byte in rest {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
        }
        // Never finishes: hold the connection open as a slow client would.
        std::future::pending::<()>().await;
    });
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut reply)).await;
    trickle.abort();
    let text = String::from_utf8_lossy(&reply);
    match text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
    {
        Some(code) => Told::Status(code),
        None => Told::Nothing,
    }
}

/// The Prometheus value of `wattgate_connections_refused_total{reason}`.
fn refused(metrics: &str, reason: &str) -> u64 {
    support::sample(
        metrics,
        "wattgate_connections_refused_total",
        &[("reason", reason)],
    ) as u64
}

/// Both ends of every connection live in this process: lift the soft descriptor limit (often
/// 1,024) toward the hard one so the test measures the gateway, not the test's own limit.
fn raise_open_file_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } == 0;
    assert!(
        got && now.rlim_cur >= want,
        "this test needs {want} open files; the limit is {} (raise it with ulimit -n)",
        now.rlim_cur
    );
}

/// A cloud upstream answering "fine" to every request, and the gateway in front of it with
/// `head` (TOML) before the backend table.
async fn behind_gateway(head: &str) -> (ScriptedUpstream, Gateway) {
    let cloud = ScriptedUpstream::start_cycling(
        "127.0.0.1:0".parse().expect("addr"),
        "cloud-upstream",
        vec![Behavior::Reply("fine".to_owned())],
    )
    .await
    .expect("upstream");
    let config = format!(
        "{head}\n{}",
        backend("cloud", "cloud", &cloud.base_url(), "")
    );
    let gw = Gateway::start(&config).await;
    (cloud, gw)
}

/// Held by the tests that load the machine (the floods, whose connections have both ends in
/// this process, and the 100 MiB and 10 MiB answers), so each runs alone and the 1 s bound
/// measures the gateway, not the tests competing for two cores.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What 2,200 slow connections from 127.0.0.3 were told, as the clients and Prometheus saw it.
struct Flood {
    body_408: usize,
    head_408: usize,
    refused_503: usize,
}

/// Opens 1,100 body-tricklers and 1,100 header-tricklers from 127.0.0.3 against a gateway with
/// `server.max_connections_per_ip = cap` while a client on 127.0.0.1 sends a request every
/// 100 ms; asserts that client got a 200 within 1 s every time, that every slow connection got
/// a 408 or a 503, and that Prometheus counted exactly those.
async fn flood(cap: usize) -> Flood {
    let _turn = ALONE.lock().await;
    raise_open_file_limit(2 * 2200 + 512);
    // Fewer concurrency slots than slow connections: were a slot taken before the body is
    // read, the body-tricklers alone would hold them all.
    let (cloud, gw) = behind_gateway(&format!(
        "[server]\nheader_timeout_s = 2.0\nbody_timeout_s = 3.0\nmax_connections_per_ip = {cap}\n[limits]\nmax_concurrent_requests = 64"
    ))
    .await;
    let addr = gw.addr;

    // The normal client, on 127.0.0.1: one request every 100 ms, each timed, until told to stop.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let url = gw.url("/v1/chat/completions");
    let normal = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut served = Vec::new();
        while !*stop_rx.borrow() {
            let started = Instant::now();
            let response = tokio::time::timeout(
                Duration::from_secs(5),
                http.post(&url).json(&chat_body("cloud", "hi")).send(),
            )
            .await;
            let status = match response {
                Ok(Ok(r)) => r.status().as_u16(),
                Ok(Err(e)) => panic!("the normal client's request failed: {e}"),
                Err(_) => 0,
            };
            served.push((status, started.elapsed()));
            let _ = tokio::time::timeout(Duration::from_millis(100), stop_rx.changed()).await;
        }
        served
    });

    // 1,100 of each kind from 127.0.0.3, interleaved, opened 100 at a time.
    let mut slow = Vec::new();
    for i in 0..2200 {
        let kind = if i % 2 == 0 {
            Slow::Body
        } else {
            Slow::Headers
        };
        slow.push((kind, tokio::spawn(slow_client([127, 0, 0, 3], addr, kind))));
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut told = Vec::new();
    for (kind, task) in slow {
        told.push((kind, task.await.expect("slow client task")));
    }
    // A second past the last deadline, the normal client is still being served.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    let served = normal.await.expect("normal client task");

    assert!(served.len() >= 20, "only {} normal requests", served.len());
    for (i, (status, took)) in served.iter().enumerate() {
        assert_eq!(
            *status, 200,
            "normal request {i} got {status} after {took:?}"
        );
        assert!(
            *took < Duration::from_secs(1),
            "normal request {i} took {took:?}"
        );
    }
    let count = |kind: Slow, what: Told| {
        told.iter()
            .filter(|(k, t)| *k == kind && *t == what)
            .count()
    };
    let (body_408, head_408) = (
        count(Slow::Body, Told::Status(408)),
        count(Slow::Headers, Told::Status(408)),
    );
    let refused_503 =
        count(Slow::Body, Told::Status(503)) + count(Slow::Headers, Told::Status(503));
    let other: Vec<_> = told
        .iter()
        .filter(|(_, t)| !matches!(t, Told::Status(408 | 503)))
        .collect();
    assert!(
        other.is_empty(),
        "{} slow connections got neither 408 nor 503, e.g. {:?}",
        other.len(),
        other.first()
    );
    let slowest = served.iter().map(|(_, t)| *t).max().unwrap_or_default();
    eprintln!(
        "per-IP cap {cap}: slow connections got {body_408} body and {head_408} header 408s, {refused_503} refused 503; normal client: {} requests, all 200, slowest {slowest:?}",
        served.len()
    );
    // Counted in Prometheus, exactly as the clients saw them.
    let metrics = gw.metrics().await;
    assert_eq!(
        refused(&metrics, "per_ip") as usize,
        refused_503,
        "{metrics}"
    );
    assert_eq!(refused(&metrics, "header_timeout") as usize, head_408);
    assert_eq!(refused(&metrics, "body_timeout") as usize, body_408);
    assert_eq!(
        cloud.hits(),
        served.len(),
        "no slow request reached the upstream"
    );
    Flood {
        body_408,
        head_408,
        refused_503,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_from_one_address_never_lock_out_a_client_on_another() {
    // The default cap: the first 256 are held to their deadlines, the rest refused at once.
    let f = flood(256).await;
    assert!(
        f.body_408 > 0 && f.head_408 > 0,
        "408s: {} body, {} header",
        f.body_408,
        f.head_408
    );
    assert!(f.refused_503 > 0, "the per-IP cap refused nobody");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_per_ip_cap_every_slow_connection_gets_408_at_its_deadline() {
    // The deadlines alone: all 2,200 are admitted, none holds a slot, each is cut at its
    // deadline, and the client on another address is still served throughout.
    let f = flood(0).await;
    assert_eq!((f.body_408, f.head_408, f.refused_503), (1100, 1100, 0));
}

#[tokio::test]
async fn a_body_in_time_is_served_and_an_idle_keep_alive_connection_closes_silently() {
    let (_cloud, gw) =
        behind_gateway("[server]\nheader_timeout_s = 1.0\nbody_timeout_s = 5.0").await;
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    let body = r#"{"model":"cloud","messages":[{"role":"user","content":"hi"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    // The body in two parts, 1.5 s apart: past the header deadline, within the body deadline.
    let (a, b) = body.split_at(10);
    stream.write_all(a.as_bytes()).await.expect("part 1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(b.as_bytes()).await.expect("part 2");
    let mut reply = vec![0u8; 64 * 1024];
    let n = stream.read(&mut reply).await.expect("reply");
    let text = String::from_utf8_lossy(&reply[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Then idle: closed after the header deadline, with no unsolicited 408.
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed within the deadline")
        .expect("read");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(started.elapsed() >= Duration::from_millis(500));
    let metrics = gw.metrics().await;
    assert_eq!(
        refused(&metrics, "header_timeout"),
        0,
        "an idle close is not a refusal"
    );
    // A body past its deadline is a 408 in the API's shape.
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(a.as_bytes()).await.expect("part 1");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .expect("answered within the body deadline")
        .expect("read");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("server.body_timeout_s"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
}

/// The daemon binary on a free loopback port with this config (after `listen`), until dropped.
struct Daemon {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(config: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("wattgate.toml");
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{config}"),
        )
        .expect("config");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_wattgate"))
            .env("XDG_DATA_HOME", dir.path())
            .env_remove("WATTGATE_LOG")
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the daemon");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{base}/healthz")).await.is_err() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            base,
            _dir: dir,
        }
    }

    /// Peak resident memory so far (`VmHWM`), in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_100_mib_upstream_answer_is_a_502_naming_the_cap_and_the_daemon_stays_small() {
    let _turn = ALONE.lock().await;
    let cloud = ScriptedUpstream::start(
        "cloud-upstream",
        vec![Behavior::Oversize {
            bytes: 100 * 1024 * 1024,
        }],
    )
    .await
    .expect("upstream");
    let daemon = Daemon::start(&format!(
        "[resilience]\nmax_retries = 0\n{}",
        backend("cloud", "cloud", &cloud.base_url(), "")
    ))
    .await;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", daemon.base))
        .json(&chat_body("cloud", "say a lot"))
        .send()
        .await
        .expect("the daemon answers");
    let error = expect_error(response, 502).await;
    let message = support::message(&error);
    assert!(message.contains("max_response_bytes = 67108864"), "{error}");
    let peak = daemon.peak_rss();
    eprintln!(
        "100 MiB upstream answer: 502 `{message}`; daemon peak RSS {:.1} MB",
        peak as f64 / 1e6
    );
    assert!(peak < 200_000_000, "peak RSS {peak} bytes");
}

#[tokio::test]
async fn a_10_mib_sse_line_ends_the_stream_with_an_error_frame() {
    let _turn = ALONE.lock().await;
    let cloud = ScriptedUpstream::start(
        "cloud-upstream",
        vec![Behavior::Oversize {
            bytes: 10 * 1024 * 1024,
        }],
    )
    .await
    .expect("upstream");
    let gw = Gateway::start(&format!(
        "[resilience]\nmax_retries = 0\n{}",
        backend("cloud", "cloud", &cloud.base_url(), "")
    ))
    .await;
    let mut body = chat_body("cloud", "stream a lot");
    body["stream"] = json!(true);
    let response = gw.post_chat(&body).await;
    assert_eq!(response.status().as_u16(), 200, "the stream opened");
    let text = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("the stream ends")
        .expect("read the stream");
    assert!(text.len() < 1024 * 1024, "{} bytes relayed", text.len());
    let frames: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("each frame is JSON"))
        .collect();
    assert!(
        frames
            .iter()
            .any(|f| f["choices"][0]["delta"]["content"] == "one"),
        "the good chunk is relayed: {text}"
    );
    let last = frames.last().expect("frames");
    assert_eq!(last["error"]["code"], "upstream_protocol_error", "{last}");
    let message = last["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("SSE line is longer than 1048576 bytes"),
        "{message}"
    );
    assert!(
        !text.contains("[DONE]"),
        "a failed stream does not claim to be done"
    );
}
