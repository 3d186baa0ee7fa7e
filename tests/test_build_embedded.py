"""The embedded model's recipe: the visual merge is one choice that the checkpoint, the data's
input size (the pixels its boxes are written in) and a later adapter-only build all follow."""
from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]

from training.build_embedded import MODEL_SIZES, architecture, merge_size_of, synth_config
from training.synth import Synthesizer
from training.tiny_models import build_tiny_checkpoint


@pytest.mark.parametrize("merge", [1, 2])
def test_the_data_is_fitted_to_the_merged_token_size(merge):
    sizes = architecture(merge)
    cfg = synth_config(100, 0, ("en",), sizes)
    factor = sizes["patch_size"] * merge
    assert cfg.factor == factor
    width, height = Synthesizer(cfg, None).model_input_size()
    assert width % factor == 0 and height % factor == 0
    assert width * height <= sizes["max_pixels"]
    assert {k: v for k, v in sizes.items() if k != "merge_size"} == {
        k: v for k, v in MODEL_SIZES.items() if k != "merge_size"}, "only the merge changes"


def test_an_unknown_merge_size_is_refused():
    with pytest.raises(ValueError, match="merge size 3"):
        architecture(3)


def test_an_exported_base_tells_its_merge_size(tmp_path):
    assert merge_size_of(tmp_path / "none") is None
    small = dict(architecture(1), hidden_size=64, intermediate_size=128, num_attention_heads=2, vocab_size=600,
                 vision_hidden_size=32, vision_intermediate_size=64, vision_depth=1, vision_num_heads=2)
    model = build_tiny_checkpoint(tmp_path / "base", family="qwen2_5_vl", vocab_texts=["put the red cube"] * 4,
                                  **small)
    assert merge_size_of(model) == 1


