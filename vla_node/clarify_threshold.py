"""A calibrated CLARIFY threshold on the answer's first token.

A small model that is unsure whether the thing a command names is on the table splits its first
token between a verb and CLARIFY, and greedy decoding acts whenever the verb is the likelier. Asking
is the safer error (a wrong move acts on the world; a needless question costs one turn), so a
model's manifest may carry ``clarify_threshold``: the answer starts with CLARIFY whenever the
model gives CLARIFY's first token at least that probability (below one half; calibrated on scenes
of a seed of their own by ``python -m training.calibrate_clarify``). Only the first token is
touched: a plan that starts with a verb goes on as the model writes it, and the reason after
CLARIFY is the model's own.

The probability is read from the raw scores, before the grammar's mask (which allows every verb
and CLARIFY at the first token anyway). Every backend that decodes locally applies the same rule
where it chooses the first token (transformers' generate, the engine's prefill, the onnx loop).
"""
from __future__ import annotations

__all__ = ["ClarifyThreshold", "ClarifyThresholdError", "MAX_THRESHOLD", "clarify_first_token"]

MAX_THRESHOLD = 0.5  # at one half or above, greedy decoding already picks CLARIFY (when nothing else is likelier)
CLARIFY_TEXT = "CLARIFY"  # the verb as the model writes it (vla_node.actions' canonical name)


class ClarifyThresholdError(ValueError):
    """The threshold cannot be applied (out of range, or the tokenizer cannot write CLARIFY)."""


def clarify_first_token(tokenizer) -> int:
    """The id of the first token the model writes CLARIFY with (the whole word in the embedded
    model's tokenizer; its first piece in one that splits it: at a step's start only CLARIFY
    begins with it, as the grammar allows only the verbs there)."""
    encoded = tokenizer.encode(CLARIFY_TEXT, add_special_tokens=False)
    ids = getattr(encoded, "ids", encoded)  # a tokenizers.Tokenizer's Encoding, or transformers' list
    if not ids:
        raise ClarifyThresholdError(f"the tokenizer writes {CLARIFY_TEXT!r} with no token")
    return int(ids[0])


class ClarifyThreshold:
    """The rule: at the first token, CLARIFY's token is chosen whenever its probability is at least
    ``threshold``. ``observed`` (a list, or None) collects that probability for every answer: what
    training.calibrate_clarify reads (``threshold`` None: observe only, change nothing)."""

    def __init__(self, token_id: int, threshold: float | None, observed: list | None = None):
        if threshold is not None and not (0.0 < float(threshold) <= MAX_THRESHOLD):
            raise ClarifyThresholdError(f"clarify_threshold must be in (0, {MAX_THRESHOLD}], got {threshold!r}")
        self.token_id = int(token_id)
        self.threshold = None if threshold is None else float(threshold)
        self.observed = observed

    def apply(self, scores):
        """The first token's ``scores`` (torch, rows x vocabulary) with CLARIFY raised to the top of
        each row where its probability reaches the threshold (in place; returned)."""
        import torch

        probability = torch.softmax(scores.float(), dim=-1)[:, self.token_id]
        if self.observed is not None:
            self.observed.extend(float(p) for p in probability)
        if self.threshold is None:
            return scores
        # just above the best (a step of the scores' precision): chosen, and the answer's confidence
        # still shows the near tie; all rows at once, no read back to the host (the first token of
        # every command passes here)
        top = scores.float().max(dim=-1).values
        raised = top + 2 * torch.finfo(scores.dtype).eps * top.abs().clamp(min=1.0)
        column = scores[:, self.token_id]
        scores[:, self.token_id] = torch.where(probability >= self.threshold, raised.to(scores.dtype), column)
        return scores

    def apply_numpy(self, logits):
        """The same for one row of numpy logits (the onnx backend); a new array."""
        import numpy as np

        logits = np.asarray(logits, dtype=np.float32)
        shifted = np.exp(logits - logits.max())
        probability = float(shifted[self.token_id] / shifted.sum())
        if self.observed is not None:
            self.observed.append(probability)
        if self.threshold is None or probability < self.threshold:
            return logits
        out = logits.copy()
        out[self.token_id] = np.nextafter(logits.max(), np.float32(np.inf))
        return out

    def processor(self) -> "FirstTokenProcessor":
        """A transformers LogitsProcessor for one ``generate``: the rule at its first step only."""
        return FirstTokenProcessor(self)


class FirstTokenProcessor:
    """Applies a ClarifyThreshold to the first scores it is given (generate's first step: every
    row's first token), and passes every later step through."""

    def __init__(self, rule: ClarifyThreshold):
        self.rule = rule
        self.done = False

    def __call__(self, input_ids, scores):
        if self.done:
            return scores
        self.done = True
        return self.rule.apply(scores)
