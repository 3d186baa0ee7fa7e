"""The fused decode layers (vla_node/backends/engine/layer_step.py, layer_kernels.py) decode what
transformers' layers decode.

On a CPU the kernels run under Triton's interpreter in a child process (tests/interpreted_layer_step.py):
a tiny Qwen2.5-VL (q/k/v biases; also with a LoRA adapter active, which the fused layers merge) and
Qwen3-VL (q/k norms) answer two commands, greedy and under the action grammar, with the fused layers
and with transformers' (peft's) layers around the Triton kernels: same answers, and the same static
cache afterwards (every layer's fill counter, keys and values).
The CUDA tests (skipped without a GPU) check the recorded step on three families, float32 and bfloat16.
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
def interpreted(tiny_checkpoints, tiny_model_dir, tiny_adapter, tmp_path_factory) -> dict:
    pytest.importorskip("triton", minversion="3.8", reason="needs Triton >= 3.8 (its interpreter)")
    # one child per model, side by side: the interpreter runs kernels in Python, one core each
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    models = [f"{family}={tiny_checkpoints[family]}" for family in ("qwen2_5_vl", "qwen3_vl")]
    models.append(f"qwen2_5_vl+adapter={tiny_model_dir},{tiny_adapter}")
    folders = [tmp_path_factory.mktemp("interpreted") for _ in models]
    logs = [(folder / "out", folder / "err") for folder in folders]  # files, not pipes: no child waits on a reader
    children = []
    for model, (out, err) in zip(models, logs):
        with out.open("w") as stdout, err.open("w") as stderr:
            children.append(subprocess.Popen([sys.executable, "-m", "tests.interpreted_layer_step", model], cwd=ROOT,
                                             env=env, stdout=stdout, stderr=stderr, text=True))
    report = {}
    for child, (out, err) in zip(children, logs):
        assert child.wait(timeout=900) == 0, err.read_text()[-3000:]
        report.update(json.loads(out.read_text().strip().splitlines()[-1]))
    return report


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen2_5_vl+adapter"])
def test_fused_layers_answer_as_transformers_layers(interpreted, family):
    fused, reference = interpreted[family]["fused"], interpreted[family]["transformers"]
    assert fused["layer_step"] and not reference["layer_step"]
    assert fused["configs"]["qkv"][3] > 1 and fused["configs"]["down"][3] > 1, "the split-K paths ran"
    assert fused["configs"]["gate_up"][3] == 1, "the gated product has one split"
    for (text, count, confidence), (text_r, count_r, confidence_r) in zip(fused["answers"], reference["answers"]):
        assert (text, count) == (text_r, count_r)
        assert confidence == pytest.approx(confidence_r, rel=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen2_5_vl+adapter"])
def test_fused_layers_leave_the_cache_as_transformers_layers(interpreted, family):
    """Keys (rotated at the right positions), values and every layer's fill counter."""
    fused, reference = interpreted[family]["fused"], interpreted[family]["transformers"]
    assert fused["fills"] == reference["fills"] and len(set(fused["fills"])) == 1
    assert interpreted[family]["cache_difference"] < 1e-5  # float32, sums in another order


def test_the_adapter_changes_the_answers_the_fused_layers_match(interpreted):
    """Guards the adapter case above: its answers are not the base model's."""
    adapted = interpreted["qwen2_5_vl+adapter"]["transformers"]["answers"]
    assert adapted != interpreted["qwen2_5_vl"]["transformers"]["answers"]


def test_merged_matrices_give_the_adapters_projections(tiny_model_dir, tiny_adapter):
    """Each layer's q/k/v, o, gate/up and down matrices of the fused step, with an adapter active,
    multiply as peft's LoRA layers do (base + scale * B A x); without it they are the base weights."""
    import torch

    from vla_node.backends.engine.layer_step import LayerStep
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, device="cpu", decode_cache="static", adapter_path=tiny_adapter)
    model, fused = backend.base_model, backend.engine.fused_projections
    assert LayerStep.unsupported(model, fused) is None
    step = LayerStep(model, fused)
    x = torch.randn(3, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer, matrices in zip(model.model.language_model.layers, step._layers):
            attention, mlp = layer.self_attn, layer.mlp
            joint = {"qkv": (attention.q_proj, attention.k_proj, attention.v_proj),
                     "gate_up": (mlp.gate_proj, mlp.up_proj)}
            for name, modules in joint.items():
                expected = torch.cat([module(x) for module in modules], dim=-1)
                bias = matrices[f"{name}_bias"]
                got = x @ matrices[name].T + (bias if bias is not None else 0)
                assert torch.allclose(got, expected, atol=1e-5), name
                assert not torch.allclose(got, torch.cat([module.base_layer(x) for module in modules], -1), atol=1e-3)
            for name, module in (("o", attention.o_proj), ("down", mlp.down_proj)):
                hidden = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(1))
                assert torch.allclose(hidden @ matrices[name].T, module(hidden), atol=1e-5), name
    backend.set_adapter(None)
    assert LayerStep.unsupported(model, fused) is None
    base = LayerStep(model, fused)._layers[0]
    assert base["qkv"] is fused.groups[0].weight and base["gate_up"] is fused.groups[1].weight
    assert LayerStep.unsupported(model, None) == "no joint q/k/v and gate/up matrices"
    backend.close()


