"""A vision tower's patch embedding as one matrix product, swapped in while a CUDA graph is recorded.

Qwen-VL towers embed each patch (3 channels x 2 frames x 14 x 14 pixels) with a Conv3d whose kernel
equals its stride: one output per patch, the same sums as a matrix product of the flattened patches
with the flattened kernel. For bfloat16 cuDNN runs it as an implicit-GEMM kernel at ~17 TFLOP/s on
an H200 (0.27 ms of a 640x480 frame's tower, benchmarks/results/gpu_history_h200.txt run 32); the
product takes a few microseconds. ``active()`` swaps that product in as the embedding's forward;
outside, the module keeps its own.
"""
from __future__ import annotations

import contextlib

__all__ = ["PatchEmbedAsLinear"]


class PatchEmbedAsLinear:
    """``visual.patch_embed`` as a matrix product while active, where its ``proj`` is a plain Conv3d
    whose kernel covers each patch exactly (kernel = stride, no padding, dilation or groups);
    ``applies`` says whether it is."""

    def __init__(self, visual):
        embed = getattr(visual, "patch_embed", None)
        self._embed = embed if self._exact(getattr(embed, "proj", None)) else None

    @property
    def applies(self) -> bool:
        return self._embed is not None

    @staticmethod
    def _exact(proj) -> bool:
        import torch

        return (type(proj) is torch.nn.Conv3d and tuple(proj.kernel_size) == tuple(proj.stride)
                and not any(proj.padding) and set(proj.dilation) == {1} and proj.groups == 1
                and proj.padding_mode == "zeros")

    @contextlib.contextmanager
    def active(self):
        """While inside: the embedding is flattened patches times the flattened kernel (+ bias)."""
        embed = self._embed
        if embed is None or not self._exact(getattr(embed, "proj", None)):  # an adapter may wrap it since
            yield
            return
        import torch

        def forward(hidden_states):
            proj = embed.proj
            weight = proj.weight.reshape(proj.weight.shape[0], -1)  # (embed, channels x frames x rows x cols)
            patches = hidden_states.reshape(-1, weight.shape[1]).to(weight.dtype)
            return torch.nn.functional.linear(patches, weight, proj.bias)

        embed.forward = forward
        try:
            yield
        finally:
            del embed.forward  # back to the class's forward
