"""`ros2 launch vla_node robot.launch.py` for real (needs ros2cli + launch_ros: skipped without them,
as in CI): a params-file topic is used and a launch argument overrides another; a node that
cannot start makes the launch exit non-zero; Ctrl-C ends it cleanly."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("launch_ros", reason="launch_ros is not installed (not on PyPI; use a ROS 2 install)")
pytest.importorskip("ros2launch", reason="ros2launch is not installed (not on PyPI; use a ROS 2 install)")
ROS2 = shutil.which("ros2")
pytestmark = pytest.mark.skipif(ROS2 is None, reason="no ros2 command on PATH")

from tests.fixtures_models import tiny_checkpoints, tiny_model_dir, tiny_qwen2_5_vl  # noqa: E402,F401
from tests.ros_helpers import ros_context  # noqa: E402,F401


def _launch(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen([ROS2, "launch", "vla_node", "robot.launch.py", *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=dict(os.environ))


def test_a_node_that_cannot_start_fails_the_launch(tmp_path):
    run = subprocess.run([ROS2, "launch", "vla_node", "robot.launch.py", f"model_path:={tmp_path / 'missing'}"],
                         capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode != 0, log
    assert "cannot start: model directory" in log and "[FATAL]" in log, "the reason, through the ROS logger"
    assert "exited with code 1" in log


def test_params_file_topics_and_a_launch_argument_reach_the_running_node(ros_context, tiny_model_dir, tmp_path):
    import rclpy

    params = tmp_path / "params.yaml"
    params.write_text(f"/**:\n  ros__parameters:\n    model_path: {tiny_model_dir}\n    warmup: false\n"
                      "    camera_topic: /from/yaml/image\n    action_topic: /from/yaml/actions\n",
                      encoding="utf-8")
    launch = _launch(f"params_file:={params}", "action_topic:=/from/launch/actions", "namespace:=robot7")
    probe = rclpy.create_node("launch_probe", context=ros_context)
    try:
        deadline = time.monotonic() + 240
        subscribed: set[str] = set()
        published: set[str] = set()
        while time.monotonic() < deadline and launch.poll() is None:
            if ("vla_node", "/robot7") in probe.get_node_names_and_namespaces():
                subscribed = {n for n, _ in probe.get_subscriber_names_and_types_by_node("vla_node", "/robot7")}
                published = {n for n, _ in probe.get_publisher_names_and_types_by_node("vla_node", "/robot7")}
                if "/from/launch/actions" in published:
                    break
            time.sleep(0.5)
        assert launch.poll() is None, f"the launch ended early:\n{launch.communicate()[0]}"
        assert "/from/yaml/image" in subscribed and "/robot7/speech/text" in subscribed, subscribed
        assert "/from/launch/actions" in published and "/from/yaml/actions" not in published, published
        os.killpg(launch.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        output, _ = launch.communicate(timeout=60)
        assert launch.returncode == 0, output
        assert "process has finished cleanly" in output
        assert "Loading weights" not in output and "Warning" not in output, "no progress bars or library warnings"
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
        probe.destroy_node()
