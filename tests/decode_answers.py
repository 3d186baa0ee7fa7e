"""Answers of a backend with the language-model head's logits of every call, and the comparison
static decoding must pass against transformers' generate loop (tests/test_static_decode.py,
tests/test_prefill_graph.py)."""
from __future__ import annotations

import pytest

from tests.fixtures_models import tiny_messages
from tests.stop_events import SetOnCheck
from vla_node.backends.base import GenerationRequest

COMMANDS = ("put the red cube in the blue bowl", "pick up the green ball")
NEW_TOKENS = 6


class StepLogits:
    """Records the language-model head's last-position logits of every call (prefill and steps)."""

    def __init__(self, backend):
        self.steps = []
        self._head = backend.base_model.get_output_embeddings()
        original = self._head.forward

        def recording(hidden):
            out = original(hidden)
            self.steps.append(out.reshape(-1, out.shape[-1])[-1].float().clone())
            return out

        self._head.forward = recording

    def take(self):
        import torch

        steps, self.steps = self.steps, []
        return torch.stack(steps) if steps else torch.empty(0, 0)  # replayed CUDA graphs run no Python

    def undo(self):
        del self._head.forward  # back to the class's method


def answers(backend, image, budget=NEW_TOKENS, stop_after=None, commands=COMMANDS):
    """(text, new tokens, confidence, per-step logits) per command."""
    logits = StepLogits(backend)
    out = []
    try:
        for command in commands:
            result = backend.generate(GenerationRequest(
                image=image, messages=tiny_messages(command), max_new_tokens=budget,
                stop_event=stop_after and SetOnCheck(stop_after)))
            out.append((result.text, result.new_tokens, result.confidence, logits.take()))
    finally:
        logits.undo()
    return out


def assert_same(static, dynamic):
    import torch

    assert len(static) == len(dynamic)
    for (text, count, confidence, logits), (text_d, count_d, confidence_d, logits_d) in zip(static, dynamic):
        assert (text, count) == (text_d, count_d)
        assert confidence == pytest.approx(confidence_d, rel=1e-5)
        assert logits.shape == logits_d.shape == (count, logits.shape[1])  # one head call per new token
        # float32 rounding of differently ordered sums: 1e-5 of the largest logit
        assert torch.allclose(logits, logits_d, rtol=0, atol=1e-5 * max(1.0, float(logits_d.abs().max())))
