"""`vla-train CONFIG.yaml [key=value ...]`: LoRA (or full) fine-tuning of a Qwen-VL checkpoint.

The loop is transformers' Trainer: checkpointing, resume, logging, mixed precision and
distribution (`accelerate launch` / `torchrun` DDP) come from it unchanged. What this file adds:

1. validate the dataset(s) before anything heavy (every bad sample listed as file:line);
2. build prompts with vla_node.prompt (the serving prompt) via training.collate;
3. LoRA on every linear layer of the LANGUAGE model only (vision tower, merger and lm_head stay
   frozen), or full fine-tuning with the vision tower/projector frozen;
4. samples/s in the logs and on the progress bar, TensorBoard, loss_curve.png;
5. at the end: adapter (PEFT format) or full model + processor + vla_manifest.json.

    from training.config import load_config
    from training.train import train
    result = train(load_config("training/configs/tiny_cpu.yaml", ["max_steps=20"]))
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import ConfigError, TrainConfig, config_help, load_config

log = logging.getLogger("vla_train")

__all__ = ["TrainResult", "DataError", "train", "main", "lora_target_regex", "load_split", "build_model",
           "use_bf16", "trainer_classes", "checkpointing_kwargs", "training_args_for"]

LOSS_CURVE = "loss_curve.png"


class DataError(RuntimeError):
    """The dataset failed validation (the message lists the bad samples)."""


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    metrics: dict
    log_history: list[dict] = field(default_factory=list)
    manifest_path: Path | None = None


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _is_file_ref(cfg: TrainConfig, name: str) -> Path | None:
    """A dataset given as a .json/.jsonl path (as is, or relative to dataset_dir), else None."""
    p = Path(name)
    if p.suffix not in (".json", ".jsonl"):
        return None
    for cand in (p, Path(cfg.dataset_dir) / p):
        if cand.is_file():
            return cand
    return None


def _digest(samples: list, files: list[Path], known: dict | None = None) -> str:
    """sha256 over the data files and every image the samples use (so re-rendered images count).
    ``known``: str(image path) -> its dataset_sha256 where validation already hashed it."""
    import hashlib

    from training.sharegpt import dataset_sha256

    from concurrent.futures import ThreadPoolExecutor

    h = hashlib.sha256()
    for f in files:
        h.update(f"{Path(f).name}:{dataset_sha256(f)}\n".encode())
    known = known or {}
    images = list(dict.fromkeys(str(img) for s in samples for img in s.images))
    unread = [img for img in images if img not in known]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # hashing releases the GIL
        fresh = dict(zip(unread, pool.map(dataset_sha256, unread, chunksize=256)))
    for img in images:
        h.update(f"{Path(img).name}:{known[img] if img in known else fresh[img]}\n".encode())
    return h.hexdigest()


def load_split(cfg: TrainConfig, names: list[str], vocab, what: str) -> tuple[list, str]:
    """Validated samples of ``names`` (dataset_info.json names or .json/.jsonl paths) + sha256.

    Validation (training.sharegpt) happens before any model is loaded and fails with DataError
    listing up to ``cfg.max_errors_shown`` problems as file:line:col, unless ``cfg.skip_invalid``:
    then the bad samples are dropped and counted in the log. Each dataset is an action or a
    free-form one (training.answer_kinds); ``max_samples`` applies to each, then they are mixed by
    ``mix_strategy`` (training.mixing).
    """
    from training import sharegpt
    from training.mixing import mix

    per_dataset: list[list] = []
    files: list[Path] = []
    image_sha256: dict = {}
    common = dict(vocab=vocab, skip_invalid=cfg.skip_invalid, max_listed=cfg.max_errors_shown,
                  media_dir=cfg.media_dir)
    for name in names:
        ref = _is_file_ref(cfg, name)
        try:
            if ref is not None:
                got = sharegpt.load_validated(ref, **common)
                files.append(ref)
            else:
                got = sharegpt.load_validated(cfg.dataset_dir, name, **common)
                files.extend(sharegpt.resolve_dataset(cfg.dataset_dir, name)[0])
        except sharegpt.DatasetInvalid as e:
            raise DataError(f"{what} dataset {name!r}: {e}") from None
        if getattr(got, "dropped", 0):
            log.warning("%s dataset %r: skipped %d invalid sample(s) (skip_invalid=true)", what, name, got.dropped)
        kept = list(got)[: cfg.max_samples] if cfg.max_samples else list(got)
        image_sha256.update(getattr(got, "image_sha256", {}))
        if got.verdict is not None:
            log.info("%s dataset %r: %d sample(s), answers: %s", what, name, len(kept), got.verdict.describe())
        per_dataset.append(kept)
    try:
        samples = mix(per_dataset, cfg.mix_strategy, cfg.mixing_probabilities, cfg.seed)
    except ValueError as e:
        raise ConfigError(f"{what} datasets: {e}") from None
    if not samples:
        raise DataError(f"{what} dataset {', '.join(names)} has no samples")
    return samples, _digest(samples, files, image_sha256)


def answer_kinds_of(samples: list) -> list[str]:
    """The kinds of answer (training.answer_kinds) a list of samples teaches, sorted."""
    from training.answer_kinds import ACTIONS

    return sorted({getattr(s, "answer_kind", "") or ACTIONS for s in samples})


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------

_NOT_LANGUAGE = re.compile(r"(^|\.)(visual|vision_tower|vision_model|merger|multi_modal_projector|lm_head)(\.|$)")


def _additional_targets(model, spec: str | None) -> list[str] | None:
    """LLaMA-Factory's ``additional_target``: module names trained in full next to the LoRA layers."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [n for n in names if n not in leaves]
    if unknown:
        raise ConfigError(f"additional_target {unknown} names no module of the model")
    return names or None


