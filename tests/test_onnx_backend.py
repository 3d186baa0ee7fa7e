"""onnxruntime backend: `vla-export --onnx` of the trained models, token parity with torch, the
runtime's interface (statuses through the real InferenceCore), and clear refusals.

Two families, two trained models: the embedded Qwen3-VL (models/tabletop-tiny, deepstack, with and
without its Chinese adapter merged) and the Qwen2.5-VL embedded model of 2026-12-01
(tests/data/tabletop-tiny-qwen2_5_vl: window attention inputs, the Qwen2.5 path).

The 40-100-command parity runs live in benchmarks/onnx_vs_torch.py (too slow for CI here).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")  # torch.onnx.export writes through it

from training.export import main as export_main  # noqa: E402
from training.onnx_export import OnnxExportError, export_onnx  # noqa: E402
from vla_node.backends.base import BackendError, GenerationRequest  # noqa: E402
from vla_node.backends.onnx_backend import (  # noqa: E402
    OnnxBackend,
    _builtin_chat,
    position_embedding_taps,
    render_chat,
    vision_inputs,
)

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "tests" / "data" / "tabletop-tiny-qwen2_5_vl"
QWEN3 = ROOT / "models" / "tabletop-tiny"  # the embedded model: Qwen3-VL
QWEN3_ADAPTER = ROOT / "models" / "tabletop-tiny-zh-lora"
PARITY_COMMANDS = 4  # 2 en + 2 zh held-out commands; 100 in benchmarks/onnx_vs_torch.py
PARITY_TOKENS = 32
INT4_COMMANDS = 6  # held-out English commands through both exports (400 in benchmarks/results/cpu_latency.txt)

pytestmark = pytest.mark.skipif(not (EMBEDDED / "config.json").is_file(),
                                reason="the Qwen2.5-VL test model is missing")


def exported(tmp_path_factory, folder: str, model: Path, adapter: Path | None = None,
             quantize: str | None = None) -> Path:
    """`vla-export --onnx` of model (with adapter merged; quantised) into a fresh temporary folder."""
    out = tmp_path_factory.mktemp(folder) / f"{model.name}-onnx"
    merged = ["--adapter", str(adapter)] if adapter else []
    quantized = ["--quantize", quantize] if quantize else []
    assert export_main(["--model", str(model), *merged, "--onnx", str(out), *quantized]) == 0
    return out


def served(export_dir: Path):
    """An OnnxBackend on export_dir for a fixture's lifetime (yield from)."""
    backend = OnnxBackend(export_dir, device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "onnx", EMBEDDED)


@pytest.fixture(scope="module")
def onnx_backend(onnx_dir) -> OnnxBackend:
    yield from served(onnx_dir)


@pytest.fixture(scope="module")
def torch_backend():
    from vla_node.backends.transformers_backend import TransformersBackend

    return TransformersBackend(EMBEDDED, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from training.onnx_parity import heldout_commands

    return heldout_commands(ROOT / "models", tmp_path_factory.mktemp("heldout"), PARITY_COMMANDS)


def test_export_folder_is_self_contained(onnx_dir):
    names = {p.name for p in onnx_dir.iterdir()}
    assert {"vision.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json", "chat_template.jinja",
            "config.json", "onnx_manifest.json", "vla_manifest.json"} <= names
    manifest = json.loads((onnx_dir / "onnx_manifest.json").read_text())
    assert manifest["family"] == "qwen2_5_vl" and manifest["num_layers"] == 4


def test_greedy_tokens_match_torch_on_heldout_commands(torch_backend, onnx_backend, heldout):
    from training.onnx_parity import compare_greedy

    result = compare_greedy(torch_backend, onnx_backend, heldout, PARITY_TOKENS)
    assert {c.language for c in heldout} == {"en", "zh"}
    assert result["tokens"] > 3 * len(heldout)
    assert result["mismatches"] == [], result["mismatches"]


def assert_inputs_match_the_transformers_processor(torch_backend, onnx_backend, command):
    """token ids, pixel values (bit-identical), grid and M-RoPE position ids as transformers makes them."""
    from vla_node.image import fit_to_limits

    image = fit_to_limits(command.image, torch_backend.pixel_limits)
    expected = torch_backend.prepare_inputs(image, command.messages)
    got = onnx_backend.prepare_inputs(image, command.messages)
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"][0].numpy())
    np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"].numpy())  # bit-identical
    assert list(got["grid_thw"]) == expected["image_grid_thw"][0].tolist()
    positions, delta = torch_backend.model.model.get_rope_index(
        expected["input_ids"], expected["mm_token_type_ids"], expected["image_grid_thw"])
    np.testing.assert_array_equal(got["position_ids"], positions.numpy())
    assert got["rope_delta"] == int(delta)
    return got, expected


def test_inputs_match_the_transformers_processor(torch_backend, onnx_backend, heldout):
    assert_inputs_match_the_transformers_processor(torch_backend, onnx_backend, heldout[-1])  # Chinese


def test_builtin_chat_format_matches_the_exported_template(onnx_dir, heldout):
    template = (onnx_dir / "chat_template.jinja").read_text()
    for command in heldout:
        assert render_chat(template, command.messages) == _builtin_chat(command.messages)


def test_window_attention_inputs_match_transformers():
    import torch
    from transformers.vision_utils import get_vision_window_index

    grid = (1, 12, 18)  # 168x252 image: 2x3 windows of 4x4 merged tokens, the last ones partial
    got = vision_inputs(grid, merge=2, window_size=112, patch=14, windowed=True)
    window_index, cu = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=2, window_size=112,
                                               patch_size=14)
    np.testing.assert_array_equal(got["window_index"], window_index.numpy())
    np.testing.assert_array_equal(got["window_index"][got["reverse_index"]], np.arange(len(window_index)))
    bounds = cu.tolist()
    attends = got["window_bias"] == 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        assert attends[start:end, start:end].all()
        assert not attends[start:end, end:].any() and not attends[start:end, :start].any()


