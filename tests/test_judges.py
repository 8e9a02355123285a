"""Evaluation-only judges: the served VLM judge against a local stub server, and GenEval's rules."""

from __future__ import annotations

import base64
import io
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from flowbp_ops.judges.geneval import (
    TAGS,
    GenEvalEntry,
    GenEvalMetadataError,
    aggregate,
    check_image,
    keep_detections,
    load_metadata,
    relative_position,
    score_geneval,
    select_by_tag,
)
from flowbp_ops.judges.vlm import (
    JudgeHTTPError,
    JudgeReplyError,
    JudgeUnreachableError,
    VLMJudge,
    VLMJudgeConfig,
    parse_scores,
)

KEY_ENV, KEY = "FLOWBP_TEST_JUDGE_KEY", "sk-test-secret-4242"


def make_judge(base_url: str, monkeypatch, **kw) -> VLMJudge:
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = dict(base_url=base_url, model="test/judge-7b", api_key_env=KEY_ENV, timeout=5.0,
               retries=2, max_concurrency=3)
    return VLMJudge(VLMJudgeConfig(**{**cfg, **kw}))


def images(b: int = 3, h: int = 20, w: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, h, w, generator=g)


# --------------------------------------------------------------------------------------------
# VLM judge
# --------------------------------------------------------------------------------------------

def test_judge_sends_well_formed_requests_and_keeps_order(stub, monkeypatch):
    prompts = ["a red cube", "two blue spheres", "a cat left of a dog"]
    # a score per prompt, so a mix-up of the thread pool's order would show
    per_prompt = {p: (i + 2, 5 - i) for i, p in enumerate(prompts)}
    stub.reply = lambda text: next(f"Alignment Score: {a}\nQuality Score: {q}"
                                   for p, (a, q) in per_prompt.items() if p in text)
    imgs = images(3, 20, 28)
    out = make_judge(stub.base_url, monkeypatch)(imgs, prompts)

    assert set(out) == {"alignment", "quality"}
    assert out["alignment"].tolist() == [2.0, 3.0, 4.0] and out["quality"].tolist() == [5.0, 4.0, 3.0]
    assert out["alignment"].dtype == torch.float32 and out["alignment"].shape == (3,)
    assert len(stub.requests) == 3
    seen = set()
    for req in stub.requests:
        assert req["path"] == "/v1/chat/completions"
        headers = {k.lower(): v for k, v in req["headers"].items()}  # HTTP header names ignore case
        assert headers["authorization"] == f"Bearer {KEY}"
        body = json.loads(req["body"])
        assert body["model"] == "test/judge-7b"
        parts = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        text = next(p["text"] for p in parts if p["type"] == "text")
        assert url.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert png.format == "PNG" and png.size == (28, 20) and png.mode == "RGB"
        i = next(i for i, p in enumerate(prompts) if p in text)
        seen.add(i)
        # the PNG holds this prompt's image, quantised to 8 bits
        expected = (imgs[i] * 255).round().to(torch.uint8).permute(1, 2, 0)
        assert torch.equal(torch.from_numpy(np.array(png)), expected)
    assert seen == {0, 1, 2}


def test_judge_without_key_sends_no_authorization(stub, monkeypatch):
    monkeypatch.delenv("FLOWBP_NO_SUCH_KEY", raising=False)
    judge = VLMJudge(VLMJudgeConfig(base_url=stub.base_url, api_key_env="FLOWBP_NO_SUCH_KEY"))
    out = judge(images(1), ["x"])
    assert out["alignment"].tolist() == [4.0]
    assert "authorization" not in {k.lower() for k in stub.requests[0]["headers"]}


@pytest.mark.parametrize("reply, expected", [
    ("Alignment Score: 4.5\nQuality Score: 3", (4.5, 3.0)),
    ("alignment: 2\nquality: 5", (2.0, 5.0)),
    ("Alignment Score (1-5): 4\nQuality Score (1-5): 3", (4.0, 3.0)),  # UnifiedReward's own format
    ("**Alignment Score**: 3/5\n**Quality Score**: 4/5", (3.0, 4.0)),
    ('```json\n{"alignment": 4, "quality": 2}\n```', (4.0, 2.0)),
    ('Here you go: {"Alignment Score": "1.5", "quality_score": 5}', (1.5, 5.0)),
    ("The alignment is weak: 2 of 3 objects are missing.\nFinal:\nAlignment Score: 1\nQuality Score: 4",
     (1.0, 4.0)),
])
def test_parse_scores_variants(reply, expected):
    assert parse_scores(reply) == expected


