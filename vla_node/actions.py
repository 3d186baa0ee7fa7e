"""The action contract: pydantic models mirrored by msg/*.msg, and the canonical action text.

Canonical text (what the model is trained to emit), one action per line:

    MOVE_OBJECT(object="red cube", destination="blue bowl")
    PICK_OBJECT(object="green ball", object_box=[12, 40, 88, 120])
    STOP()
    CLARIFY(reason="no red cube is visible")

Values are JSON strings (Chinese kept readable); boxes are integers in the model's own
coordinate convention (see parser.BoxCodec) and follow their argument; confidence is never rendered.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Mapping, Optional, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BOX_SUFFIX = "_box"


class ActionError(ValueError):
    """A step that does not fit the vocabulary; the message names the exact problem."""


class StatusCode(str, enum.Enum):
    ACCEPTED = "ACCEPTED"
    NO_IMAGE = "NO_IMAGE"
    STALE_IMAGE = "STALE_IMAGE"
    BAD_IMAGE = "BAD_IMAGE"
    BAD_COMMAND = "BAD_COMMAND"
    BUSY = "BUSY"
    CANCELLED = "CANCELLED"
    PARSE_ERROR = "PARSE_ERROR"
    REJECTED_BY_POLICY = "REJECTED_BY_POLICY"
    BACKEND_ERROR = "BACKEND_ERROR"
    TIMEOUT = "TIMEOUT"
    STOPPED = "STOPPED"


# The uint8 constants of msg/CommandStatus.msg; declaration order above is the numbering.
STATUS_CODE_NUMBERS: dict[StatusCode, int] = {code: number for number, code in enumerate(StatusCode)}


class _Strict(BaseModel):
    # extra="forbid": a misspelt field is an error, not silently dropped data.
    model_config = ConfigDict(extra="forbid")


class Box(_Strict):
    """Pixels of the ORIGINAL camera image, x right, y down."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @model_validator(mode="after")
    def _ordered_and_finite(self) -> "Box":
        values = (self.x_min, self.y_min, self.x_max, self.y_max)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"box coordinates must be finite, got {list(values)}")
        if self.x_min > self.x_max or self.y_min > self.y_max:
            raise ValueError(f"box must have x_min<=x_max and y_min<=y_max, got {list(values)}")
        return self

    def as_list(self) -> list[float]:
        return [self.x_min, self.y_min, self.x_max, self.y_max]


def box_iou(a: Box | list[float], b: Box | list[float]) -> float:
    """Intersection over union of two axis-aligned boxes (Box, or [x1, y1, x2, y2] with the
    corners in any order). Identical boxes give 1.0, also empty ones (a point matches itself);
    otherwise no overlap, or no area at all, gives 0.0."""
    ax1, ay1, ax2, ay2 = _corners(a)
    bx1, by1, bx2, by2 = _corners(b)
    if (ax1, ay1, ax2, ay2) == (bx1, by1, bx2, by2):
        return 1.0
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _corners(box: Box | list[float]) -> tuple[float, float, float, float]:
    values = (box.x_min, box.y_min, box.x_max, box.y_max) if hasattr(box, "x_min") else box
    x1, y1, x2, y2 = (float(v) for v in values)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


class ActionStep(_Strict):
    """Mirrors msg/ActionStep.msg field for field (boxes: None <-> has_*_box false)."""

    verb: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")
    object: str = ""
    destination: str = ""
    reason: str = ""
    object_box: Optional[Box] = None
    destination_box: Optional[Box] = None
    confidence: float = Field(default=1.0, ge=0.0, le=1.0)


# Step fields that carry an argument value; the vocabulary's args must be among them.
STEP_ARGUMENT_FIELDS = ("object", "destination", "reason")


class StageLatency(_Strict):
    """Mirrors msg/StageLatency.msg (milliseconds)."""

    queue_ms: float = 0.0
    decode_image_ms: float = 0.0
    preprocess_ms: float = 0.0
    generate_ms: float = 0.0
    parse_ms: float = 0.0
    total_ms: float = 0.0


class ActionPlan(_Strict):
    """Mirrors msg/ActionPlan.msg; the ROS layer turns stamp_ns + frame_id into the header."""

    stamp_ns: int = 0
    frame_id: str = ""
    command_id: str
    command_text: str
    steps: list[ActionStep]
    raw_text: str = ""
    model_id: str = ""
    adapter_id: str = ""
    latency: StageLatency = Field(default_factory=StageLatency)


class CommandStatus(_Strict):
    """Mirrors msg/CommandStatus.msg (code_name there is code.value here)."""

    stamp_ns: int = 0
    command_id: str
    command_text: str = ""
    code: StatusCode
    detail: str = ""

    @field_validator("code", mode="before")
    @classmethod
    def _code_from_number(cls, value):
        # Accept the msg's uint8 too, so vla_node.ros.convert can round-trip without a lookup table.
        if isinstance(value, int) and not isinstance(value, bool):
            for code, number in STATUS_CODE_NUMBERS.items():
                if number == value:
                    return code
            raise ValueError(f"unknown status code number {value}")
        return value

    @property
    def code_number(self) -> int:
        return STATUS_CODE_NUMBERS[self.code]


# What rendering needs from the vocabulary and the box codec. Named here as protocols because
# vla_node.vocabulary and vla_node.parser build on this module, not the other way round.
class StepVocabulary(Protocol):
    """vla_node.vocabulary.Vocabulary: verb specs (their `args`), the box-carrying arguments."""

    verbs: Mapping[str, Any]
    label_args: tuple[str, ...]

    def validate_step(self, step: ActionStep) -> ActionStep: ...


class ModelBoxes(Protocol):
    """vla_node.parser.BoxCodec: a box in original pixels -> the model's integers."""

    def to_model(self, box: Box) -> list[int]: ...


def render_step(step: ActionStep, vocab: StepVocabulary, boxes: ModelBoxes | None = None) -> str:
    """One canonical line. Boxes go through `boxes.to_model`; without a codec they are rounded pixels.

    The step is validated first (ActionError), so training targets can never hold an invalid action.
    """
    step = vocab.validate_step(step)
    spec = vocab.verbs[step.verb]
    parts = []
    for arg in spec.args:
        parts.append(f"{arg}={json.dumps(getattr(step, arg), ensure_ascii=False)}")
        box = getattr(step, arg + BOX_SUFFIX, None) if arg in vocab.label_args else None
        if box is not None:
            numbers = boxes.to_model(box) if boxes is not None else [round(v) for v in box.as_list()]
            parts.append(f"{arg}{BOX_SUFFIX}=[{', '.join(str(int(n)) for n in numbers)}]")
    return f"{step.verb}({', '.join(parts)})"


def render_steps(steps: list[ActionStep], vocab: StepVocabulary, boxes: ModelBoxes | None = None) -> str:
    """Canonical lines; vla_node.parser.parse_actions reads them back (parse(render(a)) == a)."""
    return "\n".join(render_step(step, vocab, boxes) for step in steps)
