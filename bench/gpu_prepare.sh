#!/usr/bin/env bash
# Here, on the CPU (`make gpu-prepare`): what the device check (bench/gpu_checks.sh) carries to a
# machine with a GPU, in .gpu/ (ignored by git; name it in the device run's `carry`):
#   .gpu/demo   the demo corpus's stage folders (every sub-stage)
#   .gpu/bench  the trainer bench's corpus (stages 1.2 and 1.3: captions of 1 to 13 tiles, QA)
#   .gpu/whl    wheels of the trainer's packages that machine lacks, for its Python 3.12
# The device machine holds torch, transformers, tokenizers, numpy, OpenCV and rich already.
set -euo pipefail
PY=${PY:-.venv/bin/python}
rm -rf .gpu
mkdir -p .gpu/whl
"$(dirname "$PY")/vita-corpus" demo --out .gpu/demo-build -q
mkdir .gpu/demo
mv .gpu/demo-build/stage_* .gpu/demo/
rm -rf .gpu/demo-build
# 80 captions (about 380 KB of tiles each) keep what is carried under the device's 64 MiB; the
# bench's steps go round the shards more than once
"$PY" bench/bench_train.py --build-corpus .gpu/bench-build --captions 80 --qa 300
mkdir .gpu/bench
mv .gpu/bench-build/stage_1.2 .gpu/bench-build/stage_1.3 .gpu/bench/
rm -rf .gpu/bench-build .gpu/bench-build-inputs
# the same versions as this venv's
pins=$("$PY" -m pip freeze 2>/dev/null | grep -iE '^(webdataset|braceexpand|soundfile|cffi|pycparser|pydantic|pydantic.core|annotated.types|typing.inspection)==')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .gpu/whl $pins
du -sh .gpu/*
size=$(du -sm .gpu | cut -f1)
tree=$(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1)
if [ $((size + tree)) -gt 60 ]; then
  echo "error: .gpu (${size} MiB) and the tracked files (${tree} MiB) pass the 60 MiB kept under the device's 64 MiB carry limit" >&2
  exit 1
fi
echo "ready: run bench/gpu_checks.sh on the device machine with carry [.gpu]"
