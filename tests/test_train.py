"""vla-train: config, collator label masking, LoRA run (loss, adapter, manifest, reload, merge,
backend), resume, full fine-tuning, dataset validation before training. CPU, tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.fixtures_train import LORA_STEPS, SAVE_STEPS, train_overrides
from training.config import ConfigError, TrainConfig, load_config, parse_overrides

# shared session fixtures (one tiny model, one synthetic dataset, one LoRA run for all training tests)
pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


def test_config_yaml_overrides_and_aliases(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model_name_or_path: /m\ndataset: a, b\nlearning_rate: 1.0e-4\nmax_steps: 10\n"
                 "image_max_pixels: null\nresume_from_checkpoint: true\n")
    cfg = load_config(y, ["learning_rate=5e-4", "lora-rank=4", "eval_dataset=v", "bf16=false"])
    assert cfg.model_path == "/m"
    assert cfg.datasets == ["a", "b"] and cfg.eval_datasets == ["v"]
    assert cfg.learning_rate == pytest.approx(5e-4) and cfg.lora_rank == 4 and cfg.max_steps == 10
    assert cfg.image_max_pixels is None
    assert cfg.resume_path() == "latest"
    assert load_config(None, ["resume_from_checkpoint=/x/checkpoint-3"]).resume_path() == "/x/checkpoint-3"
    assert TrainConfig().resume_path() is None


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        parse_overrides(["learning_rat=1"])
    with pytest.raises(ConfigError, match="lora_rank: expected int"):
        load_config(None, ["lora_rank=abc"])
    with pytest.raises(ConfigError, match="finetuning_type"):
        load_config(None, ["finetuning_type=qlora"])
    y = tmp_path / "bad.yaml"
    y.write_text("datset: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'datset'"):
        load_config(y)


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "qwen2_5_vl_3b_lora.yaml"])
def test_example_configs_load(name):
    cfg = load_config(REPO / "training" / "configs" / name)
    assert cfg.lora_target == "all" and cfg.finetuning_type == "lora" and cfg.dataset == "tabletop_train"


def test_help_is_truthful(capsys):
    from training.train import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in ("resume_from_checkpoint", "lora_target", "skip_invalid", "image_max_pixels", "accelerate launch"):
        assert key in text


# ------------------------------------------------------------------------------------------------
# collator
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collator(train_model_dir):
    from transformers import AutoProcessor

    from training.collate import VLACollator, pixel_limits_of
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    proc = AutoProcessor.from_pretrained(str(train_model_dir))
    return VLACollator(proc, PromptBuilder(Vocabulary.load()), pixel_limits_of(proc))


@pytest.fixture(scope="module")
def train_samples(synth_dir):
    from training.sharegpt import load_validated

    return load_validated(synth_dir, "tabletop_train")


def test_labels_cover_only_the_answer_and_im_end(collator, train_samples):
    from training.collate import IGNORE_INDEX

    tok = collator.tokenizer
    for sample in train_samples[:6]:
        enc = collator.encode(sample)
        labels, ids = enc["labels"], enc["input_ids"]
        keep = labels != IGNORE_INDEX
        answer = sample.messages[-1]["content"]
        assert tok.decode(labels[keep]) == answer + "<|im_end|>"
        # the supervised tokens are one contiguous run at the very end, equal to the input ids there
        n = int(keep.sum())
        assert keep[-n:].all() and not keep[:-n].any()
        assert torch.equal(labels[keep], ids[keep])
        # the prompt part is exactly what generation sees (system + image + command + assistant header)
        prompt = tok.decode(ids[:-n])
        assert prompt.endswith("<|im_start|>assistant\n") and "<|image_pad|>" in prompt
        assert collator.prompt.system_text in prompt


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_labels_mask_for_other_families(family, tiny_checkpoints, train_samples):
    from transformers import AutoProcessor

    from training.collate import IGNORE_INDEX, VLACollator, pixel_limits_of
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    proc = AutoProcessor.from_pretrained(str(tiny_checkpoints[family]))
    limits = pixel_limits_of(proc)
    assert limits.factor == (32 if family == "qwen3_vl" else 28)
    col = VLACollator(proc, PromptBuilder(Vocabulary.load()), limits)
    enc = col.encode(train_samples[0])
    keep = enc["labels"] != IGNORE_INDEX
    assert col.tokenizer.decode(enc["labels"][keep]) == train_samples[0].messages[-1]["content"] + "<|im_end|>"
    assert int(enc["image_grid_thw"][0].prod()) == enc["pixel_values"].shape[0]


def test_batch_pads_dynamically(collator, train_samples):
    from training.collate import IGNORE_INDEX

    items = [collator.encode(s) for s in train_samples[:4]]
    lengths = [int(it["input_ids"].shape[0]) for it in items]
    batch = collator(items)
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == collator.pad_id).all()
    assert batch["image_grid_thw"].shape == (4, 3)
    assert batch["pixel_values"].shape[0] == sum(it["pixel_values"].shape[0] for it in items)
    # lengths estimated without decoding images (for group_by_length) are close to the real ones
    est = [collator.estimate_length(s) for s in train_samples[:4]]
    assert all(abs(e - n) <= 2 for e, n in zip(est, lengths))


def test_lora_targets_language_model_only(train_model_dir):
    from transformers import AutoModelForImageTextToText

    from training.train import lora_target_regex

    model = AutoModelForImageTextToText.from_pretrained(str(train_model_dir))
    _, matched = lora_target_regex(model, "all")
    assert matched and all(".language_model." in n for n in matched)
    assert not any("visual" in n or "merger" in n or n.endswith("lm_head") for n in matched)
    assert {n.rsplit(".", 1)[-1] for n in matched} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"}
    _, qv = lora_target_regex(model, "q_proj,v_proj")
    assert {n.rsplit(".", 1)[-1] for n in qv} == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError):
        lora_target_regex(model, "qkv")  # a vision-tower layer name is not a language-model target


# ------------------------------------------------------------------------------------------------
# the LoRA run
# ------------------------------------------------------------------------------------------------


def test_lora_run_loss_falls_and_everything_is_saved(lora_run, train_model_dir, synth_dir):
    from vla_node.manifest import read_manifest
    from vla_node.vocabulary import Vocabulary

    assert lora_run.global_step == LORA_STEPS
    losses = [h["loss"] for h in lora_run.log_history if "loss" in h]
    assert len(losses) >= 8
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first * 0.9, losses
    assert any("samples_per_s" in h for h in lora_run.log_history)
    assert any("eval_loss" in h for h in lora_run.log_history)

    out = lora_run.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "vla_manifest.json", "loss_curve.png",
                 "processor_config.json", "tokenizer.json", "chat_template.jinja", "train_results.json"):
        assert (out / name).is_file(), name
    assert (out / f"checkpoint-{SAVE_STEPS}").is_dir() and (out / f"checkpoint-{LORA_STEPS}").is_dir()
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard events"

    man = read_manifest(out)
    vocab = Vocabulary.load()
    assert man["family"] == "qwen2_5_vl" and man["coordinate_convention"] == "absolute_resized"
    assert man["vocabulary"] == {"version": vocab.version, "fingerprint": vocab.fingerprint()}
    assert len(man["dataset_sha256"]) == 64
    assert man["base_model"]["name_or_path"] == str(train_model_dir)
    assert man["metrics"]["global_step"] == LORA_STEPS and "eval_loss" in man["metrics"]
    assert man["image"] == {"min_pixels": 56 * 56, "max_pixels": 224 * 224}

    from safetensors.torch import load_file

    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all("language_model" in k and "lora_" in k for k in keys)


def test_adapter_reloads_onto_fresh_base_merges_and_serves(lora_run, train_model_dir, collator, train_samples):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from tests.fixtures_models import tiny_image
    from vla_node.backends.base import GenerationRequest
    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    batch = collator([train_samples[0]])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = AutoModelForImageTextToText.from_pretrained(str(train_model_dir)).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    peft_model = PeftModel.from_pretrained(base, str(lora_run.output_dir)).eval()
    with torch.no_grad():
        lora_logits = peft_model(**inputs).logits
        assert not torch.allclose(base_logits, lora_logits, atol=1e-3)  # training changed the model
        merged = peft_model.merge_and_unload()
        merged_logits = merged(**inputs).logits
    assert torch.allclose(lora_logits, merged_logits, atol=1e-4)

    vocab = Vocabulary.load()
    backend = TransformersBackend(str(train_model_dir), adapter_path=str(lora_run.output_dir),
                                  vocab_fingerprint=vocab.fingerprint(), max_new_tokens=8)
    try:
        assert backend.adapter_id and not backend.warnings
        result = backend.generate(GenerationRequest(image=tiny_image(112, 84),
                                                    messages=PromptBuilder(vocab).chat_messages("stop"),
                                                    max_new_tokens=8))
        assert result.new_tokens >= 1
    finally:
        backend.close()


def test_resume_continues_step_count_and_loss(lora_run, train_model_dir, synth_dir, tmp_path):
    from training.train import train

    out = tmp_path / "resumed"
    out.mkdir()
    ckpt = out / f"checkpoint-{SAVE_STEPS}"
    shutil.copytree(lora_run.output_dir / f"checkpoint-{SAVE_STEPS}", ckpt)
    cfg = load_config(None, train_overrides(train_model_dir, synth_dir, out, resume_from_checkpoint="true",
                                            max_steps=2 * SAVE_STEPS, plot_loss=False))
    result = train(cfg)
    assert result.global_step == 2 * SAVE_STEPS
    steps = [h["step"] for h in result.log_history if "loss" in h]
    restored = [s for s in steps if s <= SAVE_STEPS]
    new = [s for s in steps if s > SAVE_STEPS]
    assert restored and new, steps  # history came back from the checkpoint, then training went on
    first_new = next(h for h in result.log_history if "loss" in h and h["step"] > SAVE_STEPS)
    assert first_new["step"] > SAVE_STEPS
    # same data order, RNG and optimizer state: the resumed run retraces the uninterrupted one
    original = {h["step"]: h["loss"] for h in lora_run.log_history if "loss" in h}
    resumed = {h["step"]: h["loss"] for h in result.log_history if "loss" in h and h["step"] > SAVE_STEPS}
    for step, loss in resumed.items():
        assert loss == pytest.approx(original[step], rel=2e-3, abs=2e-3), (step, loss, original[step])


def test_adapter_name_or_path_trains_that_adapter_further(lora_run, train_model_dir, synth_dir, tmp_path):
    """LLaMA-Factory's adapter_name_or_path: the run starts from the given adapter (its rank and
    targets, its trained weights), not from a new one, and leaves the given folder as it was."""
    from safetensors.torch import load_file

    from training.train import train

    given = lora_run.output_dir
    before = load_file(str(given / "adapter_model.safetensors"))
    for bad, match in (({"adapter_name_or_path": tmp_path}, "no adapter_config.json"),
                       ({"adapter_name_or_path": given, "finetuning_type": "full"}, "needs finetuning_type: lora"),
                       ({"adapter_name_or_path": f"{given},{given}"}, "one adapter only")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / "bad", **bad))

    def first_loss(name: str, **extra) -> tuple[float, Path]:
        out = tmp_path / name
        result = train(load_config(None, train_overrides(train_model_dir, synth_dir, out, max_steps=2, logging_steps=1,
                                                         save_steps=100, lora_rank=4, plot_loss=False, **extra)))
        return next(h["loss"] for h in result.log_history if "loss" in h), out

    new_loss, _ = first_loss("new")
    further_loss, out = first_loss("further", adapter_name_or_path=given)
    assert further_loss < 0.8 * new_loss, (further_loss, new_loss)  # it starts where the given one stopped
    after = load_file(str(out / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}  # its rank, not 4
    assert any(not torch.equal(after[k], before[k]) for k in before)  # and it trained
    assert all(torch.equal(v, load_file(str(given / "adapter_model.safetensors"))[k]) for k, v in before.items())


def test_additional_target_trains_embeddings_with_the_adapter(train_model_dir, synth_dir, tmp_path):
    """LLaMA-Factory's additional_target: the embedding trains in full next to LoRA, is saved in the
    adapter, and the node's backend serves it and switches back to the untouched base."""
    from safetensors.torch import load_file

    from tests.fixtures_models import tiny_image
    from training.train import train
    from vla_node.backends.base import GenerationRequest
    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    out = tmp_path / "lora_embed"
    with pytest.raises(ConfigError, match="additional_target.*no_such_module"):
        train(load_config(None, train_overrides(train_model_dir, synth_dir, out, max_steps=1,
                                                additional_target="no_such_module")))
    cfg = load_config(None, train_overrides(train_model_dir, synth_dir, out, max_steps=4, logging_steps=1,
                                            save_steps=100, learning_rate=1e-2, additional_target="embed_tokens",
                                            plot_loss=False))
    train(cfg)
    saved = load_file(str(out / "adapter_model.safetensors"))
    embed = [k for k in saved if k.endswith("embed_tokens.weight")]
    assert len(embed) == 1 and any("lora_" in k for k in saved)
    base_embed = next(v for k, v in load_file(str(train_model_dir / "model.safetensors")).items()
                      if k.endswith("embed_tokens.weight"))
    assert not torch.equal(saved[embed[0]].float(), base_embed.float())  # the embedding trained

    vocab = Vocabulary.load()
    backend = TransformersBackend(str(train_model_dir), vocab_fingerprint=vocab.fingerprint(), max_new_tokens=6)
    try:
        request = GenerationRequest(image=tiny_image(112, 84), messages=PromptBuilder(vocab).chat_messages("stop"),
                                    max_new_tokens=6)
        def answer():
            result = backend.generate(request)
            return result.text, result.confidence

        before = answer()
        name = backend.load_adapter(str(out))
        backend.set_adapter(name)
        with_adapter = answer()
        backend.set_adapter(None)
        after = answer()
        assert after == before and with_adapter != before
    finally:
        backend.close()


