"""Model text -> validated ActionSteps, and box conversion from the model's coordinates.

Accepted forms (mixed freely, in order of appearance):
  * canonical calls  MOVE_OBJECT(object="red cube", destination="blue bowl")   (one or more)
  * JSON steps       {"action": "PICK_OBJECT", "object": "red cube"} / {"verb": ...}, arrays of them,
                     {"actions": [...]}, also inside ```json fences
  * Qwen grounding   [{"bbox_2d": [x1, y1, x2, y2], "label": "red cube"}]  -> boxes for matching labels
  * chatter around all of that ("Sure! ... Hope this helps"), and a leading <think>...</think> block.
Anything else raises ParseError(text, reason). The parser never guesses a missing piece.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from json.decoder import scanstring
from typing import Any

from vla_node.actions import BOX_SUFFIX, ActionError, ActionStep, Box
from vla_node.vocabulary import Vocabulary

CONVENTIONS = ("absolute_resized", "normalized_1000", "original_pixels")
GROUNDING_BOX_KEYS = ("bbox_2d", "bbox")
_PREVIEW_CHARS = 300


class ParseError(Exception):
    """The model output is not a valid plan. `text` is the offending text, `reason` says why."""

    def __init__(self, text: str, reason: str):
        preview = text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "..."
        super().__init__(f"{reason}: {preview!r}")
        self.text = text
        self.reason = reason


class BoxCodec:
    """Converts boxes between the model's coordinate convention and ORIGINAL camera pixels.

    absolute_resized: Qwen2-VL / Qwen2.5-VL, absolute pixels of the processor-resized image
    normalized_1000:  Qwen3-VL, 0..1000 on both axes
    original_pixels:  identity
    Sizes are (width, height).
    """

    def __init__(
        self,
        convention: str,
        original_size: tuple[int, int],
        model_input_size: tuple[int, int] | None = None,
    ):
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown box convention '{convention}' (known: {', '.join(CONVENTIONS)})")
        width, height = original_size
        if width <= 0 or height <= 0:
            raise ValueError(f"original_size must be positive, got {original_size}")
        if convention == "absolute_resized":
            if model_input_size is None or min(model_input_size) <= 0:
                raise ValueError(f"absolute_resized needs the positive model_input_size, got {model_input_size}")
            model_width, model_height = model_input_size
        elif convention == "normalized_1000":
            model_width, model_height = 1000, 1000
        else:
            model_width, model_height = width, height
        self.convention = convention
        self.original_size = (width, height)
        self.model_input_size = model_input_size
        self._scale_x = width / model_width
        self._scale_y = height / model_height

    def to_original(self, box4: list[float]) -> Box:
        """Scales, orders min/max and clips to the image; a box wholly outside it is a ValueError."""
        if not isinstance(box4, (list, tuple)) or len(box4) != 4:
            raise ValueError(f"a box must be 4 numbers [x1, y1, x2, y2], got {box4!r}")
        if not all(_is_number(v) and math.isfinite(v) for v in box4):
            raise ValueError(f"box coordinates must be finite numbers, got {box4!r}")
        x1, x2 = sorted((box4[0] * self._scale_x, box4[2] * self._scale_x))
        y1, y2 = sorted((box4[1] * self._scale_y, box4[3] * self._scale_y))
        width, height = self.original_size
        if x2 < 0 or y2 < 0 or x1 > width or y1 > height:
            raise ValueError(f"box {list(box4)} ({self.convention}) lies outside the {width}x{height} image")
        return Box(
            x_min=min(max(x1, 0.0), width),
            y_min=min(max(y1, 0.0), height),
            x_max=min(max(x2, 0.0), width),
            y_max=min(max(y2, 0.0), height),
        )

    def to_model(self, box: Box) -> list[int]:
        return [
            round(box.x_min / self._scale_x),
            round(box.y_min / self._scale_y),
            round(box.x_max / self._scale_x),
            round(box.y_max / self._scale_y),
        ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _RawStep:
    verb: str
    items: list[tuple[str | None, Any]]  # (argument name or None when positional, value)
    source: str


@dataclass
class _Grounding:
    label: str
    box: Any
    source: str


@dataclass
class _Collected:
    steps: list[_RawStep] = field(default_factory=list)
    groundings: list[_Grounding] = field(default_factory=list)
    json_error: str | None = None  # first malformed JSON object, reported if nothing else parsed


# A leading reasoning block (Qwen3 thinking models); drafts inside it are not the answer.
_THINK_BLOCK = re.compile(r"^\s*<think>.*?(?:</think>|\Z)", re.S)
_CALL_START = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)(\s*)\(")
_VERB_LIKE = re.compile(r"^(?:[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[A-Z][A-Z0-9]+|[a-z][a-z0-9]*(?:_[a-z0-9]+)+)$")
_JSON_START = re.compile(r"[\[{]")
_JSON_OBJECT_START = re.compile(r'\{\s*"')
_KEYWORD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=")
_DECODER = json.JSONDecoder()


def parse_actions(text: str, vocab: Vocabulary, boxes: BoxCodec | None = None) -> list[ActionStep]:
    """Model text -> validated steps (boxes in original pixels). Raises ParseError."""
    if not isinstance(text, str) or not text.strip():
        raise ParseError(text if isinstance(text, str) else repr(text), "empty model output")
    body = _THINK_BLOCK.sub("", text, count=1)
    found = _scan(body, vocab)
    if not found.steps:
        if found.groundings:
            raise ParseError(text, "grounding boxes but no action verb")
        raise ParseError(text, found.json_error or "no action found in model output")
    steps = [_to_step(raw, vocab, boxes) for raw in found.steps]
    return _attach_groundings(steps, found.groundings, vocab, boxes)


# ---- scanning --------------------------------------------------------------------------------------
def _scan(body: str, vocab: Vocabulary) -> _Collected:
    found = _Collected()
    pos = 0
    while pos < len(body):
        call = _next_call(body, pos, vocab)
        limit = call.start() if call else len(body)
        decoded = _next_json(body, pos, limit, found)
        if decoded is not None:
            start, end, value = decoded
            _collect_json(value, body[start:end], found)
            pos = end
        elif call is not None:
            if call.group(1).upper() not in vocab.verbs:
                raise ParseError(_line_at(body, call.start()), f"unknown verb '{call.group(1)}'")
            raw, pos = _parse_call(body, call)
            found.steps.append(raw)
        else:
            break
    return found


def _next_call(body: str, pos: int, vocab: Vocabulary):
    """The next `NAME(` that is a verb, or looks like one (then it is an unknown verb)."""
    for match in _CALL_START.finditer(body, pos):
        name, space = match.group(1), match.group(2)
        if name.upper() in vocab.verbs or (not space and _VERB_LIKE.match(name)):
            return match
    return None


def _next_json(body: str, pos: int, limit: int, found: _Collected):
    for match in _JSON_START.finditer(body, pos, limit):
        start = match.start()
        try:
            value, end = _DECODER.raw_decode(body, start)
        except json.JSONDecodeError as exc:
            if found.json_error is None and _JSON_OBJECT_START.match(body, start):
                found.json_error = f"malformed JSON ({exc.msg}, offset {exc.pos - start})"
            continue
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            return start, end, value
        # a list of plain numbers or strings is chatter ("step [1]"), not structure
    return None


def _line_at(body: str, start: int) -> str:
    end = body.find("\n", start)
    return body[start:] if end < 0 else body[start:end]


# ---- canonical calls -------------------------------------------------------------------------------
def _parse_call(body: str, match) -> tuple[_RawStep, int]:
    name = match.group(1)
    source = _line_at(body, match.start())
    i = _skip_space(body, match.end())
    items: list[tuple[str | None, Any]] = []
    if i < len(body) and body[i] == ")":
        return _RawStep(name, items, body[match.start() : i + 1]), i + 1
    while True:
        keyword = _KEYWORD.match(body, i)
        arg_name = keyword.group(1) if keyword else None
        if keyword:
            i = _skip_space(body, keyword.end())
        elif any(k is not None for k, _ in items):
            raise ParseError(source, f"positional argument after keyword arguments in {name}")
        value, i = _parse_value(body, i, source, name)
        items.append((arg_name, value))
        i = _skip_space(body, i)
        if i >= len(body):
            raise ParseError(source, f"unbalanced parentheses: {name}( is never closed")
        if body[i] == ",":
            i = _skip_space(body, i + 1)
            if i < len(body) and body[i] == ")":
                break
            continue
        if body[i] == ")":
            break
        raise ParseError(source, f"expected ',' or ')' in {name}(...), found {body[i:i + 20]!r}")
    return _RawStep(name, items, body[match.start() : i + 1]), i + 1


def _skip_space(body: str, i: int) -> int:
    while i < len(body) and body[i] in " \t\r\n":
        i += 1
    return i


def _parse_value(body: str, i: int, source: str, verb: str) -> tuple[Any, int]:
    if i >= len(body):
        raise ParseError(source, f"unbalanced parentheses: {verb}( is never closed")
    opener = body[i]
    if opener == '"':
        try:
            return scanstring(body, i + 1, True)
        except json.JSONDecodeError as exc:
            if exc.msg.startswith(("Unterminated string", "Invalid control character")):
                raise ParseError(source, "unbalanced quotes: a string is not closed on its line") from None
            raise ParseError(source, f"bad string: {exc.msg}") from None
    if opener == "'":
        j = i + 1
        while j < len(body) and body[j] not in "'\n":
            j += 2 if body[j] == "\\" else 1
        if j >= len(body) or body[j] != "'":
            raise ParseError(source, "unbalanced quotes: a string is not closed on its line")
        return re.sub(r"\\(.)", r"\1", body[i + 1 : j]), j + 1
    if opener == "[":
        end = body.find("]", i)
        if end < 0:
            raise ParseError(source, "unbalanced brackets: '[' is never closed")
        try:
            return json.loads(body[i : end + 1], parse_constant=_reject_constant), end + 1
        except (json.JSONDecodeError, ValueError):
            raise ParseError(source, f"box must be [x1, y1, x2, y2] numbers, got {body[i:end + 1]!r}") from None
    raise ParseError(source, f"argument value must be a quoted string or a box list, found {body[i:i + 20]!r}")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a coordinate")


# ---- JSON ------------------------------------------------------------------------------------------
def _collect_json(value: Any, source: str, found: _Collected) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, dict):
            raise ParseError(source, f"JSON array mixes objects with {type(item).__name__} values")
        if "actions" in item:
            actions = item["actions"]
            if not isinstance(actions, list):
                raise ParseError(source, "'actions' must be a JSON array")
            _collect_json(actions, source, found)
        elif "action" in item or "verb" in item:
            found.steps.append(_json_step(item, source))
        elif any(key in item for key in GROUNDING_BOX_KEYS):
            found.groundings.append(_json_grounding(item, source))
        else:
            raise ParseError(
                source, f"JSON object has none of 'action', 'verb', 'actions', 'bbox_2d' (keys: {sorted(item)})"
            )


def _json_step(obj: dict, source: str) -> _RawStep:
    verbs = {obj[key] for key in ("action", "verb") if key in obj}
    if len(verbs) != 1 or not all(isinstance(v, str) for v in verbs):
        raise ParseError(source, f"'action'/'verb' must be one string, got {sorted(map(repr, verbs))}")
    args = {k: v for k, v in obj.items() if k not in ("action", "verb")}
    for nested_key in ("arguments", "args"):  # {"action": ..., "arguments": {...}}
        nested = args.pop(nested_key, None)
        if isinstance(nested, dict):
            clash = set(nested) & set(args)
            if clash:
                raise ParseError(source, f"argument {sorted(clash)[0]!r} given twice")
            args.update(nested)
        elif nested is not None:
            raise ParseError(source, f"'{nested_key}' must be a JSON object")
    # null and "" mean "not given", as in ActionStep ({"action": "STOP", "object": ""} is a plain STOP).
    return _RawStep(verbs.pop(), [(k, v) for k, v in args.items() if v is not None and v != ""], source)


def _json_grounding(obj: dict, source: str) -> _Grounding:
    label = obj.get("label")
    if not isinstance(label, str) or not label.strip():
        raise ParseError(source, "grounding box without a text 'label'")
    box = next(obj[key] for key in GROUNDING_BOX_KEYS if key in obj)
    return _Grounding(label, box, source)


# ---- validation ------------------------------------------------------------------------------------
def _to_step(raw: _RawStep, vocab: Vocabulary, codec: BoxCodec | None) -> ActionStep:
    verb = raw.verb.strip().upper()
    spec = vocab.verbs.get(verb)
    if spec is None:
        raise ParseError(raw.source, f"unknown verb '{raw.verb}'")
    label_args = [a for a in spec.args if a in vocab.label_args]
    allowed = set(spec.args) | {a + BOX_SUFFIX for a in label_args}
    values: dict[str, Any] = {}
    for position, (name, value) in enumerate(raw.items):
        if name is None:
            if position >= len(spec.args):
                raise ParseError(raw.source, f"too many positional arguments for {verb} (takes {len(spec.args)})")
            name = spec.args[position]
        if name in GROUNDING_BOX_KEYS and len(label_args) == 1:
            name = label_args[0] + BOX_SUFFIX  # {"action": "PICK_OBJECT", ..., "bbox_2d": [...]}
        if name not in allowed:
            raise ParseError(raw.source, f"unexpected argument '{name}' for {verb}")
        if name in values:
            raise ParseError(raw.source, f"argument '{name}' given twice")
        if name.endswith(BOX_SUFFIX):
            values[name] = _to_box(value, codec, raw.source)
        elif isinstance(value, str):
            values[name] = value
        else:
            raise ParseError(raw.source, f"argument '{name}' of {verb} must be a string, got {json.dumps(value)}")
    for arg in spec.args:
        if arg not in values:
            raise ParseError(raw.source, f"missing argument '{arg}' for {verb}")
    try:
        return vocab.validate_step(ActionStep(verb=verb, **values))
    except ActionError as exc:
        raise ParseError(raw.source, str(exc)) from None


def _to_box(value: Any, codec: BoxCodec | None, source: str) -> Box:
    try:
        if codec is not None:
            return codec.to_original(value)
        # No codec: the numbers already are original pixels; order them, do not clip.
        if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
            raise ValueError(f"a box must be 4 numbers [x1, y1, x2, y2], got {value!r}")
        if not all(math.isfinite(v) for v in value):
            raise ValueError(f"box coordinates must be finite numbers, got {value!r}")
        x1, x2 = sorted((value[0], value[2]))
        y1, y2 = sorted((value[1], value[3]))
        return Box(x_min=x1, y_min=y1, x_max=x2, y_max=y2)
    except ValueError as exc:
        raise ParseError(source, str(exc)) from None


def _attach_groundings(
    steps: list[ActionStep], groundings: list[_Grounding], vocab: Vocabulary, codec: BoxCodec | None
) -> list[ActionStep]:
    boxes_by_label: dict[str, tuple[Any, str]] = {}
    for grounding in groundings:
        label = vocab.normalise_label(grounding.label)
        if label in boxes_by_label and boxes_by_label[label][0] != grounding.box:
            raise ParseError(grounding.source, f"two different boxes for '{label}': cannot tell which is meant")
        boxes_by_label[label] = (grounding.box, grounding.source)
    # Labels that name no step are ignored: grounding extra objects is information, not an action.
    if not boxes_by_label:
        return steps
    result = []
    for step in steps:
        updates = {}
        for arg in vocab.verbs[step.verb].args:
            box_field = arg + BOX_SUFFIX
            label = getattr(step, arg)
            if arg in vocab.label_args and getattr(step, box_field) is None and label in boxes_by_label:
                box, source = boxes_by_label[label]
                updates[box_field] = _to_box(box, codec, source)
        result.append(step.model_copy(update=updates) if updates else step)
    return result
