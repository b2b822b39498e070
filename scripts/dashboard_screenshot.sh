#!/usr/bin/env bash
# The built-in savings page in a real browser: starts scripted local and cloud upstreams and the
# gateway, replays the shared chat prompts for LOAD_S seconds (default 30), opens
# /dashboard?since=2m&step=5s in headless Chromium, checks that the page loaded its data and drew
# chart points, and saves a screenshot.
#
#   scripts/dashboard_screenshot.sh [OUT.png]     (default target/dashboard.png; installs
#                                                  Debian's chromium if missing: root)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-target/dashboard.png}")
LOAD_S=${LOAD_S:-30}
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROMIUM" ]; then
  echo "installing Debian's chromium package"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  CHROMIUM=$(command -v chromium)
fi

cargo build --release -q -p wattgate -p wattgate-testkit --bins
BIN=target/release
source scripts/lib.sh
start_priced_pair 12 500 0 500
echo "replaying load for ${LOAD_S}s"
replay_load "$LOAD_S" 20 5 >/dev/null
sleep 1

URL="http://127.0.0.1:$GW_PORT/dashboard?since=2m&step=5s"
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1300
       --virtual-time-budget=8000 --user-data-dir="$work/chromium")
"$CHROMIUM" "${flags[@]}" --dump-dom "$URL" 2>/dev/null >"$work/dom.html"
ready=$(grep -o 'data-ready="[a-z]*"' "$work/dom.html" | head -1)
drawn=$(grep -o 'data-points="[0-9]*"' "$work/dom.html" | grep -o '[0-9]*' | head -1)
if [ "$ready" != 'data-ready="true"' ] || [ "${drawn:-0}" -lt 10 ]; then
  echo "the dashboard did not render its data: $ready, ${drawn:-0} chart points" >&2
  exit 1
fi
mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" "${flags[@]}" --screenshot="$OUT" "$URL" 2>/dev/null
[ -s "$OUT" ] || { echo "no screenshot written" >&2; exit 1; }
echo "dashboard rendered ${drawn} chart points; screenshot: $OUT"
