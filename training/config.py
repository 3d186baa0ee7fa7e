"""TrainConfig: every knob of `vla-train`, loaded from YAML with `key=value` command-line overrides.

The YAML keys are the field names below. They follow LLaMA-Factory where a name exists there
(`dataset`, `eval_dataset`, `dataset_dir`, `finetuning_type`, `lora_rank`, `lora_target`,
`image_min_pixels`, ...), so its example configs translate line by line; `model_name_or_path`
is accepted as an alias of `model_path`. Unknown keys are an error (with a suggestion), never
silently ignored.

    cfg = load_config("training/configs/tiny_cpu.yaml", ["max_steps=20", "learning_rate=5e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

__all__ = ["TrainConfig", "ConfigError", "load_config", "parse_overrides", "config_help"]

ALIASES = {"model_name_or_path": "model_path", "lora_r": "lora_rank"}


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    model_path: str = field(default="", metadata={"help": "base checkpoint directory (Qwen2/2.5/3-VL)"})
    finetuning_type: str = field(default="lora", metadata={"help": "lora | full"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
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
    freeze_vision_tower: bool = field(default=True, metadata={"help": "freeze the vision encoder (full mode)"})
    freeze_multi_modal_projector: bool = field(default=True, metadata={"help": "freeze the merger/projector (full mode)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    vocabulary: Optional[str] = field(default=None, metadata={"help": "actions.yaml (default: the packaged one)"})
    # --- data --------------------------------------------------------------------------------
    dataset_dir: str = field(default="data", metadata={"help": "folder of dataset_info.json and the data files"})
    dataset: str = field(default="", metadata={"help": "comma list of dataset names (dataset_info.json) or file paths"})
    eval_dataset: Optional[str] = field(default=None, metadata={"help": "names/paths of the validation split"})
    max_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N training samples"})
    skip_invalid: bool = field(default=False, metadata={"help": "drop invalid samples (counted) instead of failing"})
    max_errors_shown: int = field(default=50, metadata={"help": "how many dataset errors to list before stopping"})
    keep_dataset_system: bool = field(
        default=False,
        metadata={"help": "keep each sample's own system message instead of vla_node.prompt's (serving) one"},
    )
    image_min_pixels: Optional[int] = field(default=None, metadata={"help": "min pixels per image (default: processor's)"})
    image_max_pixels: Optional[int] = field(default=None, metadata={"help": "max pixels per image (default: processor's)"})
    group_by_length: bool = field(default=True, metadata={"help": "batch samples of similar length together"})
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
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine | linear | constant | ..."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps for linear warmup"})
    seed: int = field(default=42, metadata={"help": "random seed (model init of LoRA, data order)"})
    bf16: str = field(default="auto", metadata={"help": "auto (bf16 on a GPU that supports it, else fp32) | true | false"})
    # --- bookkeeping ---------------------------------------------------------------------------
    logging_steps: int = field(default=10, metadata={"help": "log loss/lr/samples-per-s every N steps"})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "eval loss every N steps (default: at save_steps)"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: Optional[int] = field(default=3, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "checkpoint dir, or 'true' for the latest in output_dir"}
    )
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none | comma list"})
    plot_loss: bool = field(default=True, metadata={"help": "write loss_curve.png at the end"})
    disable_tqdm: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        errs = []
        if self.finetuning_type not in ("lora", "full"):
            errs.append(f"finetuning_type must be 'lora' or 'full', not {self.finetuning_type!r}")
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
        if str(self.fast_path).lower() not in ("auto", "true", "false"):
            errs.append(f"fast_path must be auto, true or false, not {self.fast_path!r}")
        if str(self.bf16).lower() not in ("auto", "true", "false"):
            errs.append(f"bf16 must be auto, true or false, not {self.bf16!r}")
        if self.image_min_pixels is not None and self.image_max_pixels is not None:
            if self.image_min_pixels > self.image_max_pixels:
                errs.append("image_min_pixels must be <= image_max_pixels")
        if errs:
            raise ConfigError("; ".join(errs))

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


def _canonical_key(key: str) -> str:
    key = key.strip().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    return key


def parse_overrides(items: list[str] | None) -> dict:
    """['max_steps=20', 'dataset=a,b'] -> {'max_steps': 20, 'dataset': 'a,b'} (YAML-typed values)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        k = _canonical_key(k)
        try:
            parsed = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            parsed = v
        # keep strings the YAML parser would mangle (e.g. 'a,b' is fine; dates/octal are not wanted)
        if isinstance(parsed, (dict,)) or (parsed is not None and not isinstance(parsed, (str, int, float, bool, list))):
            parsed = v
        out[k] = parsed
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML mapping) then apply ``key=value`` overrides; relative paths in the YAML
    stay relative to the current directory (like LLaMA-Factory)."""
    raw: dict = {}
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
        for k, v in data.items():
            try:
                raw[_canonical_key(str(k))] = v
            except ConfigError as e:
                raise ConfigError(f"{p}: {e}") from None
    raw.update(parse_overrides(overrides))
    values = {k: _coerce(k, v) for k, v in raw.items()}
    return TrainConfig(**values)


def config_help() -> str:
    """One line per key (name, default, help) for `vla-train --help`."""
    lines = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  {f.name} (default: {default}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
