#!/usr/bin/env bash
# Create .venv (flowbp, dagster, mlflow, tests) and install DVC as a tool kept apart (`uv tool`, as DVC's docs
# recommend pipx: it pins an antlr runtime dagster cannot use) into .dvc-tool. Idempotent; about 1.5 minutes
# cold with uv.
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
# open_clip: the reference the HPSv2.1 converter is tested against. Without its dependencies: PyPI's
# torchvision for torch 2.13 is a CUDA build that fails to import beside the CPU torch (and would
# break transformers' image processors); the test gives open_clip a stand-in while it imports.
uv pip install --quiet --python .venv/bin/python --no-deps "open-clip-torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.4"
# the tool's environment and its `dvc` entry point inside the checkout (scripts/dvc runs it)
[ -x .dvc-tool/bin/dvc ] || UV_TOOL_DIR="$PWD/.dvc-tool" UV_TOOL_BIN_DIR="$PWD/.dvc-tool/bin" \
  uv tool install --quiet --python "$PY" --compile-bytecode --with "dvc-s3==3.3.0" "dvc==3.67.1"
# the instance the Dagster UI and the main job share (pipelines/instance.py): telemetry off, the library's logs in
# the event log, and the `gpu` pool (embeddings, rollouts, training, evaluation at once): one per GPU, or on a
# machine without one, one per CPU core (the default world runs every stage on one thread)
slots=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${slots:-0}" -gt 0 ] || slots=$(nproc)
[ -f .dagster/dagster.yaml ] || .venv/bin/python -m pipelines.instance .dagster/dagster.yaml --gpu-slots "$slots" >/dev/null