def _language_model_prefix(model) -> str:
    """Dotted name of the language model (decoder stack) inside a Qwen-VL model."""
    candidates = [n for n, _ in model.named_modules() if n.split(".")[-1] == "language_model"]
    if candidates:
        return min(candidates, key=len)
    raise ValueError("cannot find the language model (no module named 'language_model')")


def lora_target_regex(model, target: str = "all") -> tuple[str, list[str]]:
    """A PEFT ``target_modules`` regex (full match) selecting linear layers of the language model
    only, and the module names it matches. ``target``: 'all' or a comma list of leaf names."""
    import torch.nn as nn

    prefix = _language_model_prefix(model)
    linear = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(prefix + ".") and not _NOT_LANGUAGE.search(n[len(prefix):])
    ]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if target.strip().lower() != "all":
        wanted = [t.strip() for t in target.split(",") if t.strip()]
        unknown = sorted(set(wanted) - set(leaves))
        if unknown:
            raise ConfigError(f"lora_target {unknown} not among the language model's linear layers {leaves}")
        leaves = sorted(set(wanted))
    if not leaves:
        raise ConfigError("no linear layers to put LoRA on")
    regex = rf"{re.escape(prefix)}\.(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})"
    matched = [n for n in linear if re.fullmatch(regex, n)]
    return regex, matched


def use_bf16(cfg: TrainConfig) -> bool:
    """Whether training runs in bf16: where the GPU supports it, unless cfg.bf16 is "false" (or fp16
    is asked for). "true" without such a GPU (a laptop running a LLaMA-Factory YAML) warns once and
    trains in fp32."""
    import torch

    flag = str(cfg.bf16).lower()
    if flag == "false" or (cfg.fp16 and flag == "auto"):
        return False
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if flag == "true" and not gpu_bf16:
        log.warning("bf16: true, but there is no CUDA GPU with bf16 here: training in fp32")
    return gpu_bf16


def use_fp16(cfg: TrainConfig) -> bool:
    """fp16 mixed precision: asked for and on a CUDA GPU (else one warning, fp32)."""
    import torch

    if not cfg.fp16:
        return False
    if not torch.cuda.is_available():
        log.warning("fp16: true, but there is no CUDA GPU here: training in fp32")
        return False
    return True


