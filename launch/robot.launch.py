"""Start the vla node: `ros2 launch vla_node robot.launch.py model_path:=DIR adapter_path:=DIR`.

Parameters combine the ROS way: config/vla_node.yaml (or the file given as params_file), then
the launch arguments that are GIVEN (an argument left at '' keeps the file's value). Topic
arguments set the topic parameters (relative names resolve in `namespace`); the node then holds
the full names it uses. A node that cannot start ends the launch with a non-zero exit status.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

SHARE = get_package_share_directory("vla_node")
GIVEN_ONLY = "'' = the params_file value"

# name: (default, description); parameters listed in PARAMETER_ARGUMENTS are passed only when not ''
ARGUMENTS = {
    "model_path": ("", f"Local Qwen-VL checkpoint directory ({GIVEN_ONLY}: embedded tabletop-tiny model)"),
    "adapter_path": ("", "LoRA adapter directory to load and activate ('' = none)"),
    "adapter_name": ("launch", "Name of adapter_path; backend openai: the server's LoRA module name"),
    "device": ("", f"auto | cpu | cuda | cuda:N ({GIVEN_ONLY})"),
    "backend": ("", f"transformers | onnx | openai ({GIVEN_ONLY})"),
    "server_url": ("", "backend openai: server base URL, e.g. http://gpu-host:8000/v1"),
    "server_model": ("", "backend openai: served base model name"),
    "api_key_env": ("", "backend openai: environment variable holding the API key"),
    "camera_topic": ("", f"Camera topic ({GIVEN_ONLY}: camera/image_raw)"),
    "camera_transport": ("", f"raw (sensor_msgs/Image) | compressed (sensor_msgs/CompressedImage) ({GIVEN_ONLY})"),
    "camera_reliability": ("", f"auto | best_effort | reliable ({GIVEN_ONLY})"),
    "speech_topic": ("", f"Transcribed speech topic, std_msgs/String ({GIVEN_ONLY}: speech/text)"),
    "action_topic": ("", f"Action plan output topic ({GIVEN_ONLY}: vla/actions)"),
    "status_topic": ("", f"Command status output topic ({GIVEN_ONLY}: vla/status)"),
    "debug_image_topic": ("", f"Annotated frame output topic ({GIVEN_ONLY}: vla/debug_image)"),
    "params_file": (os.path.join(SHARE, "config", "vla_node.yaml"), "Node parameters YAML"),
    "namespace": ("", "Namespace for the node (one per robot/camera)"),
    "log_level": ("", "The node's log level: debug | info | warn | error ('' = info); rcl's own stays as it is"),
    "lifecycle": ("false", "true: start as a managed node (configure/activate driven externally)"),
}
PARAMETER_ARGUMENTS = ("model_path", "device", "backend", "server_url", "server_model", "api_key_env",
                       "camera_topic", "camera_transport", "camera_reliability", "speech_topic", "action_topic",
                       "status_topic", "debug_image_topic")


def _node(context, *args, **kwargs):
    value = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    overrides = {name: value[name] for name in PARAMETER_ARGUMENTS if value[name]}
    if value["adapter_path"]:
        overrides["adapters"] = [f"{value['adapter_name']}={value['adapter_path']}"]
        overrides["active_adapter"] = value["adapter_name"]
    lifecycle = value["lifecycle"].lower() in ("1", "true", "yes")
    namespace = value["namespace"].strip("/")
    # --log-level NAME:=LEVEL sets one logger: the node's (named after namespace and node), not rcl's
    logger = ".".join(part for part in namespace.split("/") + ["vla_node"] if part)
    common = dict(
        package="vla_node",
        executable="vla_node",
        name="vla_node",
        namespace=namespace,
        output="screen",
        parameters=[value["params_file"], overrides],
        arguments=["--lifecycle"] if lifecycle else [],
        ros_arguments=["--log-level", f"{logger}:={value['log_level']}"] if value["log_level"] else None,
    )
    node = LifecycleNode(**common) if lifecycle else Node(**common)
    return [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_fail_launch_if_failed))]


def _fail_launch_if_failed(event, context):
    """launch exits 0 unless an action raises: a node that dies on its own (e.g. cannot start: its
    reason is in the log above) must give `ros2 launch` a non-zero status for scripts and systemd."""
    if event.returncode != 0 and not context.is_shutdown:
        raise RuntimeError(f"{event.action.name} exited with code {event.returncode}")


def generate_launch_description():
    declared = [DeclareLaunchArgument(name, default_value=default, description=description)
                for name, (default, description) in ARGUMENTS.items()]
    return LaunchDescription(declared + [OpaqueFunction(function=_node)])
