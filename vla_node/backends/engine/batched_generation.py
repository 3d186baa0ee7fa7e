"""Batched generation, part of the engine: several waiting commands decoded together.

Static decode cache (CUDA's default): each request is prefilled alone by the engine's
single-command path (prefix, vision graph, prefill graph, first token), its keys and values are
placed into its row of a batch StaticCache (batch_cache.py), and one StaticDecoder step per token
serves every row (static_decode.StaticDecoder.decode_rows). Dynamic: one left-padded
``model.generate``. Greedy rows equal each request run alone (tests/test_batching.py).

The requests are the backend's: it turns them into model inputs, grammar processors and answers
through the public methods named by ``Requests`` (TransformersBackend is one).
"""
from __future__ import annotations

import time
from typing import Protocol

from vla_node.backends.base import BackendError, GenerationRequest, GenerationResult, token_budget
from vla_node.backends.engine.batch_cache import new_batch_cache, padded_rows, place_row, set_fill
from vla_node.backends.generation import confidence, generate_kwargs, greedy_config

__all__ = ["BatchedGeneration", "Requests"]


class Requests(Protocol):
    """What batched generation asks of its backend about the requests."""

    max_new_tokens: int
    lock: object  # held while a chunk of requests is prepared and decoded

    def ensure_open(self) -> None: ...

    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def prepare_inputs(self, image, messages: list[dict]) -> dict: ...

    def chat_text(self, messages: list[dict]) -> str: ...

    def batch_inputs(self, images: list, texts: list[str]) -> dict: ...

    def input_size(self, grid_thw) -> tuple[int, int]: ...

    def constraint(self, budget: int, size: tuple[int, int]): ...

    def batch_constraint(self, budgets: list[int], sizes: list[tuple[int, int]]): ...

    def first_token_processor(self): ...

    def answer_text(self, ids: list[int]) -> str: ...


class _RowEnds:
    """StoppingCriteria for a batch: each row ends on its own stop event or at its own budget.

    Records after how many new tokens each row ended, and releases ended rows from the grammar
    processor (generate() pads them from then on)."""

    def __init__(self, events, budgets: list[int], prompt_len: int, constraint=None):
        self.events = events
        self.budgets = budgets
        self.prompt_len = prompt_len
        self.constraint = constraint
        self.ended_at: list[int | None] = [None] * len(budgets)
        # a row whose event was set before generation: no token of its own (like generate())
        self.ended_before_start = [ev is not None and ev.is_set() for ev in events]
        if constraint is not None:
            constraint.released.update(row for row, ended in enumerate(self.ended_before_start) if ended)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        generated = int(input_ids.shape[1]) - self.prompt_len
        ended = []
        for row, (event, budget) in enumerate(zip(self.events, self.budgets)):
            done = self.ended_before_start[row] or generated >= budget or (event is not None and event.is_set())
            if done and self.ended_at[row] is None:
                self.ended_at[row] = generated
                if self.constraint is not None:
                    self.constraint.released.add(row)
            ended.append(done)
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


