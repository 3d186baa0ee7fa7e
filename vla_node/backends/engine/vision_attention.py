"""One attention call per vision layer instead of one per window (Qwen2.5-VL vision tower, SDPA).

Without flash-attn, transformers' Qwen2.5-VL vision attention splits the patch sequence at every
window boundary (``cu_seqlens.tolist()``: a host sync) and calls SDPA once per window: a 640x480
frame has ~25 windows, so 32 layers make ~800 tiny kernel launches, which on a GPU cost more than
the attention itself. The vision code hands flash-attention implementations the window boundaries
(``cu_seq_lens_q``, ``max_length_q``) in one call instead; this module registers such an
implementation: the windows (or, in full-attention layers, the images) are gathered into one
padded batch (windows x heads x longest window x head_dim) and attended in one SDPA call with a
key-padding mask, so each patch sees exactly its own window, as in the loop, at the loop's FLOPs.
Qwen2-VL and Qwen3-VL attend per image (one segment for a camera frame): one SDPA call as well.
No step reads a value back to the host, so the tower can be recorded as a CUDA graph
(vision_graph.py) once the segment lengths are given as numbers. Enabled on CUDA only (a CPU has no
launch overhead to save).
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
    if cu_seq_lens_q is None or cu_seq_lens_q.shape[0] == 2:  # one segment (a shape: no host read)
        out = sdpa(query, key, value, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    n, heads, dim = query.shape[2], query.shape[1], query.shape[3]
    starts, lengths = cu_seq_lens_q[:-1], cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    longest = int(max_length_q) if max_length_q is not None else int(lengths.max())
    slot = torch.arange(longest, device=query.device, dtype=cu_seq_lens_q.dtype)
    valid = slot[None, :] < lengths[:, None]  # (segments, longest)
    position = starts[:, None] + slot[None, :]
    index = position.clamp(max=n - 1)  # padding slots read a real row, masked

    def gather(states):  # (1, heads, N, d) -> (segments, heads, longest, d)
        return states[0][:, index].transpose(0, 1)

    out = sdpa(gather(query), gather(key), gather(value), attn_mask=valid[:, None, None, :],
               dropout_p=dropout, scale=scaling)
    # each valid slot goes back to its patch; padding slots all land in one spare row, dropped
    target = torch.where(valid, position, torch.full_like(position, n)).reshape(-1).long()
    rows = out.new_empty(n + 1, heads, dim)
    rows.index_copy_(0, target, out.transpose(1, 2).reshape(-1, heads, dim))
    return rows[:n].unsqueeze(0), None


def use_block_attention(model) -> bool:
    """Switch a loaded Qwen-VL model's vision tower (if it runs on SDPA) to the one-call block
    attention. Returns whether it did."""
    from transformers import AttentionInterface

    visual = getattr(getattr(model, "model", model), "visual", None)
    config = getattr(visual, "config", None)
    families = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    if (config is None or not getattr(config, "model_type", "").startswith(families)
            or config._attn_implementation != "sdpa"):
        return False
    AttentionInterface.register(BLOCK_ATTENTION, block_diagonal_sdpa)
    config._attn_implementation = BLOCK_ATTENTION
    return True
