"""Adapter manifest: write/read/validate, config hashing, compatibility checks (no models needed)."""

from __future__ import annotations

import copy
import json

import pytest

from vla_node import manifest as m


def _config(model_type="qwen2_5_vl", hidden=64, **extra):
    return {
        "architectures": ["X"],
        "model_type": model_type,
        "image_token_id": 5,
        "transformers_version": "5.23.0",
        "dtype": "float32",
        "text_config": {"hidden_size": hidden, "num_hidden_layers": 2, "dtype": "float32",
                        "_name_or_path": "/somewhere"},
        "vision_config": {"depth": 1, "hidden_size": 32, "transformers_version": "5.0"},
        **extra,
    }


@pytest.fixture()
def base_dir(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_config()))
    return d


@pytest.fixture()
def manifest(base_dir):
    return m.make_manifest(
        base_dir, min_pixels=3136, max_pixels=50176, vocabulary_version="1",
        vocabulary_fingerprint="f" * 64, dataset_sha256="d" * 64, metrics={"accuracy": 0.9},
    )


def test_make_write_read_round_trip(tmp_path, base_dir, manifest):
    assert manifest["format"] == 1
    assert manifest["family"] == "qwen2_5_vl"
    assert manifest["coordinate_convention"] == "absolute_resized"
    assert manifest["template"] == m.TEMPLATE_ID == "vla_node.prompt/v1"
    assert manifest["base_model"] == {
        "name_or_path": str(base_dir), "config_sha256": m.config_sha256(base_dir), "model_type": "qwen2_5_vl"}
    assert manifest["image"] == {"min_pixels": 3136, "max_pixels": 50176}
    assert manifest["vocabulary"] == {"version": "1", "fingerprint": "f" * 64}
    out = m.write_manifest(tmp_path / "adapter", manifest)
    assert out.name == m.MANIFEST_NAME == "vla_manifest.json"
    assert m.has_manifest(tmp_path / "adapter")
    assert m.read_manifest(tmp_path / "adapter") == manifest
    assert m.read_manifest(out) == manifest
    m.check_adapter_against_base(tmp_path / "adapter", base_dir, {})


def test_qwen3_convention(tmp_path):
    d = tmp_path / "q3"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_config("qwen3_vl")))
    man = m.make_manifest(d, min_pixels=1, max_pixels=2, vocabulary_version="1", vocabulary_fingerprint="x")
    assert man["family"] == "qwen3_vl" and man["coordinate_convention"] == "normalized_1000"


def test_a_model_answers_in_the_convention_its_data_was_written_in(tmp_path):
    """A Qwen3-VL model trained on pixel boxes (the embedded model): its manifest says so, coordinate_convention_of
    reads it (a checkpoint without one: the family's), and an adapter must answer as its base does."""
    d = tmp_path / "q3"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_config("qwen3_vl")))
    assert m.coordinate_convention_of(d) == "normalized_1000", "no manifest: the family's native convention"
    common = dict(min_pixels=1, max_pixels=2, vocabulary_version="1", vocabulary_fingerprint="x")
    m.write_manifest(d, m.make_manifest(d, coordinate_convention="absolute_resized", **common))
    assert m.coordinate_convention_of(d) == "absolute_resized"
    pixel_adapter = m.make_manifest(d, coordinate_convention="absolute_resized", **common)
    m.check_adapter_against_base(pixel_adapter, d)
    with pytest.raises(m.ManifestError, match="coordinate_convention"):
        m.check_adapter_against_base(m.make_manifest(d, **common), d)


