#!/usr/bin/env bash
# Create .venv and install flowbp with its test extras. Idempotent; ~1 minute cold with uv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v uv >/dev/null 2>&1 || "$PY" -m pip install --quiet uv
# uv does not read pip's configuration: pass on a local wheel folder if pip is set up with one
# (that is where a CPU build of torch==2.13.0 may lie; otherwise uv takes it from the index).
extra=()
fl=$("$PY" -m pip config get global.find-links 2>/dev/null || true)
[ -n "$fl" ] && [ -d "$fl" ] && extra+=(--find-links "$fl")
[ -x .venv/bin/python ] || uv venv --quiet --python "$PY" .venv
uv pip install --quiet --python .venv/bin/python --compile-bytecode "${extra[@]}" -e ".[test]"
