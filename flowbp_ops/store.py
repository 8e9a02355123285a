"""The shared store: stage outputs on S3, so any stage runs on any machine.

``FLOWBP_STORE=s3://bucket/prefix`` (or ``flowbp stage … --store``, or Dagster's ``storage`` resource).
Every output is kept under ``prefix/<key>``, where the key is its place in the stage graph
(``data/world/prompts``, ``data/runs/refl``: the same on every machine whatever ``world_dir`` and
``data_dir`` are there), with ``<key>.manifest.json`` listing its files and their SHA-256. The manifest
is written last: it is the commit point, so a reader never sees half an output. A stage pulls the
outputs of its upstream stages before it runs (verified byte for byte, written atomically; a copy
already in place and equal is kept) and pushes its own after; a training run also pushes every
checkpoint as it is written, so a run killed on one machine resumes on another.

Why this and not a DVC remote: stages launched by Dagster on executors have no ``dvc.lock`` entry
to ``dvc pull`` by (DVC records outputs only for what ``dvc repro`` ran), and an executor image would
need git and DVC; the store needs boto3 only. ``dvc push`` to an S3 remote stays available for
``dvc repro`` users (README).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flowbp_ops.atomic import atomic_path
from flowbp_ops.integrity import file_sha256
from flowbp_ops.storage import SourceError, confined, s3_client, s3_errors, split_s3

ENV = "FLOWBP_STORE"


class StoreError(SourceError):
    pass


def from_env(uri: str | None = None) -> "Store | None":
    uri = uri or os.environ.get(ENV)
    return Store(uri) if uri else None


def _files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"": path}
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}


class Store:
    def __init__(self, uri: str):
        from flowbp_ops.uris import check_source

        if not uri.startswith("s3://"):
            raise StoreError(f"store {uri!r}: give s3://bucket/prefix")
        check_source(uri, "store")
        self.uri = uri.rstrip("/")
        self.bucket, prefix = split_s3(self.uri + "/")
        self.prefix = prefix
        self.s3 = s3_client()
        with s3_errors(self.uri):  # fail fast: unreachable endpoint, no bucket, no credentials
            self.s3.head_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"store key {key!r}: a relative key inside the store")
        return f"{self.prefix}{key}"

    def manifest(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        with s3_errors(self.uri):
            try:
                body = self.s3.get_object(Bucket=self.bucket, Key=self._key(key) + ".manifest.json")["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
        return json.loads(body)

    def push(self, key: str, path: str | Path) -> dict:
        """Upload ``path`` (a file or a folder) as ``key``: changed files, then the manifest, then files that the
        new manifest no longer lists are deleted."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"cannot push {path}: it does not exist")
        old = (self.manifest(key) or {}).get("files", {})
        local = _files(path)
        files = {rel: file_sha256(p) for rel, p in local.items()}
        with s3_errors(self.uri):
            for rel, digest in files.items():
                if old.get(rel) != digest:  # unchanged files (earlier checkpoints) are not sent again
                    self.s3.upload_file(str(local[rel]), self.bucket, self._key(f"{key}/{rel}" if rel else key))
            manifest = {"key": key, "kind": "file" if path.is_file() else "folder", "files": files}
            self.s3.put_object(Bucket=self.bucket, Key=self._key(key) + ".manifest.json",
                               Body=json.dumps(manifest, indent=1).encode())
            for rel in set(old) - set(files):
                self.s3.delete_object(Bucket=self.bucket, Key=self._key(f"{key}/{rel}" if rel else key))
        return manifest

    def pull(self, key: str, path: str | Path, needed_by: str | None = None) -> bool:
        """Make ``path`` hold the stored ``key`` (False when the store has none and nothing needs it; a clear error
        naming the stage and the key when a stage does)."""
        path = Path(path)
        manifest = self.manifest(key)
        if manifest is None:
            if needed_by:
                raise StoreError(f"stage {needed_by} needs {key!r}, which is not in the store {self.uri} (key "
                                 f"{self._key(key)}): run the stage that writes it first, with the same store")
            return False
        files = manifest["files"]
        if path.exists() and {rel: file_sha256(p) for rel, p in _files(path).items()} == files:
            return True  # already here, byte for byte
        with atomic_path(path) as tmp, s3_errors(self.uri):
            for rel, digest in files.items():
                target = confined(tmp, rel) if rel else tmp
                target.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(self.bucket, self._key(f"{key}/{rel}" if rel else key), str(target))
                if file_sha256(target) != digest:
                    raise StoreError(f"{self.uri}/{key}/{rel}: the stored file differs from its manifest (corrupt or "
                                     "being replaced): push it again from a machine that has it")
            if manifest["kind"] == "folder":
                tmp.mkdir(parents=True, exist_ok=True)  # an empty folder is an output too
        return True
