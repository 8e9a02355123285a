"""Gradient fidelity under the authors' rules (spec §6) and the earlier ones, for Bridge and Lagrange.

    .venv/bin/python bench/recipe_fidelity.py --steps 25 --seeds 12 --out bench/results/recipe_fidelity.json

Each row: the method's first gradient on a small random-init SD3-architecture DiT (``flowbp gradcheck``: all
weights, batch 2, real CFG 3.5) against exact backprop through all N steps, cosine and norm ratio, mean ± std
over seeds (every seed draws its own plan). The earlier rules stay selectable for exactly this comparison:
``active.split_bias=absolute`` (Bridge's late bias (i+1)^β on both sides of j), ``weights.support_rounding=
absolute`` (Lagrange supports from rounded absolute indices), ``weights.rescale=window`` (one g over the
window instead of one factor per Lagrange interval, with η = 0.5 as FLUX.1's preset).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = [
    ("flowbp_bridge", "authors: late bias from window start / j+1", []),
    ("flowbp_bridge", "earlier: late bias (i+1)^β both sides", ["active.split_bias=absolute"]),
    ("flowbp_lagrange", "authors: supports over interval positions", []),
    ("flowbp_lagrange", "earlier: supports from absolute indices", ["weights.support_rounding=absolute"]),
    ("flowbp_lagrange", "authors, η=0.5: rescale per interval", ["weights.eta=0.5"]),
    ("flowbp_lagrange", "earlier, η=0.5: one g over the window", ["weights.eta=0.5", "weights.rescale=window"]),
]


def main() -> None:
    from flowbp_ops.fidelity import gradcheck_tiny_dit
    from flowbp_ops.methods import get_method

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--out", default="bench/results/recipe_fidelity.json")
    a = p.parse_args()
    rows = []
    for method, label, sets in VARIANTS:
        cfg = get_method(method, "tiny", a.steps, sets)
        s = gradcheck_tiny_dit(cfg, a.steps, a.seeds, batch=2, cfg_scale=3.5)["summary"]
        rows.append({"method": method, "rule": label, "overrides": sets, **s})
        print(f"| {method} | {label} | {s['cosine_mean']:.3f} ± {s['cosine_std']:.3f} | "
              f"{s['norm_ratio_mean']:.3f} ± {s['norm_ratio_std']:.3f} |", flush=True)
    Path(a.out).write_text(json.dumps({"steps": a.steps, "seeds": a.seeds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
