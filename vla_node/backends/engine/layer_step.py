"""The one-row decode step of a Qwen-VL language model by layer_kernels.py's fused kernels.

Per layer seven launches (nine where the o or down product splits K), no transformers module
code: RMSNorm + q/k/v product (split-K partial sums); their reduction with bias, q/k norm
(Qwen3-VL), rotary embedding and the cache write; attention (two kernels, bounded by the layer's
fill counter, which the second advances); o product + residual; RMSNorm + gate/up product + SiLU *
up; down product (+ reduction) + residual. Then the final RMSNorm + lm_head product into float32
logits. On Hopper and later the kernels launch programmatically dependent (layer_kernels.py:
each overlaps the end of the one before, the first loop step of its weights prefetched). Nothing
is compiled by torch.compile: a CUDA graph records the launches (static_decode.py), so a decoder
is ready once Triton has compiled the kernels and the products' block shapes are timed: 8.1-8.9 s
on a fresh H200 for the 3B architecture, 1.1-1.3 s with Triton's cache warm
(benchmarks/results/gpu_history_h200.txt, runs 29-35), not the 30-45 s of compiling transformers'
step.

For plain decoder layers only (``unsupported`` says why not): full attention, SiLU MLP, default
rotary embedding, q/k/v and gate/up joint matrices (fused_projections.py). An active LoRA adapter
(plain LoRA: no DoRA or other variant, no LoRA bias) is merged into copies of the matrices it
adapts, W + scale * B A summed in float32 and rounded once, so its step reads as many bytes as the
base model's; the copies live as long as the LayerStep (an adapter switch drops the decoder) and
are made only where they take at most half the device's free memory, else the step stays with
static_decode.py's compiled step, which adds the updates in peft's layers. The cache's keys and
values and its per-layer fill counters are the StaticCache's own, advanced as its ``update`` would.
"""
from __future__ import annotations

import logging

from vla_node.backends.engine import decode_kernels
from vla_node.backends.engine.fused_projections import base_linear
from vla_node.backends.engine.layer_kernels import dependent_launch_supported, kernels

__all__ = ["LayerStep"]

log = logging.getLogger(__name__)

_CHOSEN_CONFIGS: dict[tuple, dict] = {}  # LayerStep._choose_configs' choices, per device and shapes

# (rows per program, inputs per loop step, warps, K splits), timed per product kind in the step's
# own order of weights (the best of 200 shapes per kind on an H200, benchmarks/results/gpu_history_h200.txt)
CANDIDATES = ((1, 1024, 4, 1), (2, 1024, 4, 1), (2, 2048, 2, 1), (4, 512, 2, 1), (4, 1024, 4, 1), (8, 1024, 4, 1),
              (16, 256, 4, 4), (4, 256, 4, 4), (4, 512, 4, 2))
# under dependent launch, the loop steps of weights a product's program asks the L2 for before it waits
PREFETCH_STEPS = 1
ATTENTION_CHUNK = decode_kernels.ATTENTION_CHUNK
ATTENTION_BLOCK = decode_kernels.ATTENTION_BLOCK


def _matrices(layer) -> dict:
    """A decoder layer's four matrices of the step, each with the projections whose rows it holds,
    in row order (the joint ones as fused_projections.GROUPS orders them)."""
    attention, mlp = layer.self_attn, layer.mlp
    return {"qkv": (attention.q_proj, attention.k_proj, attention.v_proj), "o": (attention.o_proj,),
            "gate_up": (mlp.gate_proj, mlp.up_proj), "down": (mlp.down_proj,)}


def _adapter_active(module) -> bool:
    """Whether a projection is a LoRA layer that adds an update (peft's wrapper, adapters on)."""
    return callable(getattr(module, "get_base_layer", None)) and not getattr(module, "disable_adapters", False)


def _adapting(module) -> list[str]:
    """The active adapters that add an update in ``module`` (not merged into its base weight)."""
    if not _adapter_active(module):
        return []
    merged = set(getattr(module, "merged_adapters", ()))
    return [name for name in getattr(module, "active_adapters", ())
            if name in getattr(module, "lora_A", {}) and name not in merged]


def _unmergeable(module) -> str | None:
    """Why an active adapter of ``module`` cannot be merged into a weight copy (None: it can)."""
    if not _adapter_active(module):
        return None
    if not callable(getattr(module, "get_delta_weight", None)) or not hasattr(module, "lora_A"):
        return f"adapter layers of type {type(module).__name__}"
    for name in _adapting(module):
        variant = getattr(module, "lora_variant", {}).get(name)
        if variant is not None or getattr(module, "use_dora", {}).get(name):
            return f"adapter {name!r} is a LoRA variant ({type(variant).__name__ if variant else 'DoRA'})"
        if getattr(module, "lora_bias", {}).get(name):
            return f"adapter {name!r} has LoRA biases"
    return None


