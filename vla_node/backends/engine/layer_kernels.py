"""Triton kernels that run a whole decoder layer's one-token step in seven launches.

decode_kernels.py gave the decode step its own matrix-vector products and attention, but the step
still went through transformers' layer code under torch.compile: ~15 kernels per layer, of which
the RMSNorms, rotary embedding, cache writes, SiLU, residual adds and split-K reductions are each a
small kernel of ~2 us plus a launch gap, around 20 us per layer on an H200 (36 layers: ~0.7 ms of a
2.7 ms step; benchmarks/results/gpu_history_h200.txt). Here those small jobs ride on the products:

- ``layer_matvec``: y = W x for one row, optionally of the RMSNorm of x (its weight multiplied in
  as x streams, its 1 / rms(x) summed on the way and applied to the finished sums), with the bias,
  the residual add, or SiLU(gate) * up as its epilogue (GATED: the joint gate/up matrix, a program
  reading matching rows of both halves); or split-K partial sums.
- ``qkv_finish``: the q/k/v partial sums reduced per head, bias added, the per-head q/k RMSNorm
  (Qwen3-VL), the rotary embedding at the cache's fill (+ the prompt's rope delta), the key and value
  written into the static cache, the query into a buffer.
- ``attention_partial`` / ``attention_combine``: decode_kernels.py's flash-decoding attention, but
  bounded by the cache's own fill counter (chunks past it do nothing) instead of a mask over every
  slot; the combine advances the layer's fill counter, as StaticLayer.update does.
- ``reduce_rows``: split-K partial sums reduced, bias and residual added.

Programmatic dependent launch (Hopper and later, ``PDL``): each kernel is launched while the one
before it still runs; a product's programs first ask the L2 for their first loop step of weights
(weights never change within a step), then wait for the kernel before to finish
(``griddepcontrol.wait``) before reading anything it writes or writing anything it reads, then let
the next kernel launch. The tail of one launch (its last programs, the device half idle) so
overlaps the start of the next: a 3B step 2.24 -> 2.06 ms on an H200, the same bits
(benchmarks/results/gpu_history_h200.txt run 34; prefetching whole rows was slower, 2.78 ms: a
wave of programs asked for more than the L2 holds).

Sums run in float32; products, activations and residual adds are rounded to the model's dtype where
transformers' modules return them. The one difference: the RMSNorm before a product is not rounded
to the dtype on its own (its scale is applied after the sum), so a bfloat16 step differs from
transformers' by rounding (tests/test_layer_step.py: as close to a float32 step as transformers'
own); a float32 step equals it (on a CPU under Triton's interpreter too).
"""
from __future__ import annotations

__all__ = ["kernels"]


try:  # a CPU-only PyTorch may come without Triton: then no kernels (callers check ``kernels()``)
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means the same
    triton = None


def kernels() -> dict | None:
    """The kernels by name, or None without Triton."""
    if triton is None:
        return None
    return {"layer_matvec": layer_matvec, "reduce_rows": reduce_rows, "qkv_finish": qkv_finish,
            "attention_partial": attention_partial, "attention_combine": attention_combine}


def dependent_launch_supported(device) -> bool:
    """Whether the kernels can launch programmatically dependent on ``device``: CUDA of compute
    capability 9.0 or later (Hopper's griddepcontrol), a Triton that launches so, not its interpreter."""
    import os

    if triton is None or getattr(device, "type", str(device)) != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        import torch
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as triton_cuda
    except Exception:  # noqa: BLE001 - any failure means no
        return False
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}) or not all(
            hasattr(triton_cuda, name) for name in ("gdc_wait", "gdc_launch_dependents")):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


