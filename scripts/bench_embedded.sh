#!/usr/bin/env bash
# Embedded Gemma 3 270M against llama.cpp on the same GGUF, prompt and machine, at 1 and 2
# threads: model load, prefill and decode tokens/s, peak RSS, and the ratios.
#
#   scripts/bench_embedded.sh [DECODE_TOKENS]      (default 64)
#
# llama.cpp comes from the llama-cpp-python package built from source into target/llamacpp-venv
# (first run: several minutes). AMX is disabled: this VM reports AMX but does not grant its use,
# and llama.cpp's AMX path crashes there.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-64}
cargo build --release -q --example bench_embedded
MODEL=$(cargo run --release -q -- models pull 2>/dev/null)
VENV=target/llamacpp-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  python3 -m venv "$VENV"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    "$VENV/bin/pip" install -q --no-cache-dir --no-binary llama-cpp-python 'llama-cpp-python==0.3.*' numpy
fi
PROMPT=$(python3 -c "
import json
with open('../shared/data/traffic/chat-prompts.jsonl') as f:
    print(json.loads(f.readlines()[3])['messages'][0]['content'][:700])" 2>/dev/null || echo "Explain why the sky is blue in three short paragraphs, mentioning Rayleigh scattering.")
results=()
for threads in 1 2; do
  ours=$(RAYON_NUM_THREADS=$threads target/release/examples/bench_embedded "$MODEL" "$PROMPT" "$N")
  ref=$("$VENV/bin/python" scripts/llama_cpp_speed.py "$MODEL" "$PROMPT" "$N" "$threads" 2>/dev/null)
  echo "threads=$threads $ours"; echo "threads=$threads $ref"
  results+=("$threads" "$ours" "$ref")
done
python3 - "${results[@]}" <<'PY'
import json, sys
a = sys.argv[1:]
print(f"\n{'threads':>7} {'metric':>16} {'wattgate':>10} {'llama.cpp':>10} {'ratio':>7} target")
for i in range(0, len(a), 3):
    t, o, r = a[i], json.loads(a[i+1]), json.loads(a[i+2])
    for key, target, higher in (("prefill_tok_s", ">= 0.8x", True), ("decode_tok_s", ">= 1.0x", True)):
        print(f"{t:>7} {key:>16} {o[key]:>10.1f} {r[key]:>10.1f} {o[key]/r[key]:>7.2f} {target}")
    print(f"{t:>7} {'peak_rss_mb':>16} {o['peak_rss_mb']:>10.0f} {r['peak_rss_mb']:>10.0f} {'':>7} <= 600 MB")
    print(f"{t:>7} {'load_s':>16} {o['load_s']:>10.2f} {r['load_s']:>10.2f} {'':>7} <= 1.5 s")
    same = 0
    for ours_id, ref_id in zip(o["greedy_ids"], r["greedy_ids"]):
        if ours_id != ref_id:
            break
        same += 1
    print(f"{t:>7} {'greedy agreement':>16} first {same} of {min(len(o['greedy_ids']), len(r['greedy_ids']))} tokens identical")
PY
