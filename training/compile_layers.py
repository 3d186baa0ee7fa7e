"""vla-train's ``torch_compile``: torch.compile a Qwen-VL model one layer at a time.

A small model's training step is bound by the host: one Python call and kernel launch for each of
~3,300 operations (benchmarks/results/training_step_ops_cpu.txt), most of them the elementwise work
of RMSNorm, rotary embeddings and the MLP. Compiling fuses them. Not the whole model: its forward
holds host-side control flow (per-image grids, the key/value cache objects, the shared-prefix loss
of training/shared_prefix.py) that would split it into many graphs or recompile every step. One
decoder layer or vision block is a pure tensor function, and every layer of a kind runs the same
code, so a handful of graphs serve them all (the text layers' prefix and suffix passes, the vision
blocks). Compiling in place (``nn.Module.compile``) keeps the parameter names, so checkpoints,
adapters and the optimizer see the model they would see uncompiled.
"""
from __future__ import annotations

import logging

from training.shared_prefix import hf_model_of

log = logging.getLogger("vla_train")

# The layers of a kind share graphs, but every pass (the shared prefix, the samples' own tokens, an
# evaluation without gradients) and batch shape adds one: past dynamo's default limit of 8 per code
# object, after which it would silently run the layer uncompiled.
RECOMPILE_LIMIT = 64


def backend_problem(backend: str) -> str:
    """Why ``backend`` cannot serve torch_compile ("" if it can): checked with the config, before
    any data is read or model loaded."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend in known:
        return ""
    return f"torch_compile_backend {backend!r} is not a torch.compile backend (this torch has: {', '.join(sorted(known))})"


def compiled_layers(model) -> list:
    """The modules compile_layers compiles: the language model's decoder layers and the vision
    tower's blocks (under peft / DDP wrappers)."""
    core = hf_model_of(model).model
    return [*core.language_model.layers, *core.visual.blocks]


def compile_layers(model, backend: str = "inductor") -> int:
    """Compile every decoder layer and vision block of ``model`` in place; returns how many."""
    import torch
    import torch._dynamo

    problem = backend_problem(backend)
    if problem:
        raise ValueError(problem)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           8 * RECOMPILE_LIMIT)
    layers = compiled_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    log.info("torch_compile: %d layers compiled one by one (backend %s; the first steps compile)", len(layers),
             backend)
    return len(layers)


def uncompiled():
    """A context in which compiled layers run eagerly. Evaluation is a few batches without gradients,
    and generation's key/value caches give every layer call new guards (lengths, strides): compiled,
    each would recompile once more up to RECOMPILE_LIMIT, over a minute of compiling in an H100 build
    (session 32, benchmarks/results), and every training call would then check all those entries."""
    import contextlib

    import torch

    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return stance("force_eager") if stance is not None else contextlib.nullcontext()
