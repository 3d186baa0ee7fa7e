"""training.synth: deterministic synthetic tabletop data whose answers parse and match the picture."""

import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training import sharegpt as sg  # noqa: E402
from training.data_cli import main as data_main  # noqa: E402
from training.synth import COLOURS_BGR, SynthConfig, SynthError, Synthesizer, generate_dataset  # noqa: E402
from vla_node.parser import parse_actions  # noqa: E402
from vla_node.prompt import PromptBuilder  # noqa: E402
from vla_node.vocabulary import Vocabulary  # noqa: E402

CJK = re.compile(r"[\u4e00-\u9fff]")
N = 120  # samples drawn in memory per configuration (~1 s)


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load()


@pytest.fixture(scope="module")
def plain(vocab):
    syn = Synthesizer(SynthConfig(num=N, seed=3), vocab)
    return syn, list(syn.samples())


@pytest.fixture(scope="module", params=["absolute_resized", "normalized_1000"])
def boxed(request, vocab):
    syn = Synthesizer(SynthConfig(num=N, seed=5, boxes=request.param, size=(400, 300)), vocab)
    return syn, list(syn.samples())


def _files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, vocab):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_dataset(a, SynthConfig(num=24, seed=7), vocab)
    generate_dataset(b, SynthConfig(num=24, seed=7), vocab)
    generate_dataset(c, SynthConfig(num=24, seed=8), vocab)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 24 + 5 and fa == fb
    assert sg.dataset_sha256(a) == sg.dataset_sha256(b) != sg.dataset_sha256(c)
    assert fa["train.json"] != fc["train.json"] and fa["images/000000.png"] != fc["images/000000.png"]


def test_sample_depends_only_on_seed_and_index(vocab):
    small = Synthesizer(SynthConfig(num=5, seed=1), vocab).sample(3)
    large = Synthesizer(SynthConfig(num=500, seed=1), vocab).sample(3)
    assert small.command == large.command and small.answer == large.answer
    assert np.array_equal(small.image, large.image)


def test_every_answer_parses_and_uses_the_shared_prompt(plain, vocab):
    syn, samples = plain
    prompt = PromptBuilder(vocab)
    for s in samples:
        steps = parse_actions(s.answer, vocab)
        assert [(x.verb, x.object, x.destination, x.reason) for x in steps] == \
               [(x.verb, x.object, x.destination, x.reason) for x in s.steps], s.command
        assert s.messages == prompt.sharegpt_messages(s.command, s.answer)
        assert s.image.shape == (240, 320, 3) and s.image.dtype == np.uint8
        # every label in the answer is in the vocabulary's allowlists
        for x in steps:
            assert not x.object or x.object in vocab.objects
            assert not x.destination or x.destination in vocab.destinations
    kinds = {s.kind for s in samples}
    assert {"move", "pick", "place", "stop", "clarify_absent", "clarify_ambiguous", "spatial_side",
            "multi_pick_place", "multi_move_move"} <= kinds


def test_languages(plain, vocab):
    _, samples = plain
    zh = [s for s in samples if s.language == "zh"]
    en = [s for s in samples if s.language == "en"]
    assert len(zh) > N // 4 and len(en) > N // 4
    assert all(CJK.search(s.command) for s in zh)
    assert not any(CJK.search(s.command) for s in en)
    assert not any(CJK.search(s.answer) for s in samples)  # labels and reasons stay canonical English
    only_en = Synthesizer(SynthConfig(num=30, languages=("en",)), vocab)
    assert not any(CJK.search(s.command) for s in only_en.samples())


def test_answers_depend_on_the_scene(plain):
    _, samples = plain
    for s in samples:
        present = {t.label for t in s.things}
        shapes = {t.shape for t in s.things if t.kind == "object"}
        for step in s.steps:
            if step.verb == "CLARIFY":
                m = re.fullmatch(r"no (.+) is visible", step.reason)
                if m:  # absent: nothing with that label (or shape) is on the table
                    assert m.group(1) not in present and m.group(1) not in shapes, s.command
                else:
                    m = re.fullmatch(r"the (.+) is ambiguous: (\d) .+ are visible", step.reason)
                    assert m, step.reason
                    matches = [t for t in s.things if t.kind == "object" and m.group(1) in (t.label, t.shape)]
                    assert len(matches) == int(m.group(2)) >= 2
            else:  # acting: everything named is on the table, labels unique (no boxes to tell apart)
                for label in (step.object, step.destination):
                    if label:
                        assert sum(t.label == label for t in s.things) == 1, (s.command, label)
    assert any(s.kind == "clarify_absent" and s.steps[0].reason.startswith("no ") for s in samples)


