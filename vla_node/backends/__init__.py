"""Model backends. ``TransformersBackend`` is imported lazily (it pulls in torch)."""

from vla_node.backends.base import (
    Backend,
    BackendError,
    GenerationRequest,
    GenerationResult,
    PixelLimits,
)

__all__ = [
    "Backend",
    "BackendError",
    "GenerationRequest",
    "GenerationResult",
    "PixelLimits",
    "TransformersBackend",
]


def __getattr__(name):
    if name == "TransformersBackend":
        from vla_node.backends.transformers_backend import TransformersBackend

        return TransformersBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
