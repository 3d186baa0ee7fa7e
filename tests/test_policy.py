"""Safety gate: each rule refuses with its name and the offending value."""

import pytest

from vla_node.actions import ActionStep, Box
from vla_node.policy import PolicyViolation, SafetyPolicy
from vla_node.vocabulary import Vocabulary

VOCAB = Vocabulary.load()
IMAGE = (640, 480)
MOVE = ActionStep(verb="MOVE_OBJECT", object="red cube", destination="blue bowl", confidence=0.9)


def policy(**cfg) -> SafetyPolicy:
    return SafetyPolicy.from_config(cfg, VOCAB)


def test_packaged_policy_section_loads_and_allows_a_normal_plan():
    gate = SafetyPolicy.from_config(VOCAB.policy_config, VOCAB)
    assert gate == SafetyPolicy()  # the shipped defaults are the dataclass defaults
    assert gate.check([MOVE, ActionStep(verb="STOP")], IMAGE) is None
    assert SafetyPolicy.from_config(None, VOCAB) == SafetyPolicy()


def test_from_config_reads_lists_and_normalises_labels():
    gate = policy(
        allowed_verbs=["MOVE_OBJECT", "STOP"],
        allowed_objects=["Red_Cube", "绿色球"],
        allowed_destinations=["blue bowl"],
        min_confidence=0.5,
        max_steps=3,
        require_boxes_inside_image=False,
    )
    assert gate.allowed_verbs == {"MOVE_OBJECT", "STOP"}
    assert gate.allowed_objects == {"red cube", "green ball"}
    assert (gate.min_confidence, gate.max_steps, gate.require_boxes_inside_image) == (0.5, 3, False)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"max_step": 3}, "unknown policy keys ['max_step']"),
        ({"allowed_verbs": ["THROW"]}, "allowed_verbs: ['THROW'] are not vocabulary verbs"),
        ({"allowed_verbs": "some"}, "allowed_verbs must be 'all' or a list"),
        ({"allowed_objects": ["dragon"]}, "allowed_objects: ['dragon'] are not in the vocabulary's allowlist"),
        ({"allowed_destinations": ["moon"]}, "allowed_destinations: ['moon']"),
        ({"min_confidence": 1.5}, "min_confidence must be a number in 0..1"),
        ({"min_confidence": "high"}, "min_confidence must be a number in 0..1"),
        ({"max_steps": 0}, "max_steps must be an integer >= 1"),
        ({"max_steps": 2.5}, "max_steps must be an integer >= 1"),
        ({"require_boxes_inside_image": "yes"}, "require_boxes_inside_image must be true or false"),
    ],
)
def test_bad_config_is_refused_with_the_key(cfg, message):
    with pytest.raises(ValueError) as caught:
        SafetyPolicy.from_config(cfg, VOCAB)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "gate, steps, rule, value, message",
    [
        (
            SafetyPolicy(allowed_verbs=frozenset({"STOP"})),
            [ActionStep(verb="STOP"), MOVE],
            "allowed_verbs", "MOVE_OBJECT", "step 2: verb 'MOVE_OBJECT' not in allowed_verbs",
        ),
        (
            SafetyPolicy(allowed_objects=frozenset({"green ball"})),
            [MOVE],
            "allowed_objects", "red cube", "step 1: object 'red cube' not in allowed_objects",
        ),
        (
            SafetyPolicy(allowed_destinations=frozenset({"red bowl"})),
            [MOVE],
            "allowed_destinations", "blue bowl", "step 1: destination 'blue bowl' not in allowed_destinations",
        ),
        (
            SafetyPolicy(min_confidence=0.95),
            [MOVE],
            "min_confidence", 0.9, "step 1: confidence 0.900 below min_confidence 0.950",
        ),
        (
            SafetyPolicy(max_steps=2),
            [MOVE, MOVE, MOVE],
            "max_steps", 3, "plan has 3 steps, more than max_steps=2",
        ),
        (SafetyPolicy(), [], "non_empty_plan", 0, "plan has no steps"),
        (
            SafetyPolicy(),
            [MOVE.model_copy(update={"object_box": Box(x_min=600, y_min=10, x_max=700, y_max=20)})],
            "require_boxes_inside_image", [600.0, 10.0, 700.0, 20.0],
            "step 1: object_box [600.0, 10.0, 700.0, 20.0] is not inside the 640x480 image (require_boxes_inside_image)",
        ),
        (
            SafetyPolicy(),
            [MOVE.model_copy(update={"destination_box": Box(x_min=-3, y_min=0, x_max=10, y_max=10)})],
            "require_boxes_inside_image", [-3.0, 0.0, 10.0, 10.0], "destination_box [-3.0, 0.0, 10.0, 10.0]",
        ),
    ],
)
def test_each_rule_names_itself_and_the_offending_value(gate, steps, rule, value, message):
    violation = gate.evaluate(steps, IMAGE)
    assert isinstance(violation, PolicyViolation)
    assert (violation.rule, violation.value) == (rule, value)
    assert message in violation.message
    assert gate.check(steps, IMAGE) == violation.message
    assert rule in violation.message


def test_the_first_violation_is_reported_with_its_step_number():
    gate = SafetyPolicy(allowed_objects=frozenset({"red cube"}), min_confidence=0.5)
    steps = [MOVE, ActionStep(verb="PICK_OBJECT", object="green ball", confidence=0.1)]
    violation = gate.evaluate(steps, IMAGE)
    assert (violation.step, violation.rule) == (2, "allowed_objects")


def test_stop_is_never_refused_for_low_confidence():
    gate = SafetyPolicy(min_confidence=0.9)
    assert gate.check([ActionStep(verb="STOP", confidence=0.1)], IMAGE) is None
    assert gate.check([ActionStep(verb="CLARIFY", reason="?", confidence=0.1)], IMAGE) is not None


def test_boxes_on_the_image_edge_are_inside_and_the_rule_can_be_disabled():
    edge = MOVE.model_copy(update={"object_box": Box(x_min=0, y_min=0, x_max=640, y_max=480)})
    assert SafetyPolicy().check([edge], IMAGE) is None
    outside = MOVE.model_copy(update={"object_box": Box(x_min=0, y_min=0, x_max=641, y_max=480)})
    assert SafetyPolicy().check([outside], IMAGE) is not None
    assert SafetyPolicy(require_boxes_inside_image=False).check([outside], IMAGE) is None


def test_allowlists_do_not_apply_to_verbs_without_that_argument():
    gate = SafetyPolicy(allowed_objects=frozenset({"green ball"}), allowed_destinations=frozenset({"red bowl"}))
    assert gate.check([ActionStep(verb="STOP"), ActionStep(verb="CLARIFY", reason="where?")], IMAGE) is None
