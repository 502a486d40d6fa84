#!/usr/bin/env bash
# One local deployment of the bank app, start to finish: a TLS SuperLink with
# SuperNode authentication, N authenticated SuperNodes (one per bank), one
# `flwr run`, and everything stopped again (by pid) at the end, also on failure
# or Ctrl-C.
#
#   apps/bank_risk/deploy/run_local.sh [BANKS] [run-config key=value ...]
#   apps/bank_risk/deploy/run_local.sh 3 num-server-rounds=5 min-banks=2
#
# Environment: WORKDIR (default: a fresh temporary folder), PYTHON (default: python).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
banks="${1:-3}"
shift || true
python="${PYTHON:-python}"
workdir="${WORKDIR:-$(mktemp -d -t flower-ext-deploy-XXXXXX)}"
deploy=("$python" "$here/deploy.py" --workdir "$workdir")

trap '"${deploy[@]}" down' EXIT
"${deploy[@]}" up --banks "$banks"
"${deploy[@]}" run "$@"
echo "logs: $workdir/logs"
