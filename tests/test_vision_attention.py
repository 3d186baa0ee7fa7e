"""The one-call block-diagonal vision attention (vla_node/backends/engine/vision_attention.py) equals
transformers' per-window (Qwen2.5-VL) or per-image (Qwen2-VL, Qwen3-VL) SDPA loop."""
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


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_block_attention_equals_the_per_segment_loop(tiny_checkpoints, family):
    from transformers import AutoModelForImageTextToText

    from vla_node.backends.engine import vision_attention

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoints[family]),
                                                        attn_implementation="sdpa").eval()
    inputs = _vision_inputs(tiny_checkpoints[family])
    per_segment = _encode(model, inputs)
    assert vision_attention.use_block_attention(model)
    assert model.model.visual.config._attn_implementation == vision_attention.BLOCK_ATTENTION
    assert model.config.text_config._attn_implementation == "sdpa"  # the language model is untouched
    one_call = _encode(model, inputs)
    assert torch.allclose(per_segment, one_call, atol=1e-6), (per_segment - one_call).abs().max()

    # two images (and, for Qwen2.5-VL, several windows): attention without the block mask differs
    original = vision_attention.block_diagonal_sdpa

    def unmasked(module, query, key, value, cu_seq_lens_q=None, max_length_q=None, **kwargs):
        return original(module, query, key, value, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(vision_attention.BLOCK_ATTENTION, unmasked)
    try:
        assert not torch.allclose(per_segment, _encode(model, inputs), atol=1e-4)
    finally:
        AttentionInterface.register(vision_attention.BLOCK_ATTENTION, original)


def test_a_single_image_is_one_plain_call(tiny_checkpoints):
    from transformers import AutoModelForImageTextToText

    from vla_node.backends.engine import vision_attention

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoints["qwen3_vl"]),
                                                        attn_implementation="sdpa").eval()
    inputs = _vision_inputs(tiny_checkpoints["qwen3_vl"])
    one = {"pixel_values": inputs["pixel_values"][:int(inputs["image_grid_thw"][0].prod())],
           "image_grid_thw": inputs["image_grid_thw"][:1]}
    expected = _encode(model, one)
    vision_attention.use_block_attention(model)
    segments = []
    original = vision_attention.block_diagonal_sdpa

    def spy(module, query, key, value, cu_seq_lens_q=None, **kwargs):
        segments.append(None if cu_seq_lens_q is None else cu_seq_lens_q.shape[0] - 1)
        return original(module, query, key, value, cu_seq_lens_q=cu_seq_lens_q, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(vision_attention.BLOCK_ATTENTION, spy)
    try:
        assert torch.allclose(expected, _encode(model, one), atol=1e-6)
    finally:
        AttentionInterface.register(vision_attention.BLOCK_ATTENTION, original)
    assert segments and set(segments) == {1}


def test_other_attention_implementations_are_left_alone(tiny_checkpoints):
    from transformers import AutoModelForImageTextToText

    from vla_node.backends.engine.vision_attention import use_block_attention

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoints["qwen2_vl"]), attn_implementation="eager")
    assert not use_block_attention(model)
    assert model.model.visual.config._attn_implementation == "eager"


def test_backend_uses_it_on_cuda_only(tiny_checkpoints):
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(tiny_checkpoints["qwen2_5_vl"]), device="cpu")
    try:  # a CPU pays for the masked N x N attention and has no launch overhead to save
        assert backend.engine.block_vision_attention is False
        assert backend.base_model.model.visual.config._attn_implementation == "sdpa"
    finally:
        backend.close()


def test_gradients_equal_the_per_segment_loop():
    """vla-train switches the block attention on (CUDA): its gradients must be the loop's."""
    from vla_node.backends.engine.vision_attention import block_diagonal_sdpa

    torch.manual_seed(0)
    heads, n, dim = 2, 12, 4
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32)
    inputs = [torch.randn(1, heads, n, dim, requires_grad=True) for _ in range(3)]
    weight = torch.randn(1, n, heads, dim)

    def loop(query, key, value):
        outs = [torch.nn.functional.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b])
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs, dim=2).transpose(1, 2)

    expected = torch.autograd.grad((loop(*inputs) * weight).sum(), inputs)
    out, _ = block_diagonal_sdpa(None, *inputs, cu_seq_lens_q=cu, max_length_q=5)
    got = torch.autograd.grad((out * weight).sum(), inputs)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-5)
