"""The calibrated CLARIFY threshold (vla_node.clarify_threshold): the rule on scores, the manifest
field, every local decoding path of the embedded model applying it (plain generate, the engine's
dynamic and static paths, batches, the onnx backend), and the calibration's choice."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.calibrate_clarify import Observation, choose_threshold, scores
from vla_node.backends.base import GenerationRequest
from vla_node.clarify_threshold import ClarifyThreshold, ClarifyThresholdError, clarify_first_token
from vla_node.manifest import ManifestError, clarify_threshold_of, read_manifest, validate_manifest, write_manifest

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "models" / "tabletop-tiny"
TOKENS = 24


def test_the_rule_raises_clarify_to_the_top_only_where_it_reaches_the_threshold():
    scores_ = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.25, 0.05], [0.1, 0.1, 0.8]]))
    seen: list[float] = []
    out = ClarifyThreshold(token_id=1, threshold=0.29, observed=seen).apply(scores_.clone())
    assert out.argmax(dim=-1).tolist() == [1, 0, 2]  # 0.3 >= 0.29: CLARIFY; 0.25: not; the third stays
    assert seen == pytest.approx([0.3, 0.25, 0.1])
    assert torch.equal(out[1:], scores_[1:]) and torch.equal(out[0, [0, 2]], scores_[0, [0, 2]])
    observe_only = ClarifyThreshold(token_id=1, threshold=None, observed=[])
    assert torch.equal(observe_only.apply(scores_.clone()), scores_)


def test_the_numpy_rule_chooses_as_the_torch_one():
    logits = np.log(np.array([0.55, 0.35, 0.1], dtype=np.float32))
    assert int(np.argmax(ClarifyThreshold(1, 0.34).apply_numpy(logits))) == 1
    assert int(np.argmax(ClarifyThreshold(1, 0.36).apply_numpy(logits))) == 0


def test_the_processor_touches_the_first_step_only():
    processor = ClarifyThreshold(token_id=1, threshold=0.2).processor()
    step = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    assert processor(None, step.clone()).argmax().item() == 1
    assert processor(None, step.clone()).argmax().item() == 0


@pytest.mark.parametrize("threshold", [0.0, -0.1, 0.51, 1.0])
def test_a_threshold_outside_zero_to_one_half_is_refused(threshold):
    with pytest.raises(ClarifyThresholdError, match=r"in \(0, 0.5\]"):
        ClarifyThreshold(1, threshold)


def test_the_manifest_field_is_checked_and_read(tmp_path):
    manifest = read_manifest(EMBEDDED)
    manifest.pop("clarify_threshold", None)
    write_manifest(tmp_path, manifest)
    assert clarify_threshold_of(tmp_path) is None
    for bad in (0, 0.7, "0.3", True):
        with pytest.raises(ManifestError, match="clarify_threshold"):
            validate_manifest({**manifest, "clarify_threshold": bad})
    write_manifest(tmp_path, {**manifest, "clarify_threshold": 0.25})
    assert clarify_threshold_of(tmp_path) == 0.25


def test_calibration_picks_the_middle_of_the_best_range():
    observations = [Observation(0.9, True, True), Observation(0.35, False, True), Observation(0.42, False, True),
                    Observation(0.22, False, False), Observation(0.01, False, False), Observation(0.3, False, False)]
    assert scores(observations, None) == pytest.approx((1.0, 1 / 3, 0.5))
    chosen = choose_threshold(observations)
    assert 0.3 < chosen <= 0.35  # catches 0.35 and 0.42, not the 0.3 that should not ask
    assert scores(observations, chosen)[:2] == (1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# the embedded model: every path that chooses the first token applies the rule


@pytest.fixture(scope="module")
def moves(tmp_path_factory):
    """Held-out commands the embedded model answers with a verb, each with the probability it
    gives CLARIFY's first token (observed on the plain path, nothing applied)."""
    from training.onnx_parity import heldout_commands
    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.image import fit_to_limits

    backend = TransformersBackend(EMBEDDED, device="cpu", dtype="float32", max_new_tokens=TOKENS)
    seen: list[float] = []
    backend.clarify_rule = ClarifyThreshold(clarify_first_token(backend.processor.tokenizer), None, seen)
    found = []
    for command in heldout_commands(ROOT / "models", tmp_path_factory.mktemp("heldout"), 4):
        image = fit_to_limits(command.image, backend.pixel_limits)
        answer = backend.generate(GenerationRequest(image=image, messages=command.messages)).text
        if not answer.startswith("CLARIFY"):
            found.append((image, command.messages, answer, seen[-1]))
    backend.close()
    assert found, "no held-out command answered with a verb"
    return found


def model_with_threshold(tmp_path: Path, threshold: float) -> Path:
    model = tmp_path / "model"
    shutil.copytree(EMBEDDED, model)
    write_manifest(model, {**read_manifest(model), "clarify_threshold": threshold})
    return model


