"""Which weights of a Qwen-VL model train: LLaMA-Factory's freeze_* keys for LoRA, full and freeze tuning.

A Qwen-VL model has three parts: the vision tower (``visual``, without its merger), the projector
(``visual.merger``, Qwen3-VL's deepstack mergers too) and the language model (``language_model`` and
``lm_head``, as in LLaMA-Factory's composite-model keys: full tuning trains the output projection too;
an untied head left at its random init caps the logits and the loss). ``freeze_vision_tower`` (default true), ``freeze_multi_modal_projector``
(default true) and ``freeze_language_model`` (default false) pick the parts that train:

- lora:   LoRA on the linear layers of those parts (``lora_target``: all, or leaf names);
- full:   every weight of those parts;
- freeze: in the language model only the last ``freeze_trainable_layers`` decoder layers (negative:
          the first), their ``freeze_trainable_modules``, plus ``freeze_extra_modules``; the vision
          tower and projector as their flags say.
"""

from __future__ import annotations

import re

__all__ = ["VISION", "PROJECTOR", "LANGUAGE", "parts_to_train", "part_of", "lora_target_pattern",
           "freeze_all_but"]

VISION, PROJECTOR, LANGUAGE = "vision tower", "projector", "language model"
_PROJECTOR = re.compile(r"(^|\.)(merger|deepstack_merger_list|multi_modal_projector)(\.|$)")
_VISION = re.compile(r"(^|\.)(visual|vision_tower|vision_model)(\.|$)")
_LANGUAGE = re.compile(r"(^|\.)(language_model|lm_head)(\.|$)")


class TrainableError(ValueError):
    """The config asks for weights the model does not have, or for none at all."""


def parts_to_train(cfg) -> set[str]:
    parts = set()
    if not cfg.freeze_vision_tower:
        parts.add(VISION)
    if not cfg.freeze_multi_modal_projector:
        parts.add(PROJECTOR)
    if not cfg.freeze_language_model:
        parts.add(LANGUAGE)
    if not parts:
        raise TrainableError("freeze_vision_tower, freeze_multi_modal_projector and freeze_language_model "
                             "freeze everything: nothing would train")
    return parts


def part_of(name: str) -> str | None:
    """The part a parameter or module name belongs to (None: none of the three)."""
    if _PROJECTOR.search(name):
        return PROJECTOR
    if _VISION.search(name):
        return VISION
    if _LANGUAGE.search(name):
        return LANGUAGE
    return None


def lora_target_pattern(model, cfg, language_regex: str) -> tuple[str, list[str]]:
    """A PEFT ``target_modules`` regex for LoRA on the parts ``cfg`` trains, and the module names it
    matches. ``language_regex`` is the language model's (training.train.lora_target_regex)."""
    import torch.nn as nn

    parts = parts_to_train(cfg)
    wanted = None if cfg.lora_target.strip().lower() == "all" else \
        {t.strip() for t in cfg.lora_target.split(",") if t.strip()}
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and part_of(n) in parts - {LANGUAGE}
              and (wanted is None or n.rsplit(".", 1)[-1] in wanted)]
    alternatives = ([language_regex] if LANGUAGE in parts else []) + [re.escape(n) for n in others]
    if not alternatives:
        raise TrainableError(f"lora_target {cfg.lora_target!r} matches no linear layer of the "
                             f"{', '.join(sorted(parts))}")
    regex = "(?:" + "|".join(alternatives) + ")"
    matched = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]
    return regex, matched


def freeze_all_but(model, cfg) -> list[str]:
    """Full or freeze tuning: set requires_grad on the weights ``cfg`` trains; return what trains,
    as readable patterns for the log."""
    parts = parts_to_train(cfg)
    keep: list[str] = []
    layer_rule = None
    if cfg.finetuning_type == "freeze" and LANGUAGE in parts:
        layer_rule = _freeze_tuning_rule(model, cfg)
        keep += layer_rule.describe()
    keep += [p for p in (VISION, PROJECTOR) if p in parts]
    if cfg.finetuning_type == "full" and LANGUAGE in parts:
        keep.append(LANGUAGE)
    for name, param in model.named_parameters():
        part = part_of(name)
        if part == LANGUAGE and layer_rule is not None:
            train = layer_rule.trains(name)
        else:
            train = part in parts
        param.requires_grad_(bool(train))
    return keep


class _LayerRule:
    def __init__(self, layer_ids: list[int], modules: list[str] | None, extra: list[str]):
        self.layer_ids = set(layer_ids)
        self.modules = modules  # None: every module of those layers
        self.extra = extra

    def trains(self, name: str) -> bool:
        m = re.search(r"\.layers\.(\d+)\.([^.]+)", name)
        if m:
            return int(m.group(1)) in self.layer_ids and (self.modules is None or m.group(2) in self.modules)
        return any(f".{e}." in f".{name}." for e in self.extra)

    def describe(self) -> list[str]:
        layers = ",".join(str(i) for i in sorted(self.layer_ids))
        return [f"language layers {layers} ({'all modules' if self.modules is None else ', '.join(self.modules)})"] \
            + self.extra


def _freeze_tuning_rule(model, cfg) -> _LayerRule:
    config = getattr(model.config, "text_config", model.config)
    num_layers = int(config.num_hidden_layers)
    n = int(cfg.freeze_trainable_layers)
    ids = list(range(max(0, num_layers - n), num_layers)) if n > 0 else list(range(min(-n, num_layers)))
    names = [name for name, _ in model.named_parameters() if part_of(name) == LANGUAGE]
    in_layers = {m.group(1) for m in (re.search(r"\.layers\.\d+\.([^.]+)", n) for n in names) if m}
    outside = {n.rsplit(".", 2)[-2] for n in names if not re.search(r"\.layers\.\d+\.", n)}
    modules = None
    if cfg.freeze_trainable_modules.strip().lower() != "all":
        modules = [m.strip() for m in cfg.freeze_trainable_modules.split(",") if m.strip()]
        unknown = [m for m in modules if m not in in_layers]
        if unknown:
            raise TrainableError(f"freeze_trainable_modules {unknown} are not modules of a decoder layer "
                                 f"({', '.join(sorted(in_layers))})")
    extra = [m.strip() for m in (cfg.freeze_extra_modules or "").split(",") if m.strip()]
    unknown = [m for m in extra if m not in outside]
    if unknown:
        raise TrainableError(f"freeze_extra_modules {unknown} are not language-model modules outside the "
                             f"layers ({', '.join(sorted(outside))})")
    return _LayerRule(ids, modules, extra)
