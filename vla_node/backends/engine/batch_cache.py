"""A StaticCache of several rows, filled one prefilled prompt at a time, for batched decoding.

Each command of a batch is prefilled alone on the backend's one-row StaticCache (its cached prefix,
recorded vision tower and prefill: the single-command path), then its keys and values are copied
into its row here, right-aligned so every prompt ends at the same slot. From there one decode step
per token serves every row (static_decode.StaticDecoder.decode_rows): a step at batch 4 reads the
weights once, where four single commands read them four times. The slots left of a shorter prompt
hold stale values; the decoder's per-row start slot hides them.
"""
from __future__ import annotations

__all__ = ["new_batch_cache", "padded_rows", "place_row", "set_fill"]


def padded_rows(count: int, limit: int) -> int:
    """Rows of the cache for ``count`` commands: the next power of two (so a few cache and decoder
    sizes serve every batch), at most ``max(count, limit)``."""
    rows = 1
    while rows < count:
        rows *= 2
    return min(rows, max(count, limit))


def new_batch_cache(config, like, rows: int, slots: int):
    """A StaticCache of ``rows`` rows and ``slots`` slots, its tensors allocated now (not at the
    first update) with the head count, head size, dtype and device of the one-row cache ``like``."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=slots)
    if len(cache.layers) != len(like.layers):
        raise ValueError(f"the batch cache has {len(cache.layers)} layers, the prefill cache {len(like.layers)}")
    for layer, model_layer in zip(cache.layers, like.layers):
        keys, values = model_layer.keys, model_layer.values
        layer.lazy_initialization(keys.new_empty((rows, keys.shape[1], 1, keys.shape[3])),
                                  values.new_empty((rows, values.shape[1], 1, values.shape[3])))
    return cache


def place_row(cache, row: int, source, length: int, end: int) -> None:
    """Copy the first ``length`` slots of the one-row cache ``source`` into ``row`` of ``cache``,
    ending at slot ``end`` (right-aligned)."""
    if not 0 < length <= end <= cache.layers[0].max_cache_len:
        raise ValueError(f"{length} slots ending at {end} do not fit {cache.layers[0].max_cache_len}")
    for layer, source_layer in zip(cache.layers, source.layers):
        layer.keys[row, :, end - length:end].copy_(source_layer.keys[0, :, :length])
        layer.values[row, :, end - length:end].copy_(source_layer.values[0, :, :length])


def set_fill(cache, fill: int) -> None:
    """Every layer's fill counter to ``fill`` (the slot the next step writes), in place: the
    decoder's recorded steps read these tensors."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(int(fill))