def test_a_deadline_stopped_training_resumes_its_schedule_on_the_next_run(train_model_dir, synth_dir, tmp_path, caplog):
    """A device call ends at its time limit: the build stops the training, leaves a checkpoint at
    that step, and the next run on the same work folder finishes the same schedule from there."""
    import json
    import logging

    from training.build_embedded import Deadline, finished, resumable, run_training, scheduled_steps

    run = tmp_path / "base_train"
    overrides = dict(model_path=str(train_model_dir), dataset_dir=str(synth_dir), dataset="tabletop_train",
                     output_dir=str(run), finetuning_type="lora", max_steps=6, per_device_train_batch_size=4,
                     learning_rate=5e-3, logging_steps=1, save_steps=100, seed=0, report_to="none",
                     disable_tqdm=True)
    run_training(Deadline(1e-9), 0, **overrides)  # the budget is spent before the first step ends
    assert json.loads((run / "train_results.json").read_text())["global_step"] == 1
    assert (run / "checkpoint-1").is_dir(), "the stop writes a checkpoint although save_steps is far away"
    assert resumable(run) and not finished(run, 6) and scheduled_steps(run) == 6

    with caplog.at_level(logging.INFO):
        run_training(Deadline(None), 0, **overrides)
    assert f"resuming from {run / 'checkpoint-1'}" in caplog.text
    history = json.loads((run / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert finished(run, 6) and not resumable(run)


def test_the_text_stage_holds_the_rendered_datasets_commands_without_pictures_or_boxes(train_model_dir, tmp_path):
    """The curriculum's first stage: the same samples as the pictured dataset (same options and
    indices), drawn without rendering; a valid action dataset that vla-train trains on."""
    import json

    from training import sharegpt
    from training.config import load_config
    from training.text_stage import write_text_stage
    from training.train import train
    from vla_node.parser import parse_actions
    from vla_node.vocabulary import Vocabulary

    cfg = synth_config(120, 3, ("en",))
    out = write_text_stage(tmp_path / "text", cfg)
    assert not list(tmp_path.glob("*.partial")), "written whole, then moved into place"
    pictured = Synthesizer(cfg, None)
    indices = pictured.splits()["train"]
    rows = json.loads((out / "train.json").read_text())
    assert len(rows) == len(indices)
    vocab = Vocabulary.load()
    for row, index in zip(rows, indices):
        drawn = pictured.sample(index, render=False).messages
        assert row["images"] == []
        assert row["messages"][1]["content"] == drawn[1]["content"].replace("<image>", "")
        steps = parse_actions(row["messages"][2]["content"], vocab)
        assert [s.verb for s in steps] == [s.verb for s in parse_actions(drawn[2]["content"], vocab)]
        assert "_box" not in row["messages"][2]["content"]
    samples = sharegpt.load_validated(str(out), "tabletop_train", vocab=vocab)
    assert samples.verdict.kind == "actions" and len(samples) == len(rows)
    (out / "train.json").write_text("[]\n")
    assert write_text_stage(out, cfg) == out and (out / "train.json").read_text() == "[]\n", "written once"

    write_text_stage(tmp_path / "small", synth_config(24, 3, ("en",)))
    result = train(load_config(None, [f"model_path={train_model_dir}", f"dataset_dir={tmp_path / 'small'}",
                                      "dataset=tabletop_train", f"output_dir={tmp_path / 'run'}",
                                      "finetuning_type=full", "max_steps=2", "per_device_train_batch_size=4",
                                      "prompt_template=compact", "report_to=none", "save_steps=100"]))
    assert result.global_step == 2


def test_a_curriculum_stage_stopped_by_the_deadline_holds_the_base_back_until_it_is_resumed(tmp_path):
    """A grounding stage that a device call's time limit cuts short: the base must not start from its
    unfinished weights; the next run of the same command finishes the stage, then trains the base."""
    import json

    from training.build_embedded import finished, main

    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--work", str(work), "--out", str(out), "--family", "qwen3_vl", "--init", "sincos",
            "--base-samples", "120", "--lora-samples", "60", "--grounding-samples", "60", "--grounding-steps", "3",
            "--distractor-steps", "0", "--base-steps", "2", "--batch-size", "2", "--workers", "1",
            "--stop-after", "base", "--skip-eval", "--base-keeps-grounding", "--count-samples", "0",
            "--calibrate-samples", "3"]
    assert main(args + ["--deadline-minutes", "1e-9"]) == 0
    stage = work / "grounding_train"
    assert (stage / "checkpoint-1").is_dir() and not finished(stage, 3)
    assert not (work / "base_train").exists() and not (out / "tabletop-tiny").exists()
    assert main(args) == 0
    assert finished(stage, 3) and finished(work / "base_train", 2)
    manifest_file = out / "tabletop-tiny" / "vla_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert 0 < manifest["clarify_threshold"] <= 0.5  # the finished base is calibrated (--calibrate-samples)
    del manifest["clarify_threshold"]  # a call that ended between the base's export and its calibration
    manifest_file.write_text(json.dumps(manifest))
    assert main(args) == 0 and 0 < json.loads(manifest_file.read_text())["clarify_threshold"] <= 0.5
    config = json.loads((out / "tabletop-tiny" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    scenes = json.loads((work / "data_grounding" / "train.json").read_text())
    assert all(row["messages"][2]["content"].startswith("PICK_OBJECT(") for row in scenes)
    own = json.loads((work / "data_en" / "train.json").read_text())
    base = json.loads((work / "base_train" / "train_results.json").read_text())
    assert base["train_samples"] == len(own) + len(scenes)  # --base-keeps-grounding: both sets


def test_a_base_stopped_by_the_deadline_is_exported_but_gets_no_adapter_until_it_is_resumed(tmp_path):
    """A whole build (--stop-after all) whose base a call's time limit cuts short: the unfinished base
    is still exported (the call leaves a model), but no adapter is trained on weights the next call
    changes; that call finishes the base, then trains the adapter on the finished one."""
    from training.build_embedded import finished, main

    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--work", str(work), "--out", str(out), "--family", "qwen3_vl", "--base-samples", "120",
            "--lora-samples", "60", "--grounding-steps", "0", "--distractor-steps", "0", "--base-steps", "3",
            "--lora-steps", "1", "--batch-size", "2", "--workers", "1", "--skip-eval", "--count-samples", "0",
            "--calibrate-samples", "0", "--eval-every", "1", "--gen-eval-samples", "0"]
    with pytest.raises(SystemExit, match=r"--deadline-minutes 1e-09 leaves the base no time: --lora-minutes 6 "):
        main(args + ["--deadline-minutes", "1e-9"])  # the adapter's default time is more than the whole
    assert not any(work.iterdir())  # refused before anything was rendered
    assert main(args + ["--deadline-minutes", "1e-9", "--lora-minutes", "0"]) == 0
    assert not finished(work / "base_train", 3) and (out / "tabletop-tiny" / "config.json").is_file()
    assert not (work / "lora_train").exists() and not (out / "tabletop-tiny-zh-lora").exists()
    assert main(args) == 0
    assert finished(work / "base_train", 3) and finished(work / "lora_train", 1)
    assert (out / "tabletop-tiny-zh-lora" / "adapter_config.json").is_file()


def test_a_build_missing_a_module_a_later_stage_needs_is_refused_before_anything_is_rendered(tmp_path, monkeypatch):
    """xgrammar (the calibration answers through the runtime's constrained decoding) and peft (the
    adapter) are looked for first: a machine without them must not train the base for minutes and
    then fail. Without the calibration and the adapter, neither is needed."""
    import importlib.util

    from training.build_embedded import main

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name in ("xgrammar", "peft") else found(name, *rest))
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--work", str(work), "--out", str(out), "--family", "qwen3_vl", "--base-samples", "120",
            "--lora-samples", "60", "--grounding-steps", "0", "--distractor-steps", "0", "--base-steps", "1",
            "--batch-size", "2", "--workers", "1", "--skip-eval", "--count-samples", "0", "--eval-every", "1",
            "--gen-eval-samples", "0"]
    with pytest.raises(SystemExit, match=r"needs what does not import here: xgrammar \(the CLARIFY calibration .*; "
                                         r"peft \(the adapter's training\)"):
        main(args)
    assert not work.exists() or not any(work.iterdir())
    with pytest.raises(SystemExit, match=r"here: xgrammar \(the CLARIFY calibration [^;]*\(pip install"):
        main(args + ["--stop-after", "base"])
    assert not work.exists() or not any(work.iterdir())
    assert main(args + ["--stop-after", "base", "--calibrate-samples", "0"]) == 0


