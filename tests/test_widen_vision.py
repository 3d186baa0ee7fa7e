"""Widening the embedded Qwen3-VL to finer visual tokens (training.widen_vision): merge 2 -> 1 keeps
every weight but the mergers, which are distilled; the result loads, reads 300 tokens of a 320x240
frame instead of 70, and answers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.weight_shards import load_tensors
from training.widen_vision import MERGER_PREFIXES, WideningError, scene_images, widen_vision_tokens

SOURCE = Path(__file__).resolve().parents[1] / "models" / "tabletop-tiny"
FRAME = (320, 240)


@pytest.fixture(scope="module")
def widened(tmp_path_factory) -> Path:
    if not (SOURCE / "config.json").is_file():
        pytest.skip("the embedded model is not built: make models")
    # few scenes and steps (seconds on one core); the CLI's defaults fit on 256 scenes for 400 steps
    return widen_vision_tokens(SOURCE, tmp_path_factory.mktemp("wide") / "tabletop-tiny-merge1", merge_size=1,
                               steps=30, images=9, seed=0)


def test_the_configs_say_merge_1_and_the_processor_gives_one_token_per_patch(widened):
    from transformers import AutoProcessor

    assert json.loads((widened / "config.json").read_text())["vision_config"]["spatial_merge_size"] == 1
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (widened / file).read_bytes() == (SOURCE / file).read_bytes(), file
    image = scene_images(1, 7)[0]
    assert image.shape == (FRAME[1], FRAME[0], 3)
    tokens = {}
    for name, folder in (("source", SOURCE), ("widened", widened)):
        processor = AutoProcessor.from_pretrained(str(folder))
        inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
        image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        tokens[name] = (int((inputs["input_ids"] == image_token).sum()), inputs["image_grid_thw"][0].tolist())
    # merge 2 resizes to a multiple of 32 px (320x224: 10x7 tokens), merge 1 to one of 16 px (320x240: 20x15)
    assert tokens == {"source": (70, [1, 14, 20]), "widened": (300, [1, 15, 20])}


def test_every_tensor_but_the_mergers_is_the_sources_bit_for_bit(widened):
    source, wide = load_tensors(SOURCE), load_tensors(widened)
    assert wide.keys() == source.keys()
    kept = [k for k in source if not k.startswith(MERGER_PREFIXES)]
    assert any(k.startswith("model.language_model.") for k in kept) and any(".blocks." in k for k in kept)
    for key in kept:
        assert wide[key].dtype == source[key].dtype and torch.equal(wide[key], source[key]), key
    # the main merger's norm runs per patch before the merge: same shape, same job, kept
    for key in ("model.visual.merger.norm.weight", "model.visual.merger.norm.bias"):
        assert torch.equal(wide[key], source[key])
    assert wide["model.visual.merger.linear_fc1.weight"].shape == (256, 256)
    assert wide["model.visual.merger.linear_fc2.weight"].shape == (384, 256)
    assert wide["model.visual.deepstack_merger_list.0.norm.weight"].shape == (256,)
    index = json.loads((widened / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source), "sharded like the committed checkpoint"


def test_the_distilled_mergers_answer_like_the_old_ones_on_unseen_scenes(widened):
    """On scenes of another seed, each new merger's answer for a patch is far closer to the old merger's
    answer for that patch repeated 2x2 than an untrained merger's is; the fit improved on its start."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

    old = AutoModelForImageTextToText.from_pretrained(str(SOURCE), dtype=torch.float32).model.visual
    new = AutoModelForImageTextToText.from_pretrained(str(widened), dtype=torch.float32).model.visual
    deepstack_block = new.deepstack_visual_indexes[0]
    fed: dict[str, torch.Tensor] = {}
    new.blocks[deepstack_block].register_forward_hook(lambda _m, _i, out: fed.__setitem__("deepstack", out))
    inputs = AutoProcessor.from_pretrained(str(widened)).image_processor(images=scene_images(3, 99),
                                                                          return_tensors="pt")
    with torch.no_grad():
        output = new(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        cases = {"merger": (output.last_hidden_state, output.pooler_output, old.merger),
                 "deepstack": (fed["deepstack"], output.deepstack_features[0], old.deepstack_merger_list[0])}
        for name, (patches, answers, old_merger) in cases.items():
            target = old_merger(patches.repeat_interleave(4, dim=0))  # each patch as a uniform 2x2 group
            torch.manual_seed(0)
            untrained = Qwen3VLVisionPatchMerger(new.config, use_postshuffle_norm=old_merger.use_postshuffle_norm)
            distilled_error = float((answers - target).norm() / target.norm())
            untrained_error = float((untrained(patches) - target).norm() / target.norm())
            assert distilled_error < 0.5 * untrained_error and distilled_error < 0.3, (name, distilled_error,
                                                                                      untrained_error)
    note = json.loads((widened / "vla_manifest.json").read_text())["widened"]
    assert note["merge_size"] == {"from": 2, "to": 1}
    for name, errors in note["merger_relative_error"].items():
        assert errors["after_fit"] < 0.8 * errors["before_fit"] < 0.8 * errors["random_init"], (name, errors)


def test_the_widened_model_answers_a_command_about_an_image(widened):
    from vla_node.backends import GenerationRequest, TransformersBackend
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    backend = TransformersBackend(widened, device="cpu", max_new_tokens=12, engine=False)
    try:
        messages = PromptBuilder(Vocabulary.load(), template="compact").chat_messages("pick up the red cube")
        result = backend.generate(GenerationRequest(image=scene_images(1, 5)[0], messages=messages, max_new_tokens=12))
    finally:
        backend.close()
    assert result.model_input_size == FRAME and result.new_tokens >= 1 and result.text.strip()


def test_only_a_qwen3_vl_checkpoint_is_widened_and_only_to_finer_tokens(tmp_path):
    qwen25 = tmp_path / "qwen25"
    qwen25.mkdir()
    (qwen25 / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(WideningError, match=r"qwen25/config.json: model_type is 'qwen2_5_vl'"):
        widen_vision_tokens(qwen25, tmp_path / "out")
    merge1 = tmp_path / "merge1"
    merge1.mkdir()
    (merge1 / "config.json").write_text(json.dumps({"model_type": "qwen3_vl",
                                                    "vision_config": {"spatial_merge_size": 1}}))
    with pytest.raises(WideningError, match=r"merge1/config.json: spatial_merge_size is 1; merge size 1 is not"):
        widen_vision_tokens(merge1, tmp_path / "out", merge_size=1)
    assert not (tmp_path / "out").exists()
