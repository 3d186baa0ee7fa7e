"""Start the vla node: `ros2 launch vla_node robot.launch.py model_path:=DIR adapter_path:=DIR`.

Launch arguments override config/vla_node.yaml (or the file given as params_file).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

SHARE = get_package_share_directory("vla_node")

ARGUMENTS = {
    "model_path": ("", "Local Qwen-VL checkpoint directory ('' = embedded tabletop-tiny model)"),
    "adapter_path": ("", "LoRA adapter directory to load and activate ('' = none)"),
    "adapter_name": ("launch", "Name of adapter_path; backend openai: the server's LoRA module name"),
    "device": ("auto", "auto | cpu | cuda | cuda:N"),
    "backend": ("", "transformers | openai ('' = params_file value)"),
    "server_url": ("", "backend openai: server base URL, e.g. http://gpu-host:8000/v1"),
    "server_model": ("", "backend openai: served base model name"),
    "api_key_env": ("", "backend openai: environment variable holding the API key"),
    "camera_topic": ("camera/image_raw", "Camera topic (remapped onto the node's camera input)"),
    "camera_transport": ("raw", "raw (sensor_msgs/Image) | compressed (sensor_msgs/CompressedImage)"),
    "camera_reliability": ("auto", "auto (reliable unless a camera publisher is best effort) | best_effort | reliable"),
    "speech_topic": ("speech/text", "Transcribed speech topic (std_msgs/String)"),
    "action_topic": ("vla/actions", "Action plan output topic"),
    "status_topic": ("vla/status", "Command status output topic"),
    "params_file": (os.path.join(SHARE, "config", "vla_node.yaml"), "Node parameters YAML"),
    "namespace": ("", "Namespace for the node (one per robot/camera)"),
    "log_level": ("info", "debug | info | warn | error"),
    "lifecycle": ("false", "true: start as a managed node (configure/activate driven externally)"),
}


def _node(context, *args, **kwargs):
    value = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    overrides = {
        "device": value["device"],
        "camera_transport": value["camera_transport"],
        "camera_reliability": value["camera_reliability"],
        # The node reads fixed internal names; the user's topics are remapped onto them.
        "camera_topic": "camera/image",
        "speech_topic": "speech/text",
        "action_topic": value["action_topic"],
        "status_topic": value["status_topic"],
    }
    if value["model_path"]:
        overrides["model_path"] = value["model_path"]
    for name in ("backend", "server_url", "server_model", "api_key_env"):
        if value[name]:
            overrides[name] = value[name]
    if value["adapter_path"]:
        overrides["adapters"] = [f"{value['adapter_name']}={value['adapter_path']}"]
        overrides["active_adapter"] = value["adapter_name"]
    lifecycle = value["lifecycle"].lower() in ("1", "true", "yes")
    common = dict(
        package="vla_node",
        executable="vla_node",
        name="vla_node",
        namespace=value["namespace"],
        output="screen",
        parameters=[value["params_file"], overrides],
        remappings=[("camera/image", value["camera_topic"]), ("speech/text", value["speech_topic"])],
        arguments=["--lifecycle"] if lifecycle else [],
        ros_arguments=["--log-level", value["log_level"]],
    )
    return [LifecycleNode(**common) if lifecycle else Node(**common)]


def generate_launch_description():
    declared = [DeclareLaunchArgument(name, default_value=default, description=description)
                for name, (default, description) in ARGUMENTS.items()]
    return LaunchDescription(declared + [OpaqueFunction(function=_node)])
