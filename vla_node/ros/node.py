"""The ROS 2 node.

Camera (Image or CompressedImage) + speech (String) in; ActionPlan on the action topic and
one CommandStatus per command on the status topic; /diagnostics. All meaning lives in the
ROS-free core (vla_node.pipeline and below): this file is plumbing.

Two modes: a plain node that configures and activates itself at start, and a managed
(lifecycle) node (`--lifecycle`) that loads the model in configure and opens its topics
in activate.
"""
from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

import rclpy
import rclpy.utilities
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from vla_node import msg as vla_msg
from vla_node.factory import build_core, parse_adapter_specs, settings_from_parameters
from vla_node.pipeline import CommandPipeline, Frame
from vla_node.ros.convert import image_decoder, plan_to_msg, status_to_msg, time_to_ns
from vla_node.settings import PARAMETERS, NodeParameter, default

_RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                       durability=QoSDurabilityPolicy.VOLATILE)
# Commands are tiny and must not be lost while the executor is busy: a deep reader history.
_SPEECH_QOS = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.VOLATILE)
_STATUS_QOS = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.VOLATILE)


def _camera_qos(reliable: bool) -> QoSProfile:
    """The sensor-data profile (keep last 5, volatile), best effort or reliable."""
    return QoSProfile(depth=qos_profile_sensor_data.depth, history=qos_profile_sensor_data.history,
                      durability=QoSDurabilityPolicy.VOLATILE,
                      reliability=QoSReliabilityPolicy.RELIABLE if reliable else QoSReliabilityPolicy.BEST_EFFORT)


_ROS_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
              float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
              list: ParameterType.PARAMETER_STRING_ARRAY}


def _descriptor(parameter: NodeParameter) -> ParameterDescriptor:
    return ParameterDescriptor(name=parameter.name, type=_ROS_TYPES[parameter.type],
                               description=parameter.description, additional_constraints=parameter.range_text(),
                               read_only=not parameter.runtime)


