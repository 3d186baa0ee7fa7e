"""The package's messages build, import, mirror the pydantic contract and cross a real graph."""
import numpy as np
import pytest

from tests.ros_helpers import ros_context, spin_until, wait_for_subscribers  # noqa: F401

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402

from vla_node import actions  # noqa: E402
from vla_node import msg as vla_msg  # noqa: E402
from vla_node.ros.convert import msg_to_plan, msg_to_status, plan_to_msg, status_to_msg  # noqa: E402


def _ros_fields(message_type) -> list[str]:
    return list(message_type.get_fields_and_field_types())


def test_step_message_mirrors_pydantic_step_field_for_field():
    ros = _ros_fields(vla_msg.ActionStep)
    expected = []
    for name in actions.ActionStep.model_fields:
        if name.endswith("_box"):
            expected += [f"has_{name}", name]
        else:
            expected.append(name)
    assert ros == expected


def test_plan_status_latency_messages_mirror_pydantic_models():
    plan_fields = list(actions.ActionPlan.model_fields)
    assert plan_fields[:2] == ["stamp_ns", "frame_id"]  # carried by the ROS header
    assert _ros_fields(vla_msg.ActionPlan) == ["header"] + plan_fields[2:]
    assert _ros_fields(vla_msg.StageLatency) == list(actions.StageLatency.model_fields)
    status_fields = list(actions.CommandStatus.model_fields)
    assert status_fields[0] == "stamp_ns"
    assert _ros_fields(vla_msg.CommandStatus) == ["stamp"] + status_fields[1:4] + ["code_name"] + status_fields[4:]


def test_status_code_constants_match_the_contract():
    for code, number in actions.STATUS_CODE_NUMBERS.items():
        assert getattr(vla_msg.CommandStatus, code.value) == number
    assert set(actions.STATUS_CODE_NUMBERS) == set(actions.StatusCode)


def _sample_plan() -> actions.ActionPlan:
    return actions.ActionPlan(
        stamp_ns=1_700_000_000_123_456_789,
        frame_id="camera_optical",
        command_id="cmd-7",
        command_text="把红色方块放到蓝色碗里",
        steps=[
            actions.ActionStep(verb="MOVE_OBJECT", object="red cube", destination="blue bowl",
                               object_box=actions.Box(x_min=10, y_min=20.5, x_max=40, y_max=60),
                               confidence=0.75),
            actions.ActionStep(verb="CLARIFY", reason='which "cube"?', confidence=0.5),
        ],
        raw_text='MOVE_OBJECT(object="red cube", destination="blue bowl")',
        model_id="tabletop-tiny",
        adapter_id="zh@1234",
        latency=actions.StageLatency(queue_ms=1.5, decode_image_ms=2.25, preprocess_ms=3, generate_ms=400,
                                     parse_ms=0.5, total_ms=410),
    )


def test_conversion_round_trip_without_a_graph():
    plan = _sample_plan()
    assert msg_to_plan(plan_to_msg(plan)) == plan
    status = actions.CommandStatus(stamp_ns=5, command_id="c", command_text="t",
                                   code=actions.StatusCode.REJECTED_BY_POLICY, detail="rule")
    assert msg_to_status(status_to_msg(status)) == status


def test_plan_and_status_cross_a_real_rclpy_graph(ros_context):
    sender = rclpy.create_node("sender", context=ros_context)
    receiver = rclpy.create_node("receiver", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(sender)
    executor.add_node(receiver)
    plans, statuses = [], []
    receiver.create_subscription(vla_msg.ActionPlan, "/test/actions", plans.append, 10)
    receiver.create_subscription(vla_msg.CommandStatus, "/test/status", statuses.append, 10)
    plan_pub = sender.create_publisher(vla_msg.ActionPlan, "/test/actions", 10)
    status_pub = sender.create_publisher(vla_msg.CommandStatus, "/test/status", 10)
    wait_for_subscribers(executor, plan_pub)
    wait_for_subscribers(executor, status_pub)

    plan = _sample_plan()
    status = actions.CommandStatus(stamp_ns=42, command_id="cmd-7", command_text=plan.command_text,
                                   code=actions.StatusCode.ACCEPTED, detail="2 step(s)")
    plan_pub.publish(plan_to_msg(plan))
    status_pub.publish(status_to_msg(status))
    assert spin_until(executor, lambda: plans and statuses, 10.0)

    received = plans[0]
    assert isinstance(received, vla_msg.ActionPlan)
    assert received.header.frame_id == "camera_optical"
    assert received.steps[0].has_object_box and not received.steps[0].has_destination_box
    np.testing.assert_allclose(received.steps[0].object_box, [10, 20.5, 40, 60])
    assert msg_to_plan(received) == plan
    assert statuses[0].code == vla_msg.CommandStatus.ACCEPTED
    assert statuses[0].code_name == "ACCEPTED"
    assert msg_to_status(statuses[0]) == status
    executor.shutdown()
    sender.destroy_node()
    receiver.destroy_node()
