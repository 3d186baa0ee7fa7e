"""The training loss with the prompt prefix that every sample shares computed once per batch.

Every sample of an action dataset starts with the same tokens: the system prompt that
vla_node.prompt builds and the user turn's opening, up to the image (396 of the ~600 tokens of an
embedded-model sample). Under causal attention their keys and values do not depend on anything
after them, so a batch computes them once, as a batch of one, and every sample's own tokens
(image, command, answer) attend to them as a KV cache expanded to the batch. The gradient flows
back through that cache into the prefix's single computation, so loss and gradients are the
ordinary forward's (tests/test_fast_path.py compares both). Logits are computed only where a
label is: the vocabulary projection of every prompt position was most of the rest.

Works on transformers' own modules (Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``model.model`` and
``lm_head``), so peft's LoRA layers and modules_to_save take part as in the ordinary forward.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from training.collate import IGNORE_INDEX

__all__ = ["is_peft_model", "hf_model_of", "rope_positions", "shared_prefix_loss", "one_clip_grid", "ordinary_inputs",
           "vision_grid_inputs", "clip_grid_inputs", "SUFFIX_ATTENTION"]

# The language model's attention while the shared-prefix loss runs: queries are the batch's own
# tokens, keys the prefix's and theirs. transformers' mask construction for a cache-extended
# forward depends on its version, the torch version and the SDPA backend (a build on an H200 with
# bf16 trained a model that never saw its own command: its tokens attended as if aligned top-left);
# this states the mask itself.
SUFFIX_ATTENTION = "vla_shared_prefix_sdpa"


def causal_suffix_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query (B, heads, S, d), key/value (B, kv_heads, K, d) with the S queries the last S of the
    K positions: query i sees keys 0 .. K - S + i (causal, aligned bottom-right)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    repeat = query.shape[1] // key.shape[1]
    if repeat > 1:
        key = key.repeat_interleave(repeat, dim=1)
        value = value.repeat_interleave(repeat, dim=1)
    q_len, k_len = query.shape[2], key.shape[2]
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


class _suffix_attention:
    """Run the language model's attention as causal_suffix_sdpa inside the block."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        from transformers import AttentionInterface

        AttentionInterface.register(SUFFIX_ATTENTION, causal_suffix_sdpa)
        self.saved = self.config._attn_implementation
        self.config._attn_implementation = SUFFIX_ATTENTION

    def __exit__(self, *exc):
        self.config._attn_implementation = self.saved
        return False


def is_peft_model(model) -> bool:
    return callable(getattr(model, "get_base_model", None))


