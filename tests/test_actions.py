"""The action contract: models, vocabulary, canonical text and its round trip."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vla_node.actions import (
    STATUS_CODE_NUMBERS,
    ActionError,
    ActionPlan,
    ActionStep,
    Box,
    CommandStatus,
    StageLatency,
    StatusCode,
    render_step,
    render_steps,
)
from vla_node.parser import BoxCodec, parse_actions
from vla_node.vocabulary import Vocabulary, VocabularyError, default_vocabulary_path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = Vocabulary.load()


# ---- models -------------------------------------------------------------------------------------
def test_status_codes_are_named_and_numbered_like_the_message():
    msg = (ROOT / "msg" / "CommandStatus.msg").read_text()
    constants = {name: int(number) for name, number in re.findall(r"^uint8 (\w+)=(\d+)", msg, re.M)}
    assert {code.value: number for code, number in STATUS_CODE_NUMBERS.items()} == constants
    assert all(code.value == code.name for code in StatusCode)


def test_step_fields_mirror_the_message():
    msg = (ROOT / "msg" / "ActionStep.msg").read_text()
    msg_fields = re.findall(r"^\S+ (\w+)$", msg, re.M)
    expected = []
    for name in ActionStep.model_fields:
        expected += [f"has_{name}", name] if name.endswith("_box") else [name]
    assert msg_fields == expected


def test_latency_fields_mirror_the_message():
    msg = (ROOT / "msg" / "StageLatency.msg").read_text()
    assert re.findall(r"^float32 (\w+)$", msg, re.M) == list(StageLatency.model_fields)


def test_box_must_be_ordered_and_finite():
    Box(x_min=1, y_min=2, x_max=1, y_max=2)  # a point is a valid (degenerate) box
    with pytest.raises(ValidationError, match="x_min<=x_max"):
        Box(x_min=5, y_min=0, x_max=1, y_max=1)
    with pytest.raises(ValidationError, match="finite"):
        Box(x_min=float("nan"), y_min=0, x_max=1, y_max=1)


def test_models_refuse_misspelt_fields_and_bad_values():
    with pytest.raises(ValidationError):
        ActionStep(verb="STOP", objekt="red cube")
    with pytest.raises(ValidationError):
        ActionStep(verb="move object")
    with pytest.raises(ValidationError):
        ActionStep(verb="STOP", confidence=1.5)


def test_plan_defaults_are_not_shared_between_instances():
    first = ActionPlan(command_id="a", command_text="x", steps=[])
    second = ActionPlan(command_id="b", command_text="y", steps=[])
    first.latency.total_ms = 5
    assert second.latency.total_ms == 0


def test_status_accepts_the_message_number():
    status = CommandStatus(command_id="c", code=7)
    assert status.code is StatusCode.PARSE_ERROR and status.code_number == 7
    assert CommandStatus(command_id="c", code="STOPPED").code is StatusCode.STOPPED
    with pytest.raises(ValidationError):
        CommandStatus(command_id="c", code=99)


# ---- vocabulary ---------------------------------------------------------------------------------
def test_default_vocabulary_has_the_five_verbs_and_allowlists():
    assert default_vocabulary_path() == ROOT / "config" / "actions.yaml"
    assert list(VOCAB.verbs) == ["MOVE_OBJECT", "PICK_OBJECT", "PLACE_OBJECT", "STOP", "CLARIFY"]
    assert VOCAB.verbs["MOVE_OBJECT"].args == ("object", "destination")
    assert VOCAB.verbs["STOP"].args == ()
    assert {"red cube", "purple cylinder"} <= VOCAB.objects
    assert {"blue bowl", "white tray"} <= VOCAB.destinations
    assert VOCAB.label_args == ("object", "destination")
    assert set(VOCAB.policy_config) >= {"allowed_verbs", "min_confidence", "max_steps"}


@pytest.mark.parametrize(
    "raw, label",
    [
        ("Red Cube", "red cube"),
        ("  red_cube ", "red cube"),
        ("RED-cube", "red cube"),
        ("red   -_ cube", "red cube"),
        ("ｒｅｄ ｃｕｂｅ", "red cube"),  # full-width letters
        ("红色方块", "red cube"),
        ("红方块", "red cube"),
        ("红色 方块", "red cube"),
        ("蓝色碗", "blue bowl"),
        ("白盘子", "white plate"),
        ("dragon", "dragon"),  # unknown labels are normalised, not mapped
    ],
)
def test_normalise_label(raw, label):
    assert VOCAB.normalise_label(raw) == label


def test_every_chinese_label_maps_into_an_allowlist():
    for zh, label in VOCAB.labels_zh.items():
        assert label in VOCAB.objects | VOCAB.destinations, zh
    colours = ["红", "绿", "蓝", "黄", "橙", "紫"]
    for colour in colours:
        for shape in ["方块", "球", "圆柱", "圆锥"]:
            assert VOCAB.normalise_label(f"{colour}色{shape}") in VOCAB.objects


def test_validate_step_normalises_labels_and_names_the_problem():
    step = VOCAB.validate_step(ActionStep(verb="MOVE_OBJECT", object="Red_Cube", destination="蓝色碗"))
    assert (step.object, step.destination) == ("red cube", "blue bowl")
    cases = [
        (ActionStep(verb="THROW"), "unknown verb 'THROW'"),
        (ActionStep(verb="MOVE_OBJECT", object="red cube"), "missing argument 'destination' for MOVE_OBJECT"),
        (ActionStep(verb="STOP", object="red cube"), "unexpected argument 'object' for STOP"),
        (ActionStep(verb="PICK_OBJECT", object="red cube", destination="blue bowl"), "unexpected argument 'destination'"),
        (
            ActionStep(verb="PICK_OBJECT", object="red cube", destination_box=Box(x_min=0, y_min=0, x_max=1, y_max=1)),
            "unexpected argument 'destination_box' for PICK_OBJECT",
        ),
        (ActionStep(verb="PICK_OBJECT", object="dragon"), "object 'dragon' is not in the vocabulary's objects"),
        (ActionStep(verb="CLARIFY", reason="   "), "missing argument 'reason' for CLARIFY"),
        (ActionStep(verb="CLARIFY", reason="x" * 1001), "at most 1000"),
    ]
    for step, message in cases:
        with pytest.raises(ActionError, match=re.escape(message)):
            VOCAB.validate_step(step)


def test_model_for_builds_strict_per_verb_models():
    model = VOCAB.model_for("MOVE_OBJECT")
    model.model_validate({"action": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl"})
    model.model_validate(
        {"action": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl", "object_box": [1, 2, 3, 4]}
    )
    for bad in (
        {"action": "MOVE_OBJECT", "object": "red cube"},
        {"action": "MOVE_OBJECT", "object": "dragon", "destination": "blue bowl"},
        {"action": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl", "speed": "fast"},
        {"action": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl", "object_box": [1, 2, 3]},
    ):
        with pytest.raises(ValidationError):
            model.model_validate(bad)
    assert set(VOCAB.model_for("STOP").model_fields) == {"action"}
    with pytest.raises(ActionError, match="unknown verb"):
        VOCAB.model_for("THROW")


def test_json_schema_lists_one_alternative_per_verb():
    schema = VOCAB.json_schema()
    json.dumps(schema)  # serialisable
    assert schema["required"] == ["actions"]
    items = schema["properties"]["actions"]["items"]
    refs = [alt["$ref"].rsplit("/", 1)[1] for alt in items["oneOf"]]
    consts = {schema["$defs"][ref]["properties"]["action"]["const"] for ref in refs}
    assert consts == set(VOCAB.verbs)
    move = schema["$defs"]["MoveObjectAction"]
    assert set(move["properties"]["object"]["enum"]) == VOCAB.objects
    assert move["additionalProperties"] is False


def test_json_schema_compiles_for_constrained_decoding():
    xgrammar = pytest.importorskip("xgrammar")
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(VOCAB.json_schema()))
    assert "root" in str(grammar)


def test_fingerprint_is_stable_and_tracks_the_vocabulary():
    data = _vocab_dict()
    assert Vocabulary.from_dict(data).fingerprint() == Vocabulary.from_dict(_vocab_dict()).fingerprint()
    assert Vocabulary.load().fingerprint() == VOCAB.fingerprint()
    changed = _vocab_dict()
    changed["objects"] = changed["objects"] + ["black cube"]
    assert Vocabulary.from_dict(changed).fingerprint() != VOCAB.fingerprint()
    policy_only = _vocab_dict()
    policy_only["policy"] = {"min_confidence": 0.9}
    assert Vocabulary.from_dict(policy_only).fingerprint() == VOCAB.fingerprint()


def _vocab_dict() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "config" / "actions.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(colour="red"), "unknown top-level keys"),
        (lambda d: d.update(verbs={}), "'verbs' must be a non-empty mapping"),
        (lambda d: d["verbs"].update(throw={"args": []}), "UPPER_SNAKE_CASE"),
        (lambda d: d["verbs"].update(THROW={"args": ["speed"]}), "argument 'speed' is not an ActionStep field"),
        (lambda d: d.update(label_args=["reason"]), "has no 'reason_box' field"),
        (lambda d: d.update(objects="all"), "'objects' must be \"any\" or a non-empty list"),
        (lambda d: d["labels_zh"].update({"黑色方块": "black cube"}), "in neither allowlist"),
    ],
)
def test_vocabulary_errors_name_the_key(change, message):
    data = _vocab_dict()
    change(data)
    with pytest.raises(VocabularyError, match=re.escape(message)):
        Vocabulary.from_dict(data)


def test_vocabulary_with_any_labels_accepts_free_text(tmp_path):
    data = _vocab_dict()
    data.update(objects="any", destinations="any", labels_zh={"红色方块": "red cube"})
    path = tmp_path / "actions.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    vocab = Vocabulary.load(path)
    assert vocab.objects is None and vocab.source == path
    step = vocab.validate_step(ActionStep(verb="PICK_OBJECT", object="Toy Dragon"))
    assert step.object == "toy dragon"
    assert vocab.json_schema()["$defs"]["PickObjectAction"]["properties"]["object"]["type"] == "string"


# ---- canonical text -----------------------------------------------------------------------------
def test_render_matches_the_spec_examples():
    steps = [
        ActionStep(verb="MOVE_OBJECT", object="red cube", destination="blue bowl"),
        ActionStep(verb="PICK_OBJECT", object="green ball", object_box=Box(x_min=12, y_min=40, x_max=88, y_max=120)),
        ActionStep(verb="PLACE_OBJECT", destination="blue bowl"),
        ActionStep(verb="STOP", confidence=0.3),
        ActionStep(verb="CLARIFY", reason="no red cube is visible"),
    ]
    assert render_steps(steps, VOCAB) == "\n".join(
        [
            'MOVE_OBJECT(object="red cube", destination="blue bowl")',
            'PICK_OBJECT(object="green ball", object_box=[12, 40, 88, 120])',
            'PLACE_OBJECT(destination="blue bowl")',
            "STOP()",
            'CLARIFY(reason="no red cube is visible")',
        ]
    )


def test_render_keeps_chinese_readable_and_escapes_quotes():
    step = ActionStep(verb="CLARIFY", reason='看不到"红色方块"\n')
    assert render_step(step, VOCAB) == 'CLARIFY(reason="看不到\\"红色方块\\"\\n")'


def test_render_boxes_in_the_model_convention_after_their_argument():
    codec = BoxCodec("normalized_1000", (640, 480))
    step = ActionStep(
        verb="MOVE_OBJECT",
        object="red cube",
        destination="blue bowl",
        object_box=Box(x_min=0, y_min=0, x_max=320, y_max=240),
        destination_box=Box(x_min=320, y_min=240, x_max=640, y_max=480),
    )
    assert render_step(step, VOCAB, codec) == (
        'MOVE_OBJECT(object="red cube", object_box=[0, 0, 500, 500], '
        'destination="blue bowl", destination_box=[500, 500, 1000, 1000])'
    )


def test_render_validates_and_normalises_first():
    assert render_step(ActionStep(verb="PICK_OBJECT", object="红色方块"), VOCAB) == 'PICK_OBJECT(object="red cube")'
    with pytest.raises(ActionError, match="unexpected argument 'object' for STOP"):
        render_step(ActionStep(verb="STOP", object="red cube"), VOCAB)


def test_parse_actions_is_the_inverse_of_render_steps():
    text = 'MOVE_OBJECT(object="red cube", destination="blue bowl")\nSTOP()'
    assert render_steps(parse_actions(text, VOCAB), VOCAB) == text


# ---- the round-trip property --------------------------------------------------------------------
WIDTH, HEIGHT = 640, 480


@st.composite
def integer_boxes(draw):
    xs = sorted(draw(st.lists(st.integers(0, WIDTH), min_size=2, max_size=2)))
    ys = sorted(draw(st.lists(st.integers(0, HEIGHT), min_size=2, max_size=2)))
    return Box(x_min=xs[0], y_min=ys[0], x_max=xs[1], y_max=ys[1])


TRICKY_REASONS = [
    'the "red cube" is hidden',
    "back\\slash \\n not a newline",
    "看不到红色方块",
    "两个\"蓝色碗\"，哪一个？",
    "line one\nline two\ttab",
    "MOVE_OBJECT(object=\"red cube\", destination=\"blue bowl\")",
    "'single' quotes, commas) and parens(",
    '{"action": "STOP"}',
    "[1, 2, 3, 4]",
]
reasons = st.one_of(st.sampled_from(TRICKY_REASONS), st.text(min_size=1, max_size=60)).filter(lambda s: s.strip())
objects = st.sampled_from(sorted(VOCAB.objects))
destinations = st.sampled_from(sorted(VOCAB.destinations))
maybe_box = st.none() | integer_boxes()

steps_strategy = st.lists(
    st.one_of(
        st.builds(
            lambda o, d, ob, db: ActionStep(verb="MOVE_OBJECT", object=o, destination=d, object_box=ob, destination_box=db),
            objects, destinations, maybe_box, maybe_box,
        ),
        st.builds(lambda o, ob: ActionStep(verb="PICK_OBJECT", object=o, object_box=ob), objects, maybe_box),
        st.builds(lambda d, db: ActionStep(verb="PLACE_OBJECT", destination=d, destination_box=db), destinations, maybe_box),
        st.just(ActionStep(verb="STOP")),
        st.builds(lambda r: ActionStep(verb="CLARIFY", reason=r), reasons),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(steps_strategy)
def test_parse_of_render_is_identity(steps):
    assert parse_actions(render_steps(steps, VOCAB), VOCAB) == steps


@settings(max_examples=100, deadline=None)
@given(steps_strategy)
def test_parse_of_render_is_identity_through_the_identity_codec(steps):
    codec = BoxCodec("original_pixels", (WIDTH, HEIGHT))
    assert parse_actions(render_steps(steps, VOCAB, codec), VOCAB, codec) == steps


def test_core_modules_import_neither_rclpy_nor_torch():
    code = (
        "import sys\n"
        "import vla_node.actions, vla_node.vocabulary, vla_node.parser, vla_node.prompt\n"
        "import vla_node.image, vla_node.policy, vla_node.text\n"
        "bad = [m for m in ('rclpy', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
