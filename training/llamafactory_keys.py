"""LLaMA-Factory's SFT config keys as `vla-train` reads them: renamed, accepted without effect, or refused.

A LLaMA-Factory YAML (`examples/train_lora/*.yaml`, `examples/train_full/*.yaml`) runs through
`vla-train` as it is. Every key falls in one of four groups:

- a TrainConfig field of the same name (most keys: `lora_rank`, `cutoff_len`, `deepspeed`, ...);
- RENAMED: another name (or value) of a field (`model_name_or_path` -> `model_path`,
  `flash_attn: fa2` -> `attn_implementation: flash_attention_2`, ...);
- NO_EFFECT: meaningless here; accepted with one log line saying why (`trust_remote_code`, ...);
- UNSUPPORTED: a LLaMA-Factory key this trainer cannot honour; an error saying what to do instead.

Anything else is an unknown key: an error with the closest known key as a suggestion. All bad
keys of one run are reported together (:func:`sort_keys`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

__all__ = ["RENAMED", "NO_EFFECT", "UNSUPPORTED", "SortedKeys", "sort_keys", "STAGES", "TEMPLATES"]

# key -> (field, value translation or None)
_FLASH_ATTN = {"auto": "sdpa", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
               "fa3": "flash_attention_3"}


def _flash_attn(value: Any) -> Any:
    text = str(value).strip().lower()
    if text not in _FLASH_ATTN:
        raise ValueError(f"flash_attn must be one of {', '.join(_FLASH_ATTN)}, not {value!r}")
    return _FLASH_ATTN[text]


def _not(value: Any) -> Any:
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text in ("false", "0", "no")


RENAMED: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "model_name_or_path": ("model_path", None),
    "lora_r": ("lora_rank", None),
    "evaluation_strategy": ("eval_strategy", None),  # transformers' old name
    "flash_attn": ("attn_implementation", _flash_attn),
    # LLaMA-Factory checkpoints activations unless told not to; vla-train only when asked
    "disable_gradient_checkpointing": ("gradient_checkpointing", _not),
}

_NO_VIDEO = "no video or audio is trained (the node serves single camera frames; such a column is refused)"
NO_EFFECT: dict[str, str] = {
    "trust_remote_code": "Qwen-VL loads with transformers' own classes, no remote code runs",
    "overwrite_cache": "no tokenised cache is written: samples are encoded on the fly",
    "video_max_pixels": _NO_VIDEO,
    "video_min_pixels": _NO_VIDEO,
    "video_fps": _NO_VIDEO,
    "video_maxlen": _NO_VIDEO,
    "use_audio_in_video": _NO_VIDEO,
    "audio_sampling_rate": _NO_VIDEO,
    "use_fast_tokenizer": "the checkpoint's tokenizer.json (a fast tokenizer) is always used",
    "upcast_layernorm": "trainable weights train in float32 already",
    "do_eval": "evaluation runs when there is eval data (eval_dataset or val_size); see eval_strategy",
    "ignore_pad_token_for_loss": "padding is never a training target",
    "mask_history": "vla-train always trains on the last assistant turn (earlier turns are context)",
}

_EVAL = "score a model or adapter with vla-eval (--model, --adapter, --dataset-dir, --dataset, --out)"
UNSUPPORTED: dict[str, str] = {
    "do_predict": f"prediction is a separate command: {_EVAL}",
    "predict_with_generate": _EVAL,
    "compute_accuracy": "the eval loss is logged; for answer quality run vla-eval",
    "quantization_bit": "QLoRA is not supported: LoRA trains on a bf16 (GPU) or fp32 base",
    "quantization_method": "QLoRA is not supported: LoRA trains on a bf16 (GPU) or fp32 base",
    "double_quantization": "QLoRA is not supported: LoRA trains on a bf16 (GPU) or fp32 base",
    "packing": "samples are not packed (one conversation per sequence)",
    "neat_packing": "samples are not packed (one conversation per sequence)",
    "streaming": "datasets are read whole (and validated) before training",
    "tokenized_path": "no tokenised cache: samples are encoded on the fly",
    "train_on_prompt": "only answers are training targets",
    "use_unsloth": "the Trainer runs the transformers model as it is",
    "enable_liger_kernel": "the Trainer runs the transformers model as it is",
    "use_llama_pro": "finetuning_type: freeze trains the last freeze_trainable_layers layers, no expanded model",
    "pissa_init": "LoRA starts as peft initialises it (use_dora and use_rslora are read)",
    "pissa_convert": "LoRA starts as peft initialises it",
    "loraplus_lr_ratio": "all trainable weights share one learning_rate",
    "create_new_adapter": "each run trains one adapter: a new one, or adapter_name_or_path's further; to stack "
                          "adapters, merge the first (vla-export) and set model_path to the merged model",
    "resize_vocab": "the vocabulary is the checkpoint's; additional_target: embed_tokens trains the embeddings",
    "new_special_tokens": "the tokenizer is the checkpoint's",
    "export_dir": "merging and export is a separate command: vla-export",
    "infer_backend": "inference is the robot node's (or vla-eval's), not vla-train's",
    "rope_scaling": "positions are the checkpoint's (rope_scaling in its config.json)",
    "shift_attn": "attention is the model's own (attn_implementation)",
    "neftune_noise_alpha": "no noise is added to the embeddings",
    "pref_beta": "preference training is not supported (stage: sft only)",
    "pref_loss": "preference training is not supported (stage: sft only)",
    "num_samples": "a dataset_info.json key, not a config key (and not read): use max_samples",
}

# stage -> why not (LLaMA-Factory's stages)
STAGES: dict[str, str] = {
    "sft": "",
    "pt": "pre-training on raw text has no counterpart here (the node answers commands about images)",
    "rm": "reward models are not trained here",
    "ppo": "PPO (RLHF) is not supported",
    "dpo": "DPO preference training is not supported",
    "kto": "KTO preference training is not supported",
}

# LLaMA-Factory template name -> the model families (config.json model_type) it formats
TEMPLATES: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("qwen2_vl", "qwen2_5_vl"),
    "qwen3_vl": ("qwen3_vl",),
    "qwen3_vl_nothink": ("qwen3_vl",),
}


@dataclass
class SortedKeys:
    """The outcome of :func:`sort_keys`: field values, one line per key without effect, and every problem."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def sort_keys(items: Iterable[tuple[str, Any, str]], fields: Iterable[str]) -> SortedKeys:
    """Sort ``(key, value, where)`` items (``where``: the YAML file or "command line") into field values,
    notes and problems. Later items win over earlier ones (command line after the YAML)."""
    known = set(fields)
    out = SortedKeys()
    for raw_key, value, where in items:
        if str(raw_key).strip() == "stage" and STAGES.get(str(value).strip().lower()):
            # before the keys of that stage, which would otherwise be all the user reads about
            out.problems.insert(0, f"{where}: stage {value!r} is not supported: {STAGES[str(value).strip().lower()]}; "
                                   "vla-train does supervised fine-tuning only (stage: sft)")
        key = str(raw_key).strip().replace("-", "_")
        if key in known:
            out.values[key] = value
        elif key in RENAMED:
            target, translate = RENAMED[key]
            try:
                out.values[target] = translate(value) if translate is not None else value
            except ValueError as e:
                out.problems.append(f"{where}: {key}: {e}")
        elif key in NO_EFFECT:
            out.notes.append(f"{where}: {key} has no effect here: {NO_EFFECT[key]}")
        elif key in UNSUPPORTED:
            out.problems.append(f"{where}: {key!r} (a LLaMA-Factory key) is not supported: {UNSUPPORTED[key]}")
        else:
            candidates = sorted(known | set(RENAMED) | set(NO_EFFECT))
            close = difflib.get_close_matches(key, candidates, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (vla-train --help lists every key)"
            out.problems.append(f"{where}: unknown config key {key!r}{hint}")
    return out
