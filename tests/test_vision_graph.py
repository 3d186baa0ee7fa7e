"""The vision tower on pre-computed grid tensors (vla_node/backends/engine/vision_graph.py) gives the
tower's own outputs, reads nothing back to the host (so it can be recorded as a CUDA graph), and is
replayed per grid on CUDA; the backend drops its recordings when the adapter changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures_models import tiny_image, tiny_messages
from tests.host_reads import no_host_reads
from vla_node.backends.base import GenerationRequest
from vla_node.backends.engine import EngineOptions
from vla_node.backends.engine.vision_attention import use_block_attention
from vla_node.backends.engine.vision_graph import VisionGraphs, supports

pytest_plugins = ["tests.fixtures_models"]

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _inputs(model_dir, sizes):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    text = "<|vision_start|><|image_pad|><|vision_end|>x"
    return processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")


def _load(model_dir, device="cpu"):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), attn_implementation="sdpa").to(device).eval()


def _features(outputs) -> list[torch.Tensor]:
    """Every per-image tensor get_image_features returns: embeddings, then Qwen3-VL's deepstack features."""
    tensors = list(outputs.pooler_output)
    for level in getattr(outputs, "deepstack_features", None) or []:
        tensors += list(level)
    return tensors


def _assert_same(expected, got, atol):
    a, b = _features(expected), _features(got)
    assert len(a) == len(b) and len(a) >= 1
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.allclose(x.float(), y.float(), atol=atol), (x.float() - y.float()).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_tower_equals_get_image_features(tiny_checkpoints, family):
    model = _load(tiny_checkpoints[family])
    assert supports(model)
    batch = _inputs(tiny_checkpoints[family], [(640, 480), (150, 200)])
    single = _inputs(tiny_checkpoints[family], [(168, 112)])
    with torch.inference_mode():
        expected = [model.model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True)
                    for x in (batch, single)]
    use_block_attention(model)  # what the backend switches on with the graphs (CUDA)
    graphs = VisionGraphs(model, use_graph=True)  # no CUDA here: the pre-computed call runs eagerly
    for _ in range(2):
        for inputs, want in zip((batch, single), expected):
            _assert_same(want, graphs.encode(inputs["pixel_values"], inputs["image_grid_thw"]), atol=1e-5)
    assert (graphs.misses, graphs.hits) == (2, 2)  # one plan per grid, reused
    assert graphs.graph_replays == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_planned_tower_reads_nothing_back_to_the_host(tiny_checkpoints, family):
    model = _load(tiny_checkpoints[family])
    use_block_attention(model)
    inputs = _inputs(tiny_checkpoints[family], [(640, 480), (150, 200)])
    graphs = VisionGraphs(model, use_graph=False)
    with torch.inference_mode():
        recorded = graphs._record(inputs["pixel_values"], inputs["image_grid_thw"])  # the plan: host work, once
        with no_host_reads():
            graphs._run(recorded.pixels, recorded.grid_thw, recorded.plan)
        # without the plan the tower does read (the check can fail)
        with pytest.raises(AssertionError, match="host read"), no_host_reads():
            graphs._run(recorded.pixels, recorded.grid_thw, {})


def test_backend_encodes_through_the_graphs_and_drops_them_with_the_adapter(tiny_model_dir, tiny_adapter):
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=4, engine=EngineOptions(frame_cache=0))
    engine = backend.engine
    try:
        assert engine.vision_graphs is None  # CUDA only
        image = tiny_image(168, 112)
        request = GenerationRequest(image=image, messages=tiny_messages(), max_new_tokens=4)
        plain = backend.generate(request)
        engine.vision_graphs = VisionGraphs(backend.base_model, use_graph=False)  # the CPU's eager "graphs"
        through = backend.generate(request)
        assert (through.text, through.new_tokens) == (plain.text, plain.new_tokens)
        assert abs(through.confidence - plain.confidence) < 1e-5
        assert len(engine.vision_graphs._lru) == 1  # encoded by the graphs even with the frame cache off
        backend.load_adapter(str(tiny_adapter), "a")
        backend.set_adapter("a")
        assert len(engine.vision_graphs._lru) == 0
    finally:
        backend.close()
    assert engine.vision_graphs is None and backend.engine is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile_blocks", [False, True], ids=["blocks", "compiled-blocks"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_replays_equal_the_eager_tower(tiny_checkpoints, family, compile_blocks):
    model = _load(tiny_checkpoints[family], "cuda")
    frames = [_inputs(tiny_checkpoints[family], [size]) for size in [(640, 480), (320, 240)]]
    frames = [{k: v.to("cuda") for k, v in f.items()} for f in frames]
    with torch.inference_mode():
        expected = [model.model.get_image_features(f["pixel_values"], f["image_grid_thw"], return_dict=True)
                    for f in frames]
    assert use_block_attention(model)
    graphs = VisionGraphs(model, use_graph=True, compile_blocks=compile_blocks)
    kept = graphs.encode(frames[0]["pixel_values"], frames[0]["image_grid_thw"])
    for _ in range(2):
        for f, want in zip(frames, expected):
            _assert_same(want, graphs.encode(f["pixel_values"], f["image_grid_thw"]), atol=1e-4)
    assert graphs.use_graph and graphs.graph_replays >= 4
    assert graphs.compile_blocks == compile_blocks, "the compiled blocks were recorded (no fall-back)"
    assert not any("forward" in vars(block) for block in model.model.visual.blocks), "own forwards outside"
    _assert_same(expected[0], kept, atol=1e-4)  # outputs handed out earlier are copies, not overwritten
