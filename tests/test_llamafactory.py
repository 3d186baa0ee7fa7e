"""Coming from LLaMA-Factory: its SFT YAML keys, free-form (non-action) datasets registered its way,
mixed datasets, the adapter manifest's answers and the node's refusal of a free-form adapter, video
and audio refused, LLaMA-Factory-style prediction files from vla-eval, DeepSpeed through the Trainer.
Every fixture here is written by this project (none of LLaMA-Factory's files). CPU, tiny models."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.fixtures_train import IMAGE_SIZE, train_overrides
from training.config import ConfigError, load_config

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]

# Every key of LLaMA-Factory's Qwen2-VL / Qwen2.5-VL / Qwen3-VL SFT examples (LoRA, full, freeze), with
# values of our own choosing.
EVERY_SFT_KEY = """\
### model
model_name_or_path: /models/qwen-vl
image_max_pixels: 262144
image_min_pixels: 3136
video_max_pixels: 16384
video_min_pixels: 256
video_fps: 2.0
video_maxlen: 64
trust_remote_code: true
flash_attn: auto

### method
stage: sft
do_train: true
finetuning_type: freeze
lora_rank: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target: all
additional_target: embed_tokens
freeze_vision_tower: true
freeze_multi_modal_projector: false
freeze_language_model: false
freeze_trainable_layers: 2
freeze_trainable_modules: all
deepspeed: ds_z3.json

### dataset
dataset: robot_vqa,robot_actions
dataset_dir: data
template: qwen2_vl
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4
mix_strategy: interleave_under
interleave_probs: 0.3,0.7

### output
output_dir: saves/qwen-vl/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: true
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


# ------------------------------------------------------------------------------------------------
# the YAML
# ------------------------------------------------------------------------------------------------


def test_a_yaml_with_every_llamafactory_sft_key_loads(tmp_path, caplog):
    y = tmp_path / "sft.yaml"
    y.write_text(EVERY_SFT_KEY)
    with caplog.at_level(logging.INFO, logger="vla_train"):
        cfg = load_config(y)
    assert (cfg.model_path, cfg.stage, cfg.template, cfg.finetuning_type) == ("/models/qwen-vl", "sft", "qwen2_vl",
                                                                                "freeze")
    assert (cfg.image_min_pixels, cfg.image_max_pixels, cfg.cutoff_len, cfg.max_samples) == (3136, 262144, 2048, 1000)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.additional_target) == (16, 32, 0.05, "embed_tokens")
    assert (cfg.freeze_vision_tower, cfg.freeze_multi_modal_projector, cfg.freeze_language_model) == (True, False, False)
    assert (cfg.freeze_trainable_layers, cfg.freeze_trainable_modules) == (2, "all")
    assert cfg.datasets == ["robot_vqa", "robot_actions"] and cfg.mixing_probabilities == [0.3, 0.7]
    assert (cfg.mix_strategy, cfg.val_size, cfg.eval_strategy, cfg.eval_steps) == ("interleave_under", 0.1, "steps", 500)
    assert (cfg.per_device_eval_batch_size, cfg.save_only_model, cfg.overwrite_output_dir) == (1, True, True)
    assert (cfg.preprocessing_num_workers, cfg.dataloader_num_workers, cfg.ddp_timeout) == (16, 4, 180000000)
    assert (cfg.deepspeed, cfg.report_to, cfg.bf16, cfg.resume_from_checkpoint) == ("ds_z3.json", "none", "true", None)
    assert cfg.attn_implementation == "sdpa"  # flash_attn: auto
    # keys without meaning here: one line each, naming the key
    notes = [r.getMessage() for r in caplog.records if "has no effect here" in r.getMessage()]
    for key in ("trust_remote_code", "overwrite_cache", "video_max_pixels", "video_min_pixels", "video_fps",
                "video_maxlen"):
        assert sum(f": {key} has no effect here" in n for n in notes) == 1, (key, notes)
    # LLaMA-Factory's LoRA alpha default is twice the rank
    assert load_config(None, ["lora_rank=4"]).lora_alpha == 8


