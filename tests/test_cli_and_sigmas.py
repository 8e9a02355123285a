import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flowbp_ops.backbones.schedules import get_schedule
from flowbp_ops.cli import main
from flowbp_ops.methods import METHODS, get_method
from flowbp_ops.surrogate import build_plan


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sigma_grids_match_the_published_shifts():
    base = np.linspace(1, 1 / 25, 25)
    sd = get_schedule("sd35").sigmas(25)
    assert sd[-1] == 0 and np.allclose(sd[:-1], 3 * base / (1 + 2 * base), atol=1e-6)
    mu1 = get_schedule("flux1").mu(25, 512)
    assert mu1 == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    f1 = get_schedule("flux1").sigmas(25, 512)
    assert np.allclose(f1[:-1], math.exp(mu1) / (math.exp(mu1) + (1 / base - 1)), atol=1e-6)
    mu2_25, mu2_50 = get_schedule("flux2").mu(25), get_schedule("flux2").mu(50)
    assert mu2_25 != mu2_50  # FLUX.2's empirical mu depends on the step count
    assert np.all(np.diff(get_schedule("flux2").sigmas(25)) < 0)


def test_methods_table_and_json(capsys):
    from flowbp_ops.policy.config import POLICY_METHODS

    code, out, _ = run(capsys, "methods")
    assert code == 0 and all(m in out for m in METHODS + POLICY_METHODS) and "policy-gradient methods" in out
    code, out, _ = run(capsys, "methods", "--json", "--backbone", "flux1")
    data = json.loads(out)
    assert set(data) == set(METHODS + POLICY_METHODS) and data["flowbp_sparse"]["weights"].endswith("(η=1)")
    assert data["flow_grpo"]["clip range"] == "0.0001" and data["diffusion_nft"]["sampler noise"] == "ODE (none)"


def test_plan_json_is_the_engines_own_plan(capsys):
    code, out, _ = run(capsys, "plan", "--method", "flowbp_lagrange", "--backbone", "flux1", "--steps", "25",
                       "--seed", "3", "--set", "bridge.alpha=0.2", "--json")
    assert code == 0
    got = json.loads(out)
    cfg = get_method("flowbp_lagrange", "flux1", 25, ["bridge.alpha=0.2"])
    expected = json.loads(json.dumps(build_plan(cfg, get_schedule("flux1").sigmas(25), 3).to_dict()))
    for key in expected:
        assert got[key] == expected[key], key
    seg2 = got["segments"][1]
    assert seg2["alpha"] == 0.2 and seg2["start"] == got["split"]
    assert {"sigmas", "active", "split", "segments", "rescale", "reward_sees", "bridged"} <= set(got)


def test_plan_refuses_bad_settings_with_a_clear_message(capsys):
    code, _, err = run(capsys, "plan", "--method", "flowbp_bridge", "--set", "bridge.alpha=2", "--json")
    assert code == 2 and "bridge.alpha" in err and "less than or equal to 1" in err
    code, _, err = run(capsys, "plan", "--method", "nope")
    assert code == 2 and "unknown method 'nope'" in err
    code, _, err = run(capsys, "plan", "--method", "refl", "--backbone", "sdxl")
    assert code == 2 and "unknown backbone 'sdxl'" in err


def test_gradcheck_json(capsys):
    code, out, _ = run(capsys, "gradcheck", "--method", "draft_k", "--steps", "5", "--seeds", "2",
                       "--set", "active.k=5", "--json")
    exact = json.loads(out)
    assert code == 0 and len(exact["per_seed"]) == 2
    assert exact["summary"]["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert exact["summary"]["norm_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    code, out, _ = run(capsys, "gradcheck", "--method", "flowbp_sparse", "--steps", "5", "--seeds", "2", "--json")
    sparse = json.loads(out)
    assert 0.0 < sparse["summary"]["cosine_mean"] < 0.99999


def test_installed_entry_point():
    beside = Path(sys.executable).parent / "flowbp"  # the venv's own script, whatever PATH says
    exe = str(beside) if beside.exists() else shutil.which("flowbp")
    assert exe, "the flowbp console script is not installed"
    out = subprocess.run([exe, "plan", "--method", "refl", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["reward_input"] == "posterior_mean"
