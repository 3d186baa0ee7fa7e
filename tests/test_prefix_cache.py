"""System-prompt prefix KV reuse changes no output: greedy tokens and every step's logits are the
same with and without it, for every Qwen-VL family, with the vision cache, adapters, constrained
decoding, a stop event, another system text and a static decode cache. It prefills the prefix once.

The tiny random checkpoints have small logits (|logit| < 1), so answers are compared on the logits
(to 1e-5) as well as on the tokens: a prefix prefilled at positions shifted by one moves them by
about 3e-4 while leaving the tokens unchanged."""
from __future__ import annotations


import numpy as np
import pytest

from tests.fixtures_models import TEST_VOCAB_FINGERPRINT, tiny_image, tiny_messages
from tests.stop_events import SetOnCheck
from vla_node.backends.base import BackendError, GenerationRequest
from vla_node.backends.engine import EngineOptions
from vla_node.backends.engine.frame_cache import VisionCache
from vla_node.backends.engine.prefix_cache import PrefixCache
from vla_node.backends.transformers_backend import TransformersBackend

COMMANDS = ("put the red cube in the blue bowl", "pick up the green ball")
NEW_TOKENS = 6


class Answer:
    """One generation's text, token count and per-step logits; == compares them (logits to 1e-5)."""

    def __init__(self, text: str, new_tokens: int, logits):
        self.text, self.new_tokens, self.logits = text, new_tokens, logits

    def __eq__(self, other):
        import torch

        return (self.text, self.new_tokens) == (other.text, other.new_tokens) and \
            self.logits.shape == other.logits.shape and torch.allclose(self.logits, other.logits, rtol=0, atol=1e-5)

    def __repr__(self):
        return f"Answer({self.text!r}, {self.new_tokens}, logits[0,:4]={self.logits[0, :4].tolist()})"


def _record_logits(backend):
    """Each generate call's per-step logits (steps x vocab), by wrapping the model's generate;
    returns (recorded, undo)."""
    import torch

    recorded = []
    model = backend.base_model
    original = model.generate
    wrapped_before = "generate" in vars(model)

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        recorded.append(torch.stack([step[0] for step in out.logits]).float())
        return out

    def undo():
        if wrapped_before:
            model.generate = original
        else:
            del model.generate  # back to the class's method

    model.generate = recording
    return recorded, undo


def _answers(backend, image: np.ndarray, messages_for=tiny_messages, stop_after=None) -> list[Answer]:
    recorded, undo = _record_logits(backend)
    out = []
    try:
        for command in COMMANDS:
            result = backend.generate(GenerationRequest(image=image, messages=messages_for(command),
                                                        max_new_tokens=NEW_TOKENS,
                                                        stop_event=stop_after and SetOnCheck(stop_after)))
            out.append(Answer(result.text, result.new_tokens, recorded[-1]))
    finally:
        undo()
    return out


def _with_and_without_reuse(backend, image, messages_for=tiny_messages):
    # the same engine (its recordings, its cache's statistics) with its prefix cache set aside
    enabled = backend.engine.prefix_cache
    backend.engine.prefix_cache = PrefixCache(enabled.boundary_token_id, capacity=0)
    without = _answers(backend, image, messages_for)
    backend.engine.prefix_cache = enabled
    with_reuse = _answers(backend, image, messages_for)
    return without, with_reuse


