"""A free-form skill on synthetic scenes: "What is on the table?" answered in words.

The scenes are training.synth's (the same table-top drawings the action data uses); the answer names
every object and container from left to right, in the question's language:

    <image>What is on the table?   ->  From left to right: a red cube, a blue bowl and a green ball.
    <image>桌子上有什么？            ->  从左到右：红色方块、蓝色碗和绿色球。

`vla-data synth-vqa OUT_DIR` writes images/, vqa_train.json, vqa_val.json and a dataset_info.json
declaring both datasets free-form ("vla_answers": "text"): LLaMA-Factory ShareGPT, trainable by
`vla-train` (and by LLaMA-Factory itself), scored by `vla-eval` with BLEU-4 / ROUGE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["QUESTIONS", "VQAConfig", "describe_table", "generate_vqa_dataset"]

QUESTIONS = {
    "en": ("What is on the table?", "What do you see on the table?", "Which things are on the table?",
           "Describe what is on the table."),
    "zh": ("桌子上有什么？", "桌上有哪些东西？", "你在桌子上看到了什么？"),
}


@dataclass(frozen=True)
class VQAConfig:
    num: int = 240
    seed: int = 0
    size: tuple[int, int] = (320, 240)
    languages: tuple[str, ...] = ("en", "zh")
    val_frac: float = 0.2
    name_prefix: str = "tabletop_vqa"


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def describe_table(things: Sequence, language: str) -> str:
    """The answer: every thing (training.synth.Thing) from left to right."""
    from training.synth_language import COLOURS_ZH, SHAPES_ZH

    ordered = sorted(things, key=lambda t: (t.center[0], t.center[1]))
    if language == "zh":
        names = [COLOURS_ZH.get(t.colour, t.colour) + SHAPES_ZH.get(t.shape, t.shape) for t in ordered]
        listed = names[0] if len(names) == 1 else "、".join(names[:-1]) + "和" + names[-1]
        return f"从左到右：{listed}。" if len(names) > 1 else f"桌子上有{listed}。"
    names = [_a(t.label) for t in ordered]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"From left to right: {listed}." if len(names) > 1 else f"There is {listed} on the table."


def generate_vqa_dataset(out_dir: str | Path, cfg: VQAConfig = VQAConfig()) -> dict[str, int]:
    """Write the dataset; returns the sample count per split. Same config -> same bytes."""
    import cv2

    from training.sharegpt import Sample, write_sharegpt
    from training.synth import PNG_PARAMS, SynthConfig, SynthError, Synthesizer

    unknown = [lang for lang in cfg.languages if lang not in QUESTIONS]
    if unknown or not cfg.languages:
        raise SynthError(f"languages {list(cfg.languages)}: each must be one of {', '.join(QUESTIONS)}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes = Synthesizer(SynthConfig(num=cfg.num, seed=cfg.seed, size=cfg.size, languages=("en",),
                                     skills=("move", "pick", "multi")))
    rng = np.random.default_rng([cfg.seed, 7])
    n_val = int(round(cfg.num * cfg.val_frac))
    splits: dict[str, list] = {"train": [], "val": []}
    for index in range(cfg.num):
        scene = scenes.sample(index)
        language = cfg.languages[int(rng.integers(len(cfg.languages)))]
        question = QUESTIONS[language][int(rng.integers(len(QUESTIONS[language])))]
        path = images / f"{index:06d}.png"
        ok, png = cv2.imencode(".png", scene.image, PNG_PARAMS)
        if not ok:
            raise SynthError(f"PNG encoding failed for scene {index}")
        path.write_bytes(png.tobytes())
        messages = [{"role": "user", "content": "<image>" + question},
                    {"role": "assistant", "content": describe_table(scene.things, language)}]
        splits["val" if index < n_val else "train"].append(Sample(messages, [path], f"vqa:{index}"))
    for split, rows in splits.items():
        write_sharegpt(out / f"vqa_{split}.json", rows, dataset_info_name=f"{cfg.name_prefix}_{split}", answers="text")
    return {split: len(rows) for split, rows in splits.items()}
