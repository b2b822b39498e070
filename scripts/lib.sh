# Shared by the scripts that start wattgate and its scripted upstreams on loopback:
# `source scripts/lib.sh` (from the repository root) gives
#   $work            a temporary folder, removed on exit
#   run_bg CMD...    starts CMD in the background; every such process is killed on exit
#   free_port        prints a free TCP port on 127.0.0.1
#   openai_venv      makes target/e2e-venv with the official `openai` package; sets $VENV
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
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'openai>=1.40,<3'
}