def test_full_finetuning_runs_with_vision_frozen(train_model_dir, synth_dir, tmp_path):
    from training.train import train
    from vla_node.manifest import read_manifest

    out = tmp_path / "full"
    cfg = load_config(None, train_overrides(train_model_dir, synth_dir, out, finetuning_type="full", max_steps=3,
                                            logging_steps=1, save_steps=100, learning_rate=1e-3))
    result = train(cfg)
    assert result.global_step == 3
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(str(train_model_dir)).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(str(out)).state_dict()
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".language_model." in k for k in changed)
    assert "lm_head.weight" in changed, "the output projection is part of the language model (LLaMA-Factory)"
    assert not any(".visual." in k for k in changed), sorted(changed)[:5]  # vision tower + merger frozen
    assert read_manifest(out)["metrics"]["global_step"] == 3


def test_full_finetuning_resumes_every_weight_from_its_checkpoint(train_model_dir, synth_dir, tmp_path, caplog):
    """transformers saves a checkpoint with the original model's key names; a resume must load them
    all back (not leave the vision tower or anything else at the base's weights) and retrace the run."""
    import logging

    from safetensors.torch import load_file

    from training.train import train

    common = dict(finetuning_type="full", max_steps=4, logging_steps=1, save_steps=2, learning_rate=1e-3,
                  freeze_vision_tower="false", freeze_multi_modal_projector="false")
    whole = train(load_config(None, train_overrides(train_model_dir, synth_dir, tmp_path / "whole", **common)))
    resumed_out = tmp_path / "resumed"
    with caplog.at_level(logging.WARNING):
        resumed = train(load_config(None, train_overrides(
            train_model_dir, synth_dir, resumed_out, resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"),
            **common)))
    assert "missing keys" not in caplog.text and "unexpected keys" not in caplog.text
    losses = {h["step"]: h["loss"] for h in whole.log_history if "loss" in h}
    again = {h["step"]: h["loss"] for h in resumed.log_history if "loss" in h and h["step"] > 2}
    for step, loss in again.items():
        assert loss == pytest.approx(losses[step], rel=1e-4), step
    want, got = load_file(tmp_path / "whole" / "model.safetensors"), load_file(resumed_out / "model.safetensors")
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------
# dataset validation before training
# ------------------------------------------------------------------------------------------------


