"""One matrix-vector product for the projections that read the same input (q/k/v, gate/up).

A decode step multiplies one token's hidden state by every weight matrix once; for a 3B model the
small ones cost far more than their bytes: on an H200 a 2048 -> 256 projection (the k or v of a
grouped-query layer) takes 4.8 us for 1 MB, 2048 -> 2560 (q, k and v together) 5.8 us, and
2048 -> 22016 (gate and up together) 25 us against 2 x 14.4 us apart
(benchmarks/results/gpu_history_h200.txt). Here each layer's q/k/v weights (and biases) and
gate/up weights are copied once into one contiguous matrix and the original parameters become
views of it (no second copy in memory, the model and its LoRA layers unchanged); while
``active()`` the first projection of a group computes the whole group's product and the others
return their slices. LoRA layers wrap the base projections, so an adapter's update is still added
per projection. Outputs equal the separate products (tests/test_fused_projections.py).

``active(matvec)`` also hands every one-row product of the layers (the joint ones, o and down) to
a matrix-vector kernel (decode_kernels.py) instead of torch's linear (tests/test_decode_kernels.py).
"""
from __future__ import annotations

import contextlib
import functools

__all__ = ["FusedProjections"]

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
SINGLES = (("self_attn", "o_proj"), ("mlp", "down_proj"))  # given a matvec kernel, it multiplies these too


def base_linear(module):
    """The plain Linear under a LoRA wrapper (peft's ``get_base_layer``), or the module itself."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _product(matvec):
    """linear(hidden, weight, bias), by ``matvec`` (a one-row product, decode_kernels.py) for one row."""
    import torch

    if matvec is None:
        return torch.nn.functional.linear

    def product(hidden, weight, bias):
        if hidden.numel() == hidden.shape[-1]:  # a shape: fixed in a compiled or recorded step
            return matvec(hidden, weight, bias)
        return torch.nn.functional.linear(hidden, weight, bias)

    return product


class _Group:
    """The projections of one layer that share their input, and their joint weight."""

    def __init__(self, linears: list):
        import torch

        self.linears = linears
        self.sizes = [int(linear.weight.shape[0]) for linear in linears]
        with torch.no_grad():
            self.weight = torch.cat([linear.weight for linear in linears], dim=0)
            biases = [linear.bias for linear in linears]
            self.bias = torch.cat(biases, dim=0) if all(b is not None for b in biases) else None
            offset = 0
            for index, linear in enumerate(linears):  # the parameters now live inside the joint matrix
                rows = slice(offset, offset + self.sizes[index])
                linear.weight.data = self.weight[rows]
                if self.bias is not None:
                    linear.bias.data = self.bias[rows]
                offset += self.sizes[index]
        self._outputs = None
        self._served = 0

    def intact(self) -> bool:
        """Whether every parameter still is the view made here (nothing replaced its tensor since)."""
        offset = 0
        for linear, size in zip(self.linears, self.sizes):
            if linear.weight.data_ptr() != self.weight[offset:offset + size].data_ptr():
                return False
            if self.bias is not None and linear.bias.data_ptr() != self.bias[offset:offset + size].data_ptr():
                return False
            offset += size
        return True

    def forward_for(self, index: int, product):
        """The ``forward`` of projection ``index``; ``product(hidden, weight, bias)`` multiplies."""

        def forward(hidden, *args, **kwargs):
            if index == 0:  # the group's first projection: one product for all of them
                self._outputs = product(hidden, self.weight, self.bias).split(self.sizes, dim=-1)
                self._served = 0
            elif self._outputs is None:
                raise RuntimeError("fused projections called out of order")
            out = self._outputs[index]
            self._served += 1
            if self._served == len(self.sizes):
                self._outputs = None  # released after its last projection
            return out

        return forward


def _single_forward(product, linear, hidden, *args, **kwargs):
    return product(hidden, linear.weight, linear.bias)


class FusedProjections:
    """The joint q/k/v and gate/up matrices of a language model's decoder layers."""

    def __init__(self, groups: list[_Group], singles: list | None = None):
        self.groups = groups
        self.singles = singles or []  # the layers' other projections (plain Linears), for ``active(matvec)``

    @classmethod
    def build(cls, language_model) -> "FusedProjections | None":
        """Fuse every layer's groups; None when the layers do not have them (or share no dtype/device)."""
        groups, singles = [], []
        for layer in getattr(language_model, "layers", []):
            for parent_name, name in SINGLES:
                linear = base_linear(getattr(getattr(layer, parent_name, None), name, None))
                if hasattr(linear, "weight") and linear.weight.dim() == 2:
                    singles.append(linear)
            for parent_name, names in GROUPS:
                parent = getattr(layer, parent_name, None)
                linears = [base_linear(getattr(parent, name, None)) for name in names]
                if parent is None or not all(hasattr(linear, "weight") for linear in linears):
                    return None
                weights = [linear.weight for linear in linears]
                if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
                    return None
                groups.append(linears)
        if not groups:
            return None
        return cls([_Group(linears) for linears in groups], singles)

    def intact(self) -> bool:
        return all(group.intact() for group in self.groups)

    @contextlib.contextmanager
    def active(self, matvec=None):
        """The base projections use the joint products inside this block (a compiled or recorded
        step keeps them). ``matvec(hidden, weight, bias)``: computes one-row products (of the
        groups and of the layers' other projections) instead of torch's linear."""
        patched = []
        product = _product(matvec)
        try:
            for group in self.groups:
                for index, linear in enumerate(group.linears):
                    linear.forward = group.forward_for(index, product)
                    patched.append(linear)
            if matvec is not None:
                for linear in self.singles:
                    linear.forward = functools.partial(_single_forward, product, linear)
                    patched.append(linear)
            yield
        finally:
            for linear in patched:
                linear.__dict__.pop("forward", None)
            for group in self.groups:
                group._outputs = None
