"""vla-replay's rclpy side: an isolated context, the optional in-process vla node, the client
node that publishes the bag's camera and speech messages and records the node's answers, and
one executor thread.

The replay logic (timing, matching statuses to commands, reports) lives in vla_node.replay,
which imports this module only when a replay starts (so `vla-replay --help` needs no rclpy).
"""
from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager
from typing import Any

import rclpy
import rclpy.logging
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from vla_node import msg as vla_msg
from vla_node.ros.convert import msg_to_plan, msg_to_status
from vla_node.ros.node import VlaNode


class SessionError(Exception):
    """The ROS side cannot run: the node does not start, or its topics never connect."""


@contextmanager
def localhost_discovery():
    """Localhost-only discovery while the isolated context and its nodes are created."""
    saved = {k: os.environ.get(k) for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_STATIC_PEERS")}
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_STATIC_PEERS"] = ""
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def domain_is_quiet(domain: int, wait_s: float = 0.3) -> bool:
    """True when no other node shows up on `domain` within wait_s (localhost discovery)."""
    context = Context()
    rclpy.init(args=["vla_replay"], context=context, domain_id=domain)
    try:
        probe = rclpy.create_node("vla_replay_probe", context=context, enable_rosout=False,
                                  start_parameter_services=False, use_global_arguments=False)
        try:
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if len(probe.get_node_names()) > 1:
                    return False
                time.sleep(0.05)
            return True
        finally:
            probe.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def pick_free_domain(rng: random.Random | None = None, tries: int = 8) -> int:
    """A random ROS domain in 10..99 on which no other node is seen (localhost discovery)."""
    rng = rng or random.Random()
    candidates = rng.sample(range(10, 100), tries)
    for domain in candidates:
        if domain_is_quiet(domain):
            return domain
    return candidates[-1]


class ReplaySession:
    """Context, optional in-process VlaNode, the replay client node, one executor thread.

    `options` is a vla_node.replay.ReplayOptions, `info` the bag's BagInfo; `parameters` the
    in-process node's parameters (ignored with options.external); `tracker` receives plans and
    statuses (and a failure of the executor); `output` records the raw answers (its topics
    already added).
    """

    def __init__(self, options, info, parameters: dict[str, Any], tracker, output):
        self.options = options
        self.info = info
        self.parameters = parameters
        self.tracker = tracker
        self.output = output
        self.context: Context | None = None
        self.vla: VlaNode | None = None
        self.client = None
        self.executor: SingleThreadedExecutor | None = None
        self.thread: threading.Thread | None = None
        self.domain_id: int | None = None
        self.served_by = None  # the in-process node's backend (None with --external)
        self.max_image_age_s: float | None = None  # known for the in-process node only
        self.camera_type = CompressedImage if info.compressed else Image

    # --------------------------------------------------------------- start / stop
    def start(self) -> None:
        self.context = Context()
        if self.options.external:
            rclpy.init(args=["vla_replay"], context=self.context)
            self._start_client()
        else:
            with localhost_discovery():
                self.domain_id = pick_free_domain()
                rclpy.init(args=["vla_replay"], context=self.context, domain_id=self.domain_id)
                self._start_vla_node()
                self._start_client()
        self.domain_id = self.context.get_domain_id()
        self._wait_for_connections()

    def _start_vla_node(self) -> None:
        overrides = [Parameter(name, value=value) for name, value in self.parameters.items()]
        if not self.options.verbose:
            rclpy.logging.set_logger_level("vla_node", rclpy.logging.LoggingSeverity.ERROR)
        try:
            self.vla = VlaNode("vla_node", context=self.context, parameter_overrides=overrides,
                               use_global_arguments=False)
        except Exception as error:
            raise SessionError(f"cannot start the vla node: {type(error).__name__}: {error}") from None
        self.max_image_age_s = float(self.vla.get_parameter("max_image_age_s").value)
        self.served_by = self.vla.runtime.core.backend

    def _start_client(self) -> None:
        reliable = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE,
                              durability=QoSDurabilityPolicy.VOLATILE)
        options = self.options
        node = rclpy.create_node("vla_replay", context=self.context, use_global_arguments=False,
                                 start_parameter_services=False)
        self.client = node
        camera_topic = (options.to_camera_topic if options.external else None) or self.info.camera_topic
        speech_topic = (options.to_speech_topic if options.external else None) or self.info.speech_topic
        self.camera_pub = node.create_publisher(self.camera_type, camera_topic, 10)
        self.speech_pub = node.create_publisher(String, speech_topic, reliable)
        self.plan_sub = node.create_subscription(vla_msg.ActionPlan, options.action_topic, self._on_plan,
                                                 reliable, raw=True)
        self.status_sub = node.create_subscription(vla_msg.CommandStatus, options.status_topic,
                                                   self._on_status, reliable, raw=True)
        self.executor = SingleThreadedExecutor(context=self.context)
        if self.vla is not None:
            self.executor.add_node(self.vla)
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self._spin, name="vla-replay-executor", daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception as error:  # shutdown races end the spin; anything else ends the replay
            if self.context is not None and self.context.ok():
                self.tracker.fail(f"the ROS executor stopped: {type(error).__name__}: {error}")

    def _wait_for_connections(self) -> None:
        checks = {
            f"a subscriber of {self.camera_pub.topic_name} ({self.camera_type.__name__})":
                lambda: self.camera_pub.get_subscription_count() >= 1,
            f"a subscriber of {self.speech_pub.topic_name} (String)":
                lambda: self.speech_pub.get_subscription_count() >= 1,
            f"a publisher of {self.status_sub.topic_name} (CommandStatus)":
                lambda: self.status_sub.get_publisher_count() >= 1,
            f"a publisher of {self.plan_sub.topic_name} (ActionPlan)":
                lambda: self.plan_sub.get_publisher_count() >= 1,
        }
        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline and not all(check() for check in checks.values()):
            time.sleep(0.02)
        missing = [what for what, check in checks.items() if not check()]
        if missing:
            where = (f"on ROS domain {self.domain_id} (ROS_DOMAIN_ID)" if self.options.external
                     else "from the in-process node")
            raise SessionError(f"no {'; no '.join(missing)} {where} within {self.options.startup_timeout_s} s"
                               + ("; is the vla node running there, with these topics and camera_transport?"
                                  if self.options.external else ""))
        time.sleep(0.1)  # let the reliable readers finish their handshake

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(timeout_sec=5.0)
        if self.thread is not None:
            self.thread.join(timeout=5.0)
        if self.vla is not None:
            try:
                self.vla.shutdown()
            finally:
                self.vla.destroy_node()
            self.vla = None
        if self.client is not None:
            self.client.destroy_node()
            self.client = None
        if self.context is not None:
            rclpy.try_shutdown(context=self.context)
            self.context = None

    # --------------------------------------------------------------- publishing (replay thread)
    def deserialize_camera(self, raw: bytes):
        return deserialize_message(raw, self.camera_type)

    def publish_camera(self, message) -> None:
        self.camera_pub.publish(message)

    def publish_command(self, text: str) -> None:
        self.speech_pub.publish(String(data=text))

    # --------------------------------------------------------------- callbacks (executor thread)
    def _on_plan(self, raw: bytes) -> None:
        self.output.write(self.options.action_topic, time.time_ns(), raw)
        self.tracker.on_plan(msg_to_plan(deserialize_message(raw, vla_msg.ActionPlan)))

    def _on_status(self, raw: bytes) -> None:
        now = time.time_ns()
        self.output.write(self.options.status_topic, now, raw)
        self.tracker.on_status(msg_to_status(deserialize_message(raw, vla_msg.CommandStatus)), now)
