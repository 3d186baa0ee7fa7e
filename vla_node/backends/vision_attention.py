"""One attention call per vision layer instead of one per window (Qwen2.5-VL vision tower, SDPA).

Without flash-attn, transformers' Qwen2.5-VL vision attention splits the patch sequence at every
window boundary (``cu_seqlens.tolist()``: a host sync) and calls SDPA once per window: a 640x480
frame has ~25 windows, so 32 layers make ~800 tiny kernel launches, which on a GPU cost more than
the attention itself. The vision code hands flash-attention implementations the window boundaries
(``cu_seq_lens_q``, ``max_length_q``) in one call instead; this module registers such an
implementation: the windows (or, in full-attention layers, the images) are gathered into one
padded batch (windows x heads x longest window x head_dim) and attended in one SDPA call with a
key-padding mask, so each patch sees exactly its own window, as in the loop, at the loop's FLOPs.
Enabled on CUDA only (a CPU has no launch overhead to save).
"""
from __future__ import annotations

__all__ = ["BLOCK_ATTENTION", "block_diagonal_sdpa", "use_block_attention"]

# transformers routes cu_seqlens to implementations whose name contains "flash"
BLOCK_ATTENTION = "flash_style_block_diagonal_sdpa"


def block_diagonal_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                        cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query/key/value: (1, heads, N, head_dim); cu_seq_lens_q: segment (window/image) starts + N.
    Returns ((1, N, heads, head_dim), None) like transformers' attention implementations."""
    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    if cu_seq_lens_q is None:  # one segment
        out = sdpa(query, key, value, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    n = query.shape[2]
    starts, lengths = cu_seq_lens_q[:-1], cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    longest = int(max_length_q) if max_length_q is not None else int(lengths.max())
    slot = torch.arange(longest, device=query.device, dtype=cu_seq_lens_q.dtype)
    valid = slot[None, :] < lengths[:, None]  # (segments, longest)
    index = (starts[:, None] + slot[None, :]).clamp(max=n - 1)  # padding slots read a real row, masked

    def gather(states):  # (1, heads, N, d) -> (segments, heads, longest, d)
        return states[0][:, index].transpose(0, 1)

    out = sdpa(gather(query), gather(key), gather(value), attn_mask=valid[:, None, None, :],
               dropout_p=dropout, scale=scaling)
    # segments are consecutive and in order: their valid slots, row-major, are positions 0..N-1
    out = out.transpose(1, 2)[valid]  # (N, heads, d)
    return out.unsqueeze(0), None


def use_block_attention(model) -> bool:
    """Switch a loaded Qwen2.5-VL model's vision tower (if it runs on SDPA) to the one-call block
    attention. Returns whether it did (other families attend per image already: left alone)."""
    from transformers import AttentionInterface

    visual = getattr(getattr(model, "model", model), "visual", None)
    config = getattr(visual, "config", None)
    if config is None or not getattr(config, "model_type", "").startswith("qwen2_5_vl") or config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(BLOCK_ATTENTION, block_diagonal_sdpa)
    config._attn_implementation = BLOCK_ATTENTION
    return True
