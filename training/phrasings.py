"""Held-out phrasings: does the model follow commands worded in ways the generator never writes?

models/heldout/phrasings.json holds move / pick / place commands written by hand, apart from
training/synth_language.py (other word orders, politeness, fillers, synonyms, ASR-like text).
Each phrasing is put on ``scenes_per_phrasing`` fresh scenes of a held-out seed; every scene is
written twice with the same image and the same answer: once with the hand-written phrasing
(dataset ``phrased``) and once with the generator's own command for that scene (``generated``).
The gap between the two exact-match rates is what the wording alone costs.

    materialise_phrasings(Path("models/heldout/phrasings.json"), base_cfg, "en", out_dir)
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2

from training.synth import PNG_PARAMS, SynthConfig, Synthesizer
from training.synth_language import COLOURS_ZH, SHAPES_ZH, prepositions

__all__ = ["read_phrasings", "materialise_phrasings", "fill"]

DATASETS = ("phrased", "generated")


def read_phrasings(path: Path) -> dict:
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    for lang in ("en", "zh"):
        for number, entry in enumerate(spec.get(lang, []), 1):
            if entry.get("skill") not in ("move", "pick", "place") or not isinstance(entry.get("text"), str):
                raise ValueError(f"{path}: {lang} phrasing {number} needs a skill (move/pick/place) and a text")
    return spec


def _shape(label: str) -> str:
    return label.rpartition(" ")[2]


def _requirement_met(entry: dict, obj: str | None, dest: str | None) -> bool:
    for role, label in (("object", obj), ("destination", dest)):
        wanted = entry.get("requires", {}).get(role)
        if wanted is None:
            continue
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        if label is None or _shape(label) not in wanted:
            return False
    return True


def _references_unique(entry: dict, obj: str | None, dest: str | None, things) -> bool:
    """A phrasing that names a thing by its shape alone ({os}, {ds}) or its colour alone ({oc},
    {dc}) names one thing only where no other object (container) of the scene shares that word;
    elsewhere its right answer is a CLARIFY, not the scene's action, so the scene is not used."""
    for label, kind, slots in ((obj, "object", ("{os}", "{oc}")), (dest, "container", ("{ds}", "{dc}"))):
        if label is None:
            continue
        colour, _, shape = label.rpartition(" ")
        for slot, word, attribute in zip(slots, (shape, colour), ("shape", "colour")):
            if slot in entry["text"] and \
                    sum(1 for t in things if t.kind == kind and getattr(t, attribute) == word) != 1:
                return False
    return True


def fill(entry: dict, lang: str, obj: str | None, dest: str | None, zh_name) -> str:
    """The phrasing with its slots filled for this object and destination (canonical labels)."""
    slots: dict[str, str] = {}
    if obj is not None:
        colour, _, shape = obj.rpartition(" ")
        slots.update(o=obj if lang == "en" else zh_name(obj), oc=colour if lang == "en" else COLOURS_ZH[colour],
                     os=shape if lang == "en" else SHAPES_ZH[shape])
    if dest is not None:
        colour, _, shape = dest.rpartition(" ")
        i, into, li = prepositions(shape)
        slots.update(d=dest if lang == "en" else zh_name(dest), dc=colour if lang == "en" else COLOURS_ZH[colour],
                     ds=shape if lang == "en" else SHAPES_ZH[shape], li=li, lim=li + "面", **{"in": i, "into": into})
    text = entry["text"].format(**slots)
    return text.upper() if entry.get("case") == "upper" else text


def materialise_phrasings(spec_path: Path, base: SynthConfig, lang: str, out_dir: Path,
                          limit: int | None = None) -> Path:
    """Write datasets ``phrased`` and ``generated`` (same scenes, images and answers) to out_dir."""
    from training.sharegpt import Sample, write_sharegpt

    spec = read_phrasings(spec_path)
    entries = spec[lang][:limit] if limit else spec[lang]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    synths = {skill: Synthesizer(replace(base, seed=int(spec["seed"]), languages=(lang,), skills=(skill,)))
              for skill in ("move", "pick", "place")}
    import numpy as np

    names_rng = np.random.default_rng([int(spec["seed"]), 7])
    names = synths["move"].lang.zh.names  # label -> the vocabulary's Chinese names (read only)

    def zh_name(label: str) -> str:
        """One of the vocabulary's Chinese names, or colour + 的 + shape: never a generator synonym."""
        colour, _, shape = label.rpartition(" ")
        options = names.get(label, []) + [f"{COLOURS_ZH[colour]}的{SHAPES_ZH[shape]}"]
        return options[int(names_rng.integers(len(options)))]

    rows: dict[str, list] = {name: [] for name in DATASETS}
    index = 0
    # round by round, so the first n samples hold n different phrasings (an evaluation --limit)
    for _ in range(int(spec["scenes_per_phrasing"])):
        for entry in entries:
            syn = synths[entry["skill"]]
            while True:
                sample = syn.sample(index)
                index += 1
                step = sample.steps[0]
                obj, dest = step.object or None, step.destination or None
                if _requirement_met(entry, obj, dest) and _references_unique(entry, obj, dest, sample.things):
                    break
            path = out / "images" / f"{index:06d}.png"
            ok, png = cv2.imencode(".png", sample.image, PNG_PARAMS)
            if not ok:
                raise RuntimeError(f"PNG encoding failed for scene {index}")
            path.write_bytes(png.tobytes())
            command = fill(entry, lang, obj, dest, zh_name)
            for name, text in (("phrased", command), ("generated", sample.command)):
                rows[name].append(Sample(messages=syn.prompt.sharegpt_messages(text, sample.answer), images=[path],
                                         source=f"phrasing:{lang}:{entry['text']}"))
    for name in DATASETS:
        write_sharegpt(out / f"{name}.json", rows[name], dataset_info_name=name)
    return out
