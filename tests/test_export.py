"""vla-export: merged checkpoint == base + adapter (logits within 1e-4, fp32), loads without peft,
keeps the manifest with a merge note, refuses an adapter made for another base."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

# shared session fixtures (one tiny model, one synthetic dataset, one LoRA run for all training tests)
pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]


@pytest.fixture(scope="module")
def merged_dir(lora_run, train_model_dir, tmp_path_factory):
    from training.export import export_merged

    return export_merged(str(train_model_dir), str(lora_run.output_dir), str(tmp_path_factory.mktemp("export") / "m"))


def test_merged_checkpoint_files_and_manifest_note(merged_dir, lora_run):
    from vla_node.manifest import read_manifest

    for name in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                 "tokenizer.json", "chat_template.jinja", "vla_manifest.json"):
        assert (merged_dir / name).is_file(), name
    assert not (merged_dir / "adapter_config.json").exists()
    man = read_manifest(merged_dir)
    trained = read_manifest(lora_run.output_dir)
    assert man["merged"]["adapter_path"] == str(lora_run.output_dir)
    assert len(man["merged"]["adapter_weights_sha256"]) == 64
    assert {k: v for k, v in man.items() if k != "merged"} == trained


def test_merged_logits_match_base_plus_adapter(merged_dir, lora_run, train_model_dir, synth_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training.collate import VLACollator, pixel_limits_of
    from training.sharegpt import load_validated
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    proc = AutoProcessor.from_pretrained(str(train_model_dir))
    collator = VLACollator(proc, PromptBuilder(Vocabulary.load()), pixel_limits_of(proc))
    batch = collator(list(load_validated(synth_dir, "tabletop_val")[:2]))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base = AutoModelForImageTextToText.from_pretrained(str(train_model_dir), dtype=torch.float32).eval()
        base_logits = base(**inputs).logits
        lora_logits = PeftModel.from_pretrained(base, str(lora_run.output_dir)).eval()(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        merged_logits = merged(**inputs).logits
    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-4, rtol=0)


def test_backend_serves_merged_model_without_peft(merged_dir, lora_run, monkeypatch):
    from tests.fixtures_models import tiny_image
    from vla_node.backends.base import GenerationRequest
    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.manifest import read_manifest
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    monkeypatch.setitem(sys.modules, "peft", None)  # any `import peft` now fails
    backend = TransformersBackend(str(merged_dir), max_new_tokens=6)
    try:
        assert backend.peft_model is None and backend.adapter_id == ""
        image = read_manifest(lora_run.output_dir)["image"]
        assert (backend.pixel_limits.min_pixels, backend.pixel_limits.max_pixels) == (
            image["min_pixels"], image["max_pixels"])
        res = backend.generate(GenerationRequest(image=tiny_image(112, 84),
                                                 messages=PromptBuilder(Vocabulary.load()).chat_messages("stop"),
                                                 max_new_tokens=6))
        assert res.new_tokens >= 1
    finally:
        backend.close()


def test_export_refuses_an_adapter_for_another_base(lora_run, train_model_dir, tmp_path, capsys):
    from training.export import main

    other = tmp_path / "other-base"
    shutil.copytree(train_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-3  # a different architecture config -> different config_sha256
    (other / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "merged"
    assert main(["--model", str(other), "--adapter", str(lora_run.output_dir), "--out", str(out)]) == 1
    assert "config_sha256" in capsys.readouterr().err
    assert not out.exists()
    assert main(["--model", str(train_model_dir), "--adapter", str(train_model_dir), "--out", str(out)]) == 1
    assert "not a PEFT adapter" in capsys.readouterr().err
