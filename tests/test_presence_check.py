"""The presence check (vla_node.presence_check): a multi-step plan naming a thing the model says is
absent becomes CLARIFY; on the embedded model, with held-out scenes, through the real core."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vla_node.actions import ActionStep, StatusCode
from vla_node.manifest import ManifestError, answers_count_questions, read_manifest, validate_manifest
from vla_node.presence_check import named_things, needs_check, says_absent
from vla_node.prompt import COUNT_PREFIX, PromptBuilder, count_question
from vla_node.vocabulary import Vocabulary

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tabletop-tiny"
ADAPTER = ROOT / "models" / "tabletop-tiny-zh-lora"
# test_en sample 8: "oh put the blue cylinder in the green box then after that place the red cone into the
# green box" with no blue cylinder on the table; the embedded model's plan moves a blue cylinder anyway
ABSENT_SAMPLE = 8
# test_en sample 0 .. : the first two-step plan whose things are all there (found, not hard-coded)
SCAN = 40


def _move(obj: str, dest: str) -> ActionStep:
    return ActionStep(verb="MOVE_OBJECT", object=obj, destination=dest)


def test_the_counting_question_is_the_one_the_base_was_trained_on():
    from training.synth_count import CountingScenes  # noqa: F401  (the training side imports the same builder)
    import training.synth_count as synth_count

    assert synth_count.count_question is count_question
    assert count_question('red "tray"') == COUNT_PREFIX + '"red \\"tray\\""'
    builder = PromptBuilder(Vocabulary.load(), template="compact")
    messages = builder.count_messages("blue cube")
    assert messages[0] == builder.chat_messages("x")[0]  # the same system prompt: the prefix cache holds
    assert messages[1]["content"][1]["text"] == 'Count: "blue cube"'


def test_only_multi_step_plans_that_act_are_checked():
    assert not needs_check([_move("red cube", "blue bowl")])
    assert needs_check([_move("red cube", "blue bowl"), _move("green ball", "blue bowl")])
    assert needs_check([ActionStep(verb="PICK_OBJECT", object="red cube"),
                        ActionStep(verb="PLACE_OBJECT", destination="blue bowl")])
    assert not needs_check([ActionStep(verb="CLARIFY", reason="no red cube is visible")])
    steps = [_move("red cube", "blue bowl"), _move("green ball", "blue bowl"),
             ActionStep(verb="PLACE_OBJECT", destination="white plate")]
    assert named_things(steps) == ["red cube", "blue bowl", "green ball", "white plate"]


def test_absent_answers_in_the_three_forms_and_nothing_else():
    vocab = Vocabulary.load()
    assert says_absent("no blue cylinder is visible", "blue cylinder", vocab)
    assert says_absent(' CLARIFY(reason="no blue cylinder is visible")\n', "blue cylinder", vocab)
    assert says_absent('no blue cylinder is visible")', "blue cylinder", vocab)  # session 34's adapter
    assert not says_absent('no blue cylinder is visible")x', "blue cylinder", vocab)
    assert not says_absent('no blue cube is visible")', "blue cylinder", vocab)
    assert not says_absent("1 blue cylinder is visible: [1, 2, 3, 4]", "blue cylinder", vocab)
    assert not says_absent("no blue cube is visible", "blue cylinder", vocab)  # about another thing
    assert not says_absent("no blue cylinder is visible here", "blue cylinder", vocab)
    assert not says_absent("", "blue cylinder", vocab)


def test_the_manifest_field_is_checked(tmp_path):
    manifest = read_manifest(MODEL)
    assert manifest["count_questions"] is True and answers_count_questions(MODEL)
    assert not answers_count_questions(ADAPTER)  # an adapter's manifest does not say it: the base's does
    assert not answers_count_questions(tmp_path)  # no manifest
    with pytest.raises(ManifestError, match="count_questions.*true or false"):
        validate_manifest({**manifest, "count_questions": "yes"}, source="m.json")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """The first SCAN held-out English samples: (rgb, command, reference) each."""
    from training.collate import load_rgb
    from training.heldout import input_factor, materialise_heldout

    out = materialise_heldout(ROOT / "models" / "heldout" / "test_en.json", tmp_path_factory.mktemp("presence"),
                              limit=SCAN, factor=input_factor(MODEL))
    rows = json.loads((out / "test.json").read_text(encoding="utf-8"))
    return [(load_rgb(out / row["images"][0]), row["messages"][-2]["content"].split("Command: ", 1)[1],
             row["messages"][-1]["content"]) for row in rows]


@pytest.fixture(scope="module")
def core():
    from vla_node.factory import RuntimeSettings, build_core

    core = build_core(RuntimeSettings(device="cpu", dtype="float32"))
    yield core
    core.backend.close()


def _infer(core, scene, check: bool):
    rgb, quoted, _ = scene
    core.presence_check = check
    try:
        return core.infer(rgb, json.loads(quoted))
    finally:
        core.presence_check = True


def test_a_plan_acting_on_an_absent_thing_becomes_clarify(core, scenes):
    scene = scenes[ABSENT_SAMPLE]
    assert scene[2] == 'CLARIFY(reason="no blue cylinder is visible")'
    unchecked, status = _infer(core, scene, check=False)
    assert [s.verb for s in unchecked.steps] == ["MOVE_OBJECT", "MOVE_OBJECT"]  # the model's own plan
    assert unchecked.steps[0].object == "blue cylinder"
    plan, status = _infer(core, scene, check=True)
    assert status.code == StatusCode.ACCEPTED
    assert [(s.verb, s.reason) for s in plan.steps] == [("CLARIFY", "no blue cylinder is visible")]
    assert "presence check: the model says no blue cylinder is visible; its plan was 2 step(s)" in status.detail
    assert plan.raw_text == unchecked.raw_text  # the audit trail keeps what the model planned
    assert 0 < plan.steps[0].confidence <= 1


def test_plans_whose_things_are_there_pass_unchanged(core, scenes):
    checked = 0
    for scene in scenes:
        plan, status = _infer(core, scene, check=False)
        if plan is None or not needs_check(plan.steps) or scene[2].startswith("CLARIFY"):
            continue
        again, again_status = _infer(core, scene, check=True)
        assert again.steps == plan.steps and again_status.detail == status.detail, scene[1]
        checked += 1
    assert checked >= 2  # the scan holds two-step plans to check


def test_one_step_plans_and_models_without_the_skill_are_not_asked(core, scenes):
    backend = core.backend
    asked = []
    real_generate = backend.generate

    def counting(request):
        asked.append(request.free_text)
        return real_generate(request)

    backend.generate = counting
    try:
        one_step = next(s for s in scenes if s[2].count("\n") == 0 and not s[2].startswith("CLARIFY"))
        _infer(core, one_step, check=True)
        assert asked == [False]  # the plan alone
        asked.clear()
        backend.answers_count_questions = False  # as any model whose manifest does not say count_questions
        plan, _ = _infer(core, scenes[ABSENT_SAMPLE], check=True)
        assert asked == [False] and [s.verb for s in plan.steps] == ["MOVE_OBJECT", "MOVE_OBJECT"]
    finally:
        backend.answers_count_questions = True
        del backend.generate


def test_the_check_runs_with_the_chinese_adapter_active(core, scenes):
    """The adapter answers the question in the action's words (the CLARIFY, or its reason and closing): still
    recognised."""
    backend = core.backend
    backend.set_adapter("zh")
    try:
        unchecked, _ = _infer(core, scenes[ABSENT_SAMPLE], check=False)
        plan, status = _infer(core, scenes[ABSENT_SAMPLE], check=True)
    finally:
        backend.set_adapter(None)
    assert [s.verb for s in unchecked.steps] == ["MOVE_OBJECT", "MOVE_OBJECT"]  # the adapter's plan: as wrong
    assert status.code == StatusCode.ACCEPTED
    assert [(s.verb, s.reason) for s in plan.steps] == [("CLARIFY", "no blue cylinder is visible")], plan.raw_text


@pytest.mark.parametrize("adapter", [None, "zh"])
def test_questions_end_once_the_answer_cannot_say_absent(core, scenes, adapter):
    """Every thing the absent sample's plan and the scan's first two-step plans name, asked with
    and without answer_choices: the same verdict, the absent thing's answer word for word, and a
    present thing's answer ended within two tokens instead of running to the budget."""
    from vla_node.backends.base import GenerationRequest
    from vla_node.image import fit_to_limits
    from vla_node.presence_check import ABSENT_ANSWER_TOKENS, absent_answers

    backend, prompt = core.backend, core.prompt
    backend.set_adapter(adapter)
    try:
        questions = []
        for scene in [scenes[ABSENT_SAMPLE]] + scenes[:12]:
            plan, _ = _infer(core, scene, check=False)
            if plan is not None and needs_check(plan.steps):
                questions += [(scene[0], noun) for noun in named_things(plan.steps)]
        verdicts = []
        for rgb, noun in questions:
            fitted = fit_to_limits(rgb, backend.pixel_limits)
            answers = [backend.generate(GenerationRequest(
                image=fitted, messages=prompt.count_messages(noun), max_new_tokens=ABSENT_ANSWER_TOKENS,
                free_text=True, answer_choices=choices)) for choices in ((), absent_answers(noun, prompt.vocab))]
            whole, ended = answers
            absent = says_absent(whole.text, noun, prompt.vocab)
            assert says_absent(ended.text, noun, prompt.vocab) == absent, (noun, whole.text, ended.text)
            if absent:
                assert (ended.text, ended.confidence) == (whole.text, whole.confidence)
            else:
                assert whole.new_tokens > 2 >= ended.new_tokens, (noun, whole.text, ended.text)
            verdicts.append(absent)
    finally:
        backend.set_adapter(None)
    assert verdicts[0] and verdicts.count(False) >= 4  # the absent blue cylinder, and things that are there


def test_vla_eval_scores_with_the_check_by_default_and_without_it_when_asked(tmp_path):
    """vla-eval runs the node's core: the presence check is on as on the robot; --no-presence-check
    scores the model's own plans (test_en's first 9 samples: sample 8 is the absent blue cylinder)."""
    from training.evaluate import main as eval_main
    from training.heldout import input_factor, materialise_heldout

    data = materialise_heldout(ROOT / "models" / "heldout" / "test_en.json", tmp_path / "data", limit=9,
                               factor=input_factor(MODEL))
    figures = {}
    for name, flag in (("checked", []), ("unchecked", ["--no-presence-check"])):
        out = tmp_path / name
        assert eval_main(["--model", str(MODEL), "--dataset-dir", str(data), "--dataset", "tabletop_test",
                          "--device", "cpu", "--out", str(out), *flag]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["presence_check"] is (name == "checked")
        predictions = [json.loads(line) for line in (out / "predictions_model.jsonl").read_text().splitlines()]
        figures[name] = (metrics["runs"]["model"]["clarify_recall"], predictions[ABSENT_SAMPLE]["exact"])
    assert figures["checked"][1] and not figures["unchecked"][1]
    assert figures["checked"][0] > figures["unchecked"][0]
