#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, offline (about 20 minutes on 2 CPU cores).
# The pipeline tests start their own S3 endpoint (moto) and MLflow server on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PATH="$PWD/.venv/bin:$PATH"
.venv/bin/ruff check flowbp_ops pipelines tests bench   # lint (pyproject.toml: line length 119, E F W I)
exec .venv/bin/python -m pytest -q "$@"