class BatchedGeneration:
    """The engine's ``generate_batch`` and its warm-up; its batch caches and decoders (per padded
    row count: batch_cache.padded_rows)."""

    def __init__(self, engine):
        self.engine = engine
        self.max_batch_size = engine.options.max_batch_size
        self.caches: dict[int, object] = {}  # a StaticCache per padded row count
        self.decoders: dict[int, object] = {}  # a StaticDecoder per such cache

    def forget_decoders(self) -> None:
        self.decoders.clear()

    def clear(self) -> None:
        self.caches.clear()
        self.decoders.clear()

    def generate_batch(self, requests: list[GenerationRequest], backend: Requests) -> list[GenerationResult | BackendError]:
        """Several requests decoded together; one result per request, in order.

        Static decode cache: each request is prefilled alone (as the single-command path does),
        then one decode step per token serves all of them (batch_cache.py, StaticDecoder.decode_rows).
        Dynamic: one left-padded ``model.generate``. Greedy rows equal what ``backend.generate``
        gives each request alone (tests/test_batching.py). A bad request (invalid image, budget)
        gets its BackendError in its row; a row whose stop_event is set ends on its own;
        preprocess/generate times are the batch's, shared.
        """
        results: list[GenerationResult | BackendError | None] = [None] * len(requests)
        budgets: dict[int, int] = {}
        for row, request in enumerate(requests):
            try:
                budgets[row] = token_budget(request, backend.max_new_tokens, image_required=False)
            except BackendError as error:
                results[row] = error
        rows = list(budgets)
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            try:
                chunk_results = self._generate_chunk([requests[row] for row in chunk], [budgets[row] for row in chunk],
                                                     backend)
            except BackendError as error:
                chunk_results = [error] * len(chunk)
            except Exception as error:  # e.g. CUDA OOM: the rows fail, the caller survives
                chunk_results = [BackendError(f"generation failed: {type(error).__name__}: {error}")] * len(chunk)
            for row, result in zip(chunk, chunk_results):
                results[row] = result
        return results

    def _generate_chunk(self, requests: list[GenerationRequest], budgets: list[int], backend: Requests) -> list:
        static = self.engine.decode_cache == "static"
        if static and len(requests) == 1:
            return [backend.generate(requests[0])]
        with backend.lock:
            backend.ensure_open()
            if static:
                return self._generate_static_chunk(requests, budgets, backend)
            return self._generate_padded_chunk(requests, budgets, backend)

    def _generate_padded_chunk(self, requests: list[GenerationRequest], budgets: list[int], backend: Requests) -> list:
        """One processor call, left padded, and one ``generate`` for the chunk."""
        import torch

        results: list = [None] * len(requests)
        t0 = time.perf_counter()
        texts: dict[int, str] = {}
        for row, request in enumerate(requests):
            try:
                texts[row] = backend.chat_text(request.messages)
            except Exception as error:
                results[row] = BackendError(f"preprocessing failed: {error}")
        rows = list(texts)
        try:
            inputs = backend.batch_inputs([requests[r].image for r in rows], [texts[r] for r in rows])
        except Exception:
            # one bad image fails the whole processor call: find it alone, batch the rest
            good = []
            for row in rows:
                try:
                    backend.batch_inputs([requests[row].image], [texts[row]])
                    good.append(row)
                except Exception as error:
                    results[row] = BackendError(f"preprocessing failed: {error}")
            rows = good
            try:
                inputs = backend.batch_inputs([requests[r].image for r in rows], [texts[r] for r in rows]) if rows else None
            except Exception as error:
                for row in rows:
                    results[row] = BackendError(f"preprocessing failed: {error}")
                rows, inputs = [], None
        if not rows:
            return results
        sizes = [backend.input_size(grid) for grid in inputs["image_grid_thw"]]
        prompt_lens = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        padded_len = int(inputs["input_ids"].shape[1])
        t1 = time.perf_counter()
        preprocess_ms = (t1 - t0) * 1000.0

        events = [requests[row].stop_event for row in rows]
        row_budgets = [budgets[row] for row in rows]
        if all(ev is not None and ev.is_set() for ev in events):
            for i, row in enumerate(rows):
                results[row] = GenerationResult("", 1.0, sizes[i], prompt_lens[i], 0, preprocess_ms, 0.0)
            return results

        try:
            constraint = backend.batch_constraint(row_budgets, sizes)
        except Exception as e:
            raise BackendError(f"constrained decoding: {e}") from e
        ends = _RowEnds(events, row_budgets, padded_len, constraint)
        from transformers import LogitsProcessorList, StoppingCriteriaList

        kwargs = {"stopping_criteria": StoppingCriteriaList([ends])}
        # the first-token rule on the raw scores, then the grammar, as one request alone has them
        processors = [p for p in (backend.first_token_processor(), constraint) if p is not None]
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        loaded = self.engine.loaded
        try:
            with torch.inference_mode():
                out = loaded.model.generate(**inputs, generation_config=greedy_config(loaded, max(row_budgets)),
                                            **kwargs)
        except Exception as e:
            raise BackendError(f"generation failed: {e}") from e
        logits = out.logits or ()
        eos = set(loaded.eos_ids)
        generate_ms = (time.perf_counter() - t1) * 1000.0
        for i, row in enumerate(rows):
            if ends.ended_before_start[i]:
                results[row] = GenerationResult("", 1.0, sizes[i], prompt_lens[i], 0, preprocess_ms, 0.0)
                continue
            new_ids = out.sequences[i, padded_len:].tolist()[:len(logits)]
            n_new = min(len(new_ids), row_budgets[i], ends.ended_at[i] or len(new_ids))
            first_eos = next((j for j, t in enumerate(new_ids[:n_new]) if t in eos), None)
            if first_eos is not None:
                n_new = first_eos + 1  # the row ended itself; what follows is padding
            new_ids = new_ids[:n_new]
            results[row] = GenerationResult(backend.answer_text(new_ids), confidence(logits, new_ids, i), sizes[i],
                                            prompt_lens[i], n_new, preprocess_ms, generate_ms)
        return results

    def _generate_static_chunk(self, requests: list[GenerationRequest], budgets: list[int], backend: Requests) -> list:
        """Requests prefilled one by one on the StaticCache, placed into the rows of a batch cache
        (batch_cache.py) and decoded together by one StaticDecoder over those rows."""
        import torch

        engine = self.engine
        results: list = [None] * len(requests)
        t0 = time.perf_counter()
        prepared: dict[int, dict] = {}
        for row, request in enumerate(requests):
            try:
                prepared[row] = backend.prepare_inputs(request.image, request.messages)
            except Exception as error:
                results[row] = BackendError(f"preprocessing failed: {error}")
        sizes, prompt_lens = {}, {}
        for row, inputs in prepared.items():
            sizes[row] = backend.input_size(inputs["image_grid_thw"][0])
            prompt_lens[row] = int(inputs["input_ids"].shape[1])
        t1 = time.perf_counter()
        preprocess_ms = (t1 - t0) * 1000.0
        rows = []
        for row in prepared:
            event = requests[row].stop_event
            if event is not None and event.is_set():
                results[row] = GenerationResult("", 1.0, sizes[row], prompt_lens[row], 0, preprocess_ms, 0.0)
            else:
                rows.append(row)
        if not rows:
            return results
        constraints: dict[int, object] = {}
        try:
            for row in rows:
                constraint = backend.constraint(budgets[row], sizes[row])
                if constraint is not None:
                    constraints[row] = constraint
        except Exception as e:
            raise BackendError(f"constrained decoding: {e}") from e
        end = max(prompt_lens[row] for row in rows)  # every prompt ends at this slot of the batch cache
        firsts, deltas, steps, starts = [], [], [], []
        try:
            with torch.inference_mode():
                batch = None
                for row in rows:
                    first_token = backend.first_token_processor()
                    kwargs, stop_check = generate_kwargs(requests[row].stop_event, constraints.get(row), first_token)
                    first, stopped, rope_deltas = engine.static_prefill_first(
                        prepared[row], requests[row].image, budgets[row], requests[row].stop_event,
                        constraints.get(row), kwargs, stop_check, first_token)
                    if batch is None:  # the one-row cache holds a prompt now: its layout is known
                        batch = self._batch_cache(len(rows), end + max(budgets[r] for r in rows))
                    place_row(batch, len(firsts), engine.static_cache, prompt_lens[row], end)
                    firsts.append(first)
                    # the row's prompt starts (end - length) slots later than alone: its rope delta shifts back
                    deltas.append(int(rope_deltas.reshape(-1)[0]) - (end - prompt_lens[row]))
                    starts.append(end - prompt_lens[row])
                    steps.append(0 if first is None else engine.steps_after(first, budgets[row], stopped))
                set_fill(batch, end)
                rows_of_cache = int(batch.layers[0].keys.shape[0])
                decoder = engine.current_decoder(self.decoders.get(rows_of_cache), batch)
                self.decoders[rows_of_cache] = decoder
                tokens = [engine.loaded.pad_id if first is None else first[0] for first in firsts]
                rests = decoder.decode_rows(tokens, deltas, steps, [requests[row].stop_event for row in rows],
                                            [constraints[row] for row in rows] if constraints else None, starts)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"generation failed: {e}") from e
        generate_ms = (time.perf_counter() - t1) * 1000.0
        for row, first, rest in zip(rows, firsts, rests):
            answer = engine.answer(first, rest) if first is not None else None
            new_ids, conf = (answer.ids, answer.confidence) if answer is not None else ([], 1.0)
            results[row] = GenerationResult(backend.answer_text(new_ids), conf, sizes[row], prompt_lens[row],
                                            len(new_ids), preprocess_ms, generate_ms)
        return results

    def _batch_cache(self, count: int, total_len: int):
        """The batch StaticCache for ``count`` rows (padded_rows: a power of two) holding
        ``total_len`` slots; kept per row count and only ever grown, like the one-row cache."""
        engine = self.engine
        rows = padded_rows(count, self.max_batch_size)
        slots = engine.static_slots(total_len)
        cache = self.caches.get(rows)
        if cache is None or cache.layers[0].max_cache_len < slots:
            cache = self.caches[rows] = new_batch_cache(engine.loaded.model.config, engine.static_cache, rows, slots)
        return cache

    def row_counts(self, max_rows: int) -> list[int]:
        """The padded row counts a warm-up prepares for batches of up to ``max_rows`` requests."""
        limit = self.max_batch_size
        return sorted({padded_rows(count, limit) for count in range(2, min(int(max_rows), limit) + 1)})