def _merged(weight, modules):
    """``weight`` (the rows of ``modules`` in order) with their active adapters' updates added,
    a copy; ``weight`` itself when no module adds one."""
    import torch

    if not any(_adapting(module) for module in modules):
        return weight
    merged = torch.empty_like(weight)
    offset = 0
    for module in modules:
        rows = slice(offset, offset + int(base_linear(module).weight.shape[0]))
        total = weight[rows].to(torch.float32, copy=True)  # never the weight itself (float32 models)
        for name in _adapting(module):
            total += module.get_delta_weight(name).float()
        merged[rows] = total.to(weight.dtype)
        offset = rows.stop
    return merged


class LayerStep:
    """Decode steps of one row for ``model``'s language model on a StaticCache of one row."""

    @staticmethod
    def unsupported(model, fused) -> str | None:
        """Why the layers cannot run here (None: they can)."""
        import torch

        language_model = model.model.language_model
        layers = list(getattr(language_model, "layers", []))
        if not layers or fused is None or not fused.intact() or len(fused.groups) != 2 * len(layers):
            return "no joint q/k/v and gate/up matrices"
        rotary = getattr(language_model, "rotary_emb", None)
        if getattr(rotary, "rope_type", None) != "default" or not isinstance(getattr(rotary, "inv_freq", None),
                                                                             torch.Tensor):
            return "not the default rotary embedding"
        config = getattr(model.config, "text_config", model.config)
        if getattr(config, "hidden_act", None) != "silu":
            return f"activation {getattr(config, 'hidden_act', None)!r}"
        merged_bytes = 0
        for layer in layers:
            for modules in _matrices(layer).values():
                for module in modules:
                    reason = _unmergeable(module)
                    if reason is not None:
                        return reason
                if any(_adapting(module) for module in modules):
                    merged_bytes += sum(base_linear(module).weight.nbytes for module in modules)
        device = model.get_output_embeddings().weight.device
        if merged_bytes and device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if merged_bytes > free // 2:
                return (f"the adapter's merged weights ({merged_bytes / 2**30:.2f} GiB) would take more than half "
                        f"the device's free memory ({free / 2**30:.2f} GiB)")
        attention = layers[0].self_attn
        dim = int(attention.head_dim)
        if dim < 16 or dim & (dim - 1) or rotary.inv_freq.numel() != dim // 2:
            return f"head size {dim}"
        if model.get_output_embeddings().bias is not None:
            return "an lm_head bias"
        return None

    def __init__(self, model, fused, dependent_launch: bool = True):
        """``dependent_launch``: launch the kernels programmatically dependent where the device
        allows (layer_kernels.py; False: each launch waits for the one before, as usual)."""
        import torch

        self._torch = torch
        self._kernels = kernels()
        language_model = model.model.language_model
        self._embed = language_model.embed_tokens.weight
        self._final_norm = language_model.norm
        self._lm_head = model.get_output_embeddings().weight
        rotary = language_model.rotary_emb
        self._inv_freq = rotary.inv_freq.to(torch.float32).contiguous()
        self._rope_scale = float(rotary.attention_scaling)
        self._layers = []
        for index, layer in enumerate(language_model.layers):
            attention = layer.self_attn
            bases = {"qkv": fused.groups[2 * index], "o": base_linear(attention.o_proj),
                     "gate_up": fused.groups[2 * index + 1], "down": base_linear(layer.mlp.down_proj)}
            matrices = {name: _merged(bases[name].weight, modules) for name, modules in _matrices(layer).items()}
            self._layers.append({
                **matrices, **{f"{name}_bias": base.bias for name, base in bases.items()},
                "input_norm": layer.input_layernorm, "post_norm": layer.post_attention_layernorm,
                "q_norm": getattr(attention, "q_norm", None), "k_norm": getattr(attention, "k_norm", None),
                "scale": float(attention.scaling),
            })
        first = language_model.layers[0].self_attn
        self.dim = int(first.head_dim)
        self.heads = int(model.config.get_text_config().num_attention_heads)
        self.kv_heads = (int(self._layers[0]["qkv"].shape[0]) // self.dim - self.heads) // 2
        weight = self._embed
        device, dtype = weight.device, weight.dtype
        self.device = device
        self.dependent_launch = bool(dependent_launch) and dependent_launch_supported(device)
        # the kernels' PDL arguments: the flag, the weights' elements per 128-byte line, the launch's own
        self.prefetch_steps = PREFETCH_STEPS if self.dependent_launch else 0
        self._pdl = ({"PDL": True, "LINE": 128 // weight.element_size(), "PREFETCH": self.prefetch_steps,
                      "launch_pdl": True} if self.dependent_launch else {})
        self._pdl_plain = {"PDL": True, "launch_pdl": True} if self.dependent_launch else {}  # no weights read
        hidden = int(weight.shape[1])
        self._hidden = torch.zeros(hidden, dtype=dtype, device=device)
        self._query = torch.zeros(self.heads * self.dim, dtype=dtype, device=device)
        self._attended = torch.zeros(self.heads * self.dim, dtype=dtype, device=device)
        self._activation = torch.zeros(int(self._layers[0]["gate_up"].shape[0]) // 2, dtype=dtype, device=device)
        self._group = self.heads // self.kv_heads
        self._group_pad = max(16, 1 << (self._group - 1).bit_length())  # tl.dot wants >= 16 rows
        self._partials: dict[tuple[int, int], object] = {}
        self._squares = torch.zeros(max(config[3] for config in CANDIDATES), dtype=torch.float32, device=device)
        self._attention_state: dict[int, tuple] = {}
        self.configs = self._choose_configs()

    # ------------------------------------------------------------------ products

    def _partial(self, splits: int, rows: int):
        key = (splits, rows)
        if key not in self._partials:
            self._partials[key] = self._torch.empty(splits * rows, dtype=self._torch.float32, device=self.device)
        return self._partials[key]

    def _product(self, config, x, weight, out, norm=None, bias=None, residual=None, gated=False, partial=False):
        """out = weight @ (norm(x) if norm) (+ bias) [SiLU(gate) * up if gated] (+ residual); with
        ``partial`` the float32 split sums only (returned; out unused; with ``norm`` the splits'
        sums of x^2 in ``_squares``)."""
        block_n, block_k, warps, splits = config
        rows = int(weight.shape[0]) // (2 if gated else 1)
        inputs = int(weight.shape[1])
        chunk = -(-inputs // (splits * block_k)) * block_k  # whole loop steps per split
        eps = float(norm.variance_epsilon) if norm is not None else 0.0
        norm_weight = norm.weight if norm is not None else x
        grid = (-(-rows // block_n), splits)
        matvec = self._kernels["layer_matvec"]
        if splits == 1 and not partial:
            matvec[grid](x, norm_weight, weight, bias if bias is not None else weight,
                         residual if residual is not None else x, out, self._squares, rows, inputs, weight.stride(0),
                         chunk, eps,
                         NORM=norm is not None, PARTIAL=False, HAS_BIAS=bias is not None,
                         RESIDUAL=residual is not None, GATED=gated, BLOCK_N=block_n, BLOCK_K=block_k,
                         num_warps=warps, **self._pdl)
            return out
        sums = self._partial(splits, rows)
        matvec[grid](x, norm_weight, weight, weight, x, sums, self._squares, rows, inputs, weight.stride(0), chunk, eps,
                     NORM=norm is not None, PARTIAL=True, HAS_BIAS=False, RESIDUAL=False, GATED=False,
                     BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **self._pdl)
        if partial:
            return sums
        self._kernels["reduce_rows"][(-(-rows // 1024),)](
            sums, bias if bias is not None else sums, residual if residual is not None else out, out, rows,
            SPLITS=splits, HAS_BIAS=bias is not None, RESIDUAL=residual is not None, BLOCK=1024, num_warps=4,
            **self._pdl_plain)
        return out

    def _products(self) -> dict:
        """Each product kind of a step: (candidates, launch(config)): the kind's products of every
        layer in turn (as a step reads them: each weight cold, the L2 holding the others), the
        lm_head's once."""
        layers = self._layers
        logits = self._torch.empty(int(self._lm_head.shape[0]), dtype=self._torch.float32, device=self.device)
        scratch = self._hidden.clone()
        single = tuple(config for config in CANDIDATES if config[3] == 1)

        def each_layer(product):
            return lambda config: [product(config, layer) for layer in layers]

        return {
            "qkv": (CANDIDATES, each_layer(lambda c, layer: self._product(
                c, self._hidden, layer["qkv"], None, layer["input_norm"], partial=True))),
            "o": (CANDIDATES, each_layer(lambda c, layer: self._product(
                c, self._attended, layer["o"], scratch, bias=layer["o_bias"], residual=self._hidden))),
            "gate_up": (single, each_layer(lambda c, layer: self._product(
                c, self._hidden, layer["gate_up"], self._activation, layer["post_norm"], layer["gate_up_bias"],
                gated=True))),
            "down": (CANDIDATES, each_layer(lambda c, layer: self._product(
                c, self._activation, layer["down"], scratch, bias=layer["down_bias"], residual=self._hidden))),
            "lm_head": (single, lambda c: self._product(c, self._hidden, self._lm_head, logits, self._final_norm)),
        }

    def _choose_configs(self) -> dict:
        """The fastest block shape and split per product kind, timed once per device and set of
        matrix shapes in a process (CUDA; an adapter switch builds a new LayerStep and keeps them);
        elsewhere (a CPU under Triton's interpreter, which runs each program in Python) the one with
        the fewest programs, split where the kind allows."""
        first = self._layers[0]
        key = (str(self.device), self._embed.dtype, len(self._layers), tuple(self._lm_head.shape),
               *(tuple(first[name].shape) for name in ("qkv", "o", "gate_up", "down")))
        if key not in _CHOSEN_CONFIGS:
            _CHOSEN_CONFIGS[key] = self._time_configs()
        return dict(_CHOSEN_CONFIGS[key])

    def _time_configs(self) -> dict:
        configs = {}
        for name, (candidates, launch) in self._products().items():
            if self.device.type != "cuda":
                configs[name] = max(candidates, key=lambda config: (config[0], config[3]))
                continue
            configs[name] = decode_kernels.fastest(candidates, launch, self.device, repeats=2, flush_cache=False)
            log.info("layer step %s product: %s", name, configs[name])
        return configs

    # ------------------------------------------------------------------ the step

    def _attention_buffers(self, slots: int) -> tuple:
        splits = -(-slots // ATTENTION_CHUNK)
        if splits not in self._attention_state:
            torch = self._torch
            size = self.kv_heads * splits * self._group_pad
            self._attention_state[splits] = (torch.empty(size, self.dim, dtype=torch.float32, device=self.device),
                                             torch.empty(size, dtype=torch.float32, device=self.device),
                                             torch.empty(size, dtype=torch.float32, device=self.device))
        return (splits, *self._attention_state[splits])

    def run(self, cache, token, rope_delta, start, logits) -> None:
        """One step: ``token`` (one id, on the device) at each cache layer's fill slot, position
        fill + ``rope_delta``, attending to slots ``start`` .. fill; float32 logits into ``logits``
        (vocab,); every layer's fill counter advanced by one."""
        torch = self._torch
        k = self._kernels
        configs = self.configs
        hidden = self._hidden
        torch.index_select(self._embed, 0, token.view(1), out=hidden.view(1, -1))
        for layer, cache_layer in zip(self._layers, cache.layers):
            keys, values, fill = cache_layer.keys, cache_layer.values, cache_layer.cumulative_length
            qkv = self._product(configs["qkv"], hidden, layer["qkv"], None, layer["input_norm"], partial=True)
            q_norm, k_norm = layer["q_norm"], layer["k_norm"]
            head_norm = q_norm is not None and k_norm is not None
            k["qkv_finish"][(self.heads + 2 * self.kv_heads,)](
                qkv, self._squares, layer["qkv_bias"] if layer["qkv_bias"] is not None else qkv,
                q_norm.weight if head_norm else qkv, k_norm.weight if head_norm else qkv, self._inv_freq, fill,
                rope_delta, self._query, keys, values, int(layer["qkv"].shape[0]), hidden.numel(),
                float(layer["input_norm"].variance_epsilon), keys.stride(1), keys.stride(2),
                values.stride(1), values.stride(2), float(q_norm.variance_epsilon) if head_norm else 0.0,
                self._rope_scale, HEADS=self.heads, KV_HEADS=self.kv_heads, DIM=self.dim,
                SPLITS=configs["qkv"][3], HAS_BIAS=layer["qkv_bias"] is not None, HEAD_NORM=head_norm, num_warps=4,
                **self._pdl_plain)
            splits, states, maxima, sums = self._attention_buffers(int(keys.shape[2]))
            k["attention_partial"][(self.kv_heads, splits)](
                self._query, keys, values, fill, start, states, maxima, sums, layer["scale"], keys.stride(1),
                keys.stride(2), values.stride(1), values.stride(2), splits, GROUP=self._group,
                GROUP_PAD=self._group_pad, DIM=self.dim, CHUNK=ATTENTION_CHUNK, BLOCK_S=ATTENTION_BLOCK,
                PRECISION="ieee" if keys.dtype == torch.float32 else "tf32", num_warps=4, **self._pdl_plain)
            k["attention_combine"][(self.heads,)](
                states, maxima, sums, self._attended, fill, splits, GROUP=self._group, GROUP_PAD=self._group_pad,
                DIM=self.dim, SPLITS_PAD=max(2, 1 << (splits - 1).bit_length()), num_warps=4, **self._pdl_plain)
            self._product(configs["o"], self._attended, layer["o"], hidden, bias=layer["o_bias"], residual=hidden)
            self._product(configs["gate_up"], hidden, layer["gate_up"], self._activation, layer["post_norm"],
                          layer["gate_up_bias"], gated=True)
            self._product(configs["down"], self._activation, layer["down"], hidden, bias=layer["down_bias"],
                          residual=hidden)
        self._product(configs["lm_head"], hidden, self._lm_head, logits.view(-1), self._final_norm)

