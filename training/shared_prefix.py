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

import torch
import torch.nn.functional as F

from training.collate import IGNORE_INDEX

__all__ = ["is_peft_model", "hf_model_of", "rope_positions", "shared_prefix_loss", "one_clip_grid", "ordinary_inputs",
           "SUFFIX_ATTENTION"]

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
                       position_ids: torch.Tensor, same_size_images: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, as transformers' causal-LM loss.

    prefix_ids [1, P]: the shared tokens; input_ids / labels [B, S]: each sample's tokens after them
    (labels IGNORE_INDEX where no loss is taken); position_ids [3, 1, P + S]: rope_positions of the
    longest sample; pixel_values / image_grid_thw: the batch's images, as the processor gives them.
    same_size_images: every row of image_grid_thw is the first's (the fast path's data), so the vision
    tower may take the B images as the B frames of one clip (see one_clip_grid).
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
        hidden = core(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=vision_grid,
                      position_ids=position_ids[:, :, prefix:].expand(-1, batch, -1), past_key_values=cache,
                      use_cache=True).last_hidden_state
    # position j predicts token j + 1; the first own token (an image token) is never a label
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


def ordinary_inputs(model, prefix_ids: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, rows: int | None = None) -> dict:
    """The same samples (the first ``rows``) as the ordinary forward's inputs: whole sequences."""
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
