#!/usr/bin/env bash
# End-to-end check with the official Python `openai` and `anthropic` packages: starts scripted
# upstreams (local, cloud, and a local that fails every request) and two real gateways on
# loopback (one of them falls back), then runs scripts/e2e_openai.py (chat, Responses and
# embeddings, the last against scripts/minilm_reference.py) and
# scripts/e2e_anthropic.py (Messages) against them.
#
#   scripts/e2e_openai_python.sh
#
# Creates a virtualenv in target/e2e-venv (reused on later runs).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q -p wattgate -p wattgate-testkit --bins
BIN=target/debug
source scripts/lib.sh
openai_venv
LOCAL_PORT=$(free_port); CLOUD_PORT=$(free_port); GW_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$LOCAL_PORT" --model local-model --reply "local says hello" >/dev/null
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$CLOUD_PORT" --model cloud-model --reply "cloud says hello" >/dev/null
cat >"$work/wattgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[ledger]
path = "$work/ledger.redb"

[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$LOCAL_PORT/v1"
model = "local-model"
parameters = 1e9

[[backends]]
name = "cloud"
kind = "openai"
role = "cloud"
base_url = "http://127.0.0.1:$CLOUD_PORT/v1"
model = "cloud-model"
parameters = 1e11
TOML
WATTGATE_LOG=warn run_bg "$BIN/wattgate" serve --config "$work/wattgate.toml"

# A second gateway: its local upstream answers 500 to every request, and its cloud speaks
# Anthropic's Messages API (kind = "anthropic", the same scripted upstream's /v1/messages).
FAILING_PORT=$(free_port); FB_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$FAILING_PORT" --model local-model --fail-every 1 --fail-status 500 >/dev/null
cat >"$work/fallback.toml" <<TOML
[server]
listen = "127.0.0.1:$FB_PORT"
[ledger]
path = "$work/fallback.redb"
flush_interval_s = 0.2

[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$FAILING_PORT/v1"
model = "local-model"
parameters = 1e9

[[backends]]
name = "claude"
kind = "anthropic"
role = "cloud"
base_url = "http://127.0.0.1:$CLOUD_PORT/v1"
model = "claude-test"
parameters = 1e11
usd_per_million_input_tokens = 3.0
usd_per_million_output_tokens = 15.0
TOML
WATTGATE_LOG=error run_bg "$BIN/wattgate" serve --config "$work/fallback.toml"
# A third gateway, a local backend and two clouds that speak the client's API natively: Anthropic
# ("claude", the alias's cloud) and an OpenAI backend with api = "responses" ("gpt"). Their upstreams answer every
# request with a scripted tool call (scripts/fixtures/), which the gateway must relay untouched.
NATIVE_M_PORT=$(free_port); NATIVE_R_PORT=$(free_port); NATIVE_PORT=$(free_port)
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$NATIVE_M_PORT" --model claude-test --native scripts/fixtures/native_messages_tool_use.json >/dev/null
run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$NATIVE_R_PORT" --model gpt-test --native scripts/fixtures/native_responses_function_call.json >/dev/null
cat >"$work/native.toml" <<TOML
[server]
listen = "127.0.0.1:$NATIVE_PORT"
[ledger]
enabled = false

[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$LOCAL_PORT/v1"
model = "local-model"
parameters = 1e9

[[backends]]
name = "claude"
kind = "anthropic"
role = "cloud"
base_url = "http://127.0.0.1:$NATIVE_M_PORT/v1"
model = "claude-test"
parameters = 1e11

[[backends]]
name = "gpt"
kind = "openai"
api = "responses"
role = "cloud"
base_url = "http://127.0.0.1:$NATIVE_R_PORT/v1"
model = "gpt-test"
parameters = 1e11
TOML
WATTGATE_LOG=error run_bg "$BIN/wattgate" serve --config "$work/native.toml"
python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/healthz" 20
python3 scripts/wait_http.py "http://127.0.0.1:$FB_PORT/healthz" 20
python3 scripts/wait_http.py "http://127.0.0.1:$NATIVE_PORT/healthz" 20

# The embeddings check compares the gateway's vectors with a numpy reference on the same files.
MINILM_DIR=$(scripts/fetch_minilm.sh)
"$VENV/bin/python" scripts/e2e_openai.py "http://127.0.0.1:$GW_PORT/v1" "http://127.0.0.1:$FB_PORT/v1" "$MINILM_DIR" "http://127.0.0.1:$NATIVE_PORT/v1"
"$VENV/bin/python" scripts/e2e_anthropic.py "http://127.0.0.1:$GW_PORT" "http://127.0.0.1:$FB_PORT" "http://127.0.0.1:$NATIVE_PORT"

# The embedded model's logprobs, through a second gateway whose only backend is the embedded
# default (fetched into the model cache by the Rust tests, or here on first use).
EMB_PORT=$(free_port)
cat >"$work/embedded.toml" <<TOML
[server]
listen = "127.0.0.1:$EMB_PORT"
[ledger]
enabled = false

[[backends]]
name = "gemma-3-270m"
kind = "embedded"
role = "local"
model = "gemma-3-270m"
parameters = 268e6
TOML
WATTGATE_LOG=warn run_bg "$BIN/wattgate" serve --config "$work/embedded.toml"
python3 scripts/wait_http.py "http://127.0.0.1:$EMB_PORT/healthz" 120
"$VENV/bin/python" scripts/e2e_logprobs.py "http://127.0.0.1:$EMB_PORT/v1"
