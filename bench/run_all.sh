#!/usr/bin/env bash
# Every benchmark; each prints ratios measured in one process (absolute seconds lie on shared machines).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
status=0
for bench in bench/bench_*.py; do
  echo "==> $bench"
  "$PY" "$bench" "$@" || status=1
done
exit $status