def build_model(cfg: TrainConfig, bf16: bool):
    """Load the base model and make the right parameters trainable."""
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if (bf16 and cfg.finetuning_type == "lora") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.model_path, dtype=dtype, attn_implementation=cfg.attn_implementation
    )
    model.config.use_cache = False
    if torch.cuda.is_available():  # one vision attention call per layer, not one per window (as served)
        from vla_node.backends.engine.vision_attention import use_block_attention

        use_block_attention(model)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # so checkpointed blocks see a grad-requiring input

    from training.trainable import LANGUAGE, TrainableError, freeze_all_but, lora_target_pattern, parts_to_train

    try:
        parts = parts_to_train(cfg)
        if cfg.finetuning_type == "lora" and cfg.adapter_name_or_path:
            model = _continue_adapter(model, cfg.adapter_name_or_path)
        elif cfg.finetuning_type == "lora":
            from peft import LoraConfig, get_peft_model

            language_regex = lora_target_regex(model, cfg.lora_target)[0] if LANGUAGE in parts else ""
            regex, matched = lora_target_pattern(model, cfg, language_regex)
            lora = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=regex,
                modules_to_save=_additional_targets(model, cfg.additional_target),
                use_dora=cfg.use_dora,
                use_rslora=cfg.use_rslora,
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = _trainable_in_fp32(get_peft_model(model, lora))
            log.info("LoRA r=%d alpha=%d on %d linear layers of the %s", cfg.lora_rank, cfg.lora_alpha,
                     len(matched), ", ".join(sorted(parts)))
        else:
            log.info("%s fine-tuning of: %s", cfg.finetuning_type, "; ".join(freeze_all_but(model, cfg)))
    except TrainableError as e:
        raise ConfigError(str(e)) from None
    asked = {t.strip() for t in (cfg.additional_target or "").split(",") if t.strip()}  # trained in full on purpose
    bad = [n for n, p in model.named_parameters() if p.requires_grad and cfg.finetuning_type == "lora"
           and _NOT_LANGUAGE.search(n) and not parts - {LANGUAGE} and not asked & set(n.split("."))]
    if bad:
        raise RuntimeError(f"LoRA reached modules outside the language model: {bad[:5]}")
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 leaves empty placeholders
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    log.info("trainable parameters: %d / %d (%.3f%%)", trainable, total, 100.0 * trainable / max(total, 1))
    return model


def _trainable_in_fp32(model):
    """LoRA weights train in fp32 even when the base is bf16 (the optimizer's updates would round away)."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _continue_adapter(model, adapter: str):
    """The adapter's own LoRA (rank, alpha, targets, modules_to_save) on this base, trainable."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, unknown target module
        raise ConfigError(f"adapter_name_or_path {adapter!r} does not fit the base {model.name_or_path!r}: "
                          f"{str(e).splitlines()[0]}") from None
    model = _trainable_in_fp32(model)
    lora = model.peft_config["default"]
    log.info("LoRA r=%d alpha=%d: training the adapter %s further", lora.r, lora.lora_alpha, adapter)
    return model


# ------------------------------------------------------------------------------------------------
# Trainer pieces
# ------------------------------------------------------------------------------------------------


def trainer_classes():
    """Defined lazily so `vla-train --help` does not import torch/transformers."""
    import torch
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        """Length-grouped order drawn from seed + epoch (set by the Trainer through set_epoch), so a
        resumed run sees the same batches as an uninterrupted one and DDP ranks agree."""

        def __init__(self, batch_size: int, lengths: list[int], seed: int):
            super().__init__(batch_size, lengths=lengths)
            self.seed = int(seed)
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            import torch

            self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return super().__iter__()

    class ThroughputCallback(TrainerCallback):
        """Measures training samples/s between two logs (time spent in evaluation excluded)."""

        def __init__(self) -> None:
            self._busy = 0.0
            self._t = None
            self._samples = 0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self._t is not None:
                self._busy += time.perf_counter() - self._t
                self._t = None
            self._samples += args.train_batch_size * args.gradient_accumulation_steps * args.world_size

        def take(self) -> float | None:
            """samples/s since the previous call."""
            if self._busy <= 0 or self._samples == 0:
                return None
            rate = self._samples / self._busy
            self._busy, self._samples = 0.0, 0
            return round(rate, 3)

    class LossProgressCallback(ProgressCallback):
        """Trainer's tqdm bar, with the latest loss and samples/s as its postfix."""

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                post = {"loss": f"{logs['loss']:.4f}"}
                if "samples_per_s" in logs:
                    post["samples/s"] = f"{logs['samples_per_s']:.1f}"
                self.training_bar.set_postfix(post, refresh=False)
            return super().on_log(args, state, control, logs=logs, **kw)

    class VLATrainer(Trainer):
        def __init__(self, *a, throughput: ThroughputCallback | None = None, fast_path=None, **kw):
            super().__init__(*a, **kw)
            self.throughput = throughput
            self.fast_path = fast_path  # training.fast_path.FastPath: its loss replaces the model call

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.fast_path is None:
                # no KV cache in training: the model's text config asks for one (generation wants it),
                # and building it every step is wasted work that, under torch_compile, also made
                # every layer recompile until dynamo's limit left it uncompiled (H100, session 31)
                return super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            loss = self.fast_path.loss(model, inputs)
            return (loss, {"loss": loss}) if return_outputs else loss

        def evaluate(self, *args, **kwargs):
            from training.compile_layers import uncompiled

            with uncompiled():  # with the greedy answers of on_evaluate: a few batches, not worth compiling
                return super().evaluate(*args, **kwargs)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            from training.shared_prefix import is_peft_model

            target = model if model is not None else self.model
            if is_peft_model(target) or self.is_fsdp_enabled or not full_weights_in(resume_from_checkpoint):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            # A checkpoint holds a Qwen-VL model under its original key names (visual.*, model.*):
            # the Trainer's plain load_state_dict would match none of the renamed weights and leave
            # them at their pre-resume values; from_pretrained maps the names back.
            log.info("loading the weights of %s", resume_from_checkpoint)
            saved = type(target).from_pretrained(resume_from_checkpoint, dtype=next(target.parameters()).dtype)
            target.load_state_dict(saved.state_dict(), strict=True)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self.throughput is not None and "loss" in logs:
                rate = self.throughput.take()
                if rate is not None:
                    logs["samples_per_s"] = rate
            super().log(logs, start_time)

        def _get_eval_sampler(self, eval_dataset):
            lengths = getattr(eval_dataset, "lengths", None)
            if lengths:  # known (exactly on the fast path, estimated otherwise): no encoding pass
                return LengthGroupedSampler(self.args.eval_batch_size, lengths=lengths,
                                            generator=torch.Generator().manual_seed(self.args.seed))
            return super()._get_eval_sampler(eval_dataset)

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            lengths = getattr(ds, "lengths", None)
            grouped = getattr(self.args, "train_sampling_strategy", None) == "group_by_length" or getattr(
                self.args, "group_by_length", False)  # the latter: transformers before train_sampling_strategy
            if grouped and lengths and all(lengths):
                return SeededLengthGroupedSampler(
                    self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths,
                    seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                )
            return super()._get_train_sampler(train_dataset)

    return VLATrainer, ThroughputCallback, LossProgressCallback