def test_the_base_and_the_adapter_train_on_data_prepared_while_the_training_before_them_ran(tmp_path, caplog,
                                                                                              capsys):
    """The base's data is read and encoded in a thread while the last curriculum stage trains, the
    adapter's while the base trains (training.data_ahead): each training takes that data (it reads
    and encodes nothing itself) and trains on every sample of its datasets."""
    import json
    import logging

    from training.build_embedded import main

    work, out = tmp_path / "work", tmp_path / "out"
    caplog.set_level(logging.INFO)
    assert main(["--work", str(work), "--out", str(out), "--family", "qwen3_vl", "--base-samples", "120",
                 "--lora-samples", "90", "--grounding-samples", "60", "--grounding-steps", "2",
                 "--distractor-steps", "0", "--base-steps", "2", "--lora-steps", "1", "--batch-size", "2",
                 "--workers", "2", "--skip-eval", "--count-samples", "0", "--calibrate-samples", "0",
                 "--gen-eval-samples", "0", "--base-keeps-grounding"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    printed = capsys.readouterr().out
    own = len(json.loads((work / "data_en" / "train.json").read_text()))
    grounding = len(json.loads((work / "data_grounding" / "train.json").read_text()))
    adapter = len(json.loads((work / "data_zh" / "train.json").read_text()))
    for name, samples in (("base", own + grounding), ("adapter", adapter)):
        assert f"] the {name}'s data prepared ahead in " in printed, name
        assert sum(m.startswith(f"training samples: {samples},") for m in messages) == 1, name  # read once
    assert json.loads((work / "base_train" / "train_results.json").read_text())["train_samples"] == own + grounding
    assert json.loads((work / "lora_train" / "train_results.json").read_text())["train_samples"] == adapter
    assert (out / "tabletop-tiny-zh-lora" / "adapter_config.json").is_file()


def test_data_prepared_ahead_that_fails_says_why_and_gives_nothing():
    """A thread that could not prepare the data says why and hands back nothing: the build then has
    the training prepare its own (which meets the error itself, with its file and line)."""
    from training.data_ahead import DataAhead

    messages: list[str] = []

    def ready():
        raise FileNotFoundError("data_en/train.json")

    ahead = DataAhead("the base", ready, messages.append)
    assert ahead.result() == (None, None)
    assert messages == ["the base's data prepared ahead failed (FileNotFoundError: data_en/train.json): its "
                        "training prepares its own"]


def test_data_prepared_ahead_for_other_settings_is_not_used_and_the_training_prepares_its_own(
        train_model_dir, synth_dir, tmp_path, capsys):
    """A build's training handed data made for other settings (a bug) says so and reads its own,
    rather than losing the build to the check train() makes."""
    from training.build_embedded import Deadline, finished, run_training
    from training.config import TrainConfig
    from training.train import prepare_data

    overrides = dict(model_path=str(train_model_dir), dataset_dir=str(synth_dir), dataset="tabletop_train",
                     output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, seed=0,
                     report_to="none", save_steps=100, fast_path="true")
    prepared = prepare_data(TrainConfig(**{**overrides, "seed": 1}), place=False)
    run = run_training(Deadline(None), 0, prepared=prepared, **overrides)
    assert finished(run, 1)
    assert "the data prepared ahead for run is not its data (seed: 1 prepared, 0 here): not used" in \
        capsys.readouterr().out


def test_exported_weights_are_sharded_under_the_file_limit_with_every_tensor_unchanged(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from training.weight_shards import shard_weights

    tensors = {f"layer.{i}.weight": torch.randn(64, 64).to(torch.bfloat16) for i in range(10)}  # 8 KiB each
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shard_weights(tmp_path, max_bytes=3 * 8192)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert not (tmp_path / "model.safetensors").exists() and len(shards) == 4
    assert all((tmp_path / shard).stat().st_size <= 3 * 8192 + 4096 for shard in shards)  # + the header
    loaded = {k: v for shard in shards for k, v in load_file(str(tmp_path / shard)).items()}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert index["metadata"]["total_size"] == 10 * 8192


def test_the_held_out_sets_draw_from_seeds_no_training_uses(tmp_path):
    """A test split of the build's own seed was not held out across builds: another --base-samples
    splits that seed otherwise, and one build's English seed was another's Chinese one."""
    import json
    from pathlib import Path

    from training.build_embedded import (CALIBRATION_SEED, HELDOUT_SEEDS, LAST_SEED_OFFSET, SEED_CLARIFY_OFFSET,
                                         SEED_COUNT_OFFSET, SEED_DISTRACTORS_OFFSET, SEED_GROUNDING_OFFSET,
                                         SEED_ZH_OFFSET, heldout_configs, main)

    for seed in (0, 1, 7):
        trained = {seed + offset for offset in (0, SEED_ZH_OFFSET, SEED_GROUNDING_OFFSET, SEED_DISTRACTORS_OFFSET,
                                                SEED_CLARIFY_OFFSET, SEED_CLARIFY_OFFSET + SEED_ZH_OFFSET,
                                                SEED_COUNT_OFFSET)}
        assert len(trained) == 7 and max(trained) == seed + LAST_SEED_OFFSET
        held = {cfg.seed for cfg in heldout_configs(seed).values()}
        assert len(held) == 2 and not held & trained
        assert CALIBRATION_SEED + seed not in held | trained  # the CLARIFY threshold's scenes: neither
    # --seed stays below test_en's seed, so every held-out set's seed stays below the calibration's
    assert CALIBRATION_SEED >= max(HELDOUT_SEEDS.values()) + min(HELDOUT_SEEDS.values())
    models = Path(__file__).resolve().parents[1] / "models" / "heldout"
    for name, seed in HELDOUT_SEEDS.items():
        assert json.loads((models / f"{name}.json").read_text())["config"]["seed"] == seed
    last_allowed = min(HELDOUT_SEEDS.values()) - LAST_SEED_OFFSET - 1  # its last scenes' seed is held-out's - 1
    with pytest.raises(SystemExit, match=f"--seed {last_allowed + 1}: must be"):
        main(["--seed", str(last_allowed + 1), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])


def test_a_build_writes_the_committed_held_out_recipes_whatever_its_data_sizes(tmp_path):
    """`make models` (seed 0) writes models/heldout/test_{en,zh}.json as committed, so the figures of a
    rebuilt model compare with METRICS.md's; the recipes do not follow --base-samples / --lora-samples
    (session 34's build, with 60,000 adapter scenes, wrote another test_zh before they were fixed)."""
    import json
    from pathlib import Path

    from training.build_embedded import heldout_configs
    from training.heldout import write_heldout_spec

    committed = Path(__file__).resolve().parents[1] / "models" / "heldout"
    for name, cfg in heldout_configs(0).items():
        written = write_heldout_spec(tmp_path / f"{name}.json", cfg)
        assert json.loads(Path(written).read_text()) == json.loads((committed / f"{name}.json").read_text()), name


def test_clarify_rich_scenes_are_a_dataset_vla_train_reads_on_a_seed_of_their_own(tmp_path):
    """--clarify-samples: CLARIFY-rich scenes (multi-step commands that name an absent look-alike)
    mixed into a stage's data by path; English and Chinese sets draw from seeds no other set uses."""
    import argparse
    import json

    from training import sharegpt
    from training.build_embedded import SEED_CLARIFY_OFFSET, SEED_ZH_OFFSET, clarify_rich
    from vla_node.vocabulary import Vocabulary

    args = argparse.Namespace(seed=3, clarify_samples=60, workers=1)
    en = clarify_rich(tmp_path / "en", args, ("en",), MODEL_SIZES)
    zh = clarify_rich(tmp_path / "zh", args, ("zh", "en"), MODEL_SIZES)
    seeds = [json.loads((tmp_path / name / "synth_config.json").read_text())["config"]["seed"] for name in ("en", "zh")]
    assert seeds == [3 + SEED_CLARIFY_OFFSET, 3 + SEED_CLARIFY_OFFSET + SEED_ZH_OFFSET]
    for path in (en, zh):
        rows = json.loads(open(path, encoding="utf-8").read())
        answers = [row["messages"][-1]["content"] for row in rows]
        assert 0.25 <= sum(a.startswith("CLARIFY(") for a in answers) / len(answers) <= 0.7
        samples = sharegpt.load_validated(path, vocab=Vocabulary.load(None))  # what vla-train reads, checked
        assert len(samples) == len(rows) and samples.verdict.kind == "actions"


def _fake_base(folder, merge_size: int):
    """A checkpoint folder as far as the build's merge handling reads it (config.json only)."""
    import json

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl",
                                                    "vision_config": {"spatial_merge_size": merge_size}}))
    return folder


