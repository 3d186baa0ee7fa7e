"""The prompt template is a property of the model: vla-train records the one it trained with in the
manifest, an adapter inherits its base's, and the node prompts a model (and accepts adapters) as
that manifest says. CPU, the tiny Qwen2.5-VL checkpoint."""
from __future__ import annotations

import json

import pytest

from tests.fixtures_train import train_overrides

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]


def test_the_compact_template_is_the_task_sentence_alone():
    from vla_node.prompt import COMPACT_TEMPLATE_ID, TEMPLATE_ID, PromptBuilder, template_id
    from vla_node.vocabulary import Vocabulary

    vocab = Vocabulary.load()
    full, compact = PromptBuilder(vocab), PromptBuilder(vocab, template="compact")
    assert (full.template, compact.template) == (TEMPLATE_ID, COMPACT_TEMPLATE_ID)
    assert full.system_text.startswith(compact.system_text + "\n") and "\n" not in compact.system_text
    assert "MOVE_OBJECT" in full.system_text and "MOVE_OBJECT" not in compact.system_text
    assert compact.user_text("put it away") == full.user_text("put it away"), "only the system prompt differs"
    assert template_id(COMPACT_TEMPLATE_ID) == COMPACT_TEMPLATE_ID
    with pytest.raises(ValueError, match="'tiny' is not one of full, compact"):
        PromptBuilder(vocab, template="tiny")


def test_a_checkpoint_tells_its_template(tmp_path, tiny_model_dir):
    from vla_node.manifest import ManifestError, prompt_template_of
    from vla_node.prompt import TEMPLATE_ID

    assert prompt_template_of(tiny_model_dir) == TEMPLATE_ID, "no manifest: a Qwen-VL checkpoint, the full template"
    (tmp_path / "vla_manifest.json").write_text(json.dumps({"template": "vla_node.prompt/v9"}))
    with pytest.raises(ManifestError):
        prompt_template_of(tmp_path)


@pytest.fixture(scope="module")
def compact_model(train_model_dir, synth_dir, tmp_path_factory):
    """The tiny checkpoint fully fine-tuned (2 steps) with the compact template."""
    from training.config import load_config
    from training.train import train

    out = tmp_path_factory.mktemp("compact") / "model"
    train(load_config(None, train_overrides(train_model_dir, synth_dir, out, finetuning_type="full", max_steps=2,
                                            save_steps=100, prompt_template="compact")))
    return out


def test_full_finetuning_records_the_template_and_an_adapter_inherits_it(compact_model, synth_dir, tmp_path):
    from training.config import ConfigError, load_config
    from training.train import train
    from vla_node.manifest import prompt_template_of, read_manifest
    from vla_node.prompt import COMPACT_TEMPLATE_ID

    assert read_manifest(compact_model)["template"] == COMPACT_TEMPLATE_ID
    adapter = tmp_path / "adapter"
    train(load_config(None, train_overrides(compact_model, synth_dir, adapter, max_steps=2, save_steps=100)))
    assert prompt_template_of(adapter) == COMPACT_TEMPLATE_ID, "an adapter is trained as its base is prompted"
    with pytest.raises(ConfigError, match="differs from the one .* was trained with"):
        train(load_config(None, train_overrides(compact_model, synth_dir, tmp_path / "other", max_steps=2,
                                                prompt_template="full")))
    assert not (tmp_path / "other").exists(), "refused before anything is written"


def test_the_node_prompts_a_model_as_it_was_trained(compact_model, train_model_dir, synth_dir, tmp_path):
    from training.config import load_config
    from training.train import train
    from vla_node.backends.base import BackendError
    from vla_node.factory import RuntimeSettings, build_core

    core = build_core(RuntimeSettings(model_path=str(compact_model), device="cpu", max_new_tokens=8))
    try:
        assert core.prompt.system_text.count("\n") == 0 and "MOVE_OBJECT" not in core.prompt.system_text
        full_adapter = tmp_path / "full_adapter"  # trained on the full-template base
        train(load_config(None, train_overrides(train_model_dir, synth_dir, full_adapter, max_steps=1,
                                                save_steps=100)))
        with pytest.raises(BackendError, match="template.*vla_node.prompt/v1-compact|vla_node.prompt/v1-compact.*template"):
            core.backend.load_adapter(str(full_adapter))
    finally:
        core.backend.close()
    plain = build_core(RuntimeSettings(model_path=str(train_model_dir), device="cpu", max_new_tokens=8))
    try:
        assert "MOVE_OBJECT" in plain.prompt.system_text
    finally:
        plain.backend.close()


def test_the_embedded_model_is_prompted_as_it_was_trained():
    """model_path "" is the embedded model, whose manifest names the compact template: the node's default
    settings prompted it with the full one (the demo answered nonsense though the held-out metrics,
    which name the model's folder, were good)."""
    from vla_node.factory import EMBEDDED_MODEL, RuntimeSettings, build_core, embedded_path
    from vla_node.manifest import prompt_template_of

    try:
        trained_with = prompt_template_of(embedded_path(EMBEDDED_MODEL))
    except Exception as error:  # noqa: BLE001  (a checkout without models/)
        pytest.skip(f"no embedded model: {error}")
    core = build_core(RuntimeSettings(device="cpu", max_new_tokens=4))
    try:
        assert core.prompt.template == trained_with
    finally:
        core.backend.close()
