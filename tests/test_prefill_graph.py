"""The prefill on the StaticCache (vla_node/backends/engine/prefill_graph.py) changes no output: the first
token's logits, the answers and the confidence equal transformers' generate prefill, with and
without the shared prefix, for prompts of several lengths in one bucket and in several, for every
family (Qwen3-VL's deepstack features included); its step reads nothing back to the host (so it can
be recorded as a CUDA graph). On CUDA the step is recorded once per bucket and replayed (the
last test, skipped here)."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures_models import tiny_image, tiny_messages
from tests.host_reads import no_host_reads
from tests.decode_answers import answers, assert_same
from vla_node.backends.engine import EngineOptions
from vla_node.backends.engine.prefill_graph import (PREFILL_ATTENTION, PREFILL_BUCKET, PrefillGraphs,
                                                    lower_right_causal_attention)
from vla_node.backends.transformers_backend import TransformersBackend

NEW_TOKENS = 5
# the same frame, commands of different lengths: one bucket, then a longer prompt in the next
SHORT = ("put the red cube in the blue bowl", "pick up the green ball")
LONG = ("put the red cube in the blue bowl " + "and then the green ball next to it " * 12,)


def _pair(model_dir, prefix: bool):
    """A backend prefilling by PrefillGraphs, and one by generate's prefill."""
    return tuple(TransformersBackend(model_dir, device="cpu", max_new_tokens=NEW_TOKENS, engine=EngineOptions(
        decode_cache="static", prefix_cache=prefix, static_prefill=own)) for own in (True, False))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("prefix", [True, False])
def test_static_prefill_equals_the_generate_prefill(tiny_checkpoints, family, prefix):
    own, generate = _pair(tiny_checkpoints[family], prefix)
    image = tiny_image(168, 112)
    for commands in (SHORT, LONG):
        assert_same(answers(own, image, commands=commands), answers(generate, image, commands=commands))
    graphs = own.engine.prefill_graphs
    assert isinstance(graphs, PrefillGraphs) and graphs.cache is own.engine.static_cache
    assert (graphs.misses, graphs.hits) == (2, 1), "two short prompts share a bucket, the long one needs another"
    assert generate.engine.prefill_graphs is None
    assert own.prefix_cache_stats["hits"] == (2 if prefix else 0)
    own.close()
    generate.close()


def _prepared(backend, command=SHORT[0]):
    inputs = backend.prepare_inputs(tiny_image(168, 112), tiny_messages(command))
    slots = int(inputs["input_ids"].shape[1]) + 8 + PREFILL_BUCKET
    cache, start = backend.engine._initial_cache(inputs["input_ids"], slots)
    prefill = PrefillGraphs.prepare(backend.base_model, inputs, start)
    features = backend.base_model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                           return_dict=True)
    return inputs, cache, start, prefill, features


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_step_reads_nothing_back_and_sets_the_fill_to_the_real_length(tiny_checkpoints, family):
    backend = TransformersBackend(tiny_checkpoints[family], device="cpu", decode_cache="static",
                                  max_new_tokens=NEW_TOKENS)
    with torch.inference_mode():
        inputs, cache, start, prefill, features = _prepared(backend)
        assert start > 0, "the prefix is in the cache"
        length = int(inputs["input_ids"].shape[1]) - start
        assert length % PREFILL_BUCKET, "the test prompt is padded"
        graphs = PrefillGraphs(backend.base_model, cache, use_graph=False)
        step = graphs._step

        def guarded(entry):
            with no_host_reads():
                step(entry)

        graphs._step = guarded
        attended = []

        def spy(module, query, key, value, attention_mask=None, **kwargs):
            attended.append((query.shape[2], attention_mask.shape[-1]))
            return lower_right_causal_attention(module, query, key, value, attention_mask, **kwargs)

        from transformers import AttentionInterface

        AttentionInterface.register(PREFILL_ATTENTION, spy)
        try:
            graphs.run(prefill, features)
        finally:
            AttentionInterface.register(PREFILL_ATTENTION, lower_right_causal_attention)
        bucket = -(-length // PREFILL_BUCKET) * PREFILL_BUCKET
        layers = backend.base_model.model.language_model.config.num_hidden_layers
        assert attended == [(bucket, start + bucket)] * layers, "every layer: the padded prompt over the used slots"
        assert [int(layer.cumulative_length) for layer in cache.layers] == [start + length] * len(cache.layers)
        # the language model's own mask set-up does read (the check can fail)
        with pytest.raises(AssertionError, match="host read"), no_host_reads():
            backend.base_model.model.language_model(inputs_embeds=graphs._embed(inputs["input_ids"][:, start:]),
                                                    past_key_values=cache, use_cache=True)
    backend.close()


def test_a_prompt_that_does_not_fit_the_cache_is_refused(tiny_model_dir):
    backend = TransformersBackend(tiny_model_dir, device="cpu", decode_cache="static", max_new_tokens=NEW_TOKENS)
    with torch.inference_mode():
        _, _, _, prefill, features = _prepared(backend)
        small = backend.engine._new_static_cache(prefill.start + 8)
        backend.engine.prefix_cache.seed(backend.base_model, prefill.input_ids, (backend.adapter_id, str(backend.dtype),
                                                                          str(backend.device)), into=small)
        with pytest.raises(ValueError, match="does not fit the cache"):
            PrefillGraphs(backend.base_model, small, use_graph=False).run(prefill, features)
    backend.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_prefills_equal_eager_prefills(tiny_model_dir):
    def backend():
        return TransformersBackend(tiny_model_dir, device="cuda", dtype="float32", decode_cache="static",
                                   max_new_tokens=NEW_TOKENS, compile_decode=False)

    graphed, eager = backend(), backend()
    image = tiny_image(168, 112)
    answers(eager, image, commands=SHORT[:1])  # builds its prefills ...
    eager.engine.prefill_graphs.use_graph = False  # ... and runs them eagerly from now on
    # (a replayed graph runs no Python: the per-call logits recorder sees only the eager calls)
    def results(backend):
        return [(text, count, round(confidence, 5)) for text, count, confidence, _ in
                answers(backend, image, commands=SHORT + LONG)]

    assert results(graphed) == results(eager)
    graphs = graphed.engine.prefill_graphs
    assert graphs.use_graph and graphs.graph_replays == 3 and (graphs.misses, graphs.hits) == (2, 1)
    assert graphs._layers.enabled, "recorded with the norms and MLPs compiled (two buckets), no fall-back"
    assert not any("forward" in vars(module) for module in graphs._layers.modules), "own forwards outside"
    graphed.close()
    eager.close()


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped and plain
def test_lower_right_causal_attention_equals_the_masked_sdpa(kv_heads):
    torch.manual_seed(0)
    heads, q_len, cached, slots, dim = 4, 5, 7, 16, 8
    query = torch.randn(1, heads, q_len, dim)
    key, value = torch.randn(1, kv_heads, slots, dim), torch.randn(1, kv_heads, slots, dim)
    visible = torch.arange(slots)[None, :] <= (cached + torch.arange(q_len))[:, None]  # the prefix + up to itself
    groups = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), attn_mask=visible,
        scale=0.3)
    used = torch.ones(1, dtype=torch.bool).expand(1, 1, q_len, cached + q_len)
    out, weights = lower_right_causal_attention(None, query, key, value, used, scaling=0.3)
    assert weights is None and out.shape == (1, q_len, heads, dim)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