def checkpointing_kwargs(args_cls, enabled: bool) -> dict:
    """Activation (gradient) checkpointing under whichever name this transformers uses."""
    if not enabled:
        return {}
    name = "activation_checkpointing" if "activation_checkpointing" in args_cls.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def _sampling_kwargs(args_cls, group_by_length: bool) -> dict:
    if "train_sampling_strategy" in args_cls.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def _dataloader_workers(cfg: TrainConfig, fast_path: bool = False) -> int:
    """Explicit setting, else 0 on CPU (the cores are busy training) and min(4, cores - 1) on a GPU:
    with no worker the processor's image work runs between GPU steps, the GPU waiting. The fast
    path's batches are gathers on the device: no worker."""
    import torch

    if fast_path:
        return 0
    if cfg.dataloader_num_workers is not None:
        return cfg.dataloader_num_workers
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if torch.cuda.is_available() else 0


def training_args_for(cfg: TrainConfig, bf16: bool, has_eval: bool, fast_path: bool = False, fp16: bool = False):
    """The transformers TrainingArguments `vla-train` trains with (also benchmarks/train_throughput.py's arm)."""
    import torch
    from transformers import TrainingArguments

    from training.distributed import deepspeed_config

    workers = _dataloader_workers(cfg, fast_path)
    eval_strategy = cfg.eval_strategy or "steps"
    has_eval = has_eval and eval_strategy != "no"
    eval_steps = cfg.eval_steps or cfg.save_steps
    report = [r.strip() for r in cfg.report_to.split(",") if r.strip() and r.strip().lower() != "none"]
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy=eval_strategy if has_eval else "no",
        eval_steps=eval_steps if has_eval and eval_strategy == "steps" else None,
        prediction_loss_only=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not torch.cuda.is_available(),
        **checkpointing_kwargs(TrainingArguments, cfg.gradient_checkpointing),
        report_to=report or "none",
        remove_unused_columns=False,  # the collator's output is exactly the model's input
        **_sampling_kwargs(TrainingArguments, cfg.group_by_length),
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,  # no re-fork per epoch / eval
        dataloader_drop_last=cfg.dataloader_drop_last,
        dataloader_pin_memory=torch.cuda.is_available() and not fast_path,
        # the filter reads every step's loss back from the GPU (a sync a step): a small model's host
        # could then never queue the next step while the GPU works; a NaN loss shows in the log instead
        logging_nan_inf_filter=not fast_path,
        ddp_find_unused_parameters=False,  # frozen vision tower: no unused trainable parameters
        disable_tqdm=cfg.disable_tqdm,
        save_only_model=cfg.save_only_model,
        ddp_timeout=cfg.ddp_timeout,
        deepspeed=deepspeed_config(cfg.deepspeed),
    )


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    """Write the training (and eval) loss curve as a PNG; None if nothing was logged."""
    steps = [h["step"] for h in log_history if "loss" in h]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [h["loss"] for h in log_history if "loss" in h], label="train loss", lw=1.2)
    ev = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _final_metrics(log_history: list[dict], train_output, eval_metrics: dict | None, n_train: int) -> dict:
    losses = [h["loss"] for h in log_history if "loss" in h]
    m: dict[str, Any] = {
        "global_step": int(train_output.global_step),
        "train_samples": n_train,
        "train_loss": float(train_output.training_loss),
        "final_logged_loss": float(losses[-1]) if losses else None,
    }
    for k in ("train_runtime", "train_samples_per_second", "epoch"):
        if k in train_output.metrics:
            m[k] = float(train_output.metrics[k])
    if eval_metrics and "eval_loss" in eval_metrics:
        m["eval_loss"] = float(eval_metrics["eval_loss"])
    return {k: v for k, v in m.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

# what a finished run leaves in output_dir (LLaMA-Factory's rule reads the same files)
_TRAINED_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
                  "pytorch_model.bin")


