"""Static decoding (vla_node/backends/engine/static_decode.py) changes no output: each step's logits,
the tokens, the text and the confidence equal the plain path (transformers' generate loop on a
DynamicCache, the backend without its engine), for every
Qwen-VL family, with the prefix and vision caches, adapters (switched between requests),
constrained decoding, stop events, every token budget and a cache that has to grow; and on the
embedded model, whose answers end with an end-of-answer token before the budget.

On CPU the step runs eagerly; on CUDA the same step is recorded as a CUDA graph: the last test
(skipped without a GPU) checks the graph gives the eager step's answers."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.decode_answers import COMMANDS, NEW_TOKENS, answers, assert_same
from tests.fixtures_models import TEST_VOCAB_FINGERPRINT, tiny_image, tiny_messages
from vla_node.backends.base import GenerationRequest
from vla_node.backends.engine import EngineOptions
from vla_node.backends.engine.static_decode import StaticDecoder
from vla_node.backends.transformers_backend import TransformersBackend

EMBEDDED = Path(__file__).resolve().parents[1] / "models" / "tabletop-tiny"


def _pair(model_dir, static_slots: int = EngineOptions.static_cache_min_slots, **kwargs):
    """A backend decoding on the engine's static cache, and one on the plain path."""
    return (TransformersBackend(model_dir, device="cpu", engine=EngineOptions(
                decode_cache="static", static_cache_min_slots=static_slots), **kwargs),
            TransformersBackend(model_dir, device="cpu", engine=False, **kwargs))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_static_decoding_equals_the_generate_loop(tiny_checkpoints, family):
    static, dynamic = _pair(tiny_checkpoints[family], max_new_tokens=NEW_TOKENS)
    assert static.decode_cache == "static"
    for image in (tiny_image(168, 112), tiny_image(112, 168, seed=1)):
        assert_same(answers(static, image), answers(dynamic, image))
    decoder = static.engine.decoder
    assert isinstance(decoder, StaticDecoder) and decoder.cache is static.engine.static_cache
    assert decoder._fused is static.engine.fused_projections is not None, "steps use the fused projections"
    assert decoder.graph_replays == 0, "no CUDA graphs on the CPU"
    assert static.prefix_cache_stats["hits"] >= 3, "the prefix is seeded into the static cache"
    static.close()
    dynamic.close()


def test_every_budget_stop_events_and_a_growing_cache(tiny_model_dir):
    # the static cache sized by the requests, so a longer one has to grow it
    static, dynamic = _pair(tiny_model_dir, static_slots=0, max_new_tokens=NEW_TOKENS)
    image = tiny_image(168, 112)
    for budget in (1, 2, 3):
        assert_same(answers(static, image, budget), answers(dynamic, image, budget))
    for checks in (2, 3, 4):  # stop after the first token, after the second, after the third
        stopped = answers(static, image, stop_after=checks)
        assert_same(stopped, answers(dynamic, image, stop_after=checks))
        assert all(count == checks - 1 for _, count, _, _ in stopped)
    first_cache, first_decoder = static.engine.static_cache, static.engine.decoder
    long_budget = 300  # prompt + budget needs more slots than the first requests did: a new cache and decoder
    static.max_new_tokens = dynamic.max_new_tokens = long_budget
    assert_same(answers(static, image, 40, commands=COMMANDS[:1]), answers(dynamic, image, 40, commands=COMMANDS[:1]))
    long = answers(static, image, long_budget, commands=COMMANDS[:1])
    assert_same(long, answers(dynamic, image, long_budget, commands=COMMANDS[:1]))
    assert static.engine.static_cache is not first_cache and static.engine.decoder is not first_decoder
    assert static.engine.decoder.cache is static.engine.static_cache
    static.close()
    dynamic.close()


def test_adapters_and_constrained_decoding(tiny_model_dir, tiny_adapter):
    from vla_node.vocabulary import Vocabulary

    static, dynamic = _pair(tiny_model_dir, max_new_tokens=NEW_TOKENS, vocab_fingerprint=TEST_VOCAB_FINGERPRINT)
    image = tiny_image(168, 112)
    for backend in (static, dynamic):
        backend.load_adapter(str(tiny_adapter), "a")
    base = answers(static, image)
    assert_same(base, answers(dynamic, image))
    base_decoder = static.engine.decoder
    for backend in (static, dynamic):
        backend.set_adapter("a")
    adapted = answers(static, image)
    assert_same(adapted, answers(dynamic, image))
    assert [a[0] for a in adapted] != [b[0] for b in base], "the adapter must change the answers"
    assert static.engine.decoder is not base_decoder, "a step recorded with other weights is never replayed"

    vocab = Vocabulary.load()
    for backend in (static, dynamic):
        backend.enable_constrained_decoding(vocab)
    constrained = answers(static, image, budget=24)
    assert_same(constrained, answers(dynamic, image, budget=24))
    assert all(text for text, _, _, _ in constrained), "the grammar forces an action"
    assert_same(answers(static, image, budget=24, stop_after=3), answers(dynamic, image, budget=24, stop_after=3))
    static.close()
    dynamic.close()