def test_a_base_from_a_coarser_merge_is_widened_once_and_trained_on_data_for_finer_tokens(tmp_path, monkeypatch,
                                                                                          capsys):
    """--base-from DIR (merge 2) --merge-size 1: DIR is widened into WORK/base_widened, the base trains from
    there, and its data is drawn for 16 px tokens (320x240 inputs, the boxes in their pixels); a resumed
    build reuses the widened base; a base is never narrowed; without --merge-size the base's own wins."""
    import json

    import training.build_embedded as build
    import training.widen_vision as widen_vision

    widened, trained = [], []

    def widen(source, out, merge_size, **options):
        widened.append((source, out, merge_size))
        _fake_base(out, merge_size)
        return out

    monkeypatch.setattr(widen_vision, "widen_vision_tokens", widen)
    monkeypatch.setattr(build, "run_training", lambda deadline, eval_samples, **o: trained.append(o) or tmp_path)
    monkeypatch.setattr(build, "export_model", lambda trained_dir, target: None)
    merge2 = _fake_base(tmp_path / "merge2", 2)
    work = tmp_path / "work"
    common = ["--out", str(tmp_path / "out"), "--base-samples", "40", "--grounding-steps", "0",
              "--distractor-steps", "0", "--base-steps", "2", "--workers", "1", "--stop-after", "base",
              "--count-samples", "0"]
    args = common + ["--work", str(work), "--base-from", str(merge2), "--merge-size", "1"]
    assert build.main(args) == 0
    assert widened == [(merge2, work / "base_widened", 1)]
    assert trained[-1]["model_path"] == str(work / "base_widened")
    data = json.loads((work / "data_en" / "synth_config.json").read_text())["config"]
    assert data["factor"] == 16 and "widening it to 1" in capsys.readouterr().out
    assert build.main(args) == 0 and len(widened) == 1, "a resumed build reuses the widened base"
    assert trained[-1]["model_path"] == str(work / "base_widened") and "widened to merge 1 before" in \
        capsys.readouterr().out

    merge1 = _fake_base(tmp_path / "merge1", 1)
    with pytest.raises(SystemExit, match=r"merge1/config.json has spatial_merge_size 1; --merge-size 2"):
        build.main(common + ["--work", str(tmp_path / "w2"), "--base-from", str(merge1), "--merge-size", "2"])
    assert not (tmp_path / "w2" / "data_en").exists(), "refused before any data is rendered"
    assert build.main(common + ["--work", str(tmp_path / "w3"), "--base-from", str(merge1)]) == 0
    assert trained[-1]["model_path"] == str(merge1) and len(widened) == 1
    assert json.loads((tmp_path / "w3" / "data_en" / "synth_config.json").read_text())["config"]["factor"] == 16


