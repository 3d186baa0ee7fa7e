"""torch.compile for the repeated modules of a model, swapped in while a CUDA graph is recorded.

Compiling a whole vision tower or language model unrolls every layer into one graph: 40-100 s per
input shape on an H200 for the 3B architecture (gpu_history_h200.txt runs 9 and 17). Its layers
are instances of a few classes with equal shapes, so compiling each module's forward on its own
lets them share one compiled graph per class and shape (torch.compile treats the weights as
inputs): seconds instead of minutes, for most of the fusion (norms, rotary, activations). The
compiled forwards run only while the caller records its graph (replays run no Python); outside,
the modules keep their own forwards.
"""
from __future__ import annotations

import contextlib

__all__ = ["CompiledForwards"]


class CompiledForwards:
    """Compiled forwards for ``modules`` (made at the first ``active()``; ``dynamic`` as for
    torch.compile). ``enabled`` False: ``active()`` changes nothing."""

    def __init__(self, modules, dynamic: bool | None = False, enabled: bool = True):
        self.modules = list(modules)
        self.dynamic = dynamic
        self.enabled = bool(enabled) and bool(self.modules)
        self._forwards = None

    @contextlib.contextmanager
    def active(self):
        """While inside: each module runs its compiled forward."""
        if not self.enabled:
            yield
            return
        import torch

        if self._forwards is None:
            self._forwards = [torch.compile(module.forward, dynamic=self.dynamic) for module in self.modules]
        for module, forward in zip(self.modules, self._forwards):
            module.forward = forward
        try:
            yield
        finally:
            for module in self.modules:
                del module.forward  # back to the class's forward
