"""A guard for code that must run without reading tensors back to the host (CUDA-graph bodies)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def no_host_reads():
    """Fails on any tensor -> Python value read (``tolist``, ``item``, ``int()``, ``bool()``): the
    operations a CUDA graph cannot record."""
    names = ("tolist", "item", "__int__", "__bool__", "__index__", "nonzero")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")
        return read

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
