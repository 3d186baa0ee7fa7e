"""Rebuild the embedded default model and its LoRA adapter, from nothing, with fixed seeds.

    python -m training.build_embedded [--out models] [--work out/embedded]   (make models)

1. synthetic tabletop data (training.synth): an English set for the base, a Chinese+English
   set for the adapter (rendered by --workers processes);
2. a Qwen3-VL-architecture (--family) checkpoint (training/tiny_models) with a tokenizer trained on that
   data's text (every number up to 640 one token), initialised with sin-cos starts for the number tokens'
   embeddings and the vision position grid (--init sincos; --init random: transformers' init);
3. optionally (--text-steps, default none) a text stage (training.text_stage): full fine-tuning on
   the English set's commands without their pictures, answers without boxes; then (--grounding-steps)
   a grounding stage: PICK_OBJECT commands in scenes with the named object alone, so the box is the
   only thing to learn from the picture, and after it (--distractor-steps) one with the named object
   among others, so the name must pick the object; a stage cut short by --deadline-minutes holds the
   base back until the next run finishes it (--base-keeps-grounding, the default: the base trains on
   the last grounding stage's scenes too);
4. full fine-tuning of every weight on the English set with `vla-train`'s fast path (data encoded
   once and kept on the GPU, the shared prompt prefix computed once per batch, bf16 autocast over
   fp32 weights), prompted with the compact template (the system prompt's first sentence: the
   model learns verbs, names and rules from the data), with counting questions mixed in
   (--count-samples) and each layer compiled on a GPU (--torch-compile) -> tabletop-tiny, whose CLARIFY
   threshold is then calibrated on scenes of a seed of their own (--calibrate-samples);
5. a LoRA adapter (rank 8, alpha 16, all language-model linears, plus the token embedding trained
   in full: the base never read Chinese) on the Chinese+English set -> tabletop-tiny-zh-lora;
6. the held-out recipes, the learning curve (learning_curve.png: eval loss, and plan exact match
   and box IoU@0.5 of greedy answers, against steps) and, unless --skip-eval, the CPU metrics.

Every stage is skipped when its output exists (delete the work folder to start over); an
interrupted training resumes from its last checkpoint. Each training's data is read and encoded in
a thread while the training before it runs (training.data_ahead). The defaults are the schedule that made the
committed model: 6 decoder layers from the start, grounding 2,400 and distractors 1,500 steps, the
base 5,000 steps on 140,000 scenes + the distractor scenes + 40,000 counting questions, the adapter
2,400 steps on 60,000 zh+en scenes, batch 256 (a larger batch with fewer steps did not learn the
grounding: session 31), an evaluation every 500 steps. On an H100 (session 34,
benchmarks/results/embedded_build_h100_session34.log) the curriculum and the base took 17.9 minutes
and the adapter 5.7: one session of the device tool (scripts/device_build_models.sh); on a CPU a
whole build takes days. Every module a later stage needs is looked for before anything is rendered.
--clarify-samples mixes CLARIFY-rich scenes into both data sets (off by default: measured, it did
not raise the held-out CLARIFY recall). --base-from DIR --merge-size 1 with DIR built with merge 2
first widens DIR into WORK/base_widened (training.widen_vision: finer visual tokens, the mergers
distilled, every other weight kept) and trains on from there, its data drawn for the finer tokens.
--base-from DIR --add-layers K first deepens DIR into WORK/base_deepened (training.deepen: K decoder
layers appended that change no answer until trained); --count-samples N mixes N counting questions
(training.synth_count: how many of a named thing are on the table, and where) into the base's data.
The committed base is session 18's deepened by 2 layers and trained on with counting questions
(session 22).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

from training.data_ahead import DataAhead
from training.weight_shards import shard_weights
from vla_node.factory import EMBEDDED_ADAPTER, EMBEDDED_MODEL

# The architecture: Qwen2.5-VL with every size shrunk, 16x16 pixel patches merged 2x2 (the Qwen-VL
# default: a 320x224 input, 70 visual tokens of 32 px). --merge-size 1 keeps one token per patch
# (300 tokens, so a 20-35 px object spans several) at ~70 ms more per command on a robot's CPU and
# four times the language model's image tokens in training (benchmarks/results/cpu_answer_cost.txt);
# neither placed boxes in the builds so far (the model does not yet look at the picture).
MODEL_SIZES = dict(
    vocab_size=4096,
    hidden_size=384,
    intermediate_size=1152,
    num_hidden_layers=6,  # the committed model's depth (session 22 deepened a 4-layer base by 2)
    num_attention_heads=6,
    num_key_value_heads=2,
    vision_hidden_size=256,
    vision_intermediate_size=768,
    vision_depth=6,
    vision_num_heads=4,
    patch_size=16,
    merge_size=2,
    min_pixels=64 * 64,
    max_pixels=320 * 240,
    vision_window_attention=False,  # a frame is one window of <= 300 patches: full attention
    whole_numbers=1,  # a box coordinate is one token
)
IMAGE_SIZE = (320, 240)
MERGE_SIZES = (1, 2)


def architecture(merge_size: int) -> dict:
    """MODEL_SIZES with the vision tower's merge of merge_size x merge_size patches per visual token."""
    if merge_size not in MERGE_SIZES:
        raise ValueError(f"merge size {merge_size} is not one of {MERGE_SIZES}")
    return {**MODEL_SIZES, "merge_size": merge_size}


def merge_size_of(model: Path) -> int | None:
    """The merge size an exported checkpoint was built with (None: no checkpoint there)."""
    import json

    config = model / "config.json"
    if not config.is_file():
        return None
    return int(json.loads(config.read_text(encoding="utf-8"))["vision_config"]["spatial_merge_size"])
