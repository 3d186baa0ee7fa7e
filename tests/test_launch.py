"""robot.launch.py loads and wires arguments -> parameters and remappings (needs launch_ros)."""
import importlib.util
from pathlib import Path

import pytest

launch = pytest.importorskip("launch", reason="launch is not installed (not on PyPI; use a ROS 2 install)")
launch_ros = pytest.importorskip("launch_ros", reason="launch_ros is not installed (not on PyPI; use a ROS 2 install)")

LAUNCH_FILE = Path(__file__).resolve().parent.parent / "launch" / "robot.launch.py"


class _Recorded:
    """Mixin: keep the keyword arguments the launch file passed (launch_ros stores them privately)."""

    def __init__(self, **kwargs):
        self.launch_kwargs = kwargs
        super().__init__(**kwargs)


def _description():
    spec = importlib.util.spec_from_file_location("robot_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Still the real launch_ros classes (isinstance holds), recording their constructor arguments.
    module.Node = type("Node", (_Recorded, launch_ros.actions.Node), {})
    module.LifecycleNode = type("LifecycleNode", (_Recorded, launch_ros.actions.LifecycleNode), {})
    return module.generate_launch_description()


def _nodes(arguments: dict, context=None):
    description = _description()
    context = launch.LaunchContext() if context is None else context
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
    assert {"model_path", "adapter_path", "device", "camera_topic", "camera_transport", "camera_reliability",
            "speech_topic", "action_topic", "params_file", "namespace", "log_level"} <= names


def test_arguments_become_parameters_and_remappings():
    context = launch.LaunchContext()
    (node,) = _nodes({"model_path": "/models/qwen", "adapter_path": "/adapters/zh",
                      "camera_topic": "/robot1/cam", "namespace": "robot1", "camera_reliability": "reliable"},
                     context)
    assert isinstance(node, launch_ros.actions.Node)
    # What launch_ros itself turns the parameters into (the values written to its params file).
    parameters = launch_ros.utilities.evaluate_parameters(
        context, launch_ros.utilities.normalize_parameters(node.launch_kwargs["parameters"]))
    overrides = parameters[-1]
    assert overrides["model_path"] == "/models/qwen"
    assert list(overrides["adapters"]) == ["launch=/adapters/zh"]
    assert overrides["active_adapter"] == "launch"
    assert overrides["camera_reliability"] == "reliable"
    assert ("camera/image", "/robot1/cam") in node.launch_kwargs["remappings"]
    assert node.launch_kwargs["namespace"] == "robot1"


def test_lifecycle_argument_starts_a_managed_node():
    (node,) = _nodes({"lifecycle": "true"})
    assert isinstance(node, launch_ros.actions.LifecycleNode)
