"""Model text -> steps: every accepted form, every refusal, and box conventions per model family."""

import pytest

from vla_node.actions import ActionStep, Box
from vla_node.image import PixelLimits, smart_resize
from vla_node.parser import BoxCodec, ParseError, parse_actions
from vla_node.vocabulary import Vocabulary

VOCAB = Vocabulary.load()
MOVE = ActionStep(verb="MOVE_OBJECT", object="red cube", destination="blue bowl")
PICK = ActionStep(verb="PICK_OBJECT", object="red cube")
QWEN25_LIMITS = PixelLimits(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, factor=28)
QWEN3_LIMITS = PixelLimits(min_pixels=64 * 64, max_pixels=32 * 32 * 1280, factor=32)


def parse(text, boxes=None):
    return parse_actions(text, VOCAB, boxes)


def box(x1, y1, x2, y2):
    return Box(x_min=x1, y_min=y1, x_max=x2, y_max=y2)


# ---- accepted forms -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        'MOVE_OBJECT(object="red cube", destination="blue bowl")',
        '  MOVE_OBJECT( object = "red cube" ,\n destination="blue bowl", )  ',
        'Sure! MOVE_OBJECT(object="red cube", destination="blue bowl") Hope this helps',
        'The plan is:\nMOVE_OBJECT(object="red cube", destination="blue bowl").',
        'move_object(object="red cube", destination="blue bowl")',
        'MOVE_OBJECT("red cube", "blue bowl")',
        "MOVE_OBJECT(object='red cube', destination='blue bowl')",
        'MOVE_OBJECT(object="Red_Cube", destination="BLUE-bowl")',
        'MOVE_OBJECT(object="红色方块", destination="蓝色碗")',
        'MOVE_OBJECT(object="红方块", destination="蓝碗")',
        '{"action": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl"}',
        '{"verb": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl"}',
        '{"action": "MOVE_OBJECT", "arguments": {"object": "red cube", "destination": "blue bowl"}}',
        '[{"action": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl"}]',
        '{"actions": [{"action": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl"}]}',
        '```json\n{"action": "MOVE_OBJECT", "object": "red cube", "destination": "blue bowl"}\n```',
        'Here you go:\n```json\n[{"action": "MOVE_OBJECT", "object": "红色方块", "destination": "蓝色碗"}]\n```\nDone.',
        '```\nMOVE_OBJECT(object="red cube", destination="blue bowl")\n```',
        '<think>maybe PICK_OBJECT(object="green ball")? no.</think>\nMOVE_OBJECT(object="red cube", destination="blue bowl")',
    ],
)
def test_accepted_forms_give_the_same_step(text):
    assert parse(text) == [MOVE]


def test_multi_step_in_order_of_appearance():
    text = (
        'PICK_OBJECT(object="red cube")\n'
        'PLACE_OBJECT(destination="blue bowl")\n'
        "STOP()\n"
        'CLARIFY(reason="which \\"cube\\"?")'
    )
    assert [s.verb for s in parse(text)] == ["PICK_OBJECT", "PLACE_OBJECT", "STOP", "CLARIFY"]
    assert parse(text)[3].reason == 'which "cube"?'


def test_json_null_and_empty_values_mean_not_given():
    assert parse('{"action": "STOP", "object": "", "destination": null}') == [ActionStep(verb="STOP")]
    with pytest.raises(ParseError, match="missing argument 'object' for PICK_OBJECT"):
        parse('{"action": "PICK_OBJECT", "object": ""}')


def test_mixed_call_and_json_steps_keep_their_order():
    text = 'PICK_OBJECT(object="red cube")\n{"action": "PLACE_OBJECT", "destination": "blue bowl"}\nSTOP()'
    assert [s.verb for s in parse(text)] == ["PICK_OBJECT", "PLACE_OBJECT", "STOP"]