def test_config_sha256_ignores_volatile_keys_only(tmp_path, base_dir):
    h = m.config_sha256(base_dir)
    assert len(h) == 64 and h == m.config_sha256(base_dir / "config.json")
    other = tmp_path / "other"
    other.mkdir()
    cfg = _config()
    cfg["transformers_version"] = "9.9"
    cfg["text_config"]["dtype"] = "bfloat16"
    cfg["text_config"]["_name_or_path"] = "elsewhere"
    cfg["vision_config"]["transformers_version"] = "1.0"
    cfg["architectures"] = ["Y"]  # outside text/vision config: not hashed
    (other / "config.json").write_text(json.dumps(cfg, indent=4, sort_keys=True))
    assert m.config_sha256(other) == h
    (other / "config.json").write_text(json.dumps(_config(hidden=128)))
    assert m.config_sha256(other) != h
    # flat (pre-v5 hub) configs hash their top level as the text config
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "hidden_size": 8, "vision_config": {}}))
    assert len(m.config_sha256(other)) == 64


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("family"), "family"),
        (lambda d: d["image"].pop("max_pixels"), "image.max_pixels"),
        (lambda d: d["base_model"].update(config_sha256="abc"), "base_model.config_sha256"),
        (lambda d: d.update(format=2), "format"),
        (lambda d: d.update(family="llava"), "family"),
        (lambda d: d["image"].update(min_pixels=10**9), "image"),
        (lambda d: d["image"].update(min_pixels="3136"), "image.min_pixels"),
        (lambda d: d.update(coordinate_convention="xyz"), "coordinate_convention"),
        (lambda d: d["vocabulary"].pop("fingerprint"), "vocabulary.fingerprint"),
        (lambda d: d.update(created="yesterday"), "created"),
        (lambda d: d.update(metrics=[]), "metrics"),
    ],
)
def test_validate_names_the_field(manifest, mutate, field):
    bad = copy.deepcopy(manifest)
    mutate(bad)
    with pytest.raises(m.ManifestError, match=f"'{field}'"):
        m.validate_manifest(bad, source="x/vla_manifest.json")


def test_read_errors_name_the_path(tmp_path):
    with pytest.raises(m.ManifestError, match="manifest not found") as e:
        m.read_manifest(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / m.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(m.ManifestError, match="cannot read manifest") as e:
        m.read_manifest(tmp_path)
    assert str(tmp_path / m.MANIFEST_NAME) in str(e.value)


@pytest.mark.parametrize(
    "expected, mutate, field",
    [
        ({}, lambda d: d["base_model"].update(config_sha256="0" * 64), "base_model.config_sha256"),
        ({}, lambda d: d["base_model"].update(model_type="qwen3_vl"), "base_model.model_type"),
        ({}, lambda d: d.update(family="qwen3_vl"), "family"),
        ({}, lambda d: d.update(coordinate_convention="normalized_1000"), "coordinate_convention"),
        ({"template": "vla_node.prompt/v2"}, None, "template"),
        ({"min_pixels": 784}, None, "image.min_pixels"),
        ({"max_pixels": 1}, None, "image.max_pixels"),
        ({"coordinate_convention": "normalized_1000"}, None, "coordinate_convention"),
        ({"vocabulary_fingerprint": "e" * 64}, None, "vocabulary.fingerprint"),
        ({"family": "qwen2_vl"}, None, "family"),
    ],
)
def test_mismatch_is_refused_with_field_and_path(tmp_path, base_dir, manifest, expected, mutate, field):
    data = copy.deepcopy(manifest)
    if mutate:
        mutate(data)
    path = m.write_manifest(tmp_path / "ad", data)
    with pytest.raises(m.ManifestError, match=f"field '{field}'") as e:
        m.check_adapter_against_base(tmp_path / "ad", base_dir, expected)
    assert str(path) in str(e.value)
    # dict form names the given source
    with pytest.raises(m.ManifestError, match="my-adapter"):
        m.check_adapter_against_base(data, base_dir, expected, source="my-adapter")


def test_matching_expectations_pass(base_dir, manifest):
    m.check_adapter_against_base(
        manifest, base_dir,
        {"family": "qwen2_5_vl", "template": m.TEMPLATE_ID, "min_pixels": 3136, "max_pixels": 50176,
         "coordinate_convention": "absolute_resized", "vocabulary_fingerprint": "f" * 64,
         "vocabulary_version": "1"},
    )
    m.check_adapter_against_base(manifest, base_dir, {"vocabulary_fingerprint": None})  # None = unchecked
    with pytest.raises(ValueError, match="unknown expected key"):
        m.check_adapter_against_base(manifest, base_dir, {"colour": "red"})


def test_missing_base_config(tmp_path, manifest):
    with pytest.raises(m.ManifestError, match="config.json not found"):
        m.check_adapter_against_base(manifest, tmp_path / "nope", {})
    with pytest.raises(m.ManifestError, match="unsupported model_type"):
        m.family_of("llama")
