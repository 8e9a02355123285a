"""A served VLM judge (UnifiedReward-style) over an OpenAI-compatible chat-completions API.

Each image goes to ``POST {base_url}/chat/completions`` through the official ``openai`` client (its
timeouts, and its retries of connection errors, 408/409/429 and 5xx with back-off and the server's
Retry-After) with the prompt and the image as a ``data:image/png;base64,...`` content part; the judge
answers with an alignment and a quality score, each 1 to 5. Evaluation only: images are detached and
encoded as PNG, no gradient.

Serve a judge for instance with ``vllm serve CodeGoat24/UnifiedReward-qwen-7b --port 8000``
and point ``base_url`` at ``http://127.0.0.1:8000/v1``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import openai
import torch
from PIL import Image
from torch import Tensor

from flowbp_ops.rewards.base import check_images

JUDGE_PROMPT = (
    "You are given a text caption and an image generated from it. Rate the image on two criteria, "
    "each with a number from 1 (worst) to 5 (best):\n"
    "1. Alignment: how faithfully the image depicts the caption (objects, counts, attributes, "
    "spatial relations).\n"
    "2. Quality: visual quality (clarity, detail, artifacts, aesthetics), regardless of the caption.\n"
    "Answer with exactly two lines:\nAlignment Score: <1-5>\nQuality Score: <1-5>\n"
    "Caption: {prompt}"
)


class JudgeError(RuntimeError):
    """Base class of every error the VLM judge raises."""


class JudgeUnreachableError(JudgeError):
    """The server could not be reached (refused, DNS, timeout) after all retries."""


class JudgeHTTPError(JudgeError):
    """The server answered, but not with a usable chat-completions response."""


class JudgeReplyError(JudgeError):
    """The model's reply does not hold two scores in 1..5."""


@dataclass
class VLMJudgeConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "CodeGoat24/UnifiedReward-qwen-7b"
    api_key_env: str | None = "FLOWBP_JUDGE_API_KEY"  # the env var's name; the key is never stored here
    timeout: float = 120.0  # seconds per request
    retries: int = 3  # extra attempts after the first, on 408/409/429/5xx/connection errors (the client's rule)
    max_concurrency: int = 4
    max_tokens: int = 256
    temperature: float = 0.0  # greedy: the same image gets the same score