def test_text_inside_strings_is_not_mistaken_for_calls():
    steps = parse('CLARIFY(reason="should I MOVE_OBJECT(object=\\"x\\") or THROW(it)?")')
    assert steps == [ActionStep(verb="CLARIFY", reason='should I MOVE_OBJECT(object="x") or THROW(it)?')]
    steps = parse('{"action": "CLARIFY", "reason": "cannot THROW(anything) [1, 2]"}')
    assert steps[0].reason == "cannot THROW(anything) [1, 2]"


def test_plain_lists_and_lowercase_words_in_chatter_are_ignored():
    assert parse('Step [1]: see (below)\nPICK_OBJECT(object="red cube")') == [PICK]


def test_boxes_in_call_syntax_and_json():
    expected = [PICK.model_copy(update={"object_box": box(10, 20, 30, 40)})]
    assert parse('PICK_OBJECT(object="red cube", object_box=[10, 20, 30, 40])') == expected
    assert parse('PICK_OBJECT(object="red cube", object_box=[30, 40, 10, 20])') == expected  # corners swapped
    assert parse('{"action": "PICK_OBJECT", "object": "red cube", "object_box": [10, 20, 30, 40]}') == expected
    assert parse('{"action": "PICK_OBJECT", "object": "red cube", "bbox_2d": [10, 20, 30, 40]}') == expected
    assert parse('PICK_OBJECT(object="red cube", object_box=[10.5, 20, 30, 40])')[0].object_box.x_min == 10.5


def test_grounding_json_attaches_boxes_to_matching_labels():
    text = (
        'MOVE_OBJECT(object="red cube", destination="blue bowl")\n'
        '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "red cube"},'
        ' {"bbox_2d": [100, 100, 200, 180], "label": "蓝色碗"},'
        ' {"bbox_2d": [1, 1, 2, 2], "label": "green ball"}]\n```'
    )
    (step,) = parse(text)
    assert step.object_box == box(10, 20, 30, 40)
    assert step.destination_box == box(100, 100, 200, 180)


def test_grounding_before_the_action_and_label_reused_by_two_steps():
    text = '[{"bbox_2d": [10, 20, 30, 40], "label": "Red Cube"}]\nPICK_OBJECT(object="red cube")\nMOVE_OBJECT(object="red cube", destination="blue bowl")'
    steps = parse(text)
    assert steps[0].object_box == steps[1].object_box == box(10, 20, 30, 40)
    assert steps[1].destination_box is None


def test_an_explicit_box_wins_over_grounding():
    text = 'PICK_OBJECT(object="red cube", object_box=[1, 2, 3, 4])\n[{"bbox_2d": [10, 20, 30, 40], "label": "red cube"}]'
    assert parse(text)[0].object_box == box(1, 2, 3, 4)


