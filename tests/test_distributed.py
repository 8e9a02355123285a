"""One run over several processes (torch.distributed, gloo on these CPUs): data parallel LoRA, FSDP2 full
fine-tuning, gradient accumulation, sharded checkpoints resumed on the same or another world size, a killed
rank, two "nodes", and the refusals.

Tolerances: float32 sums taken in another order differ by ~1e-7 relative; gradients are compared at
rtol 1e-4 / atol 1e-7. After AdamW steps a weight moves by about lr·sign(g) per step, so a gradient
element within rounding of zero can flip one step's direction: weights are compared at atol 2·lr·steps
(and, in practice, agree far closer: the assertions print the largest difference).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
BASE = {"batch": 2, "rollout_steps": 6, "heldout_rewards": [], "ema": None, "checkpoint_every": 1, "seed": 3,
        "finetune": "lora"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(world: Path, tmp: Path, name: str, cfg: dict, nproc: int = 1, *extra: str) -> dict[str, torch.Tensor]:
    out, run_dir = tmp / f"{name}.safetensors", tmp / f"run-{name.split('@')[0]}"
    args = [str(WORKER), str(world), str(run_dir), str(out), json.dumps({**BASE, **cfg}), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
               "--max-restarts=0", *args]
    else:
        cmd = [sys.executable, *args]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return load_file(str(out))


def assert_close(a: dict, b: dict, prefix: str, rtol: float, atol: float) -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    worst = max(float((a[k] - b[k]).abs().max()) for k in keys)
    for k in keys:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, float((a[k] - b[k]).abs().max()))
    return worst


@pytest.mark.parametrize("method", ["flowbp_sparse", "flowbp_bridge", "flowbp_lagrange", "flow_grpo_fast",
                                    "diffusion_nft"])
def test_lora_two_processes_equal_one_process(world, tmp_path, method):
    """2 processes × 2 samples and 1 process × 4 samples: the same global batch, the same step (the policy methods
    with groups of 2 images: one group per process)."""
    cfg = {"method": method, "steps": 2, "global_batch": 4, "lr": 3e-4,
           "method_overrides": ["policy.group_size=2"] if method in ("flow_grpo_fast", "diffusion_nft") else []}
    two = run_worker(world, tmp_path, "two", cfg, nproc=2)
    one = run_worker(world, tmp_path, "one", {**cfg, "batch": 4})
    assert_close(two, one, "grad.", rtol=1e-4, atol=1e-7)
    assert_close(two, one, "weight.", rtol=0, atol=2 * 3e-4 * 2)
    assert any(float(v.abs().max()) > 0 for k, v in two.items() if k.startswith("grad."))  # not a vacuous zero


def test_accumulation_equals_a_double_batch(world, tmp_path):
    """1 process × 2 micro-batches of 2 and 1 process × 1 batch of 4 train on the same samples."""
    cfg = {"method": "flowbp_lagrange", "steps": 1, "global_batch": 4}
    accumulated = run_worker(world, tmp_path, "acc", cfg)
    double = run_worker(world, tmp_path, "double", {**cfg, "batch": 4})
    assert_close(accumulated, double, "grad.", rtol=1e-4, atol=1e-7)


def test_fsdp2_full_fine_tuning_two_processes_equal_one(world, tmp_path):
    cfg = {"method": "flowbp_sparse", "finetune": "full", "steps": 2, "global_batch": 4, "lr": 1e-5}
    two = run_worker(world, tmp_path, "fsdp", cfg, nproc=2)
    one = run_worker(world, tmp_path, "single", {**cfg, "batch": 4})
    assert_close(two, one, "grad.", rtol=1e-4, atol=1e-7)
    assert_close(two, one, "weight.", rtol=0, atol=2 * 1e-5 * 2)


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
def test_fsdp2_gradients_on_the_flux_architectures(tmp_path, arch):
    """FSDP2 on small FLUX.1 / FLUX.2 transformers (their blocks return views, which FSDP2 warns about): the
    sharded gradients of a surrogate step equal the whole model's on the same global batch."""
    worker = ROOT / "tests" / "fsdp_grad_worker.py"
    for name, prefix in (("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                             "--nproc-per-node=2", "--standalone"])):
        done = subprocess.run([*prefix, str(worker), arch, str(tmp_path / f"{name}.safetensors")], env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("one", "two"))
    assert len(one) > 20
    assert set(one) == set(two)
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), (k, float((one[k] - two[k]).abs().max()))


def test_fsdp2_sharded_checkpoint_resumes_exactly_and_on_another_world_size(world, tmp_path):
    cfg = {"method": "flowbp_lagrange", "finetune": "full", "steps": 4, "global_batch": 4, "lr": 1e-5,
           "ema": 0.9, "checkpoint_every": 2}
    whole = run_worker(world, tmp_path, "whole", cfg, nproc=2)  # ema=0.9: the EMA's shards are saved too
    run_worker(world, tmp_path, "part@1", cfg, 2, "--stop-after", "2")
    ckpt = tmp_path / "run-part" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir())[:2] == ["meta.json", "shard-00001-model-00001-of-00001.safetensors"]
    resumed = run_worker(world, tmp_path, "part@2", cfg, 2, "--resume")
    for k in whole:  # the same world size: exact
        assert torch.equal(whole[k], resumed[k]), k
    # the same checkpoint resumed on one process: the sharded files reshard into whole tensors
    one = run_worker(world, tmp_path, "part@3", {**cfg, "batch": 4, "steps": 5}, 1, "--resume")
    assert set(one) == set(whole)


