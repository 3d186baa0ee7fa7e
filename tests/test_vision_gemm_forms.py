"""The GEMM-friendly forms the vision tower is recorded with give its own outputs: padded MLP
matrices (vla_node/backends/engine/aligned_mlp.py) compute what the MLPs compute, share the modules'
weights and are swapped in only while active, and Qwen2.5-VL's tower recorded with them equals the
eager tower on CUDA; the patch embedding as one matrix product (patch_linear.py) equals the Conv3d."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_node.backends.engine.aligned_mlp import PAD_TO, AlignedMlps

HIDDEN = 60  # not a multiple of 8, as Qwen2.5-VL's 3420


@pytest.fixture(scope="module")
def unaligned_checkpoint(tmp_path_factory):
    from training.tiny_models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("unaligned"), "qwen2_5_vl", vision_intermediate_size=HIDDEN)


def _model(checkpoint, device="cpu"):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(checkpoint), attn_implementation="sdpa").to(device).eval()


def _frame(checkpoint, device="cpu"):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(checkpoint))
    image = np.random.RandomState(0).randint(0, 256, (240, 320, 3), dtype=np.uint8)
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>x"], images=[image], return_tensors="pt")
    return inputs["pixel_values"].to(device), inputs["image_grid_thw"].to(device)


def _tower(model, pixels, grid):
    with torch.inference_mode():
        return model.model.get_image_features(pixels, grid, return_dict=True).pooler_output[0].clone()


def test_padded_mlps_give_the_towers_outputs(unaligned_checkpoint):
    model = _model(unaligned_checkpoint)
    pixels, grid = _frame(unaligned_checkpoint)
    expected = _tower(model, pixels, grid)
    blocks = model.model.visual.blocks
    aligned = AlignedMlps(blocks)
    assert aligned.padded == len(blocks)
    assert torch.equal(_tower(model, pixels, grid), expected), "outside active() the MLPs are as they were"
    with aligned.active():
        mlp = blocks[0].mlp
        assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.bias.shape[0] == mlp.down_proj.weight.shape[1] == PAD_TO
        padded = _tower(model, pixels, grid)
    assert blocks[0].mlp.gate_proj.weight.shape[0] == blocks[0].mlp.down_proj.weight.shape[1] == HIDDEN
    assert torch.allclose(padded, expected, atol=1e-5), (padded - expected).abs().max()


def test_the_padding_shares_the_modules_weights(unaligned_checkpoint):
    """No copy: a change to a module's weight (in place) is a change to its padded matrix; the padded
    part is zeros; a second AlignedMlps over the same blocks finds the same padded matrices."""
    model = _model(unaligned_checkpoint)
    mlp = model.model.visual.blocks[0].mlp
    aligned = AlignedMlps(model.model.visual.blocks)
    with torch.no_grad():
        mlp.down_proj.weight[3, 7] = 42.0
        mlp.gate_proj.bias[5] = -3.0
    with aligned.active():
        down, gate_bias, gate = mlp.down_proj.weight, mlp.gate_proj.bias, mlp.gate_proj.weight
        assert float(down.detach()[3, 7]) == 42.0 and float(gate_bias.detach()[5]) == -3.0
        assert not down[:, HIDDEN:].any() and not gate[HIDDEN:].any() and not gate_bias[HIDDEN:].any()
        first = [mlp.gate_proj.weight.data_ptr(), mlp.down_proj.weight.data_ptr()]
    again = AlignedMlps(model.model.visual.blocks)
    assert again.padded == aligned.padded
    with again.active():
        assert [mlp.gate_proj.weight.data_ptr(), mlp.down_proj.weight.data_ptr()] == first
        assert mlp.gate_proj.weight.shape[0] == PAD_TO


def test_replaced_and_adapted_mlps_are_left_alone(unaligned_checkpoint):
    from peft import LoraConfig, inject_adapter_in_model

    model = _model(unaligned_checkpoint)
    first, second = (block.mlp for block in model.model.visual.blocks)
    aligned = AlignedMlps(model.model.visual.blocks)
    first.down_proj.weight = torch.nn.Parameter(first.down_proj.weight.detach().clone())  # a new weight
    with aligned.active():
        assert first.gate_proj.weight.shape[0] == HIDDEN, "a replaced weight: the whole MLP computes as it is"
        assert second.gate_proj.weight.shape[0] == PAD_TO

    adapted = _model(unaligned_checkpoint)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["gate_proj"]), adapted.model.visual)
    assert AlignedMlps(adapted.model.visual.blocks).padded == 0, "an adapter's layers are not padded"

    # an adapter loaded after the padding: its updates have the unpadded size, so the MLP computes as it is
    later = _model(unaligned_checkpoint)
    pixels, grid = _frame(unaligned_checkpoint)
    aligned = AlignedMlps(later.model.visual.blocks)
    config = LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False)  # nonzero updates
    inject_adapter_in_model(config, later.model.visual.blocks[0])
    expected = _tower(later, pixels, grid)
    with aligned.active():
        wrapped, plain = (block.mlp for block in later.model.visual.blocks)
        assert wrapped.up_proj.weight.shape[0] == HIDDEN and plain.up_proj.weight.shape[0] == PAD_TO
        got = _tower(later, pixels, grid)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    aligned_model = _model(unaligned_checkpoint)
    for block in aligned_model.model.visual.blocks:  # hidden size 64: aligned already
        mlp = block.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            setattr(mlp, name, torch.nn.Linear(old.in_features, PAD_TO))
        mlp.down_proj = torch.nn.Linear(PAD_TO, mlp.down_proj.out_features)
    assert AlignedMlps(aligned_model.model.visual.blocks).padded == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile_blocks", [False, True], ids=["blocks", "compiled-blocks"])
def test_cuda_recorded_tower_with_padded_mlps_equals_the_eager_tower(unaligned_checkpoint, compile_blocks):
    from vla_node.backends.engine.vision_attention import use_block_attention
    from vla_node.backends.engine.vision_graph import VisionGraphs

    model = _model(unaligned_checkpoint, "cuda")
    pixels, grid = _frame(unaligned_checkpoint, "cuda")
    expected = _tower(model, pixels, grid)
    assert use_block_attention(model)
    graphs = VisionGraphs(model, use_graph=True, compile_blocks=compile_blocks)
    for _ in range(2):
        got = graphs.encode(pixels, grid).pooler_output[0]
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert graphs.graph_replays >= 1 and graphs.compile_blocks == compile_blocks
    assert graphs._aligned.padded == len(model.model.visual.blocks)
    assert model.model.visual.blocks[0].mlp.gate_proj.weight.shape[0] == HIDDEN


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_patch_embedding_as_a_product_gives_the_convolutions_outputs(tiny_checkpoints, family):
    """patch_linear.py: the tower's outputs with its patch embedding as one matrix product (Qwen3-VL's
    with a bias) equal the Conv3d's; outside active() the embedding has its own forward again."""
    from vla_node.backends.engine.patch_linear import PatchEmbedAsLinear

    model = _model(tiny_checkpoints[family])
    pixels, grid = _frame(tiny_checkpoints[family])
    expected = _tower(model, pixels, grid)
    product = PatchEmbedAsLinear(model.model.visual)
    assert product.applies
    with product.active():
        assert "forward" in vars(model.model.visual.patch_embed)
        got = _tower(model, pixels, grid)
    assert "forward" not in vars(model.model.visual.patch_embed)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    model.model.visual.patch_embed.proj.stride = (1, 1, 1)  # no longer one output per patch
    assert not PatchEmbedAsLinear(model.model.visual).applies
    with product.active():  # changed since it was made: the module keeps its own forward
        assert "forward" not in vars(model.model.visual.patch_embed)
