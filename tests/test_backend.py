"""TransformersBackend on tiny checkpoints: generation, stop, limits, LoRA hot swap, refusals."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

from tests.fixtures_models import (  # noqa: F401  (pytest fixtures)
    TEST_VOCAB_FINGERPRINT,
    build_lora_adapter,
    tiny_adapter,
    tiny_adapter_b,
    tiny_checkpoints,
    tiny_image,
    tiny_messages,
    tiny_model_dir,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)
from tests.stop_events import SetOnCheck
from vla_node import manifest as m
from vla_node.backends import Backend, BackendError, GenerationRequest, GenerationResult, TransformersBackend
from training.tiny_models import FAMILIES

# peft 0.21 calls a transformers API that transformers 5.23 deprecated; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CONVENTION = {"qwen2_vl": "absolute_resized", "qwen2_5_vl": "absolute_resized", "qwen3_vl": "normalized_1000"}


def _req(n=8, stop_event=None, image=None, command="put the red cube in the blue bowl"):
    return GenerationRequest(
        image=tiny_image() if image is None else image,
        messages=tiny_messages(command),
        max_new_tokens=n,
        stop_event=stop_event,
    )


def _logits(backend):
    inputs = backend.prepare_inputs(tiny_image(), tiny_messages())
    with torch.no_grad():
        return backend.model(**inputs).logits[0, -1].clone()


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    b = TransformersBackend(tiny_model_dir, device="cpu", vocab_fingerprint=TEST_VOCAB_FINGERPRINT)
    yield b
    b.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_generates_for_each_family(tiny_checkpoints, family):
    b = TransformersBackend(tiny_checkpoints[family], device="cpu", max_new_tokens=32)
    assert isinstance(b, Backend)
    assert b.family == family
    assert b.coordinate_convention == CONVENTION[family]
    assert b.model_id.startswith(tiny_checkpoints[family].name + "@")
    assert b.adapter_id == ""
    assert b.pixel_limits.min_pixels == 56 * 56 and b.pixel_limits.max_pixels == 224 * 224
    assert b.pixel_limits.factor == (32 if family == "qwen3_vl" else 28)
    assert b.dtype == torch.float32 and b.device.type == "cpu"
    b.warmup()

    r = b.generate(_req(n=6))
    assert isinstance(r, GenerationResult)
    assert isinstance(r.text, str) and r.text  # random weights: some text
    assert 0.0 < r.confidence <= 1.0
    assert 1 <= r.new_tokens <= 6
    assert r.prompt_tokens > 20
    assert r.preprocess_ms > 0 and r.generate_ms > 0
    w, h = r.model_input_size
    f = b.pixel_limits.factor
    assert w % f == 0 and h % f == 0
    assert b.pixel_limits.min_pixels <= w * h <= b.pixel_limits.max_pixels
    # 160x120 input keeps its aspect ratio approximately
    assert abs(w / h - 160 / 120) < 0.35

    # greedy is deterministic
    assert b.generate(_req(n=6)).text == r.text
    b.close()
    with pytest.raises(BackendError, match="closed"):
        b.generate(_req())


def test_max_new_tokens_is_honoured(backend):
    for n in (1, 3, 9):
        r = backend.generate(_req(n=n))
        assert r.new_tokens <= n
    assert backend.generate(_req(n=9)).new_tokens == 9  # the tiny model does not emit <|im_end|> this early
    capped = TransformersBackend(backend.model_path, device="cpu", max_new_tokens=4)
    assert capped.generate(_req(n=50)).new_tokens <= 4
    with pytest.raises(BackendError, match="max_new_tokens"):
        backend.generate(_req(n=0))


def test_stop_event_aborts_generation(backend):
    full = backend.generate(_req(n=20))
    assert full.new_tokens == 20
    ev = SetOnCheck(4)  # pre-check + 2 tokens pass, stops at the 3rd token check
    r = backend.generate(_req(n=20, stop_event=ev))
    assert 1 <= r.new_tokens < 10
    assert full.text.startswith(r.text) or r.text == ""
    # already set before the call: nothing is generated
    ev2 = threading.Event()
    ev2.set()
    r2 = backend.generate(_req(n=20, stop_event=ev2))
    assert r2.new_tokens == 0 and r2.text == "" and r2.confidence == 1.0

    # set from another thread while generating
    ev3 = threading.Event()
    timer = threading.Timer(0.05, ev3.set)
    timer.start()
    r3 = TransformersBackend(backend.model_path, device="cpu", max_new_tokens=4000).generate(
        _req(n=4000, stop_event=ev3)
    )
    timer.join()
    assert r3.new_tokens < 4000


def test_bad_image_is_rejected(backend):
    with pytest.raises(BackendError, match="RGB uint8"):
        backend.generate(_req(image=tiny_image()[:, :, 0]))


def test_lora_hot_swap_without_base_reload(tiny_model_dir, tiny_adapter, tiny_adapter_b):
    b = TransformersBackend(tiny_model_dir, device="cpu", vocab_fingerprint=TEST_VOCAB_FINGERPRINT)
    base_obj = b.model
    base_id = id(b.model)
    base_logits = _logits(b)
    base_out = b.generate(_req(n=8))

    assert b.load_adapter(str(tiny_adapter), "a") == "a"
    assert b.adapter_id == ""  # loading does not activate
    assert torch.allclose(_logits(b), base_logits)
    assert b.load_adapter(str(tiny_adapter_b)) == "lora_b"  # default name: directory name
    assert b.adapter_names() == ["a", "lora_b"]
    assert b.warnings == []  # both have a manifest that matches

    b.set_adapter("a")
    assert b.adapter_id.startswith("a@") and len(b.adapter_id) == len("a@") + 8
    a_logits = _logits(b)
    assert not torch.allclose(a_logits, base_logits, atol=1e-4)
    a_out = b.generate(_req(n=8))
    assert (a_out.text, a_out.confidence) != (base_out.text, base_out.confidence)

    b.set_adapter("lora_b")
    assert b.adapter_id.startswith("lora_b@")
    b_logits = _logits(b)
    assert not torch.allclose(b_logits, a_logits, atol=1e-4)

    b.set_adapter(None)
    assert b.adapter_id == ""
    assert torch.allclose(_logits(b), base_logits, atol=1e-6)
    again = b.generate(_req(n=8))
    assert again.text == base_out.text and again.confidence == pytest.approx(base_out.confidence)

    b.set_adapter("a")
    assert torch.allclose(_logits(b), a_logits, atol=1e-6)
    assert id(b.model) == base_id and b.model is base_obj and b.base_model is base_obj
    assert b.peft_model is not None and b.peft_model.get_base_model() is base_obj

    with pytest.raises(BackendError, match="not loaded"):
        b.set_adapter("nope")
    with pytest.raises(BackendError, match="already loaded"):
        b.load_adapter(str(tiny_adapter), "a")
    with pytest.raises(BackendError, match="contain no '.'"):
        b.load_adapter(str(tiny_adapter), "a.b")


def test_constructor_adapter_is_active(tiny_model_dir, tiny_adapter):
    b = TransformersBackend(
        tiny_model_dir, adapter_path=tiny_adapter, device="cpu", vocab_fingerprint=TEST_VOCAB_FINGERPRINT
    )
    assert b.adapter_id.startswith("lora_a@")
    assert b.active_adapter == "lora_a"


def test_adapter_pixel_limits_override(tmp_path, tiny_model_dir):
    ad = build_lora_adapter(
        tiny_model_dir, tmp_path / "small", seed=3, image={"min_pixels": 784, "max_pixels": 112 * 112}
    )
    b = TransformersBackend(tiny_model_dir, device="cpu", vocab_fingerprint=TEST_VOCAB_FINGERPRINT)
    big = b.generate(_req(n=1, image=tiny_image(448, 336)))
    b.load_adapter(str(ad), "small")
    b.set_adapter("small")
    assert (b.pixel_limits.min_pixels, b.pixel_limits.max_pixels) == (784, 112 * 112)
    small = b.generate(_req(n=1, image=tiny_image(448, 336)))
    w, h = small.model_input_size
    assert w * h <= 112 * 112 < big.model_input_size[0] * big.model_input_size[1]
    b.set_adapter(None)
    assert b.pixel_limits == b.base_pixel_limits


def test_manifest_mismatch_is_refused(tmp_path, tiny_model_dir, tiny_qwen2_vl, tiny_adapter):
    b = TransformersBackend(tiny_model_dir, device="cpu", vocab_fingerprint=TEST_VOCAB_FINGERPRINT)
    # trained for another base model
    other = build_lora_adapter(tiny_qwen2_vl, tmp_path / "q2", seed=1)
    with pytest.raises(BackendError, match="base_model.config_sha256") as e:
        b.load_adapter(str(other))
    assert str(other) in str(e.value)
    # other prompt template
    tpl = build_lora_adapter(tiny_model_dir, tmp_path / "tpl", seed=1, template="llamafactory/qwen2_vl")
    with pytest.raises(BackendError, match="field 'template'"):
        b.load_adapter(str(tpl))
    # other action vocabulary
    strict = TransformersBackend(tiny_model_dir, device="cpu", vocab_fingerprint="e" * 64)
    with pytest.raises(BackendError, match="vocabulary.fingerprint"):
        strict.load_adapter(str(tiny_adapter))
    # box convention that does not belong to the family
    conv = tmp_path / "conv"
    shutil.copytree(tiny_adapter, conv)
    data = m.read_manifest(conv)
    data["coordinate_convention"] = "normalized_1000"
    m.write_manifest(conv, data)
    with pytest.raises(BackendError, match="coordinate_convention"):
        b.load_adapter(str(conv))
    # nothing was half-loaded
    assert b.adapters == {} and b.adapter_id == ""


def test_adapter_without_manifest_is_allowed_with_warning(tmp_path, tiny_model_dir, tiny_adapter):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_adapter, plain)
    (plain / m.MANIFEST_NAME).unlink()
    b = TransformersBackend(tiny_model_dir, device="cpu")
    assert b.load_adapter(str(plain)) == "plain"
    assert len(b.warnings) == 1 and "no vla_manifest.json" in b.warnings[0] and str(plain) in b.warnings[0]


def test_missing_or_corrupt_model_dir(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(BackendError, match="does not exist") as e:
        TransformersBackend(missing, device="cpu")
    assert str(missing) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackendError, match="no config.json") as e:
        TransformersBackend(empty, device="cpu")
    assert str(empty) in str(e.value)
    (empty / "config.json").write_text("{oops")
    with pytest.raises(BackendError, match="not valid JSON"):
        TransformersBackend(empty, device="cpu")
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BackendError, match="not a supported Qwen-VL"):
        TransformersBackend(empty, device="cpu")


def test_model_without_weights(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(BackendError, match="cannot load model weights") as e:
        TransformersBackend(broken, device="cpu")
    assert str(broken) in str(e.value)


def test_corrupt_or_missing_adapter(tmp_path, tiny_model_dir, tiny_adapter):
    b = TransformersBackend(tiny_model_dir, device="cpu", vocab_fingerprint=TEST_VOCAB_FINGERPRINT)
    base_logits = _logits(b)
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_adapter, bad)
    w = bad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(BackendError, match="corrupt or truncated") as e:
        b.load_adapter(str(bad))
    assert str(w) in str(e.value)

    with pytest.raises(BackendError, match="does not exist"):
        b.load_adapter(str(tmp_path / "nope"))
    noconf = tmp_path / "noconf"
    shutil.copytree(tiny_adapter, noconf)
    (noconf / "adapter_config.json").unlink()
    with pytest.raises(BackendError, match="no adapter_config.json"):
        b.load_adapter(str(noconf))
    noweights = tmp_path / "noweights"
    shutil.copytree(tiny_adapter, noweights)
    (noweights / "adapter_model.safetensors").unlink()
    with pytest.raises(BackendError, match="no adapter_model"):
        b.load_adapter(str(noweights))

    # an adapter for another architecture (no manifest to catch it) fails inside peft, after
    # peft injected its layers: they are removed again
    from training.tiny_models import build_tiny_checkpoint

    narrow = build_tiny_checkpoint(tmp_path / "narrow", family="qwen2_5_vl", hidden_size=32)
    alien = build_lora_adapter(narrow, tmp_path / "alien", manifest=False)
    with pytest.raises(BackendError, match="peft cannot load it"):
        b.load_adapter(str(alien))
    assert b.warnings == []

    # the base model is untouched and a good adapter still loads afterwards
    assert b.peft_model is None and b.adapters == {}
    assert torch.allclose(_logits(b), base_logits)
    b.load_adapter(str(tiny_adapter), "good")
    b.set_adapter("good")
    assert b.adapter_id.startswith("good@")
    good_logits = _logits(b)
    # a failing second adapter leaves the first one and the base intact
    with pytest.raises(BackendError, match="peft cannot load it"):
        b.load_adapter(str(alien))
    assert b.adapter_names() == ["good"] and b.adapter_id.startswith("good@")
    assert torch.allclose(_logits(b), good_logits)
    b.set_adapter(None)
    assert torch.allclose(_logits(b), base_logits)


def test_concurrent_generate_and_swap_are_serialised(tiny_model_dir, tiny_adapter):
    b = TransformersBackend(tiny_model_dir, device="cpu", vocab_fingerprint=TEST_VOCAB_FINGERPRINT)
    b.load_adapter(str(tiny_adapter), "a")
    expected = {None: b.generate(_req(n=4)).text}
    b.set_adapter("a")
    expected["a"] = b.generate(_req(n=4)).text
    assert expected[None] != expected["a"]
    errors = []

    def worker(name):
        try:
            for _ in range(3):
                with b.lock:  # swap + generate as one unit, like a caller holding a request slot
                    b.set_adapter(name)
                    got = b.generate(_req(n=4)).text
                if got != expected[name]:
                    errors.append((name, got))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(n,)) for n in (None, "a", None, "a")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []

    # plain concurrent generate calls (no outside lock) are serialised by the backend itself
    b.set_adapter("a")
    results = []
    ts = [threading.Thread(target=lambda: results.append(b.generate(_req(n=4)).text)) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [expected["a"]] * 3


def test_device_and_dtype_selection(tiny_model_dir):
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            TransformersBackend(tiny_model_dir, device="cuda")
    with pytest.raises(BackendError, match="invalid dtype"):
        TransformersBackend(tiny_model_dir, device="cpu", dtype="int3")
    b = TransformersBackend(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert b.dtype == torch.bfloat16
    r = b.generate(_req(n=2))
    assert 0 < r.confidence <= 1


def test_torch_threads_sets_the_cpu_threads_and_rejects_negatives(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        b = TransformersBackend(tiny_model_dir, device="cpu", torch_threads=1)
        b.close()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        TransformersBackend(tiny_model_dir, device="cpu").close()  # 0 (default) leaves torch's choice alone
        assert torch.get_num_threads() == before
        with pytest.raises(BackendError, match="torch_threads must be >= 0"):
            TransformersBackend(tiny_model_dir, device="cpu", torch_threads=-2)
    finally:
        torch.set_num_threads(before)


def test_the_backend_reads_boxes_in_the_convention_of_the_models_manifest(tiny_checkpoints, tmp_path):
    """A Qwen3-VL checkpoint fine-tuned on pixel boxes (as the embedded model is) is read in pixels, not in
    Qwen3-VL's native 0-1000: the node would otherwise place every box elsewhere."""
    model = tmp_path / "qwen3_pixels"
    shutil.copytree(tiny_checkpoints["qwen3_vl"], model)
    manifest = m.make_manifest(model, min_pixels=56 * 56, max_pixels=224 * 224, vocabulary_version="1",
                               vocabulary_fingerprint="f" * 64, coordinate_convention="absolute_resized")
    m.write_manifest(model, manifest)
    b = TransformersBackend(model, device="cpu", max_new_tokens=4)
    try:
        assert (b.family, b.coordinate_convention) == ("qwen3_vl", "absolute_resized")
    finally:
        b.close()
