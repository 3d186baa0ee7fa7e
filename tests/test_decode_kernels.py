"""The Triton decode kernels (vla_node/backends/engine/decode_kernels.py) compute what PyTorch computes.

On a CPU the kernels run under Triton's interpreter in a child process (tests/interpreted_kernels.py):
every matrix-vector config against torch's linear, the one-token attention against SDPA over
repeated key/value heads (grouped heads, gaps in the mask, float32 and bfloat16), the greedy choice
against argmax + log_softmax (ties, masked blocks), no graph break when torch.compile meets them, and
static decoding of a tiny Qwen2.5-VL with the kernels giving transformers' generate loop's answers.
The CUDA tests (skipped without a GPU) check the compiled kernels and the whole runtime the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_models import tiny_image, tiny_messages
from vla_node.backends.base import GenerationRequest

ROOT = Path(__file__).resolve().parents[1]
cuda_only = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def interpreted(tiny_model_dir) -> dict:
    # Triton 3.6's interpreter cannot run a loop over a runtime bound (range(0, K, BLOCK_K)); 3.8's can
    pytest.importorskip("triton", minversion="3.8", reason="needs Triton >= 3.8 (its interpreter)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "tests.interpreted_kernels", str(tiny_model_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_matvec_config_equals_torch_linear(interpreted):
    from vla_node.backends.engine.decode_kernels import MATVEC_CANDIDATES

    errors = interpreted["matvec"]
    for shape in ("40x96", "33x1100"):
        for config in MATVEC_CANDIDATES:
            assert errors[f"{shape} {config}"] < 1e-4, (shape, config)  # float32, sums in another order
        assert errors[f"{shape} op"] < 1e-4
    assert errors["40x96 op shape"] == [1, 1, 40], "the operator keeps the input's leading dimensions"


def test_one_token_attention_equals_sdpa_over_repeated_heads(interpreted):
    for case, (shape_and_dtype_kept, error) in interpreted["attention"].items():
        assert shape_and_dtype_kept, case
        assert error < (1e-5 if case.endswith("float32") else 2e-2), (case, error)


def test_greedy_choice_equals_argmax_and_log_softmax(interpreted):
    for size, (chosen, expected, logprob, expected_logprob, dtypes_kept) in interpreted["choice"].items():
        assert chosen == expected, f"{size} scores: the first of the tied maxima, past the masked blocks"
        assert logprob == pytest.approx(expected_logprob, abs=1e-4)
        assert dtypes_kept


def test_a_compiled_step_calls_the_kernels_without_graph_breaks(interpreted):
    assert interpreted["graph_breaks"] == 0


def test_static_decoding_with_the_kernels_gives_the_generate_loops_answers(interpreted):
    """Greedy and under the action grammar (whose masked scores the choice kernel reads too)."""
    decoding = interpreted["decoding"]
    assert len(decoding["static"]) == len(decoding["dynamic"]) == 2
    assert decoding["kernels"], "the decoder ran with the kernels"
    assert decoding["calls"]["matvec"] > 0 and decoding["calls"]["attention"] > 0 and decoding["calls"]["choice"] > 0
    for (text, count, confidence), (text_d, count_d, confidence_d) in zip(decoding["static"], decoding["dynamic"]):
        assert (text, count) == (text_d, count_d)
        assert confidence == pytest.approx(confidence_d, rel=1e-4)


def test_one_row_products_go_to_the_matvec_and_longer_inputs_to_linear(tiny_model_dir):
    """Inside ``FusedProjections.active(matvec)`` every projection of a decoder layer (the joint
    q/k/v and gate/up products, o and down) of a one-token input is the matvec's; a prefill's many
    rows keep torch's linear; outside, the layers are their own again."""
    import torch

    from vla_node.backends.engine.fused_projections import FusedProjections
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, device="cpu", decode_cache="static")
    language_model = backend.base_model.model.language_model
    fused = backend.engine.fused_projections
    assert isinstance(fused, FusedProjections) and len(fused.singles) == 2 * len(language_model.layers)
    shapes = []

    def matvec(hidden, weight, bias):  # the product itself, recorded
        shapes.append(tuple(weight.shape))
        return torch.nn.functional.linear(hidden, weight, bias)

    layer = language_model.layers[0]
    config = language_model.config
    embed = language_model.embed_tokens
    with torch.no_grad():
        for tokens in (1, 5):
            hidden = embed(torch.arange(tokens).view(1, tokens))
            expected = layer.mlp(hidden)
            with fused.active(matvec):
                got = layer.mlp(hidden)
                attn = layer.self_attn
                q = attn.q_proj(hidden)
                attn.k_proj(hidden), attn.v_proj(hidden)
                attn.o_proj(q[..., :config.hidden_size])
            assert torch.allclose(got, expected, atol=1e-6)
            if tokens == 1:
                rows = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
                kv = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
                assert shapes == [(2 * config.intermediate_size, config.hidden_size),
                                  (config.hidden_size, config.intermediate_size),
                                  (rows + kv, config.hidden_size), (config.hidden_size, rows)]
                shapes.clear()
            else:
                assert shapes == [], "a prefill's products stay torch's"
    assert "forward" not in layer.self_attn.o_proj.__dict__ and "forward" not in layer.mlp.down_proj.__dict__
    backend.close()


