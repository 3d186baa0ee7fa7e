"""The engine's self-check: it runs only models it knows, and only while it answers like the plain path.

The engine leans on transformers' internals: the modules it swaps (attention implementations,
forwards while recording), the layer shapes it fuses into joint matrices and Triton kernels, the
cache layout it writes. A `pip install -U transformers` that moves any of them must never give a
robot wrong actions, so:

- before it touches a model (``unknown_model``), the engine checks the family, the classes of the
  layers and vision blocks, the projections' shapes, and that transformers is a version it was
  tested with;
- at warm-up (``probe_disagreement``), its first answer is compared with the plain path's for the
  same input: the same tokens, or, where they part, a token the plain path itself scores as a near
  tie (bf16/fp16 kernels round differently; in float32 the paths agree token for token).

Either refusal is one log line, and TransformersBackend serves the plain path.
"""
from __future__ import annotations

__all__ = ["TESTED_TRANSFORMERS", "KNOWN_LAYERS", "unknown_model", "probe_disagreement"]

# transformers versions the engine was tested with: [first, last) by (major, minor)
TESTED_TRANSFORMERS = ((5, 23), (5, 24))
# model_type -> (decoder layer class, vision block class)
KNOWN_LAYERS = {
    "qwen2_vl": ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"),
    "qwen2_5_vl": ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
    "qwen3_vl": ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"),
}
_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
# A divergence the plain path scores within this many nats of its own choice is a near tie.
PROBE_TIE_NATS = {"float32": 1e-3}
PROBE_TIE_NATS_REDUCED = 0.5  # bf16 / fp16


def _version(text: str) -> tuple[int, int]:
    parts = [int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0


def _weight_shape(module) -> tuple[int, ...] | None:
    base = module.get_base_layer() if callable(getattr(module, "get_base_layer", None)) else module
    weight = getattr(base, "weight", None)
    return tuple(weight.shape) if weight is not None and getattr(weight, "ndim", 0) == 2 else None


def unknown_model(model, transformers_version: str | None = None) -> str | None:
    """Why the engine must not run ``model`` (None: it knows it)."""
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    first, last = TESTED_TRANSFORMERS
    if not first <= _version(transformers_version) < last:
        tested = f"{first[0]}.{first[1]}.x" + ("" if last == (first[0], first[1] + 1) else
                                              f" to {last[0]}.{last[1] - 1}.x")
        return f"transformers {transformers_version} is outside the versions the engine was tested with ({tested})"
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in KNOWN_LAYERS:
        return f"model type {family!r} is not one of {', '.join(KNOWN_LAYERS)}"
    layer_class, block_class = KNOWN_LAYERS[family]
    inner = getattr(model, "model", None)
    layers = list(getattr(getattr(inner, "language_model", None), "layers", None) or [])
    blocks = list(getattr(getattr(inner, "visual", None), "blocks", None) or [])
    if not layers or not blocks:
        return "no language-model layers or vision blocks where a Qwen-VL model has them"
    for kind, expected, found in (("layer", layer_class, layers), ("vision block", block_class, blocks)):
        strange = sorted({type(m).__name__ for m in found} - {expected})
        if strange:
            return f"unknown {kind} class {', '.join(strange)} (expected {expected})"
    text = getattr(config, "text_config", config)
    hidden, heads, kv_heads = int(text.hidden_size), int(text.num_attention_heads), int(text.num_key_value_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    inter = int(text.intermediate_size)
    expected_shapes = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
                       "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
                       "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    if heads % kv_heads:
        return f"{heads} attention heads do not share {kv_heads} key/value heads evenly"
    for index, layer in enumerate(layers):
        for part, names in _PROJECTIONS:
            owner = getattr(layer, part, None)
            for name in names:
                shape = _weight_shape(getattr(owner, name, None)) if owner is not None else None
                if shape != expected_shapes[name]:
                    return (f"layer {index}: {part}.{name} is {shape or 'missing'}, expected "
                            f"{expected_shapes[name]} from the config")
    return None


def probe_disagreement(plain_ids: list[int], plain_logits, fast_ids: list[int], dtype_name: str) -> str | None:
    """Why the engine's answer ``fast_ids`` is not the plain path's (None: it is).

    ``plain_logits``: the plain path's scores per step (``generate``'s output logits, batch row 0).
    The answers must be equal up to the first token where they part; there the engine's token
    must be a near tie under the plain path's scores (within PROBE_TIE_NATS of its best, for the
    model's dtype). After a parting, the two answers continue from different tokens: not compared.
    """
    import torch

    tie = PROBE_TIE_NATS.get(dtype_name, PROBE_TIE_NATS_REDUCED)
    for step, (plain, fast) in enumerate(zip(plain_ids, fast_ids)):
        if plain == fast:
            continue
        logprobs = torch.log_softmax(plain_logits[step][0].float(), dim=-1)
        gap = float(logprobs[plain] - logprobs[fast])
        if not gap <= tie:
            return (f"the engine's token {step + 1} is {fast} where the plain path chose {plain} "
                    f"({gap:.3g} nats less likely under the plain path; a near tie is within {tie:g})")
        return None
    if len(plain_ids) != len(fast_ids):
        return f"the engine's answer has {len(fast_ids)} tokens where the plain path's has {len(plain_ids)}"
    return None

