"""One error boundary: every failure a user can cause becomes one line that names the problem and the fix.

Library code raises its own errors with such messages where it knows the context (a ``SourceError``
naming the S3 URI, a ``ConfigError`` naming the field). Errors that escape from the libraries
underneath (boto, MLflow, safetensors, requests, the OS) are described here, once, for the CLI and
for anything else that shows errors to people. The traceback is for ``--debug``.
"""

from __future__ import annotations

import errno
import re

USER_ERROR, INTERNAL_ERROR, INTERRUPTED = 2, 1, 130

_CREDENTIALS = re.compile(r"(//)[^/@\s]*:[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` in a URL replaced (messages never carry credentials)."""
    return _CREDENTIALS.sub(r"\1***@", text)


class FlowbpError(Exception):
    """Base of the errors flowbp raises on purpose; the message is written for the user."""


class IntegrityError(FlowbpError, ValueError):
    """A recorded artifact's bytes differ from its record (corrupt, truncated or replaced)."""


class BusyError(FlowbpError):
    """Another process holds the lock of what this command would write."""


def fields(exc) -> str:
    """A pydantic ``ValidationError`` as ``field: problem; field: problem`` (model-level checks unprefixed)."""
    out = []
    for e in exc.errors():
        msg = e["msg"].removeprefix("Value error, ")
        loc = ".".join(map(str, e["loc"]))
        out.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return "; ".join(out)


def _botocore(exc: BaseException) -> str | None:
    try:
        from botocore import exceptions as be
    except ImportError:  # pragma: no cover - boto3 is a core dependency
        return None
    if isinstance(exc, be.NoCredentialsError):
        return ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                "in the environment")
    if isinstance(exc, (be.ConnectTimeoutError, be.ReadTimeoutError)):
        return (f"the S3 endpoint did not answer in time ({exc}); check AWS_ENDPOINT_URL_S3 and that the "
                "service is up")
    if isinstance(exc, be.EndpointConnectionError):
        return f"cannot reach the S3 endpoint ({exc}); check AWS_ENDPOINT_URL_S3 and that the service is up"
    if isinstance(exc, be.ClientError):
        err = exc.response.get("Error", {})
        return (f"S3 refused the request ({err.get('Code', '?')}: {err.get('Message', exc)}); check the "
                "bucket, the key and the credentials' permissions")
    if isinstance(exc, be.BotoCoreError):
        return f"S3 client error: {exc}"
    return None


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for ``exc``."""
    from pydantic import ValidationError

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (outputs are written atomically: nothing half-written was kept)", INTERRUPTED
    if isinstance(exc, ValidationError):
        return f"invalid setting: {fields(exc)}", USER_ERROR
    if type(exc).__name__ in ("DistBackendError", "DistNetworkError") or "Connection closed by peer" in str(exc):
        return ("lost contact with another process of the run (it stopped, or its machine did): its own error says "
                "why"), USER_ERROR
    boto = _botocore(exc)
    if boto:
        return redact(boto), USER_ERROR
    kind = type(exc).__module__.split(".")[0]
    if kind == "mlflow":
        text = getattr(exc, "message", None) or str(exc)
        return redact(f"MLflow: {text.splitlines()[0] if text else type(exc).__name__}"), USER_ERROR
    if type(exc).__name__ == "SafetensorError":
        return (f"a weights file is not readable safetensors (truncated or corrupt: {exc}); regenerate it "
                "or restore it from the DVC cache (scripts/dvc checkout)"), USER_ERROR
    if kind == "requests":
        return redact(f"HTTP request failed: {type(exc).__name__}: {exc}"), USER_ERROR
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and " " in exc.args[0]:
        return redact(exc.args[0]), USER_ERROR  # our KeyErrors carry a sentence, not a bare key
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, FileExistsError, ConnectionError)):
        where = f"{exc.filename}: " if exc.filename else ""
        hint = {errno.ENOSPC: " (free disk space, then rerun: completed stages are kept)",
                errno.EACCES: " (check the folder's permissions)", errno.EROFS: " (the folder is read-only)"}
        return redact(f"{where}{exc.strerror or exc}{hint.get(exc.errno, '')}"), USER_ERROR
    if isinstance(exc, (FlowbpError, ValueError, FileNotFoundError, FileExistsError, ConnectionError,
                        TimeoutError, RuntimeError)):
        text = str(exc) or type(exc).__name__
        return redact(" ".join(text.split("\n"))), USER_ERROR
    return redact(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback and report "
                  "it"), INTERNAL_ERROR
