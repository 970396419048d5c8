#!/usr/bin/env bash
# Every analysis on one record, then the HTML report.
#   bash demo.sh                                   # the embedded demo record (make demo builds it)
#   bash demo.sh record/<name> [--dataset_path DIR] [--result_file_defense DIR]
# Continues past a failing script and ends with a summary; exit 1 when any script failed.
set -uo pipefail
# Analyses whose attack-vs-defense comparison the demo shows.
COMPARE=${COMPARE:-metric,cm,tsne,tac,lips,na,gradcam,hessian}
# Analyses the demo also runs on the Blended record.
BLENDED=${BLENDED:-metric,tsne,quality,fre,detect}
cd "$(dirname "$0")"
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
if [ $# -gt 0 ]; then
  exec "$PY" -m demo.run_all "$@"
fi
# The demo: every analysis on the BadNets record, then the comparisons with the CLP defense.
record=record/badnet_demo
defense=$record/defense/clp
status=0
"$PY" -m demo.run_all "$record" --no_report || status=1
if [ -f "$defense/defense_result.pt" ]; then
  echo; echo "==== with the CLP defense ($defense): attack vs defense side by side"
  "$PY" -m demo.run_all "$record" --result_file_defense "$defense" --only "$COMPARE" --no_report || status=1
  "$PY" -m report.build_report "$record" --defense "$defense" || status=1
else
  "$PY" -m report.build_report "$record" || status=1
fi
# The Blended record, for contrast: an invisible whole-image trigger instead of a patch.
if [ -d record/blended_demo ]; then
  echo; echo "==== record/blended_demo: $BLENDED"
  "$PY" -m demo.run_all record/blended_demo --only "$BLENDED" || status=1
fi
exit $status