def test_the_embedded_model_ends_its_answers_the_same():
    from vla_node.vocabulary import Vocabulary

    static, dynamic = _pair(EMBEDDED)
    image = tiny_image(320, 240)
    for backend in (static, dynamic):
        backend.enable_constrained_decoding(Vocabulary.load())
    budget = 96
    static_answers = answers(static, image, budget)
    assert_same(static_answers, answers(dynamic, image, budget))
    assert all(count < budget for _, count, _, _ in static_answers), "answers end before the budget"
    static.close()
    dynamic.close()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_equal_eager_steps(tiny_model_dir):
    import torch

    from vla_node.vocabulary import Vocabulary

    graphed = TransformersBackend(tiny_model_dir, device="cuda", dtype="float32", max_new_tokens=NEW_TOKENS)
    assert graphed.decode_cache == "static"
    image = tiny_image(168, 112)
    expected = {}
    for constrained in (False, True):
        if constrained:
            graphed.enable_constrained_decoding(Vocabulary.load())
        graphed.engine.decoder = None  # a new decoder: recorded with (or without) the grammar's steps
        replayed = answers(graphed, image, budget=24)
        assert graphed.engine.decoder.graph_replays > 0, "the step was recorded and replayed"
        graphed.engine.decoder.use_graph = False  # the same decoder, eager steps
        eager = answers(graphed, image, budget=24)
        for (text, count, confidence, _), (text_e, count_e, confidence_e, _) in zip(replayed, eager):
            assert (text, count) == (text_e, count_e)
            assert confidence == pytest.approx(confidence_e, rel=1e-4)
        expected[constrained] = replayed
    torch.cuda.synchronize()
    graphed.close()


@pytest.mark.parametrize("q_len", [1, 3])
def test_grouped_query_attention_equals_repeated_kv_sdpa(q_len):
    import torch

    from vla_node.backends.engine.static_decode import grouped_query_attention

    generator = torch.Generator().manual_seed(q_len)
    batch, heads, kv_heads, slots, dim = 2, 8, 2, 11, 16
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, slots, dim, generator=generator) for _ in range(2))
    mask = torch.rand(batch, 1, q_len, slots + 4, generator=generator) > 0.3  # longer than the keys: sliced
    mask[..., 0] = True  # every query sees at least one slot
    out, weights = grouped_query_attention(None, query, key, value, mask, scaling=0.25)
    groups = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1),
        attn_mask=mask[..., :slots], scale=0.25)
    assert weights is None and out.shape == (batch, q_len, heads, dim)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)


def test_decode_steps_use_grouped_attention_and_the_prefill_keeps_its_own(tiny_model_dir):
    from vla_node.backends.engine import static_decode

    static = TransformersBackend(tiny_model_dir, device="cpu", decode_cache="static", max_new_tokens=NEW_TOKENS)
    config = static.base_model.model.language_model.config
    assert config.num_key_value_heads < config.num_attention_heads, "a grouped-query model"
    seen = []
    original = static_decode.grouped_query_attention

    def counting(module, query, *args, **kwargs):
        seen.append((module.layer_idx, query.shape[2]))
        return original(module, query, *args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(static_decode.DECODE_ATTENTION, counting)
    static_decode.grouped_query_attention = counting  # the decoder registers this name again
    try:
        result = static.generate(GenerationRequest(image=tiny_image(168, 112), messages=tiny_messages(),
                                                   max_new_tokens=NEW_TOKENS))
    finally:
        static_decode.grouped_query_attention = original
    assert result.new_tokens == NEW_TOKENS
    assert len(seen) == (NEW_TOKENS - 1) * config.num_hidden_layers and {q for _, q in seen} == {1}
    assert config._attn_implementation == "sdpa", "the prefill's implementation is back"
    static.close()
