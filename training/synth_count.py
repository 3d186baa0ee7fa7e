"""A counting task on the action data's scenes, to mix into a base's training: how many of a named
thing are on the table, and where.

    <image>Count: "red tray"   ->  no red tray is visible
    <image>Count: "cube"       ->  2 cubes are visible: [40, 96, 66, 121], [205, 16, 233, 42]

Why: the embedded model's CLARIFY misses are checks its plans skip, not things its picture hides:
a command naming something absent answered with a look-alike's box, and "the cube" with two cubes
in view answered with one of them. A plan supervises that check with one token (CLARIFY or not);
here every sample supervises it, on the same kinds of hard cases: a named thing that is absent
while something of its colour or shape is there, several of one label or shape, one of a kind.
The answer's words are the CLARIFY reasons' ("no red tray is visible", "2 cubes are visible") and
its boxes the plans' (the model's own input pixels, left to right), so the task shares the action
answers' vocabulary.

The samples carry the serving prompt's system message (vla_node.prompt, the template given), so
every sample of a mixed batch shares the prompt up to the image and the trainer's shared-prefix
fast path keeps working; the user turn says "Count:" (vla_node.prompt.count_question), which no
spoken command becomes (the node quotes every command after "Command:"), so no command served can
ask for this answer; the node asks it itself to check a multi-step plan (vla_node.presence_check).
The dataset is declared free-form ("vla_answers": "text"): its answers are not actions.

`generate_count_dataset(out, SynthConfig(...))` writes images/, count_train.json, count_val.json, a
dataset_info.json (``<prefix>_count_train`` / ``_val``) and, last, count_config.json (its options).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from training.synth import (PNG_PARAMS, SynthConfig, SynthError, Synthesizer, Thing, _plural, _Retry, _split_label,
                            remove_outputs)
from vla_node.prompt import PromptBuilder, absent_reason, count_question

__all__ = ["QUESTION_KINDS", "CountSample", "CountingScenes", "count_answer", "count_question",
           "generate_count_dataset"]

# question kinds and how often each is drawn: several of one label or shape (the ambiguous
# commands' case), an absent look-alike (the absent-thing case), one present thing, a bare shape
QUESTION_KINDS = {"several": 0.3, "absent_lookalike": 0.3, "present": 0.25, "shape": 0.15}
COUNT_CONFIG = "count_config.json"  # the options and counts, written once the dataset is whole
# what a run writes besides images/ (dataset_info.json is shared: write_sharegpt updates its entries)
COUNT_OUTPUT_FILES = (COUNT_CONFIG, "count_train.json", "count_val.json")


def count_answer(noun: str, boxes: Sequence[Sequence[int]]) -> str:
    """The answer: the CLARIFY reasons' words, then the boxes (model pixels) left to right."""
    if not boxes:
        return absent_reason(noun)
    listed = ", ".join("[" + ", ".join(str(int(v)) for v in box) + "]" for box in boxes)
    if len(boxes) == 1:
        return f"1 {noun} is visible: {listed}"
    return f"{len(boxes)} {_plural(noun)} are visible: {listed}"


@dataclass
class CountSample:
    index: int
    image: np.ndarray  # BGR uint8, as written to PNG
    noun: str
    kind: str  # a QUESTION_KINDS key
    matches: list[Thing]
    messages: list[dict]


