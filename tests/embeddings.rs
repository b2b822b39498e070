//! `POST /v1/embeddings`: the default all-MiniLM-L6-v2 in-process (fetched into the model cache
//! on first use, SHA-256 checked), and an `openai` embeddings model passed through to a scripted
//! upstream on loopback. Equality with an independent numpy implementation on the same weights
//! is checked end to end with the official `openai` client (scripts/e2e_openai.py).

mod support;

use serde_json::{json, Value};
use support::{backend, header, sample, Gateway};
use wattgate_testkit::{Behavior, ScriptedUpstream};

/// An `openai` embeddings model named `remote` on `url`, with `extra` keys.
fn remote(url: &str, extra: &str) -> String {
    format!(
        "[[embeddings]]\nname = \"remote\"\nkind = \"openai\"\nmodel = \"text-embedding-3-small\"\nbase_url = \"{url}\"\nparameters = 1e9\n{extra}\n"
    )
}

async fn post(gw: &Gateway, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/embeddings"))
        .json(body)
        .send()
        .await
        .expect("gateway reachable")
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .expect("floats")
                .iter()
                .map(|x| x.as_f64().expect("float") as f32)
                .collect()
        })
        .collect()
}

fn decode_base64(s: &str) -> Vec<f32> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let mut bytes = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let n = chunk.iter().fold(0u32, |n, c| (n << 6) | value(*c));
        let pad = chunk.iter().filter(|c| **c == b'=').count();
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        bytes.extend_from_slice(&three[..3 - pad]);
    }
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn the_embedded_encoder_batches_pads_and_encodes_faithfully() {
    let local = ScriptedUpstream::start("m", vec![Behavior::Reply("x".into())])
        .await
        .expect("upstream");
    let gw = Gateway::start(&backend("local", "local", &local.base_url(), "")).await;
    let texts = [
        "A man is playing a guitar.",
        "Someone is playing the guitar.",
        "The central bank raised interest rates again, citing inflation that has stayed well above its target for two years.",
    ];
    // One request of three inputs of different lengths, padded into one batch...
    let r = post(&gw, &json!({"model": "all-minilm-l6-v2", "input": texts})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-wattgate-backend"), "all-minilm-l6-v2");
    assert_eq!(header(&r, "x-wattgate-route"), "local");
    let batch: Value = r.json().await.expect("JSON");
    let together = vectors(&batch);
    assert_eq!(together.len(), 3);
    assert!(together.iter().all(|v| v.len() == 384));
    for v in &together {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised: {norm}");
    }
    assert!(cosine(&together[0], &together[1]) > 0.7);
    assert!(cosine(&together[0], &together[2]) < 0.2);
    // ...equals each input alone (padding is masked out), and base64 equals floats.
    let mut tokens = 0;
    for (i, t) in texts.iter().enumerate() {
        let alone: Value = post(
            &gw,
            &json!({"model": "all-minilm-l6-v2", "input": t, "encoding_format": "base64"}),
        )
        .await
        .json()
        .await
        .expect("JSON");
        let v = decode_base64(alone["data"][0]["embedding"].as_str().expect("base64"));
        let worst = v
            .iter()
            .zip(&together[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "input {i}: batched and alone differ by {worst}"
        );
        tokens += alone["usage"]["prompt_tokens"].as_u64().expect("tokens");
    }
    assert_eq!(batch["usage"]["prompt_tokens"].as_u64(), Some(tokens));
    // Token ids are this encoder's word pieces: the text's own ids give the text's vector.
    let ids: Vec<u32> = vec![1037, 2158, 2003, 2652, 1037, 2858, 1012]; // "a man is playing a guitar."
    let by_ids: Value = post(&gw, &json!({"model": "all-minilm-l6-v2", "input": [ids]}))
        .await
        .json()
        .await
        .expect("JSON");
    let worst = vectors(&by_ids)[0]
        .iter()
        .zip(&together[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "token ids and text differ by {worst}");
    // Metered: tokens, joules and the counterfactual, per model.
    let m = gw.metrics().await;
    let labels = [("model", "all-minilm-l6-v2")];
    assert_eq!(
        sample(
            &m,
            "wattgate_embeddings_requests_total",
            &[("model", "all-minilm-l6-v2"), ("outcome", "ok")]
        ),
        5.0
    );
    let counted = sample(&m, "wattgate_embeddings_tokens_total", &labels);
    assert_eq!(counted as u64, 2 * tokens + 9);
    assert!(
        sample(
            &m,
            "wattgate_embeddings_counterfactual_cost_dollars_total",
            &labels
        ) > 0.0
    );
    assert!(
        m.contains("wattgate_embeddings_energy_joules_total{model=\"all-minilm-l6-v2\",source=")
    );
    // In the ledger: five local rows, each with its tokens, the energy meter's joules, the
    // encoder's FLOPs (2 x 22.7M parameters a token) and a cloud price as the counterfactual.
    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let rows = support::ledger_rows(&path);
    assert_eq!(rows.len(), 5);
    let mut ledger_tokens = 0;
    for row in &rows {
        assert_eq!(
            (
                row.route.as_str(),
                row.reason.as_str(),
                row.backend.as_str()
            ),
            ("local", "embeddings", "all-minilm-l6-v2")
        );
        assert!(row.bill.local_joules > 0.0, "{row:?}");
        assert!((row.bill.flops - 2.0 * 22.7e6 * row.input_tokens as f64).abs() < 1.0);
        // No published cloud figure for an embedding's energy: the counterfactual takes the
        // request's own, so only the cost saved moves.
        let cf = row.bill.counterfactual.expect("counterfactual");
        assert!(cf.usd > 0.0, "{cf:?}");
        assert_eq!(
            (cf.joules, cf.flops),
            (row.bill.local_joules, row.bill.flops)
        );
        ledger_tokens += row.input_tokens;
    }
    assert_eq!(ledger_tokens, counted as u64);
}

#[tokio::test]
async fn bad_embeddings_requests_get_a_400_naming_the_field() {
    let local = ScriptedUpstream::start("m", vec![Behavior::Reply("x".into())])
        .await
        .expect("upstream");
    let gw = Gateway::start(&backend("local", "local", &local.base_url(), "")).await;
    for (body, status, param) in [
        (
            json!({"model": "all-minilm-l6-v2", "input": "x", "dimensions": 256}),
            400,
            "dimensions",
        ),
        (
            json!({"model": "all-minilm-l6-v2", "input": []}),
            400,
            "input",
        ),
        (
            json!({"model": "all-minilm-l6-v2", "input": [[99999999]]}),
            400,
            "input",
        ),
        (
            json!({"model": "all-minilm-l6-v2", "input": "x", "encoding_format": "int8"}),
            400,
            "encoding_format",
        ),
        (json!({"model": "all-minilm-l6-v2"}), 400, "input"),
        (json!({"model": "local", "input": "x"}), 404, "model"),
    ] {
        let r = post(&gw, &body).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.expect("JSON");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
}

#[tokio::test]
async fn an_openai_embeddings_model_is_passed_through() {
    let up = ScriptedUpstream::start(
        "text-embedding-3-small",
        vec![Behavior::Reply(String::new())],
    )
    .await
    .expect("upstream");
    let toml = format!(
        "{}{}",
        backend("local", "local", &up.base_url(), ""),
        remote(&up.base_url(), "")
    );
    let gw = Gateway::start(&toml).await;
    let r = post(
        &gw,
        &json!({"model": "remote", "input": ["one two", "three"], "dimensions": 3}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(vectors(&v), vec![vec![0.0, 2.0, 1.0], vec![1.0, 1.0, 1.0]]);
    let sent = up.requests();
    assert_eq!(sent[0].path, "/v1/embeddings");
    assert_eq!(sent[0].body["model"], "text-embedding-3-small");
    assert_eq!(sent[0].body["dimensions"], 3, "passed through as sent");
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "wattgate_embeddings_tokens_total",
            &[("model", "remote")]
        ),
        3.0
    );
    // Only the configured model is listed: the default encoder is replaced, not added to.
    let models: Value = reqwest::get(gw.url("/v1/models"))
        .await
        .expect("get")
        .json()
        .await
        .expect("JSON");
    let embeddings: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|m| m["kind"] == "embeddings")
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(embeddings, ["remote"]);
}

/// Embeddings requests are charged to the client's rate limits, which chat shares, and each
/// one, served or failed, has its ledger row with its tokens and what it cost.
#[tokio::test]
async fn embeddings_count_against_rate_limits_and_are_in_the_ledger() {
    let up = ScriptedUpstream::start(
        "text-embedding-3-small",
        vec![
            Behavior::Reply(String::new()),
            Behavior::server_error("embedder down"),
        ],
    )
    .await
    .expect("upstream");
    let chat = ScriptedUpstream::start("local", vec![Behavior::Reply("hi".into())])
        .await
        .expect("chat upstream");
    let toml = format!(
        "[limits]\nrequests_per_minute = 3\n[ledger]\nflush_interval_s = 0.05\n{}{}",
        backend("local", "local", &chat.base_url(), ""),
        remote(&up.base_url(), "cloud_usd_per_million_tokens = 20.0")
    );
    let gw = Gateway::start(&toml).await;
    let ok = post(
        &gw,
        &json!({"model": "remote", "input": ["one two", "three"]}),
    )
    .await;
    assert_eq!(ok.status(), 200);
    let failed = post(&gw, &json!({"model": "remote", "input": "four"})).await;
    assert_eq!(failed.status(), 502, "the upstream's 500");
    // One chat request spends the third of the minute's three; the next embeddings request is
    // refused before reaching the upstream.
    assert_eq!(
        gw.post_chat(&support::chat_body("local", "hello"))
            .await
            .status(),
        200
    );
    let refused = post(&gw, &json!({"model": "remote", "input": "five"})).await;
    let e = support::expect_error(refused, 429).await;
    assert_eq!(e["code"], "rate_limit_exceeded", "{e}");
    assert_eq!(
        (up.hits(), chat.hits()),
        (2, 1),
        "the refused request reached no upstream"
    );

    let path = gw.ledger.clone();
    let _dir = gw.stop().await;
    let rows = support::ledger_rows(&path);
    let embedded: Vec<_> = rows.iter().filter(|r| r.reason == "embeddings").collect();
    assert_eq!(embedded.len(), 2, "{rows:?}");
    let (ok, failed) = (embedded[0], embedded[1]);
    assert_eq!(
        (ok.backend.as_str(), ok.route.as_str(), ok.status),
        ("remote", "cloud", 200)
    );
    assert_eq!((ok.outcome.as_str(), ok.input_tokens), ("ok", 3));
    // 3 tokens at $20 per million: spent, and the counterfactual.
    assert!((ok.bill.cloud_usd - 60e-6).abs() < 1e-12, "{:?}", ok.bill);
    assert_eq!(
        ok.bill.counterfactual.map(|c| c.usd),
        Some(ok.bill.cloud_usd)
    );
    assert_eq!((failed.outcome.as_str(), failed.status), ("error", 502));
}