def test_add_layers_without_base_from_is_refused_before_any_data_is_rendered(tmp_path):
    from training.build_embedded import main

    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="--add-layers deepens a trained base: give it with --base-from"):
        main(["--work", str(work), "--out", str(tmp_path / "out"), "--add-layers", "2", "--base-samples", "40",
              "--workers", "1", "--stop-after", "base"])
    with pytest.raises(SystemExit, match="--add-layers -1: a number of decoder layers to append, 0 or more"):
        main(["--work", str(work), "--out", str(tmp_path / "out"), "--add-layers", "-1", "--base-from",
              str(tmp_path / "any"), "--workers", "1", "--stop-after", "base"])
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_base_from_with_add_layers_is_deepened_once_into_the_work_folder(tiny_qwen3_vl, tmp_path):
    """--base-from DIR --add-layers K: the base trains from WORK/base_deepened, K layers deeper; a
    resumed build reuses it as it is; without --add-layers the base is DIR itself."""
    import json

    from training.build_embedded import base_start

    def layers(folder):
        return json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]

    work = tmp_path / "work"
    work.mkdir()
    merge = merge_size_of(tiny_qwen3_vl)
    assert base_start(tiny_qwen3_vl, work, merge, 0, add_layers=0) == tiny_qwen3_vl
    assert list(work.iterdir()) == [], "nothing written without --add-layers"
    deepened = base_start(tiny_qwen3_vl, work, merge, 0, add_layers=2)
    assert deepened == work / "base_deepened" and layers(deepened) == layers(tiny_qwen3_vl) + 2
    assert merge_size_of(deepened) == merge, "deepened, not widened"
    written = {path.name: path.stat().st_mtime_ns for path in deepened.iterdir()}
    assert "model.safetensors.index.json" in written or "model.safetensors" in written
    assert base_start(tiny_qwen3_vl, work, merge, 0, add_layers=2) == deepened
    assert {path.name: path.stat().st_mtime_ns for path in deepened.iterdir()} == written, "reused, not rewritten"
    # a base deepened by another count is not the one asked for: written again
    assert base_start(tiny_qwen3_vl, work, merge, 0, add_layers=1) == deepened
    assert layers(deepened) == layers(tiny_qwen3_vl) + 1