def test_the_kernels_are_for_cuda_only():
    import torch

    from vla_node.backends.engine import decode_kernels

    assert not decode_kernels.available(torch.device("cpu"))


# ---------------------------------------------------------------------------------------- CUDA


@cuda_only
def test_cuda_kernels_equal_torch():
    import torch

    from vla_node.backends.engine import decode_kernels

    assert decode_kernels.available(torch.device("cuda"))
    generator = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for rows, inputs, with_bias in [(2560, 2048, True), (2048, 11008, False), (333, 700, False)]:
            weight = torch.randn(rows, inputs, device="cuda", generator=generator).to(dtype) * 0.05
            x = torch.randn(1, 1, inputs, device="cuda", generator=generator).to(dtype)
            bias = torch.randn(rows, device="cuda", generator=generator).to(dtype) if with_bias else None
            expected = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
            for config in decode_kernels.MATVEC_CANDIDATES:
                out = torch.empty(rows, device="cuda", dtype=dtype)
                got = decode_kernels._launch_matvec(config, x.view(inputs), weight, bias, out)
                assert (got.float() - expected.view(rows)).abs().max() < tolerance * max(1.0, float(expected.abs().max()))
            assert decode_kernels.matvec(x, weight, bias).shape == (1, 1, rows)
        for heads, kv_heads in ((16, 2), (16, 8), (12, 2)):
            query = torch.randn(1, heads, 1, 128, device="cuda", generator=generator).to(dtype)
            key, value = (torch.randn(1, kv_heads, 2048, 128, device="cuda", generator=generator).to(dtype)
                          for _ in range(2))
            mask = (torch.arange(2048, device="cuda") <= 700).view(1, 1, 1, 2048)
            groups = heads // kv_heads
            expected = torch.nn.functional.scaled_dot_product_attention(
                query.float(), key.float().repeat_interleave(groups, 1), value.float().repeat_interleave(groups, 1),
                attn_mask=mask).transpose(1, 2)
            got = decode_kernels.decode_attention(query, key, value, mask, 128 ** -0.5)
            assert (got.float() - expected).abs().max() < (1e-4 if dtype == torch.float32 else 2e-2)
    scores = torch.randn(1, 151936, device="cuda", generator=generator)
    scores[0, :40000] = float("-inf")
    scores[0, 90000] = scores[0, 100000] = float(scores.max()) + 1
    chosen, logprob = decode_kernels.greedy_choice(scores)
    assert int(chosen) == 90000
    assert float(logprob) == pytest.approx(float(torch.log_softmax(scores, -1)[0, 90000]), abs=1e-4)


@cuda_only
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_cuda_decoding_with_the_kernels_gives_the_generate_loops_answers(tiny_checkpoints, family):
    from vla_node.backends.engine import EngineOptions
    from vla_node.backends.transformers_backend import TransformersBackend

    answers = {}
    for cache in ("static", "dynamic"):
        # transformers' layers around the kernels (test_layer_step.py: the fused layers)
        backend = TransformersBackend(tiny_checkpoints[family], device="cuda", dtype="float32", max_new_tokens=24,
                                      engine=EngineOptions(decode_cache=cache, layer_kernels=False))
        answers[cache] = []
        for command in ("put the red cube in the blue bowl", "pick up the green ball"):
            result = backend.generate(GenerationRequest(image=tiny_image(168, 112), messages=tiny_messages(command),
                                                        max_new_tokens=24))
            answers[cache].append((result.text, result.new_tokens, result.confidence))
        if cache == "static":
            assert backend.engine.decoder.kernels and backend.engine.decoder.graph_replays > 0
        backend.close()
    for (text, count, confidence), (text_d, count_d, confidence_d) in zip(answers["static"], answers["dynamic"]):
        assert (text, count) == (text_d, count_d)
        assert confidence == pytest.approx(confidence_d, rel=1e-4)
