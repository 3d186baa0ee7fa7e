"""The engine: TransformersBackend's fast path behind one entry point (engine.Engine), configured
by one frozen EngineOptions chosen at construction. Pure optimisation: without it the backend
runs the plain path (transformers' ``generate``), and the two give the same tokens in float32.

    engine.py              the entry point: inputs, one request, caches, recordings, lifecycle
    options.py             EngineOptions: every switch, frozen
    guard.py               the self-check: models it knows, and a first answer like the plain path's
    batched_generation.py  several requests decoded together (batch_cache.py: their StaticCache)
  inputs and vision
    one_image_inputs.py    one image's prompt tensors without the processor's call
    frame_cache.py         one vision encoding per camera frame
    vision_attention.py    one attention call per vision layer (CUDA)
    vision_graph.py        the vision tower as a CUDA graph per image grid, with
                           aligned_mlp.py (padded MLPs) and patch_linear.py (the patch embedding as a product)
  prefill
    prefix_cache.py        the shared system-prompt prefix prefilled once
    prefill_graph.py       the rest of the prompt as a CUDA graph per length bucket
  decode
    static_decode.py       the decode loop on one StaticCache, a CUDA-graph replay per token
    fused_projections.py   q/k/v and gate/up as one product each
    decode_kernels.py      Triton products, attention and greedy choice for the step
    layer_step.py          one row's whole step by fused layer kernels (layer_kernels.py)
  shared
    cuda_graph.py          recording a step as a CUDA graph
    regional_compile.py    torch.compile per repeated module, while recording
"""
from vla_node.backends.engine.engine import Engine
from vla_node.backends.engine.options import EngineOptions

__all__ = ["Engine", "EngineOptions"]