def hf_model_of(model):
    """The transformers *ForConditionalGeneration under peft / accelerate wrappers."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    return model.get_base_model() if is_peft_model(model) else model


def rope_positions(model, ids: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The model's own multimodal rotary positions [3, 1, L] of one sample ``ids`` [1, L] holding
    one image of grid ``grid_thw`` [1, 3]. Every sample with that image grid has the same positions
    at the same index (the prefix is shared, the text after the image is numbered on from it)."""
    import inspect

    core = hf_model_of(model).model
    kwargs = {"image_grid_thw": grid_thw, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in inspect.signature(core.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (ids == core.config.image_token_id).int()
    positions, _ = core.get_rope_index(ids, **kwargs)
    return positions


def shared_prefix_loss(model, prefix_ids: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                       pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                       position_ids: torch.Tensor, same_size_images: bool = False,
                       label_positions: torch.Tensor | None = None,
                       image_grid: Sequence[int] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, as transformers' causal-LM loss.

    prefix_ids [1, P]: the shared tokens; input_ids / labels [B, S]: each sample's tokens after them
    (labels IGNORE_INDEX where no loss is taken); position_ids [3, 1, P + S]: rope_positions of the
    longest sample; pixel_values / image_grid_thw: the batch's images, as the processor gives them.
    same_size_images: every row of image_grid_thw is the first's (the fast path's data), so the vision
    tower may take the B images as the B frames of one clip (see one_clip_grid).
    label_positions: the flat indices (row * S + j) of the positions j whose next token is labelled
    (training.fast_path.label_positions); without them the labels are found with a boolean mask,
    whose size the host must read back from the device before the loss can go on.
    image_grid: with same_size_images, the one grid row (t, h, w) as host numbers: the tower's
    grid-derived inputs are then computed once per batch size (clip_grid_inputs), not every step.
    """
    from transformers import DynamicCache

    hf = hf_model_of(model)
    core = hf.model
    language_model = core.language_model
    batch, prefix = input_ids.shape[0], prefix_ids.shape[1]
    with _suffix_attention(language_model.config):
        shared = language_model(input_ids=prefix_ids, position_ids=position_ids[:, :, :prefix], use_cache=True)
        cache = DynamicCache(config=language_model.config)
        for index, layer in enumerate(shared.past_key_values.layers):
            cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), index)
        vision_grid = one_clip_grid(image_grid_thw) if same_size_images else image_grid_thw
        given = clip_grid_inputs(core.visual, image_grid, batch, input_ids.device) \
            if same_size_images and image_grid is not None else None
        with _tower_takes(core.visual, given):
            hidden = core(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=vision_grid,
                          position_ids=position_ids[:, :, prefix:].expand(-1, batch, -1), past_key_values=cache,
                          use_cache=True).last_hidden_state
    # position j predicts token j + 1; the first own token (an image token) is never a label
    if label_positions is not None:
        logits = hf.lm_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, label_positions))
        return F.cross_entropy(logits.float(), labels.reshape(-1).index_select(0, label_positions + 1))
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = hf.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def one_clip_grid(image_grid_thw: torch.Tensor) -> torch.Tensor:
    """B images of one grid (t, h, w) as one clip of B * t frames: [[B * t, h, w]].

    Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers attend per frame (each frame its own segment, its
    own windows) and number each frame's patches as an image's, and the patches of a clip's frames
    follow each other as those of consecutive images do: the tower's output is the same. What
    changes is the host's work: transformers builds the rotary position ids (and Qwen2.5-VL's window
    order) in Python loops over the grid's rows and splits the features per row, 18-34 small
    operations an image (benchmarks/results/training_step_ops_cpu.txt); at batch 512 that is more
    than the whole rest of a small model's step, every step, and a GPU waits for it. The language
    model's positions are given (rope_positions of the real grid), so it never reads this grid."""
    grid = image_grid_thw[:1].clone()
    grid[:, 0] *= image_grid_thw.shape[0]
    return grid


# transformers' vision_utils helpers that derive a vision tower's inputs from its grid (Python loops,
# values read back to the host) and the keys under which the tower takes them ready-made instead
_GRID_HELPERS = {
    "get_vision_position_ids": ("position_ids",),
    "get_vision_attention_seqlens": ("cu_seqlens", "max_seqlen"),
    "get_vision_window_index": ("window_index", "cu_window_seqlens", "max_window_seqlen"),
    "get_vision_interpolation_indices_and_weights": ("interp_indices", "interp_weights"),
}


def vision_grid_inputs(visual, grid_thw: torch.Tensor) -> dict | None:
    """What ``visual`` (a Qwen-VL vision tower) derives from ``grid_thw`` before its first layer,
    computed with the same transformers helpers, for the tower to take as given (the helpers return
    a value passed under its key). None where this transformers or tower uses a helper not known here,
    or none at all (then the tower computes its inputs itself)."""
    import sys

    namespace = vars(sys.modules[type(visual).__module__])
    used = {name for name in namespace if name.startswith("get_vision_") and callable(namespace[name])}
    if not used or not used <= set(_GRID_HELPERS):
        return None
    from transformers.utils.generic import get_max_seqlen

    config, merge = visual.config, visual.spatial_merge_size
    given: dict = {}
    if "get_vision_position_ids" in used:
        given["position_ids"] = namespace["get_vision_position_ids"](grid_thw, merge)
    if "get_vision_attention_seqlens" in used:
        given["cu_seqlens"], given["max_seqlen"] = namespace["get_vision_attention_seqlens"](grid_thw, config)
    if "get_vision_window_index" in used:
        given["window_index"], given["cu_window_seqlens"] = namespace["get_vision_window_index"](
            grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size)
        given["max_window_seqlen"] = get_max_seqlen(given["cu_window_seqlens"], config)
    if "get_vision_interpolation_indices_and_weights" in used:
        given["interp_indices"], given["interp_weights"] = namespace["get_vision_interpolation_indices_and_weights"](
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=config.spatial_merge_size)
    return {key: value for key, value in given.items() if value is not None}  # None: the tower's own default


def clip_grid_inputs(visual, image_grid: Sequence[int], batch: int, device: torch.device) -> dict | None:
    """vision_grid_inputs of one_clip_grid's grid for ``batch`` images of grid ``image_grid`` (t, h, w),
    known on the host: computed once per batch size and device and kept on the tower, so a step of the
    fast path neither repeats that host work nor waits for the GPU to hand its grid back."""
    t, h, w = (int(v) for v in image_grid)
    cache = visual.__dict__.setdefault("_vla_clip_grid_inputs", {})
    key = (str(device), batch * t, h, w)
    if key not in cache:
        cache[key] = vision_grid_inputs(visual, torch.tensor([[batch * t, h, w]], device=device))
    return cache[key]


class _tower_takes:
    """Inside the block, ``visual`` is called with ``given`` added to its keyword arguments."""

    def __init__(self, visual, given: dict | None):
        self.visual, self.given, self.handle = visual, given, None

    def __enter__(self):
        if self.given:
            given = self.given
            self.handle = self.visual.register_forward_pre_hook(
                lambda module, args, kwargs: (args, {**kwargs, **given}), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
        return False


def ordinary_inputs(model, prefix_ids: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, rows: int | None = None,
                    label_positions: torch.Tensor | None = None) -> dict:
    """The same samples (the first ``rows``) as the ordinary forward's inputs: whole sequences (a fast
    path batch's label_positions are not needed: the ordinary loss finds its labels itself)."""
    import inspect

    hf = hf_model_of(model)
    rows = input_ids.shape[0] if rows is None else min(rows, input_ids.shape[0])
    ids = torch.cat([prefix_ids.expand(rows, -1), input_ids[:rows]], dim=1)
    patches = int(image_grid_thw[:rows].prod(dim=-1).sum())
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "labels": torch.cat([torch.full_like(prefix_ids.expand(rows, -1), IGNORE_INDEX), labels[:rows]], dim=1),
           "pixel_values": pixel_values[:patches], "image_grid_thw": image_grid_thw[:rows]}
    if "mm_token_type_ids" in inspect.signature(hf.model.forward).parameters:
        out["mm_token_type_ids"] = (ids == hf.config.image_token_id).int()
    return out