@pytest.mark.parametrize("reply, fragment", [
    ("Alignment Score: 4", "no quality score"),
    ("I like this picture a lot.", "no alignment and quality score"),
    ("Alignment Score: 6\nQuality Score: 3", "alignment score 6 is outside 1..5"),
    ("Alignment Score: 3\nQuality Score: 0", "quality score 0 is outside 1..5"),
    ('{"alignment": "great", "quality": 3}', "is not a number"),
    ('{"alignment": true, "quality": 3}', "is not a number"),
])
def test_parse_scores_rejects_bad_replies(reply, fragment):
    with pytest.raises(JudgeReplyError) as e:
        parse_scores(reply)
    assert fragment in str(e.value) and reply[:15] in str(e.value)  # names the reply


def test_bad_reply_through_server_is_an_error_not_a_default(stub, monkeypatch):
    stub.reply = lambda text: "Alignment Score: 5\nQuality Score: 9"
    with pytest.raises(JudgeReplyError, match="quality score 9"):
        make_judge(stub.base_url, monkeypatch)(images(2), ["a", "b"])


def test_retries_after_503_and_429(stub, monkeypatch):
    stub.script = [(503, '{"error": {"message": "model loading"}}', {}),
                   (429, '{"error": {"message": "slow down"}}', {"Retry-After": "0"})]
    out = make_judge(stub.base_url, monkeypatch, max_concurrency=1)(images(1), ["a"])
    assert out["quality"].tolist() == [3.0]
    assert len(stub.requests) == 3


def test_gives_up_after_retries_with_server_message(stub, monkeypatch):
    stub.script = [(500, '{"error": {"message": "CUDA out of memory"}}', {})] * 3
    with pytest.raises(JudgeHTTPError, match="HTTP 500: CUDA out of memory"):
        make_judge(stub.base_url, monkeypatch, retries=2)(images(1), ["a"])
    assert len(stub.requests) == 3  # the first try and two retries


def test_client_error_is_not_retried_and_key_is_redacted(stub, monkeypatch):
    stub.script = [(401, json.dumps({"error": {"message": f"invalid api key {KEY}"}}), {})]
    with pytest.raises(JudgeHTTPError) as e:
        make_judge(stub.base_url, monkeypatch)(images(1), ["a"])
    assert "HTTP 401" in str(e.value) and "[REDACTED]" in str(e.value) and KEY not in str(e.value)
    assert len(stub.requests) == 1


def test_wrong_path_gives_server_message(stub, monkeypatch):
    judge = make_judge(stub.base_url.removesuffix("/v1"), monkeypatch)  # forgot the /v1
    with pytest.raises(JudgeHTTPError, match="HTTP 404: no route /chat/completions"):
        judge(images(1), ["a"])


@pytest.mark.parametrize("body", ["<html>Bad Gateway</html>", '{"choices": []}', '{"id": "x"}'])
def test_malformed_response_is_a_clear_error(stub, monkeypatch, body):
    stub.script = [(200, body, {})]
    with pytest.raises(JudgeHTTPError, match="malformed chat-completions response") as e:
        make_judge(stub.base_url, monkeypatch)(images(1), ["a"])
    assert body[:10] in str(e.value)


