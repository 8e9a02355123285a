"""Prompt sets: load, normalise, deduplicate and split (the ``prompt_sets`` stage).

A prompt set is a folder with ``train.txt`` and ``test.txt`` (one prompt per line) and
``meta.json`` (source, checksum, counts, seed). Sources:

* ``default``: the default world's GenEval-style prompts; the held-out split holds out whole
  combinations (``specs.json`` keeps the scenes, which the default base model trains on);
* a local path, ``s3://bucket/key`` or ``hf://datasets/owner/name[@rev]/file``: a ``.txt``
  file (one prompt per line), ``.jsonl`` / ``.json`` (a list of strings or of objects with a
  ``column`` field) or ``.csv`` (a ``column`` column); split at random with a fixed seed.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

from flowbp_ops.atomic import atomic_path
from flowbp_ops.storage import fetch, sha256_of


class PromptSetError(ValueError):
    pass


def normalise(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip()


def parse_prompt_file(name: str, text: str, column: str = "prompt") -> list[str]:
    """Prompts from a file's text, by extension; a clear error for anything malformed."""
    suffix = Path(name).suffix.lower()
    try:
        if suffix in ("", ".txt"):
            items = text.splitlines()
        elif suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            items = json.loads(text)
            if not isinstance(items, list):
                raise PromptSetError(f"{name}: expected a JSON list of prompts")
        elif suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            if rows and column not in rows[0]:
                raise PromptSetError(f"{name}: no column {column!r} (columns: {', '.join(rows[0])}); "
                                     f"set prompts.column")
            items = [r[column] for r in rows]
        else:
            raise PromptSetError(f"{name}: unsupported prompt file type {suffix!r}; use .txt, .jsonl, .json or .csv")
    except json.JSONDecodeError as exc:
        raise PromptSetError(f"{name}: malformed JSON ({exc})") from None
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if column not in item:
                raise PromptSetError(f"{name}: record {i} has no field {column!r}; set prompts.column")
            item = item[column]
        if not isinstance(item, str):
            raise PromptSetError(f"{name}: record {i} is {type(item).__name__}, not a prompt string")
        out.append(item)
    return out


def clean(prompts: list[str]) -> list[str]:
    """Normalise whitespace, drop empty lines, drop duplicates (case-insensitive), keep the first order."""
    seen, out = set(), []
    for p in map(normalise, prompts):
        if p and p.lower() not in seen:
            seen.add(p.lower())
            out.append(p)
    return out


def prepare_prompt_set(source: str, out_dir: str | Path, eval_fraction: float = 0.2, seed: int = 0,
                       column: str = "prompt", eval_source: str | None = None) -> dict:
    """Write ``out_dir/{train,test}.txt`` and ``meta.json`` from ``source``; returns the metadata.

    With ``eval_source`` the held-out split is that whole file (e.g. the HPDv2 eval prompts)
    and the training split is ``source`` minus any prompt that also appears there.
    """
    if source == "default":
        return default_prompt_set(out_dir, seed)
    if not source:
        raise PromptSetError("prompts.source is empty: set it to your training prompt file (local, s3:// or hf://)")
    if eval_source:
        train, digest, raw = _load(source, column)
        test, eval_digest, _ = _load(eval_source, column)
        held = {p.lower() for p in test}
        train = [p for p in train if p.lower() not in held]
        if not train or not test:
            raise PromptSetError(f"{source!r} / {eval_source!r}: need prompts in both (after removing the overlap)")
        meta = {"source": source, "sha256": digest, "eval_source": eval_source, "eval_sha256": eval_digest,
                "seed": seed, "n_raw": len(raw), "n_duplicates_or_empty": len(raw) - len(train)}
        return _write(out_dir, train, test, meta)
    if not 0 < eval_fraction < 1:
        raise PromptSetError(f"eval_fraction={eval_fraction}: must be strictly between 0 and 1")
    prompts, digest, raw = _load(source, column)
    if len(prompts) < 2:
        raise PromptSetError(f"{source!r} has {len(prompts)} usable prompt(s) after cleaning: need at least 2 "
                             f"(one to train on, one to hold out)")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(eval_fraction * len(prompts)))
    test = [prompts[i] for i in sorted(order[:n_test])]
    train = [prompts[i] for i in sorted(order[n_test:])]
    meta = {"source": source, "sha256": digest, "seed": seed, "eval_fraction": eval_fraction,
            "n_raw": len(raw), "n_duplicates_or_empty": len(raw) - len(prompts)}
    return _write(out_dir, train, test, meta)


def _load(source: str, column: str) -> tuple[list[str], str, list[str]]:
    """(clean prompts, SHA-256 of the file, raw prompts) of one prompt file."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(source.rstrip("/")).name
        digest = fetch(source, local)
        if local.is_dir():
            raise PromptSetError(f"{source!r} is a folder: point at one prompt file")
        try:
            text = local.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PromptSetError(f"{source!r} is not UTF-8 text: give a .txt/.jsonl/.json/.csv prompt file") from None
    raw = parse_prompt_file(source, text, column)
    return clean(raw), digest, raw


def default_prompt_set(out_dir: str | Path, seed: int = 0, train_per_tag: int = 400, test_per_tag: int = 100) -> dict:
    """The default world's GenEval-style prompts: held-out combinations in ``test.txt``; both files list every tag
    equally often (a tag with fewer prompts repeats them, as GenEval samples several images per prompt), tag by
    tag, so that the first ``n`` held-out prompts are balanced too."""
    from flowbp_ops.world import scenes

    train, test = scenes.split_scenes(seed)
    specs = {"train": [asdict(s) for s in train], "test": [asdict(s) for s in test], "tags": list(scenes.TAGS)}
    meta = {"source": "default", "seed": seed, "n_train_scenes": len(train), "n_test_scenes": len(test),
            "held_out": "digit pairs, (digit, colour) and (digit, count) combinations",
            "per_tag": {"train": train_per_tag, "test": test_per_tag}}
    prompts = lambda pool, n: [s.prompt() for s in scenes.balanced(pool, n, seed)]  # noqa: E731
    return _write(out_dir, prompts(train, train_per_tag), prompts(test, test_per_tag), meta,
                  extra={"specs.json": specs})


def _write(out_dir, train: list[str], test: list[str], meta: dict, extra: dict | None = None) -> dict:
    meta = {**meta, "n_train": len(train), "n_test": len(test)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / "train.txt").write_text("\n".join(train) + "\n")
        (tmp / "test.txt").write_text("\n".join(test) + "\n")
        for name, data in (extra or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=1))
        meta["files_sha256"] = sha256_of(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_prompt_set(prompts_dir: str | Path, split: str) -> list[str]:
    path = Path(prompts_dir) / f"{split}.txt"
    if split not in ("train", "test"):
        raise PromptSetError(f"split {split!r}: choose train or test")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the default world first (flowbp world build), or run "
                                f"the prompt_sets stage")
    return [line for line in path.read_text().splitlines() if line]
