//! `wattgate profile` against real loopback upstreams: exact energy attribution with a
//! scripted counter, grading end to end, a judge model, and resuming after `kill -9`.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use wattgate::config::Config;
use wattgate::metering::{EnergyCounter, EnergySource, Metering};
use wattgate::profile::{self, AnswerKeySource, Options, QueryRecord};
use wattgate_testkit::upstream::stream_frames;
use wattgate_testkit::{Behavior, ScriptedUpstream};

/// A counter whose reading is what the upstream has "spent": each answered request adds its
/// scripted joules, so a query's charge is exactly its own cost.
struct UpstreamCounter(Arc<AtomicU64>);

impl EnergyCounter for UpstreamCounter {
    fn source(&self) -> EnergySource {
        EnergySource::Rapl
    }
    fn read_joules(&self) -> Result<f64, String> {
        Ok(self.0.load(Ordering::SeqCst) as f64 / 1000.0)
    }
}

/// An upstream answering each prompt with a scripted text and a scripted energy cost
/// (millijoules added to the shared counter before it answers).
#[derive(Clone)]
struct Bank {
    answers: Arc<HashMap<String, (String, u64)>>,
    millijoules: Arc<AtomicU64>,
    hits: Arc<AtomicUsize>,
}

async fn answer(State(bank): State<Bank>, body: String) -> Response {
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let prompt = request["messages"][0]["content"].as_str().unwrap_or("");
    let Some((text, mj)) = bank.answers.get(prompt) else {
        return (axum::http::StatusCode::BAD_REQUEST, "unknown prompt").into_response();
    };
    bank.hits.fetch_add(1, Ordering::SeqCst);
    bank.millijoules.fetch_add(*mj, Ordering::SeqCst);
    let frames = stream_frames("bank", text, 10, true, true, usize::MAX);
    let stream = futures::stream::iter(
        frames
            .into_iter()
            .map(|f| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(f))),
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn start_bank(answers: HashMap<String, (String, u64)>) -> (String, Bank) {
    let bank = Bank {
        answers: Arc::new(answers),
        millijoules: Arc::new(AtomicU64::new(0)),
        hits: Arc::new(AtomicUsize::new(0)),
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(answer))
        .with_state(bank.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), bank)
}

fn write_lines(path: &Path, rows: &[Value]) {
    let mut f = std::fs::File::create(path).expect("create");
    for r in rows {
        writeln!(f, "{r}").expect("write");
    }
}

fn records(path: &Path) -> Vec<QueryRecord> {
    std::fs::read_to_string(path)
        .expect("queries.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a profile row"))
        .collect()
}

/// A profile run without progress output, with rows carrying their own answers.
async fn run_quietly(
    opts: &Options,
    backends: &profile::Backends,
    metering: &Metering,
) -> anyhow::Result<(profile::Summary, usize)> {
    profile::run(
        opts,
        backends,
        metering,
        AnswerKeySource::None,
        &mut |_| {},
        &mut |_| {},
    )
    .await
}

fn options(data: &Path, out: &Path) -> Options {
    Options {
        model: "local".to_owned(),
        data: data.to_owned(),
        limit: None,
        sample: None,
        concurrency: 1,
        out: out.to_owned(),
        max_tokens: Some(64),
        warmup: 1,
        judge: None,
        reference_model: None,
        router: None,
        guard_head: None,
    }
}

