"""robot.launch.py loads and wires arguments -> parameters and remappings (needs launch_ros)."""
import importlib.util
from pathlib import Path

import pytest

launch = pytest.importorskip("launch", reason="launch is not installed (not on PyPI; use a ROS 2 install)")
launch_ros = pytest.importorskip("launch_ros", reason="launch_ros is not installed (not on PyPI; use a ROS 2 install)")

LAUNCH_FILE = Path(__file__).resolve().parent.parent / "launch" / "robot.launch.py"


def _description():
    spec = importlib.util.spec_from_file_location("robot_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_launch_description()


def _nodes(arguments: dict):
    description = _description()
    context = launch.LaunchContext()
    for name, value in arguments.items():
        context.launch_configurations[name] = value
    entities = []
    for entity in description.entities:
        if isinstance(entity, launch.actions.DeclareLaunchArgument):
            if entity.name not in context.launch_configurations:
                context.launch_configurations[entity.name] = launch.utilities.perform_substitutions(
                    context, entity.default_value)
        elif isinstance(entity, launch.actions.OpaqueFunction):
            entities += entity.execute(context) or []
    return entities


def test_declares_every_documented_argument():
    names = {e.name for e in _description().entities if isinstance(e, launch.actions.DeclareLaunchArgument)}
    assert {"model_path", "adapter_path", "device", "camera_topic", "speech_topic", "action_topic",
            "params_file", "namespace", "log_level"} <= names


def test_arguments_become_parameters_and_remappings():
    (node,) = _nodes({"model_path": "/models/qwen", "adapter_path": "/adapters/zh",
                      "camera_topic": "/robot1/cam", "namespace": "robot1"})
    assert isinstance(node, launch_ros.actions.Node)
    overrides = node._Node__parameters[-1]
    assert overrides["model_path"] == "/models/qwen"
    assert overrides["adapters"] == ["launch=/adapters/zh"]
    assert overrides["active_adapter"] == "launch"
    assert ("camera/image", "/robot1/cam") in node._Node__remappings


def test_lifecycle_argument_starts_a_managed_node():
    (node,) = _nodes({"lifecycle": "true"})
    assert isinstance(node, launch_ros.actions.LifecycleNode)
