"""Greedy decoding on the backend's StaticCache without transformers' per-token ``generate`` loop.

The prefill and the first token are prefill_graph.py's (or transformers' ``generate``'s). Every
further token is one language-model step whose inputs all live on the device: the token just
chosen, its rope position (the cache's own fill counter plus the prompt's rope delta) and the
attention mask (the slots up to that counter). No step needs the host, so on CUDA the step
(forward, argmax, log-probability of the choice, end-of-answer flag) is recorded once as a CUDA
graph and replayed per token. The host reads each token's end flag one
step late, while the next step is already queued: the GPU never waits for Python, and an answer
costs at most one step more than its length.

With constrained decoding the grammar must see each token on the host before it can mask the next
one: the forward is one graph replay, the masked choice another (the grammar's bitmask uploaded to a
fixed buffer); on CUDA the next token's forward is queued before the host reads the token, so the
grammar's host work overlaps the GPU's.

With ``kernels`` (CUDA), the step's one-row products, its attention and the greedy choice are
decode_kernels.py's Triton kernels instead of cuBLAS's and inductor's.

On a cache of several rows (batch_cache.py) one step serves every row: ``decode_rows`` gives each
row its own first token, rope delta, first visible slot, budget, stop event and grammar.

Why: around its own compiled step, transformers' ``generate`` adds host work per token (logits
processors, stopping criteria, a device sync per step): 4.8 ms/token on the Qwen2.5-VL-3B
architecture on an H200, 3.45 ms/token here, 3.0 with fused projections, 2.64 with the Triton
kernels (benchmarks/results/gpu_latency_*.txt and gpu_history_h200.txt). Outputs equal the
generate loop's (tests/test_static_decode.py, tests/test_decode_kernels.py).
"""
from __future__ import annotations

import contextlib
import logging
import threading

from vla_node.backends.engine.cuda_graph import record_cuda_graph

__all__ = ["DECODE_ATTENTION", "DECODE_KERNEL_ATTENTION", "StaticDecoder", "DecodeResult",
           "grouped_query_attention", "kernel_attention", "greedy_choice"]

log = logging.getLogger(__name__)

DECODE_ATTENTION = "vla_static_decode_grouped_query"
DECODE_KERNEL_ATTENTION = "vla_static_decode_triton"


def grouped_query_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """Attention that reads each key/value head once for all query heads of its group.

    query: (batch, heads, q, d); key/value: (batch, kv_heads, slots, d); attention_mask: bool
    (batch, 1, q, >= slots), True = attend. transformers' SDPA path copies the keys and values of
    the whole static cache once per query head in the group (repeat_kv) on every decode step:
    for a 3B model that copy costs more than the attention. Returns ((batch, q, heads, d), None).
    """
    import torch

    batch, heads, q_len, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)  # head h reads kv head h // groups
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:
        allowed = attention_mask[..., :slots].reshape(batch, 1, 1, q_len, slots)
        scores = scores.view(batch, kv_heads, groups, q_len, slots).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, groups * q_len, slots)
    out = torch.matmul(probs, value).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def kernel_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """grouped_query_attention by decode_kernels.py's one-token Triton kernel where it applies
    (batch 1, one query token, a mask given); the same arguments and result."""
    from vla_node.backends.engine import decode_kernels

    if attention_mask is not None and decode_kernels.attention_supported(query, key):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_kernels.decode_attention(query, key, value, attention_mask, scale), None
    return grouped_query_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def greedy_choice(scores):
    """(each row's highest-scoring token (shape rows), its log-probability (shape rows)); scores:
    (rows, vocab) float. logsumexp instead of a log_softmax over the vocabulary: one reduction, no
    152k-wide write (the log_softmax kernel alone took 34 us per token on an H200)."""
    import torch

    chosen = scores.argmax(dim=-1)
    logprob = scores.gather(-1, chosen.view(-1, 1)).view(-1) - torch.logsumexp(scores, dim=-1)
    return chosen, logprob


class DecodeResult:
    """Tokens chosen after the first one and each choice's log-probability (among the tokens the
    grammar allowed, under constrained decoding)."""

    def __init__(self, tokens: list[int], logprobs: list[float]):
        self.tokens = tokens
        self.logprobs = logprobs


