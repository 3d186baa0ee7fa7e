"""Fused q/k/v and gate/up products (vla_node/backends/engine/fused_projections.py): the parameters become
views of one joint matrix, the model's outputs do not change, inside ``active()`` each group is one
product whose slices equal the separate products (also under a LoRA adapter), and a decoder
refuses fusion once a parameter no longer shares the joint matrix. The whole decode path with
fusion equals transformers' generate loop in tests/test_static_decode.py."""
from __future__ import annotations

import logging

import pytest
import torch

from vla_node.backends.engine.fused_projections import FusedProjections

pytest_plugins = ["tests.fixtures_models"]


def _model(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir)).eval()


def _text_forward(model, ids):
    with torch.no_grad():
        return model.model.language_model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # with q/k/v biases, and without (+ q/k norms)
def test_fusion_keeps_the_outputs_and_shares_the_weights(tiny_checkpoints, family):
    model = _model(tiny_checkpoints[family])
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    before = _text_forward(model, ids)
    fused = FusedProjections.build(model.model.language_model)
    layers = model.model.language_model.layers
    assert fused is not None and len(fused.groups) == 2 * len(layers) and fused.intact()
    attn = layers[0].self_attn
    joint = fused.groups[0].weight
    assert attn.q_proj.weight.data_ptr() == joint.data_ptr()
    assert attn.k_proj.weight.data_ptr() == joint[attn.q_proj.weight.shape[0]:].data_ptr()
    assert torch.equal(_text_forward(model, ids), before)  # the views hold the same numbers

    calls = []
    original = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        calls.append(tuple(weight.shape))
        return original(x, weight, bias)

    torch.nn.functional.linear = counting
    try:
        _text_forward(model, ids)
        separate, calls[:] = list(calls), []
        with fused.active():
            inside = _text_forward(model, ids)
    finally:
        torch.nn.functional.linear = original
    assert torch.allclose(inside, before, atol=1e-5)
    # per layer: q, k, v, o, gate, up, down apart; q+k+v, o, gate+up, down fused
    assert (len(separate), len(calls)) == (7 * len(layers), 4 * len(layers))
    q, k, v = (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0])
    assert (q + k + v, attn.q_proj.weight.shape[1]) in calls, "one product for q, k and v"
    assert "forward" not in attn.q_proj.__dict__, "outside active() the projections are their own again"


def test_a_lora_update_is_still_added_per_projection(tiny_model_dir, tiny_adapter):
    from peft import PeftModel

    model = _model(tiny_model_dir)
    fused = FusedProjections.build(model.model.language_model)
    peft_model = PeftModel.from_pretrained(model, str(tiny_adapter))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        plain = peft_model(input_ids=ids).logits
        base = None
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        with fused.active():
            inside = peft_model(input_ids=ids).logits
    assert not torch.allclose(plain, base, atol=1e-4), "the adapter changes the answer"
    assert torch.allclose(inside, plain, atol=1e-5)


def test_out_of_order_calls_fail_and_a_replaced_weight_disables_fusion(tiny_model_dir, caplog):
    from transformers import StaticCache

    from vla_node.backends.engine.static_decode import StaticDecoder

    model = _model(tiny_model_dir)
    fused = FusedProjections.build(model.model.language_model)
    attn = model.model.language_model.layers[0].self_attn
    x = torch.zeros(1, 1, attn.q_proj.weight.shape[1])
    with fused.active(), pytest.raises(RuntimeError, match="out of order"):
        attn.k_proj(x)
    attn.v_proj.weight.data = attn.v_proj.weight.data.clone()  # someone replaced a tensor
    assert not fused.intact()
    cache = StaticCache(config=model.config, max_cache_len=16)
    cache.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 0)  # the layers exist once written
    with caplog.at_level(logging.WARNING):
        decoder = StaticDecoder(model, cache, [0], use_graph=False, fused=fused)
    assert decoder._fused is None and "no longer share" in caplog.text
