"""The box convention is a property of the model, as the prompt template is: vla-train records the one
its data was written in (coordinate_convention), an adapter inherits its base's, and the node reads the
model's boxes as that manifest says. CPU, the tiny Qwen2.5-VL checkpoint."""
from __future__ import annotations

import pytest

from tests.fixtures_train import train_overrides

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]


def test_full_finetuning_records_the_data_convention_and_an_adapter_inherits_it(train_model_dir, synth_dir,
                                                                                 tmp_path):
    from training.config import ConfigError, load_config
    from training.train import train
    from vla_node.factory import RuntimeSettings, build_core
    from vla_node.manifest import coordinate_convention_of

    assert coordinate_convention_of(train_model_dir) == "absolute_resized", "Qwen2.5-VL's own"
    model = tmp_path / "model"
    train(load_config(None, train_overrides(train_model_dir, synth_dir, model, finetuning_type="full", max_steps=1,
                                            save_steps=100, coordinate_convention="normalized_1000")))
    assert coordinate_convention_of(model) == "normalized_1000"
    adapter = tmp_path / "adapter"
    train(load_config(None, train_overrides(model, synth_dir, adapter, max_steps=1, save_steps=100)))
    assert coordinate_convention_of(adapter) == "normalized_1000", "an adapter answers as its base does"
    with pytest.raises(ConfigError, match="differs from the one .* answers in"):
        train(load_config(None, train_overrides(model, synth_dir, tmp_path / "other", max_steps=1,
                                                coordinate_convention="absolute_resized")))
    assert not (tmp_path / "other").exists(), "refused before anything is written"
    core = build_core(RuntimeSettings(model_path=str(model), adapters=[f"pixels={adapter}"], device="cpu",
                                      max_new_tokens=4))
    try:  # the adapter was accepted (same convention as its base), and the node reads boxes as 0-1000
        assert core.backend.coordinate_convention == "normalized_1000" and "pixels" in core.backend.adapters
    finally:
        core.backend.close()


def test_an_unknown_convention_is_refused_before_training():
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="coordinate_convention must be one of absolute_resized, normalized_1000"):
        load_config(None, ["model_path=x", "dataset=y", "coordinate_convention=pixels"])