def test_window_attention_vision_encoder_matches_torch(tiny_qwen2_5_vl, tmp_path):
    """The embedded model has only full-attention vision blocks; the tiny fixture has windows."""
    import torch

    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.image import fit_to_limits
    from tests.fixtures_models import tiny_image, tiny_messages

    export_onnx(str(tiny_qwen2_5_vl), str(tmp_path / "onnx"))
    backend = OnnxBackend(tmp_path / "onnx")
    assert backend.manifest["vision"]["windowed"]
    reference = TransformersBackend(tiny_qwen2_5_vl, device="cpu", dtype="float32")
    image = fit_to_limits(tiny_image(640, 360), reference.pixel_limits)  # 168x280: 2x3 windows, partial ones
    expected_inputs = reference.prepare_inputs(image, tiny_messages())
    with torch.inference_mode():
        expected = reference.model.model.get_image_features(
            expected_inputs["pixel_values"], expected_inputs["image_grid_thw"]).pooler_output
    expected = (expected[0] if isinstance(expected, (list, tuple)) else expected).numpy()
    inputs = backend.prepare_inputs(image, tiny_messages())
    embeds, deepstack = backend._image_features(inputs["pixel_values"], inputs["grid_thw"])
    assert deepstack is None
    np.testing.assert_allclose(embeds, expected, atol=1e-5)


def test_core_with_onnx_backend_gives_the_same_plan_and_status_as_torch(onnx_dir, torch_backend, heldout):
    """The runtime default, constrained decoding, on both backends (the same grammar and processor)."""
    from vla_node.factory import RuntimeSettings, build_core
    from vla_node.vocabulary import Vocabulary

    onnx_core = build_core(RuntimeSettings(backend="onnx", model_path=str(onnx_dir), device="cpu",
                                           max_new_tokens=PARITY_TOKENS))
    assert onnx_core.backend.action_grammar is not None, "constrained decoding is on by default"
    torch_core = build_core(RuntimeSettings(max_new_tokens=PARITY_TOKENS), backend=torch_backend)
    torch_backend.enable_constrained_decoding(Vocabulary.load(), torch_core.policy)
    try:
        for command, image in (("put the red cube in the blue bowl", heldout[0].image),
                               ("把绿色的球放进红色的碗里", heldout[2].image)):
            onnx_plan, onnx_status = onnx_core.infer(image, command, command_id="c1")
            torch_plan, torch_status = torch_core.infer(image, command, command_id="c1")
            assert onnx_status.code == torch_status.code
            assert onnx_status.detail == torch_status.detail
            assert (onnx_plan is None) == (torch_plan is None)
            if onnx_plan is not None:
                assert onnx_plan.raw_text == torch_plan.raw_text
                assert [s.model_dump(exclude={"confidence"}) for s in onnx_plan.steps] == \
                       [s.model_dump(exclude={"confidence"}) for s in torch_plan.steps]
                assert onnx_plan.steps[0].confidence == pytest.approx(torch_plan.steps[0].confidence, abs=1e-4)
    finally:
        torch_backend.disable_constrained_decoding()


