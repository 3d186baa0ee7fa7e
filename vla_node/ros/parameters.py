"""The node's parameters in ROS: declared from their one declaration (vla_node.settings) with
descriptors, and the topic convention.

Topic convention: a topic parameter (camera_topic, speech_topic, action_topic, status_topic,
debug_image_topic) is set like any parameter (params file, launch argument, -p) and may be
relative; remaps apply to it like to any topic name. Once the node exists it holds the full name
the node uses (namespace and remaps applied), so `ros2 param get /robot7/vla_node camera_topic`
answers /robot7/camera/image_raw: the parameter and the graph never disagree.
"""
from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.node import Node

from vla_node.settings import PARAMETERS, NodeParameter, ParameterError, default

_ROS_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
              float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
              list: ParameterType.PARAMETER_STRING_ARRAY}


def descriptor(parameter: NodeParameter, read_only: bool | None = None) -> ParameterDescriptor:
    return ParameterDescriptor(name=parameter.name, type=_ROS_TYPES[parameter.type],
                               description=parameter.description, additional_constraints=parameter.range_text(),
                               read_only=(not parameter.runtime) if read_only is None else read_only)


def declare_all(node: Node) -> dict[str, str]:
    """Declare every parameter (overrides from params files, launch and -p apply); topic
    parameters end up holding their resolved names. Returns the topic names as given, which the
    node creates its publishers and subscriptions with (rcl then applies the remaps, once).
    Raises ParameterError for a bad topic name."""
    given: dict[str, str] = {}
    for parameter in PARAMETERS.values():
        if parameter.topic:
            given[parameter.name] = _declare_topic(node, parameter)
        else:
            node.declare_parameter(parameter.name, default(parameter.name), descriptor(parameter))
    return given


def _declare_topic(node: Node, parameter: NodeParameter) -> str:
    # Read-only parameters cannot be set, not even by their node: take the given value writable,
    # then declare it again, read-only, with the resolved name (public rclpy API since Humble).
    given: Any = node.declare_parameter(parameter.name, parameter.default,
                                        descriptor(parameter, read_only=False)).value
    try:
        resolved = node.resolve_topic_name(given)
    except Exception as error:  # rclpy's InvalidTopicNameException and kin
        raise ParameterError(f"{parameter.name}: {given!r} is not a valid topic name: "
                             f"{str(error).splitlines()[0]}") from None
    node.undeclare_parameter(parameter.name)
    node.declare_parameter(parameter.name, resolved, descriptor(parameter), ignore_override=True)
    return given
