"""TrainConfig: every knob of `vla-train`, loaded from YAML with `key=value` command-line overrides.

The YAML keys are the field names below. They are LLaMA-Factory's names with LLaMA-Factory's
meaning (`dataset`, `cutoff_len`, `finetuning_type`, `lora_rank`, `val_size`, `deepspeed`, ...), so
its SFT example configs run as they are; its other names and its keys without meaning here are
sorted by training.llamafactory_keys. Unknown keys are an error (with a suggestion), all of a run's
reported at once, never silently ignored.

    cfg = load_config("training/configs/tiny_cpu.yaml", ["max_steps=20", "learning_rate=5e-4"])
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from training.llamafactory_keys import STAGES, TEMPLATES, sort_keys

__all__ = ["TrainConfig", "ConfigError", "load_config", "parse_overrides", "config_help"]

log = logging.getLogger("vla_train")
FINETUNING_TYPES = ("lora", "full", "freeze")
MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
EVAL_STRATEGIES = ("no", "steps", "epoch")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    model_path: str = field(default="", metadata={"help": "base checkpoint directory (Qwen2/2.5/3-VL)"})
    stage: str = field(default="sft", metadata={"help": "sft (the only training stage here; LLaMA-Factory's "
                                                        "pt, rm, ppo, dpo and kto are refused)"})
    do_train: bool = field(default=True, metadata={"help": "true (false: nothing to do; evaluate with vla-eval)"})
    template: Optional[str] = field(
        default=None,
        metadata={"help": "LLaMA-Factory chat template name, checked against the model family (qwen2_vl: "
                          "Qwen2-VL and Qwen2.5-VL; qwen3_vl, qwen3_vl_nothink: Qwen3-VL); the checkpoint's own "
                          "chat template renders the prompts"}
    )
    finetuning_type: str = field(
        default="lora",
        metadata={"help": "lora | full | freeze (freeze: only the last freeze_trainable_layers layers train)"}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "LoRA alpha (scale = alpha / rank); "
                                                                      "default 2 x lora_rank"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path"})
    lora_target: str = field(
        default="all",
        metadata={
            "help": "'all' = every nn.Linear of the language model (not the vision tower, not the "
            "merger/projector, not lm_head), or a comma list of module names such as 'q_proj,v_proj'"
        },
    )
    additional_target: Optional[str] = field(
        default=None,
        metadata={
            "help": "LoRA mode: comma list of modules trained in full and saved with the adapter "
            "(peft modules_to_save), e.g. 'embed_tokens' so an adapter can teach tokens the base never read"
        },
    )
    adapter_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "LoRA mode: a LoRA adapter folder (vla-train's or peft's) whose weights this run trains further "
            "instead of starting a new adapter, e.g. after the base was trained further; its rank, alpha, targets "
            "and modules_to_save are the adapter's own (lora_rank, lora_alpha, lora_target, additional_target "
            "are not read)"
        },
    )
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised LoRA scaling (alpha / sqrt(rank))"})
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "keep the vision encoder frozen (false: it trains too; with LoRA, LoRA "
                                        "goes on its linear layers)"})
    freeze_multi_modal_projector: bool = field(
        default=True, metadata={"help": "keep the merger/projector frozen (false: it trains too, as above)"})
    freeze_language_model: bool = field(
        default=False, metadata={"help": "keep the language model frozen (then the vision tower or projector "
                                         "must train)"})
    freeze_trainable_layers: int = field(
        default=2, metadata={"help": "finetuning_type freeze: the last N decoder layers train (negative: the "
                                     "first -N)"})
    freeze_trainable_modules: str = field(
        default="all", metadata={"help": "finetuning_type freeze: comma list of modules inside those layers "
                                         "(mlp, self_attn, ...) or all"})
    freeze_extra_modules: Optional[str] = field(
        default=None, metadata={"help": "finetuning_type freeze: comma list of modules outside the layers that "
                                        "train too (e.g. embed_tokens, norm)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    torch_compile: bool = field(default=False, metadata={
        "help": "compile each decoder layer and vision block with torch.compile (training/compile_layers.py: "
                "same loss; fewer, fused kernels per step; the first steps pay the compile time)"})
    torch_compile_backend: str = field(default="inductor", metadata={
        "help": "torch.compile backend for torch_compile (inductor; aot_eager traces without generating code)"})
    vocabulary: Optional[str] = field(default=None, metadata={"help": "actions.yaml (default: the packaged one)"})
    # --- data --------------------------------------------------------------------------------
    dataset_dir: str = field(default="data", metadata={"help": "folder of dataset_info.json and the data files"})
    dataset: str = field(
        default="",
        metadata={"help": "comma list of dataset names (dataset_info.json) or file paths; action and free-form "
                          "datasets may be mixed"})
    eval_dataset: Optional[str] = field(default=None, metadata={"help": "names/paths of the validation split"})
    media_dir: Optional[str] = field(default=None, metadata={"help": "folder relative image paths are read from "
                                                                     "(default: dataset_dir)"})
    max_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N samples of each dataset"})
    mix_strategy: str = field(
        default="concat",
        metadata={"help": "how several datasets are mixed: concat | interleave_under (until the first one runs "
                          "out) | interleave_over (until all ran out, the shorter repeating)"})
    interleave_probs: Optional[str] = field(
        default=None, metadata={"help": "interleave_*: comma list of sampling probabilities, one per dataset "
                                        "(default: in turn)"})
    val_size: float = field(
        default=0.0, metadata={"help": "hold out this fraction (< 1) or number (>= 1) of the training samples "
                                       "for eval, when there is no eval_dataset"})
    cutoff_len: Optional[int] = field(
        default=None,
        metadata={"help": "longest sequence in tokens (images included): longer answers are cut, a prompt that "
                          "alone is longer is an error (default: no limit)"})
    skip_invalid: bool = field(default=False, metadata={"help": "drop invalid samples (counted) instead of failing"})
    max_errors_shown: int = field(default=50, metadata={"help": "how many dataset errors to list before stopping"})
    keep_dataset_system: bool = field(
        default=False,
        metadata={"help": "keep each sample's own system message instead of vla_node.prompt's (serving) one"},
    )
    prompt_template: Optional[str] = field(
        default=None,
        metadata={"help": "full | compact: the system prompt action samples are trained with (compact: its first "
                          "sentence only, for a model that learns the action language from its data); recorded in "
                          "the manifest, and the node prompts the model the same way (default: the base model's, "
                          "full for a checkpoint without a vla_manifest.json)"},
    )
    coordinate_convention: Optional[str] = field(
        default=None,
        metadata={"help": "absolute_resized | normalized_1000: how the dataset's boxes are written (pixels of the "
                          "model's resized input, or 0-1000 of the frame); recorded in the manifest, and the node "
                          "reads the model's boxes the same way (default: the base model's, its family's native one "
                          "for a checkpoint without a vla_manifest.json)"},
    )
    image_min_pixels: Optional[int] = field(default=None, metadata={"help": "min pixels per image (default: processor's)"})
    image_max_pixels: Optional[int] = field(default=None, metadata={"help": "max pixels per image (default: processor's)"})
    # Off by default, as in transformers and LLaMA-Factory: in an action dataset an answer's length
    # follows its verb (STOP() is 6 tokens, a MOVE_OBJECT 35), so length-sorted batches each hold
    # one verb, and the model learns the batch's verb instead of reading the command.
    group_by_length: bool = field(default=False, metadata={
        "help": "batch samples of similar length together (less padding; off: with action answers it makes "
                "one-verb batches)"})
    preprocessing_num_workers: Optional[int] = field(
        default=None,
        metadata={"help": "processes that encode the dataset once for the fast path (default: cores - 1, at most 16)"},
    )
    fast_path: str = field(
        default="auto",
        metadata={"help": "auto | true | false: encode the data once into tensors kept on the device and compute "
                          "the prompt prefix every sample shares once per batch (training/fast_path.py; same loss); "
                          "auto = whenever the data allows (one same-size image per sample, one shared prefix, "
                          "one process), true = fail if it does not"},
    )
    dataloader_num_workers: Optional[int] = field(
        default=None,
        metadata={"help": "DataLoader worker processes (default: 0 on CPU; on a GPU min(4, cores - 1), so image "
                          "preprocessing overlaps the GPU step)"},
    )
    dataloader_drop_last: bool = field(
        default=False,
        metadata={"help": "drop each epoch's last, incomplete batch: every step has the same shape, so a "
                          "torch_compile run never compiles again for a smaller batch"},
    )
    # --- optimisation --------------------------------------------------------------------------
    output_dir: str = field(default="out/vla_lora", metadata={"help": "checkpoints, logs, final adapter/model"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; > 0 overrides num_train_epochs"})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "samples per device per micro-step"})
    per_device_eval_batch_size: int = field(default=2, metadata={"help": "samples per device for eval loss"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    deepspeed: Optional[str] = field(
        default=None,
        metadata={"help": "DeepSpeed JSON config (e.g. LLaMA-Factory's examples/deepspeed/ds_z2_config.json, "
                          "ds_z3_config.json), run by the Trainer's DeepSpeed integration; launch with "
                          "torchrun, deepspeed or accelerate"})
    ddp_timeout: int = field(default=1800, metadata={"help": "seconds a distributed collective may wait"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine | linear | constant | ..."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps for linear warmup"})
    seed: int = field(default=42, metadata={"help": "random seed (model init of LoRA, data order)"})
    bf16: str = field(default="auto", metadata={"help": "auto | true | false: bf16 where the GPU supports it; "
                                                        "true without such a GPU warns once and trains in fp32"})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision on a GPU (without one: a warning, "
                                                        "fp32)"})
    # --- bookkeeping ---------------------------------------------------------------------------
    logging_steps: int = field(default=10, metadata={"help": "log loss/lr/samples-per-s every N steps"})
    eval_strategy: Optional[str] = field(
        default=None, metadata={"help": "no | steps | epoch (default: steps when there is eval data, else no)"})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "eval loss every N steps (default: at save_steps)"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: Optional[int] = field(default=3, metadata={"help": "keep at most N checkpoints"})
    save_only_model: bool = field(
        default=False, metadata={"help": "checkpoints without optimizer state (smaller; cannot be resumed)"})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "checkpoint dir, or 'true' for the latest in output_dir (unset: "
                                        "the latest checkpoint in output_dir, as in LLaMA-Factory)"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in an output_dir that holds a previous run (else: "
                                         "resume its last checkpoint, or stop if it has none)"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none | comma list"})
    plot_loss: bool = field(default=True, metadata={"help": "write loss_curve.png at the end"})
    disable_tqdm: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        errs = []
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank  # LLaMA-Factory's default
        stage = str(self.stage).strip().lower()
        if stage not in STAGES:
            errs.append(f"stage {self.stage!r} is unknown (vla-train does supervised fine-tuning: stage: sft)")
        elif STAGES[stage]:
            errs.append(f"stage {self.stage!r} is not supported: {STAGES[stage]}; vla-train does supervised "
                        "fine-tuning only (stage: sft)")
        if not self.do_train:
            errs.append("do_train: false leaves nothing to do; to score a model or adapter run vla-eval")
        if self.template is not None and self.template not in TEMPLATES:
            errs.append(f"template {self.template!r} is not a Qwen-VL template (one of {', '.join(TEMPLATES)})")
        if self.finetuning_type not in FINETUNING_TYPES:
            errs.append(f"finetuning_type must be one of {', '.join(FINETUNING_TYPES)}, not {self.finetuning_type!r}")
        if self.mix_strategy not in MIX_STRATEGIES:
            errs.append(f"mix_strategy must be one of {', '.join(MIX_STRATEGIES)}, not {self.mix_strategy!r}")
        if self.eval_strategy is not None and self.eval_strategy not in EVAL_STRATEGIES:
            errs.append(f"eval_strategy must be one of {', '.join(EVAL_STRATEGIES)}, not {self.eval_strategy!r}")
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            errs.append(f"val_size must be a fraction in [0, 1) or a whole number of samples, not {self.val_size}")
        if self.cutoff_len is not None and self.cutoff_len < 2:
            errs.append(f"cutoff_len must be >= 2, not {self.cutoff_len}")
        if self.ddp_timeout < 1:
            errs.append(f"ddp_timeout must be >= 1, not {self.ddp_timeout}")
        if self.fp16 and str(self.bf16).lower() == "true":
            errs.append("bf16 and fp16 are both true: choose one")
        if self.adapter_name_or_path is not None:
            adapter = Path(self.adapter_name_or_path)
            if "," in str(self.adapter_name_or_path):
                errs.append(f"adapter_name_or_path {self.adapter_name_or_path!r}: one adapter only (to stack adapters, "
                            "merge the first with vla-export and set model_path to the merged model)")
            elif self.finetuning_type != "lora":
                errs.append(f"adapter_name_or_path needs finetuning_type: lora, not {self.finetuning_type!r}")
            elif not (adapter / "adapter_config.json").is_file():
                errs.append(f"adapter_name_or_path {str(adapter)!r}: no adapter_config.json there (not a LoRA adapter "
                            "folder)")
        if self.freeze_trainable_layers == 0:
            errs.append("freeze_trainable_layers must not be 0")
        for name in ("lora_rank", "lora_alpha", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "save_steps", "max_errors_shown"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 0:
            errs.append(f"preprocessing_num_workers must be >= 0, not {self.preprocessing_num_workers}")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            errs.append(f"dataloader_num_workers must be >= 0, not {self.dataloader_num_workers}")
        if not 0.0 <= self.lora_dropout < 1.0:
            errs.append(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            errs.append(f"warmup_ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.learning_rate <= 0:
            errs.append(f"learning_rate must be > 0, not {self.learning_rate}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            errs.append("set max_steps > 0 or num_train_epochs > 0")
        if self.eval_steps is not None and self.eval_steps < 1:
            errs.append(f"eval_steps must be >= 1, not {self.eval_steps}")
        if self.prompt_template is not None:
            from vla_node.prompt import template_id

            try:
                template_id(self.prompt_template)
            except ValueError as e:
                errs.append(str(e))
        if self.coordinate_convention is not None:
            from vla_node.manifest import COORDINATE_CONVENTIONS

            known = sorted(set(COORDINATE_CONVENTIONS.values()))
            if self.coordinate_convention not in known:
                errs.append(f"coordinate_convention must be one of {', '.join(known)}, not {self.coordinate_convention!r}")
        if str(self.fast_path).lower() not in ("auto", "true", "false"):
            errs.append(f"fast_path must be auto, true or false, not {self.fast_path!r}")
        if self.torch_compile:
            from training.compile_layers import backend_problem

            problem = backend_problem(self.torch_compile_backend)
            if problem:
                errs.append(problem)
        if str(self.bf16).lower() not in ("auto", "true", "false"):
            errs.append(f"bf16 must be auto, true or false, not {self.bf16!r}")
        if self.image_min_pixels is not None and self.image_max_pixels is not None:
            if self.image_min_pixels > self.image_max_pixels:
                errs.append("image_min_pixels must be <= image_max_pixels")
        if self.interleave_probs is not None:
            try:
                probs = self.mixing_probabilities
            except ValueError:
                errs.append(f"interleave_probs must be comma-separated numbers, not {self.interleave_probs!r}")
            else:
                if len(probs) != len(self.datasets) and self.datasets:
                    errs.append(f"interleave_probs has {len(probs)} value(s) for {len(self.datasets)} dataset(s)")
                if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
                    errs.append(f"interleave_probs must be >= 0 and sum to 1, not {self.interleave_probs!r}")
        if errs:
            raise ConfigError("; ".join(errs))

    @property
    def mixing_probabilities(self) -> list[float] | None:
        return [float(p) for p in _split(self.interleave_probs)] if self.interleave_probs is not None else None

    def check_runnable(self) -> None:
        """The fields a run needs (a config file may leave them to the command line)."""
        missing = [n for n in ("model_path", "dataset", "output_dir") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)} (set in the YAML or as key=value)")

    @property
    def datasets(self) -> list[str]:
        return _split(self.dataset)

    @property
    def eval_datasets(self) -> list[str]:
        return _split(self.eval_dataset)

    def resume_path(self) -> Optional[str]:
        """None, 'latest' (look in output_dir) or a checkpoint path."""
        v = self.resume_from_checkpoint
        if v is None or str(v).strip().lower() in ("", "false", "no", "none", "0"):
            return None
        if str(v).strip().lower() in ("true", "yes", "1", "latest"):
            return "latest"
        return str(v)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _split(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [str(x).strip() for x in v if str(x).strip()]
    return [s.strip() for s in str(v).split(",") if s.strip()]


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _base_type(tp: Any) -> Any:
    """int for Optional[int], etc."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is getattr(types, "UnionType")):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any) -> Any:
    tp = _base_type(_HINTS[key])
    optional = _HINTS[key] is not tp
    nullish = isinstance(value, str) and value.strip().lower() in ("null", "none", "~")
    if value is None or (nullish and (optional or tp is not str)):
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "yes", "1", "on"):
                return True
            if s in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            if isinstance(value, bool):
                return "true" if value else "false"
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    return value


