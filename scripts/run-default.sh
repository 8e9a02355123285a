#!/usr/bin/env bash
# Install (if needed) and run the main job on the default world, through Dagster:
# prompt sets -> reward models -> base model -> prompt embeddings -> base rollouts -> for each method in
# params.yaml: train + evaluate (an MLflow run and a registered model version each) ->
# method comparison -> promotion of the best gated variant to the `champion` alias.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
export DAGSTER_HOME="$PWD/.dagster" PATH="$PWD/.venv/bin:$PATH"
flowbp pipeline run --params params.yaml "$@"
cat data/comparison/table.md
cat <<'MSG'

Results: data/comparison/{table.md,comparison.png,curves.png}, data/eval/*/samples.png, data/promoted.json
Browse:
  DAGSTER_HOME=$PWD/.dagster .venv/bin/dagster dev -m pipelines.definitions -h 127.0.0.1 -p 3000   # http://127.0.0.1:3000
  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db -h 127.0.0.1 -p 5000          # http://127.0.0.1:5000
Reproduce the same chain with DVC: scripts/dvc repro
MSG
