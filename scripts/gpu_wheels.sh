#!/usr/bin/env bash
# Fetch the wheels `python -m bench.gpu` needs on the device machine into .whl/ (ignored by git,
# carried by the device tool's `carry: [".whl"]`). That machine has Python 3.12 (x86-64) with torch,
# transformers, pyarrow, safetensors, fsspec, accelerate, pyyaml and numpy, but not zarr, numcodecs
# or pydantic (and their own needs, listed below). The versions are the ones kdcache is tested with.
# Prefect, Dask, datasets, gguf and rapidfuzz are not needed by the benchmark and do not travel.
# Usage: scripts/gpu_wheels.sh   (then see docs/guides/gpu.md for the one-call run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0  # pydantic-core needs >= 4.16; the machine's may be older
)
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls .whl
du -sh .whl