def _public_url(url: str) -> str:
    """The URL with any ``user:password@`` removed, safe to print."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _excerpt(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


_NUM = r"(-?\d+(?:\.\d+)?)"
# "Alignment Score: 4.5", "**Quality**: 3", "quality = 2/5": the name, optional words, ':' or '='
_LINE = {k: re.compile(rf"\b{k}\b[a-z ]*(?:\(\s*1\s*[-–]\s*5\s*\))?[\s*]*[:=][\s*]*{_NUM}", re.IGNORECASE)
         for k in ("alignment", "quality")}
_JSON_KEYS = {"alignment": ("alignment", "alignment_score", "alignment score"),
              "quality": ("quality", "quality_score", "quality score")}


def _from_json(reply: str) -> dict[str, object] | None:
    """The first JSON object in the reply (fenced or bare), keys lower-cased, or None."""
    start = reply.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(reply[start:])
        except json.JSONDecodeError:
            start = reply.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return {str(k).strip().lower(): v for k, v in obj.items()}
        start = reply.find("{", start + 1)
    return None


def parse_scores(reply: str) -> tuple[float, float]:
    """``(alignment, quality)`` from a judge reply: a JSON object or ``Alignment Score: 4`` lines."""
    found: dict[str, float] = {}
    obj = _from_json(reply)
    if obj is not None:
        for name, keys in _JSON_KEYS.items():
            for k in keys:
                if k in obj:
                    try:
                        if isinstance(obj[k], bool):  # float(True) == 1.0 would pass silently
                            raise TypeError
                        found[name] = float(obj[k])
                    except (TypeError, ValueError):
                        raise JudgeReplyError(f"{name} score {obj[k]!r} is not a number in reply: "
                                              f"{_excerpt(reply)!r}") from None
                    break
    for name, pattern in _LINE.items():
        # the last match: judges often reason first ("alignment is weak: 2 of 3 ...") then conclude
        if name not in found and (hits := pattern.findall(reply)):
            found[name] = float(hits[-1])
    missing = [n for n in ("alignment", "quality") if n not in found]
    if missing:
        raise JudgeReplyError(f"no {' and '.join(missing)} score in judge reply: {_excerpt(reply)!r}")
    for name, v in found.items():
        if not 1.0 <= v <= 5.0:
            raise JudgeReplyError(f"{name} score {v:g} is outside 1..5 in judge reply: {_excerpt(reply)!r}")
    return found["alignment"], found["quality"]


def image_to_png(image: Tensor) -> bytes:
    """A (3, H, W) image in [0, 1] as PNG bytes (8-bit, rounded)."""
    arr = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr.numpy()).save(buf, format="PNG")
    return buf.getvalue()


class VLMJudge:
    """Callable as ``judge(images, prompts) -> {"alignment": (B,), "quality": (B,)}``."""

    name = "vlm_judge"

    def __init__(self, config: VLMJudgeConfig | None = None):
        self.config = config or VLMJudgeConfig()
        if self.config.retries < 0 or self.config.max_concurrency < 1 or self.config.timeout <= 0:
            raise ValueError(f"need retries >= 0, max_concurrency >= 1 and timeout > 0, got {self.config}")
        env = self.config.api_key_env
        self._api_key = os.environ.get(env) if env else None  # kept private; redacted from errors
        self._password = urlsplit(self.config.base_url).password
        base = _public_url(self.config.base_url.rstrip("/"))  # a password in the URL is never sent or shown
        self.url = base + "/chat/completions"
        self.client = openai.OpenAI(base_url=base, api_key=self._api_key or "none", timeout=self.config.timeout,
                                    max_retries=self.config.retries)
        # without a key, no Authorization header at all (a local vLLM server needs none)
        self._headers = {} if self._api_key else {"Authorization": openai.omit}

    def _redact(self, text: str) -> str:
        """``text`` without the API key or a password embedded in base_url."""
        for secret in (self._api_key, self._password):
            if secret:
                text = text.replace(secret, "[REDACTED]")
        return text

    def _request(self, png: bytes, prompt: str) -> str:
        """The reply text of one chat completion (the client retries what is worth retrying)."""
        cfg = self.config
        data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": JUDGE_PROMPT.format(prompt=prompt)},
        ]}]
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=cfg.model, messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                extra_headers=self._headers)
        except openai.APIConnectionError as exc:  # refused, DNS, timeout: after every retry
            raise JudgeUnreachableError(
                f"cannot reach the VLM judge at {self.url} after {cfg.retries + 1} attempts "
                f"({type(exc).__name__}: {self._redact(str(exc))}). Start an OpenAI-compatible "
                f"server (e.g. `vllm serve {cfg.model} --port 8000`) or point base_url at one that is running."
            ) from None
        except openai.APIStatusError as exc:
            raise JudgeHTTPError(f"VLM judge at {self.url} answered HTTP {exc.status_code}: "
                                 f"{self._redact(_server_message(exc.response))}") from None
        return self._decode(raw.http_response.text)

    def _decode(self, text: str) -> str:
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeHTTPError(
                f"VLM judge at {self.url} sent a malformed chat-completions response "
                f"({type(exc).__name__}): {self._redact(_excerpt(text))!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise JudgeHTTPError(f"VLM judge at {self.url} sent non-text content: {_excerpt(repr(content))}")
        return content

    def score_one(self, png: bytes, prompt: str) -> tuple[float, float]:
        """``(alignment, quality)`` of one PNG-encoded image for its prompt."""
        return parse_scores(self._request(png, prompt))

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        check_images(images, prompts)
        pngs = [image_to_png(img) for img in images]
        workers = max(1, min(self.config.max_concurrency, len(pngs)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            scores = list(pool.map(self.score_one, pngs, prompts))  # keeps the input order
        align, quality = zip(*scores) if scores else ((), ())
        return {"alignment": torch.tensor(align, dtype=torch.float32),
                "quality": torch.tensor(quality, dtype=torch.float32)}


def _server_message(resp) -> str:
    """The server's own error message (OpenAI ``{"error": {"message": ...}}``) or the raw body."""
    try:
        err = resp.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return _excerpt(resp.text) or "(empty body)"