def test_spatial_side_picks_the_correct_object(plain):
    _, samples = plain
    checked = 0
    for s in samples:
        if s.kind != "spatial_side":
            continue
        target = next(t for t in s.things if t.label == s.steps[0].object)
        _assert_on_its_side(s, target)
        checked += 1
    assert checked >= 2


def _assert_on_its_side(s, target):
    same_label = [t for t in s.things if t.kind == "object" and t.label == target.label]
    group = same_label if len(same_label) > 1 else [t for t in s.things if t.kind == "object" and t.shape == target.shape]
    xs = [t.center[0] for t in group]
    left = "left" in s.command.lower() or "左" in s.command
    assert len(group) >= 2
    assert target.center[0] == (min(xs) if left else max(xs)), s.command


def test_multi_step_rule(plain):
    _, samples = plain
    for s in samples:
        if s.kind == "multi_pick_place":
            assert [x.verb for x in s.steps] == ["PICK_OBJECT", "PLACE_OBJECT"]
        elif s.kind == "multi_move_move":
            assert [x.verb for x in s.steps] == ["MOVE_OBJECT", "MOVE_OBJECT"]
        elif s.kind == "multi_clarify_absent":
            assert [x.verb for x in s.steps] == ["CLARIFY"]


def test_missing_rate_sets_how_often_a_multi_step_command_names_an_absent_thing(vocab):
    def multi_kinds(rate):
        cfg = SynthConfig(num=120, skills=("multi", "clarify"), missing_rate=rate, languages=("en",))
        syn = Synthesizer(cfg, vocab)
        return [k for k in (syn.sample(i, render=False).kind for i in range(cfg.num)) if k.startswith("multi")]

    never, always = multi_kinds(0.0), multi_kinds(1.0)
    assert never and "multi_clarify_absent" not in never
    # 1.0: every one names something absent, but where every label of the slot is on the table
    assert always and always.count("multi_clarify_absent") >= 0.8 * len(always)
    with pytest.raises(SynthError, match="missing-rate must be in"):
        SynthConfig(missing_rate=1.5).check()


def test_missing_lookalikes_name_an_absent_thing_like_one_on_the_table(vocab):
    def absent_and_present(lookalikes):
        cfg = SynthConfig(num=300, skills=("multi", "clarify"), missing_rate=1.0, missing_lookalikes=lookalikes,
                          languages=("en",))
        syn = Synthesizer(cfg, vocab)
        for sample in (syn.sample(i, render=False) for i in range(cfg.num)):
            if sample.kind == "multi_clarify_absent":
                absent = sample.steps[0].reason.removeprefix("no ").removesuffix(" is visible")
                yield absent, [(t.colour, t.shape) for t in sample.things]

    def alike(absent, present):
        colour, shape = absent.split(" ", 1)
        return any(colour == c or shape == s for c, s in present)

    hard = list(absent_and_present(True))
    assert len(hard) > 50 and all(alike(a, p) for a, p in hard)
    assert not all(alike(a, p) for a, p in absent_and_present(False))  # the default: any absent label


def _hue(bgr) -> float:
    return float(cv2.cvtColor(np.uint8([[bgr]]), cv2.COLOR_BGR2HSV)[0, 0, 0])


def test_boxes_match_the_drawn_objects(boxed, vocab):
    syn, samples = boxed
    n_boxes = 0
    shared_label = 0
    for s in samples:
        steps = parse_actions(s.answer, vocab, syn.codec)
        labels = [t.label for t in s.things]
        for step in steps:
            for arg in ("object", "destination"):
                label, box = getattr(step, arg), getattr(step, arg + "_box")
                if not label:
                    continue
                assert box is not None, s.answer
                # the box is the drawn thing with that label (the nearest, when two share it)
                cands = [t for t in s.things if t.label == label]
                best = min(cands, key=lambda t: sum(abs(a - b) for a, b in zip(t.box, box.as_list())))
                assert all(abs(a - b) <= 2 for a, b in zip(best.box, box.as_list())), (s.answer, best.box)
                shared_label += len(cands) > 1
                if s.kind == "spatial_side" and arg == "object":  # the box names the right one of twins
                    _assert_on_its_side(s, best)
                # and the picture has that colour at the box centre
                cx, cy = int(best.center[0]), int(best.center[1])
                if best.colour != "white":
                    patch = s.image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)
                    d = abs(_hue(patch) - _hue(COLOURS_BGR[best.colour]))
                    assert min(d, 180 - d) <= 8, (s.command, best.label)
                n_boxes += 1
        assert len(labels) >= 1
    assert n_boxes > N // 2 and shared_label >= 1  # duplicates only appear with boxes, and boxes split them


