"""The per-frame vision cache changes no output, runs the vision tower once per frame, and keys
on everything that decides the vision tower's result (pixels, adapter)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures_models import tiny_image, tiny_messages
from vla_node.backends.base import GenerationRequest
from vla_node.backends.engine import EngineOptions
from vla_node.backends.engine.frame_cache import VisionCache
from vla_node.backends.transformers_backend import TransformersBackend

COMMANDS = ("put the red cube in the blue bowl", "pick up the green ball")


def _answers(backend, image: np.ndarray) -> list[tuple[str, int, float]]:
    results = [backend.generate(GenerationRequest(image=image, messages=tiny_messages(c), max_new_tokens=6))
               for c in COMMANDS]
    return [(r.text, r.new_tokens, round(r.confidence, 6)) for r in results]


def _count_vision_runs(backend) -> list[int]:
    """Counts calls of the vision tower itself (not of the cache), by wrapping its forward."""
    calls = [0]
    visual = backend.base_model.model.visual
    original = visual.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    visual.forward = counted
    return calls


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_outputs_identical_with_and_without_cache_and_vision_runs_once(tiny_checkpoints, family):
    backend = TransformersBackend(tiny_checkpoints[family], device="cpu", max_new_tokens=6,
                                  engine=EngineOptions(frame_cache=0))
    image = tiny_image(168, 112)
    uncached = _answers(backend, image)

    backend.use_engine(EngineOptions(frame_cache=2))
    runs = _count_vision_runs(backend)
    cached = _answers(backend, image)
    assert cached == uncached
    assert runs[0] == 1, "two commands about one frame must encode it once"
    assert (backend.engine.vision_cache.misses, backend.engine.vision_cache.hits) == (1, 1)

    _answers(backend, tiny_image(168, 112, seed=1))  # another frame: encoded again
    assert runs[0] == 2
    backend.close()


def test_cache_keys_on_adapter_and_evicts_oldest(tiny_model_dir, tiny_adapter):
    backend = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=4, engine=EngineOptions(frame_cache=1))
    backend.load_adapter(str(tiny_adapter), "a")
    image = tiny_image(168, 112)
    request = GenerationRequest(image=image, messages=tiny_messages(), max_new_tokens=2)
    backend.generate(request)
    backend.set_adapter("a")  # an adapter may reach the vision tower: never reuse across adapters
    backend.generate(request)
    assert backend.engine.vision_cache.misses == 2 and backend.engine.vision_cache.hits == 0
    backend.set_adapter(None)
    backend.generate(request)  # capacity 1: the base model's entry was evicted by the adapter's
    assert backend.engine.vision_cache.misses == 3
    backend.close()


def test_capacity_must_not_be_negative():
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        VisionCache(capacity=-1)