def test_three_unknown_keys_are_reported_in_one_run(tmp_path):
    y = tmp_path / "typos.yaml"
    y.write_text("model_name_or_path: /m\nlerning_rate: 1.0e-4\ncutof_len: 1024\nnum_train_epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(y, ["lora_rnk=4"])
    text = str(e.value)
    assert "4 bad config keys" in text
    for typo, suggestion in (("lerning_rate", "learning_rate"), ("cutof_len", "cutoff_len"),
                             ("num_train_epoch", "num_train_epochs"), ("lora_rnk", "lora_rank")):
        assert f"unknown config key {typo!r} (did you mean {suggestion!r}?)" in text
    assert f"{y}: unknown config key 'lerning_rate'" in text and "command line: unknown config key 'lora_rnk'" in text


@pytest.mark.parametrize("yaml_text, expected", [
    ("stage: dpo\npref_beta: 0.1\n", ["stage 'dpo' is not supported: DPO", "'pref_beta' (a LLaMA-Factory key)"]),
    ("stage: kto\n", ["stage 'kto' is not supported"]),
    ("stage: pt\n", ["stage 'pt' is not supported"]),
    ("do_predict: true\npredict_with_generate: true\n", ["prediction is a separate command: score a model or "
                                                          "adapter with vla-eval"]),
    ("quantization_bit: 4\n", ["QLoRA is not supported"]),
    ("do_train: false\n", ["do_train: false leaves nothing to do"]),
    ("template: llama3\n", ["template 'llama3' is not a Qwen-VL template"]),
])
def test_other_stages_and_unsupported_keys_are_refused_clearly(tmp_path, yaml_text, expected):
    y = tmp_path / "c.yaml"
    y.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(y)
    for text in expected:
        assert text in str(e.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_bf16_true_without_a_bf16_gpu_warns_once_and_trains_in_fp32(caplog):
    from training.train import use_bf16, use_fp16

    with caplog.at_level(logging.WARNING, logger="vla_train"):
        assert use_bf16(load_config(None, ["bf16=true"])) is False
        assert use_fp16(load_config(None, ["fp16=true", "bf16=false"])) is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["bf16: true, but there is no CUDA GPU with bf16 here: training in fp32",
                        "fp16: true, but there is no CUDA GPU here: training in fp32"]


def test_template_is_checked_against_the_model_family(tmp_path):
    from training.train import check_template

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    check_template(load_config(None, [f"model_path={model}", "template=qwen2_vl"]))
    with pytest.raises(ConfigError, match="template 'qwen3_vl' is not the chat template of .* use qwen2_vl"):
        check_template(load_config(None, [f"model_path={model}", "template=qwen3_vl"]))


def test_mixing_strategies_and_the_held_out_split():
    from training.mixing import hold_out, mix

    a, b = ["a1", "a2"], ["b1", "b2", "b3"]
    assert mix([a, b], "concat") == a + b
    assert mix([a, b], "interleave_under") == ["a1", "b1", "a2", "b2"]
    assert mix([a, b], "interleave_over") == ["a1", "b1", "a2", "b2", "a1", "b3"]
    drawn = mix([a, b], "interleave_over", [0.5, 0.5], seed=3)
    assert set(drawn) == set(a + b) and drawn == mix([a, b], "interleave_over", [0.5, 0.5], seed=3)
    assert set(mix([a, b], "interleave_under", [0.0, 1.0])) == {"b1", "b2", "b3"}
    train, held = hold_out(list(range(20)), 0.25, seed=1)
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    assert hold_out(list(range(20)), 3, seed=1)[1] == hold_out(list(range(20)), 3, seed=1)[1] and \
        len(hold_out(list(range(20)), 3)[1]) == 3


# ------------------------------------------------------------------------------------------------
# datasets: free-form, typos, video/audio, unused columns
# ------------------------------------------------------------------------------------------------


def _image(path: Path, colour=(40, 40, 215)) -> None:
    img = np.full((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), 120, np.uint8)
    cv2.rectangle(img, (20, 20), (60, 60), colour, -1)
    cv2.imwrite(str(path), img)


# A registration written the way LLaMA-Factory registers its mllm_demo (no key of ours).
LF_MULTIMODAL_ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                "assistant_tag": "assistant"}}