# ---- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty model output"),
        ("   \n ", "empty model output"),
        ("I am not sure what to do.", "no action found in model output"),
        ("STOP", "no action found in model output"),
        ("<think>PICK_OBJECT(object=\"red cube\")", "no action found in model output"),
        ('THROW(object="red cube")', "unknown verb 'THROW'"),
        ('Sure! THROW_OBJECT(object="red cube")', "unknown verb 'THROW_OBJECT'"),
        ('{"action": "THROW", "object": "red cube"}', "unknown verb 'THROW'"),
        ('MOVE_OBJECT(object="red cube")', "missing argument 'destination' for MOVE_OBJECT"),
        ('{"action": "PICK_OBJECT"}', "missing argument 'object' for PICK_OBJECT"),
        ('PICK_OBJECT(object="red cube", speed="fast")', "unexpected argument 'speed' for PICK_OBJECT"),
        ('STOP(object="red cube")', "unexpected argument 'object' for STOP"),
        ('STOP(object_box=[1, 2, 3, 4])', "unexpected argument 'object_box' for STOP"),
        ('PLACE_OBJECT(destination="blue bowl", object_box=[1, 2, 3, 4])', "unexpected argument 'object_box' for PLACE_OBJECT"),
        ('{"action": "STOP", "confidence": 0.9}', "unexpected argument 'confidence' for STOP"),
        ('PICK_OBJECT(object="red cube", object="green ball")', "argument 'object' given twice"),
        ('PICK_OBJECT("red cube", "green ball")', "too many positional arguments for PICK_OBJECT"),
        ('MOVE_OBJECT(object="red cube", "blue bowl")', "positional argument after keyword arguments"),
        ('PICK_OBJECT(object="red cube)', "unbalanced quotes"),
        ("PICK_OBJECT(object='red cube)", "unbalanced quotes"),
        ('PICK_OBJECT(object="red cube"', "unbalanced parentheses"),
        ('PICK_OBJECT(object="red cube" "x")', "expected ',' or ')'"),
        ("PICK_OBJECT(object=red cube)", "argument value must be a quoted string"),
        ('PICK_OBJECT(object="red cube", object_box=[1, 2, 3])', "a box must be 4 numbers"),
        ('PICK_OBJECT(object="red cube", object_box=[1, 2, 3, NaN])', "box must be [x1, y1, x2, y2] numbers"),
        ('PICK_OBJECT(object="red cube", object_box=[1, 2, 3, 4)', "unbalanced brackets"),
        ('PICK_OBJECT(object="dragon")', "object 'dragon' is not in the vocabulary's objects"),
        ('PICK_OBJECT(object="")', "missing argument 'object' for PICK_OBJECT (empty value)"),
        ('{"action": "PICK_OBJECT", "object": 5}', "argument 'object' of PICK_OBJECT must be a string"),
        ('{"action": "PICK_OBJECT", "verb": "STOP"}', "'action'/'verb' must be one string"),
        ('{"object": "red cube"}', "JSON object has none of 'action', 'verb', 'actions', 'bbox_2d'"),
        ('{"actions": "STOP"}', "'actions' must be a JSON array"),
        ('[{"action": "STOP"}, 3]', "JSON array mixes objects with int values"),
        ('{"action": "PICK_OBJECT", "object": "red cube"', "malformed JSON"),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "red cube"}]', "grounding boxes but no action verb"),
        ('[{"bbox_2d": [1, 2, 3, 4]}]', "grounding box without a text 'label'"),
        (
            'PICK_OBJECT(object="red cube")\n[{"bbox_2d": [1, 2, 3, 4], "label": "red cube"}, '
            '{"bbox_2d": [5, 6, 7, 8], "label": "red cube"}]',
            "two different boxes for 'red cube'",
        ),
    ],
)
def test_refusals_carry_a_specific_reason(text, reason):
    with pytest.raises(ParseError) as caught:
        parse(text)
    assert reason in caught.value.reason
    assert reason in str(caught.value)


def test_parse_error_carries_the_offending_text():
    text = 'Sure!\nMOVE_OBJECT(object="red cube")\nbye'
    with pytest.raises(ParseError) as caught:
        parse(text)
    assert caught.value.text == 'MOVE_OBJECT(object="red cube")'
    with pytest.raises(ParseError) as caught:
        parse("nothing to see here")
    assert caught.value.text == "nothing to see here"


def test_one_bad_step_fails_the_whole_plan():
    with pytest.raises(ParseError, match="unknown verb 'FLY'"):
        parse('PICK_OBJECT(object="red cube")\nFLY()')


def test_long_offending_text_is_shortened_in_the_message_only():
    text = "x" * 5000
    with pytest.raises(ParseError) as caught:
        parse(text)
    assert caught.value.text == text and len(str(caught.value)) < 400