def test_constrained_answers_match_torch(onnx_dir, torch_backend, heldout):
    """The same grammar, logits processor and budget rules on both backends: the same tokens, also
    when the budget is too small for the model's unconstrained answer."""
    from vla_node.image import fit_to_limits
    from vla_node.vocabulary import Vocabulary

    from vla_node.grammar import GrammarLogitsProcessor

    onnx = OnnxBackend(onnx_dir, device="cpu")
    onnx.enable_constrained_decoding(Vocabulary.load())
    torch_backend.enable_constrained_decoding(Vocabulary.load())
    masks = []  # every bitmask the onnx backend asked the grammar for (the real processor still runs)
    original = GrammarLogitsProcessor.next_bitmask

    def counted(self, input_ids):
        masks.append(int(input_ids.shape[1]))
        return original(self, input_ids)

    try:
        onnx_tokens = 0
        for index, command in enumerate(heldout):
            for budget in (12, PARITY_TOKENS):
                image = fit_to_limits(command.image, torch_backend.pixel_limits)
                request = GenerationRequest(image, command.messages, max_new_tokens=budget)
                GrammarLogitsProcessor.next_bitmask = counted
                try:
                    got = onnx.generate(request)
                finally:
                    GrammarLogitsProcessor.next_bitmask = original
                expected = torch_backend.generate(request)
                onnx_tokens += got.new_tokens
                assert (got.text, got.new_tokens) == (expected.text, expected.new_tokens), (index, budget)
                assert got.confidence == pytest.approx(expected.confidence, rel=1e-3)
        assert len(masks) == onnx_tokens, "one grammar mask per generated token"
        assert masks.count(1) == onnx_tokens - 2 * len(heldout), "the prompt first, then one token at a time"
        onnx.disable_constrained_decoding()
        assert onnx.action_grammar is None
    finally:
        torch_backend.disable_constrained_decoding()
        onnx.close()


def test_bad_inputs_get_clear_errors(onnx_backend, heldout):
    messages = heldout[0].messages
    with pytest.raises(BackendError, match="RGB uint8"):
        onnx_backend.generate(GenerationRequest(np.zeros((56, 56), np.uint8), messages))
    with pytest.raises(BackendError, match="max_new_tokens"):
        onnx_backend.generate(GenerationRequest(heldout[0].image, messages, max_new_tokens=0))
    with pytest.raises(BackendError, match="exactly one image"):
        onnx_backend.generate(GenerationRequest(heldout[0].image, [{"role": "user", "content": "hi"}]))
    with pytest.raises(BackendError, match="merge it at export time"):
        onnx_backend.load_adapter(str(ROOT / "models" / "tabletop-tiny-zh-lora"))
    with pytest.raises(BackendError, match="no adapters"):
        onnx_backend.set_adapter("zh")
    stop = threading.Event()
    stop.set()
    result = onnx_backend.generate(GenerationRequest(heldout[0].image, messages, stop_event=stop))
    assert result.text == "" and result.new_tokens == 0 and result.model_input_size == (252, 168)