@pytest.fixture(scope="module")
def lf_data(tmp_path_factory) -> Path:
    """A dataset directory in LLaMA-Factory's layout: a multi-turn visual QA set (registered like its
    mllm_demo), video/audio/KTO/tool sets, an action set with one typo."""
    root = tmp_path_factory.mktemp("lf_data")
    (root / "media").mkdir()
    _image(root / "media" / "red.png")
    _image(root / "media" / "blue.png", (205, 95, 25))
    qa = [
        {"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                      {"role": "assistant", "content": "The square is red."},
                      {"role": "user", "content": "And the background?"},
                      {"role": "assistant", "content": "It is grey."}],
         "images": ["media/red.png"]},
        {"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                      {"role": "assistant", "content": "The square is blue."}], "images": ["media/blue.png"]},
        {"messages": [{"role": "user", "content": "<image>这个方块是什么颜色？"},
                      {"role": "assistant", "content": "方块是蓝色的。"}], "images": ["media/blue.png"]},
    ]
    (root / "qa.json").write_text(json.dumps(qa, ensure_ascii=False, indent=1))
    video = [{"messages": [{"role": "user", "content": "<video>What happens?"},
                           {"role": "assistant", "content": "A cube falls."}], "videos": ["media/clip.mp4"]}]
    (root / "video.json").write_text(json.dumps(video))
    audio = [{"messages": [{"role": "user", "content": "<audio>What is said?"},
                           {"role": "assistant", "content": "Stop."}], "audios": ["media/say.wav"]}]
    (root / "audio.json").write_text(json.dumps(audio))
    kto = [{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
            "label": True}]
    (root / "kto.json").write_text(json.dumps(kto))
    actions = [{"messages": [{"role": "user", "content": "<image>pick it"},
                             {"role": "assistant", "content": a}], "images": ["media/red.png"]}
               for a in ['PICK_OBJECT(object="red cube")', 'PICK_OBJECT(object="blue cube")', "STOP()",
                         'PICK_OBJECT(object="red cube")', 'PICK_OBJCT(object="red cube")']]
    (root / "actions.json").write_text(json.dumps(actions, indent=1))
    alpaca = [{"instruction": "Name the colour.", "input": "red square", "output": "Red.", "system": "Be brief.",
               "history": [["Hello", "Hi."]]},
              {"instruction": "<image>What colour is the square?", "input": "", "output": "Blue.",
               "images": ["media/blue.png"]}]
    (root / "alpaca.json").write_text(json.dumps(alpaca, indent=1))
    info = {
        "alpaca_demo": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input",
                                                                "response": "output", "system": "system",
                                                                "history": "history", "images": "images"}},
        "vqa_demo": {"file_name": "qa.json", **LF_MULTIMODAL_ENTRY},
        "vqa_declared_actions": {"file_name": "qa.json", "vla_answers": "actions", **LF_MULTIMODAL_ENTRY},
        "video_demo": {"file_name": "video.json", "formatting": "sharegpt",
                       "columns": {"messages": "messages", "videos": "videos"},
                       "tags": LF_MULTIMODAL_ENTRY["tags"]},
        "audio_demo": {"file_name": "audio.json", "formatting": "sharegpt",
                       "columns": {"messages": "messages", "audios": "audios"},
                       "tags": LF_MULTIMODAL_ENTRY["tags"]},
        "kto_demo": {"file_name": "kto.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "kto_tag": "label"}, "tags": LF_MULTIMODAL_ENTRY["tags"]},
        "actions_with_typo": {"file_name": "actions.json", **LF_MULTIMODAL_ENTRY},
        "actions_declared_text": {"file_name": "actions.json", "vla_answers": "text", **LF_MULTIMODAL_ENTRY},
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return root


@pytest.fixture(scope="module")
def vocab():
    from vla_node.vocabulary import Vocabulary

    return Vocabulary.load()


def test_a_free_form_dataset_registered_like_llamafactory_is_free_form(lf_data, vocab):
    from training.sharegpt import load_validated

    got = load_validated(lf_data, "vqa_demo", vocab=vocab)
    assert len(got) == 3 and got.verdict.kind == "text" and not got.verdict.declared
    assert got.verdict.describe() == "free-form text (0 of 4 answers parse as actions)"
    assert {s.answer_kind for s in got} == {"text"}
    # declared otherwise, its answers are checked as actions (and rejected)
    from training.sharegpt import DatasetInvalid

    with pytest.raises(DatasetInvalid, match="answer rejected by the action parser"):
        load_validated(lf_data, "vqa_declared_actions", vocab=vocab)


def test_alpaca_datasets_are_converted_as_llamafactory_converts_them(lf_data, vocab, tmp_path):
    from training.sharegpt import load_validated

    got = load_validated(lf_data, "alpaca_demo", vocab=vocab)
    assert got.verdict.kind == "text"
    assert got[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                               {"role": "assistant", "content": "Hi."},
                               {"role": "user", "content": "Name the colour.\nred square"},
                               {"role": "assistant", "content": "Red."}]
    assert got[1].messages[-2:] == [{"role": "user", "content": "<image>What colour is the square?"},
                                    {"role": "assistant", "content": "Blue."}]
    assert got[1].images == [lf_data / "media" / "blue.png"]
    # an unregistered file is recognised by its columns; a missing answer points at the sample
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"instruction": "Say hi", "output": "Hi."}) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    from training.sharegpt import DatasetInvalid

    with pytest.raises(DatasetInvalid, match=r"chat.jsonl:2:1: column 'output' \(the answer\) must be a string"):
        load_validated(f, vocab=vocab)