# ---- box conventions ----------------------------------------------------------------------------
def test_qwen25_absolute_resized_maps_back_to_original_pixels():
    resized_h, resized_w = smart_resize(480, 640, QWEN25_LIMITS)
    assert (resized_w, resized_h) == (644, 476)
    codec = BoxCodec("absolute_resized", (640, 480), (resized_w, resized_h))
    assert codec.to_original([322, 238, 644, 476]) == box(320, 240, 640, 480)
    assert codec.to_original([0, 0, 644, 476]) == box(0, 0, 640, 480)
    steps = parse('PICK_OBJECT(object="red cube", object_box=[161, 119, 322, 238])', codec)
    assert steps[0].object_box == box(160, 120, 320, 240)


def test_qwen2_absolute_resized_with_a_downscaled_hd_frame():
    limits = PixelLimits(min_pixels=56 * 56, max_pixels=512 * 28 * 28, factor=28)
    resized_h, resized_w = smart_resize(1080, 1920, limits)
    assert (resized_w, resized_h) == (840, 448)
    codec = BoxCodec("absolute_resized", (1920, 1080), (resized_w, resized_h))
    centre = codec.to_original([420, 224, 420, 224])
    assert centre.x_min == pytest.approx(960) and centre.y_min == pytest.approx(540)
    assert codec.to_model(box(960, 540, 1920, 1080)) == [420, 224, 840, 448]


def test_qwen3_normalized_1000():
    assert smart_resize(480, 640, QWEN3_LIMITS) == (480, 640)
    codec = BoxCodec("normalized_1000", (640, 480))
    assert codec.to_original([500, 500, 500, 500]) == box(320, 240, 320, 240)
    assert codec.to_original([0, 0, 1000, 1000]) == box(0, 0, 640, 480)
    steps = parse('{"action": "PICK_OBJECT", "object": "red cube", "bbox_2d": [250, 250, 750, 750]}', codec)
    assert steps[0].object_box == box(160, 120, 480, 360)
    assert codec.to_model(box(160, 120, 480, 360)) == [250, 250, 750, 750]


def test_grounding_boxes_are_converted_too():
    codec = BoxCodec("normalized_1000", (640, 480))
    text = 'PICK_OBJECT(object="red cube")\n[{"bbox_2d": [0, 0, 500, 500], "label": "red cube"}]'
    assert parse(text, codec)[0].object_box == box(0, 0, 320, 240)


def test_original_pixels_is_the_identity_and_boxes_are_clipped():
    codec = BoxCodec("original_pixels", (640, 480))
    assert codec.to_original([10, 20, 30, 40]) == box(10, 20, 30, 40)
    assert codec.to_original([-5, 400, 700, 500]) == box(0, 400, 640, 480)
    assert codec.to_model(box(10.4, 20.6, 30, 40)) == [10, 21, 30, 40]


def test_a_box_wholly_outside_the_image_is_refused():
    codec = BoxCodec("original_pixels", (640, 480))
    with pytest.raises(ValueError, match="lies outside the 640x480 image"):
        codec.to_original([700, 10, 800, 20])
    with pytest.raises(ParseError, match="lies outside"):
        parse('PICK_OBJECT(object="red cube", object_box=[700, 10, 800, 20])', codec)


def test_codec_configuration_errors():
    with pytest.raises(ValueError, match="unknown box convention 'pixels'"):
        BoxCodec("pixels", (640, 480))
    with pytest.raises(ValueError, match="needs the positive model_input_size"):
        BoxCodec("absolute_resized", (640, 480), None)
    with pytest.raises(ValueError, match="original_size must be positive"):
        BoxCodec("normalized_1000", (0, 480))
    codec = BoxCodec("normalized_1000", (640, 480))
    for bad in ([1, 2, 3], [1, 2, 3, float("inf")], "1,2,3,4", [1, 2, True, 4]):
        with pytest.raises(ValueError):
            codec.to_original(bad)


def test_ints_and_floats_round_trip_through_to_model():
    codec = BoxCodec("absolute_resized", (640, 480), (644, 476))
    for numbers in ([0, 0, 644, 476], [13, 27, 300, 301], [100, 100, 100, 100]):
        assert codec.to_model(codec.to_original(numbers)) == numbers
