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

__all__ = ["hf_model_of", "rope_positions", "shared_prefix_loss"]


def hf_model_of(model):
    """The transformers *ForConditionalGeneration under peft / accelerate wrappers."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


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
                       position_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, as transformers' causal-LM loss.

    prefix_ids [1, P]: the shared tokens; input_ids / labels [B, S]: each sample's tokens after them
    (labels IGNORE_INDEX where no loss is taken); position_ids [3, 1, P + S]: rope_positions of the
    longest sample; pixel_values / image_grid_thw: the batch's images, as the processor gives them.
    """
    from transformers import DynamicCache

    hf = hf_model_of(model)
    core = hf.model
    language_model = core.language_model
    batch, prefix = input_ids.shape[0], prefix_ids.shape[1]
    shared = language_model(input_ids=prefix_ids, position_ids=position_ids[:, :, :prefix], use_cache=True)
    cache = DynamicCache(config=language_model.config)
    for index, layer in enumerate(shared.past_key_values.layers):
        cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), index)
    hidden = core(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                  position_ids=position_ids[:, :, prefix:].expand(-1, batch, -1), past_key_values=cache,
                  use_cache=True).last_hidden_state
    # position j predicts token j + 1; the first own token (an image token) is never a label
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = hf.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])
