"""Triton kernels for the batch-1 decode step: matrix-vector products and grouped-query attention.

A decode step of the Qwen2.5-VL-3B architecture on an H200 reads 6.2 GB of weights; the copy rate
would allow 1.48 ms, the compiled and graphed step took 3.0 ms (benchmarks/results/
gpu_history_h200.txt run 15). Kernel by kernel: cuBLAS picks GEMM tiles for the one-row products,
which reach 1.6-1.9 TB/s on the layers' small matrices (q/k/v 2048 -> 2560, o 2048 -> 2048) and
2.6 TB/s with a separate split-K reduction on the down projection (11008 -> 2048), against 4.2 TB/s
for a copy; the attention over the static cache is three kernels (scores, masked softmax, values)
and 11 us per layer. Here:

- ``matvec``: y = W x (+ b) for one row x, each program summing a block of rows over a slice of
  the inputs (split-K: partial sums, then one small reduction that adds the bias). The block shape
  and the split are chosen per matrix shape by timing the candidates once, with the L2 cache
  flushed (in a step the weights are never cached); cuBLAS is a candidate too, so no shape gets
  slower.
- ``decode_attention``: one query token of every head against the cache's keys and values,
  flash-decoding style: the slots are split in chunks, each program attends its chunk for the query
  heads of one key/value head (grouped-query heads read each key once) with a running softmax, and a
  second kernel combines the chunks. The mask is read as given (True = attend).

Both are PyTorch custom operators, so a compiled step calls them as opaque kernels and a CUDA graph
records them. CUDA only (``available``); the same kernels run on a CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which the tests use to check them against PyTorch.
"""
from __future__ import annotations

import functools
import logging
import threading

__all__ = ["available", "register", "matvec", "decode_attention", "attention_supported", "greedy_choice",
           "fastest", "MATVEC_CANDIDATES"]

log = logging.getLogger(__name__)

# (rows per program, inputs per loop step, warps, K splits); cuBLAS's own: (0, ...) its GEMM as
# torch's linear calls it, (-1, ...) its matrix-vector product (torch.mv)
# (the best of 44 block shapes and splits on the 3B's four layer matrices, H200: profile in
# benchmarks/results/gpu_history_h200.txt run 16)
MATVEC_CANDIDATES = (
    (0, 0, 0, 0), (-1, 0, 0, 0),
    (4, 1024, 8, 1), (8, 1024, 8, 1), (16, 1024, 8, 1), (4, 512, 4, 1), (4, 512, 4, 2), (4, 256, 4, 4),
    (32, 512, 4, 4),
)
ATTENTION_CHUNK = 64  # slots per program (64 and 64: 6.0 us per layer for 16 query / 2 key-value heads, H200)
ATTENTION_BLOCK = 64  # slots per loop step inside a program


# the jitted attention helpers the kernels share with layer_kernels.py (set by _build_kernels)
empty_state = attend_block = store_state = combine_head = None


@functools.lru_cache(maxsize=None)
def _triton():
    import importlib

    try:
        importlib.import_module("triton.language")
    except Exception:  # no Triton (CPU-only PyTorch): the callers keep PyTorch's kernels
        return None
    return _build_kernels()


def available(device) -> bool:
    """Whether the kernels can run on ``device`` (a CUDA device with Triton); if so, registers them."""
    if getattr(device, "type", str(device)) != "cuda" or _triton() is None:
        return False
    register()
    return True


