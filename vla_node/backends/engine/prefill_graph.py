"""The prompt's prefill on the backend's StaticCache, recorded as one CUDA graph per length bucket.

After the shared prefix (prefix_cache.py) a camera command's prompt still has ~450 tokens to
prefill (the frame's image tokens and the command). That is ~4 ms of GPU work on the
Qwen2.5-VL-3B architecture, but the language model launches ~30 kernels per layer from Python and
transformers' ``generate`` adds its own set-up: ~32 ms on an H200, ~11 ms here
(benchmarks/results/gpu_history_h200.txt). Here the prompt is embedded (image features written at the image tokens),
its 3-D rope positions computed on the host before any GPU work is queued, and the language model
runs on the StaticCache for the prompt padded to a multiple of ``PREFILL_BUCKET`` tokens, attending
with ``lower_right_causal_attention`` (query q of the padded prompt sees the cached prefix and the
prompt up to itself: one fused SDPA call over the used slots, key/value heads shared in place).
Padding sits after every real token, so no real token sees it; the fill counter is then set to the
real length, and decoding overwrites the padded slots. With inputs in fixed buffers and nothing
read back to the host, the whole step is recorded as a CUDA graph per (prefix length, bucket) (an
LRU: a robot's prompts fall into a few buckets) and replayed; the last real token's logits come back for the first choice, and StaticDecoder
(static_decode.py) goes on from the same cache.

Qwen3-VL adds its deepstack features to the image tokens' hidden states in its first layers with
a boolean-mask write (a host sync); here they sit in bucket-sized buffers (zeros at the other
tokens) and are added whole. Outputs equal the ``generate`` prefill's (tests/test_prefill_graph.py).

With ``compile_layers`` the graphs are recorded with the layers' norms and MLPs compiled by
torch.compile (regional_compile.py: each fused into a few kernels; one compiled graph per class,
dynamic in the prompt length after the second bucket).
"""
from __future__ import annotations

import inspect
import logging
import threading

from vla_node.backends.engine.cuda_graph import record_cuda_graph
from vla_node.backends.engine.regional_compile import CompiledForwards
from vla_node.lru import CountingLru, LruBacked

__all__ = ["PREFILL_ATTENTION", "PREFILL_BUCKET", "PrefillGraphs", "Prefill", "host_inputs",
           "lower_right_causal_attention", "upload"]

log = logging.getLogger(__name__)

PREFILL_BUCKET = 64  # prompt lengths are padded to a multiple of this: one graph serves 64 lengths
PREFILL_ATTENTION = "vla_prefill_lower_right_causal"


def lower_right_causal_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                                 **kwargs):
    """Causal attention for ``q`` new tokens after ``n - q`` cached ones, ``n`` being the last
    dimension of ``attention_mask`` (only its shape is read: the slots in use).

    query: (batch, heads, q, d); key/value: the whole StaticCache (batch, kv_heads, slots, d).
    Token i of the new ones sees slots <= n - q + i: PyTorch's lower-right causal bias, which the
    fused SDPA kernels take as is, over the first n slots only, with grouped key/value heads read in
    place (transformers' SDPA path copies them per query head and reads a mask over every slot).
    Returns ((batch, q, heads, d), None).
    """
    import torch
    from torch.nn.attention.bias import causal_lower_right

    used = attention_mask.shape[-1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key[:, :, :used], value[:, :, :used], attn_mask=causal_lower_right(query.shape[2], used),
        dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


HOST_INPUTS = ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")


def host_inputs(inputs: dict) -> dict:
    """The model inputs the host-side preparation reads (ids, mask, image grid, token types), on the
    host: read back before the GPU work of the request is queued, so each read waits for nothing."""
    return {name: inputs[name].cpu() for name in HOST_INPUTS if inputs.get(name) is not None}


def upload(tensor, device):
    """``tensor`` (on the host) on ``device`` without waiting for the work queued there (a pinned
    copy: a plain one from pageable memory waits for the device)."""
    if getattr(device, "type", str(device)) != "cuda":
        return tensor.to(device)
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)


class Prefill:
    """A request's prefill inputs prepared on the host before the GPU work is queued: the tokens
    still to prefill, their rope positions (on the device) and the prompt's rope delta."""

    def __init__(self, input_ids, start: int, positions, rope_deltas, image_rows):
        self.input_ids = input_ids  # (1, N) on the device: the whole prompt
        self.start = start  # tokens already in the cache (the shared prefix)
        self.positions = positions  # (3, 1, N - start) on the device
        self.rope_deltas = rope_deltas  # (1, 1) on the host
        self.image_rows = image_rows  # (image tokens,) positions in the suffix, on the device; None: no image


class _Bucket:
    """One bucket's fixed input buffers and (on CUDA) its graph."""

    def __init__(self, used, embeds, positions, length, offsets, deepstack):
        self.used = used  # (1, 1, bucket, start + bucket): its shape tells the attention the slots in use
        self.embeds, self.positions, self.length, self.offsets = embeds, positions, length, offsets
        self.deepstack = deepstack  # Qwen3-VL: per level, the features at the image tokens' rows, else zeros
        self.graph = None