def test_folders_that_are_not_onnx_exports_are_refused(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        OnnxBackend(tmp_path / "missing")
    with pytest.raises(BackendError, match="not a `vla-export --onnx` folder"):
        OnnxBackend(EMBEDDED)  # a torch checkpoint
    unsupported = tmp_path / "llava"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(BackendError, match="export it with `vla-export"):
        OnnxBackend(unsupported)
    with pytest.raises(OnnxExportError, match=r"'llava' cannot be exported to ONNX \(supported: .*qwen3_vl\)"):
        export_onnx(str(unsupported), str(tmp_path / "out"))
    assert export_main(["--model", str(unsupported), "--onnx", str(tmp_path / "out")]) == 1
    (unsupported / "onnx_manifest.json").write_text(json.dumps({"format": 1, "family": "llava"}))
    with pytest.raises(BackendError, match="family 'llava' is not supported"):
        OnnxBackend(unsupported)
    from vla_node.factory import RuntimeSettings, build_core

    with pytest.raises(BackendError, match="needs model_path"):
        build_core(RuntimeSettings(backend="onnx"))


def test_without_xgrammar_the_factory_serves_unconstrained_plans(onnx_dir, heldout, tmp_path):
    """A host without xgrammar (and so without torch): constrained decoding, on by default, is
    skipped with a warning, and commands still get plans, with no torch or transformers imported."""
    image_path = tmp_path / "image.npy"
    np.save(image_path, heldout[0].image)
    script = f"""
import json, logging, sys, numpy as np
sys.modules["xgrammar"] = None  # as if it were not installed
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from vla_node.factory import RuntimeSettings, build_core
core = build_core(RuntimeSettings(backend="onnx", model_path={str(onnx_dir)!r}, device="cpu", max_new_tokens=16))
plan, status = core.infer(np.load({str(image_path)!r}), "put the red cube in the blue bowl", command_id="c1")
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print(json.dumps({{"heavy": heavy, "grammar": core.backend.action_grammar is not None, "status": status.code}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "grammar": False, "status": report["status"]} and report["status"]
    assert "constrained decoding needs xgrammar" in out.stderr and "generating unconstrained" in out.stderr


def test_runs_without_torch_or_transformers(onnx_dir, heldout, tmp_path):
    image_path = tmp_path / "image.npy"
    np.save(image_path, heldout[0].image)
    script = f"""
import json, sys, numpy as np
from vla_node.backends.onnx_backend import OnnxBackend
from vla_node.backends.base import GenerationRequest
from vla_node.image import fit_to_limits
backend = OnnxBackend({str(onnx_dir)!r})
messages = json.loads({json.dumps(json.dumps(heldout[0].messages))})
image = fit_to_limits(np.load({str(image_path)!r}), backend.pixel_limits)
result = backend.generate(GenerationRequest(image, messages, max_new_tokens=8))
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print(json.dumps({{"heavy": heavy, "tokens": result.new_tokens}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [] and report["tokens"] >= 1


# ------------------------------------------------------------------------------ Qwen3-VL: the embedded model


@pytest.fixture(scope="module")
def qwen3_onnx_dir(tmp_path_factory) -> Path:
    if not (QWEN3 / "config.json").is_file():
        pytest.skip("the embedded Qwen3-VL model is missing")
    return exported(tmp_path_factory, "onnx_qwen3", QWEN3)


@pytest.fixture(scope="module")
def qwen3_zh_onnx_dir(qwen3_onnx_dir, tmp_path_factory) -> Path:
    """The embedded model with its Chinese adapter merged at export (vla-export --adapter)."""
    if not (QWEN3_ADAPTER / "adapter_config.json").is_file():
        pytest.skip("the embedded Chinese adapter is missing")
    return exported(tmp_path_factory, "onnx_qwen3_zh", QWEN3, QWEN3_ADAPTER)


@pytest.fixture(scope="module")
def qwen3_onnx(qwen3_onnx_dir) -> OnnxBackend:
    yield from served(qwen3_onnx_dir)


@pytest.fixture(scope="module")
def qwen3_zh_onnx(qwen3_zh_onnx_dir) -> OnnxBackend:
    yield from served(qwen3_zh_onnx_dir)


@pytest.fixture(scope="module")
def qwen3_torch(qwen3_onnx_dir):
    """The embedded model as the node serves it: the Chinese adapter loaded (peft, unmerged), inactive."""
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(QWEN3, device="cpu", dtype="float32")
    backend.load_adapter(str(QWEN3_ADAPTER), "zh")
    backend.set_adapter(None)
    yield backend
    backend.close()


def test_qwen3_export_wires_deepstack_through(qwen3_onnx_dir, qwen3_zh_onnx_dir, heldout):
    import onnxruntime as ort

    config = json.loads((QWEN3 / "config.json").read_text())
    manifest = json.loads((qwen3_onnx_dir / "onnx_manifest.json").read_text())
    assert manifest["family"] == "qwen3_vl" and manifest["head_dim"] == config["text_config"]["head_dim"]
    indexes = config["vision_config"]["deepstack_visual_indexes"]
    assert manifest["deepstack_visual_indexes"] == indexes and manifest["deepstack_layers"] == len(indexes) >= 1
    assert manifest["vision_inputs"] == ["pixel_values", "position_ids", "interp_indices", "interp_weights"]
    grid = manifest["vision"]["position_embedding"]
    assert grid == {"grid_per_side": 24, "interpolation": "bilinear", "align_corners": True}
    assert grid["grid_per_side"] ** 2 == config["vision_config"]["num_position_embeddings"]
    assert (manifest["vision"]["patch_size"], manifest["vision"]["image_mean"]) == (16, [0.5, 0.5, 0.5])
    vision = ort.InferenceSession(str(qwen3_onnx_dir / "vision.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in vision.get_outputs()] == ["image_embeds", "deepstack_embeds"]
    decoder = ort.InferenceSession(str(qwen3_onnx_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in decoder.get_inputs()][:5] == [
        "inputs_embeds", "position_ids", "deepstack_embeds", "visual_positions", "past_key_0"]
    merged = json.loads((qwen3_zh_onnx_dir / "onnx_manifest.json").read_text())
    assert merged["merged_adapter"] == str(QWEN3_ADAPTER) and merged["source_model"] == str(QWEN3)
    template = (qwen3_onnx_dir / "chat_template.jinja").read_text()
    assert all(render_chat(template, c.messages) == _builtin_chat(c.messages) for c in heldout)


def test_qwen3_inputs_and_vision_features_match_transformers(qwen3_torch, qwen3_onnx, heldout):
    """Processor outputs and rope index as transformers', the resampled position grid's taps
    bit-identical, the image embeddings and deepstack features within float32 noise."""
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    got, expected = assert_inputs_match_the_transformers_processor(qwen3_torch, qwen3_onnx, heldout[-1])
    visual = qwen3_torch.model.model.visual
    indices, weights = get_vision_interpolation_indices_and_weights(
        expected["image_grid_thw"], visual.num_grid_per_side, mode="bilinear", align_corners=True,
        spatial_merge_size=visual.spatial_merge_size)
    taps = position_embedding_taps(got["grid_thw"], visual.num_grid_per_side, visual.spatial_merge_size)
    np.testing.assert_array_equal(taps[0], indices.numpy())
    np.testing.assert_array_equal(taps[1], weights.numpy())
    with torch.inference_mode():
        reference = qwen3_torch.model.model.get_image_features(expected["pixel_values"], expected["image_grid_thw"])
    embeds, deepstack = qwen3_onnx._image_features(got["pixel_values"], got["grid_thw"])
    np.testing.assert_allclose(embeds, reference.pooler_output[0].numpy(), atol=1e-4)
    assert deepstack.shape == (len(reference.deepstack_features), *embeds.shape)
    for level, features in zip(deepstack, reference.deepstack_features):
        np.testing.assert_allclose(level, features[0].numpy(), atol=1e-4)


@pytest.mark.parametrize("adapter", [None, "zh"], ids=["base", "zh-adapter-merged"])
def test_qwen3_greedy_tokens_match_torch(adapter, qwen3_torch, heldout, request):
    """The embedded model's greedy answers through onnxruntime are transformers' generate's, token
    for token; with the adapter: the export with it merged against torch with it loaded (peft)."""
    from training.onnx_parity import compare_greedy

    onnx = request.getfixturevalue("qwen3_zh_onnx" if adapter else "qwen3_onnx")
    qwen3_torch.set_adapter(adapter)
    try:
        result = compare_greedy(qwen3_torch, onnx, heldout, PARITY_TOKENS)
    finally:
        qwen3_torch.set_adapter(None)
    assert result["tokens"] > 3 * len(heldout)
    assert result["mismatches"] == [], result["mismatches"]


def test_qwen3_decode_step_without_image_tokens(qwen3_onnx, heldout):
    """A decode step feeds zero deepstack rows: its logits are those of one uncached call over the
    prompt and that token; on the prompt call the deepstack features do count."""
    from vla_node.image import fit_to_limits

    backend = qwen3_onnx
    inputs = backend.prepare_inputs(fit_to_limits(heldout[0].image, backend.pixel_limits), heldout[0].messages)
    session = backend._decoder_session
    prompt_feeds = backend._prompt_feeds(inputs)
    assert prompt_feeds["deepstack_embeds"].shape[1] == len(prompt_feeds["visual_positions"]) > 0
    prompt = session.run(None, prompt_feeds)
    token = int(np.argmax(prompt[0][0]))
    step_embeds = np.asarray(backend._embed[[token]], dtype=np.float32)[None]
    step_positions = np.full((3, 1, 1), len(inputs["input_ids"]) + inputs["rope_delta"], dtype=np.int64)
    step_feeds = backend._decoder_feeds(step_embeds, step_positions, prompt[1:])
    assert step_feeds["deepstack_embeds"].shape[1] == 0 and step_feeds["visual_positions"].shape == (0,)
    step = session.run(None, step_feeds)
    whole = dict(prompt_feeds, inputs_embeds=np.concatenate([prompt_feeds["inputs_embeds"], step_embeds], axis=1),
                 position_ids=np.concatenate([prompt_feeds["position_ids"], step_positions], axis=2))
    np.testing.assert_allclose(step[0], session.run(None, whole)[0], atol=1e-4)
    without = session.run(None, dict(prompt_feeds, deepstack_embeds=np.zeros_like(prompt_feeds["deepstack_embeds"])))
    assert np.abs(without[0] - prompt[0]).max() > 0.1


def test_qwen3_prefix_reuse_gives_the_same_answers(qwen3_onnx_dir, qwen3_onnx, heldout):
    """The text before the image (the system text all commands share) is prefilled once and each
    prompt call starts from its keys and values (prefix_cache, on by default): the same tokens as
    prefilling the whole prompt, the deepstack features landing at the image tokens all the same."""
    from vla_node.image import fit_to_limits

    whole_prompt = OnnxBackend(qwen3_onnx_dir, device="cpu", prefix_cache=False)
    before = qwen3_onnx.prefix_cache_stats
    try:
        for command in heldout:
            image = fit_to_limits(command.image, qwen3_onnx.pixel_limits)
            inputs = qwen3_onnx.prepare_inputs(image, command.messages)
            feeds = qwen3_onnx._prompt_feeds(inputs)
            prefix = feeds["past_key_0"].shape[2]
            assert prefix > 0 and feeds["inputs_embeds"].shape[1] == len(inputs["input_ids"]) - prefix
            assert qwen3_onnx.generate_ids(image, command.messages, PARITY_TOKENS) == \
                whole_prompt.generate_ids(image, command.messages, PARITY_TOKENS)
    finally:
        whole_prompt.close()
    after = qwen3_onnx.prefix_cache_stats
    assert after["hits"] - before["hits"] >= 2 * len(heldout) - 1, "one system text, prefilled at most once"
    assert whole_prompt.prefix_cache_stats == {"hits": 0, "misses": 0, "entries": 0}


def test_qwen3_frame_cache_encodes_a_frame_once(qwen3_onnx_dir, heldout):
    """Requests about one frame (a command, then the presence check's counting question) run the
    vision encoder once (frame_cache, on by default); answers are those of a backend that encodes
    every request's frame; another frame is encoded anew."""
    from vla_node.image import fit_to_limits
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    count = PromptBuilder(Vocabulary.load(), template="compact").count_messages("red cube")
    cached = OnnxBackend(qwen3_onnx_dir, device="cpu")
    uncached = OnnxBackend(qwen3_onnx_dir, device="cpu", frame_cache=0)
    try:
        for frames, command in enumerate(heldout[:2], start=1):
            image = fit_to_limits(command.image, cached.pixel_limits)
            for messages in (command.messages, count):
                assert cached.generate_ids(image, messages, PARITY_TOKENS) == \
                    uncached.generate_ids(image, messages, PARITY_TOKENS)
            assert cached.frame_cache_stats == {"hits": frames, "misses": frames, "entries": frames}
        assert uncached.frame_cache_stats == {"hits": 0, "misses": 0, "entries": 0}
    finally:
        cached.close()
        uncached.close()
    with pytest.raises(BackendError, match="frame_cache must be >= 0"):
        OnnxBackend(qwen3_onnx_dir, device="cpu", frame_cache=-1)


def test_qwen3_constrained_answers_match_torch(qwen3_onnx_dir, qwen3_zh_onnx_dir, qwen3_torch, heldout):
    """The node's default, constrained decoding: English commands on the base export, Chinese ones
    on the export with the adapter merged, each against torch serving the same (adapter loaded)."""
    from vla_node.image import fit_to_limits
    from vla_node.vocabulary import Vocabulary

    qwen3_torch.enable_constrained_decoding(Vocabulary.load())
    try:
        for export_dir, adapter, language in ((qwen3_onnx_dir, None, "en"), (qwen3_zh_onnx_dir, "zh", "zh")):
            onnx = OnnxBackend(export_dir, device="cpu")
            onnx.enable_constrained_decoding(Vocabulary.load())
            qwen3_torch.set_adapter(adapter)
            try:
                for command in (c for c in heldout if c.language == language):
                    image = fit_to_limits(command.image, qwen3_torch.pixel_limits)
                    request = GenerationRequest(image, command.messages, max_new_tokens=PARITY_TOKENS)
                    got, expected = onnx.generate(request), qwen3_torch.generate(request)
                    assert (got.text, got.new_tokens) == (expected.text, expected.new_tokens), language
                    assert got.new_tokens > 3 and got.confidence == pytest.approx(expected.confidence, rel=1e-3)
            finally:
                onnx.close()
    finally:
        qwen3_torch.set_adapter(None)
        qwen3_torch.disable_constrained_decoding()


def test_qwen3_export_carries_the_counting_skill_and_the_presence_check_runs_on_it(qwen3_onnx_dir, qwen3_zh_onnx_dir,
                                                                                   tmp_path):
    """The base export says count_questions (its manifest's), so the node's presence check asks it: test_en
    sample 8's two-step plan moves a blue cylinder that is not there, checked it is the CLARIFY the scene
    needs. An export with the adapter merged keeps the base's skill in the adapter's manifest."""
    from training.collate import load_rgb
    from training.heldout import input_factor, materialise_heldout
    from vla_node.factory import RuntimeSettings, build_core

    assert json.loads((qwen3_onnx_dir / "onnx_manifest.json").read_text())["count_questions"] is True
    assert json.loads((qwen3_zh_onnx_dir / "onnx_manifest.json").read_text())["count_questions"] is True
    assert "count_questions" not in json.loads((QWEN3_ADAPTER / "vla_manifest.json").read_text())
    out = materialise_heldout(ROOT / "models" / "heldout" / "test_en.json", tmp_path, limit=9,
                              factor=input_factor(QWEN3))
    row = json.loads((out / "test.json").read_text(encoding="utf-8"))[8]
    command = json.loads(row["messages"][-2]["content"].split("Command: ", 1)[1])
    core = build_core(RuntimeSettings(backend="onnx", model_path=str(qwen3_onnx_dir), device="cpu"))
    try:
        assert core.backend.answers_count_questions
        plans = {}
        for check in (False, True):
            core.presence_check = check
            plans[check], _ = core.infer(load_rgb(out / row["images"][0]), command)
        answers = _count_answers(core, load_rgb(out / row["images"][0]), ["blue cylinder", "green box"])
    finally:
        core.backend.close()
    assert [s.verb for s in plans[False].steps] == ["MOVE_OBJECT", "MOVE_OBJECT"]
    assert [(s.verb, s.reason) for s in plans[True].steps] == [("CLARIFY", "no blue cylinder is visible")]
    # the questions end once the answer cannot say "absent": the absent thing's answer word for word,
    # the green box's (there) after its first token instead of the whole count and box
    (absent_whole, absent_ended), (present_whole, present_ended) = answers
    assert absent_whole.text == absent_ended.text == "no blue cylinder is visible"
    assert present_whole.text.startswith("1 green box is visible")
    assert present_whole.new_tokens > 2 >= present_ended.new_tokens and present_ended.text == "1"


def _count_answers(core, rgb, nouns: list[str]) -> list[tuple]:
    """(whole answer, answer ended by answer_choices) of the counting question about each noun."""
    from vla_node.backends.base import GenerationRequest
    from vla_node.image import fit_to_limits
    from vla_node.presence_check import ABSENT_ANSWER_TOKENS, absent_answers

    fitted = fit_to_limits(rgb, core.backend.pixel_limits)
    return [tuple(core.backend.generate(GenerationRequest(
        image=fitted, messages=core.prompt.count_messages(noun), max_new_tokens=ABSENT_ANSWER_TOKENS, free_text=True,
        answer_choices=choices)) for choices in ((), absent_answers(noun, core.prompt.vocab))) for noun in nouns]


# ------------------------------------------------------------------------------ speed: patch embedding, int4 decoder


def test_the_patch_embedding_is_exported_as_one_matmul(qwen3_onnx_dir):
    """A Conv3d with kernel == stride is a matmul on flattened patches; onnxruntime's Conv ran it 4-5x
    slower on CPU. (The features it feeds are checked against transformers' above, atol 1e-4.)"""
    import onnx

    ops = {node.op_type for node in onnx.load(str(qwen3_onnx_dir / "vision.onnx")).graph.node}
    assert "Conv" not in ops and "Gemm" in ops


@pytest.fixture(scope="module")
def qwen3_int4_dir(tmp_path_factory) -> Path:
    if not (QWEN3 / "config.json").is_file():
        pytest.skip("the embedded Qwen3-VL model is missing")
    return exported(tmp_path_factory, "onnx_qwen3_int4", QWEN3, quantize="int4")


def test_int4_export_stores_the_decoder_weights_in_4_bits(qwen3_onnx_dir, qwen3_int4_dir):
    import onnx

    manifest = json.loads((qwen3_int4_dir / "onnx_manifest.json").read_text())
    layers = manifest["num_layers"]
    per_layer = 7  # q, k, v, o; gate, up, down
    assert manifest["decoder_weights"] == {"scheme": "int4", "bits": 4, "block_size": 32, "symmetric": True,
                                           "accuracy_level": 4, "quantized_matmuls": per_layer * layers + 1}
    assert "decoder_weights" not in json.loads((qwen3_onnx_dir / "onnx_manifest.json").read_text())
    graph = onnx.load(str(qwen3_int4_dir / "decoder.onnx")).graph
    weights = {init.name for init in graph.initializer}
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) == per_layer * layers + 1  # + the LM head
    assert not [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    assert (qwen3_int4_dir / "decoder.onnx").stat().st_size < (qwen3_onnx_dir / "decoder.onnx").stat().st_size / 5
    vision_ops = {node.op_type for node in onnx.load(str(qwen3_int4_dir / "vision.onnx")).graph.node}
    assert "MatMulNBits" not in vision_ops, "the vision encoder stays float32"


def test_int4_plans_are_the_float32_plans_boxes_within_a_pixel(qwen3_onnx_dir, qwen3_int4_dir, tmp_path):
    """Through the runtime (InferenceCore, constrained decoding): the same status, verbs, objects and
    destinations on held-out English commands, each box within a pixel of float32's (measured on 400:
    the same metrics, 387 answers identical, 13 with one coordinate 1 px off)."""
    from training.collate import load_rgb
    from training.heldout import materialise_heldout
    from vla_node.actions import box_iou
    from vla_node.factory import RuntimeSettings, build_core

    data = materialise_heldout(ROOT / "models" / "heldout" / "test_en.json", tmp_path / "en", limit=INT4_COMMANDS)
    samples = json.loads((data / "test.json").read_text(encoding="utf-8"))
    cores = [build_core(RuntimeSettings(backend="onnx", model_path=str(d), device="cpu"))
             for d in (qwen3_onnx_dir, qwen3_int4_dir)]
    assert cores[1].backend.model_id.endswith("+int4") and not cores[0].backend.model_id.endswith("+int4")
    steps = 0
    try:
        for sample in samples:
            user = next(m["content"] for m in sample["messages"] if m["role"] == "user")
            command = json.loads(user.split("Command: ", 1)[1])
            image = load_rgb(data / sample["images"][0])
            (plan, status), (int4_plan, int4_status) = (core.infer(image, command) for core in cores)
            assert int4_status.code == status.code, command
            assert (plan is None) == (int4_plan is None)
            if plan is None:
                continue
            assert len(int4_plan.steps) == len(plan.steps), command
            for got, expected in zip(int4_plan.steps, plan.steps):
                boxes = ("object_box", "destination_box")
                assert got.model_dump(exclude={"confidence", *boxes}) == \
                       expected.model_dump(exclude={"confidence", *boxes}), command
                for box in boxes:
                    a, b = getattr(got, box), getattr(expected, box)
                    assert (a is None) == (b is None)
                    if a is not None:  # objects are 20-40 px: one pixel off is IoU >= 0.93
                        assert box_iou(a, b) >= 0.9, (command, a, b)
                steps += 1
    finally:
        for core in cores:
            core.backend.close()
    assert steps >= INT4_COMMANDS


def test_quantization_refusals(qwen3_int4_dir, tmp_path, capsys, monkeypatch):
    from training.onnx_quantize import quantize_decoder

    with pytest.raises(ValueError, match="already quantised"):
        quantize_decoder(qwen3_int4_dir)
    with pytest.raises(OnnxExportError, match=r"unknown quantization 'int2' \(supported: int4\)"):
        export_onnx(str(QWEN3), str(tmp_path / "int2"), quantize="int2")
    assert not (tmp_path / "int2").exists()
    with pytest.raises(SystemExit):
        export_main(["--model", str(QWEN3), "--adapter", str(QWEN3_ADAPTER), "--out", str(tmp_path / "m"),
                     "--quantize", "int4"])
    assert "--quantize applies to --onnx exports only" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # a host without the quantizer
    with pytest.raises(OnnxExportError, match=r"--quantize needs onnx and onnxruntime>=1\.22"):
        export_onnx(str(QWEN3), str(tmp_path / "no-quantizer"), quantize="int4")
    assert not (tmp_path / "no-quantizer").exists(), "refused before anything is written"


def test_vla_eval_scores_an_int4_export_on_backend_onnx(qwen3_int4_dir, tmp_path, capsys):
    """`vla-eval --backend onnx`: the held-out metrics of an export as a robot without torch serves it."""
    from training.evaluate import main as eval_main
    from training.heldout import materialise_heldout

    data = materialise_heldout(ROOT / "models" / "heldout" / "test_en.json", tmp_path / "en", limit=INT4_COMMANDS)
    common = ["--model", str(qwen3_int4_dir), "--backend", "onnx", "--dataset-dir", str(data),
              "--dataset", "tabletop_test", "--device", "cpu"]
    assert eval_main([*common, "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    run = metrics["runs"]["model"]
    assert metrics["backend"] == "onnx" and run["n"] == INT4_COMMANDS and run["model_id"].endswith("+int4")
    assert run["parse_valid_rate"] == 1.0 and run["plan_exact_match"] >= 0.5
    assert "backend: onnx" in (tmp_path / "eval" / "metrics.md").read_text()
    capsys.readouterr()
    assert eval_main([*common, "--adapter", str(QWEN3_ADAPTER)]) == 1
    assert "pass the export as the model, without an adapter" in capsys.readouterr().err


def test_the_demo_on_backend_onnx_with_int4_weights_answers_every_command(tmp_path_factory, tmp_path, capsys):
    """The robot-CPU path end to end: the real node on backend onnx serving the embedded model with its
    Chinese adapter merged and the decoder in 4 bits, replaying the demo bag; every command right."""
    pytest.importorskip("rclpy")
    from vla_node import demo
    from vla_node.report import load_expectations

    if not (QWEN3_ADAPTER / "adapter_config.json").is_file():
        pytest.skip("the embedded Chinese adapter is missing")
    export = exported(tmp_path_factory, "onnx_qwen3_zh_int4", QWEN3, QWEN3_ADAPTER, quantize="int4")
    with pytest.raises(SystemExit):
        demo.main(["--backend", "onnx"])
    assert "--backend onnx needs --model" in capsys.readouterr().err
    assert demo.main(["--backend", "onnx", "--model", str(export), "--out", str(tmp_path / "demo"),
                      "--as-fast-as-possible"]) == 0
    out = capsys.readouterr().out
    commands = load_expectations(ROOT / "tests" / "data" / "demo_bag.truth.json")["commands"]
    assert f"{len(commands)} of {len(commands)} commands answered as the scene requires" in out, out
    report = json.loads((tmp_path / "demo" / "report.json").read_text(encoding="utf-8"))
    assert report["node"]["model_id"].endswith("+int4") and not report["node"]["adapter_id"]


def test_onnx_threads_sets_onnxruntimes_intra_op_threads(qwen3_int4_dir):
    """The node's onnx_threads parameter reaches both sessions; negatives are refused by name."""
    from vla_node.factory import RuntimeSettings, build_core, settings_from_parameters
    from vla_node.settings import PARAMETERS

    values = {name: p.default for name, p in PARAMETERS.items()}
    runtime, _ = settings_from_parameters({**values, "backend": "onnx", "model_path": str(qwen3_int4_dir),
                                           "device": "cpu", "onnx_threads": 1})
    core = build_core(runtime)
    try:
        for session in (core.backend._vision_session, core.backend._decoder_session):
            assert session.get_session_options().intra_op_num_threads == 1
    finally:
        core.backend.close()
    with pytest.raises(BackendError, match="onnx_threads must be >= 0"):
        build_core(RuntimeSettings(backend="onnx", model_path=str(qwen3_int4_dir), device="cpu", onnx_threads=-1))