#[tokio::test]
async fn rows_carry_the_signals_and_confidence_the_guard_reads() {
    // A local server that returns logprobs when asked (every token ln P = -0.5).
    let local = wattgate_testkit::ScriptedUpstream::start(
        "local",
        vec![wattgate_testkit::Behavior::confident(
            "The answer is B.",
            -0.5,
        )],
    )
    .await
    .expect("upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.jsonl");
    let mc = "What is 2+2?\nA. 3\nB. 4\nAnswer:";
    write_lines(
        &data,
        &[
            json!({"id": "a", "source": "s1", "prompt": mc, "answer": "B"}),
            json!({"id": "b", "source": "s1", "prompt": format!("{mc} "), "answer": "A"}),
        ],
    );
    let config = Config::parse(&support::backend("local", "local", &local.base_url(), ""))
        .expect("test config");
    let out = dir.path().join("out");
    let opts = options(&data, &out);
    let metering = Metering::new(&config).expect("metering");
    let backends = profile::build_backends(&config, &opts).expect("backends");
    let (summary, failed) = run_quietly(&opts, &backends, &metering)
        .await
        .expect("profile runs");
    assert_eq!(failed, 0);
    let rows = records(&out.join(profile::QUERIES_FILE));
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let s = r.profile.signals.expect("signals recorded");
        assert_eq!(s.tokens, 4);
        assert!((s.mean + 0.5).abs() < 1e-6);
        // No guard head given: the rule, exp(mean ln P).
        let c = r.profile.confidence.expect("confidence");
        assert!((c - (-0.5f64).exp()).abs() < 1e-6);
        assert!(local
            .requests()
            .iter()
            .all(|q| q.body["logprobs"] == json!(true)));
    }
    let g = summary.guard.expect("guard ranking in the summary");
    assert_eq!(g.n, 2);
    // One right, one wrong, equal confidence: a tie ranks at 0.5.
    assert_eq!(g.confidence_auc, Some(0.5));
    assert_eq!(g.router_auc, None, "no router, no p_local");
}

#[tokio::test]
async fn each_query_gets_exactly_its_scripted_joules_and_its_grade() {
    let mc = "What is 2+2?\nA. 3\nB. 4\nC. 5\nAnswer:";
    let math = "Janet has 9 eggs and sells each for $2. How much does she make?";
    let capital = "What is the capital of France?";
    let echo = "What is 3+3?\nA. 5\nB. 6\nAnswer:";
    let answers = HashMap::from([
        (mc.to_owned(), ("The answer is B.".to_owned(), 1500)),
        (math.to_owned(), ("9 x 2 = 18 #### 18".to_owned(), 2250)),
        (capital.to_owned(), ("London".to_owned(), 750)),
        (
            echo.to_owned(),
            ("What is 3+3?\nA. 5\nB. 6".to_owned(), 3000),
        ),
    ]);
    let (url, bank) = start_bank(answers).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.jsonl");
    write_lines(
        &data,
        &[
            json!({"id": "mc", "source": "s1", "category": "math", "prompt": mc, "answer": "B", "scores": {"big": 1.0}}),
            json!({"id": "math", "source": "s2", "prompt": math, "answer": "She makes 9 * 2 = 18.\n#### 18"}),
            json!({"id": "capital", "source": "s2", "messages": [{"role": "user", "content": capital}], "answer": ["Paris", "Paris, France"]}),
            json!({"id": "echo", "source": "s1", "category": "math", "prompt": echo, "answer": "B"}),
        ],
    );
    let config = Config::parse(&support::backend("local", "local", &url, "")).expect("test config");
    let out = dir.path().join("out");
    let opts = options(&data, &out);
    let metering =
        Metering::with_counter(&config, Box::new(UpstreamCounter(bank.millijoules.clone())));
    let backends = profile::build_backends(&config, &opts).expect("backends");
    let mut seen = Vec::new();
    let (summary, failed) = profile::run(
        &opts,
        &backends,
        &metering,
        AnswerKeySource::None,
        &mut |p| seen.push(p.done),
        &mut |_| {},
    )
    .await
    .expect("profile runs");
    assert_eq!(failed, 0);
    // The warm-up ran the first query once more, unrecorded: its 1.5 J are idle, not charged.
    assert_eq!(bank.hits.load(Ordering::SeqCst), 5);
    assert_eq!(metering.totals().idle_joules, 1.5);
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);

    let rows = records(&out.join(profile::QUERIES_FILE));
    let by_id: HashMap<&str, &QueryRecord> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    for (id, joules, correct, extracted) in [
        ("mc", 1.5, true, Some("B")),
        ("math", 2.25, true, Some("18")),
        ("capital", 0.75, false, Some("london")),
        ("echo", 3.0, false, None),
    ] {
        let m = &by_id[id].profile;
        assert_eq!(m.joules, joules, "{id}");
        assert_eq!(m.correct, correct, "{id}");
        assert_eq!(m.extracted.as_deref(), extracted, "{id}");
        assert_eq!((m.energy_source.as_str(), m.measured), ("rapl", true));
        assert_eq!(m.tokens_source, "usage");
        assert_eq!(m.input_tokens, 10);
        assert!(m.ttft_s <= m.latency_s && m.latency_s > 0.0);
        assert!((m.watts - joules / m.latency_s).abs() < 1e-9);
        assert_eq!(by_id[id].scores["local"], if correct { 1.0 } else { 0.0 });
    }
    assert_eq!(
        by_id["mc"].scores["big"], 1.0,
        "the row's own labels are kept"
    );
    assert_eq!(by_id["capital"].prompt, capital);

    // Summary: hand-computed from the script.
    let all = &summary.overall;
    assert_eq!(all.queries, 4);
    assert_eq!(all.accuracy, 0.5);
    assert_eq!(all.joules_per_query, 7.5 / 4.0);
    assert_eq!(all.ipj, 0.5 / (7.5 / 4.0));
    assert_eq!(summary.by_source["s1"].joules_per_query, 2.25);
    assert_eq!(summary.by_source["s2"].accuracy, 0.5);
    assert_eq!(summary.by_category["math"].queries, 2);
    assert!(summary.measured);
    let written: profile::Summary = serde_json::from_str(
        &std::fs::read_to_string(out.join(profile::SUMMARY_FILE)).expect("summary.json"),
    )
    .expect("summary parses");
    assert_eq!(written, summary);
    let svg = std::fs::read_to_string(out.join(profile::CHART_FILE)).expect("chart");
    assert!(svg.starts_with("<svg") && svg.contains("s1") && svg.contains("s2"));

    // The per-query file is router training data as it is.
    let examples = wattgate::router::data::read_examples(&out.join(profile::QUERIES_FILE))
        .expect("router reads the profile");
    assert_eq!(examples.len(), 4);
    assert!(examples.iter().all(|e| e.scores.contains_key("local")));

    // A second run finds everything done and asks the upstream nothing (warm-up aside).
    let before = bank.hits.load(Ordering::SeqCst);
    let (again, _) = run_quietly(&opts, &backends, &metering)
        .await
        .expect("rerun");
    assert_eq!(bank.hits.load(Ordering::SeqCst), before);
    assert_eq!(again.overall, summary.overall);
}

