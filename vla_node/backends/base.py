"""Backend interface: one image + chat messages in, generated text (+ timing, confidence) out.

Concrete backends (transformers+peft, onnxruntime, OpenAI-compatible server) implement
:class:`Backend`. This module is torch-free so the pipeline and tests can import it cheaply.
"""

from __future__ import annotations

import abc
import math
import threading
from dataclasses import dataclass

import numpy as np

from vla_node.image import PixelLimits
from vla_node.settings import default

__all__ = ["GenerationRequest", "GenerationResult", "Backend", "BackendError", "PixelLimits",
           "DEFAULT_MAX_NEW_TOKENS", "token_budget", "warmup_request"]

DEFAULT_MAX_NEW_TOKENS = default("max_new_tokens")  # the node parameter's default (vla_node.settings)


class BackendError(Exception):
    """The model/adapter cannot be loaded or run; the message says what and where."""


@dataclass
class GenerationRequest:
    image: np.ndarray  # RGB uint8 HxWx3 (already fitted to pixel limits)
    messages: list[dict]  # from PromptBuilder.chat_messages
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_event: threading.Event | None = None  # set -> abort generation as soon as possible
    # True: the model answers in its own words (a counting question): no action grammar, no CLARIFY
    # threshold; the node's plans are always asked with False
    free_text: bool = False
    # free text only: the texts the answer is compared with (stripped); its generation ends once it
    # can be none of them (vla_node/backends/answer_choices.py). Empty: it runs to EOS or the budget
    answer_choices: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    text: str
    confidence: float  # geometric mean of chosen-token probabilities (1.0 if unknown)
    model_input_size: tuple[int, int]  # (width, height) the model actually saw (for BoxCodec)
    prompt_tokens: int
    new_tokens: int
    preprocess_ms: float
    generate_ms: float


def warmup_request(limits: PixelLimits) -> GenerationRequest:
    """One tiny generation (smallest allowed grey image, 2 tokens) that initialises kernels/caches."""
    side = max(limits.factor, int(math.ceil(math.sqrt(limits.min_pixels) / limits.factor)) * limits.factor)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "warmup"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "warmup"}]},
    ]
    return GenerationRequest(image=np.full((side, side, 3), 127, dtype=np.uint8), messages=messages, max_new_tokens=2)


def token_budget(request: GenerationRequest, backend_limit: int, image_required: bool = True) -> int:
    """Check a request's image (RGB uint8 HxWx3) and return its generation budget, capped by
    the backend's own limit. `image_required=False` lets other image types through (the
    transformers processor also takes PIL images)."""
    image = request.image
    if image_required or isinstance(image, np.ndarray):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise BackendError(f"request.image must be an RGB uint8 HxWx3 array, got shape "
                               f"{getattr(image, 'shape', None)} dtype {getattr(image, 'dtype', type(image).__name__)}")
    n_max = int(request.max_new_tokens)
    if n_max < 1:
        raise BackendError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    return min(n_max, backend_limit)


class Backend(abc.ABC):
    model_id: str
    adapter_id: str  # "" when no adapter is active
    coordinate_convention: str  # "absolute_resized" | "normalized_1000"
    pixel_limits: PixelLimits
    # Most requests generate_batch() runs as one model call; 1: it only loops over generate().
    max_batch_size: int = 1
    # The model answers vla_node.prompt's counting question (its manifest's count_questions) and the
    # backend honours GenerationRequest.free_text: vla_node.presence_check may ask it.
    answers_count_questions: bool = False

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | BackendError]:
        """One result per request, in order; a request that fails gets its BackendError in its
        place and never affects the others. This default runs generate() once per request;
        backends that can batch for real override it (and raise `max_batch_size`)."""
        results: list[GenerationResult | BackendError] = []
        for request in requests:
            try:
                results.append(self.generate(request))
            except BackendError as error:
                results.append(error)
            except Exception as error:  # e.g. CUDA OOM: one request's failure stays in its row
                results.append(BackendError(f"{type(error).__name__}: {error}"))
        return results

    @abc.abstractmethod
    def warmup(self) -> None: ...

    def warmup_batches(self, max_rows: int) -> None:
        """Prepare generate_batch() for batches of up to ``max_rows`` requests (what a first batch
        would otherwise pay: compiling, recording). Default: nothing to prepare."""

    @abc.abstractmethod
    def load_adapter(self, path: str, name: str | None = None) -> str:
        """Load an adapter (validating its manifest); return its name. Does not activate it."""

    @abc.abstractmethod
    def set_adapter(self, name: str | None) -> None:
        """Activate a loaded adapter by name, or None for the bare base model (no base reload)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def adapter_names(self) -> list[str]:
        """Names of the loaded adapters (load order). Backends without adapters: []."""
        return []

    # ------------------------------------------------------------------ constrained decoding
    action_grammar = None  # vla_node.grammar.ActionGrammar while constrained decoding is on

    def constrained_decoding_unavailable(self) -> str | None:
        """Why this backend cannot constrain its own generation on this host (None: it can)."""
        return f"{type(self).__name__} does not constrain its generation itself"

    def grammar_tokens(self) -> tuple[object, int, list[int]]:
        """(a transformers fast tokenizer, the model's vocabulary size, the end-of-answer ids): what
        the grammar is compiled against. Backends that constrain their generation give them."""
        raise BackendError(self.constrained_decoding_unavailable() or "no tokenizer for the grammar")

    def enable_constrained_decoding(self, vocab, policy=None, restrict_to_policy: bool = False,
                                    reason_max_chars: int | None = None) -> None:
        """Constrain every generation to the action grammar of ``vocab`` (vla_node.grammar; with
        ``restrict_to_policy`` also to the policy's allowed labels). The tokenizer is indexed once
        here; each grammar is compiled on first use per image size (box bounds) and cached; every
        request gets fresh matchers. Raises BackendError."""
        reason = self.constrained_decoding_unavailable()
        if reason is not None:
            raise BackendError(reason)
        from vla_node import grammar

        tokenizer, vocab_size, eos_ids = self.grammar_tokens()
        try:
            self.action_grammar = grammar.ActionGrammar.for_vocabulary(
                tokenizer, vocab_size, eos_ids, vocab, policy, restrict_to_policy, reason_max_chars)
        except grammar.GrammarError as e:
            raise BackendError(f"constrained decoding: {e}") from e

    def disable_constrained_decoding(self) -> None:
        self.action_grammar = None