def test_skills_and_objects_restrict_the_data(vocab):
    stop_only = Synthesizer(SynthConfig(num=20, skills=("stop",)), vocab)
    assert {s.answer for s in stop_only.samples()} == {"STOP()"}
    clarify_only = list(Synthesizer(SynthConfig(num=30, skills=("clarify",), languages=("zh",)), vocab).samples())
    assert all(s.answer.startswith("CLARIFY(") for s in clarify_only)
    assert all(CJK.search(s.command) for s in clarify_only)
    objects = {"red cube", "blue ball", "green cylinder"}
    restricted = Synthesizer(SynthConfig(num=40, objects=tuple(objects), skills=("move", "pick", "spatial")), vocab)
    for s in restricted.samples():
        assert {t.label for t in s.things if t.kind == "object"} <= objects
    with pytest.raises(SynthError, match="not in the vocabulary"):
        Synthesizer(SynthConfig(objects=("golden unicorn",)), vocab)
    with pytest.raises(SynthError, match="unknown skills"):
        Synthesizer(SynthConfig(skills=("juggle",)), vocab)


def test_generated_dir_passes_vla_data_check(tmp_path, capsys):
    out = tmp_path / "tabletop"
    assert data_main(["synth", str(out), "--num", "30", "--seed", "2", "--boxes", "normalized_1000"]) == 0
    assert "wrote 30 samples" in capsys.readouterr().out
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"tabletop_train", "tabletop_val", "tabletop_test"}
    meta = json.loads((out / "synth_config.json").read_text())
    assert meta["box_convention"] == "normalized_1000" and sum(meta["counts"].values()) == 30
    assert meta["counts"] == {"train": 24, "val": 3, "test": 3}
    assert data_main(["check", str(out), "--actions"]) == 0
    assert "OK: no errors" in capsys.readouterr().out
    assert data_main(["check", str(out), "--dataset", "tabletop_val", "--actions"]) == 0
    capsys.readouterr()
    train = sg.load_validated(out, "tabletop_train", vocab=Vocabulary.load())
    assert len(train) == 24 and all(s.images[0].parent == out / "images" for s in train)
    # a second run into the same dir needs --overwrite
    assert data_main(["synth", str(out), "--num", "10"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert data_main(["synth", str(out), "--num", "10", "--overwrite"]) == 0
    assert len(list((out / "images").iterdir())) == 10


def test_help_is_truthful(capsys):
    with pytest.raises(SystemExit) as e:
        data_main(["synth", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num", "--seed", "--size", "--languages", "--val-frac", "--test-frac", "--skills", "--objects",
                 "--boxes", "absolute_resized", "normalized_1000"):
        assert flag in text


def test_scenes_can_hold_the_named_object_alone():
    # a curriculum's first stage: the box is the answer's only unknown, found without reading a word
    cfg = SynthConfig(num=40, seed=3, skills=("pick",), max_objects=1, max_containers=0, boxes="absolute_resized")
    synthesizer = Synthesizer(cfg, None)
    for index in range(40):
        sample = synthesizer.sample(index, render=False)
        assert len(sample.things) == 1 and sample.things[0].kind == "object"
        assert sample.steps[0].object == sample.things[0].label
    with pytest.raises(SynthError, match="max-objects must be at least 1"):
        SynthConfig(max_objects=0).check()


def test_vla_data_synth_takes_the_scene_limits(tmp_path, capsys):
    out = tmp_path / "alone"
    assert data_main(["synth", str(out), "--num", "6", "--skills", "pick", "--max-objects", "1",
                      "--max-containers", "0"]) == 0
    assert json.loads((out / "synth_config.json").read_text())["config"]["max_objects"] == 1
    assert data_main(["synth", str(tmp_path / "bad"), "--num", "6", "--max-containers", "-1"]) == 2
    assert "max-containers at least 0" in capsys.readouterr().err


def test_chinese_picks_into_the_hand_or_off_the_table_and_moves_holding_the_thing_first(vocab):
    """把X拿到手里 / 从桌上拿起X are pick commands (手里 and 桌上 are no destination); 拿着X放进Y is one
    move: the grammar writes these wordings, each answered with the plan it means."""
    containers, hand, table = ("碗", "盘子", "托盘", "盒子", "篮子"), ("手里", "手上", "手中", "手心里"), ("从桌", "从台子")
    picks = Synthesizer(SynthConfig(num=600, seed=9, languages=("zh",), skills=("pick",)), vocab)
    into_hand = off_table = 0
    for index in range(600):
        sample = picks.sample(index, render=False)
        said = [any(word in sample.command for word in words) for words in (hand, table)]
        if not any(said):
            continue
        into_hand, off_table = into_hand + said[0], off_table + said[1]
        assert [(s.verb, s.destination) for s in sample.steps] == [("PICK_OBJECT", "")], sample.command
        assert not any(word in sample.command for word in containers), sample.command
    assert into_hand >= 20 and off_table >= 20
    moves = Synthesizer(SynthConfig(num=600, seed=9, languages=("zh",), skills=("move",)), vocab)
    holding = [s for s in (moves.sample(i, render=False) for i in range(600))
               if any(verb in s.command for verb in ("拿着", "抓着", "夹着", "提着", "拎着"))]
    assert len(holding) >= 5
    assert all([step.verb for step in s.steps] == ["MOVE_OBJECT"] and s.steps[0].destination for s in holding)


def test_english_pick_and_place_verbs_joined_by_and_are_one_move_and_steps_need_a_sequencing_word(vocab):
    """"grab the X and drop it in the Y" is one MOVE_OBJECT (people mean one move, as every
    hand-written phrasing set answers it); a pick and a place are two steps only when a sequencing
    word sets them out ("pick up the X, then put it in the Y")."""
    sequencing = re.compile(r"\b(then|after that|next|afterwards|once that's done)\b")
    two_verbs = re.compile(r"\b(pick|grab|take|lift|get|grasp|collect|snatch|seize|scoop|pluck)\b.* and "
                           r"(put|place|drop|set|leave|release|lay|deposit|let go of|pop|stick|plop|stash|dump|"
                           r"lower|rest|stow|tuck|unload) it\b")
    moves = Synthesizer(SynthConfig(num=800, seed=9, languages=("en",), skills=("move",)), vocab)
    joined = [s for s in (moves.sample(i, render=False) for i in range(800)) if two_verbs.search(s.command.lower())]
    assert len(joined) >= 30
    assert all([step.verb for step in s.steps] == ["MOVE_OBJECT"] and s.steps[0].destination for s in joined)
    assert not any(sequencing.search(s.command.lower()) for s in joined)
    multi = Synthesizer(SynthConfig(num=800, seed=9, languages=("en",), skills=("multi",)), vocab)
    pick_place = [s for s in (multi.sample(i, render=False) for i in range(800)) if s.kind == "multi_pick_place"]
    assert len(pick_place) >= 50
    assert all(sequencing.search(s.command.lower()) for s in pick_place), \
        [s.command for s in pick_place if not sequencing.search(s.command.lower())]


def test_a_plate_is_sometimes_called_a_dish_and_the_answer_names_the_plate(vocab):
    moves = Synthesizer(SynthConfig(num=1500, seed=9, languages=("en",), skills=("move",)), vocab)
    dishes = [s for s in (moves.sample(i, render=False) for i in range(1500)) if " dish" in s.command.lower()]
    assert len(dishes) >= 5
    assert all(s.steps[0].destination.endswith(" plate") for s in dishes)


def test_a_pronoun_is_never_put_after_a_verb_with_a_particle(vocab):
    """"drop off the thing you're holding" is English, "drop off it" is not: a pronoun takes the
    place verbs without a particle."""
    places = Synthesizer(SynthConfig(num=3000, seed=9, languages=("en",), skills=("place",)), vocab)
    commands = [s.command.lower() for s in (places.sample(i, render=False) for i in range(3000))]
    assert any("drop off " in c for c in commands)  # the verb itself stays in the grammar
    assert not [c for c in commands if re.search(r"\bdrop off (it|that|this)\b(?! thing)", c)]