@pytest.fixture(scope="module")
def asking_model(tmp_path_factory, moves) -> Path:
    """The embedded model with a threshold just below the first move's CLARIFY probability."""
    return model_with_threshold(tmp_path_factory.mktemp("asking"), moves[0][3] / 2)


def first_answer(backend, moves) -> str:
    image, messages, _, _ = moves[0]
    return backend.generate(GenerationRequest(image=image, messages=messages)).text


def test_a_threshold_just_above_the_probability_changes_nothing(tmp_path, moves):
    from vla_node.backends.transformers_backend import TransformersBackend

    image, messages, answer, probability = moves[0]
    backend = TransformersBackend(model_with_threshold(tmp_path, min(0.5, probability * 2)), device="cpu",
                                  dtype="float32", max_new_tokens=TOKENS)
    assert backend.clarify_rule is not None
    assert first_answer(backend, moves) == answer
    backend.close()


@pytest.mark.parametrize("engine", [None, "dynamic", "static"])
def test_every_torch_path_asks_when_clarify_reaches_the_threshold(asking_model, moves, engine):
    from vla_node.backends.engine import EngineOptions
    from vla_node.backends.transformers_backend import TransformersBackend

    options = None if engine is None else EngineOptions(decode_cache=engine, static_cache_min_slots=256)
    backend = TransformersBackend(asking_model, device="cpu", dtype="float32", max_new_tokens=TOKENS, engine=options)
    try:
        assert first_answer(backend, moves).startswith("CLARIFY(")
        if engine is not None:  # batches: the rule on every row's first token
            image, messages, _, _ = moves[0]
            results = backend.generate_batch([GenerationRequest(image=image, messages=messages)] * 2)
            assert [r.text.startswith("CLARIFY(") for r in results] == [True, True]
    finally:
        backend.close()


def test_the_onnx_export_carries_the_threshold_and_the_onnx_backend_applies_it(tmp_path, asking_model, moves):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from training.onnx_export import export_onnx
    from vla_node.backends.onnx_backend import OnnxBackend

    export_onnx(str(asking_model), str(tmp_path / "onnx"))
    backend = OnnxBackend(tmp_path / "onnx", device="cpu", max_new_tokens=TOKENS)
    try:
        assert backend.manifest["clarify_threshold"] == read_manifest(asking_model)["clarify_threshold"]
        assert first_answer(backend, moves).startswith("CLARIFY(")
    finally:
        backend.close()


def test_calibration_runs_the_model_on_scenes_of_its_own_seed_and_writes_the_manifest(tmp_path, capsys):
    from training.calibrate_clarify import main

    model = tmp_path / "model"
    shutil.copytree(EMBEDDED, model)
    assert main(["--model", str(model), "--samples", "6", "--seed", "4242", "--write"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 scenes of seed 4242") and "<- chosen" in out
    threshold = clarify_threshold_of(model)
    assert threshold is not None and 0 < threshold <= 0.5
    assert f"clarify_threshold {threshold} written" in out


def test_an_adapter_answers_with_its_own_threshold_not_the_bases(tmp_path, asking_model):
    """An adapter changes the first token's distribution: while it is active the threshold is the
    one in its own manifest (none: greedy alone), and the base's comes back with the base."""
    from vla_node.backends.transformers_backend import TransformersBackend

    uncalibrated = ROOT / "models" / "tabletop-tiny-zh-lora"
    calibrated = tmp_path / "calibrated-lora"
    shutil.copytree(uncalibrated, calibrated)
    write_manifest(calibrated, {**read_manifest(calibrated), "clarify_threshold": 0.125})
    backend = TransformersBackend(asking_model, device="cpu", dtype="float32", max_new_tokens=TOKENS)
    try:
        base_threshold = read_manifest(asking_model)["clarify_threshold"]
        assert backend.clarify_rule.threshold == base_threshold
        backend.load_adapter(str(uncalibrated), "zh")
        backend.load_adapter(str(calibrated), "zh_calibrated")
        backend.set_adapter("zh")
        assert backend.clarify_rule is None and backend.first_token_processor() is None
        backend.set_adapter("zh_calibrated")
        assert backend.clarify_rule.threshold == 0.125
        backend.set_adapter(None)
        assert backend.clarify_rule.threshold == base_threshold
    finally:
        backend.close()


def test_an_onnx_export_with_an_adapter_merged_carries_the_adapters_threshold(tmp_path, asking_model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import json

    from training.onnx_export import export_onnx

    calibrated = tmp_path / "calibrated-lora"
    shutil.copytree(ROOT / "models" / "tabletop-tiny-zh-lora", calibrated)
    write_manifest(calibrated, {**read_manifest(calibrated), "clarify_threshold": 0.125})
    for adapter, expected in ((calibrated, 0.125), (ROOT / "models" / "tabletop-tiny-zh-lora", None)):
        out = tmp_path / f"onnx-{adapter.name}"
        export_onnx(str(asking_model), str(out), adapter=str(adapter))
        # the adapter's own, or none: the base's does not carry over
        assert json.loads((out / "onnx_manifest.json").read_text()).get("clarify_threshold") == expected
