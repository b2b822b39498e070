//! The embedded Gemma 3 backend through the real gateway on loopback: local answers with real
//! usage, determinism, stop strings and max_tokens, and the fallbacks to the cloud that keep
//! requests from waiting or failing (context too long, queue full, unsupported features).

mod support;

use serde_json::{json, Value};
use support::apis::{for_each_api, Api};
use support::{chat_body, header, sample, Gateway};
use wattgate_testkit::{Behavior, ScriptedUpstream};

/// The embedded backend's config; `extra` adds keys (max_tokens defaults to 32 here).
fn embedded(extra: &str) -> String {
    let path = support::gemma_gguf();
    let cap = if extra.contains("max_tokens") {
        ""
    } else {
        "max_tokens = 32\n"
    };
    format!(
        "[[backends]]\nname = \"gemma\"\nkind = \"embedded\"\nrole = \"local\"\nmodel = \"gemma-3-270m\"\ngguf = \"{}\"\nparameters = 268e6\n{cap}{extra}\n",
        path.display()
    )
}

async fn with_cloud(extra: &str) -> (ScriptedUpstream, Gateway) {
    let cloud = ScriptedUpstream::start(
        "cloud-upstream",
        vec![Behavior::Reply("from the cloud".into())],
    )
    .await
    .expect("cloud");
    let config = format!(
        "{}{}",
        embedded(extra),
        support::backend("cloud", "cloud", &cloud.base_url(), "")
    );
    (cloud, Gateway::start(&config).await)
}

fn greedy(text: &str, max_tokens: u64) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_locally_without_any_cloud_key_streaming_and_not() {
    // The embedded backend alone: no cloud configured at all.
    let gw = Gateway::start(&embedded("")).await;
    let reply = gw
        .openai()
        .chat()
        .create(support::user_request("auto", "Name a fruit."))
        .await
        .expect("completion");
    assert_eq!(reply.model, "gemma-3-270m");
    let usage = reply.usage.expect("usage");
    assert!(
        usage.prompt_tokens > 5 && usage.completion_tokens > 0,
        "{usage:?}"
    );
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    assert!(!reply.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default()
        .is_empty());

    let raw = gw.post_chat(&greedy("Name a fruit.", 8)).await;
    assert_eq!(header(&raw, "x-wattgate-route"), "local");
    assert_eq!(header(&raw, "x-wattgate-backend"), "gemma");

    let streamed =
        support::stream_with_usage(&gw, support::user_request("auto", "Name a color.")).await;
    let usage = streamed.usage.expect("usage chunk");
    assert!(usage.completion_tokens > 0);
    assert!(
        streamed.chunks as u64 >= 3,
        "role, deltas, finish, usage: {}",
        streamed.chunks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_is_deterministic_and_so_is_a_seed() {
    let gw = Gateway::start(&embedded("")).await;
    let text = |v: Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let a = text(
        gw.post_chat(&greedy("Write a sentence about rivers.", 24))
            .await
            .json()
            .await
            .expect("json"),
    );
    let b = text(
        gw.post_chat(&greedy("Write a sentence about rivers.", 24))
            .await
            .json()
            .await
            .expect("json"),
    );
    assert_eq!(a, b);
    assert!(!a.is_empty());
    let seeded = json!({"model": "auto", "messages": [{"role": "user", "content": "Tell me a word."}], "temperature": 1.0, "seed": 42, "max_tokens": 12});
    let c = text(gw.post_chat(&seeded).await.json().await.expect("json"));
    let d = text(gw.post_chat(&seeded).await.json().await.expect("json"));
    assert_eq!(c, d, "same seed, same sample");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_and_stop_strings_hold() {
    let gw = Gateway::start(&embedded("")).await;
    let v: Value = gw
        .post_chat(&greedy("Count from one to twenty in words.", 5))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Generate freely, then stop at a word from the middle of that same greedy output.
    let free: Value = gw
        .post_chat(&greedy("Count from one to twenty in words.", 40))
        .await
        .json()
        .await
        .expect("json");
    let full = free["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(
        words.len() >= 4,
        "need some words to pick a stop string from: {full:?}"
    );
    let stop = words[words.len() / 2];
    let cut_at = full.find(stop).expect("stop word is in the text");
    let mut body = greedy("Count from one to twenty in words.", 40);
    body["stop"] = json!([stop]);
    let v: Value = gw.post_chat(&body).await.json().await.expect("json");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        full[..cut_at],
        "text up to the stop string, without it"
    );

    // The same through a stream.
    body["stream"] = json!(true);
    let text = gw.post_chat(&body).await.text().await.expect("stream");
    let content: String = text
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|f| *f != "[DONE]")
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, full[..cut_at]);
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_prompts_use_the_gemma_turn_format() {
    let gw = Gateway::start(&embedded("")).await;
    let body = json!({"model": "auto", "temperature": 0, "max_tokens": 1, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}
    ]});
    let v: Value = gw.post_chat(&body).await.json().await.expect("json");
    // <bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n
    // <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n — counted with the reference tokenizer.
    let header =
        wattgate::backends::candle::gguf::read_header(&support::gemma_gguf()).expect("header");
    let tokenizer = wattgate::backends::candle::tokenizer::GgufTokenizer::from_gguf(&header)
        .expect("tokenizer");
    let rendered = "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n";
    assert_eq!(
        v["usage"]["prompt_tokens"],
        tokenizer.encode(rendered).expect("encode").len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_over_the_context_goes_to_the_cloud() {
    let (cloud, gw) = with_cloud("max_context = 64").await;
    let long = "word ".repeat(200);
    let r = gw.post_chat(&chat_body("auto", &long)).await;
    assert_eq!(header(&r, "x-wattgate-route"), "cloud");
    assert_eq!(header(&r, "x-wattgate-reason"), "context_too_long");
    assert_eq!(
        r.json::<Value>().await.expect("json")["choices"][0]["message"]["content"],
        "from the cloud"
    );
    assert_eq!(cloud.hits(), 1);
    // Pinned to the local model, the same request is a clear 400.
    let e = support::expect_error(gw.post_chat(&chat_body("gemma", &long)).await, 400).await;
    assert_eq!(e["code"], "context_length_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_the_local_model_lacks_go_to_the_cloud() {
    let (cloud, gw) = with_cloud("").await;
    let mut body = chat_body("auto", "What's the weather?");
    body["tools"] =
        json!([{"type": "function", "function": {"name": "weather", "parameters": {}}}]);
    // The router's hard constraints send it to the cloud without trying the local model...
    let r = gw.post_chat(&body).await;
    assert_eq!(header(&r, "x-wattgate-reason"), "needs_tools");
    assert_eq!(cloud.hits(), 1);
    // ...and when a client forces it local, the embedded backend refuses it itself, before any
    // output, so it still falls back.
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("x-wattgate-route", "local")
        .json(&body)
        .send()
        .await
        .expect("gateway reachable");
    assert_eq!(header(&r, "x-wattgate-reason"), "local_unsupported");
    assert_eq!(cloud.hits(), 2);
    let mut body = chat_body("auto", "x");
    body["messages"] = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]);
    assert_eq!(
        header(&gw.post_chat(&body).await, "x-wattgate-reason"),
        "needs_images"
    );
}

