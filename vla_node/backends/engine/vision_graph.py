"""The vision tower replayed as one CUDA graph per image grid.

A Qwen-VL vision tower runs ~2,000 small kernels for one camera frame (32 blocks of norms, rotary,
attention, MLP); launched one by one from Python they cost about twice the GPU time they keep the
GPU busy (Qwen2.5-VL-3B, 640x480 on an H200: 33 ms wall for 18 ms of kernels,
benchmarks/results/gpu_history_h200.txt). Everything in the tower that depends on the frame's
size alone (rotary positions, the window order, segment boundaries, Qwen3-VL's interpolated
position-embedding taps) is a function of the image grid; transformers 5 lets a caller pass those
pre-computed (``transformers.vision_utils``), after which the tower is pure tensor work: it is
recorded once per grid and replayed for every frame of that size. The attention must then run
without host syncs too: the graphs need the block attention of vision_attention.py.

With ``compile_blocks`` the recorded tower runs its blocks compiled by torch.compile (inductor
fuses each block's norms, rotary and activation kernels): all blocks share one compiled forward
per grid and attention kind, so the first frame of a size compiles in seconds where compiling the
whole tower took 47-98 s (3B, 640x480 on an H200: 17.9 -> 11.8 ms per frame for 8.1 s of compile
at the first frame, 5.4 s at a second size; gpu_history_h200.txt run 21). The blocks keep their
own forwards outside the recording.

The recording runs Qwen2.5-VL's block MLPs with their hidden size padded from 3420 to 3456
(aligned_mlp.py: Hopper's GEMM kernels need 16-byte aligned rows) and the patch embedding as a
matrix product instead of cuDNN's Conv3d (patch_linear.py).

Outputs equal the tower's own (tests/test_vision_graph.py); on a CPU, or when a grid cannot be
recorded, the same pre-computed call runs eagerly.
"""
from __future__ import annotations

import logging
import threading

from vla_node.backends.engine.aligned_mlp import AlignedMlps
from vla_node.backends.engine.cuda_graph import record_cuda_graph
from vla_node.backends.engine.patch_linear import PatchEmbedAsLinear
from vla_node.backends.engine.regional_compile import CompiledForwards
from vla_node.lru import CountingLru, LruBacked

__all__ = ["VisionGraphs", "vision_plan"]

log = logging.getLogger(__name__)


def vision_plan(visual, grid_thw) -> dict:
    """The tower's grid-only tensors for ``grid_thw`` (num_images x 3, on the tower's device), as
    the keyword arguments its forward pops instead of computing them (transformers >= 5.23)."""
    from transformers import vision_utils

    config = visual.config
    merge = visual.spatial_merge_size
    plan = {"position_ids": vision_utils.get_vision_position_ids(grid_thw, merge)}
    cu_seqlens, _ = vision_utils.get_vision_attention_seqlens(grid_thw, config)
    plan["cu_seqlens"] = cu_seqlens
    plan["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: windowed attention in most blocks
        window_index, cu_window_seqlens = vision_utils.get_vision_window_index(
            grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size)
        plan["window_index"] = window_index.to(grid_thw.device)
        plan["cu_window_seqlens"] = cu_window_seqlens
        plan["max_window_seqlen"] = int((cu_window_seqlens[1:] - cu_window_seqlens[:-1]).max())
    if hasattr(visual, "num_grid_per_side"):  # Qwen3-VL: learned position table resampled to the grid
        indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=config.spatial_merge_size)
        plan["interp_indices"], plan["interp_weights"] = indices, weights
    return plan


def supports(model) -> bool:
    """A Qwen-VL tower whose forward takes the pre-computed grid tensors (transformers >= 5.23)."""
    try:
        from transformers import vision_utils
    except ImportError:
        return False
    visual = getattr(getattr(model, "model", None), "visual", None)
    return (visual is not None and hasattr(vision_utils, "get_vision_window_index")
            and hasattr(vision_utils, "get_vision_interpolation_indices_and_weights")
            and hasattr(visual, "spatial_merge_size"))


class _Recorded:
    """One grid's static input buffer, plan and (on CUDA) graph with its output tensors."""

    def __init__(self, pixels, grid_thw, plan, graph, outputs):
        self.pixels, self.grid_thw, self.plan, self.graph, self.outputs = pixels, grid_thw, plan, graph, outputs


