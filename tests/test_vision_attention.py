"""The one-call block-diagonal vision attention (vla_node/backends/vision_attention.py) equals
transformers' per-window SDPA loop on Qwen2.5-VL, and leaves other families alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest_plugins = ["tests.fixtures_models"]


def _vision_inputs(model_dir):
    """Two frames of different sizes (a batch of two commands): windows and images of several lengths."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, (480, 640, 3), dtype=np.uint8), rng.randint(0, 256, (200, 150, 3), dtype=np.uint8)]
    text = "<|vision_start|><|image_pad|><|vision_end|>x"
    return processor(text=[text, text], images=images, padding=True, return_tensors="pt")


def _encode(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    return getattr(out, "pooler_output", out)


def test_block_attention_equals_the_per_window_loop(tiny_checkpoints):
    from transformers import AutoModelForImageTextToText

    from vla_node.backends import vision_attention

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoints["qwen2_5_vl"]),
                                                        attn_implementation="sdpa").eval()
    inputs = _vision_inputs(tiny_checkpoints["qwen2_5_vl"])
    per_window = _encode(model, inputs)
    assert vision_attention.use_block_attention(model)
    assert model.model.visual.config._attn_implementation == vision_attention.BLOCK_ATTENTION
    assert model.config.text_config._attn_implementation == "sdpa"  # the language model is untouched
    one_call = _encode(model, inputs)
    assert torch.allclose(per_window, one_call, atol=1e-6), (per_window - one_call).abs().max()

    # the frame spans several windows: attention without the block mask gives other features
    original = vision_attention.block_diagonal_sdpa

    def unmasked(module, query, key, value, cu_seq_lens_q=None, max_length_q=None, **kwargs):
        return original(module, query, key, value, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(vision_attention.BLOCK_ATTENTION, unmasked)
    try:
        assert not torch.allclose(per_window, _encode(model, inputs), atol=1e-4)
    finally:
        AttentionInterface.register(vision_attention.BLOCK_ATTENTION, original)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_families_keep_their_attention(family, tiny_checkpoints):
    from transformers import AutoModelForImageTextToText

    from vla_node.backends.vision_attention import use_block_attention

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoints[family]), attn_implementation="sdpa")
    assert not use_block_attention(model)
    assert model.model.visual.config._attn_implementation == "sdpa"


def test_backend_uses_it_on_cuda_only(tiny_checkpoints):
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(tiny_checkpoints["qwen2_5_vl"]), device="cpu")
    try:  # a CPU pays for the masked N x N attention and has no launch overhead to save
        assert backend.block_vision_attention is False
        assert backend.base_model.model.visual.config._attn_implementation == "sdpa"
    finally:
        backend.close()