class VlaRuntime:
    """Everything the node does, written once for both the plain and the lifecycle node."""

    def __init__(self, node: Node):
        self.node = node
        self.log = node.get_logger()
        for parameter in PARAMETERS.values():  # declared once, in vla_node.settings
            node.declare_parameter(parameter.name, default(parameter.name), _descriptor(parameter))
        self.pipeline: CommandPipeline | None = None
        self.core = None
        self._entities: list[Any] = []
        self._camera_type: Any = Image
        self._camera_sub: Any = None  # replaced when camera_reliability auto follows the publishers
        self._camera_reliable = False
        self._swap_lock = threading.Lock()
        node.add_on_set_parameters_callback(self._on_set_parameters)

    def param(self, name: str) -> Any:
        return self.node.get_parameter(name).value

    # ------------------------------------------------------------------ lifecycle steps
    def configure(self) -> None:
        """Load vocabulary, policy, model and adapters; raises with a reason on failure."""
        settings, config = settings_from_parameters({name: self.param(name) for name in PARAMETERS})
        self.core = build_core(settings)
        if self.param("warmup"):
            self.core.backend.warmup()
            if config.max_batch > 1:
                self.core.backend.warmup_batches(config.max_batch)
        clock = self.node.get_clock()
        self.pipeline = CommandPipeline(self.core, config, self._publish_plan, self._publish_status,
                                        now_ns=lambda: clock.now().nanoseconds)
        self.log.info(f"model {self.core.backend.model_id} ready "
                      f"(adapter: {self.core.backend.adapter_id or 'none'})")

    def activate(self) -> None:
        node = self.node
        self._plan_pub = node.create_publisher(vla_msg.ActionPlan, self.param("action_topic"), _RELIABLE)
        self._status_pub = node.create_publisher(vla_msg.CommandStatus, self.param("status_topic"), _STATUS_QOS)
        self._diag_pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._camera_type = CompressedImage if self.param("camera_transport") == "compressed" else Image
        mode = self.param("camera_reliability")
        self._subscribe_camera(mode != "best_effort")
        if mode == "auto":
            self._match_camera_reliability()  # a best-effort camera already there: follow it at once
        speech_sub = node.create_subscription(String, self.param("speech_topic"), self._on_speech, _SPEECH_QOS)
        timer = node.create_timer(self.param("diagnostics_period_s"), self._publish_diagnostics)
        self._entities = [self._plan_pub, self._status_pub, self._diag_pub, speech_sub, timer]
        if mode == "auto":
            self._entities.append(node.create_timer(1.0, self._match_camera_reliability))
        self.pipeline.start()
        self.log.info(f"listening on {self._camera_sub.topic_name} ({self._camera_type.__name__}, "
                      f"{'reliable' if self._camera_reliable else 'best effort'}) and "
                      f"{speech_sub.topic_name}; plans on {self._plan_pub.topic_name}")

    def _subscribe_camera(self, reliable: bool) -> None:
        if self._camera_sub is not None:
            self.node.destroy_subscription(self._camera_sub)
        self._camera_reliable = reliable
        self._camera_sub = self.node.create_subscription(self._camera_type, self.param("camera_topic"),
                                                         self._on_image, _camera_qos(reliable))

    def _best_effort_camera(self) -> bool:
        """True when a publisher on the camera topic is best effort (a reliable reader cannot match it)."""
        return any(info.qos_profile.reliability == QoSReliabilityPolicy.BEST_EFFORT
                   for info in self.node.get_publishers_info_by_topic(self._camera_sub.topic_name))

    def _match_camera_reliability(self) -> None:
        # A best-effort reader gets even a reliable writer's samples best effort, and large raw frames
        # then lose fragments and never arrive (Fast DDS, 1080p rgb8 across processes: 0 of 300;
        # benchmarks/results/soak_cpu.txt). A reliable reader matches only reliable writers. So read
        # reliably unless a best-effort camera is there (rosbag2 adapts to its publishers likewise).
        reliable = not self._best_effort_camera()
        if reliable != self._camera_reliable:
            self.log.info(f"camera publishers on {self._camera_sub.topic_name}: "
                          f"{'none best effort' if reliable else 'one is best effort'}: subscribing "
                          f"{'reliably' if reliable else 'best effort'}")
            self._subscribe_camera(reliable)

    def deactivate(self) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()
        for entity in self._entities:
            self._destroy(entity)
        self._entities = []
        if self._camera_sub is not None:
            self.node.destroy_subscription(self._camera_sub)
            self._camera_sub = None

    def cleanup(self) -> None:
        if self.core is not None:
            self.core.backend.close()
        self.core = None
        self.pipeline = None

    def _destroy(self, entity: Any) -> None:
        node = self.node
        for kind, destroy in (("publisher", node.destroy_publisher),
                              ("subscription", node.destroy_subscription),
                              ("timer", node.destroy_timer)):
            if type(entity).__name__.lower().endswith(kind):
                destroy(entity)
                return

    # ------------------------------------------------------------------ callbacks
    def _on_image(self, message: Any) -> None:
        # Hot path at camera rate: no decoding, no copying; just remember the message.
        self.pipeline.on_frame(Frame(
            stamp_ns=time_to_ns(message.header.stamp),
            frame_id=message.header.frame_id,
            received_ns=self.node.get_clock().now().nanoseconds,
            decode=image_decoder(message),
        ))

    def _on_speech(self, message: String) -> None:
        self.pipeline.submit(message.data)

    def _publish_plan(self, plan) -> None:
        self._plan_pub.publish(plan_to_msg(plan))

    def _publish_status(self, status) -> None:
        line = f"{status.command_id} {status.code.value}: {status.detail}"
        # rclpy fixes a call site's severity on first use: one call site per level.
        if status.code.value in ("ACCEPTED", "STOPPED"):
            self.log.info(line)
        else:
            self.log.warning(line)
        self._status_pub.publish(status_to_msg(status))

    def _publish_diagnostics(self) -> None:
        if self.pipeline is None or self.core is None:
            return
        stats = self.pipeline.stats
        values = {
            "model": self.core.backend.model_id,
            "adapter": self.core.backend.adapter_id or "none",
            "queue_depth": str(self.pipeline.queue_depth()),
            "camera_frames": str(self.pipeline.frames_received),
        }
        latest = self.pipeline.latest_frame()
        if latest is not None:  # a starving camera feed shows here before commands get STALE_IMAGE
            now_ns = self.node.get_clock().now().nanoseconds
            values["camera_frame_age_s"] = f"{(now_ns - latest.received_ns) / 1e9:.3f}"
            values["camera_transport_delay_s"] = f"{(latest.received_ns - latest.stamp_ns) / 1e9:.3f}"
        breaker = getattr(self.core.backend, "breaker", None)  # backend openai: server health at a glance
        if breaker is not None:
            values["server_circuit"] = breaker.state
        values.update({f"latency_{k}_ms": f"{v:.1f}" for k, v in stats.latency_percentiles().items()})
        values.update({f"count_{code}": str(n) for code, n in sorted(stats.counts.items())})
        errors = stats.counts.get("BACKEND_ERROR", 0) + stats.counts.get("TIMEOUT", 0)
        status = DiagnosticStatus(
            level=DiagnosticStatus.WARN if errors else DiagnosticStatus.OK,
            name=f"{self.node.get_name()}: vla pipeline",
            hardware_id=self.core.backend.model_id,
            message=f"{errors} backend errors/timeouts" if errors else "ok",
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.node.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, parameters: list) -> SetParametersResult:
        """Validate runtime changes; a refused value leaves the old one in place."""
        for parameter in parameters:
            if parameter.name == "adapters":
                try:
                    parse_adapter_specs([a for a in parameter.value if a])
                except ValueError as error:
                    return SetParametersResult(successful=False, reason=str(error))
                if self.core is not None:
                    reason = self._load_adapters(parameter.value)
                    if reason:
                        return SetParametersResult(successful=False, reason=reason)
            elif parameter.name == "active_adapter" and self.core is not None:
                reason = self._swap_adapter(parameter.value)
                if reason:
                    return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _load_adapters(self, specs: list[str]) -> str | None:
        backend = self.core.backend
        for name, path in parse_adapter_specs([a for a in specs if a]).items():
            if name in backend.adapter_names():
                continue
            try:
                backend.load_adapter(path, name)
            except Exception as error:
                return f"adapter '{name}' at {path} refused: {error}"
        return None

    def _swap_adapter(self, name: str) -> str | None:
        backend = self.core.backend
        if name and name not in backend.adapter_names():
            return f"adapter '{name}' is not loaded (loaded: {', '.join(backend.adapter_names()) or 'none'})"
        with self._swap_lock:
            backend.set_adapter(name or None)
        self.log.info(f"active adapter now {backend.adapter_id or 'none (base model)'}")
        return None


