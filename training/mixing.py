"""Several datasets -> one training list, and a held-out eval split: LLaMA-Factory's `mix_strategy`,
`interleave_probs` and `val_size` on in-memory sample lists.

    concat            one after the other (the Trainer shuffles anyway)
    interleave_under  one sample from each in turn (or drawn by `interleave_probs`), until the first
                      dataset runs out: the smaller datasets weigh as much as the big ones
    interleave_over   the same until every dataset ran out at least once, the shorter ones starting
                      over: every sample is seen, the small datasets repeated

(the semantics of `datasets.interleave_datasets` with stopping strategy first_exhausted /
all_exhausted, which LLaMA-Factory uses).
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

__all__ = ["mix", "hold_out"]

T = TypeVar("T")


def mix(datasets: Sequence[Sequence[T]], strategy: str = "concat", probabilities: Sequence[float] | None = None,
        seed: int = 0) -> list[T]:
    lists = [list(d) for d in datasets]
    if strategy == "concat" or len(lists) == 1:
        return [x for d in lists for x in d]
    if strategy not in ("interleave_under", "interleave_over"):
        raise ValueError(f"unknown mix_strategy {strategy!r}")
    if any(not d for d in lists):
        raise ValueError("interleaving needs every dataset to hold samples")
    if probabilities is not None and len(probabilities) != len(lists):
        raise ValueError(f"{len(probabilities)} interleave_probs for {len(lists)} datasets")
    if probabilities is not None and strategy == "interleave_over" and min(probabilities) <= 0:
        raise ValueError("interleave_over with a zero interleave_prob would never see that dataset run out")
    if probabilities is None:  # in turn, whole rounds: as many rounds as the shortest (under) or longest (over)
        rounds = (min if strategy == "interleave_under" else max)(len(d) for d in lists)
        return [d[r % len(d)] for r in range(rounds) for d in lists]
    rng = random.Random(seed)
    position = [0] * len(lists)
    finished = [False] * len(lists)
    out: list[T] = []
    stop = any if strategy == "interleave_under" else all
    while not stop(finished):
        i = rng.choices(range(len(lists)), weights=probabilities)[0]
        out.append(lists[i][position[i]])
        position[i] += 1
        if position[i] == len(lists[i]):  # ran out: starts over (interleave_over)
            finished[i] = True
            position[i] = 0
    return out


def hold_out(samples: Sequence[T], val_size: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, eval): ``val_size`` (a fraction < 1, or a number of samples) drawn at random by ``seed``."""
    n = len(samples)
    k = int(val_size) if val_size >= 1 else int(round(n * val_size))
    if val_size > 0 and k == 0:
        k = 1
    if k >= n:
        raise ValueError(f"val_size {val_size} leaves no training sample of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [s for j, s in enumerate(samples) if j not in held], [samples[j] for j in sorted(held)]