def test_flowbp_train_nproc_and_a_killed_rank(world, tmp_path):
    """`flowbp train --nproc 2`; kill -9 of one rank: torchrun stops the run within a few seconds (no hang),
    and the same command resumes from the last complete checkpoint."""
    import psutil

    args = [sys.executable, "-m", "flowbp_ops.cli", "train", "--method", "flowbp_sparse", "--world", str(world),
            "--out", str(tmp_path / "r"), "--nproc", "2", "--set", "steps=40", "--set", "batch=1",
            "--set", "global_batch=2", "--set", "rollout_steps=4", "--set", "heldout_rewards=[]",
            "--set", "checkpoint_every=3", "--set", "finetune=lora"]
    launcher = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from flowbp_ops.training.checkpoint import list_checkpoints

    t0 = time.monotonic()
    while not list_checkpoints(tmp_path / "r"):
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 300
        time.sleep(0.1)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if "flowbp_ops.cli" in " ".join(p.cmdline())]
    assert len(workers) == 2
    victim = max(workers, key=lambda p: p.pid)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    stopped_in = time.monotonic() - killed_at
    assert launcher.returncode != 0 and stopped_in < 60, (stopped_in, err[-2000:])
    assert "the run stopped" in err.strip().splitlines()[-1]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    last = list_checkpoints(tmp_path / "r")[-1]
    done = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed at step {int(last.name[5:])}" in done.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(40))


def test_two_nodes_rendezvous_on_localhost(world, tmp_path):
    """Two torchrun launchers, one process each, `--nnodes 2` with a c10d rendezvous on 127.0.0.1: one run."""
    endpoint = f"127.0.0.1:{_port()}"
    base = [sys.executable, "-m", "flowbp_ops.cli", "train", "--method", "flowbp_bridge", "--world", str(world),
            "--out", str(tmp_path / "r"), "--set", "steps=2", "--set", "batch=2", "--set", "global_batch=4",
            "--set", "rollout_steps=6", "--set", "heldout_rewards=[]", "--set", "finetune=lora", "--nnodes", "2",
            "--nproc", "1",
            "--rdzv-endpoint", endpoint]
    nodes = [subprocess.Popen([*base, "--node-rank", str(i)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [[line for line in o[1].splitlines() if "error" in line]
                                                     for o in outs]
    printed = [json.loads(o[0][o[0].index("{"):]) for o in outs if "{" in o[0]]
    assert len(printed) == 1 and printed[0]["processes"] == 2 and printed[0]["global_batch"] == 4
    assert (tmp_path / "r" / "weights" / "pytorch_lora_weights.safetensors").exists()


def test_a_second_run_of_the_variant_is_refused_under_nproc(world, tmp_path):
    """`flowbp stage trained_variant --nproc 2` while the variant is being trained elsewhere: rank 0 is refused,
    torchrun stops the other rank, one line, nothing written."""
    import yaml

    from flowbp_ops.locks import stage_lock

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"world_dir": str(world), "data_dir": str(tmp_path / "data"),
                                      "methods": ["refl"],
                                      "train": {"rollout_steps": 4, "batch": 1, "finetune": "lora"},
                                      "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}}))
    with stage_lock(tmp_path / "data", "trained_variant", "refl"):
        done = subprocess.run([sys.executable, "-m", "flowbp_ops.cli", "stage", "trained_variant", "--method", "refl",
                               "--params", str(params), "--nproc", "2"], env=ENV, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("flowbp: error:")]
    assert any(f"already running: pid {os.getpid()}" in e for e in errors) and "the run stopped" in errors[-1]
    assert not (tmp_path / "data" / "runs").exists() and not (tmp_path / "data" / "variants").exists()


def test_refusals_before_any_process_starts(world, tmp_path):
    from flowbp_ops.cli import main

    args = ["train", "--method", "refl", "--world", str(world), "--out", str(tmp_path / "r"), "--nproc", "2",
            "--set", "batch=2", "--set", "global_batch=6"]
    assert main(args) == 2
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.lock").exists()
    assert main(["stage", "evaluation", "--method", "refl", "--nproc", "2"]) == 2