class VlaNode(Node):
    """Plain node: configures (loads the model) and activates at construction."""

    def __init__(self, node_name: str = "vla_node", **kwargs: Any):
        super().__init__(node_name, **kwargs)
        self.runtime = VlaRuntime(self)
        self.runtime.configure()
        self.runtime.activate()

    def shutdown(self) -> None:
        self.runtime.deactivate()
        self.runtime.cleanup()


def _lifecycle_node_class():
    from rclpy.lifecycle import Node as LifecycleNode
    from rclpy.lifecycle import State, TransitionCallbackReturn

    class VlaLifecycleNode(LifecycleNode):
        """Managed node: model in configure, topics in activate."""

        def __init__(self, node_name: str = "vla_node", **kwargs: Any):
            super().__init__(node_name, **kwargs)
            self.runtime = VlaRuntime(self)

        def on_configure(self, state: State) -> TransitionCallbackReturn:
            try:
                self.runtime.configure()
            except Exception as error:  # a bad model/adapter path must fail the transition, not the process
                self.get_logger().error(f"configure failed: {error}")
                return TransitionCallbackReturn.FAILURE
            return TransitionCallbackReturn.SUCCESS

        def on_activate(self, state: State) -> TransitionCallbackReturn:
            self.runtime.activate()
            return super().on_activate(state)

        def on_deactivate(self, state: State) -> TransitionCallbackReturn:
            self.runtime.deactivate()
            return super().on_deactivate(state)

        def on_cleanup(self, state: State) -> TransitionCallbackReturn:
            self.runtime.cleanup()
            return TransitionCallbackReturn.SUCCESS

        def on_shutdown(self, state: State) -> TransitionCallbackReturn:
            self.shutdown()
            return TransitionCallbackReturn.SUCCESS

        def shutdown(self) -> None:
            self.runtime.deactivate()
            self.runtime.cleanup()

    return VlaLifecycleNode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="vla_node",
        description="Camera + speech -> Qwen-VL (+LoRA) -> validated action plans. Parameters are "
                    "ROS parameters (see config/vla_node.yaml): --ros-args -p model_path:=DIR ...",
    )
    parser.add_argument("--lifecycle", action="store_true",
                        help="run as a managed node: load the model on configure, open topics on activate")
    args = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])
    rclpy.init(args=argv)
    try:
        node = _lifecycle_node_class()() if args.lifecycle else VlaNode()
    except Exception as error:
        print(f"vla_node: cannot start: {error}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    except Exception as error:  # ExternalShutdownException (SIGINT/SIGTERM) on newer distros
        if type(error).__name__ != "ExternalShutdownException":
            raise
    finally:
        node.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
