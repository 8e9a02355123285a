"""How hard the default world's training reward is to hack, measured design by design.

    .venv/bin/python bench/world_rewards.py --world data/world [--jobs 2]

Each design is a scene parser of the shipped architecture, trained on the same handwriting half with one more
of the shipped recipe's parts than the one before (``flowbp_ops/world/train_rewards.py``); the last row is the
world's own ``align`` (three such members, geometric mean). Per design:

1. **accuracy and calibration** on renders of the other handwriting half: every cell's content right, and the
   expected calibration error of P(scene) over matching and mismatched (image, prompt) pairs;
2. **a pixel attack**: 60 Adam steps in pixel space that raise the reward of the base model's own held-out
   samples (unconstrained, lr 0.01) — what a generator would do with the reward's gradient, without a generator.
   A hard-to-hack reward rises only by changes the independent judges see too (the GenEval-style judge and
   ``align_heldout``);
3. **fine-tuning** with it as the training reward (FlowBP-Bridge, the main job's settings): the held-out
   judge's change and every held-out reward's change in standard deviations of the base model's scores.

Writes ``bench/results/world_rewards.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DESIGNS = {  # name -> (augment, adversarial ε, share of malformed objects, members)
    "plain": (False, 0.0, 0.0, 1),
    "+ augmentation": (True, 0.0, 0.0, 1),
    "+ adversarial": (True, 0.05, 0.0, 1),
    "+ malformed objects": (True, 0.05, 0.25, 1),
    "ensemble of 3 (shipped align)": None,
}
HELDOUT = ["align_heldout", "quality", "quality_heldout"]


def build_reward(world: str, name: str, folder: Path):
    """The design's reward (trained into ``folder`` once), registered under a name the trainer can use."""
    import torch

    from flowbp_ops.rewards.base import get_reward, register
    from flowbp_ops.rewards.world import SceneReward
    from flowbp_ops.world import nets, train_rewards

    if DESIGNS[name] is None:
        return get_reward("align", world_dir=world)
    augment, eps, malformed, members = DESIGNS[name]
    parts = []
    for m in range(members):
        path = folder / f"{name.replace(' ', '_').replace('+', 'p')}-{m}"
        if path.with_suffix(".json").exists():
            net, cfg = nets.load_net(path)
        else:
            torch.manual_seed(m)
            net = nets.CellParser(32, malformed=malformed > 0)
            recipe = train_rewards.Recipe(augment=augment, adv_eps=eps, malformed=malformed)
            cfg = train_rewards.train_parser(net, 0, m, recipe, 600, 128)
            nets.save_net(net, path, {"temperature": cfg["temperature"]})
            net.eval().requires_grad_(False)
        parts.append((net, cfg["temperature"]))
    reward = SceneReward(parts, "design")
    register("design")(lambda **_: reward)
    return reward