# The base never reads Chinese, so the Chinese tokens' embeddings stay at their random init; LoRA
# alone (linear layers only) could not give them meaning: the adapter trains the embedding too.
ADAPTER_TRAINS_EMBEDDINGS = "embed_tokens"
# The base learns the action language from its data alone: the compact system prompt (one sentence)
# instead of the full one (verbs, 44 names, rules: ~400 tokens). On a CPU-sized model trained from
# scratch it reached a lower loss in less time (benchmarks/results/command_reading_cpu.txt),
# and every command on the robot's CPU reads ~400 prompt tokens fewer. The manifest records it; the
# node follows it.
PROMPT_TEMPLATE = "compact"
BOXES = "absolute_resized"  # the model answers with boxes in its own input pixels (Qwen2.5-VL style)
SEED_ZH_OFFSET = 1
SEED_GROUNDING_OFFSET = 2  # the grounding stage's scenes: none of the base's or the adapter's
SEED_DISTRACTORS_OFFSET = 3  # the second grounding stage's scenes: none of the others'
SEED_CLARIFY_OFFSET = 4  # the CLARIFY-rich scenes (--clarify-samples): none of the others'
SEED_COUNT_OFFSET = SEED_CLARIFY_OFFSET + SEED_ZH_OFFSET + 1  # the counting scenes (--count-samples)
LAST_SEED_OFFSET = SEED_COUNT_OFFSET
# The held-out test sets come from seeds no training of any build draws from (a build's seeds are
# --seed + 0..LAST_SEED_OFFSET, and --seed stays below HELDOUT_SEEDS): the test split of the build's own seed was
# not enough, since another build with another --base-samples splits the same seed otherwise, and
# one build's English seed can be another's Chinese one.
HELDOUT_SEEDS = {"test_en": 1_000_000, "test_zh": 2_000_000}
# ... and of fixed sizes (a recipe's test indices are its seed's split of this many scenes): a build with
# other --base-samples / --lora-samples writes the committed recipes, so its figures compare with theirs.
HELDOUT_SCENES = {"test_en": 140_000, "test_zh": 30_000}
# The scenes the base's CLARIFY threshold is calibrated on (test_en's options): neither trained nor tested on.
CALIBRATION_SEED = 3_000_000


def initial_weights(init: str, family: str) -> dict:
    """training.tiny_models size keys of an --init choice."""
    if init == "random":
        return {}
    return {"sincos_numbers": 1, "sincos_positions": int(family == "qwen3_vl")}


def compile_keys(choice: str) -> dict:
    """vla-train's torch_compile keys for a --torch-compile choice. On a GPU the fast path's step is
    otherwise host-bound (H100, session 31: 12.6x the ordinary path's samples/s with it); on a CPU
    compiling costs minutes and gains nothing, so 'auto' leaves it off there."""
    if choice == "auto":
        import torch

        choice = "inductor" if torch.cuda.is_available() else "off"
    if choice == "off":
        return {"torch_compile": False}
    return {"torch_compile": True, "torch_compile_backend": choice}


def log(message: str) -> None:
    print(f"[build_embedded {time.strftime('%H:%M:%S')}] {message}", flush=True)


def synth_config(num: int, seed: int, languages: tuple[str, ...], sizes: dict = MODEL_SIZES):
    from training.synth import SynthConfig

    # the factor decides the model's input size, in whose pixels the answers' boxes are written
    return SynthConfig(num=num, seed=seed, size=IMAGE_SIZE, languages=languages, boxes=BOXES,
                       min_pixels=sizes["min_pixels"], max_pixels=sizes["max_pixels"],
                       factor=sizes["patch_size"] * sizes["merge_size"],
                       val_frac=0.01, test_frac=0.02)  # >= 400 held-out samples in each split


# A grounding stage's scenes (synth() changes): PICK_OBJECT with the named object alone on the table,
# so the box is the answer's only unknown and is found without reading a word.
GROUNDING = dict(skills=("pick",), max_objects=1, max_containers=0)
# A second grounding stage's scenes: the named object among up to two others (and alone in a fifth of
# them), so the box must be the one of the object the command names: the name picks the image token.
DISTRACTORS = dict(skills=("pick",), max_objects=3, max_containers=0)
# CLARIFY-rich scenes, mixed into the base's and the adapter's data (--clarify-samples): the held-out
# misses were multi-step commands naming one absent object, answered as if a look-alike were it; here
# half the multi-step commands name something absent (the default data: 1 in 5) that shares a colour
# or shape with something on the table (the default: any absent label), and single moves with
# everything present keep CLARIFY from becoming the easy answer (about 4 in 10 answers are CLARIFY)
CLARIFY_RICH = dict(skills=("move", "multi", "clarify"), missing_rate=0.5, missing_lookalikes=True)


def heldout_configs(seed: int, sizes: dict = MODEL_SIZES) -> dict:
    """The held-out test sets' synth options: the build's data options on seeds and sizes of their own."""
    return {name: synth_config(HELDOUT_SCENES[name], HELDOUT_SEEDS[name] + seed, languages, sizes)
            for name, languages in (("test_en", ("en",)), ("test_zh", ("zh", "en")))}


def clarify_rich(out: Path, args, languages: tuple[str, ...], sizes: dict) -> str:
    """--clarify-samples CLARIFY-rich scenes in ``languages`` rendered to ``out`` (once); the path of
    their training split, as a dataset name vla-train reads."""
    seed = args.seed + SEED_CLARIFY_OFFSET + (SEED_ZH_OFFSET if "zh" in languages else 0)
    data = synth(out, args.clarify_samples, seed, languages, args.workers, sizes, **CLARIFY_RICH)
    return str((data / "train.json").resolve())


