"""HPSv3 on a small random-init Qwen2-VL of the released architecture (nothing can be downloaded here): the
published checkpoint layout converted and loaded, the scoring conversation, μ at the <|Reward|> token, and the
reward_models stage that fetches and converts it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
# the shape of Qwen2-VL's template for one user turn with an image and text
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
            "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
            "'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A base folder (configs, tokenizer) and an HPSv3.safetensors in the published (pre-4.52) key layout."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from flowbp_ops.rewards.hpsv3 import INSTRUCTION, REWARD_TOKEN, head

    root = tmp_path_factory.mktemp("hpsv3")
    base = root / "Qwen2-VL-base"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([INSTRUCTION, "a red cat on the left", "user assistant"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIALS[1:])
    tok.save_pretrained(base)
    (base / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(base)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=len(tok),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    config.save_pretrained(base)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.resize_token_embeddings(len(tok) + 1)  # + <|Reward|>, as the released model
    rm = head(32)
    legacy = {}
    for k, v in model.state_dict().items():  # today's keys back to the layout the checkpoint was saved in
        k = re.sub(r"^model\.visual\.", "visual.", k)
        legacy[re.sub(r"^model\.language_model\.", "model.", k)] = v.contiguous()
    legacy.update({f"rm_head.{k}": v for k, v in rm.state_dict().items()})
    save_file(legacy, str(root / "HPSv3.safetensors"))
    return root, base, model.eval(), rm.eval(), REWARD_TOKEN


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # square: exactly 448² after resizing


def test_converted_checkpoint_scores_mu_at_the_reward_token(released, tmp_path):
    from flowbp_ops.rewards.hpsv3 import PIXELS, HPSv3Reward, convert_checkpoint

    root, base, model, rm, token = released
    convert_checkpoint(root / "HPSv3.safetensors", tmp_path / "hpsv3", base)
    reward = HPSv3Reward(tmp_path / "hpsv3")
    images, prompts = _images(2), ["a red cat", "a blue dog on the left"]
    scores = reward(images, prompts)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # the released model itself, on the same conversation, read at <|Reward|> through its head
    batch = reward._batch(images, prompts)
    assert int(batch["image_grid_thw"][0].prod()) * 14 * 14 == PIXELS  # every image at 256·28·28 pixels
    assert (batch["input_ids"] == reward.tokenizer.convert_tokens_to_ids(token)).sum(1).tolist() == [1, 1]
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                             mm_token_type_ids=batch["mm_token_type_ids"]).last_hidden_state
        expected = rm(hidden[batch["input_ids"] == reward.reward_id])[:, 0]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scores, reward(images, ["a red cat", "a red cat"]))  # the prompt matters


def test_a_checkpoint_of_another_model_is_refused(released, tmp_path):
    from safetensors.torch import load_file, save_file

    from flowbp_ops.rewards.hpsv3 import convert_checkpoint

    root, base, *_ = released
    state = {k: v for k, v in load_file(str(root / "HPSv3.safetensors")).items() if not k.startswith("rm_head.")}
    save_file(state, str(tmp_path / "no_head.safetensors"))
    with pytest.raises(ValueError, match="not an HPSv3 checkpoint"):
        convert_checkpoint(tmp_path / "no_head.safetensors", tmp_path / "out", base)


def test_reward_models_stage_fetches_and_converts_hpsv3(released, tmp_path):
    from flowbp_ops import stages
    from flowbp_ops.params import Params
    from flowbp_ops.rewards.base import get_reward
    from flowbp_ops.training.config import TrainConfig

    root, base, *_ = released
    params = Params.model_validate({"world_dir": str(tmp_path / "world"), "rewards": {
        "source": "", "models": {"hpsv3": str(root / "HPSv3.safetensors")}, "tokenizers": {"hpsv3": str(base)}}})
    meta = stages.reward_models(params)
    assert len(meta["hpsv3.sha256"]) == 64
    scores = get_reward("hpsv3", world_dir=tmp_path / "world")(_images(2), ["a cat", "a dog"])
    assert scores.shape == (2,)
    with pytest.raises(Exception, match="hpsv3 scores without gradient"):  # an evaluation reward only
        TrainConfig(reward="hpsv3")
    assert Path(tmp_path / "world" / "rewards" / "hpsv3" / "rm_head.safetensors").exists()
