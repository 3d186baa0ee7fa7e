"""The CUDA fast path of TransformersBackend: graphs, static caches, Triton kernels, batching, caches."""