def counting(out: Path, args, sizes: dict) -> str:
    """--count-samples counting questions (training.synth_count) on scenes of their own, rendered to
    ``out`` (once); the path of their training split, as a dataset name vla-train reads."""
    from training.synth_count import COUNT_CONFIG, generate_count_dataset

    if not (out / COUNT_CONFIG).is_file():  # written last: a dataset stopped halfway is written again
        report = generate_count_dataset(out, synth_config(args.count_samples, args.seed + SEED_COUNT_OFFSET, ("en",),
                                                          sizes), PROMPT_TEMPLATE, workers=args.workers)
        log(f"counting questions {out.name}: {report['counts']} {report['kinds']} in {report['seconds']:.0f} s")
    return str((out / "count_train.json").resolve())


def mark_count_questions(model: Path) -> None:
    """Record in the model's manifest that it answers the counting question (``count_questions``):
    the node then checks its multi-step plans with it (vla_node.presence_check)."""
    from vla_node.manifest import read_manifest, write_manifest

    write_manifest(model, {**read_manifest(model), "count_questions": True})


def rendered(out: Path) -> bool:
    """Whether synth() finished ``out``: its dataset_info.json marks a finished render."""
    return (out / "dataset_info.json").is_file()


def synth(out: Path, num: int, seed: int, languages: tuple[str, ...], workers: int, sizes: dict = MODEL_SIZES,
          **changes) -> Path:
    """Render synth_config(...) (with SynthConfig ``changes``, e.g. GROUNDING) to ``out`` unless done."""
    from dataclasses import replace

    from training.synth import generate_dataset

    if rendered(out):
        return out
    report = generate_dataset(out, replace(synth_config(num, seed, languages, sizes), **changes), workers=workers,
                              overwrite=True)
    log(f"synth {out.name}: {report.counts} in {report.seconds:.0f} s")
    return out


# The system prompt is in every sample: in the tokenizer's corpus it counts as often as a sample
# does, so its words become single tokens (a short prefix) like the commands' and answers' words.
SYSTEM_PROMPT_WEIGHT = 20000


def corpus(configs: list, workers: int) -> list[str]:
    """What the model will read or write: every distinct command and answer of the training data
    (texts only: no picture is drawn) and the system prompt, weighted as in the data."""
    from training.synth import Synthesizer

    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    texts: dict[str, None] = {}
    for cfg in configs:
        syn = Synthesizer(cfg)
        for messages in syn.texts(syn.splits()["train"], workers=workers):
            for message in messages:
                if message["role"] != "system":  # the data's own; training replaces it with the template's
                    texts[message["content"]] = None
    system = PromptBuilder(Vocabulary.load(None), template=PROMPT_TEMPLATE).system_text
    return list(texts) + [system] * SYSTEM_PROMPT_WEIGHT


def base_init(out: Path, texts: list[str], seed: int, sizes: dict = MODEL_SIZES, family: str = "qwen2_5_vl") -> Path:
    from training.tiny_models import build_tiny_checkpoint

    if (out / "config.json").is_file():
        return out
    build_tiny_checkpoint(out, family=family, vocab_texts=texts, seed=seed, **sizes)
    log(f"initial checkpoint at {out}")
    return out