class VisionGraphs(LruBacked):
    """``get_image_features`` for one model, by a CUDA graph per image grid (an LRU of ``capacity``
    grids: a robot's cameras have a few fixed sizes).

    ``use_graph``: record graphs (CUDA only); otherwise, or after a failed recording, the
    pre-computed call runs eagerly. ``compile_blocks``: record the blocks compiled (CUDA graphs
    only; a grid whose compiled blocks cannot be recorded is recorded uncompiled, and so are later
    ones). Build a new one (or ``clear()``) when the tower's weights or adapter change: a graph
    keeps the kernels and addresses it was recorded with.
    """

    def __init__(self, model, use_graph: bool, capacity: int = 4, compile_blocks: bool = False):
        self.visual = model.model.visual
        self._lru = CountingLru(capacity)
        self.capacity = self._lru.capacity
        self.use_graph = bool(use_graph)
        # every block's forward compiled (one compiled graph per grid and attention kind, shared)
        self._blocks = CompiledForwards(getattr(self.visual, "blocks", None) or [], enabled=compile_blocks)
        self._aligned = None  # the blocks' MLPs padded to aligned sizes (aligned_mlp.py), at the first recording
        self._patch_product = PatchEmbedAsLinear(self.visual)  # the patch embedding as a product (patch_linear.py)
        self._lock = threading.Lock()
        self.graph_replays = 0

    def encode(self, pixel_values, image_grid_thw):
        """What ``model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)``
        returns, with fresh tensors (the caller may keep them across calls)."""
        import torch

        with self._lock, torch.inference_mode():
            grid = tuple(tuple(int(v) for v in row) for row in image_grid_thw.tolist())
            key = (grid, tuple(pixel_values.shape), str(pixel_values.device))
            recorded = self._lru.get_or_make(key, lambda: self._record(pixel_values, image_grid_thw))
            if recorded.graph is None:
                outputs = self._run(pixel_values, image_grid_thw, recorded.plan)
            else:
                recorded.pixels.copy_(pixel_values)
                recorded.graph.replay()
                self.graph_replays += 1
                outputs = recorded.outputs
            return self._split(outputs, grid)

    def _run(self, pixels, grid_thw, plan):
        """The tower on pre-computed grid tensors (its forward pops them from a copy of the plan)."""
        return self.visual(pixels.type(self.visual.dtype), grid_thw=grid_thw, return_dict=True, **dict(plan))

    def _split(self, outputs, grid) -> object:
        """Per-image outputs, as get_image_features gives them; copies, since a replay overwrites the graph's."""
        import torch

        merge = self.visual.spatial_merge_size ** 2
        sizes = [t * h * w // merge for t, h, w in grid]
        fields = {}
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor):
                value = value.clone()
            elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
                value = [torch.split(item.clone(), sizes) for item in value]  # Qwen3-VL's deepstack features
            fields[name] = value
        fields["pooler_output"] = torch.split(fields["pooler_output"], sizes)
        return type(outputs)(**fields)

    @property
    def compile_blocks(self) -> bool:
        return self._blocks.enabled

    def _record(self, pixel_values, image_grid_thw) -> _Recorded:
        import torch

        plan = vision_plan(self.visual, image_grid_thw)
        pixels = torch.empty(pixel_values.shape, dtype=self.visual.dtype, device=pixel_values.device)
        pixels.copy_(pixel_values)
        if not (self.use_graph and pixel_values.device.type == "cuda"):
            return _Recorded(pixels, image_grid_thw, plan, None, None)
        if self._aligned is None:
            self._aligned = AlignedMlps(getattr(self.visual, "blocks", None) or [])
        try:
            with self._blocks.active(), self._aligned.active(), self._patch_product.active():
                graph, outputs = record_cuda_graph(lambda: self._run(pixels, image_grid_thw, plan))
        except Exception as error:  # a tower that cannot be recorded still encodes, eagerly
            if self.compile_blocks:
                log.warning("vision blocks cannot be compiled and recorded for grid %s (%s: %s): recording them "
                            "uncompiled", image_grid_thw.tolist(), type(error).__name__, error)
                self._blocks.enabled = False
                return self._record(pixel_values, image_grid_thw)
            log.warning("vision tower cannot be recorded as a CUDA graph for grid %s (%s: %s): encoding eagerly",
                        image_grid_thw.tolist(), type(error).__name__, error)
            self.use_graph = False
            return _Recorded(pixels, image_grid_thw, plan, None, None)
        return _Recorded(pixels, image_grid_thw, plan, graph, outputs)