def _broken_dataset(root: Path, synth_dir: Path) -> Path:
    from training.sharegpt import load_validated

    good = load_validated(synth_dir, "tabletop_val")
    rows = []
    for s in good:
        rows.append({"messages": [dict(m) for m in s.messages], "images": [str(p) for p in s.images]})
    rows[0]["images"] = [str(root / "missing.png")]                # line 2: image not found
    rows[1]["messages"][-1]["content"] = "THROW(object=\"cat\")"    # line 3: unknown verb
    rows[2]["messages"] = rows[2]["messages"][:-1]                  # line 4: no assistant answer
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
    info = {"broken_train": {"file_name": "train.json", "formatting": "sharegpt",
                             "columns": {"messages": "messages", "images": "images"},
                             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                      "assistant_tag": "assistant", "system_tag": "system"}}}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def test_broken_dataset_fails_before_training(tmp_path, synth_dir, capsys):
    from training.train import main

    data = _broken_dataset(tmp_path / "broken", synth_dir)
    out = tmp_path / "never"
    cfg = tmp_path / "c.yaml"
    # the model path does not exist: reaching the model load would fail differently
    cfg.write_text(f"model_path: {tmp_path / 'no-model'}\ndataset_dir: {data}\ndataset: broken_train\n"
                   f"output_dir: {out}\nreport_to: none\n")
    rc = main([str(cfg), "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    train_json = str(data / "train.json")
    for line in (2, 3, 4):
        assert f"{train_json}:{line}:" in err, err
    assert "image not found" in err and "THROW" in err
    assert not out.exists()

    # skip_invalid drops them (counted) instead; --check-data validates without loading a model
    rc = main([str(cfg), "skip_invalid=true", "--check-data", "-q"])
    assert rc == 0
    assert "1 valid sample(s)" in capsys.readouterr().out


class _AnswerLengths(torch.utils.data.Dataset):
    """An action dataset's lengths: a quarter STOP() answers (short), the rest MOVE_OBJECTs (long)."""

    lengths = [130 if i % 4 == 0 else 165 for i in range(400)]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        return {"input_ids": torch.zeros(self.lengths[i], dtype=torch.long)}


def _batches_by_length(model_dir: Path, out: Path, overrides: list[str]) -> list[set[int]]:
    from transformers import AutoModelForImageTextToText

    from training.train import trainer_classes, training_args_for

    cfg = load_config(None, [f"model_path={model_dir}", "dataset=d", f"output_dir={out}", "report_to=none",
                             "per_device_train_batch_size=8", *overrides])
    trainer_cls = trainer_classes()[0]
    dataset = _AnswerLengths()
    trainer = trainer_cls(model=AutoModelForImageTextToText.from_pretrained(model_dir),
                          args=training_args_for(cfg, bf16=False, has_eval=False), train_dataset=dataset)
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(dataset)))  # every sample once an epoch
    return [{dataset.lengths[i] for i in order[k:k + 8]} for k in range(0, len(order), 8)]