class Deadline:
    """A TrainerCallback factory: stop a training once ``seconds`` have passed, so a build inside a
    time-limited machine always leaves a model. It also writes a checkpoint at the step it stops
    at: the next call on the same work folder resumes the same schedule from there."""

    def __init__(self, seconds: float | None):
        self.at = time.time() + seconds if seconds else None

    def callback(self):
        from transformers import TrainerCallback

        at = self.at

        class _Deadline(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if at is not None and time.time() > at and not control.should_training_stop:
                    log(f"time budget reached at step {state.global_step} of {state.max_steps}: stopping early "
                        "(checkpoint saved; rerun on this work folder to resume)")
                    control.should_training_stop = True
                    control.should_save = True

        return _Deadline()


def generation_evaluator(eval_samples: int):
    """on_data hook for train(): greedy-answer metrics on the first eval samples at every evaluation."""

    def hook(processor, fast):
        if fast is None or fast.eval is None or eval_samples <= 0:
            return ()
        from training.encoded_tensors import EncodedTensors, processor_arithmetic
        from training.generation_eval import GenerationEval, generation_eval_callback
        from vla_node.vocabulary import Vocabulary

        enc = fast.eval
        n = min(eval_samples, len(enc))
        subset = EncodedTensors(enc.ids[:n], enc.lengths[:n], enc.answer_starts[:n], enc.frames[:n],
                                enc.prefix_length, enc.grid_thw)
        height, width = int(enc.frames.shape[1]), int(enc.frames.shape[2])
        evaluator = GenerationEval(subset, processor_arithmetic(processor.image_processor), processor.tokenizer,
                                   Vocabulary.load(None), (width, height))
        return (generation_eval_callback(evaluator),)

    return hook


def base_data_ready(render, en_job: tuple, count_job: tuple | None, datasets: list[str], args, work: Path,
                    sizes: dict) -> tuple[Path, list[str]]:
    """The base's data folder and dataset names, once rendered (``render``: its background render)."""
    if render is not None:
        render.join()  # a failed background render is redone by synth() below
    data_en, datasets = synth(*en_job), list(datasets)
    if args.clarify_samples:
        datasets.append(clarify_rich(work / "data_clarify_en", args, ("en",), sizes))
    if count_job:
        datasets.append(counting(*count_job))
    return data_en, datasets


def full_overrides(init: Path, data: Path, datasets: list[str], steps: int, args, common: dict, run: Path,
                   **extra) -> dict:
    """vla-train's settings for a full fine-tuning of ``init`` (a curriculum stage, the base) into ``run``."""
    return dict(model_path=str(init), finetuning_type="full", dataset_dir=str(data), dataset=",".join(datasets),
                eval_dataset="tabletop_val", output_dir=str(run), learning_rate=args.base_lr, weight_decay=0.05,
                warmup_ratio=0.04, max_steps=steps, prompt_template=PROMPT_TEMPLATE, coordinate_convention=BOXES,
                **extra, **common)


def base_overrides(init: Path, data_en: Path, datasets: list[str], steps: int, args, common: dict,
                   run: Path) -> dict:
    """vla-train's settings for the base: every weight of ``init``, the vision tower's too."""
    return full_overrides(init, data_en, datasets, steps, args, common, run, freeze_vision_tower=False,
                          freeze_multi_modal_projector=False)


def adapter_data_ready(render, zh_data: tuple, args, work: Path, sizes: dict) -> tuple[Path, list[str]]:
    """The adapter's data folder and dataset names, once rendered (``render``: its background render)."""
    if render is not None:
        render.join()
    data_zh, datasets = synth(work / "data_zh", *zh_data, args.workers, sizes), ["tabletop_train"]
    if args.clarify_samples:
        datasets.append(clarify_rich(work / "data_clarify_zh", args, ("zh", "en"), sizes))
    return data_zh, datasets


def lora_overrides(base: Path, data_zh: Path, datasets: list[str], args, common: dict, work: Path) -> dict:
    """vla-train's settings for the adapter on ``base``."""
    return dict(model_path=str(base), finetuning_type="lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                additional_target=ADAPTER_TRAINS_EMBEDDINGS, adapter_name_or_path=args.lora_from,
                dataset_dir=str(data_zh), dataset=",".join(datasets), eval_dataset="tabletop_val",
                output_dir=str(work / "lora_train"), learning_rate=args.lora_lr, warmup_ratio=0.05,
                max_steps=args.lora_steps, **{**common, "eval_steps": max(50, args.lora_steps // 4)})


def run_training(deadline: Deadline, eval_samples: int, prepared=None, **overrides) -> Path:
    """Train ``overrides`` (resuming a stopped run) unless finished; ``prepared``: its data made ahead."""
    from training.config import TrainConfig
    from training.train import data_mismatch, train

    final = Path(overrides["output_dir"])
    if finished(final, overrides.get("max_steps")):
        return final
    if any(final.glob("checkpoint-*")):  # an interrupted or deadline-stopped run continues where it stopped
        overrides["resume_from_checkpoint"] = "true"
    cfg = TrainConfig(**overrides)
    differing = data_mismatch(cfg, prepared) if prepared is not None else []
    if differing:  # a bug, but no reason to lose the build: the training prepares its own
        log(f"the data prepared ahead for {final.name} is not its data ({'; '.join(differing)}): not used")
        prepared = None
    result = train(cfg, callbacks=[deadline.callback()], on_data=generation_evaluator(eval_samples),
                   prepared=prepared)
    (final / "log_history.json").write_text(json.dumps(result.log_history, indent=1) + "\n")
    log(f"trained {final}: step {result.global_step}, {result.metrics}")
    return final


def finished(run: Path, max_steps: int | None) -> bool:
    """Whether the training in ``run`` ran its whole schedule (a deadline-stopped one did not)."""
    results = run / "train_results.json"
    if not results.is_file():
        return False
    done = json.loads(results.read_text()).get("global_step")
    return max_steps is None or done is None or int(done) >= int(max_steps)


def curriculum(args, work: Path, sizes: dict) -> list[tuple]:
    """The stages before the base's own training that the arguments ask for, in order: (run name,
    learning-curve title, steps, a function that writes the stage's data once, greedy answers logged)."""
    def text():
        from training.text_stage import write_text_stage

        return write_text_stage(work / "data_text", synth_config(args.base_samples, args.seed, ("en",), sizes),
                                workers=args.workers)

    def scenes(folder: str, seed_offset: int, changes: dict):
        return lambda: synth(work / folder, args.grounding_samples, args.seed + seed_offset, ("en",), args.workers,
                             sizes, **changes)

    stages = [("text", "text stage (no pictures)", args.text_steps, text, 0),
              ("grounding", "grounding stage (one object)", args.grounding_steps,
               scenes("data_grounding", SEED_GROUNDING_OFFSET, GROUNDING), args.gen_eval_samples),
              ("distractors", "grounding stage (among others)", args.distractor_steps,
               scenes("data_distractors", SEED_DISTRACTORS_OFFSET, DISTRACTORS), args.gen_eval_samples)]
    return [stage for stage in stages if stage[2] > 0]


def base_start(base_from: Path, work: Path, merge_size: int, seed: int, add_layers: int = 0) -> Path:
    """--base-from's checkpoint as the base's start; one built with a larger merge size is widened first
    (training.widen_vision) into work/base_widened, and with --add-layers it is deepened (training.deepen)
    into work/base_deepened, each once (a resumed build reuses them)."""
    start = widened_start(base_from, work, merge_size, seed)
    if not add_layers:
        return start
    from training.deepen import deepen_language_model, language_layers

    deepened = work / "base_deepened"
    layers = language_layers(start / "config.json")[1] + add_layers
    if (deepened / "config.json").is_file() and language_layers(deepened / "config.json")[1] == layers:
        log(f"{start} deepened to {layers} layers before: {deepened}")  # written whole or not at all
        return deepened
    log(f"deepening {start} by {add_layers} decoder layers into {deepened} (zero-effect copies of the last ones)")
    return deepen_language_model(start, deepened, add_layers, overwrite=True)


def widened_start(base_from: Path, work: Path, merge_size: int, seed: int) -> Path:
    """--base-from, or its widening (training.widen_vision) to ``merge_size`` in work/base_widened."""
    have = merge_size_of(base_from)
    if have is None or have == merge_size:
        return base_from
    if merge_size > have:
        raise SystemExit(f"--base-from {base_from}: {base_from / 'config.json'} has spatial_merge_size {have}; "
                         f"--merge-size {merge_size} would need coarser tokens, and a base is only widened "
                         f"(to a smaller merge size)")
    widened = work / "base_widened"
    if merge_size_of(widened) == merge_size:  # written whole or not at all
        log(f"--base-from {base_from} (merge {have}) widened to merge {merge_size} before: {widened}")
        return widened
    from training.widen_vision import widen_vision_tokens

    log(f"--base-from {base_from} has merge size {have}: widening it to {merge_size} into {widened} "
        "(mergers distilled, every other weight kept)")
    widen_vision_tokens(base_from, widened, merge_size, seed=seed, overwrite=True)
    note = json.loads((widened / "vla_manifest.json").read_text()).get("widened", {}) \
        if (widened / "vla_manifest.json").is_file() else {}
    log(f"widened {widened}: merger relative errors {note.get('merger_relative_error')}")
    return widened


def first_stage(work: Path, name: str, data: Path, init: Path, steps: int, args, common: dict,
                deadline: Deadline, eval_samples: int = 0) -> Path:
    """A curriculum stage before the base's own training (the text stage, the grounding stage): full
    fine-tuning of ``init`` on ``data`` into work/<name>_train; returns the trained checkpoint. A stage
    stopped by ``deadline`` leaves a checkpoint (see finished()); ``eval_samples`` greedy answers at each
    evaluation."""
    return run_training(deadline, eval_samples, **full_overrides(init, data, ["tabletop_train"], steps, args,
                                                                 {**common, "eval_steps": max(1, steps // 3)},
                                                                 work / f"{name}_train"))


def will_train(run: Path, steps) -> bool:
    """Whether the training in ``run`` has steps left of its ``steps`` ("auto": its checkpoint's schedule)."""
    return not finished(run, scheduled_steps(run) if steps == "auto" else int(steps))


def resumable(run: Path) -> bool:
    """A training stopped before the end of its schedule (a deadline, an interruption) that left a checkpoint."""
    return any(run.glob("checkpoint-*")) and not finished(run, scheduled_steps(run))


def scheduled_steps(run: Path) -> int | None:
    """The max_steps of the schedule a checkpointed training in ``run`` follows (None: no checkpoint)."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(run)) if run.is_dir() else None
    state = Path(last) / "trainer_state.json" if last else None
    return int(json.loads(state.read_text())["max_steps"]) if state and state.is_file() else None


def render_in_background(name: str, target, *args):
    """``target(*args)`` (renderers that skip what is written already) in another process, at a lower
    CPU priority than the training that feeds the GPU meanwhile; join() it before using the data (a
    failed render is redone in the foreground by the same calls)."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=_niced, args=(target, *args), name=f"render {name}")
    process.start()
    log(f"rendering {name} in the background (pid {process.pid}) while training runs")
    return process


def _niced(target, *args) -> None:
    os.nice(10)
    target(*args)


def _render_base_data(data_en: tuple, count: tuple | None) -> None:
    """The base's own scenes, then its counting questions: rendered while the curriculum trains."""
    synth(*data_en)
    if count:
        counting(*count)


def probe_rate(init: Path, data: Path, common: dict, batch: int, work: Path) -> float:
    """Training samples/s of the fast path on this machine (a few steps on a small subset)."""
    from training.config import TrainConfig
    from training.train import train

    out = work / "probe"
    shutil.rmtree(out, ignore_errors=True)
    probe = {**common, "max_samples": batch * 30, "save_steps": 10**6, "eval_steps": None, "logging_steps": 5,
             "report_to": "none", "plot_loss": False}
    result = train(TrainConfig(model_path=str(init), finetuning_type="full", freeze_vision_tower=False,
                               prompt_template=PROMPT_TEMPLATE, coordinate_convention=BOXES,
                               freeze_multi_modal_projector=False, dataset_dir=str(data), dataset="tabletop_train",
                               output_dir=str(out), learning_rate=1e-4, max_steps=25, **probe))
    rates = [h["samples_per_s"] for h in result.log_history if "samples_per_s" in h][1:]  # first includes warm-up
    shutil.rmtree(out, ignore_errors=True)
    rate = sorted(rates)[len(rates) // 2]
    log(f"probe: {rate:.1f} training samples/s")
    return rate


def export_model(trained: Path, target: Path) -> None:
    """Copy the final weights (bf16 to halve the committed size) and processor files."""
    import torch
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for item in sorted(trained.iterdir()):
        if item.is_file() and item.suffix in (".json", ".jinja", ".safetensors", ".png") \
                and not item.name.startswith(("trainer_state", "training_args", "log_history")):
            shutil.copy2(item, target / item.name)
    for weights in target.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    config = target / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = "bfloat16"
        config.write_text(json.dumps(data, indent=2) + "\n")
    if (target / "model.safetensors").is_file():
        shard_weights(target)


PANELS_PER_ROW = 4


def plot_learning_curve(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """eval loss (left) and greedy plan exact match / box IoU@0.5 (right) against steps, one panel
    per training stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(name, h) for name, h in histories.items() if any("eval_loss" in e for e in h)]
    if not stages:
        return None
    columns = min(len(stages), PANELS_PER_ROW)  # rows of a few panels: titles stay readable
    rows = -(-len(stages) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(stages):]:
        ax.set_visible(False)
    for ax, (name, history) in zip(axes.flat, stages):
        loss = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
        ax.plot(*zip(*loss), "o-", color="tab:blue", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss", color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(textwrap.fill(name, 60), fontsize=9)
        right = ax.twinx()
        for key, colour, label in (("gen_plan_exact_match", "tab:green", "plan exact match"),
                                   ("gen_box_iou50", "tab:red", "box IoU@0.5")):
            points = [(e["step"], e[key]) for e in history if key in e]
            if points:
                right.plot(*zip(*points), "s--", color=colour, label=label)
        right.set_ylim(0, 1.02)
        right.set_ylabel("greedy answers on held-out val samples")
        lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.build_embedded", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models", help="where the finished models go (default: %(default)s)")
    parser.add_argument("--work", default="out/embedded", help="data, checkpoints and logs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="one seed for data, init and training (default: 0)")
    parser.add_argument("--base-samples", type=int, default=140000, help="English synthetic samples (default: %(default)s)")
    parser.add_argument("--lora-samples", type=int, default=60000, help="Chinese+English samples (default: %(default)s)")
    parser.add_argument("--base-steps", default="5000",
                        help="full fine-tuning steps, or 'auto': as many as --base-minutes allow at the rate "
                             "a short probe measures (default: %(default)s)")
    parser.add_argument("--base-minutes", type=float, default=5.0, help="time for the base with --base-steps auto")
    parser.add_argument("--text-steps", type=int, default=0,
                        help="steps of the curriculum's text stage (the base's commands without pictures, answers "
                             "without boxes) before the base's own training; 0: none (default: %(default)s)")
    parser.add_argument("--grounding-steps", type=int, default=2400,
                        help="steps of a grounding stage before the base's own training: PICK_OBJECT commands in "
                             "scenes with the named object alone; 0: none (default: %(default)s)")
    parser.add_argument("--grounding-samples", type=int, default=32000,
                        help="scenes of each grounding stage (default: %(default)s)")
    parser.add_argument("--distractor-steps", type=int, default=1500,
                        help="steps of a second grounding stage, after the first: PICK_OBJECT commands with the named "
                             "object among up to two others; 0: none (default: %(default)s)")
    parser.add_argument("--base-keeps-grounding", action=argparse.BooleanOptionalAction, default=True,
                        help="the base trains on the last grounding stage's scenes too, beside its own (concatenated): "
                             "without them the multi-object task undid the looking the stage had taught; with "
                             "--base-from the stages are not trained again, but their scenes are rendered for the base")
    parser.add_argument("--clarify-samples", type=int, default=0,
                        help="CLARIFY-rich scenes (CLARIFY_RICH) mixed into the base's data (English) and the "
                             "adapter's (Chinese and English); 0: none (default: %(default)s)")
    parser.add_argument("--count-samples", type=int, default=40000,
                        help="counting questions (training.synth_count: how many of a named thing are on the "
                             "table, and where) on scenes of their own, mixed into the base's data; the node's "
                             "presence check asks them (default: %(default)s; 0: none)")
    parser.add_argument("--calibrate-samples", type=int, default=800,
                        help="scenes of a seed of their own on which the finished base's CLARIFY threshold is "
                             "calibrated (training.calibrate_clarify, written to its manifest); 0: none "
                             "(default: %(default)s)")
    parser.add_argument("--add-layers", type=int, default=0,
                        help="with --base-from: decoder layers appended to its language model before training "
                             "(training.deepen: zero-effect copies of the last ones) (default: %(default)s)")
    parser.add_argument("--lora-steps", type=int, default=2400, help="LoRA steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="per-device batch (default: %(default)s)")
    parser.add_argument("--torch-compile", nargs="?", const="inductor", default="auto", metavar="BACKEND",
                        help="vla-train's torch_compile in every training of the build, with BACKEND (inductor if "
                             "none is named; 'off': none): each decoder layer and vision block compiled "
                             "(training/compile_layers.py). Default: inductor on a GPU, off on a CPU")
    parser.add_argument("--base-lr", type=float, default=1.5e-3, help="full fine-tuning peak learning rate (default: %(default)s)")
    parser.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA peak learning rate (default: %(default)s)")
    parser.add_argument("--lora-from", default=None,
                        help="train this adapter further (vla-train adapter_name_or_path) instead of a new one: "
                             "after the base was trained further, its earlier adapter is most of the way there")
    parser.add_argument("--base-from", default=None,
                        help="start full fine-tuning from this checkpoint instead of a random init (a second stage); "
                             "a smaller --merge-size than its own widens it first into WORK/base_widened")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                        help="processes for rendering and encoding the data (default: cores - 1, at most 16)")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between evaluations (default: %(default)s)")
    parser.add_argument("--gen-eval-samples", type=int, default=128,
                        help="held-out val samples answered greedily at every evaluation (default: %(default)s)")
    parser.add_argument("--deadline-minutes", type=float, default=None,
                        help="stop each training early (it still saves) once this many minutes of the build have passed")
    parser.add_argument("--lora-minutes", type=float, default=6.0,
                        help="with --deadline-minutes: the base training stops this much earlier, leaving the "
                             "calibration and the adapter their time (default: %(default)s, an H100's)")
    parser.add_argument("--eval-limit", type=int, default=400, help="held-out samples per split for METRICS (default: %(default)s)")
    parser.add_argument("--skip-eval", action="store_true", help="stop after exporting the models")
    parser.add_argument("--merge-size", type=int, choices=MERGE_SIZES, default=None,
                        help="patches merged per visual token, per side: 1 = 16 px tokens (300 per frame), 2 = 32 px "
                             "(70 per frame, faster on a CPU); an exported base's own value wins; with --base-from "
                             "a base of a larger one, the base is widened first (training.widen_vision: its mergers "
                             "distilled, every other weight kept) (default: --base-from's, else "
                             f"{MODEL_SIZES['merge_size']})")
    parser.add_argument("--family", choices=("qwen2_5_vl", "qwen3_vl"), default="qwen3_vl",
                        help="architecture of the base (Qwen3-VL's vision tower adds learned absolute position "
                             "embeddings and DeepStack features) (default: %(default)s)")
    parser.add_argument("--init", choices=("random", "sincos"), default="sincos",
                        help="the base's initial weights: transformers' random init, or with sin-cos starts for the "
                             "number tokens' embeddings and (qwen3_vl) the vision tower's position embeddings "
                             "(training.tiny_models: sincos_numbers, sincos_positions) (default: %(default)s)")
    parser.add_argument("--stop-after", choices=("base", "all"), default="all",
                        help="'base' stops once tabletop-tiny is exported (split a build across machines)")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    built_merge = merge_size_of(out / EMBEDDED_MODEL)
    if built_merge is not None and args.merge_size not in (None, built_merge):
        log(f"--merge-size {args.merge_size} ignored: {out / EMBEDDED_MODEL} was built with {built_merge}")
    base_from_merge = merge_size_of(Path(args.base_from)) if args.base_from else None
    # the model's merge decides the data's input size (synth_config's factor), so both follow it
    sizes = architecture(built_merge or args.merge_size or base_from_merge or MODEL_SIZES["merge_size"])
    deadline = Deadline(args.deadline_minutes * 60 if args.deadline_minutes else None)
    adapter_minutes = args.lora_minutes if args.stop_after == "all" else 0.0  # no adapter: the base takes it all
    base_deadline = Deadline((args.deadline_minutes - adapter_minutes) * 60 if args.deadline_minutes else None)
    if args.add_layers < 0:
        raise SystemExit(f"--add-layers {args.add_layers}: a number of decoder layers to append, 0 or more")
    if args.deadline_minutes is not None and adapter_minutes >= args.deadline_minutes:
        raise SystemExit(f"--deadline-minutes {args.deadline_minutes:g} leaves the base no time: --lora-minutes "
                         f"{args.lora_minutes:g} of it are kept for the calibration and the adapter (give a smaller "
                         "--lora-minutes, or --stop-after base)")
    if args.add_layers and not args.base_from:
        raise SystemExit("--add-layers deepens a trained base: give it with --base-from (a new model's depth is "
                         "training.tiny_models')")
    compiling = compile_keys(args.torch_compile)
    if compiling["torch_compile"]:
        from training.compile_layers import backend_problem

        problem = backend_problem(compiling["torch_compile_backend"])
        if problem:
            raise SystemExit(f"--torch-compile {args.torch_compile}: {problem}")
    missing = missing_modules(args)
    if missing:
        raise SystemExit("a later stage of this build needs what does not import here: " + "; ".join(missing)
                         + " (pip install them; on a device machine carry them: benchmarks/device_wheels.sh)")
    if not 0 <= args.seed < min(HELDOUT_SEEDS.values()) - LAST_SEED_OFFSET:
        raise SystemExit(f"--seed {args.seed}: must be >= 0 and below {min(HELDOUT_SEEDS.values()) - LAST_SEED_OFFSET} "
                         "(the seeds above are the held-out sets')")
    heldout = heldout_configs(args.seed, sizes)
    # (samples, seed, languages) of the base's and the adapter's data: what is rendered and what the
    # tokenizer's corpus reads are the same options
    en_data = (args.base_samples, args.seed, ("en",))
    zh_data = (args.lora_samples, args.seed + SEED_ZH_OFFSET, ("zh", "en"))
    training_text = [synth_config(*en_data, sizes), synth_config(*zh_data, sizes)]
    common = dict(per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
                  preprocessing_num_workers=args.workers, seed=args.seed, logging_steps=25,
                  save_steps=args.eval_every * 2, save_total_limit=1, eval_steps=args.eval_every, max_grad_norm=1.0,
                  bf16="auto", report_to="tensorboard", lr_scheduler_type="cosine", fast_path="auto", disable_tqdm=True,
                  dataloader_drop_last=True,  # one batch shape: a compiled step never compiles again
                  image_min_pixels=sizes["min_pixels"], image_max_pixels=sizes["max_pixels"],
                  **compiling)
    histories: dict[str, list[dict]] = {}
    adapter_data = lora_ahead = None
    base_run = work / "base_train"
    if (out / EMBEDDED_MODEL / "config.json").is_file() and not resumable(base_run):
        log(f"base model {out / EMBEDDED_MODEL} exists: not retrained")  # exported by an earlier (maybe remote) run
    else:
        # --base-from is checked (and widened) before any data is rendered
        init = base_start(Path(args.base_from), work, sizes["merge_size"], args.seed, args.add_layers) \
            if args.base_from else None
        en_job = (work / "data_en", *en_data, args.workers, sizes)
        count_job = (work / "data_count_en", args, sizes) if args.count_samples else None
        stages = curriculum(args, work, sizes)
        base_data = None
        if stages and not args.base_from and not rendered(work / "data_en"):
            base_data = render_in_background("the base's scenes", _render_base_data, en_job, count_job)
        if init is None:
            init = base_init(work / "base_init", corpus(training_text, args.workers), args.seed,
                             {**sizes, **initial_weights(args.init, args.family)}, family=args.family)
        base_datasets = ["tabletop_train"]
        base_ahead = None
        for number, (name, title, steps, data, answers) in enumerate(stages, 1):
            if args.base_from and not (args.base_keeps_grounding and name != "text"):
                continue  # --base-from: the stages were trained before; only the scenes the base keeps are needed
            stage_data = data()
            if args.base_keeps_grounding and name != "text":  # the last grounding stage's scenes win
                base_datasets[1:] = [str((stage_data / "train.json").resolve())]
            if not args.base_from:
                if number == len(stages) and will_train(base_run, args.base_steps):
                    def base_inputs(model=init, datasets=list(base_datasets)):
                        ready = base_data_ready(base_data, en_job, count_job, datasets, args, work, sizes)
                        # any earlier stage's folder serves: the processor is the same, and checked
                        return ready, base_overrides(model, *ready, -1, args, common, base_run)

                    # the base's data is read and encoded while the last stage trains
                    base_ahead = DataAhead("the base", base_inputs, log)
                init = first_stage(work, name, stage_data, init, steps, args, common, base_deadline, answers)
                histories[title] = _history(init)
                if not finished(init, steps):
                    return _stopped_early(init)
        made_ahead, prepared = base_ahead.result() if base_ahead is not None else (None, None)
        data_en, base_datasets = made_ahead or base_data_ready(base_data, en_job, count_job, base_datasets, args,
                                                               work, sizes)
        if args.stop_after == "all":
            if not rendered(work / "data_zh"):
                adapter_data = render_in_background("the adapter's scenes", synth, work / "data_zh", *zh_data,
                                                    args.workers, sizes)
            if will_train(work / "lora_train", args.lora_steps):
                def adapter_inputs(model=init, render=adapter_data):
                    ready = adapter_data_ready(render, zh_data, args, work, sizes)
                    return ready, lora_overrides(model, *ready, args, common, work)

                lora_ahead = DataAhead("the adapter", adapter_inputs, log)  # encoded while the base trains
        steps = int(args.base_steps) if args.base_steps != "auto" else scheduled_steps(base_run)
        if steps is None:
            rate = probe_rate(init, data_en, common, args.batch_size, work)
            steps = int(rate * args.base_minutes * 60 / args.batch_size)
            log(f"--base-steps auto: {steps} steps ({args.base_minutes} min at {rate:.1f} samples/s)")
        base = run_training(base_deadline, args.gen_eval_samples, prepared=prepared,
                            **base_overrides(init, data_en, base_datasets, steps, args, common, base_run))
        del prepared  # its host copy of the data
        export_model(base, out / EMBEDDED_MODEL)  # also an unfinished one: a time-limited call leaves a model
        if args.count_samples:
            mark_count_questions(out / EMBEDDED_MODEL)
        if not finished(base, steps) and args.stop_after == "all":
            # an adapter trained on unfinished weights would be resumed later against other ones
            log(f"{base.name} stopped before the end of its schedule: no adapter is trained on it; "
                "run the same command again to resume")
            return 0
    if args.calibrate_samples and needs_calibration(out / EMBEDDED_MODEL, base_run):
        calibrate(out / EMBEDDED_MODEL, heldout["test_en"], args, work)
    histories["base (tabletop-tiny)"] = _history(base_run)
    if args.stop_after == "base":
        log(f"base model written to {out / EMBEDDED_MODEL} in {time.time() - started:.0f} s")
        return 0
    made_ahead, prepared = lora_ahead.result() if lora_ahead is not None else (None, None)
    data_zh, adapter_datasets = made_ahead or adapter_data_ready(adapter_data, zh_data, args, work, sizes)
    lora = run_training(deadline, args.gen_eval_samples, prepared=prepared,
                        **lora_overrides(out / EMBEDDED_MODEL, data_zh, adapter_datasets, args, common, work))
    export_model(lora, out / EMBEDDED_ADAPTER)
    histories["LoRA (tabletop-tiny-zh-lora, zh+en)"] = _history(work / "lora_train")
    # Training data stays in the work folder; the held-out test splits travel with the models
    # as their recipe (a sample depends on seed and index alone): the images would be 100s of MB.
    from training.heldout import write_heldout_spec

    for name, cfg in heldout.items():
        write_heldout_spec(out / "heldout" / f"{name}.json", cfg)
    curve = plot_learning_curve(histories, out / "learning_curve.png")
    log(f"models written to {out} in {time.time() - started:.0f} s" + (f"; learning curve {curve}" if curve else ""))
    if not args.skip_eval:
        from training.embedded_metrics import evaluate_embedded

        evaluate_embedded(out, limit=args.eval_limit)
    return 0


def needs_calibration(model: Path, run: Path) -> bool:
    """Whether the base exported from ``run`` finished its schedule but has no CLARIFY threshold yet
    (also when a call ended between the export and the calibration)."""
    from vla_node.manifest import read_manifest

    return finished(run, scheduled_steps(run)) and "clarify_threshold" not in read_manifest(model)


def missing_modules(args) -> list[str]:
    """The modules a later stage needs that do not import here, each with the stage: found before the
    first training instead of after it (session 34: a GPU machine without xgrammar trained the curriculum
    and the base for 18 minutes, then the calibration failed)."""
    import importlib.util

    needs = {}
    if args.calibrate_samples:
        needs["xgrammar"] = "the CLARIFY calibration answers through the runtime's constrained decoding " \
                            "(--calibrate-samples 0 skips it)"
    if args.stop_after == "all":
        needs["peft"] = "the adapter's training"
    return [f"{name} ({why})" for name, why in needs.items() if importlib.util.find_spec(name) is None]


def calibrate(model: Path, options, args, work: Path) -> None:
    """The finished base's CLARIFY threshold (training.calibrate_clarify --write) on --calibrate-samples
    scenes of test_en's options drawn on CALIBRATION_SEED + --seed, on the GPU where there is one."""
    import torch

    from training.calibrate_clarify import main as calibrate_main
    from training.heldout import write_heldout_spec

    recipe = write_heldout_spec(work / "calibration_options.json", options)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calibrate_main(["--model", str(model), "--recipe", str(recipe), "--seed", str(CALIBRATION_SEED + args.seed),
                    "--samples", str(args.calibrate_samples), "--device", device, "--write"])


def _stopped_early(run: Path) -> int:
    """A curriculum stage stopped by the deadline: the base must not start from its unfinished weights."""
    log(f"{run.name} stopped before the end of its schedule: run the same command again to resume it")
    return 0


def _history(run: Path) -> list[dict]:
    path = run / "log_history.json"
    return json.loads(path.read_text()) if path.is_file() else []


if __name__ == "__main__":
    sys.exit(main())