def test_counting_questions_are_written_once_on_a_seed_of_their_own(tmp_path):
    """--count-samples: counting questions (training.synth_count) rendered once into the work folder on
    --seed + SEED_COUNT_OFFSET, mixed into the base's data by the path of their training split."""
    import argparse
    import json

    from training.build_embedded import SEED_COUNT_OFFSET, counting
    from training.synth_count import CountingScenes

    args = argparse.Namespace(seed=3, count_samples=40, workers=1)
    out = tmp_path / "data_count_en"
    path = counting(out, args, MODEL_SIZES)
    assert path == str((out / "count_train.json").resolve())
    rows = json.loads((out / "count_train.json").read_text())
    assert len(rows) + len(json.loads((out / "count_val.json").read_text())) == 40
    indices = [int(row["images"][0].removeprefix("images/").removesuffix(".png")) for row in rows]

    def drawn(seed):
        scenes = CountingScenes(synth_config(40, seed, ("en",), MODEL_SIZES), "compact")
        return [scenes.count_sample(i, render=False).messages for i in indices]

    assert [row["messages"] for row in rows] == drawn(3 + SEED_COUNT_OFFSET)
    assert [row["messages"] for row in rows] != drawn(3), "not the base's own seed"
    (out / "count_train.json").write_text("[]\n")
    assert counting(out, args, MODEL_SIZES) == path and (out / "count_train.json").read_text() == "[]\n", \
        "written once"