def _count_language_model_tokens(backend) -> list[int]:
    """Counts the tokens the language model runs on, by wrapping its forward."""
    seen = [0]
    language_model = backend.base_model.model.language_model
    original = language_model.forward

    def counted(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        seen[0] += int((embeds if embeds is not None else ids).shape[1])
        return original(*args, **kwargs)

    language_model.forward = counted
    return seen


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_outputs_identical_with_and_without_prefix_reuse(tiny_checkpoints, family):
    backend = TransformersBackend(tiny_checkpoints[family], device="cpu", max_new_tokens=NEW_TOKENS)
    assert backend.engine.prefix_cache.capacity > 0, "prefix reuse is on by default"
    image = tiny_image(168, 112)
    # combined with the per-frame vision cache (the default) and, for one family, alone
    vision_cache_capacities = (0, 2) if family == "qwen2_5_vl" else (2,)
    for vision_cache_capacity in vision_cache_capacities:
        backend.engine.vision_cache = VisionCache(capacity=vision_cache_capacity)
        backend.engine.prefix_cache.clear()
        without, with_reuse = _with_and_without_reuse(backend, image)
        assert with_reuse == without
    stats = backend.prefix_cache_stats
    runs = len(vision_cache_capacities)
    assert (stats["misses"], stats["hits"]) == (runs, runs), stats  # one prefill per clear, then reused

    # with reuse the language model runs on the prefix once, not once per command
    input_ids = backend.prepare_inputs(image, tiny_messages())["input_ids"]
    prefix_len = backend.engine.prefix_cache.prefix_length(input_ids)
    assert prefix_len > input_ids.shape[1] // 4, "the system text is a large share of the prompt"
    backend.engine.prefix_cache.clear()
    seen = _count_language_model_tokens(backend)
    answers = _answers(backend, image)
    prompts = [backend.prepare_inputs(image, tiny_messages(c))["input_ids"].shape[1] for c in COMMANDS]
    prefill_tokens = sum(prompts) - prefix_len  # the second command skips the prefix
    decode_steps = sum(answer.new_tokens - 1 for answer in answers)  # the last token is never fed back
    assert seen[0] == prefill_tokens + decode_steps
    backend.close()


def test_adapter_switch_never_reuses_the_other_models_prefix(tiny_model_dir, tiny_adapter):
    backend = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=NEW_TOKENS,
                                  vocab_fingerprint=TEST_VOCAB_FINGERPRINT)
    backend.load_adapter(str(tiny_adapter), "a")
    image = tiny_image(168, 112)
    base_without, base_with = _with_and_without_reuse(backend, image)
    backend.set_adapter("a")
    adapter_without, adapter_with = _with_and_without_reuse(backend, image)
    assert base_with == base_without and adapter_with == adapter_without
    assert adapter_with != base_with, "the random adapter must change the answers (else this proves nothing)"
    stats = backend.prefix_cache_stats
    assert (stats["misses"], stats["hits"], stats["entries"]) == (2, 2, 2), stats
    backend.set_adapter(None)
    assert _answers(backend, image) == base_without  # back to the base model's cached prefix
    assert backend.prefix_cache_stats["hits"] == 4
    backend.close()


def test_constrained_decoding_and_stop_event_with_prefix_reuse(tiny_model_dir):
    from vla_node.vocabulary import Vocabulary

    backend = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=NEW_TOKENS)
    backend.enable_constrained_decoding(Vocabulary.load())
    image = tiny_image(168, 112)
    without, with_reuse = _with_and_without_reuse(backend, image)
    assert with_reuse == without
    assert all(answer.text for answer in with_reuse), "the grammar forces an action"

    backend.disable_constrained_decoding()
    enabled = backend.engine.prefix_cache
    backend.engine.prefix_cache = PrefixCache(enabled.boundary_token_id, capacity=0)
    without = _answers(backend, image, stop_after=3)
    backend.engine.prefix_cache = enabled
    with_reuse = _answers(backend, image, stop_after=3)
    assert with_reuse == without
    assert all(answer.new_tokens == 2 for answer in with_reuse), "stopped after two tokens"
    backend.close()


def test_another_system_text_is_a_miss_and_still_identical(tiny_model_dir):
    backend = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=NEW_TOKENS)
    image = tiny_image(168, 112)
    _answers(backend, image)
    assert backend.prefix_cache_stats["misses"] == 1

    def other_system(command):
        messages = tiny_messages(command)
        messages[0] = {"role": "system", "content": [{"type": "text", "text": "Another robot. " * 12}]}
        return messages

    without, with_reuse = _with_and_without_reuse(backend, image, other_system)
    assert with_reuse == without
    assert with_reuse != _answers(backend, image), "another system text must change the answers"
    stats = backend.prefix_cache_stats
    assert (stats["misses"], stats["entries"]) == (2, 2), stats
    backend.close()


def test_prefix_cache_is_lru_and_skips_short_or_imageless_prompts():
    import torch

    cache = PrefixCache(boundary_token_id=7, capacity=1, min_tokens=3)
    assert cache.prefix_length(torch.tensor([[1, 2, 3, 7, 5]])) == 3
    assert cache.prefix_length(torch.tensor([[1, 2, 7, 5]])) == 0  # too short to be worth a prefill
    assert cache.prefix_length(torch.tensor([[1, 2, 3, 4]])) == 0  # no image marker
    assert cache.seed(None, torch.tensor([[1, 2, 3, 4]]), ("",)) is None
    assert cache.stats["skipped"] == 1
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        PrefixCache(boundary_token_id=7, capacity=-1)


