//! `POST /v1/responses` beyond the fault matrix: conversations continued by
//! `previous_response_id`, in memory and, with `ledger.store_prompts`, across a restart.

mod support;

use serde_json::{json, Value};
use support::{backend, Gateway};
use wattgate_testkit::{Behavior, ScriptedUpstream};

async fn upstream(name: &str, script: Vec<Behavior>) -> ScriptedUpstream {
    ScriptedUpstream::start(name, script)
        .await
        .expect("upstream")
}

/// Posts `body` to `/v1/responses`: status and body text.
async fn post(gw: &Gateway, body: &Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(gw.url("/v1/responses"))
        .json(body)
        .send()
        .await
        .expect("gateway reachable");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test]
async fn a_follow_up_response_sends_the_whole_conversation_upstream() {
    let local = upstream("local-model", vec![Behavior::Reply("Blue".into())]).await;
    let gw = Gateway::start(&backend("local", "local", &local.base_url(), "")).await;
    let (status, first) = post(
        &gw,
        &json!({"model": "auto", "input": "Name a colour.", "instructions": "One word."}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let id = serde_json::from_str::<Value>(&first).expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, second) = post(
        &gw,
        &json!({"model": "auto", "input": "Another?", "previous_response_id": id, "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert!(second.contains("response.completed"), "{second}");
    let sent = local.requests();
    assert_eq!(
        sent[1].body["messages"],
        json!([{"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": "Blue"},
               {"role": "user", "content": "Another?"}]),
        "the second turn carries the first (without its instructions, as OpenAI documents)"
    );
}

/// Starts a gateway on `ledger` (a path that outlives it) with `store_prompts` as given.
async fn on_ledger(
    local: &ScriptedUpstream,
    ledger: &std::path::Path,
    store_prompts: bool,
) -> Gateway {
    Gateway::start(&format!(
        "[ledger]\npath = \"{}\"\nflush_interval_s = 0.1\nstore_prompts = {store_prompts}\n{}",
        ledger.display(),
        backend("local", "local", &local.base_url(), "")
    ))
    .await
}

#[tokio::test]
async fn with_store_prompts_a_conversation_survives_a_restart() {
    for store_prompts in [true, false] {
        let local = upstream("local-model", vec![Behavior::Reply("Blue".into())]).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = dir.path().join("ledger.redb");
        let gw = on_ledger(&local, &ledger, store_prompts).await;
        let (status, first) = post(&gw, &json!({"model": "auto", "input": "Name a colour."})).await;
        assert_eq!(status, 200, "{first}");
        let id = serde_json::from_str::<Value>(&first).expect("JSON")["id"]
            .as_str()
            .expect("id")
            .to_owned();
        gw.stop().await;
        let gw = on_ledger(&local, &ledger, store_prompts).await;
        let (status, second) = post(
            &gw,
            &json!({"model": "auto", "input": "Another?", "previous_response_id": id}),
        )
        .await;
        if store_prompts {
            assert_eq!(status, 200, "{second}");
            assert_eq!(
                local.requests()[1].body["messages"],
                json!([{"role": "user", "content": "Name a colour."},
                       {"role": "assistant", "content": "Blue"},
                       {"role": "user", "content": "Another?"}])
            );
        } else {
            // Without store_prompts the text never reached the disk: gone with the process.
            assert_eq!(status, 404, "{second}");
            let v: Value = serde_json::from_str(&second).expect("JSON");
            assert_eq!(v["error"]["code"], "previous_response_not_found");
        }
        gw.stop().await;
    }
}