def test_a_mostly_action_dataset_reports_the_rest_as_likely_typos(lf_data, vocab):
    from training.sharegpt import DatasetInvalid, load_validated

    with pytest.raises(DatasetInvalid) as e:
        load_validated(lf_data, "actions_with_typo", vocab=vocab)
    assert len(e.value.errors) == 1
    err = e.value.errors[0]
    assert err.file.endswith("actions.json") and err.line > 1
    assert "answer rejected by the action parser" in err.message
    assert "likely a typo: 4 of 5 answers of this dataset parse as actions" in err.message
    assert '"vla_answers": "text"' in err.message
    assert load_validated(lf_data, "actions_declared_text", vocab=vocab).verdict.kind == "text"


@pytest.mark.parametrize("name, column", [("video_demo", "videos"), ("audio_demo", "audios")])
def test_video_and_audio_datasets_are_refused_naming_dataset_and_column(lf_data, vocab, name, column, capsys):
    from training.data_cli import main as data_main
    from training.sharegpt import DatasetInvalid, load_validated
    from training.train import main as train_main

    with pytest.raises(DatasetInvalid) as e:
        load_validated(lf_data, name, vocab=vocab)
    assert f"dataset {name!r}: column {column!r}" in str(e.value) and "not supported" in str(e.value)
    assert data_main(["check", str(lf_data), "--dataset", name]) == 1
    assert f"dataset {name!r}: column {column!r}" in capsys.readouterr().out
    rc = train_main([str(_yaml(lf_data.parent / f"{name}.yaml", lf_data, name)), "--check-data", "-q"])
    assert rc == 1 and f"dataset {name!r}: column {column!r}" in capsys.readouterr().err


def _yaml(path: Path, data_dir: Path, dataset: str) -> Path:
    path.write_text(f"model_name_or_path: /nowhere\ndataset_dir: {data_dir}\ndataset: {dataset}\n"
                    f"output_dir: {path.parent / 'never'}\n")
    return path


def test_an_unregistered_file_with_video_and_video_tags_are_refused(tmp_path, vocab):
    from training.sharegpt import DatasetInvalid, load_validated

    f = tmp_path / "clips.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "<video>What happens?"},
                                          {"role": "assistant", "content": "It falls."}],
                             "videos": ["clip.mp4"]}) + "\n")
    with pytest.raises(DatasetInvalid, match=r"clips.jsonl:1:\d+: column 'videos': video is not supported"):
        load_validated(f, vocab=vocab)
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "<video>What happens?"},
                                          {"role": "assistant", "content": "It falls."}]}) + "\n")
    with pytest.raises(DatasetInvalid, match=r"clips.jsonl:1:\d+: <video> tag: video is not supported"):
        load_validated(f, vocab=vocab)


def test_unused_columns_are_warned_about_by_name(lf_data, vocab, caplog):
    from training.sharegpt import load_validated

    with caplog.at_level(logging.WARNING, logger="training.sharegpt"):
        assert len(load_validated(lf_data, "kto_demo", vocab=vocab)) == 1
    warned = [r.getMessage() for r in caplog.records if "kto_demo" in r.getMessage()]
    assert len(warned) == 1 and "column 'kto_tag' ('label') is not used" in warned[0]


