"""The held-out phrasings (models/heldout/phrasings.json, phrasings_blind.json and
phrasings_blind2.json): enough of them, all usable, and apart from the generator
(training/synth_language.py): a phrasing the generator writes word for word would test nothing, so
none of them may come out of 6,000 generated commands of its skill (such an entry is taken out of
its file). The development set training/phrasings_dev.json, which the grammar may grow against,
must be as usable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.phrasings import fill, read_phrasings
from training.synth import SynthConfig, Synthesizer

HELDOUT = Path(__file__).resolve().parents[1] / "models" / "heldout"
SPECS = [HELDOUT / "phrasings.json", HELDOUT / "phrasings_blind.json", HELDOUT / "phrasings_blind2.json"]
_PUNCTUATION = re.compile(r"[,.!?，。！？、]")


def _normal(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


DEVELOPMENT = Path(__file__).resolve().parents[1] / "training" / "phrasings_dev.json"


@pytest.mark.parametrize("path", SPECS + [DEVELOPMENT], ids=lambda p: p.stem)
def test_enough_phrasings_of_each_language_and_every_one_fills(path):
    spec = read_phrasings(path)
    for lang in ("en", "zh"):
        entries = spec[lang]
        assert len(entries) >= 50 and {e["skill"] for e in entries} == {"move", "pick", "place"}
        assert len({_normal(e["text"]) for e in entries}) == len(entries)  # no two alike
        for entry in entries:
            text = fill(entry, lang, "red cube" if entry["skill"] != "place" else None,
                        "blue box" if entry["skill"] != "pick" else None, lambda label: "红色方块")
            assert "{" not in text and text.strip(), entry


def _delexicalised(sample, lang: str, names: dict) -> str:
    """The generator's command with its object and destination names replaced by the slots."""
    text = sample.command if lang == "zh" else sample.command.lower()
    step = sample.steps[0]
    for label, slot in ((step.object, "{o}"), (step.destination, "{d}")):
        if not label:
            continue
        for name in sorted([label] + names.get(label, []), key=len, reverse=True):
            text = text.replace(name, slot)
    if lang == "en":
        for word, slot in ((" into the {d}", " {into} the {d}"), (" onto the {d}", " {into} the {d}"),
                           (" in the {d}", " {in} the {d}"), (" on the {d}", " {in} the {d}")):
            text = text.replace(word, slot)
    else:
        for word, slot in (("{d}里面", "{d}{lim}"), ("{d}上面", "{d}{lim}"), ("{d}里", "{d}{li}"), ("{d}上", "{d}{li}")):
            text = text.replace(word, slot)
    return _normal(text)


@pytest.fixture(scope="module")
def generator_commands():
    """Per language, the generator's delexicalised move / pick / place commands (6,000 a skill)."""
    from training.synth_language import COLOURS_ZH, SHAPES_ZH

    by_lang: dict[str, set[str]] = {}
    for lang in ("en", "zh"):
        generated = by_lang[lang] = set()
        for skill in ("move", "pick", "place"):
            syn = Synthesizer(SynthConfig(num=6000, seed=11, languages=(lang,), skills=(skill,)))
            names: dict[str, list[str]] = {}
            for zh, label in syn.vocab.labels_zh.items():
                names.setdefault(label, []).append(zh)
            for label in names:
                colour, _, shape = label.rpartition(" ")
                names[label].append(f"{COLOURS_ZH[colour]}的{SHAPES_ZH[shape]}")
            for index in range(6000):
                generated.add(_delexicalised(syn.sample(index, render=False), lang, names))
    return by_lang


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_no_held_out_phrasing_is_written_by_the_generator(path, lang, generator_commands):
    spec = read_phrasings(path)
    written = [e["text"] for e in spec[lang] if _normal(e["text"]) in generator_commands[lang]]
    assert not written, f"the generator writes these held-out phrasings itself: {json.dumps(written, ensure_ascii=False)}"


def test_a_shape_or_colour_alone_is_put_only_on_scenes_where_it_names_one_thing(tmp_path):
    """"pick up the cube" with two cubes on the table asks for a CLARIFY, not the scene's action:
    materialise_phrasings must not pair such a phrasing with such a scene."""
    from training.phrasings import materialise_phrasings

    spec = {"seed": 4242, "scenes_per_phrasing": 12,
            "en": [{"skill": "pick", "text": "grab the {os}"}, {"skill": "move", "text": "the {oc} one into the {ds}"}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    base = SynthConfig()
    out = materialise_phrasings(path, base, "en", tmp_path / "out")
    rows = json.loads((out / "phrased.json").read_text(encoding="utf-8"))
    assert len(rows) == 24
    synths = {skill: Synthesizer(SynthConfig(seed=4242, languages=("en",), skills=(skill,))) for skill in ("pick", "move")}
    for row in rows:
        index = int(Path(row["images"][0]).stem) - 1  # materialise names a scene's image by its index + 1
        skill = "pick" if "grab the" in row["messages"][-2]["content"] else "move"
        sample = synths[skill].sample(index, render=False)
        obj = next(t for t in sample.things if t.label == sample.steps[0].object)
        if skill == "pick":
            assert sum(t.kind == "object" and t.shape == obj.shape for t in sample.things) == 1
        else:
            dest = next(t for t in sample.things if t.label == sample.steps[0].destination)
            assert sum(t.kind == "object" and t.colour == obj.colour for t in sample.things) == 1
            assert sum(t.kind == "container" and t.shape == dest.shape for t in sample.things) == 1