def _build_kernels():
    import triton
    import triton.language as tl

    from vla_node.backends.engine import layer_kernels

    global empty_state, attend_block, store_state, combine_head  # Triton finds the jitted functions a kernel
    empty_state, attend_block, store_state, combine_head = (  # calls among its globals
        layer_kernels.empty_state, layer_kernels.attend_block, layer_kernels.store_state, layer_kernels.combine_head)

    @triton.jit
    def matvec(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_w, chunk,
               PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """W[rows, k] x[k] summed over the inputs of split ``program_id(1)`` (``chunk`` of them):
        PARTIAL: float32 partial sums into out[split, rows]; else (one split) y[rows] (+ b[rows])
        in y's dtype."""
        block = tl.program_id(0)
        split = tl.program_id(1)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        k_start = split * chunk
        for k0 in range(k_start, k_start + chunk, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if PARTIAL:
            tl.store(out_ptr + split * N + rows, y, mask=row_ok)
        else:
            if HAS_BIAS:
                y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def attention_partial(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, m_ptr, l_ptr, slots, scale,
                          stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, splits,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
                          CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr):
        """For key/value head ``kv`` and slot chunk ``split``: the running softmax state of its
        query heads (max m, sum l, unnormalised output) over the chunk's allowed slots."""
        kv = tl.program_id(0)
        split = tl.program_id(1)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM)
        g_ok = g < GROUP
        # float32 operands, multiplied as tf32 for a bf16/fp16 cache (exact for their values; and
        # Triton's interpreter, which the CPU tests use, mis-multiplies bf16 dots), in full float32
        # for a float32 one
        q = tl.load(q_ptr + (kv * GROUP + g)[:, None] * stride_qh + d[None, :], mask=g_ok[:, None],
                    other=0.0).to(tl.float32)
        m, l, acc = empty_state(GROUP_PAD, DIM)
        for s0 in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < slots
            allowed = (tl.load(mask_ptr + s, mask=s_ok, other=0) != 0) & s_ok
            m, l, acc = attend_block(q, k_ptr + kv * stride_kh, v_ptr + kv * stride_vh, s, allowed, stride_ks,
                                     stride_vs, scale, m, l, acc, DIM, PRECISION)
        store_state(m_ptr, l_ptr, out_ptr, (kv * splits + split) * GROUP_PAD + g, m, l, acc, DIM)

    @triton.jit
    def attention_combine(out_ptr, m_ptr, l_ptr, y_ptr, splits,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
                          SPLITS_PAD: tl.constexpr):
        """Query head ``head``'s output from its chunks' states."""
        combine_head(out_ptr, m_ptr, l_ptr, y_ptr, tl.program_id(0), splits, GROUP, GROUP_PAD, DIM, SPLITS_PAD)

    @triton.jit
    def choice_partial(x_ptr, max_ptr, index_ptr, sum_ptr, N, BLOCK: tl.constexpr):
        """Per block of scores: its maximum, where it is (first on ties), and sum(exp(x - max))."""
        block = tl.program_id(0)
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < N, other=float("-inf")).to(tl.float32)
        top = tl.max(x, axis=0)
        where = tl.argmax(x, axis=0, tie_break_left=True)
        total = tl.where(top == float("-inf"), 0.0, tl.sum(tl.exp(x - top), axis=0))  # all masked: nothing
        tl.store(max_ptr + block, top)
        tl.store(index_ptr + block, block * BLOCK + where)
        tl.store(sum_ptr + block, total)

    @triton.jit
    def choice_combine(max_ptr, index_ptr, sum_ptr, chosen_ptr, logprob_ptr, blocks, BLOCKS_PAD: tl.constexpr):
        """The first index of the overall maximum and its log-probability, -log(sum exp(x - max))."""
        b = tl.arange(0, BLOCKS_PAD)
        ok = b < blocks
        tops = tl.load(max_ptr + b, mask=ok, other=float("-inf"))
        top = tl.max(tops, axis=0)
        index = tl.min(tl.where(ok & (tops == top), tl.load(index_ptr + b, mask=ok, other=0), 2147483647), axis=0)
        weights = tl.where(tops == float("-inf"), 0.0, tl.exp(tops - top))
        total = tl.sum(tl.load(sum_ptr + b, mask=ok, other=0.0) * weights, axis=0)
        tl.store(chosen_ptr, index.to(tl.int64))
        tl.store(logprob_ptr, -tl.log(total))

    return {"choice_partial": choice_partial, "choice_combine": choice_combine, "matvec": matvec,
            "reduce_rows": layer_kernels.reduce_rows, "attention_partial": attention_partial,
            "attention_combine": attention_combine}


# ---------------------------------------------------------------------------- matrix-vector product