def test_unreachable_server_names_url_without_credentials(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = make_judge(f"http://alice:hunter2@127.0.0.1:{port}/v1", monkeypatch, retries=1)
    with pytest.raises(JudgeUnreachableError) as e:
        judge(images(1), ["a"])
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in msg
    assert "2 attempts" in msg and "vllm serve" in msg and "base_url" in msg
    assert "hunter2" not in msg and "alice" not in msg and KEY not in msg


def test_judge_checks_its_inputs(monkeypatch):
    judge = make_judge("http://127.0.0.1:9/v1", monkeypatch)
    with pytest.raises(ValueError, match="images but"):
        judge(images(2), ["only one"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        judge(torch.rand(3, 8, 8), ["a"])


# --------------------------------------------------------------------------------------------
# GenEval
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def meta():
    return load_metadata()


def entry(meta, prompt: str) -> GenEvalEntry:
    return next(e for e in meta if e.prompt == prompt)


def det(label, box, score=0.95, color=None):
    d = {"label": label, "score": score, "box": box}
    if color is not None:
        d["color"] = color
    return d


class ScriptedDetector:
    """Returns the given detections in order; not a real detector, a test double for the rules."""

    def __init__(self, per_image):
        self.per_image, self.calls = list(per_image), []

    def __call__(self, images):
        self.calls.append(tuple(images.shape))
        out, self.per_image = self.per_image[: images.shape[0]], self.per_image[images.shape[0]:]
        return out


def test_shipped_metadata_loads(meta):
    assert len(meta) == 553
    counts = {t: len(select_by_tag(meta, t)) for t in TAGS}
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                      "position": 100, "color_attr": 100}
    for e in select_by_tag(meta, "counting"):  # exact counts: include n, exclude n + 1
        assert e.exclude[0]["count"] == e.include[0]["count"] + 1
    assert meta[0].line == 1 and meta[-1].line == 553
    assert len(select_by_tag(meta, ["colors", "position"])) == 194
    with pytest.raises(ValueError, match="unknown GenEval tags"):
        select_by_tag(meta, "colour")


@pytest.mark.parametrize("bad_line, fragment", [
    ('{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": ', "invalid JSON"),
    ('{"tag": "shapes", "include": [{"class": "cow", "count": 1}], "prompt": "p"}', "tag 'shapes'"),
    ('{"tag": "counting", "include": [{"class": "cow", "count": 0}], "prompt": "p"}', "count"),
    ('{"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "teal"}], "prompt": "p"}', "teal"),
    ('{"tag": "position", "include": [{"class": "a", "count": 1, "position": ["above", 0]}], "prompt": "p"}',
     "position"),
    ('{"tag": "single_object", "include": [], "prompt": "p"}', "non-empty"),
])
def test_malformed_metadata_names_the_line(tmp_path, bad_line, fragment):
    good = '{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}'
    path = tmp_path / "meta.jsonl"
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(GenEvalMetadataError, match="line 3") as e:
        load_metadata(path)
    assert fragment in str(e.value) and str(path) in str(e.value)


def test_single_and_two_object(meta):
    cow = entry(meta, "a photo of a cow")
    assert check_image(cow, [det("cow", (0, 0, 10, 10), 0.5)]) == (True, "")
    assert check_image(cow, [det("cow", (0, 0, 10, 10), 0.2)])[0] is False  # below threshold 0.3
    ok, why = check_image(cow, [det("horse", (0, 0, 10, 10))])
    assert not ok and "expected cow>=1, found 0" in why
    two = entry(meta, "a photo of a bench and a sports ball")
    assert check_image(two, [det("bench", (0, 0, 5, 5)), det("sports ball", (6, 6, 9, 9))])[0]
    ok, why = check_image(two, [det("bench", (0, 0, 5, 5))])
    assert not ok and "sports ball" in why


def test_counting_is_exact_and_uses_strict_threshold(meta):
    clocks = entry(meta, "a photo of two clocks")
    boxes = [(0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10)]
    assert check_image(clocks, [det("clock", b) for b in boxes[:2]])[0]
    ok, why = check_image(clocks, [det("clock", b) for b in boxes])
    assert not ok and "expected clock<3, found 3" in why
    assert not check_image(clocks, [det("clock", boxes[0])])[0]
    # a 0.5-confidence third clock counts elsewhere but not for counting prompts (threshold 0.9)
    assert check_image(clocks, [det("clock", boxes[0]), det("clock", boxes[1]), det("clock", boxes[2], 0.5)])[0]
    assert len(keep_detections([det("clock", b, 0.5) for b in boxes], "two_object")["clock"]) == 3


def test_colors_check_the_top_scoring_objects(meta):
    hydrant = entry(meta, "a photo of a blue fire hydrant")
    assert check_image(hydrant, [det("fire hydrant", (0, 0, 9, 9), color="blue")])[0]
    ok, why = check_image(hydrant, [det("fire hydrant", (0, 0, 9, 9), color="red")])
    assert not ok and "expected blue fire hydrant>=1, found 0 blue" in why
    # only the highest-scoring hydrant is judged, as in GenEval
    assert check_image(hydrant, [det("fire hydrant", (0, 0, 9, 9), 0.6, "red"),
                                 det("fire hydrant", (20, 0, 29, 9), 0.9, "blue")])[0]
    assert not check_image(hydrant, [det("fire hydrant", (0, 0, 9, 9), 0.9, "red"),
                                     det("fire hydrant", (20, 0, 29, 9), 0.6, "blue")])[0]
    with pytest.raises(ValueError, match="without 'color'"):
        check_image(hydrant, [det("fire hydrant", (0, 0, 9, 9))])


def test_color_attr_binds_each_colour_to_its_object(meta):
    e = entry(meta, "a photo of a purple wine glass and a black apple")
    right = [det("wine glass", (0, 0, 9, 9), color="purple"), det("apple", (20, 0, 29, 9), color="black")]
    swapped = [det("wine glass", (0, 0, 9, 9), color="black"), det("apple", (20, 0, 29, 9), color="purple")]
    assert check_image(e, right)[0]
    ok, why = check_image(e, swapped)
    assert not ok and "purple wine glass" in why and "black apple" in why


def test_position_rules(meta):
    e = entry(meta, "a photo of a dog right of a teddy bear")
    bear = det("teddy bear", (0, 40, 20, 60))
    assert check_image(e, [bear, det("dog", (60, 40, 80, 60))])[0]
    ok, why = check_image(e, [bear, det("dog", (-60, 40, -40, 60))])
    assert not ok and "expected dog right of teddy bear, found left of" in why
    # overlapping boxes whose centres differ by less than the margin: no relation at all
    ok, why = check_image(e, [bear, det("dog", (2, 40, 22, 60))])
    assert not ok and "no clear relation" in why
    ok, why = check_image(e, [det("dog", (60, 40, 80, 60))])
    assert not ok and "no target for dog to be right of" in why


def test_relative_position_geometry():
    a, b = (0, 0, 10, 10), (50, 0, 60, 10)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    top, bottom = (0, 0, 10, 10), (0, 50, 10, 60)  # pixel y grows downwards
    assert relative_position(top, bottom) == {"above"} and relative_position(bottom, top) == {"below"}
    assert relative_position((0, 0, 10, 10), (40, 40, 50, 50)) == {"left of", "above"}
    # centres 3 px apart, boxes 10 + 10 wide: 3 < 0.1 * 20, so no relation; with no margin, "left of"
    assert relative_position((0, 0, 10, 10), (3, 0, 13, 10)) == set()
    assert relative_position((0, 0, 10, 10), (3, 0, 13, 10), margin=0.0) == {"left of"}


def test_aggregate_is_mean_of_tag_accuracies():
    tags = ["single_object"] * 4 + ["counting"]
    correct = [True, True, True, True, False]
    tag_acc, overall = aggregate(tags, correct)
    assert tag_acc == {"single_object": 1.0, "counting": 0.0}
    assert overall == 0.5  # not 0.8, the mean over images


def test_score_geneval_end_to_end(meta):
    entries = [entry(meta, "a photo of a cow"), entry(meta, "a photo of a cow"),
               entry(meta, "a photo of two clocks")]
    detector = ScriptedDetector([[det("cow", (0, 0, 4, 4))], [],
                                 [det("clock", (0, 0, 3, 3)), det("clock", (5, 5, 8, 8))]])
    res = score_geneval(entries, torch.rand(3, 3, 8, 8), detector, batch_size=2)
    assert detector.calls == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert res.correct == [True, False, True]
    assert res.prompts == ["a photo of a cow", "a photo of a cow", "a photo of two clocks"]
    assert res.reasons[1] == "expected cow>=1, found 0" and res.reasons[0] == ""
    assert res.tag_accuracy == {"single_object": 0.5, "counting": 1.0} and res.overall == 0.75
    with pytest.raises(ValueError, match="detector returned 0 detection lists"):
        score_geneval(entries[:1], torch.rand(1, 3, 8, 8), ScriptedDetector([]))
    with pytest.raises(ValueError, match="N = 2 entries"):
        score_geneval(entries[:2], torch.rand(3, 3, 8, 8), detector)