def test_a_base_trained_with_counting_questions_says_so_in_its_manifest(tmp_path):
    """mark_count_questions: what lets the node's presence check ask the model (vla_node.presence_check);
    every other manifest field is kept."""
    import json
    import shutil
    from pathlib import Path

    from training.build_embedded import mark_count_questions
    from vla_node.manifest import answers_count_questions, read_manifest

    model = tmp_path / "tabletop-tiny"
    model.mkdir()
    shutil.copy(Path(__file__).resolve().parent.parent / "models" / "tabletop-tiny" / "vla_manifest.json", model)
    before = {k: v for k, v in read_manifest(model).items() if k != "count_questions"}
    (model / "vla_manifest.json").write_text(json.dumps(before))
    assert not answers_count_questions(model)
    mark_count_questions(model)
    assert answers_count_questions(model)
    assert {k: v for k, v in read_manifest(model).items() if k != "count_questions"} == before


def test_torch_compile_reaches_the_trainings_of_the_build(tmp_path, caplog):
    """--torch-compile BACKEND: the build's trainings run with vla-train's torch_compile (eager
    here: dynamo traces the layers, no code is generated) and the build still exports its base."""
    import json
    import logging

    from training.build_embedded import main

    work, out = tmp_path / "work", tmp_path / "out"
    caplog.set_level(logging.INFO, logger="vla_train")
    assert main(["--work", str(work), "--out", str(out), "--family", "qwen3_vl", "--base-samples", "120",
                 "--lora-samples", "60", "--grounding-steps", "0", "--distractor-steps", "0", "--base-steps", "1",
                 "--batch-size", "2", "--workers", "1", "--stop-after", "base", "--skip-eval",
                 "--count-samples", "0", "--calibrate-samples", "0", "--torch-compile", "eager"]) == 0
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch_compile:")]
    assert len(compiled) == 1 and "(backend eager;" in compiled[0]
    assert json.loads((work / "base_train" / "train_results.json").read_text())["global_step"] == 1
    assert (out / "tabletop-tiny" / "config.json").is_file()


def test_torch_compile_is_on_by_default_only_where_a_gpu_trains():
    """On a CPU compiling costs minutes and gains nothing (benchmarks/results/compiled_step_ops_cpu.txt);
    on a GPU the fast path's step is host-bound without it (small_model_training_h100.txt)."""
    import torch

    from training.build_embedded import compile_keys

    gpu = torch.cuda.is_available()
    assert compile_keys("auto") == ({"torch_compile": True, "torch_compile_backend": "inductor"} if gpu
                                    else {"torch_compile": False})
    assert compile_keys("off") == {"torch_compile": False}
    assert compile_keys("aot_eager") == {"torch_compile": True, "torch_compile_backend": "aot_eager"}


def test_an_unknown_torch_compile_backend_is_refused_before_any_data_is_rendered(tmp_path):
    from training.build_embedded import main

    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=r"--torch-compile inductr: torch_compile_backend 'inductr' is not a "
                                         r"torch.compile backend \(this torch has: .*inductor"):
        main(["--work", str(work), "--out", str(tmp_path / "out"), "--base-samples", "40", "--workers", "1",
              "--stop-after", "base", "--torch-compile", "inductr"])
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists()