# ------------------------------------------------------------------------------------------------
# training: mixed datasets, the manifest's answers, the node's refusal
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory, synth_dir) -> Path:
    """training.synth_vqa's free-form scenes next to synth_dir's action data (one dataset_info.json)."""
    import shutil

    from training.synth_vqa import VQAConfig, generate_vqa_dataset

    root = tmp_path_factory.mktemp("mixed") / "data"
    shutil.copytree(synth_dir, root)
    counts = generate_vqa_dataset(root / "vqa", VQAConfig(num=20, size=IMAGE_SIZE, val_frac=0.2))
    assert counts == {"train": 16, "val": 4}
    info = json.loads((root / "dataset_info.json").read_text())
    chat = [{"instruction": f"Say {w}.", "input": "", "output": f"{w.capitalize()}."} for w in ("hi", "yes", "no", "ok")]
    (root / "chat.json").write_text(json.dumps(chat))  # text only, alpaca, read by its path
    for name, entry in json.loads((root / "vqa" / "dataset_info.json").read_text()).items():
        info[name] = dict(entry, file_name=f"vqa/{entry['file_name']}")
        data = root / "vqa" / entry["file_name"]  # image paths relative to the shared dataset_dir
        data.write_text(data.read_text().replace('"images/', '"vqa/images/'))
    (root / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return root


@pytest.fixture(scope="module")
def free_form_run(train_model_dir, vqa_dir, tmp_path_factory):
    from training.train import train

    out = tmp_path_factory.mktemp("vqa_lora") / "adapter"
    return train(load_config(None, train_overrides(train_model_dir, vqa_dir, out, dataset="tabletop_vqa_train",
                                                   max_steps=48, learning_rate=3e-3, save_steps=100)))


def test_a_mixed_free_form_and_action_dataset_trains(train_model_dir, vqa_dir, tmp_path):
    from vla_node.manifest import answers_of, read_manifest
    from training.train import train

    out = tmp_path / "mixed"
    cfg = load_config(None, train_overrides(train_model_dir, vqa_dir, out,
                                            dataset="tabletop_train,tabletop_vqa_train,chat.json",
                                            max_steps=4, save_steps=100, val_size=4, max_samples=12,
                                            mix_strategy="interleave_under", eval_strategy="steps", eval_steps=4))
    result = train(cfg)
    assert result.global_step == 4
    assert result.metrics["train_samples"] == 8  # 3 x 4 interleaved until chat.json ran out, 4 held out for eval
    assert "eval_loss" in result.metrics
    assert answers_of(read_manifest(out)) == ["actions", "text"]


def test_free_form_samples_keep_their_own_system_prompt(train_model_dir, vqa_dir, vocab):
    from transformers import AutoProcessor

    from training.collate import VLACollator, pixel_limits_of
    from training.sharegpt import Sample
    from vla_node.prompt import PromptBuilder

    proc = AutoProcessor.from_pretrained(str(train_model_dir))
    col = VLACollator(proc, PromptBuilder(vocab), pixel_limits_of(proc))
    messages = [{"role": "system", "content": "You describe tables."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    text_sample = Sample(messages, [], answer_kind="text")
    action_sample = Sample(messages, [], answer_kind="actions")
    assert col.split_chat(text_sample)[0][0]["content"][0]["text"] == "You describe tables."
    assert col.split_chat(action_sample)[0][0]["content"][0]["text"] == col.prompt.system_text


def test_the_node_refuses_an_adapter_trained_only_on_free_form_answers(free_form_run, train_model_dir):
    from vla_node.backends.base import BackendError
    from vla_node.factory import RuntimeSettings, build_backend
    from vla_node.manifest import answers_of, read_manifest
    from vla_node.vocabulary import Vocabulary

    assert answers_of(read_manifest(free_form_run.output_dir)) == ["text"]
    settings = RuntimeSettings(model_path=str(train_model_dir), adapters=[f"vqa={free_form_run.output_dir}"],
                               active_adapter="vqa", constrained_decoding=False)
    with pytest.raises(BackendError) as e:
        build_backend(settings, Vocabulary.load())
    assert "field 'answers' = ['text']" in str(e.value)
    assert "trained only on free-form text answers and cannot answer with robot actions" in str(e.value)


def test_lora_on_the_vision_tower_and_freeze_tuning_follow_the_freeze_keys(train_model_dir):
    from training.train import build_model

    def trainable(overrides):
        model = build_model(load_config(None, [f"model_path={train_model_dir}"] + overrides), bf16=False)
        return [n for n, p in model.named_parameters() if p.requires_grad]

    lora_vision = trainable(["freeze_vision_tower=false"])
    assert any(".visual.blocks." in n and "lora_A" in n for n in lora_vision)
    assert not any(".merger." in n for n in lora_vision)
    assert any(".language_model." in n and "lora_A" in n for n in lora_vision)
    only_projector = trainable(["freeze_language_model=true", "freeze_multi_modal_projector=false",
                                "finetuning_type=full"])
    assert only_projector and all(".merger." in n for n in only_projector)
    last_mlps = trainable(["finetuning_type=freeze", "freeze_trainable_layers=1", "freeze_trainable_modules=mlp",
                           "freeze_extra_modules=norm"])
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in last_mlps if ".layers." in n}
    assert len(layers) == 1 and all(".mlp." in n for n in last_mlps if ".layers." in n)
    assert any(n.endswith("language_model.norm.weight") for n in last_mlps)
    with pytest.raises(ConfigError, match="freeze_trainable_modules \\['attn'\\]"):
        trainable(["finetuning_type=freeze", "freeze_trainable_modules=attn"])


def test_output_dir_follows_llamafactorys_resume_rule(free_form_run, tmp_path):
    import shutil

    from training.train import resume_point

    out = free_form_run.output_dir
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert resume_point(load_config(None, [f"output_dir={out}"])) == str(last)  # resumes its last checkpoint
    assert resume_point(load_config(None, [f"output_dir={out}", "overwrite_output_dir=true"])) is None
    finished = tmp_path / "finished"  # the adapter without its checkpoints
    shutil.copytree(out, finished, ignore=shutil.ignore_patterns("checkpoint-*"))
    with pytest.raises(ConfigError, match="holds a trained model already: set overwrite_output_dir=true"):
        resume_point(load_config(None, [f"output_dir={finished}"]))


# ------------------------------------------------------------------------------------------------
# vla-eval: LLaMA-Factory's prediction files, multi-turn, errors before the model loads
# ------------------------------------------------------------------------------------------------


def test_nlg_metrics_are_llamafactorys():
    from training.nlg_metrics import bleu4, rouge_l_f1, rouge_n, sample_scores

    assert bleu4("The square is red.", "The square is red.") == pytest.approx(1.0)
    assert bleu4("xyz", "abc") == 0.0 and bleu4("", "abc") == 0.0
    # 3 characters against 5: unigram 3/3, bigram 2/2, trigram 1/1, no 4-gram (1 / (2 x 1), smoothing 3),
    # brevity penalty exp(1 - 5/3)
    assert bleu4("abc", "abcde") == pytest.approx(np.exp(1 - 5 / 3) * 0.5 ** 0.25)
    # Chinese: one token per character for ROUGE
    assert rouge_n("方块是蓝色的", "方块是红色的", 1) == pytest.approx(5 / 6)
    assert rouge_n("方块是蓝色的", "方块是红色的", 2) == pytest.approx(3 / 5)
    assert rouge_l_f1("the red cube", "the cube") == pytest.approx(0.8)
    assert sample_scores("", "abc") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_vla_eval_writes_llamafactorys_prediction_files_and_a_table(free_form_run, train_model_dir, vqa_dir,
                                                                   tmp_path, capsys):
    from training.evaluate import main

    out = tmp_path / "eval"
    assert main(["--model", str(train_model_dir), "--adapter", str(free_form_run.output_dir), "--dataset-dir",
                 str(vqa_dir), "--dataset", "tabletop_vqa_val", "--compare-base", "--out", str(out),
                 "--max-new-tokens", "24"]) == 0
    table = capsys.readouterr().out
    assert "| metric | base | adapter | change |" in table
    for row in ("BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"):
        assert f"| {row} |" in table
    labels = [json.loads(line)["messages"][-1]["content"]
              for line in (vqa_dir / "vqa" / "vqa_val.json").read_text().splitlines()[1:-1]
              for line in [line.rstrip(",")]]
    for folder in (out, out / "base"):
        rows = [json.loads(line) for line in (folder / "generated_predictions.jsonl").read_text().splitlines()]
        assert [sorted(r) for r in rows] == [["label", "predict", "prompt"]] * 4
        assert [r["label"] for r in rows] == labels
        results = json.loads((folder / "predict_results.json").read_text())
        assert sorted(results) == sorted(["predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l",
                                          "predict_runtime", "predict_samples_per_second",
                                          "predict_steps_per_second"])
        assert all(0.0 <= results[f"predict_{k}"] <= 100.0 for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["answers"] == "text"
    # 48 LoRA steps on the answers (it learns their opening, "From left to right:" / "从左到右："): the
    # adapter is closer to them than the base
    for key in ("predict_bleu-4", "predict_rouge-l"):
        assert metrics["runs"]["adapter"][key] > metrics["runs"]["base"][key], key
    assert "| ROUGE-L |" in (out / "metrics.md").read_text()


def test_multi_turn_samples_are_scored_on_their_last_turn(free_form_run, train_model_dir, lf_data, tmp_path):
    from training.evaluate import evaluate

    out = tmp_path / "eval"
    result = evaluate(str(train_model_dir), str(lf_data), "vqa_demo", out=str(out), max_new_tokens=6)
    assert result["dataset"]["answers"] == "text" and result["runs"]["model"]["n"] == 3
    first = json.loads((out / "generated_predictions.jsonl").read_text().splitlines()[0])
    assert first["label"] == "It is grey."
    # the earlier turns are the context: the first answer is in the prompt, the last one is not
    assert "The square is red." in first["prompt"] and "It is grey." not in first["prompt"]
    assert first["prompt"].endswith("And the background?<|im_end|>\n<|im_start|>assistant\n")


def test_a_dataset_error_fails_before_the_model_loads_and_leaves_no_output_folder(lf_data, tmp_path, capsys):
    from training.evaluate import main

    # two images in one action sample: the robot answers one frame per command
    (lf_data / "two_frames.json").write_text(json.dumps([
        {"messages": [{"role": "user", "content": "<image><image>pick it"},
                      {"role": "assistant", "content": 'PICK_OBJECT(object="red cube")'}],
         "images": ["media/red.png", "media/blue.png"]}]))
    info = json.loads((lf_data / "dataset_info.json").read_text())
    info["two_frames"] = {"file_name": "two_frames.json", **LF_MULTIMODAL_ENTRY}
    (lf_data / "dataset_info.json").write_text(json.dumps(info))
    for dataset, message in (("two_frames", "exactly one image"), ("video_demo", "column 'videos'"),
                             ("vqa_demo,actions_declared_text,two_frames", "evaluate action and free-form")):
        out = tmp_path / "out" / dataset.replace(",", "_")
        # the model does not exist: reaching the model load would fail with another message
        rc = main(["--model", str(tmp_path / "no-model"), "--dataset-dir", str(lf_data), "--dataset", dataset,
                   "--out", str(out)])
        assert rc == 1
        assert message in capsys.readouterr().err
        assert not out.exists()
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no staging left


# ------------------------------------------------------------------------------------------------
# DeepSpeed through the Trainer
# ------------------------------------------------------------------------------------------------


def _zero_config(path: Path, stage: int) -> Path:
    """A ZeRO config in the shape LLaMA-Factory ships ("auto" values filled in by the Trainer)."""
    path.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": "auto" if stage == 3 else 5e8},
    }))
    return path


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_config_is_handed_to_the_trainers_deepspeed_integration(tmp_path, stage):
    from training.train import training_args_for

    ds = _zero_config(tmp_path / f"ds_z{stage}.json", stage)
    cfg = load_config(None, ["model_path=m", "dataset=d", f"output_dir={tmp_path / 'o'}", f"deepspeed={ds}",
                             "gradient_accumulation_steps=2", "report_to=none"])
    args = training_args_for(cfg, bf16=False, has_eval=False)
    assert args.deepspeed == str(ds)
    ds_config = args.hf_deepspeed_config
    assert ds_config.config["zero_optimization"]["stage"] == stage and ds_config.is_zero3() == (stage == 3)
    assert ds_config.config["gradient_accumulation_steps"] == 2  # "auto" filled from the config


