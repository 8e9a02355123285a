"""The default world's task (GenEval in miniature on real handwritten digits) and its text encoder."""

import collections
import itertools
import json

import numpy as np
import pytest
import torch

from flowbp_ops.judges.geneval import check_image, entry_from
from flowbp_ops.world import scenes
from flowbp_ops.world.scenes import COLORS, TAGS, Scene


def test_every_prompt_parses_back_to_its_scene_and_is_a_geneval_line():
    every = scenes.all_scenes()
    assert collections.Counter(s.tag for s in every) == {"single_object": 10, "two_object": 45, "counting": 30,
                                                         "colors": 40, "position": 360, "color_attr": 540}
    assert len({s.prompt() for s in every}) == len(every)
    for s in every:
        assert scenes.parse_prompt(s.prompt()) == s
        assert scenes.parse_prompt("  A Photo of " + s.prompt()[len("a photo of "):].upper() + " ") == s
        entry_from(s.geneval())  # GenEval's own validation of the metadata line
    assert scenes.parse_prompt("a photo of an eight").objects == ((8, None),)
    assert Scene("position", ((3, None), (7, None)), "right of").geneval()["include"] == [
        {"class": "seven", "count": 1}, {"class": "three", "count": 1, "position": ["right of", 0]}]
    with pytest.raises(ValueError, match="not a default-world prompt"):
        scenes.parse_prompt("a photo of a purple seven")


def test_held_out_split_holds_out_combinations_not_attributes():
    train, test = scenes.split_scenes(seed=0)
    held = scenes.held_out_keys(0)
    assert not any(s.keys() & held for s in train) and all(s.keys() & held or s.tag == "single_object" for s in test)
    assert {t for s in test for t in [s.tag]} == set(TAGS)
    for tag in ("two_object", "colors", "counting"):  # every digit and colour is still trained in each tag
        own = [s for s in train if s.tag == tag]
        assert {d for s in own for d, _ in s.objects} == set(range(10))
    assert {c for s in train if s.tag == "colors" for _, c in s.objects} == set(COLORS)
    assert scenes.split_scenes(seed=0) == (train, test) and scenes.split_scenes(seed=1) != (train, test)


def test_balanced_lists_every_tag_equally_in_every_prefix():
    _, test = scenes.split_scenes(0)
    order = scenes.balanced(test, per_tag=20, seed=0)
    assert len(order) == 20 * len(TAGS)
    for n in (6, 60, 120):
        assert set(collections.Counter(s.tag for s in order[:n]).values()) == {n // len(TAGS)}


def test_placements_satisfy_the_prompt_and_nothing_else():
    s = Scene("position", ((3, None), (7, None)), "left of")
    # the three's column is left of the seven's: same row or diagonal (GenEval's rule on centres)
    assert sorted(c for c, _, _ in scenes.assignments(s)) == [(0, 1), (0, 3), (2, 1), (2, 3)]
    count = Scene("counting", ((5, None),) * 3)
    assert len(scenes.assignments(count)) == 4 and all(len(set(c)) == 3 for c, _, _ in scenes.assignments(count))
    pair = Scene("color_attr", ((1, "red"), (2, "blue")))
    assert len(scenes.assignments(pair)) == 12 and scenes.assignments(pair)[0][1:] == ((2, 3), (0, 2))
    rng = np.random.default_rng(0)
    for scene in scenes.all_scenes()[::7]:
        for canonical in (True, False):
            lay = scenes.layout(scene, rng, canonical)
            assert tuple(lay.cells) in {c for c, _, _ in scenes.assignments(scene)}, (scene, lay)
            assert all(c == want or want is None for c, (_, want) in zip(lay.colors, scene.objects))


def test_renders_draw_each_object_in_its_cell_in_its_colour():
    renderer = scenes.Renderer(half=0)
    scene = Scene("color_attr", ((1, "red"), (7, "blue")))
    images, chosen, labels = renderer.dataset([scene], 8, seed=3, canonical=True)
    assert images.shape == (8, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert chosen == [scene] * 8 and labels[0].tolist() == [[1, 0], [7, 2], [-1, -1], [-1, -1]]
    cells = images.view(8, 3, 2, 16, 2, 16)
    assert cells[:, 0, 0, :, 0].sum() > 5 * cells[:, 2, 0, :, 0].sum()  # red top-left
    assert cells[:, 2, 0, :, 1].sum() > 5 * cells[:, 0, 0, :, 1].sum()  # blue top-right
    assert cells[:, :, 1].sum() == 0  # nothing else drawn
    again, _, _ = renderer.dataset([scene], 8, seed=3, canonical=True)
    assert torch.equal(images, again)
    a, b = scenes.Renderer(half=0).bitmaps, scenes.Renderer(half=1).bitmaps
    assert len(a) + len(b) == 1797 and not any(torch.equal(x, y) for x, y in itertools.product(a[:20], b[:20]))


def test_geneval_rules_read_the_world_like_the_real_metadata():
    """The world's prompts go through GenEval's own rule code (flowbp_ops.judges.geneval)."""
    entry = entry_from(scenes.parse_prompt("a photo of a three left of a seven").geneval())
    three = {"label": "three", "score": 0.9, "box": (1, 1, 14, 14), "color": "green"}
    seven = {"label": "seven", "score": 0.9, "box": (17, 1, 30, 14), "color": "red"}
    assert check_image(entry, [three, seven])[0]
    assert not check_image(entry, [{**three, "box": seven["box"]}, {**seven, "box": three["box"]}])[0]
    counting = entry_from(scenes.parse_prompt("a photo of two fives").geneval())
    five = {"label": "five", "score": 0.95, "box": (1, 1, 14, 14), "color": "red"}
    assert check_image(counting, [five, five])[0] and not check_image(counting, [five, five, five])[0]
    assert json.loads(json.dumps(scenes.Scene("counting", ((5, None),) * 2).geneval()))["exclude"] == [
        {"class": "five", "count": 3}]


def test_minilm_text_encoder_gives_tokens_and_pooled():
    from flowbp_ops.world.text import EMBED_DIM, MiniLMTextEncoder

    enc = MiniLMTextEncoder(max_length=16)
    out = enc.encode(["a photo of a red three and a blue seven", "a photo of four nines",
                      "a photo of a red three and a blue 7"])
    assert out["tokens"].shape == (3, 16, EMBED_DIM) and out["pooled"].shape == (3, EMBED_DIM)
    assert torch.allclose(out["pooled"].norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = out["pooled"] @ out["pooled"].T
    assert sim[0, 2] > sim[0, 1]  # a real sentence encoder: paraphrase closer than a different prompt
    longest = max((s.prompt() for s in scenes.all_scenes()), key=lambda p: len(enc.tokenizer(p)["input_ids"]))
    assert len(enc.tokenizer(longest)["input_ids"]) <= 16  # no world prompt is truncated
    with pytest.raises(ValueError):
        enc.encode([])
