"""Prefilled KV caches for the prompt prefix every command shares (the system text).

Every command's chat prompt starts with the same tokens: the system text (about half of the
prompt) and the opening of the user turn, up to the image. Their keys and values depend only on
those tokens, their positions (plain text positions 0..P-1: the image comes later, so Qwen-VL's
mrope gives them equal t/h/w indices) and the weights (base + active adapter). So the backend
prefills that prefix once and seeds each generation with a copy of its cache; transformers'
``generate`` then prefills only the rest (image + command). Greedy outputs are identical with and
without reuse (tests/test_prefix_cache.py).

Entries are keyed on the prefix token ids plus the caller's ``scope`` (adapter id, dtype,
device): another adapter or another system text never reuses a prefix. Stored caches are never
handed out: each request gets its own copy, because generation appends to the cache it gets.
"""
from __future__ import annotations

import hashlib
import threading

from vla_node.lru import CountingLru, LruBacked

__all__ = ["PrefixCache", "reset"]

RESIDENT = "_vla_resident_prefix"  # on a reused StaticCache: the key of the prefix its first slots hold


def reset(cache) -> None:
    """Empty a reused StaticCache (and forget which prefix it held)."""
    cache.reset()
    cache.__dict__.pop(RESIDENT, None)


class PrefixCache(LruBacked):
    """LRU of prefilled prefix KV caches; ``capacity=0`` turns it off.

    ``hits``/``misses`` count lookups that found/had to prefill a prefix; ``skipped`` counts
    prompts with no usable prefix (no image marker, or fewer than ``min_tokens`` before it).
    """

    def __init__(self, boundary_token_id: int, capacity: int = 4, min_tokens: int = 16):
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self._lru = CountingLru(capacity)
        self.boundary_token_id = int(boundary_token_id)
        self.capacity = self._lru.capacity
        self.min_tokens = int(min_tokens)
        self.skipped = 0
        self._lock = threading.Lock()

    @property
    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "skipped": self.skipped, "entries": len(self._lru)}

    def prefix_length(self, input_ids) -> int:
        """Tokens before the first image marker of the (single) prompt; 0 when unusable."""
        row = input_ids[0]
        where = (row == self.boundary_token_id).nonzero()
        if where.numel() == 0:
            return 0
        length = int(where[0, 0])
        return length if length >= self.min_tokens else 0

    def seed(self, model, input_ids, scope: tuple, into=None, length: int | None = None, ids_host=None):
        """A cache holding the prefix of ``input_ids`` (shape 1 x N), or None (no usable prefix).

        ``model`` is the Qwen-VL ``...ForConditionalGeneration`` (LoRA layers injected in place, so
        the active adapter applies). ``into``: the backend's reused StaticCache to write the prefix
        into (reset here first); default a new ``DynamicCache``. When ``into`` already holds this
        prefix from the previous request (a robot's prompts share it), only its fill counters go back
        to the prefix's length: nothing writes below them, and the slots above are masked until rewritten.
        ``length``: ``prefix_length(input_ids)`` when the caller has it already; ``ids_host``:
        ``input_ids`` on the host, when the caller has them (the prefix's key is read from them).
        """
        if self.capacity == 0:
            return None
        if length is None:
            length = self.prefix_length(input_ids)
        if length == 0:
            with self._lock:
                self.skipped += 1
            return None
        import torch

        prefix = input_ids[:, :length]
        ids = ids_host if ids_host is not None else input_ids
        digest = hashlib.blake2b(ids[:, :length].cpu().numpy().tobytes(), digest_size=16)
        digest.update(repr(scope).encode())
        key = digest.digest()
        layers = self._lru.get_or_make(key, lambda: self._prefill(model, prefix, torch))
        if into is not None and getattr(into, RESIDENT, None) == key:
            for layer in into.layers:
                layer.cumulative_length.fill_(length)
            return into
        if into is not None:
            reset(into)
        cache = self._copy(model, layers, into)
        if into is not None:
            setattr(into, RESIDENT, key)
        return cache

    @staticmethod
    def _prefill(model, prefix, torch) -> list:
        """Per-layer (keys, values) of the prefix, run through the language model only (no lm_head)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        positions = torch.arange(prefix.shape[1], device=prefix.device).unsqueeze(0)  # text positions
        with torch.inference_mode():
            model.model.language_model(input_ids=prefix, position_ids=positions, past_key_values=cache,
                                       use_cache=True)
        return [(layer.keys, layer.values) for layer in cache.layers]

    @staticmethod
    def _copy(model, layers: list, into):
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config) if into is None else into
        for index, (keys, values) in enumerate(layers):
            # DynamicLayer concatenates and StaticLayer copies into its own buffer: the stored
            # tensors are never written to by the request's generation.
            cache.update(keys, values, index)
        return cache