def test_deepspeed_problems_are_clear_errors(tmp_path, monkeypatch):
    from training.distributed import deepspeed_config

    with pytest.raises(ConfigError, match="deepspeed: config file .*missing.json not found"):
        deepspeed_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ConfigError, match="bad.json is not a JSON file"):
        deepspeed_config(str(bad))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as on a machine without the package
    with pytest.raises(ConfigError, match=r"needs the deepspeed package.*pip install deepspeed==0\.19\.8"):
        deepspeed_config(str(_zero_config(tmp_path / "ds.json", 2)))


@pytest.mark.slow
def test_zero3_trains_the_same_adapter_as_a_plain_run(train_model_dir, synth_dir, tmp_path):
    """The real DeepSpeed engine (CPU accelerator, gloo) under torchrun, as one GPU would run it: ZeRO-3
    partitions parameters, gradients and the optimizer state, and gives the same LoRA weights as the
    Trainer without DeepSpeed. (The first run on a machine builds DeepSpeed's CPU shared-memory op.)"""
    import os
    import subprocess

    from safetensors.torch import load_file

    from training.train import train

    def overrides(out):
        return train_overrides(train_model_dir, synth_dir, out, max_steps=2, save_steps=2, logging_steps=1,
                               per_device_train_batch_size=2, gradient_accumulation_steps=2,
                               fast_path=False)  # the same (ordinary) path as under DeepSpeed

    plain = train(load_config(None, overrides(tmp_path / "plain"))).output_dir
    ds = _zero_config(tmp_path / "ds_z3.json", 3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    config = tmp_path / "zero3.yaml"
    config.write_text(f"deepspeed: {ds}\n")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          "-m", "training.train", "-q", str(config)] + overrides(tmp_path / "zero3"),
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    zero3 = tmp_path / "zero3"
    assert sorted(p.name for p in (zero3 / "checkpoint-2" / "global_step2").iterdir()) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    a, b = load_file(str(plain / "adapter_model.safetensors")), load_file(str(zero3 / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(b[k].numel() > 0 for k in b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert any(float(b[k].abs().sum()) > 0 for k in b if "lora_B" in k)  # trained, not the zero init


def test_cutoff_len_cuts_long_answers_and_refuses_long_prompts_before_the_model_loads(train_model_dir, vqa_dir,
                                                                                       tmp_path, capsys):
    from transformers import AutoProcessor

    from training.collate import IGNORE_INDEX, VLACollator, pixel_limits_of
    from training.sharegpt import load_validated
    from training.train import main
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    vocab = Vocabulary.load()
    sample = load_validated(vqa_dir, "tabletop_vqa_train", vocab=vocab)[0]
    proc = AutoProcessor.from_pretrained(str(train_model_dir))
    full = VLACollator(proc, PromptBuilder(vocab), pixel_limits_of(proc)).encode(sample)
    n_prompt = int((full["labels"] == IGNORE_INDEX).sum())
    cut = VLACollator(proc, PromptBuilder(vocab), pixel_limits_of(proc), cutoff_len=n_prompt + 4).encode(sample)
    assert cut["input_ids"].shape[0] == n_prompt + 4 < full["input_ids"].shape[0]
    kept = cut["labels"][cut["labels"] != IGNORE_INDEX]
    assert kept[:-1].tolist() == full["labels"][n_prompt:n_prompt + 3].tolist()  # the answer's start ...
    assert kept[-1] == full["labels"][-1]  # ... and its end of turn
    # a prompt that fills cutoff_len alone: refused with the samples named, before any model loads
    rc = main([str(_yaml(tmp_path / "c.yaml", vqa_dir, "tabletop_vqa_train")), f"cutoff_len={n_prompt - 8}",
               f"model_name_or_path={train_model_dir}", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and f"have a prompt (images included) as long as cutoff_len={n_prompt - 8}" in err
    assert "vqa_train.json:" in err and not (tmp_path / "never").exists()


def test_free_form_evaluation_takes_the_dtypes_and_devices_the_node_takes(train_model_dir):
    """vla-eval's free-form model picks its device and dtype as the node's backend does: fp16 by its
    short name, and a bad value is a BackendError (one line from vla-eval), not a KeyError."""
    import torch

    from training.freeform_eval import FreeFormModel
    from vla_node.backends.base import BackendError

    model = FreeFormModel(str(train_model_dir), device="cpu", dtype="fp16")
    assert model.device == "cpu" and next(model.model.parameters()).dtype == torch.float16
    with pytest.raises(BackendError, match="invalid dtype 'float8'"):
        FreeFormModel(str(train_model_dir), device="cpu", dtype="float8")
