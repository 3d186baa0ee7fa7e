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
from vla_node.backends.base import DEFAULT_MAX_NEW_TOKENS
from vla_node.backends.openai_backend import ServerSettings
from vla_node.factory import RuntimeSettings, build_core, parse_adapter_specs
from vla_node.pipeline import CommandPipeline, Frame, PipelineConfig
from vla_node.ros.convert import image_decoder, plan_to_msg, status_to_msg, time_to_ns
from vla_node.text import DEFAULT_STOP_PHRASES

# name -> (default, description, read_only). Read-only ones take effect at configure.
PARAMETERS: dict[str, tuple[Any, str, bool]] = {
    "model_path": ("", "Local Qwen2-VL/Qwen2.5-VL/Qwen3-VL directory (backend onnx: a vla-export --onnx folder); '' = the embedded tabletop-tiny model", True),
    "adapters": ([""], "LoRA adapters to load, each 'name=path' (or 'embedded'); several may be loaded", False),
    "active_adapter": ("", "Name of the adapter to use ('' = base model); change it at runtime to hot-swap", False),
    "backend": ("transformers", "Inference backend: transformers (local) | onnx (onnxruntime, no torch) | openai (OpenAI-compatible server)", True),
    "server_url": ("", "backend openai: server base URL, e.g. http://gpu-host:8000/v1", True),
    "server_model": ("", "backend openai: served base model name; adapters are requested by their served name", True),
    "api_key_env": ("", "backend openai: environment variable holding the API key ('' = no key)", True),
    "server_timeout_s": (10.0, "backend openai: hard deadline of one request attempt", True),
    "server_max_retries": (2, "backend openai: retries after timeouts, connection errors, 408/429/5xx", True),
    "server_retry_backoff_s": (0.25, "backend openai: first retry delay, doubling each retry", True),
    "server_breaker_failures": (3, "backend openai: consecutive failures that open the circuit breaker", True),
    "server_breaker_reset_s": (15.0, "backend openai: seconds the breaker fails fast before one trial", True),
    "server_tls_verify": (True, "backend openai: verify https certificates", True),
    "server_ca_file": ("", "backend openai: CA bundle for a private server certificate", True),
    "server_structured_output": ("json_schema", "backend openai: json_schema | structured_outputs (vLLM >= 0.12) | guided_json (older vLLM) | none", True),
    "server_model_family": ("", "backend openai: qwen2_vl | qwen2_5_vl | qwen3_vl ('' = from model_path)", True),
    "server_min_pixels": (0, "backend openai: image pixel limits of the server's processor (0 = from model_path)", True),
    "server_max_pixels": (0, "backend openai: must match the server, or boxes are scaled wrong", True),
    "device": ("auto", "auto | cpu | cuda | cuda:N", True),
    "dtype": ("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16", True),
    "prefix_cache": (True, "backend transformers: prefill the shared system-prompt prefix once and reuse its KV cache (same outputs)", True),
    "decode_cache": ("auto", "backend transformers: KV cache for decoding: auto (static on CUDA, dynamic on CPU) | dynamic | static (own prefill and decode loop; CUDA graphs on CUDA)", True),
    "compile_decode": (True, "backend transformers, static decode cache on CUDA: torch.compile the decode step before recording it (faster steps; the first request compiles, tens of seconds)", True),
    "compile_layers": (True, "backend transformers on CUDA: torch.compile the vision tower's blocks and the language model's norms and MLPs before the vision and prefill graphs are recorded (faster frames; the first frame of each size compiles, seconds)", True),
    "torch_threads": (0, "backend transformers: torch CPU threads, process-wide (0 = torch's default, one per core; 1 is often fastest on a shared CPU)", True),
    "vocabulary_path": ("", "Action vocabulary + safety policy YAML; '' = config/actions.yaml", True),
    "camera_topic": ("camera/image_raw", "Camera topic (relative names follow the node namespace)", True),
    "camera_transport": ("raw", "raw (sensor_msgs/Image) | compressed (sensor_msgs/CompressedImage)", True),
    "camera_reliability": ("auto", "auto (reliable unless a camera publisher is best effort; re-checked each second) | best_effort | reliable", True),
    "speech_topic": ("speech/text", "Transcribed speech topic (std_msgs/String)", True),
    "action_topic": ("vla/actions", "Plans out (vla_node/ActionPlan)", True),
    "status_topic": ("vla/status", "One status per command (vla_node/CommandStatus)", True),
    "max_image_age_s": (2.0, "A command whose closest image is older than this gets STALE_IMAGE", True),
    "frame_buffer": (8, "Undecoded camera messages kept to pair a command with the closest frame", True),
    "queue_size": (4, "Commands waiting for the model at most", True),
    "queue_policy": ("drop_oldest", "drop_oldest (newest command wins) | reject_newest", True),
    "max_batch": (1, "Waiting commands run as one batched generation at most (capped by the backend; 1 = one at a time)", True),
    "max_new_tokens": (DEFAULT_MAX_NEW_TOKENS, "Upper bound on generated tokens per command (a two-step plan with boxes is ~110 tokens)", True),
    "generation_timeout_s": (30.0, "Watchdog: generation longer than this gives TIMEOUT", True),
    "max_command_bytes": (512, "Longer speech text is refused with BAD_COMMAND", True),
    "stop_phrases": (list(DEFAULT_STOP_PHRASES),
                     "Utterances that publish STOP at once, without the model, and cancel pending work", True),
    "min_confidence": (-1.0, "Refuse plans below this confidence; < 0 keeps the vocabulary file's value", True),
    "max_steps": (-1, "Refuse plans longer than this; < 0 keeps the vocabulary file's value", True),
    "constrained_decoding": (True, "Grammar-constrained decoding: only well-formed plans of the vocabulary can be generated", True),
    "constrain_to_policy": (False, "The grammar also applies the policy's allowed verbs/objects/destinations "
                                   "(off: a refused label is reported as REJECTED_BY_POLICY instead)", True),
    "warmup": (True, "Run one generation at configure so the first command is not slow (with max_batch > 1, one tiny batch per batch size as well)", True),
    "diagnostics_period_s": (1.0, "Period of /diagnostics messages", True),
}

_RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                       durability=QoSDurabilityPolicy.VOLATILE)
# Commands are tiny and must not be lost while the executor is busy: a deep reader history.
_SPEECH_QOS = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.VOLATILE)
_STATUS_QOS = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.VOLATILE)


_CAMERA_RELIABILITY = ("auto", "best_effort", "reliable")


def _camera_qos(reliable: bool) -> QoSProfile:
    """The sensor-data profile (keep last 5, volatile), best effort or reliable."""
    return QoSProfile(depth=qos_profile_sensor_data.depth, history=qos_profile_sensor_data.history,
                      durability=QoSDurabilityPolicy.VOLATILE,
                      reliability=QoSReliabilityPolicy.RELIABLE if reliable else QoSReliabilityPolicy.BEST_EFFORT)


def _descriptor(name: str, default: Any, description: str, read_only: bool) -> ParameterDescriptor:
    types = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
             float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
             list: ParameterType.PARAMETER_STRING_ARRAY}
    return ParameterDescriptor(name=name, type=types[type(default)], description=description,
                               read_only=read_only)


class VlaRuntime:
    """Everything the node does, written once for both the plain and the lifecycle node."""

    def __init__(self, node: Node):
        self.node = node
        self.log = node.get_logger()
        for name, (default, description, read_only) in PARAMETERS.items():
            node.declare_parameter(name, default, _descriptor(name, default, description, read_only))
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
        if self.param("camera_reliability") not in _CAMERA_RELIABILITY:
            raise ValueError(f"camera_reliability must be one of {', '.join(_CAMERA_RELIABILITY)}, "
                             f"not {self.param('camera_reliability')!r}")
        settings = RuntimeSettings(
            model_path=self.param("model_path"),
            adapters=[a for a in self.param("adapters") if a],
            active_adapter=self.param("active_adapter"),
            backend=self.param("backend"),
            device=self.param("device"),
            dtype=self.param("dtype"),
            prefix_cache=self.param("prefix_cache"),
            decode_cache=self.param("decode_cache"),
            compile_decode=self.param("compile_decode"),
            compile_layers=self.param("compile_layers"),
            torch_threads=self.param("torch_threads"),
            vocabulary_path=self.param("vocabulary_path"),
            max_new_tokens=self.param("max_new_tokens"),
            min_confidence=self.param("min_confidence") if self.param("min_confidence") >= 0 else None,
            max_steps=self.param("max_steps") if self.param("max_steps") >= 0 else None,
            constrained_decoding=self.param("constrained_decoding"),
            constrain_to_policy=self.param("constrain_to_policy"),
            server=ServerSettings(
                url=self.param("server_url"), model=self.param("server_model"),
                api_key_env=self.param("api_key_env"), timeout_s=self.param("server_timeout_s"),
                max_retries=self.param("server_max_retries"),
                retry_backoff_s=self.param("server_retry_backoff_s"),
                breaker_failures=self.param("server_breaker_failures"),
                breaker_reset_s=self.param("server_breaker_reset_s"),
                tls_verify=self.param("server_tls_verify"), ca_file=self.param("server_ca_file"),
                structured_output=self.param("server_structured_output"),
                model_family=self.param("server_model_family"),
                min_pixels=self.param("server_min_pixels"), max_pixels=self.param("server_max_pixels"),
            ) if self.param("backend") == "openai" else ServerSettings(),
        )
        config = PipelineConfig(
            queue_size=self.param("queue_size"),
            queue_policy=self.param("queue_policy"),
            max_batch=self.param("max_batch"),
            max_image_age_s=self.param("max_image_age_s"),
            frame_buffer=self.param("frame_buffer"),
            generation_timeout_s=self.param("generation_timeout_s"),
            max_command_bytes=self.param("max_command_bytes"),
            stop_phrases=tuple(self.param("stop_phrases")),
        )
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
