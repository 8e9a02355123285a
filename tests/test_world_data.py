"""The default world's data and text encoder (real data and a real encoder, both offline)."""

import pytest
import torch

from flowbp_ops.world import digits
from flowbp_ops.world.digits import COLORS, POSITIONS, SIZES, Spec


def test_splits_hold_out_combinations_not_attributes():
    train, test = digits.split_specs(seed=0)
    assert len(train) + len(test) == 10 * len(COLORS) * len(SIZES) * len(POSITIONS)
    train_combos = {(s.digit, s.color, s.position) for s in train}
    assert test and not any((s.digit, s.color, s.position) in train_combos for s in test)
    for attr, values in [("digit", range(10)), ("color", COLORS), ("position", POSITIONS)]:
        assert {getattr(s, attr) for s in train} == set(values)  # every single attribute is still trained
    assert digits.split_specs(seed=0) == (train, test) and digits.split_specs(seed=1) != (train, test)


def test_prompts_paraphrase_all_attributes():
    s = Spec(7, "blue", "large", "left")
    prompts = {s.prompt(t) for t in range(len(digits.TEMPLATES))}
    assert len(prompts) == len(digits.TEMPLATES)
    for p in prompts:
        assert "blue" in p and "large" in p and "left" in p and ("7" in p or "seven" in p)


def test_render_draws_colour_size_and_position():
    bitmaps, labels = digits.load_digit_bitmaps()
    assert bitmaps.shape == (1797, 8, 8) and 0 <= bitmaps.min() and bitmaps.max() <= 1
    glyph = torch.from_numpy(bitmaps[[0, 0]])
    imgs = digits.render(glyph, [Spec(0, "red", "small", "left"), Spec(0, "green", "large", "right")])
    assert imgs.shape == (2, 3, 32, 32) and imgs.min() >= 0 and imgs.max() <= 1
    mass = imgs.sum(1)
    cols = torch.arange(32.0)
    centre = (mass * cols).sum((1, 2)) / mass.sum((1, 2))
    assert centre[0] < 12 and centre[1] > 16  # left vs right
    assert (mass[0] > 0.05).sum() < (mass[1] > 0.05).sum()  # small vs large
    red, green = imgs[0].sum((1, 2)), imgs[1].sum((1, 2))
    assert red.argmax() == 0 and green.argmax() == 1


def test_sample_dataset_is_seeded():
    bitmaps, labels = digits.load_digit_bitmaps()
    train, _ = digits.split_specs()
    a = digits.sample_dataset(train, 16, 3, bitmaps, labels)
    b = digits.sample_dataset(train, 16, 3, bitmaps, labels)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert all(isinstance(p, str) and p for p in a[2])


def test_minilm_text_encoder_gives_tokens_and_pooled():
    from flowbp_ops.world.text import EMBED_DIM, MiniLMTextEncoder

    enc = MiniLMTextEncoder(max_length=16)
    out = enc.encode(["a small red seven on the left", "a large blue two on the right",
                      "a small red seven on the left side"])
    assert out["tokens"].shape == (3, 16, EMBED_DIM) and out["pooled"].shape == (3, EMBED_DIM)
    assert torch.allclose(out["pooled"].norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = out["pooled"] @ out["pooled"].T
    assert sim[0, 2] > sim[0, 1]  # a real sentence encoder: paraphrase closer than a different prompt
    with pytest.raises(ValueError):
        enc.encode([])
