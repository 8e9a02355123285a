"""Where stage inputs come from: a local path, an S3 URI (boto3) or a Hugging Face hub repo.

``fetch(uri, dest)`` copies a file or a folder into ``dest`` and returns the SHA-256 of
what it copied, so every stage can record (and later verify) exactly which bytes it used.

* ``path/to/file`` or ``file://...``: a local file or folder;
* ``s3://bucket/key`` (a file) or ``s3://bucket/prefix/`` (a folder); the endpoint comes
  from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` like every AWS tool (MinIO, moto);
  credentials from the usual boto3 chain and are never logged;
* ``hf://owner/name[@revision][/path][?include=*.json,*.txt]`` (a model repo, or only the files matching the patterns)
  or ``hf://datasets/owner/name...``: ``huggingface_hub`` with the revision pinned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flowbp_ops.atomic import atomic_path
from flowbp_ops.uris import URIError, parse_hub_uri, split_s3  # noqa: F401  (re-exported: the URI syntax)

SourceError = URIError  # a source that cannot be read: bad URI, missing, unreachable, wrong checksum


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


S3_TIMEOUT_S = 30  # connect and read timeout of every S3 call (an endpoint that never answers fails)


def s3_client():
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    timeout = float(os.environ.get("FLOWBP_S3_TIMEOUT", S3_TIMEOUT_S))
    cfg = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2, "mode": "standard"})
    # a new session each time: boto3's default session keeps the credentials it found first
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


@contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """boto's exceptions as one ``SourceError`` naming the URI and the fix (credentials never in it)."""
    from botocore import exceptions as be

    from flowbp_ops.errors import describe

    try:
        yield
    except (be.BotoCoreError, be.ClientError) as exc:
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, be.ClientError) else None
        if code in ("NoSuchBucket", "404", "NoSuchKey"):
            raise SourceError(f"{uri!r}: no such bucket or key; check the URI (and AWS_ENDPOINT_URL_S3)") from None
        raise SourceError(f"{uri!r}: {describe(exc)[0]}") from None


def confined(root: str | Path, relative: str) -> Path:
    """``root/relative``, refused unless it stays inside ``root``: a key or member name from outside
    (an S3 listing, an archive) never writes elsewhere on disk."""
    root = Path(root).resolve()
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SourceError(f"refused to write {relative!r}: an absolute path, '.', '..' or an empty segment would "
                          f"leave {root}")
    target = (root / relative).resolve()
    if not target.is_relative_to(root):  # a symlink inside root pointing out
        raise SourceError(f"refused to write {relative!r}: it resolves outside {root}")
    return target


def fetch(uri: str, dest: str | Path, expected_sha256: str | None = None) -> str:
    """Copy ``uri`` to ``dest`` (a file or a folder); verify the checksum when one is given.

    Written to a ``dest.partial-*`` sibling and renamed, so a failed or refused fetch leaves nothing.
    """
    from flowbp_ops.uris import check_source

    check_source(uri, "source")
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
    with s3_errors(uri):
        if key and not key.endswith("/"):
            try:
                s3.download_file(bucket, key, str(tmp))
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                    raise
            key += "/"
        found = False
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                found, rel = True, obj["Key"][len(key):]
                if not rel or rel.endswith("/"):  # a console's zero-byte "folder" marker
                    continue
                target = confined(tmp, rel)  # a key such as pfx/../../x stays refused
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))
    if not found:
        raise SourceError(f"{uri!r}: no such object or prefix in bucket {bucket!r}")


def _fetch_hub(uri: str, tmp: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        _download_hub(uri, tmp, hf_hub_download, snapshot_download)
    except LocalEntryNotFoundError:
        raise SourceError(f"{uri!r} is not in the local hub cache and the hub cannot be reached (HF_HUB_OFFLINE, or "
                          "no network): download it where the hub answers, or give an s3:// or local copy") from None
    except HfHubHTTPError as exc:
        raise SourceError(f"{uri!r}: the hub answered {exc.response.status_code if exc.response is not None else '?'}"
                          " (no such repo, file or revision, or a gated model: `huggingface-cli login`)") from None


def _download_hub(uri: str, tmp: Path, hf_hub_download, snapshot_download) -> None:
    repo_type, repo, revision, filename, include = parse_hub_uri(uri)
    if filename:
        got = hf_hub_download(repo, filename, repo_type=repo_type, revision=revision or None)
        shutil.copyfile(got, tmp)
    else:
        got = snapshot_download(repo, repo_type=repo_type, revision=revision or None, allow_patterns=include)
        shutil.copytree(got, tmp)
