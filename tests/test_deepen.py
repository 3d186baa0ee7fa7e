"""Deepening the embedded Qwen3-VL's language model (training.deepen): two decoder layers appended,
copies of the last two with their residual writers (o_proj, down_proj) zeroed, so every weight the
trained model had is kept, the deeper model answers exactly as the source did (logits, greedy
tokens), and an adapter trained on the source still fits it. CPU, on the committed model."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from training.deepen import DeepeningError, deepen_language_model, main, with_layers
from training.weight_shards import load_tensors

SOURCE = Path(__file__).resolve().parents[1] / "models" / "tabletop-tiny"
ADD = 2
LAYER = "model.language_model.layers.{}."


@pytest.fixture(scope="module")
def source_layers() -> int:
    if not (SOURCE / "config.json").is_file():
        pytest.skip("the embedded model is not built: make models")
    return json.loads((SOURCE / "config.json").read_text())["text_config"]["num_hidden_layers"]


@pytest.fixture(scope="module")
def deepened(source_layers, tmp_path_factory) -> Path:
    return deepen_language_model(SOURCE, tmp_path_factory.mktemp("deep") / "tabletop-tiny-deeper", ADD)


def _inputs(processor, command: str = "put the red cube in the blue bowl", seed: int = 5) -> dict:
    """A served prompt: the compact system message, a rendered tabletop scene, a quoted command."""
    from training.widen_vision import scene_images
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    messages = PromptBuilder(Vocabulary.load(), template="compact").chat_messages(command)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[scene_images(1, seed)[0]], return_tensors="pt")


def _model(folder: Path):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # no layer left to random init
    return model.eval()


def test_the_config_grows_by_the_added_layers_and_the_rest_of_the_folder_is_the_sources(deepened, source_layers):
    source_config = json.loads((SOURCE / "config.json").read_text())
    deep_config = json.loads((deepened / "config.json").read_text())
    assert deep_config["text_config"]["num_hidden_layers"] == source_layers + ADD
    deep_config["text_config"]["num_hidden_layers"] = source_layers
    assert deep_config == source_config, "only the language model's depth changes"
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "processor_config.json"):
        assert (deepened / file).read_bytes() == (SOURCE / file).read_bytes(), file
    for record in ("train_results.json", "train_config.json", "all_results.json"):
        assert not (deepened / record).exists(), f"{record} is the source's training, not the deeper model's"
    note = json.loads((deepened / "vla_manifest.json").read_text())
    assert note["deepened"]["num_hidden_layers"] == {"from": source_layers, "to": source_layers + ADD}
    assert note["deepened"]["from"] == str(SOURCE)
    del note["deepened"]
    assert note == json.loads((SOURCE / "vla_manifest.json").read_text()), "the rest of the manifest is kept"
    assert not list(deepened.parent.glob("*.partial")), "written whole, then moved into place"
    # a config with per-layer attention kinds gets the copied layers' kinds
    hybrid = {"text_config": {"num_hidden_layers": 4, "layer_types": ["full", "sliding", "full", "sliding2"]}}
    assert with_layers(hybrid, 4, 2)["text_config"] == {
        "num_hidden_layers": 6, "layer_types": ["full", "sliding", "full", "sliding2", "full", "sliding2"]}


def test_every_source_tensor_is_kept_and_the_new_layers_copy_the_last_ones_with_silent_outputs(deepened,
                                                                                               source_layers):
    source, deep = load_tensors(SOURCE), load_tensors(deepened)
    for key, value in source.items():
        assert key in deep and deep[key].dtype == value.dtype and torch.equal(deep[key], value), key
    added = {key for key in deep if key not in source}
    for new in range(source_layers, source_layers + ADD):
        copied = new - ADD  # layers 4, 5 repeat layers 2, 3
        copied_keys = [k for k in source if k.startswith(LAYER.format(copied))]
        assert len(copied_keys) == 11  # q/k/v/o, q/k norms, gate/up/down, two layer norms
        for key in copied_keys:
            name = LAYER.format(new) + key[len(LAYER.format(copied)):]
            added.discard(name)
            if ".self_attn.o_proj." in key or ".mlp.down_proj." in key:
                assert deep[name].shape == source[key].shape and not deep[name].any(), name
                assert source[key].any(), "the source's own projection is not zero"
            else:
                assert torch.equal(deep[name], source[key]), name
    assert not added, f"tensors that copy no source layer: {sorted(added)}"
    # copies of different layers: the new layers do not start identical
    assert not torch.equal(deep[LAYER.format(source_layers) + "self_attn.q_proj.weight"],
                           deep[LAYER.format(source_layers + 1) + "self_attn.q_proj.weight"])
    index = json.loads((deepened / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(deep), "sharded like the committed checkpoint"


def test_the_deeper_model_gives_the_sources_logits_and_greedy_answer(deepened, source_layers):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(SOURCE))
    inputs = _inputs(processor)
    source, deep = _model(SOURCE), _model(deepened)
    assert len(deep.model.language_model.layers) == source_layers + ADD
    with torch.no_grad():
        want = source(**inputs).logits
        got = deep(**inputs).logits
        assert torch.equal(got, want), float((got - want).abs().max())
        answers = [model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
                   for model in (source, deep)]
        assert torch.equal(answers[0], answers[1])
        assert processor.decode(answers[0], skip_special_tokens=True).strip(), "the model answers something"
        # the new layers are on the forward path: an output projection that writes changes the logits
        torch.manual_seed(0)
        deep.model.language_model.layers[-1].self_attn.o_proj.weight.normal_(0.0, 0.05)
        assert not torch.allclose(deep(**inputs).logits, want, atol=1e-3)


def test_an_adapter_trained_on_the_source_answers_the_same_on_the_deeper_model(deepened, source_layers, tmp_path):
    """The adapter's LoRA pairs for layers 0..N-1 land on the same layers; peft gives the new layers
    fresh pairs whose B is zero (vla-train's LoRA init), so they add nothing."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoProcessor

    from tests.fixtures_models import lora_target_modules

    peft_model = get_peft_model(_model(SOURCE), LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(),
                                                           lora_dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # as if trained: a zero B would make any adapter fit any model
            parameter.data.normal_(0.0, 0.05, generator=generator)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    inputs = _inputs(AutoProcessor.from_pretrained(str(SOURCE)), "pick up the green ball", seed=9)
    with torch.no_grad():
        bare = _model(SOURCE)(**inputs).logits
        on_source = PeftModel.from_pretrained(_model(SOURCE), str(tmp_path / "adapter")).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            on_deep = PeftModel.from_pretrained(_model(deepened), str(tmp_path / "adapter")).eval()
        missing = re.findall(r"language_model\.layers\.(\d+)\.", " ".join(str(w.message) for w in caught
                                                                        if "missing adapter keys" in str(w.message)))
        assert missing and {int(layer) for layer in missing} == set(range(source_layers, source_layers + ADD)), \
            "every pair the adapter has lands on its layer; only the new layers' are fresh"
        want = on_source(**inputs).logits
        assert not torch.allclose(want, bare, atol=1e-3), "the adapter changes the source's answer"
        got = on_deep(**inputs).logits
    assert float((got - want).abs().max()) < 1e-5
    new_layer = on_deep.base_model.model.model.language_model.layers[source_layers]
    assert not new_layer.self_attn.q_proj.lora_B["default"].weight.any()


def test_a_layer_count_out_of_range_an_out_over_the_source_and_an_existing_out_are_refused(source_layers, tmp_path):
    out = tmp_path / "deeper"
    for bad in (0, -1, source_layers + 1):
        with pytest.raises(DeepeningError, match=rf"add_layers={bad}: between 1 and the model's {source_layers}"):
            deepen_language_model(SOURCE, out, bad)
    with pytest.raises(DeepeningError, match="is the source checkpoint"):
        deepen_language_model(SOURCE, SOURCE / ".." / SOURCE.name, 1)  # the same folder, spelled otherwise
    with pytest.raises(DeepeningError, match="no such file; --model must be a checkpoint folder"):
        deepen_language_model(tmp_path / "not-a-model", out, 1)
    assert not out.exists() and not list(tmp_path.glob("*.partial")), "refused before writing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DeepeningError, match="exists; remove it or pass overwrite"):
        deepen_language_model(SOURCE, out, 1)
    assert (out / "keep.txt").read_text() == "mine"
    assert deepen_language_model(SOURCE, out, 1, overwrite=True) == out
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == source_layers + 1


def test_the_cli_reports_a_bad_layer_count_as_a_usage_error(source_layers, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(SOURCE), "--out", str(tmp_path / "deeper"), "--add-layers", str(source_layers + 1)])
    assert stop.value.code == 2
    assert f"add_layers={source_layers + 1}: between 1 and the model's {source_layers} layers" in \
        capsys.readouterr().err
    assert not (tmp_path / "deeper").exists()
