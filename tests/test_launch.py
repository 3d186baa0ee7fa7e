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


def _parameters(node, context) -> list:
    """What launch_ros itself turns the node's parameters into (files, then the values it writes)."""
    return launch_ros.utilities.evaluate_parameters(
        context, launch_ros.utilities.normalize_parameters(node.launch_kwargs["parameters"]))


def test_arguments_become_parameters_only_when_given():
    context = launch.LaunchContext()
    node, exit_handler = _nodes({"model_path": "/models/qwen", "adapter_path": "/adapters/zh",
                                 "camera_topic": "/robot1/cam", "namespace": "robot1",
                                 "camera_reliability": "reliable", "log_level": "debug"}, context)
    assert isinstance(node, launch_ros.actions.Node)
    assert isinstance(exit_handler, launch.actions.RegisterEventHandler)
    overrides = _parameters(node, context)[-1]
    assert dict(overrides, adapters=list(overrides["adapters"])) == {
        "model_path": "/models/qwen", "adapters": ["launch=/adapters/zh"], "active_adapter": "launch",
        "camera_reliability": "reliable", "camera_topic": "/robot1/cam"}
    assert not node.launch_kwargs.get("remappings"), "no internal topic names to remap onto"
    assert node.launch_kwargs["namespace"] == "robot1"
    assert node.launch_kwargs["ros_arguments"] == ["--log-level", "robot1.vla_node:=debug"], "the node's logger only"


def test_a_params_file_topic_is_kept_unless_a_launch_argument_is_given(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("/**:\n  ros__parameters:\n    camera_topic: /from/yaml/image\n"
                      "    action_topic: /from/yaml/actions\n", encoding="utf-8")
    context = launch.LaunchContext()
    node, _ = _nodes({"params_file": str(params), "action_topic": "/from/launch/actions"}, context)
    files, overrides = _parameters(node, context)
    assert str(files) == str(params)
    assert overrides == {"action_topic": "/from/launch/actions"}, "only the given argument overrides the file"
    assert node.launch_kwargs["ros_arguments"] is None, "no log_level given: rcl's levels stay as they are"


def test_lifecycle_argument_starts_a_managed_node():
    node, _ = _nodes({"lifecycle": "true"})
    assert isinstance(node, launch_ros.actions.LifecycleNode)