class CountingScenes(Synthesizer):
    """training.synth's scenes with a counting question each; ``count_sample(i)`` depends only on (config, i)."""

    def __init__(self, cfg: SynthConfig, template: str = "compact", vocab=None):
        super().__init__(cfg, vocab)
        if self.codec is None:
            raise SynthError("a counting dataset answers with boxes: give SynthConfig boxes "
                             "'absolute_resized' or 'normalized_1000'")
        self.system_text = PromptBuilder(self.vocab, template=template).system_text
        self.kinds = list(QUESTION_KINDS)
        self.kind_p = np.array([QUESTION_KINDS[k] for k in self.kinds])

    def _absent_lookalike(self, rng, things: list[Thing]) -> str:
        """A label of neither present object nor container that shares a colour or shape with one of its kind."""
        present = {t.label for t in things}
        kind = "object" if rng.random() < 0.6 else "container"
        seen = [t for t in things if t.kind == kind]
        pool = [x for x in (self.objects if kind == "object" else self.containers) if x not in present]
        colours, shapes = {t.colour for t in seen}, {t.shape for t in seen}
        alike = [x for x in pool if _split_label(x)[0] in colours or _split_label(x)[1] in shapes]
        return self._choice(rng, alike or pool)

    def _question(self, rng) -> tuple[list[Thing], str, str]:
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
        if kind == "several":  # the ambiguous commands' scenes: 2-3 of a label or of a shape
            noun, labels = self._group(rng)
            things = self._scene(rng, must_objects=labels, n_obj=len(labels) + int(rng.integers(0, 3)))
            return things, noun, kind
        things = self._scene(rng)
        if kind == "absent_lookalike":
            return things, self._absent_lookalike(rng, things), kind
        if kind == "present":
            return things, self._choice(rng, things).label, kind
        shapes = sorted({_split_label(x)[1] for x in self.objects + self.containers})
        return things, self._choice(rng, shapes), kind

    @staticmethod
    def matches(things: Sequence[Thing], noun: str) -> list[Thing]:
        """The things ``noun`` (a label or a bare shape) names, left to right."""
        found = [t for t in things if t.label == noun or t.shape == noun]
        return sorted(found, key=lambda t: (t.center[0], t.center[1]))

    def count_sample(self, index: int, render: bool = True) -> CountSample:
        rng = np.random.default_rng([self.cfg.seed, index])
        for _ in range(200):
            try:
                things, noun, kind = self._question(rng)
            except _Retry:
                continue
            found = self.matches(things, noun)
            answer = count_answer(noun, [self.codec.to_model(t.as_box()) for t in found])
            image = self._render(rng, things) if render else None
            messages = [{"role": "system", "content": self.system_text},
                        {"role": "user", "content": "<image>" + count_question(noun)},
                        {"role": "assistant", "content": answer}]
            return CountSample(index, image, noun, kind, found, messages)
        raise SynthError(f"counting sample {index}: no scene could be drawn with these labels")


_WORKER: Optional[CountingScenes] = None


def _init_worker(cfg: SynthConfig, template: str) -> None:
    global _WORKER
    _WORKER = CountingScenes(cfg, template)


def _encode(scenes: CountingScenes, index: int) -> tuple[int, bytes, list, str]:
    import cv2

    sample = scenes.count_sample(index)
    ok, png = cv2.imencode(".png", sample.image, PNG_PARAMS)
    if not ok:
        raise SynthError(f"PNG encoding failed for counting sample {index}")
    return index, png.tobytes(), sample.messages, sample.kind


def _encode_in_worker(index: int) -> tuple[int, bytes, list, str]:
    return _encode(_WORKER, index)


def generate_count_dataset(out_dir, cfg: SynthConfig, template: str = "compact", workers: int = 1) -> dict:
    """Write the dataset (module docstring) from ``cfg``'s scenes: its num, seed, size, box convention
    and val_frac (test_frac is not used: the held-out sets are the action data's). Same config, same
    bytes. Returns {"counts": {split: n}, "kinds": {kind: n}, "seconds": s}."""
    from training.sharegpt import Sample, write_sharegpt

    started = time.perf_counter()
    scenes = CountingScenes(cfg, template)
    out = Path(out_dir)
    images = out / "images"
    remove_outputs(out, COUNT_OUTPUT_FILES)  # a stopped or larger earlier run's images would lie beside the new ones
    images.mkdir(parents=True, exist_ok=True)
    n_val = int(round(cfg.num * cfg.val_frac))
    rows: dict[str, list] = {"train": [], "val": []}
    kinds: dict[str, int] = {}
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (cfg, template))
    try:
        encoded = (pool.imap(_encode_in_worker, range(cfg.num), chunksize=64) if pool is not None
                   else (_encode(scenes, i) for i in range(cfg.num)))
        for index, png, messages, kind in encoded:  # in index order: deterministic
            path = images / f"{index:06d}.png"
            path.write_bytes(png)
            rows["val" if index < n_val else "train"].append(Sample(messages, [path], f"count:{index}"))
            kinds[kind] = kinds.get(kind, 0) + 1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for split, samples in rows.items():
        write_sharegpt(out / f"count_{split}.json", samples, dataset_info_name=f"{cfg.name_prefix}_count_{split}",
                       answers="text")
    report = {"counts": {split: len(samples) for split, samples in rows.items()}, "kinds": dict(sorted(kinds.items()))}
    # written last: a folder holding it is a whole dataset, made with these options
    (out / COUNT_CONFIG).write_text(json.dumps({"generator": "training.synth_count", "template": template,
                                                "config": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in asdict(cfg).items()}, **report},
                                               indent=2) + "\n", encoding="utf-8")
    return {**report, "seconds": time.perf_counter() - started}