def _yaml_value(text: str) -> Any:
    """A command-line value as YAML types it (numbers, booleans, lists), strings otherwise."""
    try:
        parsed = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    # keep strings the YAML parser would mangle (e.g. 'a,b' is fine; dates/octal are not wanted)
    if parsed is not None and not isinstance(parsed, (str, int, float, bool, list)):
        return text
    return parsed


def _override_items(items: list[str] | None) -> list[tuple[str, Any, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        out.append((k, _yaml_value(v), "command line"))
    return out


def _resolve(items: list[tuple[str, Any, str]]) -> dict:
    """Field values of ``items``; every bad key of them in one ConfigError; one log line per key
    accepted without effect."""
    sorted_keys = sort_keys(items, _FIELDS)
    if sorted_keys.problems:
        n = len(sorted_keys.problems)
        raise ConfigError(f"{n} bad config key{'s' if n != 1 else ''}:\n  " + "\n  ".join(sorted_keys.problems))
    for note in sorted_keys.notes:
        log.info("%s", note)
    return sorted_keys.values


def parse_overrides(items: list[str] | None) -> dict:
    """['max_steps=20', 'dataset=a,b'] -> {'max_steps': 20, 'dataset': 'a,b'} (YAML-typed values)."""
    return _resolve(_override_items(items))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML mapping) then apply ``key=value`` overrides; relative paths in the YAML
    stay relative to the current directory (like LLaMA-Factory)."""
    items: list[tuple[str, Any, str]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of key: value")
        items += [(str(k), v, str(p)) for k, v in data.items()]
    raw = _resolve(items + _override_items(overrides))
    values = {k: _coerce(k, v) for k, v in raw.items()}
    return TrainConfig(**values)


def config_help() -> str:
    """One line per key (name, default, help) for `vla-train --help`."""
    from training.llamafactory_keys import NO_EFFECT, RENAMED, UNSUPPORTED

    lines = [f"  LLaMA-Factory names also read: {', '.join(sorted(RENAMED))}",
             f"  accepted without effect (one log line each): {', '.join(sorted(NO_EFFECT))}",
             f"  refused with the reason: {', '.join(sorted(UNSUPPORTED))}", ""]
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  {f.name} (default: {default}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