def calibration(reward, n: int = 1024, seed: int = 5) -> dict:
    """Cell accuracy is the parser's; here: P(scene) on matching vs mismatched prompts, and its ECE (10 bins)."""
    import numpy as np
    import torch

    from flowbp_ops.world import scenes

    rng = np.random.default_rng(seed)
    pool = scenes.balanced(scenes.all_scenes(), n // len(scenes.TAGS) + 1, seed)[:n]
    images, chosen, _ = scenes.Renderer(1).dataset(pool, n, seed, canonical=False)
    same_tag = {t: [s for s in scenes.all_scenes() if s.tag == t] for t in scenes.TAGS}
    other = [same_tag[s.tag][int(rng.integers(len(same_tag[s.tag])))] for s in chosen]
    with torch.no_grad():
        p_match = reward(images, [s.prompt() for s in chosen])
        p_other = reward(images, [o.prompt() for o in other])
    probs = torch.cat([p_match, p_other]).numpy()
    truth = np.concatenate([np.ones(n), np.array([float(o == s) for o, s in zip(other, chosen)])])
    bins = np.minimum((probs * 10).astype(int), 9)
    ece = sum(abs(probs[bins == b].mean() - truth[bins == b].mean()) * (bins == b).mean()
              for b in range(10) if (bins == b).any())
    return {"p_match": float(p_match.mean()), "p_mismatch": float(p_other.mean()), "ece": float(ece),
            "accuracy": float(((probs > 0.5) == (truth > 0.5)).mean())}


def attack(world: str, reward, prompts: list[str], steps: int = 60) -> dict:
    """Raise the reward of base samples by gradient ascent on their pixels; how the independent judges move."""
    import torch

    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.rewards.base import get_reward
    from flowbp_ops.sampling import generate
    from flowbp_ops.world.judge import load_judge

    images = generate(DefaultBackbone(world), prompts, 20, 4.0, seed=42)
    judge, held = load_judge(world), {n: get_reward(n, world_dir=world) for n in HELDOUT}

    def measure(x):
        with torch.no_grad():
            return {"reward": float(reward(x, prompts).mean()), "judge": judge.metrics(x, prompts)["geneval/overall"],
                    **{n: float(h(x, prompts).mean()) for n, h in held.items()}}

    before = measure(images)
    delta = torch.zeros_like(images, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.01)
    for _ in range(steps):
        loss = -torch.log(reward((images + delta).clamp(0, 1), prompts).clamp_min(1e-12)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = measure((images + delta.detach()).clamp(0, 1))
    return {"before": before, "after": after, "pixel_change": float(delta.detach().abs().mean())}


def one(world: str, name: str, out: Path) -> None:
    from flowbp_ops.cli_world import load_prompts
    from flowbp_ops.determinism import pin_cpu
    from flowbp_ops.training.config import TrainConfig
    from flowbp_ops.training.loop import train

    pin_cpu(1)
    folder = out.parent / "world_rewards_nets"
    reward = build_reward(world, name, folder)
    row = {"design": name, "calibration": calibration(reward)}
    test = load_prompts(Path(world), "test")
    row["attack"] = attack(world, reward, test[:96])
    from flowbp_ops.backbones.default import DefaultBackbone

    bb = DefaultBackbone(world)
    cfg = TrainConfig(method="flowbp_bridge", reward="align" if DESIGNS[name] is None else "design",
                      heldout_rewards=[], ema_eval_every=None, checkpoint_every=10_000)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, bb, load_prompts(Path(world), "train"), tmp, reward_kwargs={"world_dir": world})
    row["finetune"] = _evaluate(world, bb, test)
    out.write_text(json.dumps(row))


def _evaluate(world: str, backbone, prompts: list[str]) -> dict:
    import torch

    from flowbp_ops.rewards.base import get_reward
    from flowbp_ops.sampling import generate
    from flowbp_ops.world.judge import load_judge

    images = generate(backbone, prompts, 20, 4.0, seed=42)
    out = {"judge": load_judge(world).metrics(images, prompts)["geneval/overall"]}
    with torch.no_grad():
        for n in HELDOUT:
            s = get_reward(n, world_dir=world)(images, prompts)
            out[n], out[f"{n}_std"] = float(s.mean()), float(s.std())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="data/world")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "world_rewards"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        one(args.world, args.one, out / f"{args.one.replace(' ', '_').replace('+', 'p')}.json")
        return
    base = out / "base.json"
    if not base.exists():
        from flowbp_ops.backbones.default import DefaultBackbone
        from flowbp_ops.cli_world import load_prompts

        base.write_text(json.dumps(_evaluate(args.world, DefaultBackbone(args.world),
                                             load_prompts(Path(args.world), "test"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    todo = [n for n in DESIGNS if not (out / f"{n.replace(' ', '_').replace('+', 'p')}.json").exists()]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda n: subprocess.run([sys.executable, __file__, "--world", args.world, "--out", args.out,
                                                "--one", n], env=env, check=True), todo))
    print(table(out))


def table(out: Path) -> str:
    base = json.loads((out / "base.json").read_text())
    lines = ["| training reward | P(scene): match / mismatch | ECE | attack: reward | attack: judge | attack: "
             "align_heldout | fine-tuned: judge | fine-tuned: held-out rewards (Δ SD) |", "|" + "---|" * 8]
    for name in DESIGNS:
        f = out / f"{name.replace(' ', '_').replace('+', 'p')}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        c, a, ft = r["calibration"], r["attack"], r["finetune"]
        sd = ", ".join(f"{n} {(ft[n] - base[n]) / base[f'{n}_std']:+.2f}" for n in HELDOUT)
        lines.append(f"| {name} | {c['p_match']:.2f} / {c['p_mismatch']:.2f} | {c['ece']:.3f} | "
                     f"{a['before']['reward']:.2f} → {a['after']['reward']:.2f} | {a['before']['judge']:.2f} → "
                     f"{a['after']['judge']:.2f} | {a['before']['align_heldout']:.2f} → "
                     f"{a['after']['align_heldout']:.2f} | {base['judge']:.3f} → {ft['judge']:.3f} | {sd} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
