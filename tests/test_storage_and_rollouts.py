"""Stage inputs (local / S3 fetch with checksums) and cached rollouts on disk."""

from __future__ import annotations

import pytest
import torch

from flowbp_ops.storage import SourceError, fetch, sha256_of


def test_fetch_local_file_and_folder_with_checksums(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.txt").write_text("beta")
    digest = fetch(str(src), tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "b.txt").read_text() == "beta"
    assert digest == sha256_of(src) == fetch(str(src), tmp_path / "again", expected_sha256=digest)
    (src / "a.txt").write_text("changed")
    with pytest.raises(SourceError, match="checksum mismatch"):
        fetch(str(src), tmp_path / "bad", expected_sha256=digest)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob("bad.partial*"))
    with pytest.raises(SourceError, match="does not exist"):
        fetch(str(tmp_path / "nope"), tmp_path / "x")


def test_fetch_from_s3(tmp_path, s3_bucket):
    s3, bucket = s3_bucket
    s3.put_object(Bucket=bucket, Key="rewards/align.safetensors", Body=b"weights")
    s3.put_object(Bucket=bucket, Key="rewards/align.json", Body=b"{}")
    assert fetch(f"s3://{bucket}/rewards/align.json", tmp_path / "one.json")
    assert (tmp_path / "one.json").read_bytes() == b"{}"
    fetch(f"s3://{bucket}/rewards", tmp_path / "folder")
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["align.json", "align.safetensors"]
    with pytest.raises(SourceError, match="no such object"):
        fetch(f"s3://{bucket}/missing", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_cached_rollouts_round_trip_and_match_sampling(world, tmp_path):
    from flowbp_ops.backbones.default import DefaultBackbone
    from flowbp_ops.rollout_store import generate_rollouts, load_rollouts
    from flowbp_ops.sampling import generate

    bb = DefaultBackbone(world)
    prompts = ["a photo of a red seven", "a photo of a two left of a six", "a photo of three ones"]
    meta = generate_rollouts(bb, prompts, 4, 4.0, tmp_path / "r", seed=42, shard_size=2)
    assert [s["n"] for s in meta["shards"]] == [2, 1]
    for i in range(4):  # regenerating writes the same bytes (a DVC no-op), whatever order safetensors picks
        again = generate_rollouts(bb, prompts, 4, 4.0, tmp_path / f"again{i}", seed=42, shard_size=2)
        assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in meta["shards"]]
    loaded = list(load_rollouts(tmp_path / "r"))
    assert sum((p for p, *_ in loaded), []) == prompts
    x_n = torch.cat([cache.x[-1] for _, cache, _, _ in loaded])
    # same samples as sampling (same noise seeds; batch composition may change the last float bits)
    torch.testing.assert_close(bb.decode(x_n), generate(bb, prompts, 4, 4.0, seed=42), atol=1e-5, rtol=1e-4)
    _, cache, cond, seeds = loaded[0]
    assert len(cache.x) == 5 and len(cache.v) == 4 and seeds.tolist() == [42, 43]
    assert torch.equal(cond.pos["tokens"], bb.conditioning(prompts[:2], 4.0).pos["tokens"])
    shard = tmp_path / "r" / meta["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-4] + b"xxxx")
    with pytest.raises(ValueError, match="corrupt"):
        list(load_rollouts(tmp_path / "r"))