def test_default_batches_mix_short_and_long_answers(tiny_model_dir, tmp_path):
    # An answer's length follows its verb. Length-sorted batches each hold one verb, and a model
    # trained on them learns the batch's verb rather than the command (the embedded build answered
    # every command with one verb); the default, as in transformers and LLaMA-Factory, is random.
    mixed = _batches_by_length(tiny_model_dir, tmp_path / "random", [])
    assert sum(len(b) == 2 for b in mixed) >= 0.7 * len(mixed)
    grouped = _batches_by_length(tiny_model_dir, tmp_path / "grouped", ["group_by_length=true"])
    assert sum(len(b) == 1 for b in grouped) >= 0.9 * len(grouped)  # the opt-in still groups


def test_the_ordinary_training_forward_builds_no_kv_cache(tiny_qwen3_vl, synth_box_dir, tmp_path):
    """The text config asks for a KV cache (generation wants one); a training step must not build
    it: wasted work, and under torch_compile each new cache made every layer recompile until
    dynamo left it uncompiled (the ordinary path of an H100 build, session 31)."""
    from transformers import AutoModelForImageTextToText

    from tests.fixtures_train import training_collator
    from training import sharegpt
    from training.train import trainer_classes, training_args_for
    from vla_node.vocabulary import Vocabulary

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl)
    assert model.config.get_text_config().use_cache
    samples = list(sharegpt.load_validated(str(synth_box_dir), "tabletop_val", vocab=Vocabulary.load()))[:2]
    batch = training_collator(tiny_qwen3_vl)(samples)
    cfg = load_config(None, [f"model_path={tiny_qwen3_vl}", "dataset=d", f"output_dir={tmp_path}", "report_to=none"])
    trainer = trainer_classes()[0](model=model, args=training_args_for(cfg, bf16=False, has_eval=False))
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert torch.isfinite(loss) and outputs.past_key_values is None
    cached = model(**batch)  # the same batch as the model's own default would run it
    assert cached.past_key_values is not None and torch.allclose(cached.loss, loss)
