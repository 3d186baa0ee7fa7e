"""End a free-text answer as soon as it can no longer be one of the few texts it is compared with.

The presence check (vla_node/presence_check.py) asks the counting question and only wants to know
whether the answer is exactly "no X is visible" (or the CLARIFY with that reason). A present thing's
answer ("1 blue cylinder is visible: [..]") runs to the question's token budget although its first
token already decided it: on a CPU that was ~20 decode steps per thing named, most of the check's
cost. ``AnswerChoicesStop`` is a constraint with the action grammar's processor interface, so every
decoding path takes it where it takes the grammar (transformers' ``generate`` as a logits
processor, the engine's static decoder and the onnx backend through ``next_bitmask``): while the
answer so far begins one of the choices, every token is allowed (the greedy answer is unchanged);
once it begins none, only the stop tokens are, so the answer ends at the next token. Which choice,
if any, the answer is comes out the same as without it.
"""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["AnswerChoicesStop"]

_UNFINISHED_CHARACTER = "\ufffd"  # a token that ends inside a multi-byte character decodes to this


class AnswerChoicesStop:
    """One request's constraint (batch of one): ``decode`` turns the answer's token ids into its
    text (as the backend decodes answers), ``choices`` are the texts the answer is compared with
    (after stripping whitespace), ``stop_token_ids`` end an answer, ``vocab_size`` is the width of the
    model's scores."""

    def __init__(self, decode: Callable[[list[int]], str], choices: Sequence[str], stop_token_ids: Sequence[int],
                 vocab_size: int):
        if not choices:
            raise ValueError("AnswerChoicesStop needs at least one choice")
        self._decode = decode
        self.choices = tuple(choice.strip() for choice in choices)
        self._stops = sorted({int(token) for token in stop_token_ids})
        if not self._stops or max(self._stops) >= vocab_size:
            raise ValueError(f"stop tokens {self._stops} do not fit a vocabulary of {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.answer: list[int] | None = None  # None until the first call (the prompt)
        self._every_token = None
        self._only_stops = None

    def _advance(self, input_ids) -> None:
        if int(input_ids.shape[0]) != 1:
            raise ValueError(f"AnswerChoicesStop serves one answer, got a batch of {int(input_ids.shape[0])}")
        if self.answer is None:
            self.answer = []  # the first call sees the prompt: no answer token yet
        else:
            self.answer.append(int(input_ids[0, -1]))

    def decided(self) -> bool:
        """The answer so far can be none of the choices however it goes on: it begins none of them,
        and it is not one of them followed by whitespace only (which the comparison strips)."""
        text = self._decode(self.answer or []).lstrip()
        if text.endswith(_UNFINISHED_CHARACTER):
            return False
        return not any(choice.startswith(text) for choice in self.choices) and text.rstrip() not in self.choices

    def next_bitmask(self, input_ids):
        """After the last token of ``input_ids`` (none on the first call, which sees the prompt): the
        (1, ceil(vocab / 32)) int32 bitmask of the tokens allowed next, bit 1 = allowed, on the host."""
        import torch

        self._advance(input_ids)
        if self._every_token is None:
            words = -(-self.vocab_size // 32)
            self._every_token = torch.full((1, words), -1, dtype=torch.int32)
            only = torch.zeros(words, dtype=torch.int64)
            for token in self._stops:
                only[token // 32] |= 1 << (token % 32)
            self._only_stops = only.to(torch.int32).view(1, -1)  # int32 wrap-around, as xgrammar's
        return self._only_stops if self.decided() else self._every_token

    def __call__(self, input_ids, scores):
        """transformers' LogitsProcessor interface: the scores with every token but the stop tokens
        at -inf once the answer is decided."""
        self._advance(input_ids)
        if not self.decided():
            return scores
        stops = self._stops
        masked = scores.new_full(scores.shape, float("-inf"))
        masked[:, stops] = scores[:, stops]
        return masked
