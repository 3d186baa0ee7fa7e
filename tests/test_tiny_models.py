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


def test_sincos_init_tells_places_and_neighbouring_numbers_apart(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    texts = ["PICK_OBJECT(object=\"mug\", object_box=[12, 40, 300, 210])"] * 20
    random = build_tiny_checkpoint(tmp_path / "r", family="qwen3_vl", vocab_texts=texts, whole_numbers=1)
    sincos = build_tiny_checkpoint(tmp_path / "s", family="qwen3_vl", vocab_texts=texts, whole_numbers=1,
                                   sincos_positions=1, sincos_numbers=1)
    tok = AutoTokenizer.from_pretrained(sincos)
    ids = [tok.encode(f" {n}", add_special_tokens=False)[0] for n in (100, 101, 300)]

    def cosines(weights, name):
        rows = torch.nn.functional.normalize(weights[name][ids], dim=1)
        return float(rows[0] @ rows[1]), float(rows[0] @ rows[2])

    def position_norm(weights):  # the position grid against the patch embedding it is added to
        return float(weights["model.visual.pos_embed.weight"].norm(dim=1).mean())

    w_random, w_sincos = load_file(random / "model.safetensors"), load_file(sincos / "model.safetensors")
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        near, far = cosines(w_sincos, name)
        assert near > 0.3 and near > far + 0.2, name  # 100 starts like 101, not like 300
        assert abs(cosines(w_random, name)[0]) < 0.2, name
    # the grid's rows are as long as a patch embedding (random ones are ~15x shorter), and distinct
    assert position_norm(w_sincos) > 5 * position_norm(w_random)
    grid = w_sincos["model.visual.pos_embed.weight"]
    assert float(torch.cdist(grid[:24], grid[:24]).add(torch.eye(24) * 1e9).min()) > 0.1
    # other weights: the same draws
    assert torch.equal(w_sincos["model.visual.patch_embed.proj.weight"], w_random["model.visual.patch_embed.proj.weight"])
    with pytest.raises(ValueError, match="qwen3_vl"):
        build_tiny_checkpoint(tmp_path / "x", family="qwen2_5_vl", sincos_positions=1)
    with pytest.raises(ValueError, match="whole_numbers"):
        build_tiny_checkpoint(tmp_path / "y", family="qwen3_vl", sincos_numbers=1)
