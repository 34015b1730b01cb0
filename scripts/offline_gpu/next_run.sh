#!/bin/bash
# The next GPU run (issue 26), prepared: 15 minutes of one lent GPU, start-up included. It packs, carries and
# checks, then recomputes the h200 headline first: base, stage 1, and on MetaMathQA (seed 1234) the AdamW
# runs at every lr of its grid, SAM at every rho at stage 2's lr, then SAM at every other lr of AdamW's grid
# (frontier.method_lr). The session makes the device calls it prints, back to back; whatever the lease does
# not finish stays missing, and the retracted entries it did not replace stay stale.
#
#   scripts/offline_gpu/next_run.sh plan              pack (REPACK=0: keep .gpu if there) and print the calls
#   scripts/offline_gpu/next_run.sh local             the same calls here, in a scratch folder, on PRESET=smoke
#                                                     (DRY=1, the default: run-missing --dry-run): a CPU test
#   scripts/offline_gpu/next_run.sh unpack FILES_AT   the results into results/PRESET, the self-check, the status
#
# The clock (BUDGET 900 s of device time): a fresh machine's start (START, 120 s), each staging call (STAGE_CALL,
# 40 s: the tree and 40 MiB up; the call that completes the model converts it, about a minute), then the run
# call at its limit (600 s at most): the data and the self-check (about 60 s), the study for the rest but 30 s
# (the workers stopped, the results packed). A failed self-check ends the call within its first minute.
set -euo pipefail
REPO=$(git rev-parse --show-toplevel); cd "$REPO"
PRESET=${PRESET:-h200}; WORKERS=${WORKERS:-8}
BUDGET=${BUDGET:-900}; START=${START:-120}; STAGE_CALL=${STAGE_CALL:-40}; CHECK=${CHECK:-60}; TAIL=${TAIL:-30}

sizes() {  # N, the run call's limit and the study's seconds
  N=$(cat .gpu/N)
  left=$(( BUDGET - START - (N - 1) * STAGE_CALL - 30 ))   # 30 s for the replies' transfers
  RUN_LIMIT=$(( left < 600 ? left : 600 ))
  STUDY=$(( RUN_LIMIT - CHECK - TAIL ))
  [ "$STUDY" -gt 60 ] || { echo "no time left for a study: $N calls in $BUDGET s" >&2; exit 1; }
}

case ${1:-} in
plan)
  if [ "${REPACK:-1}" = 1 ] || [ ! -e .gpu/N ]; then PRESET=$PRESET scripts/offline_gpu/pack.sh; fi
  for d in .gpu/c*; do cp scripts/offline_gpu/steps.sh "$d"/; done   # the steps as they are now
  sizes
  echo
  echo "Device calls, back to back (the machine goes back after ~30 s idle; device time $BUDGET s in all):"
  for k in $(seq 1 $((N - 1))); do
    echo "  $k. run(command=\"bash .gpu/c$k/steps.sh stage\", carry=[\".gpu/c$k\"], timeout_s=180)"
  done
  echo "  $N. run(command=\"bash .gpu/c$N/steps.sh run $STUDY $WORKERS $PRESET\", carry=[\".gpu/c$N\"], timeout_s=$RUN_LIMIT)"
  echo "  then give_back(), and here: scripts/offline_gpu/next_run.sh unpack <files_at>"
  echo "Expected: start ~${START} s, staging $((N - 1)) x ~${STAGE_CALL} s, the run call ${RUN_LIMIT} s (study ${STUDY} s):"
  echo "  $(( START + (N - 1) * STAGE_CALL + RUN_LIMIT )) s of $BUDGET. If call $N prints 'device self-check FAILED', stop:"
  echo "  nothing was computed; device_check.json (in its files) says what disagreed."
  [ -s .gpu/c$N/only.txt ] && echo "The study: $(wc -l < .gpu/c$N/only.txt) experiments in this order (.gpu/c$N/only.txt), headline first."
  ;;
local)
  # every call as the device would run it, here: a scratch ROOT, results and $OUT; the model converted by this
  # machine's transformers, the wheels skipped (this Python has them)
  [ -e .gpu/N ] || { echo "nothing packed: run '$0 plan' first" >&2; exit 1; }
  sizes
  local_preset=${PRESET_LOCAL:-smoke}
  scratch=$(mktemp -d); mkdir -p "$scratch/out"
  cp -r .gpu "$scratch/gpu"   # the packed calls, with the steps as they are now and the local preset's headline
  for d in "$scratch"/gpu/c*; do
    cp scripts/offline_gpu/steps.sh "$d"/
    .venv/bin/python scripts/offline_gpu/headline.py --preset "$local_preset" > "$d/only.txt"
  done
  export ROOT=$scratch/root OUT=$scratch/out PY=${PY:-$REPO/.venv/bin/python} SKIP_WHEELS=1
  [ "${DRY:-1}" = 1 ] && export DRY=1 || unset DRY
  for k in $(seq 1 $((N - 1))); do echo "== call $k"; bash "$scratch/gpu/c$k/steps.sh" stage; done
  echo "== call $N"
  bash "$scratch/gpu/c$N/steps.sh" run "${LOCAL_SECONDS:-$STUDY}" "${LOCAL_WORKERS:-1}" "$local_preset"
  echo "== back: $(ls $OUT | tr '\n' ' ')  (scratch $scratch)"
  ;;
unpack)
  at=${2:?the files_at folder of the run call}
  [ -e "$at/device_check.json" ] && $REPO/.venv/bin/python -c "
import json, sys; from cfsam.measurement.selfcheck import summary; print(summary(json.load(open(sys.argv[1]))))" "$at/device_check.json"
  ls "$at/results/$PRESET"/*.json.gz >/dev/null 2>&1 || { echo "no entries in $at/results/$PRESET: nothing was computed" >&2; exit 1; }
  cp "$at/results/$PRESET"/*.json.gz "results/$PRESET/" && chmod u+w "results/$PRESET"/*.json.gz
  echo "$(ls "$at/results/$PRESET"/*.json.gz | wc -l) entries into results/$PRESET"
  .venv/bin/cfsam status --preset "$PRESET" | awk '{print $1}' | sort | uniq -c
  echo "then: .venv/bin/cfsam doctor --preset $PRESET, and commit results/$PRESET"
  ;;
*)
  sed -n '2,18p' "$0" >&2; exit 2
  ;;
esac