async fn a_full_queue_sends_the_excess_to_the_cloud_and_loses_nothing(api: Api) {
    // One sequence at a time, so the queue's limits are what is tested.
    let (cloud, gw) =
        with_cloud("workers = 1\nmax_batch = 1\nqueue_depth = 1\nqueue_timeout_s = 30").await;
    let client = reqwest::Client::new();
    let url = gw.url(api.path());
    let requests = (0..6).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let body = api.greedy(&format!("Story {i}:"), true, 48);
            let r = client.post(url).json(&body).send().await.expect("send");
            let route = header(&r, "x-wattgate-route");
            let reason = header(&r, "x-wattgate-reason");
            let sent = support::apis::Sent {
                status: r.status().as_u16(),
                headers: r.headers().clone(),
                body: r.text().await.expect("body"),
            };
            // Complete: the API's closing event (or `[DONE]`) after some text.
            let complete = api.failure_code(&sent, true).is_none()
                && !api.text_of(true, &sent.body).is_empty();
            (sent.status, route, reason, complete)
        }
    });
    let results = futures::future::join_all(requests).await;
    for (status, _, _, complete) in &results {
        assert_eq!(*status, 200);
        assert!(complete, "every stream completed: {results:?}");
    }
    let local = results.iter().filter(|r| r.1 == "local").count();
    let busy = results.iter().filter(|r| r.2 == "local_busy").count();
    assert!(
        (1..=2).contains(&local),
        "one running + one queued at most: {results:?}"
    );
    assert_eq!(local + busy, 6, "{results:?}");
    assert_eq!(cloud.hits(), busy);
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "wattgate_fallbacks_total",
            &[("from", "gemma"), ("to", "cloud"), ("kind", "busy")]
        ),
        busy as f64
    );
}

