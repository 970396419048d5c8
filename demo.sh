#!/usr/bin/env bash
# Every analysis on one record, then the HTML report.
#   bash demo.sh                                   # the embedded demo record (make demo builds it)
#   bash demo.sh record/<name> [--dataset_path DIR] [--result_file_defense DIR]
# Continues past a failing script and ends with a summary; exit 1 when any script failed.
set -uo pipefail
cd "$(dirname "$0")"
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
exec "$PY" -m demo.run_all "$@"
