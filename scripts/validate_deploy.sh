#!/usr/bin/env bash
# Validates the deployment files, offline except for one pip install:
#   - deploy/k8s: every manifest against Kubernetes 1.37's schemas, strict (kubernetes-validate),
#     ServiceMonitor and Kustomization against deploy/k8s/schemas (scripts/validate_k8s.py);
#   - the wattgate.toml inside the ConfigMap, and the systemd and Docker configs, with
#     `wattgate config check`;
#   - deploy/systemd/wattgate.service with `systemd-analyze verify` (any warning fails);
#   - deploy/docker/Dockerfile: every COPY source exists; built when a Docker daemon answers.
#
#   scripts/validate_deploy.sh
#
# Creates a virtualenv in target/deploy-venv (reused on later runs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

cargo build -q --bin wattgate
VENV=target/deploy-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check 'kubernetes-validate==1.37.0' 'jsonschema>=4' 'PyYAML>=6'

echo "== kubernetes manifests"
"$VENV/bin/python" scripts/validate_k8s.py deploy/k8s "$work/configmap.toml"

echo "== wattgate configs"
for cfg in "$work/configmap.toml" deploy/docker/wattgate.toml deploy/systemd/wattgate.toml; do
  # The shipped configs name absolute router directories; check them against the repo's.
  sed 's#/usr/local/share/wattgate/router-models#router-models#' "$cfg" > "$work/check.toml"
  target/debug/wattgate config check --config "$work/check.toml" >/dev/null
  echo "ok   $cfg"
done

echo "== systemd unit"
if command -v systemd-analyze >/dev/null; then
  mkdir -p "$work/systemd"
  sed "s#^ExecStart=/usr/local/bin/wattgate#ExecStart=$PWD/target/debug/wattgate#" \
    deploy/systemd/wattgate.service > "$work/systemd/wattgate.service"
  out=$(systemd-analyze verify "$work/systemd/wattgate.service" 2>&1) || { echo "$out"; exit 1; }
  if [ -n "$out" ]; then echo "FAIL systemd-analyze warned:"; echo "$out"; exit 1; fi
  echo "ok   deploy/systemd/wattgate.service"
else
  echo "FAIL systemd-analyze is not installed"; exit 1
fi

echo "== Dockerfile"
grep -E '^COPY [^-]' deploy/docker/Dockerfile | while read -r _ src _; do
  [ "$src" = "." ] || [ -e "$src" ] || { echo "FAIL COPY source $src does not exist"; exit 1; }
done
grep -q '^USER 10001' deploy/docker/Dockerfile || { echo "FAIL the image must not run as root"; exit 1; }
if docker info >/dev/null 2>&1; then
  docker build -q -f deploy/docker/Dockerfile -t wattgate:validate . >/dev/null
  echo "ok   deploy/docker/Dockerfile (built)"
else
  echo "ok   deploy/docker/Dockerfile (COPY sources and USER checked; no Docker daemon here to build it)"
fi
echo "deploy files valid"
