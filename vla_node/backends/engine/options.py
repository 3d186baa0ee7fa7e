"""The engine's switches, chosen once: a frozen object given at construction.

The node parameters that reach the engine are the first four (prefix_cache, decode_cache,
compile_decode, compile_layers; vla_node.settings declares them); the rest are for tests and
benchmarks that compare one speed trick with and without it. Another configuration means another
engine (TransformersBackend.use_engine): a recorded graph keeps the kernels it was recorded with,
so nothing here changes under a running engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from vla_node.settings import PARAMETERS

__all__ = ["EngineOptions", "DECODE_CACHES"]

DECODE_CACHES = PARAMETERS["decode_cache"].choices


@dataclass(frozen=True)
class EngineOptions:
    # ---- node parameters (vla_node.settings)
    prefix_cache: bool = True  # prefill the shared system-prompt prefix once per adapter (prefix_cache.py)
    decode_cache: str = "auto"  # auto (static on CUDA, dynamic elsewhere) | dynamic | static
    compile_decode: bool = True  # static on CUDA: torch.compile the decode step before recording it
    compile_layers: bool = True  # CUDA: compile the vision blocks and the prefill's norms/MLPs (regional_compile.py)
    # ---- one speed trick each, all on by default
    frame_cache: int = 2  # vision outputs kept per camera frame (frame_cache.py); 0: every command encodes
    one_image_inputs: bool = True  # one image's inputs without the processor's call (one_image_inputs.py)
    gpu_image_processing: bool = True  # CUDA: the image processor resizes and patchifies on the GPU
    block_vision_attention: bool = True  # CUDA: one attention call per vision layer (vision_attention.py)
    vision_graphs: bool = True  # CUDA, with the block attention: the tower as a graph per grid (vision_graph.py)
    static_prefill: bool = True  # static: the prompt prefilled by prefill_graph.py (else generate's prefill)
    decode_kernels: bool = True  # static on CUDA: the step's products, attention, choice by Triton (decode_kernels.py)
    layer_kernels: bool = True  # ... and one row's whole step by fused layer kernels (layer_step.py)
    dependent_launch: bool = True  # ... launched programmatically dependent where the GPU allows
    # ---- sizes
    max_batch_size: int = 8  # requests generate_batch() decodes together; more are split into chunks
    # The smallest StaticCache: a new size means a new decoder, compiled again (tens of seconds on
    # CUDA), and 2048 slots hold a 640x480 frame's prompt + 128 new tokens, so the warm-up's cache
    # already fits the camera's commands; attending over unused slots costs ~20 us per token (3B).
    static_cache_min_slots: int = 2048
    # On CUDA the warm-up also encodes a grey frame of this (width, height): the common camera size,
    # whose vision blocks are then compiled and recorded before the first command; None: skip it.
    warmup_frame_size: tuple[int, int] | None = (640, 480)

    def __post_init__(self):
        if self.decode_cache not in DECODE_CACHES:
            raise ValueError(f"invalid decode_cache {self.decode_cache!r}; use one of {', '.join(DECODE_CACHES)}")
        if self.frame_cache < 0 or self.max_batch_size < 1 or self.static_cache_min_slots < 0:
            raise ValueError(f"frame_cache and static_cache_min_slots must be >= 0, max_batch_size >= 1 "
                             f"(got {self.frame_cache}, {self.static_cache_min_slots}, {self.max_batch_size})")
