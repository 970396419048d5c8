#!/usr/bin/env bash
# Every analysis on one record, then the HTML report (`backdoor-lens all` does the work).
#   bash demo.sh                                   # the embedded demo record (make demo builds it)
#   bash demo.sh record/<name> [--dataset_path DIR] [--result_file_defense DIR] [--only a,b]
# Continues past a failing analysis and ends with a summary; exit 1 when any failed.
set -uo pipefail
cd "$(dirname "$0")"
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
lens() { "$PY" -m backdoor_lens "$@"; }
if [ $# -gt 0 ]; then
  lens all "$@"; exit $?
fi
# The demo: every analysis on the BadNets record, then the ones that compare attack and defense
# (declared `compares`) with the CLP defense.
record=record/badnet_demo
defense=$record/defense/clp
status=0
if [ -f "$defense/defense_result.pt" ]; then
  # One process: every analysis on the attack, then the comparisons with the defense (their attack
  # passes already made), then the report of both.
  lens all "$record" --compare_defense "$defense" || status=1
else
  lens all "$record" || status=1
fi
# The Blended record, for contrast (analyses declared `on_blended_demo`): an invisible whole-image trigger.
if [ -d record/blended_demo ]; then
  echo; echo "==== record/blended_demo"
  lens all record/blended_demo --select blended_demo || status=1
fi
exit $status
