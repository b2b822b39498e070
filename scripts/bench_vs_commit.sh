#!/usr/bin/env bash
# Side by side: the criterion bench `round_trip` (a request through the gateway to a scripted
# loopback upstream, ledger on, next to the same request sent straight to the upstream) at an
# earlier commit and at the working tree, built with the same compiler and flags and run
# alternately in one invocation, so that a change to the path every request takes shows as a
# ratio rather than as two numbers from different days.
#
# usage: scripts/bench_vs_commit.sh REV [ROUNDS]      (ROUNDS alternations, default 2)
# The earlier commit is checked out in a temporary git worktree (removed on exit) and built into
# target/bench-before, a target directory of its own: sharing this checkout's would let cargo take
# the working tree's fresh build for the old commit's (its fingerprints name the source files by
# path, and the working tree's are newer). The first build there compiles the dependencies too.
# BEFORE_BIN=path skips that build and times a pipeline bench binary built earlier from REV.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: scripts/bench_vs_commit.sh REV [ROUNDS]}
rounds=${2:-2}
here=$(pwd)
tree=$(mktemp -d)/before
git worktree add --detach "$tree" "$rev" >/dev/null
trap 'git -C "$here" worktree remove --force "$tree" >/dev/null 2>&1 || true; rm -rf "$(dirname "$tree")"' EXIT

build() { # DIR -> path of its pipeline bench binary (into $CARGO_TARGET_DIR, else target/)
  (cd "$1" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/target}" cargo bench --bench pipeline --no-run --message-format=json-render-diagnostics) |
    python3 -c 'import json,sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "pipeline" and m.get("executable"):
        print(m["executable"])'
}
bins=$(dirname "$tree")
if [[ -n ${BEFORE_BIN:-} ]]; then
  built=$BEFORE_BIN
else
  built=$(CARGO_TARGET_DIR="$here/target/bench-before" build "$tree") || { echo "cannot build $rev" >&2; exit 1; }
fi
[[ -x $built ]] || { echo "no bench binary for $rev" >&2; exit 1; }
before=$bins/pipeline-before && cp "$built" "$before"
built=$(build "$here") || { echo "cannot build the working tree" >&2; exit 1; }
[[ -x $built ]] || { echo "no bench binary for the working tree" >&2; exit 1; }
after=$bins/pipeline-after && cp "$built" "$after"
cmp -s "$before" "$after" && { echo "the two builds are the same binary" >&2; exit 1; }

results=$(mktemp)
for ((i = 1; i <= rounds; i++)); do
  for side in before after; do
    bin=$before; [[ $side == after ]] && bin=$after
    # Criterion prints "round_trip/NAME  time: [low mid high]"; keep the middle estimate in µs.
    "$bin" --bench '^round_trip/' --noplot --measurement-time 5 2>/dev/null |
      python3 -c 'import re,sys
side, name = sys.argv[1], None
scale = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
for line in sys.stdin:
    m = re.match(r"^(round_trip/\S+)", line)
    if m: name = m.group(1)
    t = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+)", line)
    if t and name:
        print(side, name, float(t.group(1)) * scale[t.group(2)])
        name = None' "$side" >>"$results"
  done
done

python3 - "$results" "$rev" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for side, name, us in rows:
    by.setdefault((name, side), []).append(float(us))
names = sorted({n for n, _ in by})
print(f"round_trip, median of {max(len(v) for v in by.values())} alternating runs (µs); before = {sys.argv[2]}")
print(f"{'bench':32} {'before':>10} {'after':>10} {'after/before':>13}")
for n in names:
    b = statistics.median(by.get((n, "before"), [float("nan")]))
    a = statistics.median(by.get((n, "after"), [float("nan")]))
    print(f"{n:32} {b:10.1f} {a:10.1f} {a / b:13.3f}")
for n in names:
    for side in ("before", "after"):
        print(f"  {n} {side}: " + " ".join(f"{v:.1f}" for v in by.get((n, side), [])))
PY
