#!/usr/bin/env bash
# Wheels a GPU machine without internet needs for benchmarks/gpu_check.py, into ./.whl: DeepSpeed and the
# dependencies its image lacks (docs/gpu.md). Versions: this project's venv. Keep .whl out of git
# (`echo /.whl/ >> .git/info/exclude`) and carry it with the device run (docs/gpu.md).
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # e.g. PYTHON=/work/main/.venv/bin/python
mkdir -p .whl
# DeepSpeed ships an sdist only: build its wheel here (pure Python, py3-none-any: no CUDA op is prebuilt and
# PMA needs none); --no-build-isolation because its setup.py imports torch (PY must have torch)
"$PY" -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -l .whl