def prompt_template_for(cfg: TrainConfig) -> str:
    """The prompt template this run trains with: prompt_template, else the base model's. An adapter
    must use its base's (the node prompts a model as its manifest says, and refuses an adapter
    trained otherwise); full fine-tuning makes a new model and may choose."""
    from vla_node.manifest import ManifestError, prompt_template_of
    from vla_node.prompt import template_id

    try:
        base = prompt_template_of(cfg.model_path)
    except ManifestError as e:
        raise ConfigError(str(e)) from None
    chosen = template_id(cfg.prompt_template) if cfg.prompt_template else base
    if chosen != base and cfg.finetuning_type != "full":
        raise ConfigError(f"prompt_template {cfg.prompt_template} ({chosen}) differs from the one {cfg.model_path} was "
                          f"trained with ({base}): the node would refuse the adapter; leave prompt_template unset, "
                          "or use finetuning_type full")
    return chosen


def coordinate_convention_for_run(cfg: TrainConfig) -> str:
    """The box convention this run's data is written in: coordinate_convention, else the base model's. An
    adapter must answer as its base does (the node refuses one that does not)."""
    from vla_node.manifest import ManifestError, coordinate_convention_of

    try:
        base = coordinate_convention_of(cfg.model_path)
    except (ManifestError, OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    chosen = cfg.coordinate_convention or base
    if chosen != base and cfg.finetuning_type != "full":
        raise ConfigError(f"coordinate_convention {chosen} differs from the one {cfg.model_path} answers in ({base}): "
                          "the node would refuse the adapter; leave coordinate_convention unset, or use "
                          "finetuning_type full")
    return chosen


def full_weights_in(checkpoint: str) -> bool:
    """A checkpoint with a whole model's weights (not an adapter's, not DeepSpeed's partitions only)."""
    folder = Path(checkpoint)
    return any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def resume_point(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from: the one asked for, or (LLaMA-Factory's rule) the last one in an
    existing output_dir unless overwrite_output_dir; an output_dir holding a finished model and no
    checkpoint is an error then."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.output_dir)
    resume = cfg.resume_path()
    if resume == "latest":
        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            log.warning("resume_from_checkpoint=true but no checkpoint in %s: starting fresh", out)
    elif resume is not None and not Path(resume).is_dir():
        raise ConfigError(f"resume_from_checkpoint: {resume} is not a directory")
    elif resume is None and out.is_dir() and not cfg.overwrite_output_dir:
        resume = get_last_checkpoint(str(out))
        if resume is None and any((out / name).is_file() for name in _TRAINED_FILES):
            raise ConfigError(f"output_dir {out} holds a trained model already: set overwrite_output_dir=true "
                              "to train it again from the start, or choose another output_dir")
        if resume is not None:
            log.info("output_dir holds checkpoints: resuming from %s (overwrite_output_dir=true starts afresh)", resume)
            return resume
    if resume:
        log.info("resuming from %s", resume)
    return resume


def check_cutoff(cfg: TrainConfig, collator, samples: list) -> None:
    """Before the model loads: no prompt may fill cutoff_len on its own (an answer is cut to fit,
    a prompt cannot be: its image tokens would be cut)."""
    if cfg.cutoff_len is None:
        return
    over = [(s, n) for s in samples for n in [collator.estimate_length(s, with_answer=False)] if n >= cfg.cutoff_len - 1]
    if over:
        where = ", ".join(f"{s.source} ({n} tokens)" for s, n in over[:5])
        raise DataError(f"{len(over)} sample(s) have a prompt (images included) as long as cutoff_len="
                        f"{cfg.cutoff_len} or longer: {where}{' ...' if len(over) > 5 else ''}; raise cutoff_len or "
                        "lower image_max_pixels")


def check_template(cfg: TrainConfig) -> None:
    """LLaMA-Factory's ``template`` must be the one of the model's family (the checkpoint's own chat
    template renders the prompts, as it does at serving time)."""
    from training.llamafactory_keys import TEMPLATES
    from vla_node.manifest import read_json_object

    if cfg.template is None:
        return
    config = Path(cfg.model_path) / "config.json"
    if not config.is_file():
        return  # the model load reports the missing checkpoint
    model_type = read_json_object(config).get("model_type", "")
    if model_type not in TEMPLATES[cfg.template]:
        fitting = [t for t, families in TEMPLATES.items() if model_type in families]
        raise ConfigError(f"template {cfg.template!r} is not the chat template of {cfg.model_path} (a {model_type!r} "
                          f"model): use {' or '.join(fitting) if fitting else 'a Qwen-VL checkpoint'}")



# The settings the data train() reads and encodes depends on (besides the processor): a PreparedData
# made for other values than a run's own is refused.
DATA_SETTINGS = ("template", "vocabulary", "dataset_dir", "dataset", "eval_dataset", "media_dir", "max_samples",
                 "mix_strategy", "interleave_probs", "val_size", "seed", "cutoff_len", "skip_invalid",
                 "keep_dataset_system", "prompt_template", "image_min_pixels", "image_max_pixels", "fast_path",
                 "gradient_checkpointing", "deepspeed")


@dataclass
class PreparedData:
    """What train() reads and encodes before it loads a model (prepare_data). Made ahead, in a thread
    of its own, it lets a build encode the next training's data while the current one trains."""

    settings: dict  # DATA_SETTINGS' values it was made for
    processor_digest: str
    vocab: Any
    prompt: Any
    train_samples: list
    eval_samples: list | None
    dataset_sha: str
    processor: Any
    limits: Any
    collator: Any
    fast: Any  # training.fast_path.FastPath, or None: the ordinary path


def data_settings(cfg: TrainConfig) -> dict:
    return {key: getattr(cfg, key) for key in DATA_SETTINGS}


def processor_digest(processor) -> str:
    """What of a processor makes the encoded data: its tokenizer, image processing and chat template."""
    import hashlib

    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
             processor.image_processor.to_json_string(), str(getattr(processor, "chat_template", None))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def prepare_data(cfg: TrainConfig, place: bool = True) -> PreparedData:
    """train()'s data for ``cfg``: read, validated and (fast path) encoded. ``place=False`` keeps the
    encoded data in host memory (train() places it): what a thread beside another training makes.
    Sets no random seed, so such a thread leaves the other training's random streams alone."""
    from transformers import AutoProcessor

    from training.collate import VLACollator, pixel_limits_of, set_pixel_limits, system_differs
    from training.fast_path import prepare_fast_path
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    vocab = Vocabulary.load(cfg.vocabulary)
    prompt = PromptBuilder(vocab, template=prompt_template_for(cfg))

    # 1. data first: a broken dataset fails before the model is loaded
    train_samples, dataset_sha = load_split(cfg, cfg.datasets, vocab, "training")
    eval_samples = load_split(cfg, cfg.eval_datasets, vocab, "eval")[0] if cfg.eval_datasets else None
    if cfg.val_size and eval_samples:
        log.warning("val_size=%s ignored: eval_dataset %s is the eval data", cfg.val_size, cfg.eval_dataset)
    elif cfg.val_size:
        from training.mixing import hold_out

        try:
            train_samples, eval_samples = hold_out(train_samples, cfg.val_size, cfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    log.info("training samples: %d%s", len(train_samples),
             f", eval samples: {len(eval_samples)}" if eval_samples else "")

    # 2. processor (pixel limits fixed here, saved with the adapter) + collator
    processor = AutoProcessor.from_pretrained(cfg.model_path)
    limits = pixel_limits_of(processor, cfg.image_min_pixels, cfg.image_max_pixels)
    set_pixel_limits(processor, limits)
    collator = VLACollator(processor, prompt, limits, builder_system=not cfg.keep_dataset_system,
                           cutoff_len=cfg.cutoff_len)
    differ = sum(system_differs(s, prompt) for s in train_samples if getattr(s, "answer_kind", "") != "text")
    if differ and cfg.keep_dataset_system:
        log.warning("%d of %d training samples carry no or another system message than vla_node.prompt builds; "
                    "kept (keep_dataset_system=true), so the robot will prompt differently from training",
                    differ, len(train_samples))
    elif differ:
        log.info("%d of %d training samples carry no or another system message: replaced by vla_node.prompt's "
                 "(the one the robot sends); free-form samples keep their own", differ, len(train_samples))
    check_cutoff(cfg, collator, train_samples + (eval_samples or []))
    fast = prepare_fast_path(cfg, collator, train_samples, eval_samples, use_bf16(cfg),
                             world_size=int(os.environ.get("WORLD_SIZE", "1")), place=place)
    return PreparedData(data_settings(cfg), processor_digest(processor), vocab, prompt, train_samples, eval_samples,
                        dataset_sha, processor, limits, collator, fast)


def data_mismatch(cfg: TrainConfig, prepared: PreparedData) -> list[str]:
    """What differs between the data ``prepared`` was made for and ``cfg``'s: its data settings, and
    the processor of cfg.model_path (another folder holding the same processor is the same)."""
    from transformers import AutoProcessor

    from training.collate import pixel_limits_of, set_pixel_limits

    own = data_settings(cfg)
    differing = [f"{key}: {prepared.settings[key]!r} prepared, {own[key]!r} here" for key in DATA_SETTINGS
                 if prepared.settings[key] != own[key]]
    if not differing:
        processor = AutoProcessor.from_pretrained(cfg.model_path)
        set_pixel_limits(processor, pixel_limits_of(processor, cfg.image_min_pixels, cfg.image_max_pixels))
        if processor_digest(processor) != prepared.processor_digest:
            differing.append(f"the processor of {cfg.model_path}")
    return differing


def prepared_for(cfg: TrainConfig, prepared: PreparedData) -> PreparedData:
    """``prepared`` checked against ``cfg`` (data_mismatch: a ConfigError names what differs), with its
    encoded data placed for training."""
    from dataclasses import replace

    from training.fast_path import placed

    differing = data_mismatch(cfg, prepared)
    if differing:
        raise ConfigError("the data prepared ahead was made for other settings than this run's: "
                          + "; ".join(differing))
    if prepared.fast is not None:
        prepared.fast = replace(placed(prepared.fast), bf16=use_bf16(cfg))  # the host copy is let go
    return prepared


def train(cfg: TrainConfig, callbacks=(), on_data=None, prepared: PreparedData | None = None) -> TrainResult:
    """Run vla-train's training for ``cfg``. ``callbacks``: extra transformers TrainerCallbacks;
    ``on_data(processor, fast_path)``, if given, is called once the data is encoded and may return
    more callbacks (a build's own evaluations); ``prepared``: the data made ahead by prepare_data for
    the same data settings (checked)."""
    from training.distributed import deepspeed_config

    cfg.check_runnable()
    check_template(cfg)
    deepspeed_config(cfg.deepspeed)  # a missing file or package fails now, not after the data
    resume = resume_point(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import set_seed

    from training.collate import EncodedDataset
    from vla_node.manifest import make_manifest, write_manifest

    set_seed(cfg.seed)
    data = prepared_for(cfg, prepared) if prepared is not None else prepare_data(cfg)
    vocab, prompt, processor, limits, collator = data.vocab, data.prompt, data.processor, data.limits, data.collator
    train_samples, eval_samples, dataset_sha, fast = data.train_samples, data.eval_samples, data.dataset_sha, data.fast
    convention = coordinate_convention_for_run(cfg)
    bf16 = use_bf16(cfg)
    fp16 = use_fp16(cfg)
    if fast is not None:
        train_ds, eval_ds, data_collator = fast.train_dataset, fast.eval_dataset, fast.builder
    else:
        train_ds = EncodedDataset(train_samples, collator, compute_lengths=cfg.group_by_length)
        # lengths for the eval sampler too: transformers' own would look for pixel_values in each
        # sample, which a text-only (free-form) sample does not have
        eval_ds = EncodedDataset(eval_samples, collator, compute_lengths=cfg.group_by_length) if eval_samples else None
        data_collator = collator

    # 3. model (the training arguments first: with DeepSpeed ZeRO-3 they make the model load partitioned)
    args = training_args_for(cfg, bf16, eval_ds is not None, fast_path=fast is not None, fp16=fp16)
    model = build_model(cfg, bf16)
    if cfg.torch_compile:
        from training.compile_layers import compile_layers

        compile_layers(model, cfg.torch_compile_backend)

    # 4. trainer
    VLATrainer, ThroughputCallback, LossProgressCallback = trainer_classes()
    from transformers.trainer_callback import ProgressCallback

    if args.n_gpu > 1:
        # Without torchrun/accelerate the Trainer would fall back to nn.DataParallel, whose
        # replicas break Qwen-VL's vision dtype lookup; DDP is the supported multi-GPU path.
        log.warning("%d GPUs visible but no distributed launch: training on one GPU. For all of them: "
                    "torchrun --nproc_per_node %d -m training.train CONFIG.yaml", args.n_gpu, args.n_gpu)
        args._n_gpu = 1
    throughput = ThroughputCallback()
    trainer = VLATrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=data_collator,
        processing_class=processor,
        callbacks=[throughput, *callbacks, *((on_data(processor, fast) or ()) if on_data else ())],
        throughput=throughput,
        fast_path=fast,
    )
    if not cfg.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgressCallback)

    train_output = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None

    # 5. save adapter/model + processor + manifest (rank 0 only)
    out = Path(cfg.output_dir)
    trainer.save_model(str(out))  # PEFT adapter (adapter_config.json + safetensors) or full model, + processor
    metrics = _final_metrics(trainer.state.log_history, train_output, eval_metrics, len(train_samples))
    manifest_path = None
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(out))
        manifest = make_manifest(
            cfg.model_path,
            min_pixels=limits.min_pixels,
            max_pixels=limits.max_pixels,
            vocabulary_version=vocab.version,
            vocabulary_fingerprint=vocab.fingerprint(),
            dataset_sha256=dataset_sha,
            metrics=metrics,
            template=prompt.template,
            answers=answer_kinds_of(train_samples),
            coordinate_convention=convention,
        )
        manifest_path = write_manifest(out, manifest)
        trainer.save_metrics("train", metrics)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False) + "\n")
        if cfg.plot_loss:
            png = plot_loss(trainer.state.log_history, out / LOSS_CURVE)
            if png:
                log.info("loss curve: %s", png)
        log.info("saved %s to %s (step %d, train_loss %.4f)",
                 "LoRA adapter" if cfg.finetuning_type == "lora" else "model", out,
                 train_output.global_step, train_output.training_loss)
    return TrainResult(out, int(trainer.state.global_step), metrics, list(trainer.state.log_history), manifest_path)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Fine-tune a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint on ShareGPT (LLaMA-Factory format) data
