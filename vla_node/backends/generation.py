"""Greedy generation with transformers, as the plain path and the engine both run it.

The loaded model's handle, ``generate``'s configuration (greedy, our stop tokens, logits returned
for the confidence), its stop-on-event criterion and grammar processor, and the answer's tokens
and confidence read from its output. TransformersBackend's plain path is ``model.generate`` with
these; the engine (vla_node/backends/engine/) uses the same pieces where it still calls
``generate``, so both choose the same tokens.
"""
from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass

__all__ = ["LoadedModel", "Tokens", "StopOnEvent", "greedy_config", "generate_kwargs", "confidence",
           "tokens_of", "on_device"]


@dataclass(frozen=True)
class LoadedModel:
    """A Qwen-VL model as TransformersBackend loaded it (LoRA layers are injected into ``model``
    in place; it is never replaced), its processor, and the ids generation stops and pads with."""

    model: object  # the transformers ...ForConditionalGeneration
    processor: object
    device: object  # torch.device
    dtype: object  # torch.dtype
    eos_ids: tuple[int, ...]
    pad_id: int


@dataclass
class Tokens:
    """A generated answer: its token ids and confidence (geometric mean probability of the choices)."""

    ids: list[int]
    confidence: float


class StopOnEvent:
    """StoppingCriteria: stop every sequence once ``event`` is set (checked after each token)."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.triggered = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = self.event.is_set()
        self.triggered = self.triggered or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def greedy_config(loaded: LoadedModel, max_new_tokens: int):
    """Greedy decoding, our stop tokens, logits returned (for the confidence); the KV cache is the
    caller's (a prefix-seeded or static one) or generate's own DynamicCache."""
    gc = copy.deepcopy(loaded.model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    gc.max_new_tokens = max_new_tokens
    gc.max_length = None
    gc.eos_token_id = list(loaded.eos_ids)
    gc.pad_token_id = loaded.pad_id
    gc.output_logits = True
    gc.output_scores = False
    gc.return_dict_in_generate = True
    gc.cache_implementation = None
    return gc


def generate_kwargs(stop_event, constraint, first_token=None) -> tuple[dict, StopOnEvent | None]:
    """``generate``'s stopping criteria and logits processors for a stop event, a grammar
    processor and a first-token rule (vla_node.clarify_threshold's processor, which sees the raw
    scores before the grammar masks them; any may be None), and the stop criterion."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    kwargs, stop_check = {}, None
    if stop_event is not None:
        stop_check = StopOnEvent(stop_event)
        kwargs["stopping_criteria"] = StoppingCriteriaList([stop_check])
    processors = [processor for processor in (first_token, constraint) if processor is not None]
    if processors:
        kwargs["logits_processor"] = LogitsProcessorList(processors)
    return kwargs, stop_check


def confidence(logits, new_ids: list[int], row: int = 0) -> float:
    """Geometric mean probability of the chosen tokens: one log_softmax over all steps and one
    host transfer (not one per token)."""
    import torch

    if not new_ids:
        return 1.0
    steps = torch.stack([logits[i][row] for i in range(len(new_ids))]).float()
    chosen = torch.tensor(new_ids, device=steps.device).unsqueeze(1)
    mean_logp = float(torch.log_softmax(steps, dim=-1).gather(1, chosen).mean())
    return min(1.0, max(math.exp(mean_logp), 1e-12))


def tokens_of(out, prompt_len: int) -> Tokens:
    """The answer of a one-prompt ``generate`` (output with logits), right padding dropped."""
    logits = out.logits or ()
    new_ids = out.sequences[0, prompt_len:].tolist()
    new_ids = new_ids[:min(len(new_ids), len(logits))]  # (batch of 1: no padding after an early end)
    return Tokens(new_ids, confidence(logits, new_ids))


def on_device(inputs, device, dtype) -> dict:
    """A processor's tensors on ``device``, floating ones in ``dtype``."""
    import torch

    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        out[name] = value
    return out
