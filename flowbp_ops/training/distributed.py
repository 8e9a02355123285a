"""One training run over several processes: torch.distributed as ``torchrun`` sets it up, nothing of our own.

``torchrun`` (one process per GPU, ``--nnodes`` and c10d rendezvous for several machines) sets
RANK / WORLD_SIZE / LOCAL_RANK; :func:`setup` joins that group (NCCL on GPUs, gloo on CPUs) and
puts each process on ``cuda:LOCAL_RANK`` as the *current* device, so libraries that assume the
current device agree with ours. Without torchrun it is a group of one and every call here is a
no-op, so the single-process path is the same code.

How gradients meet (the surrogate runs several forwards before its one backward):
* LoRA, replicated: after the backward of the last micro-batch, one all-reduce of the flattened
  trainable gradients, divided by the world size. Each rank's loss is the mean over its own
  samples, so this is the gradient of the mean over the global batch: equal to one process
  holding the whole batch (tested). An explicit all-reduce is exact whatever the number of
  forwards before the backward, which DDP's bucketing hooks are not built for.
* Full fine-tuning: FSDP2 (``fully_shard`` per transformer block, then the root) reduce-scatters
  the gradients itself in the backward, averaging over ranks; micro-batches before the last skip
  that sync (``set_requires_gradient_sync``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = int(os.environ.get("FLOWBP_DIST_TIMEOUT", "600"))  # a stuck collective fails, never hangs


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replicated parameters: every rank's gradients become their mean over ranks (one flat all-reduce)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks of a few numbers (metrics)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values everywhere (replicated trainable weights start identical on every rank)."""
        if self.active:
            for t in tensors:
                dist.broadcast(t.data, 0)

    def all_true(self, flag: bool, device: torch.device) -> bool:
        return self.sum([float(flag)], device)[0] == self.world


def from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str) -> tuple[Dist, str]:
    """Join the process group torchrun describes (if any); returns it and this process's device."""
    d = from_env()
    if device.startswith("cuda") and d.active:
        torch.cuda.set_device(d.local_rank)
        device = f"cuda:{d.local_rank}"
    elif device.startswith("cuda:") and device != "cuda:auto" and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))
    if d.active and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs)
    return d, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or from_env().active


def torchrun_args(module_args: list[str], nproc: int, nnodes: str | None = None, node_rank: int | None = None,
                  rdzv_endpoint: str | None = None) -> list[str]:
    """torchrun's arguments for ``-m flowbp_ops.cli ARGS``. One node: a standalone rendezvous; several: c10d at
    ``rdzv_endpoint`` (every node runs the same command with its ``--node-rank``). No restarts: a failed rank
    stops the run, which resumes from its last checkpoint when rerun."""
    out = [f"--nproc-per-node={nproc}", "--max-restarts=0"]
    if nnodes and nnodes != "1":
        if not rdzv_endpoint:
            raise ValueError("--nnodes needs --rdzv-endpoint HOST:PORT (the same on every node)")
        out += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=flowbp"]
        if node_rank is not None:
            out += [f"--node-rank={node_rank}"]
    else:
        out += ["--standalone"]
    return out + ["-m", "flowbp_ops.cli", *module_args]


def launch(args: list[str]) -> int:
    """Run torchrun in this process (its library entry point) and turn a failed rank into an exit code: the
    rank's own one-line error is already on stderr, torchrun's report of it stays a line."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(args[0].split("=")[1]))))
    try:
        run(parse_args(args))
    except ChildFailedError as exc:
        # the first rank to fail is the cause (the others lost their peer or were stopped by torchrun)
        rank, failure = min(exc.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        codes = [f.exitcode for f in exc.failures.values()]
        code = 2 if 2 in codes else (failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1)
        print(f"flowbp: error: the run stopped: rank {rank} exited first (exit code {failure.exitcode}) and torchrun "
              "stopped the others; the cause is the first error above (rerunning resumes from the last checkpoint)",
              file=sys.stderr)
        return code
    return 0


def fsdp_shard(transformer: torch.nn.Module, precision: str) -> None:
    """FSDP2 for full fine-tuning on several processes: ``fully_shard`` on every transformer block, then the root.
    bf16 compute with float32 gradient reduction when training in bf16 (the float32 master weights are the
    sharded parameters themselves)."""
    import re

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    blocks = [m for name, m in transformer.named_modules() if re.fullmatch(r"(transformer_blocks|"
                                                                           r"single_transformer_blocks)\.\d+", name)]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(transformer, mp_policy=policy)