with LoRA on the language model (or full fine-tuning), using transformers' Trainer.

The dataset is validated first; any invalid sample stops the run before the model is loaded
(listing file:line of each) unless skip_invalid=true. Prompts come from vla_node.prompt, the same
builder the robot uses. Runs unchanged under `accelerate launch` or `torchrun` (DDP).

Writes to output_dir: checkpoint-N/ (resumable), runs/ (TensorBoard), loss_curve.png,
train_results.json, and the final adapter (adapter_config.json + adapter_model.safetensors) or
full model, the processor, and vla_manifest.json."""

EPILOG = "examples:\n  vla-train training/configs/tiny_cpu.yaml\n" \
         "  vla-train training/configs/qwen2_5_vl_3b_lora.yaml learning_rate=5e-5 max_steps=2000\n" \
         "  vla-train my.yaml resume_from_checkpoint=true\n" \
         "  accelerate launch -m training.train my.yaml   # multi-GPU DDP\n\nconfig keys:\n"


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vla-train",
        description=DESCRIPTION,
        epilog=EPILOG + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML file of config keys (see below)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key, e.g. max_steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--check-data", action="store_true", help="validate the dataset(s) and exit (no model load)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
            return 0
        if args.check_data:
            from vla_node.vocabulary import Vocabulary

            vocab = Vocabulary.load(cfg.vocabulary)
            samples, sha = load_split(cfg, cfg.datasets, vocab, "training")
            print(f"training: {len(samples)} valid sample(s), sha256 {sha}")
            if cfg.eval_datasets:
                ev, esha = load_split(cfg, cfg.eval_datasets, vocab, "eval")
                print(f"eval: {len(ev)} valid sample(s), sha256 {esha}")
            return 0
        result = train(cfg)
    except ConfigError as e:
        print(f"vla-train: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"vla-train: {e}", file=sys.stderr)
        return 1
    finally:
        _end_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"output_dir": str(result.output_dir), **result.metrics}, ensure_ascii=False))
    return 0


def _end_distributed() -> None:
    """Close the process group torchrun/accelerate opened (Trainer leaves it open)."""
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
