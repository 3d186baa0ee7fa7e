"""Recording a step as a CUDA graph, the same way for the vision tower, the prefill and the decode step."""
from __future__ import annotations

__all__ = ["record_cuda_graph"]


def record_cuda_graph(body, pool=None, before_capture=None):
    """(graph, what ``body()`` returned while it was recorded).

    ``body`` runs once on a side stream first (lazy allocations and library handles must not
    happen inside a capture), then ``before_capture()`` (puts back state that run changed), then
    the capture, which runs nothing: the graph's outputs are the returned tensors, valid after
    each replay. ``pool``: a graph memory pool shared with graphs that never run at the same time.
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = body()
    return graph, outputs