def test_a_dora_adapter_keeps_transformers_step(tiny_model_dir, tmp_path):
    """DoRA scales each output row by a norm of the updated weight: no plain merge, the fused step
    declines it (static_decode.py's compiled step runs peft's layers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from tests.fixtures_models import lora_target_modules
    from vla_node.backends.engine.layer_step import LayerStep
    from vla_node.backends.transformers_backend import TransformersBackend

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), local_files_only=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(), use_dora=True, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(tmp_path / "dora"))
    backend = TransformersBackend(tiny_model_dir, device="cpu", decode_cache="static", adapter_path=tmp_path / "dora")
    reason = LayerStep.unsupported(backend.base_model, backend.engine.fused_projections)
    assert reason is not None and "LoRA variant" in reason, reason
    backend.close()


def test_without_a_gpu_decoders_keep_transformers_step(tiny_model_dir):
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, device="cpu", decode_cache="static", max_new_tokens=3)
    backend.generate(GenerationRequest(image=tiny_image(168, 112), messages=tiny_messages(), max_new_tokens=3))
    assert backend.engine.options.layer_kernels and not backend.engine.decoder.layer_step, \
        "the kernels are for CUDA only"
    backend.close()


# ---------------------------------------------------------------------------------------- CUDA


@cuda_only
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2_5_vl+adapter"])
def test_cuda_fused_layers_answer_as_transformers_layers(tiny_checkpoints, tiny_adapter, family):
    """float32, recorded steps: the same answers (greedy and under the grammar) and caches; with a
    LoRA adapter active, the fused layers' merged matrices against peft's layers."""
    import torch

    from vla_node.backends.engine import EngineOptions
    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.vocabulary import Vocabulary

    family, _, with_adapter = family.partition("+")
    answers, caches = {}, {}
    for layer_step in (True, False):
        backend = TransformersBackend(tiny_checkpoints[family], device="cuda", dtype="float32", max_new_tokens=24,
                                      adapter_path=tiny_adapter if with_adapter else None,
                                      engine=EngineOptions(decode_cache="static", layer_kernels=layer_step))
        answers[layer_step] = []
        for constrained in (False, True):
            if constrained:
                backend.enable_constrained_decoding(Vocabulary.load())
            result = backend.generate(GenerationRequest(image=tiny_image(168, 112), messages=tiny_messages(),
                                                        max_new_tokens=24))
            answers[layer_step].append((result.text, result.new_tokens, result.confidence))
        decoder = backend.engine.decoder
        assert decoder.layer_step == layer_step and decoder.graph_replays > 0
        caches[layer_step] = [(int(layer.cumulative_length), layer.keys.clone(), layer.values.clone())
                              for layer in backend.engine.static_cache.layers]
        backend.close()
    for (text, count, confidence), (text_r, count_r, confidence_r) in zip(answers[True], answers[False]):
        assert (text, count) == (text_r, count_r)
        assert confidence == pytest.approx(confidence_r, rel=1e-4)
    for (fill, keys, values), (fill_r, keys_r, values_r) in zip(caches[True], caches[False]):
        assert fill == fill_r
        assert torch.allclose(keys[:, :, :fill], keys_r[:, :, :fill], atol=1e-4)
        assert torch.allclose(values[:, :, :fill], values_r[:, :, :fill], atol=1e-4)


@cuda_only
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_cuda_bfloat16_step_is_as_close_to_float32_as_transformers_layers(tiny_checkpoints, family):
    """bfloat16: one step from the same cache by the fused layers and by transformers' layers (around
    the Triton kernels); against the same step in float32 (weights and cache upcast), the fused
    logits are off by no more than about transformers' own, and both write the step's key."""
    import torch

    from vla_node.backends.engine.static_decode import StaticDecoder
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_checkpoints[family], device="cuda", dtype="bfloat16", decode_cache="static",
                                  max_new_tokens=4)
    backend.generate(GenerationRequest(image=tiny_image(168, 112), messages=tiny_messages(), max_new_tokens=4))
    cache = backend.engine.static_cache
    saved = [(layer.cumulative_length.clone(), layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    @torch.inference_mode()
    def step(layer_step: bool | None, fused):
        for layer, (fill, keys, values) in zip(cache.layers, saved):
            layer.cumulative_length.copy_(fill)
            dtype = backend.base_model.dtype
            layer.keys, layer.values = keys.to(dtype, copy=True), values.to(dtype, copy=True)
        decoder = StaticDecoder(backend.base_model, cache, list(backend.loaded.eos_ids), use_graph=False, fused=fused,
                                kernels=layer_step is not None, layer_step=bool(layer_step))
        assert decoder.layer_step == bool(layer_step)
        decoder._token.fill_(7)
        decoder._rope_delta.fill_(-3)
        with decoder._decode_attention():
            decoder._forward()
        return decoder._logits.clone(), [int(layer.cumulative_length) for layer in cache.layers]

    fused_logits, fused_fills = step(True, backend.engine.fused_projections)
    reference_logits, reference_fills = step(False, backend.engine.fused_projections)
    backend.base_model.float()  # the float32 truth: transformers' layers, eager, on upcast weights and cache
    truth, _ = step(None, None)
    assert fused_fills == reference_fills == [int(saved[0][0]) + 1] * len(saved)
    fused_error = float((fused_logits - truth).abs().max())
    reference_error = float((reference_logits - truth).abs().max())
    assert fused_error <= 1.5 * reference_error + 1e-3 * float(truth.abs().max()), (fused_error, reference_error)
    backend.close()


@cuda_only
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_cuda_dependent_launches_change_no_bit(tiny_checkpoints, family):
    """Recorded bfloat16 steps with the kernels launched programmatically dependent (each overlapping
    the end of the one before) and in plain order: the same tokens, log-probabilities, last logits
    and cache, bit for bit (a kernel reading before the one before it finished would differ)."""
    import torch

    from vla_node.backends.engine import layer_step
    from vla_node.backends.engine.layer_kernels import dependent_launch_supported
    from vla_node.backends.engine.static_decode import StaticDecoder
    from vla_node.backends.transformers_backend import TransformersBackend

    if not dependent_launch_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 and a Triton that launches so")
    backend = TransformersBackend(tiny_checkpoints[family], device="cuda", dtype="bfloat16", decode_cache="static",
                                  max_new_tokens=4)
    backend.generate(GenerationRequest(image=tiny_image(168, 112), messages=tiny_messages(), max_new_tokens=4))
    cache = backend.engine.static_cache
    saved = [(layer.cumulative_length.clone(), layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    runs = {}
    for dependent in (True, False):
        with torch.inference_mode():  # the cache's tensors are inference tensors
            for layer, (fill, keys, values) in zip(cache.layers, saved):
                layer.cumulative_length.copy_(fill)
                layer.keys.copy_(keys)
                layer.values.copy_(values)
        decoder = StaticDecoder(backend.base_model, cache, [-1], use_graph=True, fused=backend.engine.fused_projections,
                                kernels=True, layer_step=True, dependent_launch=dependent)
        assert decoder.layer_step and decoder._layer_step.dependent_launch == dependent
        assert decoder._layer_step.prefetch_steps == (layer_step.PREFETCH_STEPS if dependent else 0)
        with torch.inference_mode():
            result = decoder.decode(7, torch.tensor([[-3]]), 16)
        assert len(result.tokens) == 16 and decoder.graph_replays == 16
        runs[dependent] = (result.tokens, result.logprobs, decoder._logits.clone(),
                           [(int(layer.cumulative_length), layer.keys.clone(), layer.values.clone())
                            for layer in cache.layers])
    (tokens, logprobs, logits, layers), (tokens_r, logprobs_r, logits_r, layers_r) = runs[True], runs[False]
    assert tokens == tokens_r and logprobs == logprobs_r
    assert torch.equal(logits, logits_r)
    for (fill, keys, values), (fill_r, keys_r, values_r) in zip(layers, layers_r):
        assert fill == fill_r == int(saved[0][0]) + 16
        assert torch.equal(keys, keys_r) and torch.equal(values, values_r)
    backend.close()
