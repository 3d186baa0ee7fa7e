"""MLP matrices padded to an aligned hidden size, swapped in while a CUDA graph is recorded.

Qwen2.5-VL's vision blocks (every size, 3B to 72B) have an MLP hidden size of 3420: not a multiple
of 8, so a row of the gate/up outputs and of the down product's input is not 16-byte aligned, and
cuBLAS falls back from Hopper's kernels (TMA, wgmma) to sm80 ones: on an H200 the tower's MLP
products ran at ~180 TFLOP/s and took 7 of its 11 ms per 640x480 frame, against ~600 TFLOP/s for
its q/k/v product (benchmarks/results/gpu_history_h200.txt run 32). Padding the hidden size to a
multiple of 64 with zero rows of gate/up (and zero biases) and zero columns of down changes no
value: SiLU(0) * 0 = 0 adds nothing to the down product.

The padded matrices are the storage of the module's own weights (the originals are views of them,
the gate/up rows a prefix, the down columns a strided slice), so the padding costs no memory and an
in-place change of a weight reaches both. ``active()`` swaps the full padded matrices in while the
caller records; outside, the modules keep their shapes. An MLP whose weights were replaced since
(another dtype, a new state dict) is no longer a view of its padded matrices, and one whose
projections an adapter has wrapped since adds updates of the unpadded size: both compute as they are.
"""
from __future__ import annotations

import contextlib

__all__ = ["AlignedMlps"]

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_SWAPS = "_aligned_mlp_swaps"  # an MLP's padded matrices, kept on the module: another AlignedMlps reuses them
ALIGN = 8  # elements: 16 bytes of bfloat16, what Hopper's GEMM kernels need of a row
PAD_TO = 64  # the padded size: a whole GEMM tile edge


class AlignedMlps:
    """Padded gate/up/down matrices for the MLPs of ``blocks`` whose hidden size is not a multiple of
    ALIGN and whose three projections are plain torch Linear layers (an adapter's layers are left
    alone); the others are left as they are. ``padded`` counts the MLPs padded."""

    def __init__(self, blocks):
        self._mlps: list[tuple[object, list]] = []  # (MLP, its (module, attribute, padded Parameter) swaps)
        for block in blocks:
            mlp = getattr(block, "mlp", None)
            swaps = self._pad(mlp)
            if swaps:
                self._mlps.append((mlp, swaps))

    @property
    def padded(self) -> int:
        return len(self._mlps)

    def _pad(self, mlp) -> list:
        import torch

        if mlp is not None and _SWAPS in vars(mlp):
            return vars(mlp)[_SWAPS]
        projections = [getattr(mlp, name, None) for name in PROJECTIONS]
        if not all(type(module) is torch.nn.Linear for module in projections):
            return []
        gate, up, down = projections
        hidden = int(gate.weight.shape[0])
        if hidden % ALIGN == 0 or int(up.weight.shape[0]) != hidden or int(down.weight.shape[1]) != hidden:
            return []
        size = -(-hidden // PAD_TO) * PAD_TO
        swaps = []
        with torch.no_grad():
            for module in (gate, up):  # extra zero rows (and zero biases)
                swaps.append(self._adopt(module, "weight", module.weight.new_zeros(size, module.weight.shape[1]),
                                         lambda padded: padded[:hidden]))
                if module.bias is not None:
                    swaps.append(self._adopt(module, "bias", module.bias.new_zeros(size),
                                             lambda padded: padded[:hidden]))
            swaps.append(self._adopt(down, "weight", down.weight.new_zeros(down.weight.shape[0], size),
                                     lambda padded: padded[:, :hidden]))  # extra zero columns
        vars(mlp)[_SWAPS] = swaps
        return swaps

    @staticmethod
    def _adopt(module, attribute: str, padded, view) -> tuple:
        """``padded`` takes the parameter's values; the module keeps a view of it as that parameter."""
        import torch

        original = getattr(module, attribute)
        view(padded).copy_(original)
        setattr(module, attribute, torch.nn.Parameter(view(padded), requires_grad=original.requires_grad))
        return module, attribute, torch.nn.Parameter(padded, requires_grad=original.requires_grad)

    @staticmethod
    def _intact(mlp, swaps) -> bool:
        """Whether ``mlp`` still computes with the padded modules: its own plain Linear projections
        (no adapter wrapped around them since), each weight still a view of its padded matrix."""
        import torch

        modules = {id(module) for module, _, _ in swaps}
        return (all(type(getattr(mlp, name, None)) is torch.nn.Linear and id(getattr(mlp, name)) in modules
                    for name in PROJECTIONS)
                and all(getattr(module, attribute).data_ptr() == padded.data_ptr() for module, attribute, padded in swaps))

    @contextlib.contextmanager
    def active(self):
        """While inside: the padded MLPs compute with their full padded matrices."""
        kept = []
        for mlp, swaps in self._mlps:
            if not self._intact(mlp, swaps):
                continue
            for module, attribute, padded in swaps:
                kept.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, padded)
        try:
            yield
        finally:
            for module, attribute, original in kept:
                setattr(module, attribute, original)