def _launch_matvec(config, x, weight, bias, out):
    """y = weight @ x (+ bias) with one candidate config: ``out`` (N,) filled and returned (torch's
    linear returns its own tensor)."""
    import torch

    block_n, block_k, warps, splits = config
    n, k = weight.shape
    if block_n == 0:
        return torch.nn.functional.linear(x.view(1, k), weight, bias).view(n)
    if block_n == -1:
        return torch.mv(weight, x, out=out) if bias is None else torch.addmv(bias, weight, x, out=out)
    kernels = _triton()
    rows = -(-n // block_n)
    chunk = -(-k // (splits * block_k)) * block_k  # whole loop steps per split
    if splits == 1:
        kernels["matvec"][(rows, 1)](x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
                                     chunk, PARTIAL=False, HAS_BIAS=bias is not None, BLOCK_N=block_n,
                                     BLOCK_K=block_k, num_warps=warps)
        return out
    partial = torch.empty(splits, n, dtype=torch.float32, device=x.device)
    kernels["matvec"][(rows, splits)](x, weight, weight, partial, n, k, weight.stride(0), chunk, PARTIAL=True,
                                      HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    kernels["reduce_rows"][(-(-n // 1024),)](partial, bias if bias is not None else partial, out, out, n,
                                             SPLITS=splits, HAS_BIAS=bias is not None, RESIDUAL=False, BLOCK=1024,
                                             num_warps=4)
    return out


class _MatvecTuner:
    """The fastest candidate per (rows, inputs, dtype, bias), timed once on cold weights."""

    def __init__(self):
        self._chosen: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    def config(self, x, weight, bias) -> tuple:
        import torch

        key = (tuple(weight.shape), str(weight.dtype), bias is not None, str(weight.device))
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen
        if weight.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return MATVEC_CANDIDATES[4]  # no timing possible (a CPU under the interpreter, or inside a capture)
        with self._lock:
            if key not in self._chosen:
                self._chosen[key] = self._time(x, weight, bias)
                log.info("matvec %s %s: %s", tuple(weight.shape), weight.dtype, self._chosen[key])
            return self._chosen[key]

    @staticmethod
    def _time(x, weight, bias) -> tuple:
        import torch

        out = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return fastest(MATVEC_CANDIDATES, lambda config: _launch_matvec(config, x, weight, bias, out), weight.device)


def fastest(candidates, launch, device, repeats: int = 20, flush_cache: bool = True) -> tuple:
    """The candidate config with the least GPU time per ``launch(config)``, timed in a CUDA graph of
    ``repeats`` launches (so the host's launch time does not count). ``flush_cache``: each launch
    after an L2 flush, the flushes' own time subtracted, so a weight read once is read cold (a
    ``launch`` that cycles through more weights than the L2 holds needs none). A config the GPU
    refuses is skipped."""
    import torch

    from vla_node.backends.engine.cuda_graph import record_cuda_graph

    flush = torch.empty((96 << 20) if flush_cache else 1, dtype=torch.uint8, device=device)  # > any L2 so far

    def graph_ms(step) -> float:
        graph, _ = record_cuda_graph(lambda: [step() for _ in range(repeats)])
        graph.replay()
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        return best

    flush_only = graph_ms(flush.zero_) if flush_cache else 0.0
    best, best_ms = candidates[0], float("inf")
    for config in candidates:
        try:
            ms = (graph_ms(lambda: (flush.zero_(), launch(config))) - flush_only if flush_cache
                  else graph_ms(lambda: launch(config)))
        except Exception as error:  # a config this GPU cannot run is skipped
            log.debug("config %s refused: %s", config, error)
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best


_TUNER = _MatvecTuner()


def _matvec_impl(x, weight, bias):
    import torch

    n, k = weight.shape
    if weight.stride(-1) != 1 or (bias is not None and not bias.is_contiguous()):
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.reshape(k)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    return _launch_matvec(_TUNER.config(flat, weight, bias), flat, weight, bias, out).view(*x.shape[:-1], n)


_OPS: tuple | None = None  # (matvec, decode_attention, greedy_choice) custom operators, once registered
_REGISTERING = threading.Lock()  # two backends building decoders at once must not register twice


def register() -> None:
    """Register the custom operators (once). Call it outside compiled code: torch.compile cannot
    trace a registration, and ``matvec`` / ``decode_attention`` only read the registered ops."""
    global _OPS
    with _REGISTERING:
        if _OPS is None:
            _OPS = _register_ops()


def _register_ops():
    import torch

    # explicit schemas: this module's annotations are strings (from __future__ import annotations)
    @torch.library.custom_op("vla_node::matvec", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    def matvec_op(x, weight, bias):
        return _matvec_impl(x, weight, bias)

    @matvec_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("vla_node::greedy_choice", mutates_args=(), schema="(Tensor scores) -> (Tensor, Tensor)")
    def choice_op(scores):
        return _choice_impl(scores)

    @choice_op.register_fake
    def _(scores):
        return scores.new_empty(1, dtype=torch.long), scores.new_empty(1, dtype=torch.float32)

    @torch.library.custom_op("vla_node::decode_attention", mutates_args=(),
                             schema="(Tensor query, Tensor key, Tensor value, Tensor mask, float scale) -> Tensor")
    def attention_op(query, key, value, mask, scale):
        return _attention_impl(query, key, value, mask, scale)

    @attention_op.register_fake
    def _(query, key, value, mask, scale):
        batch, heads, q_len, dim = query.shape
        return query.new_empty(batch, q_len, heads, dim)

    return matvec_op, attention_op, choice_op


def matvec(x, weight, bias=None):
    """``torch.nn.functional.linear(x, weight, bias)`` for an ``x`` of one row (any leading shape
    of size 1), by the fastest kernel for the weight's shape. Contiguous weight rows required."""
    return _OPS[0](x, weight, bias)


# ---------------------------------------------------------------------------- decode attention

def attention_supported(query, key) -> bool:
    """One query token of batch 1 against keys of a power-of-two head size, heads grouped evenly."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    return (batch == 1 and q_len == 1 and key.shape[0] == 1 and heads % kv_heads == 0
            and dim >= 16 and dim & (dim - 1) == 0 and key.stride(-1) == 1)


def _attention_impl(query, key, value, mask, scale):
    import torch

    _, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    group_pad = max(16, 1 << (group - 1).bit_length())  # tl.dot wants >= 16 rows
    splits = -(-slots // ATTENTION_CHUNK)
    q = query.reshape(heads, dim)
    if not q.is_contiguous():
        q = q.contiguous()
    allowed = mask.reshape(-1)[:slots]
    if allowed.dtype == torch.bool:
        allowed = allowed.view(torch.uint8)
    if not allowed.is_contiguous():
        allowed = allowed.contiguous()
    states = torch.empty(kv_heads * splits * group_pad, dim, dtype=torch.float32, device=query.device)
    maxima = torch.empty(kv_heads * splits * group_pad, dtype=torch.float32, device=query.device)
    sums = torch.empty_like(maxima)
    kernels = _triton()
    kernels["attention_partial"][(kv_heads, splits)](
        q, key, value, allowed, states, maxima, sums, slots, float(scale),
        q.stride(0), key.stride(1), key.stride(2), value.stride(1), value.stride(2), splits,
        GROUP=group, GROUP_PAD=group_pad, DIM=dim, CHUNK=ATTENTION_CHUNK, BLOCK_S=ATTENTION_BLOCK,
        PRECISION="ieee" if key.dtype == torch.float32 else "tf32", num_warps=4)
    out = torch.empty(1, 1, heads, dim, dtype=query.dtype, device=query.device)
    kernels["attention_combine"][(heads,)](states, maxima, sums, out, splits, GROUP=group, GROUP_PAD=group_pad,
                                           DIM=dim, SPLITS_PAD=max(2, 1 << (splits - 1).bit_length()),
                                           num_warps=4)
    return out


def decode_attention(query, key, value, mask, scale: float):
    """Softmax attention of one query token: query (1, heads, 1, d), key/value (1, kv_heads, slots, d)
    (value's last dimension contiguous too), mask: (..., >= slots), True = attend (at least one
    slot). Returns (1, 1, heads, d), as transformers' attention implementations do."""
    return _OPS[1](query, key, value, mask, float(scale))


# ---------------------------------------------------------------------------- greedy choice

CHOICE_BLOCK = 2048  # scores per program: 75 programs for a 152k vocabulary


def _choice_impl(scores):
    import torch

    flat = scores.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    blocks = -(-flat.numel() // CHOICE_BLOCK)
    maxima = torch.empty(blocks, dtype=torch.float32, device=scores.device)
    indices = torch.empty(blocks, dtype=torch.int32, device=scores.device)
    sums = torch.empty(blocks, dtype=torch.float32, device=scores.device)
    chosen = torch.empty(1, dtype=torch.long, device=scores.device)
    logprob = torch.empty(1, dtype=torch.float32, device=scores.device)
    kernels = _triton()
    kernels["choice_partial"][(blocks,)](flat, maxima, indices, sums, flat.numel(), BLOCK=CHOICE_BLOCK, num_warps=8)
    kernels["choice_combine"][(1,)](maxima, indices, sums, chosen, logprob, blocks,
                                    BLOCKS_PAD=max(2, 1 << (blocks - 1).bit_length()), num_warps=4)
    return chosen, logprob


def greedy_choice(scores):
    """(the highest-scoring token, first on ties (shape 1, int64); its log-probability (shape 1,
    float32)) for scores of one row: what static_decode.greedy_choice computes, in two small kernels
    (inductor's one fused reduction over a 152k vocabulary took 27 us on an H200)."""
    return _OPS[2](scores)