class PrefillGraphs(LruBacked):
    """Prefills for one (model, StaticCache) pair; build a new one when either changes (another
    cache size, another adapter, new adapter weights): a graph keeps the kernels and addresses it
    was recorded with. ``use_graph``: record graphs (CUDA only); otherwise, or after a failed
    recording, the same padded step runs eagerly. ``compile_layers``: record the layers' norms and
    MLPs compiled (a bucket whose compiled step cannot be recorded is recorded uncompiled, and so
    are later ones)."""

    def __init__(self, model, cache, use_graph: bool, capacity: int = 8, compile_layers: bool = False):
        import torch

        self._torch = torch
        self.model = model
        self.cache = cache
        self._language_model = model.model.language_model
        self._lm_head = model.get_output_embeddings()
        self._embed = model.get_input_embeddings()
        weight = self._lm_head.weight
        self.device = weight.device
        layers = cache.layers
        self._initialize(layers, model.config.get_text_config(), weight.dtype)
        self.slots = int(layers[0].max_cache_len)
        self._fills = [layer.cumulative_length for layer in layers]
        self._logits = torch.zeros(1, int(self._lm_head.weight.shape[0]), dtype=torch.float32, device=self.device)
        visual = getattr(model.model, "visual", None)
        self._deepstack_levels = (len(getattr(visual, "deepstack_visual_indexes", None) or [])
                                  if hasattr(self._language_model, "_deepstack_process") else 0)
        self.use_graph = bool(use_graph) and self.device.type == "cuda"
        norms_and_mlps = [module for layer in self._language_model.layers for name, module in layer.named_modules()
                          if name == "mlp" or type(module).__name__.endswith("RMSNorm")]
        self.requested_compile_layers = bool(compile_layers)
        self._layers = CompiledForwards(norms_and_mlps, dynamic=None, enabled=compile_layers)
        self._lru = CountingLru(capacity)
        self._pool = None
        self.graph_replays = 0
        self._lock = threading.Lock()
        from transformers import AttentionInterface

        AttentionInterface.register(PREFILL_ATTENTION, lower_right_causal_attention)

    def _initialize(self, layers, text_config, dtype) -> None:
        """Allocate an empty cache's tensors now (transformers does it at the first write, and
        replaces the fill counters then): the step's buffers and graphs keep these addresses."""
        torch = self._torch
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        shape = (1, getattr(text_config, "num_key_value_heads", None) or heads, 1, head_dim)
        for layer in layers:
            if not layer.is_initialized:
                empty = torch.zeros(shape, dtype=dtype, device=self.device)
                layer.lazy_initialization(empty, empty)

    @staticmethod
    def supports(model, cache) -> bool:
        """A model whose language model takes embeddings, 3-D positions and a mask (and, for
        Qwen3-VL, deepstack features it adds in ``_deepstack_process``), with rope positions from
        ``get_rope_index``, on a StaticCache that counts its fill on the device."""
        import torch

        inner = getattr(model, "model", None)
        language_model = getattr(inner, "language_model", None)
        if language_model is None or not hasattr(inner, "get_rope_index"):
            return False
        if getattr(model.config, "image_token_id", None) is None:
            return False
        try:
            parameters = inspect.signature(language_model.forward).parameters
        except (TypeError, ValueError):
            return False
        if "deepstack_visual_embeds" in parameters and not hasattr(language_model, "_deepstack_process"):
            return False
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                                    for layer in layers)

    # ------------------------------------------------------------------ host side, before GPU work

    @staticmethod
    def prepare(model, inputs: dict, start: int, host: dict | None = None) -> Prefill:
        """Rope positions of the prompt's tokens from ``start`` on and where its image tokens sit,
        computed on the host from ``host`` (host_inputs(inputs), read back before any GPU work was
        queued) and uploaded without waiting for the device: the vision tower may run meanwhile."""
        input_ids = inputs["input_ids"]
        device = input_ids.device
        host = host if host is not None else host_inputs(inputs)
        ids_host = host["input_ids"]
        rope_kwargs = {name: host[name] for name in ("attention_mask", "image_grid_thw", "mm_token_type_ids")
                       if name in host}
        positions, rope_deltas = model.model.get_rope_index(ids_host, **rope_kwargs)
        image_rows = None
        if "image_grid_thw" in host:
            rows = (ids_host[0, start:] == int(model.config.image_token_id)).nonzero().flatten()
            image_rows = upload(rows, device)
        return Prefill(input_ids, int(start), upload(positions[:, :, start:], device), rope_deltas, image_rows)

    # ------------------------------------------------------------------ GPU side

    def run(self, prefill: Prefill, image_features=None):
        """Prefill the prompt after ``prefill.start`` on the cache (which holds exactly the first
        ``start`` tokens); returns the last prompt token's logits (1 x vocab, float32, a fresh tensor).
        ``image_features``: the vision tower's outputs (get_image_features), when the prompt has an image."""
        torch = self._torch
        suffix = prefill.input_ids[:, prefill.start:]
        length = int(suffix.shape[1])
        if length < 1:
            raise ValueError("nothing to prefill: the cache already holds the whole prompt")
        bucket = -(-length // PREFILL_BUCKET) * PREFILL_BUCKET
        if prefill.start + bucket > self.slots:
            raise ValueError(f"the padded prompt ({prefill.start} + {bucket} tokens) does not fit the cache "
                             f"({self.slots} slots)")
        embeds = self._embed(suffix)
        deepstack = []
        if image_features is not None and prefill.image_rows is not None:
            image_embeds = torch.cat(list(image_features.pooler_output), dim=0).to(embeds.dtype)
            embeds = embeds.index_copy(1, prefill.image_rows, image_embeds.unsqueeze(0))
            deepstack = [torch.cat(list(level), dim=0).to(embeds.dtype)
                         for level in (getattr(image_features, "deepstack_features", None) or [])]
        if len(deepstack) != self._deepstack_levels:
            raise ValueError(f"the vision outputs have {len(deepstack)} deepstack levels, "
                             f"the model {self._deepstack_levels}")
        with self._lock:
            # the attention reads the slots in use, start + bucket: a graph per (prefix length, bucket)
            entry = self._lru.get_or_make((prefill.start, bucket), lambda: self._new_bucket(prefill.start, bucket))
            entry.embeds[:, :length].copy_(embeds)
            entry.embeds[:, length:].zero_()  # padding: finite values, never seen
            entry.positions[:, :, :length].copy_(prefill.positions)
            # padded tokens continue the text positions: any value would do, they are never seen
            entry.positions[:, :, length:].copy_(prefill.positions[:, :, -1:] + 1 + entry.offsets[:bucket - length])
            entry.length.fill_(length)
            for buffer, features in zip(entry.deepstack, deepstack):
                buffer.zero_()
                buffer[0, :length].index_copy_(0, prefill.image_rows, features)
            self._run(entry)
            return self._logits.clone()

    def _new_bucket(self, start: int, bucket: int) -> _Bucket:
        torch = self._torch
        hidden, dtype = int(self._embed.weight.shape[1]), self._embed.weight.dtype
        return _Bucket(torch.ones(1, dtype=torch.bool, device=self.device).expand(1, 1, bucket, start + bucket),
                       torch.zeros(1, bucket, hidden, dtype=dtype, device=self.device),
                       torch.zeros(3, 1, bucket, dtype=torch.long, device=self.device),
                       torch.ones(1, dtype=torch.long, device=self.device),
                       torch.arange(bucket, device=self.device),
                       [torch.zeros(1, bucket, hidden, dtype=dtype, device=self.device)
                        for _ in range(self._deepstack_levels)])

    def _step(self, entry: _Bucket) -> None:
        """The graph body: the padded prompt through the language model, the last real token's
        logits into ``_logits``, every layer's fill counter set to the real length."""
        torch = self._torch
        start = self._fills[0].clone()  # the layers' updates advance the counters
        extra = {}
        if entry.deepstack:
            extra = {"deepstack_visual_embeds": entry.deepstack, "visual_pos_masks": None}
            # zeros off the image rows: adding the whole buffer is the masked add, without the host-side mask
            self._language_model._deepstack_process = lambda hidden, _mask, features: hidden + features
        config = self._language_model.config
        before, config._attn_implementation = config._attn_implementation, PREFILL_ATTENTION
        try:
            hidden = self._language_model(inputs_embeds=entry.embeds, position_ids=entry.positions,
                                          attention_mask=entry.used, past_key_values=self.cache,
                                          use_cache=True, **extra).last_hidden_state
        finally:
            config._attn_implementation = before
            self._language_model.__dict__.pop("_deepstack_process", None)
        last = hidden[0].index_select(0, entry.length - 1)
        self._logits.copy_(self._lm_head(last).to(torch.float32))
        end = (start + entry.length).reshape(start.shape)
        for fill in self._fills:
            fill.copy_(end)

    def _run(self, entry: _Bucket) -> None:
        if not self.use_graph:
            self._step(entry)
            return
        if entry.graph is None and not self._capture(entry):
            self._step(entry)
            return
        entry.graph.replay()
        self.graph_replays += 1

    def _capture(self, entry: _Bucket) -> bool:
        """Record ``entry``'s step; the fill counters are put back (the warm-up run before the
        capture changed them, the capture itself runs nothing). False (eager from now on) on failure."""
        torch = self._torch
        saved = [fill.clone() for fill in self._fills]

        def put_back():
            for fill, value in zip(self._fills, saved):
                fill.copy_(value)

        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with self._layers.active():
                graph, _ = record_cuda_graph(lambda: self._step(entry), self._pool, put_back)
        except Exception as error:  # a model whose prefill cannot be recorded still prefills, eagerly
            if self._layers.enabled:
                log.warning("prefill cannot be recorded with compiled layers (%s: %s): recording them uncompiled",
                            type(error).__name__, error)
                self._layers.enabled = False
                put_back()
                return self._capture(entry)
            log.warning("prefill cannot be recorded as a CUDA graph (%s: %s): prefilling eagerly",
                        type(error).__name__, error)
            self.use_graph = False
            graph = None
        put_back()
        entry.graph = graph
        return graph is not None
