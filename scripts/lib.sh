# Shared by the scripts that start wattgate and its scripted upstreams on loopback:
# `source scripts/lib.sh` (from the repository root) gives
#   $work            a temporary folder, removed on exit
#   run_bg CMD...    starts CMD in the background; every such process is killed on exit
#   free_port        prints a free TCP port on 127.0.0.1
#   openai_venv      makes target/e2e-venv with the official `openai` and `anthropic` packages
#                    (and numpy + tokenizers for the embeddings reference); sets $VENV
work=$(mktemp -d)
_wattgate_pids=()
_wattgate_cleanup() {
  for p in "${_wattgate_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap _wattgate_cleanup EXIT

run_bg() { "$@" & _wattgate_pids+=($!); }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

openai_venv() {
  VENV=target/e2e-venv
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'openai>=1.66,<3' 'anthropic>=0.40,<1' \
    'numpy>=1.26' 'tokenizers>=0.19'
}

# wrk_json LABEL CONNECTIONS PORT
#   Runs wrk for $secs seconds with $work/post.lua against the gateway's chat endpoint on PORT
#   and prints its summary as one JSON line: requests/s, p50/p90/p99 in ms, non-2xx count.
wrk_json() { # LABEL CONNECTIONS PORT
  local threads=$(( $2 < 2 ? 1 : 2 ))
  wrk -t"$threads" -c"$2" -d"${secs}s" --latency -s "$work/post.lua" "http://127.0.0.1:$3/v1/chat/completions" |
    python3 -c '
import json, re, sys
text = sys.stdin.read()
def ms(v, unit):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
out = {"label": sys.argv[1], "connections": int(sys.argv[2])}
out["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
for p in ("50", "90", "99"):
    m = re.search(r"^\s+" + p + r"%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    out["p" + p] = ms(*m.groups())
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
out["errors"] = int(bad.group(1)) if bad else 0
print(json.dumps(out))' "$1" "$2"
}

# start_priced_pair LOCAL_FAIL_EVERY LOCAL_FAIL_STATUS CLOUD_FAIL_EVERY CLOUD_FAIL_STATUS
#   Starts a scripted local upstream (20 ms per answer) and a cloud one (40 ms, priced like
#   gpt-4.1), each failing every n-th request with the given status (0: never), and the release
#   gateway between them with its ledger in $work, an experiment (prefer-local against a
#   cloud-only control) and shadow checks on; waits until it is healthy. Needs $BIN; sets
#   $GW_PORT.
start_priced_pair() {
  local local_port cloud_port
  local_port=$(free_port); cloud_port=$(free_port); GW_PORT=$(free_port)
  run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$local_port" --model local-model \
    --reply "A short local answer to the question." --delay-ms 20 \
    --fail-every "$1" --fail-status "$2" >/dev/null
  run_bg "$BIN/wattgate-upstream" --listen "127.0.0.1:$cloud_port" --model cloud-model \
    --reply "A longer cloud answer to the question, with more words in it." --delay-ms 40 \
    --fail-every "$3" --fail-status "$4" >/dev/null
  cat >"$work/wattgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[ledger]
path = "$work/ledger.redb"
flush_interval_s = 0.5
[shadow]
sample_rate = 0.1
budget_usd_per_hour = 5.0

# Routed requests split between serving locally and a cloud-only control, so the dashboard's
# experiment row has data; shadow checks grade a tenth of the local answers.
[[experiments]]
name = "local-vs-cloud"
unit = "request"
control = "cloud-only"
[[experiments.arms]]
name = "cloud-only"
policy = "cloud_only"
[[experiments.arms]]
name = "prefer-local"
policy = "prefer_local"

[[backends]]
name = "local"
kind = "openai"
role = "local"
base_url = "http://127.0.0.1:$local_port/v1"
model = "local-model"
parameters = 8e9
max_context = 2048

[[backends]]
name = "cloud"
kind = "openai"
role = "cloud"
base_url = "http://127.0.0.1:$cloud_port/v1"
model = "cloud-model"
parameters = 235e9
active_parameters = 22e9
usd_per_million_input_tokens = 2.0
usd_per_million_output_tokens = 8.0
TOML
  WATTGATE_LOG=error run_bg "$BIN/wattgate" serve --config "$work/wattgate.toml"
  python3 scripts/wait_http.py "http://127.0.0.1:$GW_PORT/healthz" 20
}

# replay_load SECONDS ROUTED_RPS CLOUD_RPS
#   Replays the shared chat prompts (a fixed prompt without ../shared) at the gateway: requests
#   for the routing alias and requests pinned to the cloud, at the same time.
replay_load() {
  local prompts=../shared/data/traffic/chat-prompts.jsonl routed
  [ -f "$prompts" ] || prompts=""
  "$BIN/wattgate-loadgen" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --rate "$2" \
    --duration "$1" --warmup 0 --label routed ${prompts:+--prompts "$prompts"} &
  routed=$!
  "$BIN/wattgate-loadgen" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --rate "$3" \
    --duration "$1" --warmup 0 --model cloud --label cloud ${prompts:+--prompts "$prompts"}
  wait "$routed"
}
