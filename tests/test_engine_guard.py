"""The engine guards itself (vla_node/backends/engine/guard.py): a model it does not know, or a first
answer unlike the plain path's, turns it off with one log line, and the backend serves the plain path."""
from __future__ import annotations

import logging

import pytest
import torch

from tests.fixtures_models import tiny_image, tiny_messages
from vla_node.backends.base import GenerationRequest
from vla_node.backends.engine import EngineOptions
from vla_node.backends.engine.guard import probe_disagreement, unknown_model
from vla_node.backends.transformers_backend import TransformersBackend

REQUESTS = [GenerationRequest(image=tiny_image(168, 112, seed), messages=tiny_messages(command), max_new_tokens=6)
            for seed, command in enumerate(("put the red cube in the blue bowl", "pick up the green ball"))]


def _texts(backend) -> list[tuple[str, int]]:
    return [(result.text, result.new_tokens) for result in (backend.generate(r) for r in REQUESTS)]


def test_an_unknown_layer_class_turns_the_engine_off_with_one_line(tiny_model_dir, monkeypatch, caplog):
    """What a transformers upgrade that renames or rewrites the decoder layer looks like to the engine."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    plain = TransformersBackend(tiny_model_dir, device="cpu", engine=False)
    expected = _texts(plain)
    plain.close()

    class MysteryDecoderLayer(modeling_qwen2_5_vl.Qwen2_5_VLDecoderLayer):
        pass

    monkeypatch.setattr(modeling_qwen2_5_vl, "Qwen2_5_VLDecoderLayer", MysteryDecoderLayer)
    with caplog.at_level(logging.WARNING, logger="vla_node.backends.engine"):
        backend = TransformersBackend(tiny_model_dir, device="cpu", decode_cache="static")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("vla_node.backends.engine")]
    assert lines == ["engine off, serving the plain path: unknown layer class MysteryDecoderLayer "
                     "(expected Qwen2_5_VLDecoderLayer)"]
    assert backend.engine is None and backend.decode_cache == "dynamic" and backend.max_batch_size == 1
    assert _texts(backend) == expected
    backend.warmup()  # nothing to probe
    assert backend.generate_batch(REQUESTS)[1].text == expected[1][0]  # one by one
    backend.close()


def test_the_guard_checks_version_family_and_shapes(tiny_model_dir):
    backend = TransformersBackend(tiny_model_dir, device="cpu", engine=False)
    model = backend.base_model
    assert unknown_model(model) is None
    assert unknown_model(model, "5.24.0") == \
        "transformers 5.24.0 is outside the versions the engine was tested with (5.23.x)"
    assert unknown_model(model, "4.57.1").startswith("transformers 4.57.1 is outside")
    attention = model.model.language_model.layers[1].self_attn
    proper = attention.k_proj
    attention.k_proj = torch.nn.Linear(proper.in_features, proper.out_features * 2, bias=True)
    assert unknown_model(model) == (f"layer 1: self_attn.k_proj is {(proper.out_features * 2, proper.in_features)}, "
                                    f"expected {(proper.out_features, proper.in_features)} from the config")
    attention.k_proj = proper
    model.config.model_type = "llava"
    assert unknown_model(model) == "model type 'llava' is not one of qwen2_vl, qwen2_5_vl, qwen3_vl"
    backend.close()


def test_the_warm_up_probe_keeps_an_engine_that_answers_like_the_plain_path(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        backend = TransformersBackend(tiny_model_dir, device="cpu", engine=EngineOptions(decode_cache="static"))
        backend.warmup()
    assert backend.engine is not None and backend._engine_probed
    assert not [r for r in caplog.records if "engine off" in r.getMessage()]
    backend.use_engine(EngineOptions())  # another engine: probed again at the next warm-up
    assert not backend._engine_probed
    backend.close()


def test_the_probe_compares_tokens_and_forgives_only_near_ties(tiny_model_dir):
    """On the plain path's own logits: an answer that parts from it on a token the plain path
    scores far below its choice is refused; one that parts on a near tie is not."""
    backend = TransformersBackend(tiny_model_dir, device="cpu", engine=False)
    request = REQUESTS[0]
    with torch.inference_mode():
        inputs = backend.prepare_inputs(request.image, request.messages)
        answer, logits = backend._generate_plain(inputs, 4, None, None, with_logits=True)
    ids = answer.ids
    assert len(ids) == 4
    assert probe_disagreement(ids, logits, list(ids), "float32") is None
    scores = logits[1][0]
    worst = int(scores.argmin())
    reason = probe_disagreement(ids, logits, [ids[0], worst, ids[2], ids[3]], "float32")
    assert reason is not None
    assert reason.startswith(f"the engine's token 2 is {worst} where the plain path chose {ids[1]}"), reason
    assert probe_disagreement(ids, logits, ids[:3], "float32") == \
        "the engine's answer has 3 tokens where the plain path's has 4"
    # a near tie: the runner-up, when its log-probability is within the tie of the choice
    runner_up = int(scores.topk(2).indices[1])
    gap = float(torch.log_softmax(scores.float(), -1)[ids[1]] - torch.log_softmax(scores.float(), -1)[runner_up])
    tied = probe_disagreement(ids, logits, [ids[0], runner_up, 0, 0], "bfloat16")
    assert (tied is None) == (gap <= 0.5), (gap, tied)
    backend.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA engine needs a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_cuda_the_full_engine_passes_its_probe(tiny_checkpoints, family, dtype, caplog):
    """Graphed vision tower, graphed prefill, the fused layer step: the warm-up's probe keeps them."""
    with caplog.at_level(logging.WARNING):
        backend = TransformersBackend(tiny_checkpoints[family], device="cuda", dtype=dtype, max_new_tokens=6)
        backend.warmup()
    assert backend.engine is not None and backend.decode_cache == "static", \
        [r.getMessage() for r in caplog.records]
    assert backend.engine.decoder is not None and backend.engine.decoder.graph_replays > 0
    backend.close()