def test_static_decode_cache_gives_the_same_tokens(tiny_model_dir):
    import torch

    dynamic = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=NEW_TOKENS, decode_cache="dynamic")
    image = tiny_image(168, 112)
    expected = _answers(dynamic, image)
    dynamic.close()
    # generate's prefill on the static cache (PrefillGraphs: tests/test_prefill_graph.py)
    static = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=NEW_TOKENS,
                                 engine=EngineOptions(decode_cache="static", static_prefill=False))
    assert static.decode_cache == "static"
    cache_types, cache_ids = [], set()
    original = static.base_model.generate

    def recording(*args, **kwargs):
        cache_types.append(type(kwargs.get("past_key_values")).__name__)
        cache_ids.add(id(kwargs.get("past_key_values")))
        return original(*args, **kwargs)

    static.base_model.generate = recording  # _answers wraps this wrapper and restores it
    without, with_reuse = _with_and_without_reuse(static, image)  # empty static cache / static cache + prefix
    # generate() only prefills here (the static decoder takes the later steps, whose logits
    # tests/test_static_decode.py compares): compare the answers
    answers = [[(answer.text, answer.new_tokens) for answer in run] for run in (without, with_reuse, expected)]
    assert answers[0] == answers[2] and answers[1] == answers[2]
    assert without[0].logits.shape[0] == 1 and torch.allclose(with_reuse[0].logits, expected[0].logits[:1], atol=1e-5)
    assert cache_types == ["StaticCache"] * 4
    assert len(cache_ids) == 1  # one cache, reused per request: its addresses stay (CUDA graphs replay)
    assert static.prefix_cache_stats["hits"] == 1
    prompt_len = static.prepare_inputs(image, tiny_messages())["input_ids"].shape[1]
    slots = static.engine._static_cache_len
    assert slots % 256 == 0 and slots >= prompt_len + NEW_TOKENS
    assert slots >= static.engine.options.static_cache_min_slots == 2048, "room for a camera frame's prompt"
    static.close()


def test_decode_cache_auto_and_bad_value(tiny_model_dir):
    with pytest.raises(BackendError, match="invalid decode_cache 'compiled'; use one of auto, dynamic, static"):
        TransformersBackend(tiny_model_dir, device="cpu", decode_cache="compiled")
    from vla_node.factory import RuntimeSettings, build_backend
    from vla_node.vocabulary import Vocabulary

    with pytest.raises(BackendError, match="invalid decode_cache 'fast'"):  # the node parameter reaches the backend
        build_backend(RuntimeSettings(model_path=str(tiny_model_dir), device="cpu", decode_cache="fast"),
                      Vocabulary.load())
    backend = build_backend(RuntimeSettings(model_path=str(tiny_model_dir), device="cpu", prefix_cache=False,
                                            constrained_decoding=False, compile_decode=False,
                                            compile_layers=False), Vocabulary.load())
    assert backend.decode_cache == "dynamic", "auto is dynamic on CPU"
    options = backend.engine.options
    assert options.compile_decode is False and options.compile_layers is False, "the node parameters reach the engine"
    assert backend.engine.prefix_cache.capacity == 0
    backend.generate(GenerationRequest(image=tiny_image(168, 112), messages=tiny_messages(), max_new_tokens=2))
    assert backend.prefix_cache_stats == {"hits": 0, "misses": 0, "skipped": 0, "entries": 0}
    backend.close()


def test_the_static_cache_keeps_its_prefix_between_requests(tiny_model_dir):
    dynamic = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=NEW_TOKENS, decode_cache="dynamic")
    static = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=NEW_TOKENS, decode_cache="static")
    image = tiny_image(168, 112)
    copies = []
    original = PrefixCache._copy

    def counted(model, layers, into):
        if into is not None:  # into the static cache (a dynamic one gets a copy per request)
            copies.append(into)
        return original(model, layers, into)

    PrefixCache._copy = staticmethod(counted)
    try:
        def texts(backend):
            results = [backend.generate(GenerationRequest(image=image, messages=tiny_messages(command),
                                                          max_new_tokens=NEW_TOKENS)) for command in COMMANDS]
            return [(r.text, r.new_tokens, round(r.confidence, 5)) for r in results]

        expected = texts(dynamic)
        assert texts(static) == expected and texts(static) == expected
        assert len(copies) == 1, "the prefix is written into the static cache once, then stays"
        enabled = static.engine.prefix_cache  # a request without reuse empties the cache ...
        static.engine.prefix_cache = PrefixCache(enabled.boundary_token_id, capacity=0)
        assert texts(static) == expected
        static.engine.prefix_cache = enabled  # ... so the next one writes the prefix again
        assert texts(static) == expected and len(copies) == 2
        static.set_adapter(None)  # same adapter scope: still resident
        assert texts(static) == expected and len(copies) == 2
    finally:
        PrefixCache._copy = staticmethod(original)
    assert static.prefix_cache_stats["hits"] == 4 * len(COMMANDS) - 1  # 8 requests with reuse, the first prefills
    static.close()
    dynamic.close()
