"""The URIs a user writes into settings, checked whole at load: scheme, shape and no credentials.

Settings are shown by DVC (``params.yaml``), stored in Dagster's run history and logged to MLflow,
so a password in a URL would be written in all three: credentials come from the environment
(AWS_* for S3, MLFLOW_TRACKING_USERNAME / _PASSWORD for an MLflow server, FLOWBP_JUDGE_API_KEY
for the judge), never from a URL.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class URIError(ValueError):
    pass


def scheme(uri: str) -> str | None:
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else None


def no_credentials(uri: str, what: str) -> None:
    """Refuse ``user:password@`` (or a bare ``user@``) in a URL."""
    if scheme(uri) and urlsplit(uri).username is not None:
        raise URIError(f"{what} carries credentials in the URL: remove them (they would be stored in plain text in "
                       "params.yaml, Dagster's run history and MLflow) and set them in the environment instead "
                       "(S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; MLflow: MLFLOW_TRACKING_USERNAME/"
                       "MLFLOW_TRACKING_PASSWORD; judge: FLOWBP_JUDGE_API_KEY)")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); keys with ``..`` or empty segments are refused (they would name
    files outside the destination they are copied into)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise URIError(f"{uri!r}: an S3 URI is s3://bucket/key")
    parts = key.split("/")
    if any(p in (".", "..") for p in parts) or "" in parts[:-1]:
        raise URIError(f"{uri!r}: '.', '..' and empty segments ('//') are not allowed in an S3 key")
    return bucket, key


def parse_hub_uri(uri: str) -> tuple[str, str, str | None, str, list[str] | None]:
    """``hf://[datasets/]owner/name[@rev][/path][?include=A,B]`` -> (repo_type, repo, revision, path, include)."""
    rest, _, query = uri[len("hf://"):].partition("?")
    # ?include=*.json,*.txt: only those files of the repo (a tokenizer without the model's weights)
    include = [p for p in query.removeprefix("include=").split(",") if p] if query.startswith("include=") else None
    if query and include is None:
        raise URIError(f"{uri!r}: the only query a hub URI takes is ?include=PATTERN[,PATTERN]")
    repo_type = "model"
    if rest.startswith("datasets/"):
        repo_type, rest = "dataset", rest[len("datasets/"):]
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise URIError(f"{uri!r}: a hub URI is hf://owner/name[@revision][/file]")
    if any(p in (".", "..") for p in parts):
        raise URIError(f"{uri!r}: '.' and '..' are not allowed in a hub path")
    name, _, revision = parts[1].partition("@")
    return repo_type, f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]), include


def check_source(uri: str, what: str) -> str:
    """A data source: a local path, ``file://``, ``s3://bucket/key`` or ``hf://owner/name...``."""
    kind = scheme(uri)
    no_credentials(uri, what)
    if kind == "s3":
        split_s3(uri)
    elif kind == "hf":
        parse_hub_uri(uri)
    elif kind not in (None, "file"):
        raise URIError(f"{what}={uri!r}: {kind}:// is not a source flowbp reads; give a local path, s3://bucket/key "
                       "or hf://owner/name")
    return uri


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str) -> str:
    kind = scheme(uri) or (uri.split(":", 1)[0] if uri.startswith("databricks") else None)
    if kind is None and uri:
        return uri  # a local folder: MLflow's file store
    if kind not in TRACKING_SCHEMES:
        raise URIError(f"tracking.tracking_uri={uri!r}: not an MLflow store; use sqlite:///mlflow/mlflow.db, "
                       "http(s)://host:5000 (an MLflow server) or a database URI")
    no_credentials(uri, "tracking.tracking_uri")
    return uri


def check_http_url(url: str, what: str) -> str:
    if scheme(url) not in ("http", "https") or not urlsplit(url).hostname:
        raise URIError(f"{what}={url!r}: give an http(s)://host[:port]/path URL")
    no_credentials(url, what)
    return url
