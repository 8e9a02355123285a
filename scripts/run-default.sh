#!/usr/bin/env bash
# Install (if needed) and run the main job on the default world.
# Today that is the engine on the built-in small SD3-architecture DiT: the method table, one
# plan per method, and the gradient fidelity of every method against exact backprop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PATH="$PWD/.venv/bin:$PATH"
flowbp methods
flowbp plan --method flowbp_lagrange --backbone sd35 --steps 25 --seed 0
mkdir -p outputs/gradcheck
for m in refl draft_k draft_lv alignprop drtune leapalign flowbp_sparse flowbp_bridge flowbp_lagrange; do
  flowbp gradcheck --method "$m" --steps 10 --seeds 3 --json > "outputs/gradcheck/$m.json"
  python - "$m" <<'PY'
import json, sys
s = json.load(open(f"outputs/gradcheck/{sys.argv[1]}.json"))["summary"]
print(f"{sys.argv[1]:16s} cosine {s['cosine_mean']:.3f} ± {s['cosine_std']:.3f}   norm ratio {s['norm_ratio_mean']:.3f}")
PY
done
echo "gradient fidelity per seed: outputs/gradcheck/*.json"
