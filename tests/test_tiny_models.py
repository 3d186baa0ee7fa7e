"""Tiny Qwen-VL checkpoints load like real ones and are deterministic."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from tests.fixtures_models import (  # noqa: F401  (pytest fixtures)
    tiny_checkpoints,
    tiny_image,
    tiny_messages,
    tiny_qwen2_5_vl,
)
from training.tiny_models import FAMILIES, QWEN_SPECIAL_TOKENS, build_tiny_checkpoint, main

PROCESSOR = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
MODEL = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_auto_classes(tiny_checkpoints, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_checkpoints[family]
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    assert type(proc).__name__ == PROCESSOR[family]
    assert type(model).__name__ == MODEL[family]
    assert type(proc.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert proc.video_processor is not None
    tok = proc.tokenizer

    # special token ids in the config are the tokenizer's
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i >= 0 for i in ids)
    assert max(ids) < cfg.text_config.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 2000 <= len(tok) <= 4100

    # chat template: Qwen2-VL form with the vision block for image parts
    text = proc.apply_chat_template(tiny_messages("stop"), add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")

    # processor expands the image pad to one token per merged patch; the model runs on it
    inputs = proc(text=[text], images=[tiny_image()], return_tensors="pt")
    grid = inputs["image_grid_thw"][0]
    n_img = int((inputs["input_ids"][0] == cfg.image_token_id).sum())
    assert n_img == int(grid.prod()) // proc.image_processor.merge_size**2
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_is_byte_level_and_bilingual(tiny_qwen2_5_vl):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_5_vl, local_files_only=True)
    for s in [
        'MOVE_OBJECT(object="red cube", destination="blue bowl")\nSTOP()',
        'CLARIFY(reason="看不到红色方块") 把红色方块放到蓝色碗里',
        "emoji 🤖 and accents é ñ, never seen",
    ]:
        ids = tok(s)["input_ids"]
        assert tok.decode(ids) == s
    # the action syntax is cheap (learned merges), special tokens are single ids
    assert len(tok('MOVE_OBJECT(object="red cube", destination="blue bowl")')["input_ids"]) < 20
    assert tok("<|im_start|>assistant\n")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(tok("<|vision_start|><|image_pad|>ok<|im_end|>")["input_ids"], skip_special_tokens=True) == "ok"


def test_deterministic_by_seed(tmp_path, tiny_qwen2_5_vl):
    a = build_tiny_checkpoint(tmp_path / "a", family="qwen2_5_vl", seed=0)
    c = build_tiny_checkpoint(tmp_path / "c", family="qwen2_5_vl", seed=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert _sha(a / name) == _sha(tiny_qwen2_5_vl / name), name
    assert _sha(c / "model.safetensors") != _sha(a / "model.safetensors")
    assert _sha(c / "tokenizer.json") == _sha(a / "tokenizer.json")


def test_size_overrides_and_custom_vocab(tmp_path):
    from transformers import AutoProcessor

    texts = ["hello robot", "PICK_OBJECT(object=\"mug\")"] * 20
    p = build_tiny_checkpoint(
        tmp_path / "t", family="qwen3_vl", vocab_texts=texts, hidden_size=32, min_pixels=32 * 32, max_pixels=96 * 96
    )
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and cfg["text_config"]["hidden_size"] == 32
    proc = AutoProcessor.from_pretrained(p, local_files_only=True)
    assert proc.image_processor.size.shortest_edge == 32 * 32
    assert proc.image_processor.size.longest_edge == 96 * 96
    assert proc.image_processor.patch_size == 16
    assert len(proc.tokenizer) < 1000  # tiny corpus -> tiny vocabulary
    with pytest.raises(ValueError, match="unknown size override"):
        build_tiny_checkpoint(tmp_path / "x", hidden=1)
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_checkpoint(tmp_path / "x", family="llava")


def test_cli(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "training.tiny_models", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    assert "--family" in r.stdout and "qwen3_vl" in r.stdout and "--max-pixels" in r.stdout
    assert main([str(tmp_path / "cli"), "--family", "qwen2_vl", "--seed", "1", "--vision-depth", "1"]) == 0
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl" and cfg["vision_config"]["depth"] == 1