#[tokio::test]
async fn open_ended_answers_are_judged_in_both_orders() {
    // The judge prefers whichever answer is first: local wins once, loses once -> 0.5.
    let local = ScriptedUpstream::start("local", vec![Behavior::Reply("Sure, here it is.".into())])
        .await
        .expect("local");
    let judge =
        ScriptedUpstream::start("judge", vec![Behavior::Reply("A is clearer. [[A]]".into())])
            .await
            .expect("judge");
    let reference = ScriptedUpstream::start(
        "reference",
        vec![Behavior::Reply("A reference answer.".into())],
    )
    .await
    .expect("reference");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("chat.jsonl");
    write_lines(
        &data,
        &[
            json!({"id": 1, "source": "chat", "messages": [{"role": "user", "content": "Write a haiku about rain."}]}),
        ],
    );
    let toml = format!(
        "{}{}{}",
        support::backend("local", "local", &local.base_url(), ""),
        support::backend("judge", "cloud", &judge.base_url(), ""),
        support::backend("reference", "cloud", &reference.base_url(), "")
    );
    let config = Config::parse(&toml).expect("config");
    let mut opts = options(&data, &dir.path().join("out"));
    opts.warmup = 0;
    opts.judge = Some("judge".to_owned());

    // Without a reference answer or a reference model the row cannot be judged.
    let backends = profile::build_backends(&config, &opts).expect("backends");
    let metering = Metering::with_counter(&config, Box::new(UpstreamCounter(Arc::default())));
    let (_, failed) = run_quietly(&opts, &backends, &metering).await.expect("run");
    assert_eq!(failed, 1);

    opts.reference_model = Some("reference".to_owned());
    let backends = profile::build_backends(&config, &opts).expect("backends");
    let (summary, failed) = run_quietly(&opts, &backends, &metering).await.expect("run");
    assert_eq!(failed, 0);
    assert_eq!(summary.overall.accuracy, 0.5);
    let rows = records(&opts.out.join(profile::QUERIES_FILE));
    assert_eq!(rows[0].id, "1");
    assert_eq!(rows[0].profile.extracted.as_deref(), Some("win/loss"));
    // The judge saw both orders: the local answer as A, then as B.
    let prompts: Vec<String> = judge
        .requests()
        .iter()
        .map(|r| {
            r.body["messages"][0]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(prompts.len(), 2);
    let a_first = |p: &str| p.find("Sure, here it is.") < p.find("A reference answer.");
    assert!(a_first(&prompts[0]) && !a_first(&prompts[1]), "{prompts:?}");
    // Cloud-estimated judge calls are not charged to the query: only the local answer is.
    assert_eq!(rows[0].profile.energy_source, "rapl");
}

// Multi-threaded: the test blocks on the CLI process while the upstream answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_where_it_stopped() {
    let upstream = ScriptedUpstream::start(
        "local",
        vec![Behavior::slow(Duration::from_millis(250), "B")],
    )
    .await
    .expect("upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.jsonl");
    let rows: Vec<Value> = (0..12)
        .map(|i| json!({"id": format!("q{i}"), "source": "s", "prompt": format!("Question {i}?\nA. no\nB. yes"), "answer": "B"}))
        .collect();
    write_lines(&data, &rows);
    let config = dir.path().join("wattgate.toml");
    std::fs::write(
        &config,
        format!(
            "[metering]\nenergy_meter = \"estimate\"\n[models]\ncache_dir = \"{}\"\n{}{}",
            dir.path().join("cache").display(),
            support::backend("local", "local", &upstream.base_url(), ""),
            support::backend("other", "local", &upstream.base_url(), "")
        ),
    )
    .expect("config");
    let out = dir.path().join("out");
    let queries = out.join(profile::QUERIES_FILE);
    let command = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_wattgate"));
        c.args(["profile", "--model", "local", "--warmup", "0", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let mut child = command().spawn().expect("spawn profile");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let lines = || {
        std::fs::read_to_string(&queries)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while lines() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "profile made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    let finished = lines();
    assert!(
        (4..12).contains(&finished),
        "{finished} rows before the kill"
    );
    // A write cut short by the kill leaves a partial last line; the rerun must drop it.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&queries)
        .and_then(|mut f| f.write_all(b"{\"id\": \"q1"))
        .expect("append a partial line");
    let hits_before = upstream.hits();

    let output = command().output().expect("rerun");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("resuming: {finished} of 12"))
            && stderr.contains("unfinished last line"),
        "{stderr}"
    );
    // Not a terminal: plain progress lines, ending with the whole run counted.
    let remaining = 12 - finished;
    assert!(
        stderr.contains(&format!("profile: {remaining}/{remaining} (100%)")),
        "{stderr}"
    );
    assert!(!stderr.contains('\r'), "no redrawn bar in a log: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("100.0%"), "{stdout}");
    let done = records(&queries);
    let mut ids: Vec<&str> = done.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((done.len(), ids.len()), (12, 12), "each id exactly once");
    assert_eq!(
        upstream.hits() - hits_before,
        12 - finished,
        "only the unfinished ones ran"
    );
    assert!(done
        .iter()
        .all(|r| r.profile.energy_source == "estimate" && !r.profile.measured));

    // Profiling another model into the same directory is refused.
    let other = std::process::Command::new(env!("CARGO_BIN_EXE_wattgate"))
        .args(["profile", "--model", "other", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("holds a profile of `local`, not `other`"),
        "{stderr}"
    );
}