async fn a_queued_request_gives_up_at_the_queue_deadline_not_when_a_worker_frees(api: Api) {
    // One worker (of one sequence) busy with a long generation; the queue has room, so the next request waits
    // in it, and must fall back when queue_timeout_s passes, long before the worker is free.
    // 256 tokens take seconds here, the deadline is 0.3 s.
    let (cloud, gw) = with_cloud(
        "workers = 1\nmax_batch = 1\nqueue_depth = 4\nqueue_timeout_s = 0.3\nmax_tokens = 256",
    )
    .await;
    let client = reqwest::Client::new();
    // The server accepts once the model is loaded: wait for that, so that the long request
    // surely reaches the worker first.
    client.get(gw.url("/readyz")).send().await.expect("readyz");
    let url = gw.url(api.path());
    let long = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&api.greedy("Write a long story about a lighthouse keeper.", false, 256))
                .send()
                .await
                .expect("send");
            let route = header(&r, "x-wattgate-route");
            let body: Value = r.json().await.expect("json");
            (route, api.output_tokens(&body))
        })
    };
    // Let the long request reach the worker first.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = client
        .post(url)
        .json(&api.greedy("Say hi.", false, 8))
        .send()
        .await
        .expect("send");
    assert_eq!(header(&r, "x-wattgate-route"), "cloud");
    assert_eq!(header(&r, "x-wattgate-reason"), "local_busy");
    assert_eq!(cloud.hits(), 1);
    assert!(
        !long.is_finished(),
        "the fallback came back while the worker was still generating"
    );
    let (route, tokens) = long.await.expect("join");
    assert_eq!(route, "local");
    assert!(tokens.unwrap_or(0) > 32, "a long generation: {tokens:?}");
}

// The embedded queue's rows hold on every API.
for_each_api!(multi_thread:
    a_full_queue_sends_the_excess_to_the_cloud_and_loses_nothing,
    a_queued_request_gives_up_at_the_queue_deadline_not_when_a_worker_frees,
);

