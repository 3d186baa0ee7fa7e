"""Batched generation for TransformersBackend: several waiting commands decoded together.

Static decode cache (CUDA's default): each request is prefilled alone by the backend's
single-command path (prefix, vision graph, prefill graph, first token), its keys and values are
placed into its row of a batch StaticCache (batch_cache.py), and one StaticDecoder step per token
serves every row (static_decode.StaticDecoder.decode_rows). Dynamic: one left-padded
``model.generate``. Greedy rows equal each request run alone (tests/test_batching.py).

A mixin: it works on the backend's own state (its lock, processor, caches, grammar) and helpers.
"""
from __future__ import annotations

import time

from vla_node.backends.base import BackendError, GenerationRequest, GenerationResult, token_budget, warmup_request
from vla_node.backends.engine.batch_cache import new_batch_cache, padded_rows, place_row, set_fill

__all__ = ["BatchedGeneration"]


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
    """``generate_batch`` and its warm-up, mixed into TransformersBackend."""

    max_batch_size = 8  # requests generate_batch() decodes together; more are split into chunks

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | BackendError]:
        """Several requests decoded together; one result per request, in order.

        Static decode cache: each request is prefilled alone (as :meth:`generate` does), then one
        decode step per token serves all of them (batch_cache.py, StaticDecoder.decode_rows).
        Dynamic: one left-padded ``model.generate``. Greedy rows equal what :meth:`generate` gives
        each request alone (tests/test_batching.py). A bad request (invalid image, budget) gets its
        BackendError in its row; a row whose stop_event is set ends on its own; preprocess/generate
        times are the batch's, shared.
        """
        results: list[GenerationResult | BackendError | None] = [None] * len(requests)
        budgets: dict[int, int] = {}
        for row, request in enumerate(requests):
            try:
                budgets[row] = token_budget(request, self.max_new_tokens, image_required=False)
            except BackendError as error:
                results[row] = error
        rows = list(budgets)
        for start in range(0, len(rows), max(1, int(self.max_batch_size))):
            chunk = rows[start:start + max(1, int(self.max_batch_size))]
            try:
                chunk_results = self._generate_chunk([requests[row] for row in chunk], [budgets[row] for row in chunk])
            except BackendError as error:
                chunk_results = [error] * len(chunk)
            except Exception as error:  # e.g. CUDA OOM: the rows fail, the caller survives
                chunk_results = [BackendError(f"generation failed: {type(error).__name__}: {error}")] * len(chunk)
            for row, result in zip(chunk, chunk_results):
                results[row] = result
        return results

    def _batch_inputs(self, images: list, texts: list[str]) -> dict:
        """One processor call, left padded (generation appends on the right), tensors on the device."""
        return self._process(texts, images, padding=True, padding_side="left")

    def _generate_chunk(self, requests: list[GenerationRequest], budgets: list[int]) -> list:
        if self.decode_cache == "static":
            if len(requests) == 1:
                return [self.generate(requests[0])]
            return self._generate_static_chunk(requests, budgets)
        import torch

        results: list = [None] * len(requests)
        with self._lock:
            self._ensure_open()
            t0 = time.perf_counter()
            texts: dict[int, str] = {}
            for row, request in enumerate(requests):
                try:
                    texts[row] = self.processor.apply_chat_template(
                        request.messages, add_generation_prompt=True, tokenize=False)
                except Exception as error:
                    results[row] = BackendError(f"preprocessing failed: {error}")
            rows = list(texts)
            try:
                inputs = self._batch_inputs([requests[r].image for r in rows], [texts[r] for r in rows])
            except Exception:
                # one bad image fails the whole processor call: find it alone, batch the rest
                good = []
                for row in rows:
                    try:
                        self._batch_inputs([requests[row].image], [texts[row]])
                        good.append(row)
                    except Exception as error:
                        results[row] = BackendError(f"preprocessing failed: {error}")
                rows = good
                try:
                    inputs = self._batch_inputs([requests[r].image for r in rows], [texts[r] for r in rows]) if rows else None
                except Exception as error:
                    for row in rows:
                        results[row] = BackendError(f"preprocessing failed: {error}")
                    rows, inputs = [], None
            if not rows:
                return results
            sizes = [self._input_size(grid) for grid in inputs["image_grid_thw"]]
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

            constraint = None
            if self.action_grammar is not None:
                try:
                    constraint = self.action_grammar.batch_logits_processor(
                        row_budgets, [self._box_bounds(size) for size in sizes])
                except Exception as e:
                    raise BackendError(f"constrained decoding: {e}") from e
            ends = _RowEnds(events, row_budgets, padded_len, constraint)
            gc = self._greedy_generation_config(max(row_budgets))
            from transformers import LogitsProcessorList, StoppingCriteriaList

            kwargs = {"stopping_criteria": StoppingCriteriaList([ends])}
            if constraint is not None:
                kwargs["logits_processor"] = LogitsProcessorList([constraint])
            try:
                with torch.inference_mode():
                    out = self.base_model.generate(**inputs, generation_config=gc, **kwargs)
            except Exception as e:
                raise BackendError(f"generation failed: {e}") from e
            logits = out.logits or ()
            eos = set(self._eos_ids)
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
                confidence = self._confidence(logits, new_ids, i)
                text = self.processor.tokenizer.decode(
                    new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
                results[row] = GenerationResult(text, confidence, sizes[i], prompt_lens[i], n_new,
                                                preprocess_ms, generate_ms)
            return results

    def _generate_static_chunk(self, requests: list[GenerationRequest], budgets: list[int]) -> list:
        """Requests prefilled one by one on the StaticCache, placed into the rows of a batch cache
        (batch_cache.py) and decoded together by one StaticDecoder over those rows."""
        import torch

        results: list = [None] * len(requests)
        with self._lock:
            self._ensure_open()
            t0 = time.perf_counter()
            prepared: dict[int, dict] = {}
            for row, request in enumerate(requests):
                try:
                    prepared[row] = self.prepare_inputs(request.image, request.messages)
                except Exception as error:
                    results[row] = BackendError(f"preprocessing failed: {error}")
            sizes, prompt_lens = {}, {}
            for row, inputs in prepared.items():
                sizes[row] = self._input_size(inputs["image_grid_thw"][0])
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
            if self.action_grammar is not None:
                try:
                    for row in rows:
                        constraints[row] = self.action_grammar.logits_processor(budgets[row],
                                                                                self._box_bounds(sizes[row]))
                except Exception as e:
                    raise BackendError(f"constrained decoding: {e}") from e
            end = max(prompt_lens[row] for row in rows)  # every prompt ends at this slot of the batch cache
            firsts, deltas, steps, starts = [], [], [], []
            try:
                with torch.inference_mode():
                    batch = None
                    for row in rows:
                        kwargs, stop_check = self._generate_kwargs(requests[row].stop_event, constraints.get(row))
                        first, stopped, rope_deltas = self._static_prefill(
                            prepared[row], requests[row].image, budgets[row], requests[row].stop_event,
                            constraints.get(row), kwargs, stop_check)
                        if batch is None:  # the one-row cache holds a prompt now: its layout is known
                            batch = self._batch_cache(len(rows), end + max(budgets[r] for r in rows))
                        place_row(batch, len(firsts), self._static_cache, prompt_lens[row], end)
                        firsts.append(first)
                        # the row's prompt starts (end - length) slots later than alone: its rope delta shifts back
                        deltas.append(int(rope_deltas.reshape(-1)[0]) - (end - prompt_lens[row]))
                        starts.append(end - prompt_lens[row])
                        steps.append(0 if first is None else self._steps_after(first, budgets[row], stopped))
                    set_fill(batch, end)
                    rows_of_cache = int(batch.layers[0].keys.shape[0])
                    decoder = self._current_decoder(self._batch_decoders.get(rows_of_cache), batch)
                    self._batch_decoders[rows_of_cache] = decoder
                    tokens = [self._pad_id if first is None else first[0] for first in firsts]
                    rests = decoder.decode_rows(tokens, deltas, steps, [requests[row].stop_event for row in rows],
                                                [constraints[row] for row in rows] if constraints else None, starts)
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"generation failed: {e}") from e
            generate_ms = (time.perf_counter() - t1) * 1000.0
            for row, first, rest in zip(rows, firsts, rests):
                new_ids, confidence = ([], 1.0) if first is None else self._answer(first, rest)
                text = self.processor.tokenizer.decode(
                    new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
                results[row] = GenerationResult(text, confidence, sizes[row], prompt_lens[row], len(new_ids),
                                                preprocess_ms, generate_ms)
            return results

    def _batch_cache(self, count: int, total_len: int):
        """The batch StaticCache for ``count`` rows (padded_rows: a power of two) holding
        ``total_len`` slots; kept per row count and only ever grown, like the one-row cache."""
        rows = padded_rows(count, int(self.max_batch_size))
        slots = self._static_slots(total_len)
        cache = self._batch_caches.get(rows)
        if cache is None or cache.layers[0].max_cache_len < slots:
            cache = self._batch_caches[rows] = new_batch_cache(self.base_model.config, self._static_cache, rows, slots)
        return cache

    def warmup_batches(self, max_rows: int) -> None:
        """With the static cache, one tiny batch per padded row count up to ``max_rows`` (capped by
        ``max_batch_size``): on CUDA each count's decoder is compiled and recorded here (~30-35 s
        each for the 3B architecture on an H200), not at the first batch of that size."""
        if self.decode_cache != "static":
            return
        limit = int(self.max_batch_size)
        for rows in sorted({padded_rows(count, limit) for count in range(2, min(int(max_rows), limit) + 1)}):
            for result in self.generate_batch([warmup_request(self.pixel_limits) for _ in range(rows)]):
                if isinstance(result, BackendError):
                    raise result
