"""Where stage inputs come from: a local path, an S3 URI (boto3) or a Hugging Face hub repo.

``fetch(uri, dest)`` copies a file or a folder into ``dest`` and returns the SHA-256 of
what it copied, so every stage can record (and later verify) exactly which bytes it used.

* ``path/to/file`` or ``file://...``: a local file or folder;
* ``s3://bucket/key`` (a file) or ``s3://bucket/prefix/`` (a folder); the endpoint comes
  from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` like every AWS tool (MinIO, moto);
  credentials from the usual boto3 chain and are never logged;
* ``hf://owner/name[@revision][/path][?include=*.json,*.txt]`` (a model repo, or only the files matching the patterns) or ``hf://datasets/owner/name...``:
  ``huggingface_hub`` with the revision pinned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

from flowbp_ops.atomic import atomic_path


class SourceError(ValueError):
    pass


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's (relative path, content) pairs in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def canonical_header(path: str | Path) -> None:
    """Sort the ``__metadata__`` keys of a safetensors file in place, so that the same tensors give the same bytes.

    safetensors serialises ``__metadata__`` from a Rust HashMap, whose order changes from one save to the next;
    with two keys or more (diffusers' LoRA files, rollout shards) a repeated or resumed run wrote a different
    file (sha256, DVC hash) for identical tensors. The header is JSON padded with spaces to a fixed length;
    the reordered JSON has the same length, so the tensor data is not touched."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if "__metadata__" not in header:
            return
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for the same content; never truncate a header
            raise RuntimeError(f"{path}: the reordered safetensors header does not fit ({len(text)} > {n} bytes)")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def s3_client():
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint)


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise SourceError(f"{uri!r}: an S3 URI is s3://bucket/key")
    return bucket, key


def fetch(uri: str, dest: str | Path, expected_sha256: str | None = None) -> str:
    """Copy ``uri`` to ``dest`` (a file or a folder); verify the checksum when one is given.

    Written to a ``dest.partial-*`` sibling and renamed, so a failed or refused fetch leaves nothing.
    """
    with atomic_path(dest) as tmp:
        if uri.startswith("s3://"):
            _fetch_s3(uri, tmp)
        elif uri.startswith("hf://"):
            _fetch_hub(uri, tmp)
        else:
            src = Path(uri.removeprefix("file://")).expanduser()
            if not src.exists():
                raise SourceError(f"{uri!r} does not exist: give a local path, s3://bucket/key or hf://owner/name")
            shutil.copytree(src, tmp) if src.is_dir() else shutil.copyfile(src, tmp)
        digest = sha256_of(tmp)
        if expected_sha256 and digest != expected_sha256:
            raise SourceError(f"{uri!r}: checksum mismatch (expected {expected_sha256[:12]}…, got {digest[:12]}…); "
                              f"the source changed or is corrupt: fix it or update the recorded checksum")
    return digest


def _fetch_s3(uri: str, tmp: Path) -> None:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    s3 = s3_client()
    if key and not key.endswith("/"):
        try:
            s3.download_file(bucket, key, str(tmp))
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                raise SourceError(f"{uri!r}: {exc}") from None
        key += "/"
    found = False
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            found = True
            target = tmp / obj["Key"][len(key):]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
    if not found:
        raise SourceError(f"{uri!r}: no such object or prefix in bucket {bucket!r}")


def parse_hub_uri(uri: str) -> tuple[str, str, str | None, str, list[str] | None]:
    """``hf://[datasets/]owner/name[@rev][/path][?include=A,B]`` → (repo_type, repo, revision, path, include)."""
    rest, _, query = uri[len("hf://"):].partition("?")
    # ?include=*.json,*.txt: only those files of the repo (a tokenizer without the model's weights)
    include = [p for p in query.removeprefix("include=").split(",") if p] if query.startswith("include=") else None
    if query and include is None:
        raise SourceError(f"{uri!r}: the only query a hub URI takes is ?include=PATTERN[,PATTERN]")
    repo_type = "model"
    if rest.startswith("datasets/"):
        repo_type, rest = "dataset", rest[len("datasets/"):]
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SourceError(f"{uri!r}: a hub URI is hf://owner/name[@revision][/file]")
    name, _, revision = parts[1].partition("@")
    return repo_type, f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]), include


def _fetch_hub(uri: str, tmp: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_type, repo, revision, filename, include = parse_hub_uri(uri)
    if filename:
        got = hf_hub_download(repo, filename, repo_type=repo_type, revision=revision or None)
        shutil.copyfile(got, tmp)
    else:
        got = snapshot_download(repo, repo_type=repo_type, revision=revision or None, allow_patterns=include)
        shutil.copytree(got, tmp)