/// The reply's text, whole or streamed, from the chat API.
async fn chat_text(gw: &Gateway, body: Value) -> String {
    let r = gw.post_chat(&body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A series of an embedded backend named `gemma`.
async fn gemma_series(gw: &Gateway, name: &str, what: (&str, &str)) -> f64 {
    sample(&gw.metrics().await, name, &[("backend", "gemma"), what])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_greedy_generation_is_identical_to_one_at_a_time() {
    // No prefix reuse: the second run of each prompt must compute it again, batched.
    let gw = Gateway::start(&embedded(
        "max_batch = 8\nqueue_depth = 8\nprefix_cache_mb = 0",
    ))
    .await;
    let prompts = [
        "Name a fruit.",
        "Write a sentence about rivers and the sea, the mountains they come from, and the towns along them.",
        "What is 12 times 7?",
        "List three colors.",
        "Describe a cat in one line.",
        "Explain, in a few words, why the sky looks blue during the day but red at sunset.",
        "Say hello.",
        "Give a synonym for happy.",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(chat_text(&gw, greedy(p, 24)).await);
    }
    let steps = "wattgate_local_batch_steps_total";
    let steps0 = gemma_series(&gw, steps, ("what", "steps")).await;
    let seqs0 = gemma_series(&gw, steps, ("what", "sequences")).await;
    let together =
        futures::future::join_all(prompts.iter().map(|p| chat_text(&gw, greedy(p, 24)))).await;
    let steps1 = gemma_series(&gw, steps, ("what", "steps")).await;
    let seqs1 = gemma_series(&gw, steps, ("what", "sequences")).await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(!a.is_empty(), "prompt {i} answered");
        assert_eq!(a, t, "prompt {i}: alone vs batched");
    }
    let mean = (seqs1 - seqs0) / (steps1 - steps0);
    assert!(
        mean >= 2.0,
        "the 8 requests ran in shared steps: {} sequences in {} steps",
        seqs1 - seqs0,
        steps1 - steps0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_cache_hit_answers_exactly_as_a_miss() {
    let warm = Gateway::start(&embedded("")).await;
    let cold = Gateway::start(&embedded("prefix_cache_mb = 0")).await;
    let system = "You are a careful assistant for a public library. Answer in one short sentence, \
                  name your source when you can, and never invent opening hours or titles.";
    let turn = |history: &[(&str, &str)], max_tokens: u64| {
        let messages: Vec<Value> = std::iter::once(json!({"role": "system", "content": system}))
            .chain(
                history
                    .iter()
                    .map(|(role, text)| json!({"role": role, "content": text})),
            )
            .collect();
        json!({"model": "auto", "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    };
    let first = turn(&[("user", "Where can I find books about birds?")], 20);
    let a1 = chat_text(&warm, first.clone()).await;
    let conversations = [
        // The same request again: all but its last token from the cache.
        first.clone(),
        // Another question under the same system prompt.
        turn(&[("user", "Do you lend audiobooks?")], 20),
        // The first conversation, one turn later.
        turn(
            &[
                ("user", "Where can I find books about birds?"),
                ("assistant", &a1),
                ("user", "And about fish?"),
            ],
            20,
        ),
    ];
    assert_eq!(
        a1,
        chat_text(&cold, first.clone()).await,
        "the first request"
    );
    for (i, body) in conversations.iter().enumerate() {
        let hit = chat_text(&warm, body.clone()).await;
        assert!(!hit.is_empty());
        assert_eq!(
            hit,
            chat_text(&cold, body.clone()).await,
            "request {i}: hit vs miss"
        );
    }
    let lookups = "wattgate_local_prefix_cache_lookups_total";
    assert_eq!(
        gemma_series(&warm, lookups, ("result", "hit")).await,
        3.0,
        "every later request resumed"
    );
    assert_eq!(gemma_series(&warm, lookups, ("result", "miss")).await, 1.0);
    let reused = sample(
        &warm.metrics().await,
        "wattgate_local_prefix_reused_tokens_total",
        &[("backend", "gemma")],
    );
    assert!(
        reused > 60.0,
        "the system prompt and the history were reused: {reused}"
    );
    assert_eq!(gemma_series(&cold, lookups, ("result", "hit")).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_leaves_frees_its_keys_and_values() {
    use futures::StreamExt;
    let gw = Gateway::start(&embedded("max_tokens = 400")).await;
    let kv = ("what", "kv_reserved_bytes");
    let body = json!({"model": "auto", "stream": true, "temperature": 0, "max_tokens": 400,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]});
    let r = gw.post_chat(&body).await;
    assert_eq!(r.status(), 200);
    let mut chunks = r.bytes_stream();
    for _ in 0..3 {
        chunks.next().await.expect("a chunk").expect("bytes");
    }
    let held = gemma_series(&gw, "wattgate_local_batch", kv).await;
    assert!(held > 1e6, "400 positions reserved: {held} bytes");
    drop(chunks);
    // 400 tokens take several seconds here; the reservation must go at the next step.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let (held, running) = (
            gemma_series(&gw, "wattgate_local_batch", kv).await,
            gemma_series(&gw, "wattgate_local_batch", ("what", "sequences")).await,
        );
        if held == 0.0 && running == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {held} bytes reserved by {running} sequences"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_budget_sends_requests_to_the_cloud_never_running_out_of_memory() {
    // Gemma 3 270M keeps 36,864 bytes of f32 keys and values a position (under 512
    // positions): a ~20-token prompt with 256 output tokens reserves about 10 MB, so 12 MB
    // holds one such request and not two, and one asking 400 tokens (15 MB) never fits.
    let (cloud, gw) =
        with_cloud("kv_cache_mb = 12\nmax_tokens = 400\nqueue_timeout_s = 0.5\nmax_batch = 8")
            .await;
    let client = reqwest::Client::new();
    client.get(gw.url("/readyz")).send().await.expect("readyz");
    let ask = |text: &str, max_tokens: u64| {
        let (client, url, body) = (
            client.clone(),
            gw.url("/v1/chat/completions"),
            greedy(text, max_tokens),
        );
        async move {
            let r = client.post(url).json(&body).send().await.expect("send");
            let (route, reason) = (
                header(&r, "x-wattgate-route"),
                header(&r, "x-wattgate-reason"),
            );
            assert_eq!(r.status(), 200);
            (route, reason)
        }
    };
    let too_big = ask("Tell me about the moon.", 400).await;
    assert_eq!(too_big, ("cloud".to_owned(), "local_busy".to_owned()));
    let long = tokio::spawn(ask("Write a long story about a lighthouse keeper.", 256));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second = ask("Write a long story about a dragon.", 256).await;
    assert_eq!(second, ("cloud".to_owned(), "local_busy".to_owned()));
    assert!(
        !long.is_finished(),
        "the second gave up while the first ran"
    );
    assert_eq!(long.await.expect("join").0, "local");
    assert_eq!(cloud.hits(), 2);
    // With the first finished, the budget is free again.
    assert_eq!(ask("Say hi.", 256).await.0, "local");
}
