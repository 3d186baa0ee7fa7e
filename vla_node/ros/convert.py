"""Conversions between the pydantic contract (vla_node.actions) and the ROS messages.

Needs the generated `vla_node.msg` types (and sensor_msgs for images) but not rclpy, so
the replay tool and tests can use it with `rosbags`-decoded messages too: every function
here only reads/writes attributes.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from builtin_interfaces.msg import Time
from std_msgs.msg import Header

from vla_node import msg as vla_msg
from vla_node.actions import (
    STATUS_CODE_NUMBERS,
    ActionPlan,
    ActionStep,
    Box,
    CommandStatus,
    StageLatency,
    StatusCode,
)
from vla_node.image import compressed_to_rgb, image_to_rgb

_CODE_BY_NUMBER = {number: code for code, number in STATUS_CODE_NUMBERS.items()}
_LATENCY_FIELDS = tuple(StageLatency.model_fields)


def ns_to_time(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def time_to_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _box_to_array(box: Box | None) -> tuple[bool, list[float]]:
    if box is None:
        return False, [0.0, 0.0, 0.0, 0.0]
    return True, [box.x_min, box.y_min, box.x_max, box.y_max]


def _array_to_box(present: bool, values: Any) -> Box | None:
    if not present:
        return None
    x_min, y_min, x_max, y_max = (float(v) for v in values)
    return Box(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max)


def step_to_msg(step: ActionStep) -> vla_msg.ActionStep:
    has_object_box, object_box = _box_to_array(step.object_box)
    has_destination_box, destination_box = _box_to_array(step.destination_box)
    return vla_msg.ActionStep(
        verb=step.verb,
        object=step.object,
        destination=step.destination,
        reason=step.reason,
        has_object_box=has_object_box,
        object_box=np.asarray(object_box, dtype=np.float32),
        has_destination_box=has_destination_box,
        destination_box=np.asarray(destination_box, dtype=np.float32),
        confidence=float(step.confidence),
    )


def msg_to_step(message: Any) -> ActionStep:
    return ActionStep(
        verb=message.verb,
        object=message.object,
        destination=message.destination,
        reason=message.reason,
        object_box=_array_to_box(message.has_object_box, message.object_box),
        destination_box=_array_to_box(message.has_destination_box, message.destination_box),
        confidence=float(message.confidence),
    )


def plan_to_msg(plan: ActionPlan) -> vla_msg.ActionPlan:
    message = vla_msg.ActionPlan(
        header=Header(stamp=ns_to_time(plan.stamp_ns), frame_id=plan.frame_id),
        command_id=plan.command_id,
        command_text=plan.command_text,
        steps=[step_to_msg(step) for step in plan.steps],
        raw_text=plan.raw_text,
        model_id=plan.model_id,
        adapter_id=plan.adapter_id,
    )
    for name in _LATENCY_FIELDS:
        setattr(message.latency, name, float(getattr(plan.latency, name)))
    return message


def msg_to_plan(message: Any) -> ActionPlan:
    return ActionPlan(
        stamp_ns=time_to_ns(message.header.stamp),
        frame_id=message.header.frame_id,
        command_id=message.command_id,
        command_text=message.command_text,
        steps=[msg_to_step(step) for step in message.steps],
        raw_text=message.raw_text,
        model_id=message.model_id,
        adapter_id=message.adapter_id,
        latency=StageLatency(**{name: float(getattr(message.latency, name)) for name in _LATENCY_FIELDS}),
    )


def status_to_msg(status: CommandStatus) -> vla_msg.CommandStatus:
    return vla_msg.CommandStatus(
        stamp=ns_to_time(status.stamp_ns),
        command_id=status.command_id,
        command_text=status.command_text,
        code=STATUS_CODE_NUMBERS[status.code],
        code_name=status.code.value,
        detail=status.detail,
    )


def msg_to_status(message: Any) -> CommandStatus:
    return CommandStatus(
        stamp_ns=time_to_ns(message.stamp),
        command_id=message.command_id,
        command_text=message.command_text,
        code=_CODE_BY_NUMBER.get(int(message.code), StatusCode(message.code_name)),
        detail=message.detail,
    )


def image_decoder(message: Any) -> Callable[[], np.ndarray]:
    """A closure that decodes a sensor_msgs Image or CompressedImage when called.

    Nothing is decoded here: the node keeps the latest frames and decodes only the one a
    command needs.
    """
    if hasattr(message, "encoding"):
        return lambda: image_to_rgb(message.width, message.height, message.encoding,
                                    bool(message.is_bigendian), message.step, message.data)
    return lambda: compressed_to_rgb(message.format, message.data)
