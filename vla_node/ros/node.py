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
import collections
import signal
import sys
import threading
from typing import Any

import rclpy
import rclpy.logging
import rclpy.utilities
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from vla_node import msg as vla_msg
from vla_node.adapter_switch import AdapterState, AdapterSwitcher, SwitchOutcome, check_change
from vla_node.factory import adapter_specs, build_core, settings_from_parameters
from vla_node.pipeline import CommandPipeline, Frame
from vla_node.ros.convert import image_decoder, plan_to_msg, status_to_msg, time_to_ns
from vla_node.ros.debug_image import DebugImagePublisher
from vla_node.ros.parameters import declare_all
from vla_node.settings import PARAMETERS, ParameterError, check_all

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


class VlaRuntime:
    """Everything the node does, written once for both the plain and the lifecycle node."""

    def __init__(self, node: Node):
        self.node = node
        self.log = node.get_logger()
        self._topics = declare_all(node)  # declared once, in vla_node.settings; topics as given (see parameters.py)
        self.pipeline: CommandPipeline | None = None
        self.core = None
        self.adapters: AdapterSwitcher | None = None
        self._adapter_outcomes: collections.deque[SwitchOutcome] = collections.deque()
        self._last_adapter_error = ""
        self._setting_truth = False  # the node itself sets parameters back to what is loaded
        self._entities: list[Any] = []
        self._camera_type: Any = Image
        self._camera_sub: Any = None  # replaced when camera_reliability auto follows the publishers
        self._camera_reliable = False
        self.debug_image: DebugImagePublisher | None = None
        self._diag_pub: Any = None
        # adapter changes finish on their own thread; their report is handled in the executor
        self._adapter_done = node.create_guard_condition(self._on_adapter_change_done)
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
        loaded = AdapterState.of(adapter_specs(settings), settings.active_adapter)
        self.adapters = AdapterSwitcher(self.core.backend, loaded, self._adapter_change_done)
        self._set_truth(loaded)  # e.g. [""] with the embedded model: ["zh=embedded"]
        clock = self.node.get_clock()
        self.pipeline = CommandPipeline(self.core, config, self._publish_plan, self._publish_status,
                                        now_ns=lambda: clock.now().nanoseconds, on_answer=self._on_answer)
        self.log.info(f"model {self.core.backend.model_id} ready "
                      f"(adapters: {', '.join(loaded.names()) or 'none'}; "
                      f"active: {self.core.backend.adapter_id or 'none'})")

    def activate(self) -> None:
        node = self.node
        self._plan_pub = node.create_publisher(vla_msg.ActionPlan, self._topics["action_topic"], _RELIABLE)
        self._status_pub = node.create_publisher(vla_msg.CommandStatus, self._topics["status_topic"], _STATUS_QOS)
        self._diag_pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.debug_image = DebugImagePublisher(node, self._topics["debug_image_topic"])
        self._camera_type = CompressedImage if self.param("camera_transport") == "compressed" else Image
        mode = self.param("camera_reliability")
        self._subscribe_camera(mode != "best_effort")
        if mode == "auto":
            self._match_camera_reliability()  # a best-effort camera already there: follow it at once
        speech_sub = node.create_subscription(String, self._topics["speech_topic"], self._on_speech, _SPEECH_QOS)
        timer = node.create_timer(self.param("diagnostics_period_s"), self._publish_diagnostics)
        watcher = node.create_timer(1.0, self._poll_debug_image)
        self._entities = [self._plan_pub, self._status_pub, self._diag_pub, self.debug_image.publisher, speech_sub,
                          timer, watcher]
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
        self._camera_sub = self.node.create_subscription(self._camera_type, self._topics["camera_topic"],
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
        self.debug_image = None
        self._diag_pub = None
        if self._camera_sub is not None:
            self.node.destroy_subscription(self._camera_sub)
            self._camera_sub = None

    def cleanup(self) -> None:
        if self.adapters is not None:
            self.adapters.close()  # a load in progress finishes first (bounded): the backend is not closed under it
            self.adapters = None
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

    def _on_answer(self, answer) -> None:
        publisher = self.debug_image
        if publisher is not None:
            publisher.on_answer(answer)

    def _poll_debug_image(self) -> None:
        if self.debug_image is not None:
            try:
                self.debug_image.poll()
            except Exception as error:  # e.g. a frame that cannot be decoded: no picture, nothing else
                self.log.warning(f"debug image not drawn: {type(error).__name__}: {error}")

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
        if self.pipeline is None or self.core is None or self._diag_pub is None:
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
        if self.adapters is not None:
            values["adapters_loaded"] = ", ".join(self.adapters.state.names()) or "none"
            values["adapter_change"] = (self.adapters.doing or
                                        (f"failed: {self._last_adapter_error}" if self._last_adapter_error else "idle"))
        breaker = getattr(self.core.backend, "breaker", None)  # backend openai: server health at a glance
        if breaker is not None:
            values["server_circuit"] = breaker.state
        values.update({f"latency_{k}_ms": f"{v:.1f}" for k, v in stats.latency_percentiles().items()})
        values.update({f"count_{code}": str(n) for code, n in sorted(stats.counts.items())})
        errors = stats.counts.get("BACKEND_ERROR", 0) + stats.counts.get("TIMEOUT", 0)
        problems = [f"{errors} backend errors/timeouts"] if errors else []
        if self._last_adapter_error:
            problems.append(f"adapter change failed: {self._last_adapter_error}")
        status = DiagnosticStatus(
            level=DiagnosticStatus.WARN if problems else DiagnosticStatus.OK,
            name=f"{self.node.get_name()}: vla pipeline",
            hardware_id=self.core.backend.model_id,
            message="; ".join(problems) or "ok",
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.node.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, parameters: list) -> SetParametersResult:
        """Check a set as a whole and change nothing here: a refused set leaves every value as it
        was; an accepted adapter change is carried out in the background (AdapterSwitcher)."""
        try:
            return self._check_parameters(parameters)
        except Exception as error:  # a parameter service call must never take the node down
            self.log.error(f"parameter set refused: {type(error).__name__}: {error}")
            return SetParametersResult(successful=False, reason=f"{type(error).__name__}: {error}")

    def _check_parameters(self, parameters: list) -> SetParametersResult:
        if self._setting_truth:
            return SetParametersResult(successful=True)
        values = {parameter.name: parameter.value for parameter in parameters}
        try:  # ROS's own parameters (use_sim_time) are not ours to check
            check_all({name: value for name, value in values.items() if name in PARAMETERS})
        except ParameterError as error:
            return SetParametersResult(successful=False, reason=str(error))
        if self.adapters is None or not ({"adapters", "active_adapter"} & set(values)):
            return SetParametersResult(successful=True)  # not configured yet: read at configure
        wanted = AdapterState.of(values.get("adapters", self.param("adapters")),
                                 values.get("active_adapter", self.param("active_adapter")))
        reason = check_change(self._accepted_adapters(), wanted.specs, wanted.active,
                              local_paths=self.param("backend") == "transformers")
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        self.adapters.request(wanted)
        self.log.info(f"adapter change accepted, carried out in the background: adapters "
                      f"{', '.join(wanted.names()) or 'none'}; active {wanted.active or 'none (base model)'}")
        return SetParametersResult(successful=True)

    def _accepted_adapters(self) -> AdapterState:
        return AdapterState.of(self.param("adapters"), self.param("active_adapter"))

    def _adapter_change_done(self, outcome: SwitchOutcome) -> None:
        """From the switcher's thread: hand the outcome to the executor."""
        self._adapter_outcomes.append(outcome)
        self._adapter_done.trigger()

    def _on_adapter_change_done(self) -> None:
        while self._adapter_outcomes:
            outcome = self._adapter_outcomes.popleft()
            if outcome.error:
                self._last_adapter_error = outcome.error
                self.log.error(outcome.summary())
            else:
                self._last_adapter_error = ""
                self.log.info(outcome.summary())
        if self.adapters is not None and not self.adapters.pending():
            self._set_truth(self.adapters.state)  # after a failure: the parameters say what is loaded
        self._publish_diagnostics()

    def _set_truth(self, state: AdapterState) -> None:
        """Set `adapters` and `active_adapter` to what is loaded and active (no new change)."""
        truth = {"adapters": list(state.specs) or [""], "active_adapter": state.active}
        changed = [Parameter(name, value=value) for name, value in truth.items()
                   if (list(self.param(name)) if name == "adapters" else self.param(name)) != value]
        if not changed:
            return
        self._setting_truth = True
        try:
            self.node.set_parameters_atomically(changed)
        finally:
            self._setting_truth = False


def _route_logging(node: Node) -> None:
    """The executable's node: Python logging, warnings and progress bars through its ROS logger."""
    from vla_node.ros.log_bridge import route_python_logging

    logger = node.get_logger()
    route_python_logging(logger, debug=logger.get_effective_level() <= rclpy.logging.LoggingSeverity.DEBUG)


class VlaNode(Node):
    """Plain node: configures (loads the model) and activates at construction. A failure to start
    is logged through the node's ROS logger and raised."""

    def __init__(self, node_name: str = "vla_node", route_logging: bool = False, **kwargs: Any):
        super().__init__(node_name, **kwargs)
        if route_logging:
            _route_logging(self)
        self.runtime = None
        try:
            self.runtime = VlaRuntime(self)
            self.runtime.configure()
            self.runtime.activate()
        except Exception as error:
            self.get_logger().fatal(f"cannot start: {error}")
            if self.runtime is not None:
                self.runtime.deactivate()
                self.runtime.cleanup()
            raise

    def shutdown(self) -> None:
        self.runtime.deactivate()
        self.runtime.cleanup()


def _lifecycle_node_class():
    from rclpy.lifecycle import Node as LifecycleNode
    from rclpy.lifecycle import State, TransitionCallbackReturn

    class VlaLifecycleNode(LifecycleNode):
        """Managed node: model in configure, topics in activate."""

        def __init__(self, node_name: str = "vla_node", route_logging: bool = False, **kwargs: Any):
            super().__init__(node_name, **kwargs)
            if route_logging:
                _route_logging(self)
            try:
                self.runtime = VlaRuntime(self)
            except Exception as error:
                self.get_logger().fatal(f"cannot start: {error}")
                raise

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
    from vla_node.ros.log_bridge import quiet_progress_bars

    quiet_progress_bars()
    starting = threading.Event()
    starting.set()

    def on_sigint(signum, frame):
        # rclpy's own handler ends the spin and then calls this one. Ctrl-C in a terminal reaches the
        # node twice (from the terminal and from launch): a KeyboardInterrupt raised inside rclpy's
        # executor clean-up can leave it waiting for ever, so only a Ctrl-C during start-up raises.
        if starting.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        rclpy.init(args=argv)
    except Exception as error:  # e.g. malformed --ros-args: there is no node to log through yet
        print(f"vla_node: cannot start ROS: {error}", file=sys.stderr)
        return 1
    try:
        node = _lifecycle_node_class()(route_logging=True) if args.lifecycle else VlaNode(route_logging=True)
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        rclpy.try_shutdown()
        return 130
    except Exception:  # logged through the node's ROS logger; exit 1 so launch, scripts and systemd see it
        rclpy.try_shutdown()
        return 1
    starting.clear()
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
        # the second Ctrl-C can still be on its way (rclpy hands it on late): it must not kill the
        # finished process, or launch reports a clean exit as "process has died"
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