# the kernels live at module level: a Triton kernel finds the jitted functions it calls among its globals
if triton is not None:
    @triton.jit
    def after_previous(PDL: tl.constexpr):
        """Under programmatic dependent launch: wait until the kernel before has finished and its
        writes are visible, then let the next kernel launch (its programs wait likewise)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def prefetch_rows(w_ptr, rows, N, k_start, chunk, K, stride_w, BLOCK_K: tl.constexpr, LINE: tl.constexpr,
                      STEPS: tl.constexpr):
        """Ask the L2 for rows ``rows`` of W over the first STEPS loop steps of inputs k_start ..
        k_start + chunk, one request per cache line of ``LINE`` elements (addresses clamped into W;
        nothing is loaded into registers)."""
        safe_rows = tl.minimum(rows, N - 1)
        for k0 in range(k_start, k_start + tl.minimum(chunk, STEPS * BLOCK_K), BLOCK_K):
            cols = tl.minimum(k0 + tl.arange(0, BLOCK_K // LINE) * LINE, K - 1)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l",
                                      [w_ptr + safe_rows[:, None] * stride_w + cols[None, :]],
                                      dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def layer_matvec(x_ptr, norm_ptr, w_ptr, b_ptr, res_ptr, out_ptr, squares_ptr, N, K, stride_w, chunk, eps,
                     NORM: tl.constexpr, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                     GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                     LINE: tl.constexpr = 64, PREFETCH: tl.constexpr = 0):
        """Rows ``program_id(0)`` block of W (RMSNorm(x) if NORM) over split ``program_id(1)``'s
        ``chunk`` inputs. PARTIAL: float32 sums into out[split, rows] (NORM: the sums of
        norm-weight * x, the split's sum of x^2 into squares[split], for the reduction to scale).
        Else y (+ bias), rounded to x's dtype; GATED: SiLU(y_gate) * y_up with up = rows N.. 2N of
        W; RESIDUAL: + res[rows]; stored in out's dtype.

        RMSNorm(x) = weight * x / rms(x): the 1 / rms(x) is one number for the whole row, so it
        multiplies the finished sums, and rms(x) is summed in the same loop that streams x (no
        pass over x before the products). PDL: the program's weight rows over its first PREFETCH
        loop steps (``LINE`` elements per cache line) are requested before it waits for the kernel
        before."""
        dtype = x_ptr.dtype.element_ty
        block = tl.program_id(0)
        split = tl.program_id(1)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        k_start = split * chunk
        if PDL and PREFETCH > 0:
            prefetch_rows(w_ptr, rows, N, k_start, chunk, K, stride_w, BLOCK_K, LINE, PREFETCH)
            if GATED:
                prefetch_rows(w_ptr, rows + N, 2 * N, k_start, chunk, K, stride_w, BLOCK_K, LINE, PREFETCH)
        after_previous(PDL)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_start + chunk, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(norm_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            tile_ok = row_ok[:, None] & col_ok[None, :]
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=tile_ok, other=0.0)
            acc += w.to(tl.float32) * x[None, :]
            if GATED:
                w_up = tl.load(w_ptr + (rows + N)[:, None] * stride_w + cols[None, :], mask=tile_ok, other=0.0)
                acc_up += w_up.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if PARTIAL:
            tl.store(out_ptr + split * N + rows, y, mask=row_ok)
            if NORM:
                if block == 0:
                    tl.store(squares_ptr + split, tl.sum(squares, axis=0))
        else:
            if NORM:  # one split: its loop saw every input
                scale = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
                y = y * scale
            if HAS_BIAS:
                y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            y = y.to(dtype).to(tl.float32)
            if GATED:
                up = tl.sum(acc_up, axis=1)
                if NORM:
                    up = up * scale
                if HAS_BIAS:
                    up += tl.load(b_ptr + rows + N, mask=row_ok, other=0.0).to(tl.float32)
                up = up.to(dtype).to(tl.float32)
                y = (y * tl.sigmoid(y)).to(dtype).to(tl.float32) * up
                y = y.to(dtype).to(tl.float32)
            if RESIDUAL:
                y += tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, y.to(dtype).to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def reduce_rows(part_ptr, b_ptr, res_ptr, out_ptr, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """out = sum of the splits' partial sums (+ bias), rounded to out's dtype (+ residual);
        decode_kernels.py's split products use it too."""
        after_previous(PDL)
        dtype = out_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in range(SPLITS):
            y += tl.load(part_ptr + split * N + rows, mask=ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        y = y.to(dtype).to(tl.float32)
        if RESIDUAL:
            y += tl.load(res_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(dtype), mask=ok)

    @triton.jit
    def _head_values(part_ptr, b_ptr, base, dims, N, scale, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DIM: tl.constexpr):
        """One head's projected values at ``dims`` (reduced over the splits, scaled, + bias; float32)."""
        y = tl.zeros((DIM,), dtype=tl.float32)
        for split in range(SPLITS):
            y += tl.load(part_ptr + split * N + base + dims)
        y = y * scale
        if HAS_BIAS:
            y += tl.load(b_ptr + base + dims).to(tl.float32)
        return y

    @triton.jit
    def qkv_finish(part_ptr, squares_ptr, b_ptr, q_norm_ptr, k_norm_ptr, inv_freq_ptr, fill_ptr, delta_ptr,
                   q_ptr, k_ptr, v_ptr, N, hidden, norm_eps, stride_kh, stride_ks, stride_vh, stride_vs, eps,
                   rope_scale, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                   SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, HEAD_NORM: tl.constexpr, PDL: tl.constexpr = False):
        """Program p: query head p, key head p - HEADS or value head p - HEADS - KV_HEADS, from
        layer_matvec's PARTIAL, NORM sums over ``hidden`` inputs (scaled by their 1 / rms here)."""
        after_previous(PDL)
        dtype = k_ptr.dtype.element_ty
        p = tl.program_id(0)
        d = tl.arange(0, DIM)
        total = 0.0
        for split in range(SPLITS):
            total += tl.load(squares_ptr + split)
        scale = 1.0 / tl.sqrt(total / hidden + norm_eps)
        rotated = (d + DIM // 2) % DIM  # rotate_half(x)[d] = -x[d + DIM/2] (d < DIM/2), x[d - DIM/2] (else)
        sign = tl.where(d < DIM // 2, -1.0, 1.0)
        slot = tl.load(fill_ptr)
        if p < HEADS + KV_HEADS:
            is_query = p < HEADS
            base = p * DIM  # queries, then keys: consecutive in the joint projection
            y = _head_values(part_ptr, b_ptr, base, d, N, scale, SPLITS, HAS_BIAS, DIM).to(dtype).to(tl.float32)
            y_rot = _head_values(part_ptr, b_ptr, base, rotated, N, scale, SPLITS, HAS_BIAS, DIM)
            y_rot = y_rot.to(dtype).to(tl.float32)
            if HEAD_NORM:  # Qwen3's q_norm / k_norm over the head's dimensions
                head_scale = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / DIM + eps)
                weight = tl.where(is_query, tl.load(q_norm_ptr + d), tl.load(k_norm_ptr + d)).to(tl.float32)
                weight_rot = tl.where(is_query, tl.load(q_norm_ptr + rotated), tl.load(k_norm_ptr + rotated))
                y = ((y * head_scale).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
                y_rot = (y_rot * head_scale).to(dtype).to(tl.float32) * weight_rot.to(tl.float32)
                y_rot = y_rot.to(dtype).to(tl.float32)
            position = (slot + tl.load(delta_ptr)).to(tl.float32)
            angle = position * tl.load(inv_freq_ptr + d % (DIM // 2))
            cos = (tl.cos(angle) * rope_scale).to(dtype).to(tl.float32)
            sin = (tl.sin(angle) * rope_scale).to(dtype).to(tl.float32)
            out = (y * cos).to(dtype).to(tl.float32) + (sign * y_rot * sin).to(dtype).to(tl.float32)
            if is_query:
                tl.store(q_ptr + p * DIM + d, out.to(q_ptr.dtype.element_ty))
            else:
                tl.store(k_ptr + (p - HEADS) * stride_kh + slot * stride_ks + d, out.to(dtype))
        else:
            head = p - HEADS - KV_HEADS
            y = _head_values(part_ptr, b_ptr, p * DIM, d, N, scale, SPLITS, HAS_BIAS, DIM)
            tl.store(v_ptr + head * stride_vh + slot * stride_vs + d, y.to(dtype))

    @triton.jit
    def empty_state(GROUP_PAD: tl.constexpr, DIM: tl.constexpr):
        """A running softmax state over no slots: max (finite, so a block with nothing allowed keeps
        it empty), sum, unnormalised output; shared with decode_kernels.py."""
        return (tl.full((GROUP_PAD,), -1.0e30, dtype=tl.float32), tl.zeros((GROUP_PAD,), dtype=tl.float32),
                tl.zeros((GROUP_PAD, DIM), dtype=tl.float32))

    @triton.jit
    def store_state(m_ptr, l_ptr, out_ptr, state, m, l, acc, DIM: tl.constexpr):
        """A chunk's running softmax state into the buffers attention_combine reads (``state``: its
        rows there); shared with decode_kernels.py."""
        tl.store(m_ptr + state, m)
        tl.store(l_ptr + state, l)
        tl.store(out_ptr + state[:, None] * DIM + tl.arange(0, DIM)[None, :], acc)

    @triton.jit
    def attend_block(q, k_ptr, v_ptr, s, allowed, stride_ks, stride_vs, scale, m, l, acc, DIM: tl.constexpr,
                     PRECISION: tl.constexpr):
        """The running softmax state (max m, sum l, unnormalised output acc) of a query group ``q``
        advanced over one block of slots ``s`` of a key/value head (``allowed`` of them count);
        shared with decode_kernels.py."""
        d = tl.arange(0, DIM)
        k = tl.load(k_ptr + s[:, None] * stride_ks + d[None, :], mask=allowed[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(allowed[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + s[:, None] * stride_vs + d[None, :], mask=allowed[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        return m_new, l, acc

    @triton.jit
    def combine_head(out_ptr, m_ptr, l_ptr, y_ptr, head, splits, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                     DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
        """Query head ``head``'s output from its chunks' states (rescaled to the common max); shared
        with layer_kernels.py."""
        kv = head // GROUP
        g = head % GROUP
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, DIM)
        s_ok = s < splits
        state = (kv * splits + s) * GROUP_PAD + g
        m = tl.load(m_ptr + state, mask=s_ok, other=-1.0e30)
        l = tl.load(l_ptr + state, mask=s_ok, other=0.0)
        top = tl.max(m, axis=0)
        weight = tl.exp(m - top)
        total = tl.sum(l * weight, axis=0)
        acc = tl.load(out_ptr + state[:, None] * DIM + d[None, :], mask=s_ok[:, None], other=0.0)
        y = tl.sum(acc * weight[:, None], axis=0) / total
        tl.store(y_ptr + head * DIM + d, y.to(y_ptr.dtype.element_ty))

    @triton.jit
    def attention_partial(q_ptr, k_ptr, v_ptr, fill_ptr, start_ptr, out_ptr, m_ptr, l_ptr, scale,
                          stride_kh, stride_ks, stride_vh, stride_vs, splits,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
                          CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
                          PDL: tl.constexpr = False):
        """Key/value head ``program_id(0)``, slot chunk ``program_id(1)``: the running softmax state
        of the head's query group over the chunk's slots from ``start`` up to the fill (inclusive:
        this step's own key); chunks outside that range store an empty state."""
        after_previous(PDL)
        kv = tl.program_id(0)
        split = tl.program_id(1)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM)
        g_ok = g < GROUP
        last = tl.load(fill_ptr).to(tl.int32)
        first = tl.load(start_ptr).to(tl.int32)
        q = tl.load(q_ptr + (kv * GROUP + g)[:, None] * DIM + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        m, l, acc = empty_state(GROUP_PAD, DIM)
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, last + 1)
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            allowed = (s <= last) & (s >= first)
            m, l, acc = attend_block(q, k_ptr + kv * stride_kh, v_ptr + kv * stride_vh, s, allowed, stride_ks,
                                     stride_vs, scale, m, l, acc, DIM, PRECISION)
        store_state(m_ptr, l_ptr, out_ptr, (kv * splits + split) * GROUP_PAD + g, m, l, acc, DIM)

    @triton.jit
    def attention_combine(out_ptr, m_ptr, l_ptr, y_ptr, fill_ptr, splits,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
                          SPLITS_PAD: tl.constexpr, PDL: tl.constexpr = False):
        """Query head ``program_id(0)``'s output from its chunks' states; program 0 then advances
        the layer's fill counter (every program of attention_partial has read it)."""
        after_previous(PDL)
        head = tl.program_id(0)
        combine_head(out_ptr, m_ptr, l_ptr, y_ptr, head, splits, GROUP, GROUP_PAD, DIM, SPLITS_PAD)
        if head == 0:
            tl.store(fill_ptr, tl.load(fill_ptr) + 1)