class StaticDecoder:
    """Decode steps for one (model, StaticCache) pair; build a new one when either changes
    (another cache size, another adapter, new adapter weights): a CUDA graph keeps the addresses
    and kernels it was recorded with.

    Rows: one per batch row of the cache. A batch decodes several answers in one step per token (the
    weights are read once for all rows); each row's prompt ends at the same slot, right-aligned, and
    its ``start`` slot hides the slots before it (decode_rows).

    ``use_graph``: record the step as a CUDA graph (CUDA only); on failure the decoder logs why and
    runs the same step eagerly. ``compile_step``: compile the step with torch.compile before
    recording it (CUDA graphs only): eager PyTorch runs ~40 small kernels per layer (norms, rotary,
    repeat_kv), which cost more GPU time than the weights' reads; inductor fuses them. The first
    request of each decoder compiles (tens of seconds for a 3B model), later ones replay.
    ``kernels``: the layers' matrix-vector products, the attention and the greedy choice by
    decode_kernels.py's Triton kernels (CUDA with Triton only; the products need ``fused``).
    ``layer_step`` (with ``kernels``, one row): the whole step by layer_step.py's fused layers where
    the model allows (a plain LoRA adapter merged into weight copies; see LayerStep.unsupported); nothing to
    compile then; ``dependent_launch``: its kernels launched programmatically dependent where the
    device allows (LayerStep's).
    """

    def __init__(self, model, cache, eos_ids: list[int], use_graph: bool, compile_step: bool = False,
                 fused=None, kernels: bool = False, layer_step: bool = False, dependent_launch: bool = True):
        import torch

        self._torch = torch
        self.model = model
        self.cache = cache
        self._language_model = model.model.language_model
        self._lm_head = model.get_output_embeddings()
        layers = cache.layers
        device = layers[0].keys.device
        self.device = device
        self.capacity = int(layers[0].max_cache_len)
        self.rows = rows = int(layers[0].keys.shape[0])
        self._fill = layers[0].cumulative_length  # slots written so far; every layer advances its own
        vocab = int(self._lm_head.weight.shape[0])
        self._slots = torch.arange(self.capacity, device=device)
        self._token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self._rope_delta = torch.zeros(rows, dtype=torch.long, device=device)
        self._start = torch.zeros(rows, dtype=torch.long, device=device)  # each row's first visible slot
        self._budget = torch.zeros(rows, dtype=torch.long, device=device)  # each row's steps
        self._index = torch.zeros(1, dtype=torch.long, device=device)
        self._logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self._tokens = torch.zeros(self.capacity, rows, dtype=torch.long, device=device)
        self._logprobs = torch.zeros(self.capacity, rows, dtype=torch.float32, device=device)
        self._ended = torch.zeros(rows, dtype=torch.bool, device=device)  # per row, once ended stays so
        self._all_ended = torch.zeros(1, dtype=torch.bool, device=device)
        self._eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self._eos_set = set(int(e) for e in eos_ids)
        self.use_graph = bool(use_graph) and device.type == "cuda"
        from vla_node.backends.engine import decode_kernels

        self.requested_kernels = bool(kernels)
        self.kernels = self.requested_kernels and decode_kernels.available(device)
        # joint q/k/v and gate/up products (fused_projections.py), while their weights are still shared
        self._fused = fused if fused is not None and fused.intact() else None
        if fused is not None and self._fused is None:
            log.warning("fused projections no longer share their weights: decoding with separate products")
        self.requested_layer_step = bool(layer_step)
        self.requested_dependent_launch = bool(dependent_launch)
        self._layer_step = self._new_layer_step(model) if self.requested_layer_step and self.kernels and rows == 1 \
            else None
        self.compiled = bool(compile_step) and self.use_graph and self._layer_step is None
        # one compiled forward serves the greedy and the forward graphs; the choice after it is a few kernels
        self._step_forward = torch.compile(self._forward, dynamic=False) if self.compiled else self._forward
        self._matvec = decode_kernels.matvec if self.kernels else None
        if self.kernels and rows == 1:  # the kernels' choice is for one row
            self._choose = decode_kernels.greedy_choice
        else:
            self._choose = torch.compile(greedy_choice, dynamic=False) if self.compiled else greedy_choice
        self._graphs: dict[str, object] = {}
        self._pool = None
        # constrained decoding: the grammar's bitmask of the step (int32 words, bit 1 = allowed)
        self._mask_words = torch.zeros(rows, -(-vocab // 32), dtype=torch.int32, device=device)
        self._bit_shifts = torch.arange(32, dtype=torch.int32, device=device)
        if self.use_graph:
            self._ended_host = torch.zeros(self.capacity, dtype=torch.bool).pin_memory()
            self._step_done = [torch.cuda.Event(), torch.cuda.Event()]
            self._mask_host = torch.zeros(self._mask_words.shape, dtype=torch.int32).pin_memory()
            self._chosen_host = torch.zeros(self.capacity, rows, dtype=torch.long).pin_memory()
            self._logprobs_host = torch.zeros(self.capacity, rows, dtype=torch.float32).pin_memory()
            self._choice_done = torch.cuda.Event()
        self.graph_replays = 0
        self._lock = threading.Lock()
        from transformers import AttentionInterface

        AttentionInterface.register(DECODE_ATTENTION, grouped_query_attention)
        AttentionInterface.register(DECODE_KERNEL_ATTENTION, kernel_attention)

    def _new_layer_step(self, model):
        """layer_step.py's fused layers for this model, or None (why not: logged)."""
        from vla_node.backends.engine.layer_step import LayerStep

        reason = LayerStep.unsupported(model, self._fused)
        if reason is not None:
            log.info("decode step through transformers' layers: %s", reason)
            return None
        return LayerStep(model, self._fused, self.requested_dependent_launch)

    @property
    def layer_step(self) -> bool:
        """Whether the step runs layer_step.py's fused layers."""
        return self._layer_step is not None

    @contextlib.contextmanager
    def _decode_attention(self):
        """The language model attends with grouped_query_attention or the Triton kernel (and
        projects with the fused products, if any) while the decoder traces or runs it (a recorded
        graph keeps both); the prefill keeps the model's own implementation."""
        config = self._language_model.config
        before = config._attn_implementation
        config._attn_implementation = DECODE_KERNEL_ATTENTION if self.kernels else DECODE_ATTENTION
        try:
            with (self._fused.active(self._matvec) if self._fused is not None else contextlib.nullcontext()):
                yield
        finally:
            config._attn_implementation = before

    @staticmethod
    def supports(model, cache) -> bool:
        """A Qwen-VL model with full attention in every layer and a StaticCache whose layers count
        their fill on the device (transformers 5's StaticLayer.cumulative_length)."""
        import torch

        layers = getattr(cache, "layers", None)
        if not layers:
            return False
        if not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                   and hasattr(layer, "max_cache_len") for layer in layers):
            return False
        inner = getattr(model, "model", None)
        if not hasattr(inner, "language_model") or not hasattr(inner, "rope_deltas"):
            return False
        text_config = getattr(model.config, "text_config", model.config)
        layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
        return layer_types == {"full_attention"}

    # ------------------------------------------------------------------ the step (graph body)

    def _forward(self) -> None:
        """One language-model step for ``_token`` (a token per row) at slot ``_fill``; raw logits
        into ``_logits``."""
        if self._layer_step is not None:
            self._layer_step.run(self.cache, self._token, self._rope_delta, self._start, self._logits)
            return
        torch = self._torch
        rows = self.rows
        fill = self._fill  # read before the layers' updates advance it
        positions = (fill + self._rope_delta).view(1, rows, 1).expand(3, rows, 1)  # text token: t = h = w
        visible = ((self._slots <= fill) & (self._slots >= self._start.view(rows, 1))).view(rows, 1, 1, self.capacity)
        hidden = self._language_model(input_ids=self._token, position_ids=positions, attention_mask=visible,
                                      past_key_values=self.cache, use_cache=True).last_hidden_state
        self._logits.copy_(self._lm_head(hidden[:, -1, :]).to(torch.float32))

    def _record(self, chosen, logprob) -> None:
        """Store each row's chosen token and its log-probability (both shape rows); feed them to the
        next step. A row ends at an end-of-answer token or when its budget is spent."""
        rows = self.rows
        self._tokens.index_copy_(0, self._index, chosen.view(1, rows))
        self._logprobs.index_copy_(0, self._index, logprob.view(1, rows))
        ends = (chosen.view(-1, 1) == self._eos.view(1, -1)).any(dim=1) | (self._index + 1 >= self._budget)
        self._ended.logical_or_(ends)
        self._all_ended.copy_(self._ended.all().view(1))
        self._token.copy_(chosen.view(rows, 1))
        self._index.add_(1)

    def _greedy_step(self) -> None:
        self._step_forward()
        self._record(*self._choose(self._logits))

    def _masked_choice(self) -> None:
        """The greedy choice among the tokens ``_mask_words`` allows (the others' scores -inf, as
        xgrammar's apply_token_bitmask_inplace sets them), recorded and fed to the next step."""
        torch = self._torch
        vocab = self._logits.shape[-1]
        bits = (self._mask_words.view(self.rows, -1, 1) >> self._bit_shifts.view(1, 1, 32)) & 1  # bit 31 too
        allowed = bits.view(self.rows, -1)[:, :vocab].bool()
        self._record(*self._choose(torch.where(allowed, self._logits, float("-inf"))))

    # ------------------------------------------------------------------ graphs

    def _body(self, name: str):
        return {"greedy": self._greedy_step, "forward": self._step_forward, "choice": self._masked_choice}[name]

    def _run(self, name: str) -> None:
        """Run the step ``name`` ("greedy", "forward" or the masked "choice"): its graph when
        recorded, else eagerly. Only a recording or an eager step runs the model's code, so only
        they switch its attention and projections (_decode_attention: ~250 attribute swaps for a
        36-layer model, a millisecond of host time a command that replays need not spend)."""
        graph = self._graphs.get(name) if self.use_graph else None
        if graph is None:
            with self._decode_attention():
                if self.use_graph:
                    graph = self._capture(name, self._body(name))
                if graph is None:  # eager, or a failed capture (which drops the compiled forward too)
                    self._body(name)()
                    return
        graph.replay()
        self.graph_replays += 1

    def _capture(self, name: str, body):
        """Record ``body`` as a CUDA graph; the state it changes is put back (the capture itself
        runs nothing, the warm-up run before it does). None (and eager steps from now on) on failure."""
        torch = self._torch
        state = [layer.cumulative_length for layer in self.cache.layers] + [self._token, self._index, self._ended,
                                                                            self._all_ended]
        saved = [t.clone() for t in state]

        def put_back():
            for tensor, value in zip(state, saved):
                tensor.copy_(value)

        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph, _ = record_cuda_graph(body, self._pool, put_back)
        except Exception as error:  # a model whose step cannot be compiled or captured still decodes, eagerly
            log.warning("decode step cannot be %s as a CUDA graph (%s: %s): decoding eagerly",
                        "compiled and recorded" if self.compiled else "recorded", type(error).__name__, error)
            self.use_graph = self.compiled = False
            self._step_forward, self._choose = self._forward, greedy_choice
            graph = None
        put_back()
        if graph is not None:
            self._graphs[name] = graph
        return graph

    # ------------------------------------------------------------------ decoding

    def decode(self, first_token: int, rope_delta, steps: int, stop_event=None, constraint=None) -> DecodeResult:
        """Up to ``steps`` greedy tokens after ``first_token`` (which the prefill chose and wrote
        nothing for yet); ends after an end-of-answer token, or when ``stop_event`` is set. Like
        transformers' stopping criteria the event is checked after each token; the caller has
        checked it after the first.

        ``rope_delta``: the model's ``rope_deltas`` after the prefill (shape batch x 1, batch 1).
        ``constraint``: the grammar LogitsProcessor the prefill used (it continues from its state).
        """
        delta = int(rope_delta.reshape(-1)[0])
        return self.decode_rows([first_token], [delta], [steps], [stop_event],
                                None if constraint is None else [constraint])[0]

    def decode_rows(self, first_tokens: list[int], rope_deltas: list[int], steps: list[int],
                    stop_events: list | None = None, constraints: list | None = None,
                    starts: list[int] | None = None) -> list[DecodeResult]:
        """``decode`` for up to ``rows`` answers at once, one step per token for all of them: row r
        continues after ``first_tokens[r]`` with its own rope delta, budget of ``steps[r]``, stop
        event and grammar processor (all rows constrained or none), attending to the slots from
        ``starts[r]`` (default 0) on. Rows the caller does not fill are idle. Returns one
        DecodeResult per given row."""
        torch = self._torch
        count = len(first_tokens)
        if not 0 < count <= self.rows or not len(rope_deltas) == len(steps) == count:
            raise ValueError(f"decode_rows takes 1 to {self.rows} rows, each with a rope delta and a budget")
        idle = self.rows - count
        steps = [max(0, int(n)) for n in steps] + [0] * idle
        events = list(stop_events or [None] * count) + [None] * idle
        longest = max(steps)
        if longest <= 0:
            return [DecodeResult([], []) for _ in range(count)]
        fill = int(self._fill)  # one read of the device counter
        if longest > self.capacity - fill:
            raise ValueError(f"{longest} steps do not fit the cache ({self.capacity - fill} slots left)")
        # idle rows attend to their own new slots only: finite scores, nothing read from the others
        starts = [int(s) for s in (starts or [0] * count)] + [fill] * idle
        with self._lock:
            self._token.copy_(torch.tensor([int(t) for t in first_tokens] + [0] * idle).view(self.rows, 1))
            self._rope_delta.copy_(torch.tensor([int(d) for d in rope_deltas] + [0] * idle))
            self._start.copy_(torch.tensor(starts))
            self._budget.copy_(torch.tensor(steps))
            self._ended.copy_(torch.tensor([n <= 0 for n in steps]))
            self._index.zero_()
            if constraints is not None:
                per_row = self._constrained(list(first_tokens), steps, events, list(constraints))
            else:
                launched, stopped_at = self._greedy(longest, steps, events)
                tokens = self._tokens[:launched].T.tolist()
                logprobs = self._logprobs[:launched].T.tolist()
                per_row = [(tokens[row][:min(steps[row], stopped_at[row])],
                            logprobs[row][:min(steps[row], stopped_at[row])]) for row in range(count)]
        results = []
        for tokens, logprobs in per_row[:count]:
            end = next((i + 1 for i, token in enumerate(tokens) if token in self._eos_set), len(tokens))
            results.append(DecodeResult(tokens[:end], logprobs[:end]))  # a step queued after an end is dropped
        return results

    def _note_stops(self, events: list, stopped_at: list[int], launched: int) -> None:
        """Rows whose stop event is set now end after the ``launched`` tokens they have: noted for
        the host, and marked ended on the device so the all-ended flag counts them."""
        for row, event in enumerate(events):
            if event is not None and stopped_at[row] > launched and event.is_set():
                stopped_at[row] = launched
                self._ended[row:row + 1].fill_(True)

    def _greedy(self, longest: int, steps: list[int], events: list) -> tuple[int, list[int]]:
        """(steps launched, per row the tokens it keeps before a stop event); on CUDA each step's
        all-ended flag is read after the next step is queued."""
        stopped_at = [longest] * self.rows
        live = [row for row in range(self.rows) if steps[row] > 0]
        launched = 0
        while launched < longest:
            if launched:
                self._note_stops(events, stopped_at, launched)
                if all(stopped_at[row] <= launched for row in live):
                    break
            self._run("greedy")
            if not self.use_graph:
                launched += 1
                if bool(self._all_ended):
                    break
                continue
            self._ended_host[launched:launched + 1].copy_(self._all_ended, non_blocking=True)
            self._step_done[launched % 2].record()
            launched += 1
            if launched >= 2:
                self._step_done[launched % 2].synchronize()  # the step before the one just queued
                if bool(self._ended_host[launched - 2]):
                    break
        if self.use_graph and launched:
            self._step_done[(launched - 1) % 2].synchronize()
        return launched, stopped_at

    def _constrained(self, first_tokens: list[int], steps: list[int], events: list,
                     constraints: list) -> list[tuple[list[int], list[float]]]:
        """Grammar-masked greedy steps: per row (tokens, log-probabilities), read on the host.

        The grammar needs each token on the host before it can give the next step's mask, but the
        next forward needs only the tokens on the device: on CUDA it is queued right after the
        masked choice, and the host reads the tokens (copied out before that forward), advances the
        grammars and uploads the next masks while the GPU runs it. An answer that ends leaves one
        queued forward unused (the cache slot it writes is past the answer); a row that ended
        while others go on gets an all-allowing mask, and its tokens are dropped."""
        torch = self._torch
        count = len(first_tokens)
        previous = [int(t) for t in first_tokens]
        out: list[tuple[list[int], list[float]]] = [([], []) for _ in range(count)]
        live = [steps[row] > 0 for row in range(count)]
        masks = self._mask_host if self.use_graph else torch.empty(self._mask_words.shape, dtype=torch.int32)
        index = 0
        self._run("forward")
        while True:
            masks.fill_(-1)
            for row in range(count):
                if live[row]:
                    masks[row].copy_(constraints[row].next_bitmask(torch.tensor([[previous[row]]])).view(-1))
            self._mask_words.copy_(masks, non_blocking=self.use_graph)  # pinned: queues without waiting
            self._run("choice")
            for row in range(count):  # a row whose event is set keeps this token, then ends
                if live[row] and (index + 1 >= steps[row] or (events[row] is not None and events[row].is_set())):
                    live[row] = None  # its last token
            more = any(state is True for state in live)
            if self.use_graph:
                self._chosen_host[index].copy_(self._tokens[index], non_blocking=True)
                self._logprobs_host[index].copy_(self._logprobs[index], non_blocking=True)
                self._choice_done.record()
                if more:
                    self._run("forward")  # the next tokens' forward, while the host works on the grammars
                self._choice_done.synchronize()
                chosen, logprobs = self._chosen_host[index].tolist(), self._logprobs_host[index].tolist()
            else:
                chosen, logprobs = self._tokens[index].tolist(), self._logprobs[index].tolist()
            for row in range(count):
                if live[row] is False:
                    continue
                previous[row] = chosen[row]
                out[row][0].append(chosen[row])
                out[row][1].append(logprobs[row])
                live[row] = live[row] is True and chosen[row] not in self._eos_set
            index += 1
            if not any(live):
                return out
            if not self.use_graph:
                self._run("forward")
