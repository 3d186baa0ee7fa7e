"""The vla node in a real rclpy graph: camera + speech in, plans + statuses out."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from tests.fixtures_models import (  # noqa: F401
    build_lora_adapter,
    tiny_checkpoints,
    tiny_model_dir,
    tiny_qwen2_5_vl,
)
from tests.ros_helpers import ros_context, spin_until, wait_for_subscribers  # noqa: F401

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from vla_node import msg as vla_msg  # noqa: E402
from vla_node.factory import EMBEDDED_MODEL, package_data_dir  # noqa: E402
from vla_node.ros.node import VlaNode  # noqa: E402


class Graph:
    """A camera+speech publisher node and a plan/status subscriber around a VlaNode."""

    def __init__(self, context, overrides: dict):
        params = [Parameter(name, value=value) for name, value in overrides.items()]
        self.vla = VlaNode(context=context, parameter_overrides=params)
        self.peer = rclpy.create_node("robot_peer", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.vla)
        self.executor.add_node(self.peer)
        self.plans, self.statuses = [], []
        self.peer.create_subscription(vla_msg.ActionPlan, "/vla/actions", self.plans.append, 10)
        self.peer.create_subscription(vla_msg.CommandStatus, "/vla/status", self.statuses.append, 100)
        self.camera = self.peer.create_publisher(Image, "/camera/image_raw", 10)
        self.speech = self.peer.create_publisher(String, "/speech/text", 100)
        wait_for_subscribers(self.executor, self.camera)
        wait_for_subscribers(self.executor, self.speech)
        assert spin_until(self.executor, lambda: self.peer.count_publishers("/vla/status") >= 1, 10)

    def send_image(self, rgb: np.ndarray, stamp_ns: int | None = None) -> Image:
        stamp_ns = stamp_ns if stamp_ns is not None else self.vla.get_clock().now().nanoseconds
        message = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", is_bigendian=0,
                        step=rgb.shape[1] * 3, data=rgb.tobytes())
        message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        message.header.frame_id = "camera_optical"
        self.camera.publish(message)
        spin_until(self.executor, lambda: False, 0.2)  # let the frame arrive before a command
        return message

    def say(self, text: str) -> None:
        self.speech.publish(String(data=text))

    def wait_statuses(self, count: int, timeout_s: float = 60.0):
        assert spin_until(self.executor, lambda: len(self.statuses) >= count, timeout_s), (
            f"expected {count} statuses, got {[(s.command_id, s.code_name) for s in self.statuses]}")
        return self.statuses

    def close(self):
        self.vla.shutdown()
        self.executor.shutdown()
        self.vla.destroy_node()
        self.peer.destroy_node()


@pytest.fixture
def graph_factory(ros_context):
    graphs = []

    def make(**overrides):
        graph = Graph(ros_context, {"warmup": False, "max_new_tokens": 12, **overrides})
        graphs.append(graph)
        return graph

    yield make
    for graph in graphs:
        graph.close()


def _scene(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (120, 160, 3), dtype=np.uint8)


def test_warm_up_prepares_every_batch_size_of_max_batch(graph_factory, tiny_model_dir):
    graph = graph_factory(model_path=str(tiny_model_dir), warmup=True, decode_cache="static", max_batch=3)
    backend = graph.vla.runtime.core.backend
    assert sorted(backend.engine.batches.decoders) == [2, 4], "batches of 2 and 3 commands: 2- and 4-row decoders"
    graph.send_image(_scene())
    graph.say("put the red cube in the blue bowl")
    (status,) = graph.wait_statuses(1)
    assert status.code_name in ("ACCEPTED", "PARSE_ERROR")


def test_tiny_model_with_lora_answers_every_command_with_a_status(graph_factory, tiny_model_dir, tmp_path):
    adapter = build_lora_adapter(tiny_model_dir, tmp_path / "lora", seed=3, manifest=False)
    graph = graph_factory(model_path=str(tiny_model_dir), adapters=[f"test={adapter}"], active_adapter="test")
    image = graph.send_image(_scene())
    graph.say("put the red cube in the blue bowl")
    (status,) = graph.wait_statuses(1)
    assert status.command_id.startswith("cmd-")
    assert status.command_text == "put the red cube in the blue bowl"
    assert status.code_name in ("ACCEPTED", "PARSE_ERROR")
    assert status.code == getattr(vla_msg.CommandStatus, status.code_name)
    if status.code_name == "PARSE_ERROR":
        assert status.detail, "a parse error says what the model wrote"
        spin_until(graph.executor, lambda: False, 0.3)
        assert graph.plans == []
    else:
        spin_until(graph.executor, lambda: graph.plans, 5)
        (plan,) = graph.plans
        assert plan.header.stamp == image.header.stamp and plan.command_id == status.command_id
        assert plan.adapter_id.startswith("test")


def test_no_image_then_stale_image(graph_factory, tiny_model_dir):
    graph = graph_factory(model_path=str(tiny_model_dir), max_image_age_s=1.0)
    graph.say("pick up the red cube")
    graph.wait_statuses(1)
    old = graph.vla.get_clock().now().nanoseconds - 5_000_000_000
    graph.send_image(_scene(), stamp_ns=old)
    graph.say("pick up the red cube")
    statuses = graph.wait_statuses(2)
    assert [s.code_name for s in statuses] == ["NO_IMAGE", "STALE_IMAGE"]
    assert statuses[0].code == vla_msg.CommandStatus.NO_IMAGE
    assert "max_image_age_s=1.0" in statuses[1].detail


def test_command_flood_is_bounded_and_the_node_stays_alive(graph_factory, tiny_model_dir):
    graph = graph_factory(model_path=str(tiny_model_dir), queue_size=2)
    graph.send_image(_scene(), stamp_ns=graph.vla.get_clock().now().nanoseconds + 10**12)
    for i in range(15):
        graph.say(f"pick up the red cube number {i}")
    statuses = graph.wait_statuses(15, timeout_s=180)
    assert len({s.command_id for s in statuses}) == 15, "exactly one status per command"
    assert sum(s.code_name == "BUSY" for s in statuses) >= 10
    graph.say("stop")  # still alive and answering
    statuses = graph.wait_statuses(16)
    assert statuses[-1].code_name == "STOPPED"
    assert spin_until(graph.executor, lambda: any(p.steps[0].verb == "STOP" for p in graph.plans), 5)


def test_bad_parameter_value_is_refused_and_the_old_value_kept(graph_factory, tiny_model_dir):
    graph = graph_factory(model_path=str(tiny_model_dir))
    result = graph.vla.set_parameters([Parameter("active_adapter", value="nope")])[0]
    assert not result.successful and "not one of the adapters" in result.reason
    assert graph.vla.get_parameter("active_adapter").value == ""


def test_missing_model_dir_refuses_to_start_with_the_path(ros_context, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(Exception, match=str(missing)):
        VlaNode(context=ros_context, parameter_overrides=[Parameter("model_path", value=str(missing))])


embedded = package_data_dir("models")
needs_embedded = pytest.mark.skipif(embedded is None or not (embedded / EMBEDDED_MODEL).is_dir(),
                                    reason="the embedded model is not built (make models)")


@needs_embedded
def test_embedded_model_plan_fields_and_adapter_hot_swap(graph_factory, tmp_path):
    # An identity LoRA (B = 0) keeps the embedded model's answers but has its own identity.
    identity = tmp_path / "identity"
    _identity_adapter(embedded / EMBEDDED_MODEL, identity)
    graph = graph_factory(adapters=[f"identity={identity}"], active_adapter="identity", max_new_tokens=128)
    backend = graph.vla.runtime.core.backend
    base_model = id(backend.model)
    scene, command = _embedded_scene()
    image = graph.send_image(scene)
    graph.say(command)
    (status,) = graph.wait_statuses(1)
    assert status.code_name == "ACCEPTED", status.detail
    assert spin_until(graph.executor, lambda: graph.plans, 5)
    plan = graph.plans[0]
    assert plan.header.stamp == image.header.stamp
    assert plan.header.frame_id == "camera_optical"
    assert plan.command_id == status.command_id
    assert plan.adapter_id.startswith("identity")
    assert plan.steps and plan.steps[0].verb in ("MOVE_OBJECT", "PICK_OBJECT", "PLACE_OBJECT", "STOP", "CLARIFY")
    assert 0.0 < plan.steps[0].confidence <= 1.0
    assert plan.latency.generate_ms > 0 and plan.latency.total_ms >= plan.latency.generate_ms

    result = graph.vla.set_parameters([Parameter("active_adapter", value="")])[0]
    assert result.successful
    assert spin_until(graph.executor, lambda: backend.adapter_id == "", 30), "the swap is done in the background"
    graph.send_image(scene)  # a fresh frame: the first one may be stale by now on a slow machine
    graph.say(command)
    second = graph.wait_statuses(2)[1]
    assert second.code_name == "ACCEPTED", second.detail
    assert spin_until(graph.executor, lambda: len(graph.plans) >= 2, 10)
    assert graph.plans[1].adapter_id == ""
    assert id(backend.model) == base_model, "hot swap must not reload the base model"


def _identity_adapter(base_dir, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from tests.fixtures_models import lora_target_modules

    model = AutoModelForImageTextToText.from_pretrained(str(base_dir), local_files_only=True)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules())).save_pretrained(
        str(out_dir))


def _embedded_scenes():
    """The embedded model's held-out English move commands in order, with their scenes (RGB)."""
    from training.heldout import read_heldout_spec
    from training.synth import Synthesizer

    cfg, indices = read_heldout_spec(embedded / "heldout" / "test_en.json")
    synth = Synthesizer(cfg, None)
    for index in indices:
        sample = synth.sample(index)
        if sample.kind == "move":
            yield np.ascontiguousarray(sample.image[:, :, ::-1]), sample.command


def _embedded_scene() -> tuple[np.ndarray, str]:
    """The first held-out English move command of the embedded model, with its scene (RGB)."""
    for scene_and_command in _embedded_scenes():
        return scene_and_command
    raise AssertionError("no held-out move command")


def test_lifecycle_node_loads_on_configure_and_listens_on_activate(ros_context, tiny_model_dir):
    from rclpy.lifecycle import TransitionCallbackReturn

    from vla_node.ros.node import _lifecycle_node_class

    node = _lifecycle_node_class()(context=ros_context, parameter_overrides=[
        Parameter("model_path", value=str(tiny_model_dir)), Parameter("warmup", value=False)])
    peer = rclpy.create_node("lifecycle_peer", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(peer)
    statuses = []
    peer.create_subscription(vla_msg.CommandStatus, "/vla/status", statuses.append, 10)
    speech = peer.create_publisher(String, "/speech/text", 10)
    try:
        assert node.runtime.core is None, "nothing is loaded before configure"
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.runtime.core is not None
        assert speech.get_subscription_count() == 0, "topics open only on activate"
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        wait_for_subscribers(executor, speech)
        speech.publish(String(data="pick up the red cube"))
        assert spin_until(executor, lambda: statuses, 30)
        assert statuses[0].code_name == "NO_IMAGE"
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert spin_until(executor, lambda: speech.get_subscription_count() == 0, 10)
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert node.runtime.core is None
    finally:
        executor.shutdown()
        node.destroy_node()
        peer.destroy_node()


def test_lifecycle_configure_fails_cleanly_on_a_missing_model(ros_context, tmp_path):
    from rclpy.lifecycle import TransitionCallbackReturn

    from vla_node.ros.node import _lifecycle_node_class

    node = _lifecycle_node_class()(context=ros_context, parameter_overrides=[
        Parameter("model_path", value=str(tmp_path / "missing"))])
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.runtime.core is None
    finally:
        node.destroy_node()


def test_adapter_hot_swap_by_parameter_shows_in_diagnostics_without_base_reload(graph_factory, tiny_model_dir,
                                                                               tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray

    first = build_lora_adapter(tiny_model_dir, tmp_path / "a", seed=4, manifest=False)
    second = build_lora_adapter(tiny_model_dir, tmp_path / "b", seed=5, manifest=False)
    graph = graph_factory(model_path=str(tiny_model_dir), adapters=[f"a={first}"], active_adapter="a",
                          diagnostics_period_s=0.1)
    backend = graph.vla.runtime.core.backend
    base_model = id(backend.model)
    reports = []
    graph.peer.create_subscription(DiagnosticArray, "/diagnostics", reports.append, 10)

    def adapter_reported(prefix: str) -> bool:
        values = [{kv.key: kv.value for kv in r.status[0].values} for r in reports[-3:]]
        return any(v.get("adapter", "").startswith(prefix) for v in values)

    assert spin_until(graph.executor, lambda: adapter_reported("a@"), 10)
    # load a second adapter at runtime, then switch to it (both carried out in the background)
    assert graph.vla.set_parameters([Parameter("adapters", value=[f"a={first}", f"b={second}"])])[0].successful
    assert graph.vla.set_parameters([Parameter("active_adapter", value="b")])[0].successful
    reports.clear()
    assert spin_until(graph.executor, lambda: adapter_reported("b@"), 30)
    assert backend.adapter_id.startswith("b@")
    assert id(backend.model) == base_model, "hot swap must not reload the base model"


def test_diagnostics_report_the_camera_feed(graph_factory, tiny_model_dir):
    from diagnostic_msgs.msg import DiagnosticArray

    graph = graph_factory(model_path=str(tiny_model_dir), diagnostics_period_s=0.1)
    reports = []
    graph.peer.create_subscription(DiagnosticArray, "/diagnostics", reports.append, 10)

    def latest_values() -> dict:
        return {kv.key: kv.value for kv in reports[-1].status[0].values} if reports else {}

    assert spin_until(graph.executor, lambda: latest_values().get("camera_frames") == "0", 10)
    assert "camera_frame_age_s" not in latest_values()  # no frame yet: nothing to age
    sent_ns = graph.vla.get_clock().now().nanoseconds - 3 * 10**9  # stamped 3 s ago: a late frame
    graph.send_image(_scene(), stamp_ns=sent_ns)
    graph.send_image(_scene(1), stamp_ns=sent_ns)
    assert spin_until(graph.executor, lambda: latest_values().get("camera_frames") == "2", 10)
    values = latest_values()
    assert 0.0 <= float(values["camera_frame_age_s"]) < 5.0
    assert float(values["camera_transport_delay_s"]) >= 3.0  # received 3 s after its stamp


def _camera_reliability_follows(graph, reliable: bool, timeout_s: float = 10.0) -> bool:
    return spin_until(graph.executor, lambda: graph.vla.runtime._camera_reliable is reliable, timeout_s)


def test_camera_subscription_follows_the_publishers_reliability(graph_factory, tiny_model_dir):
    from rclpy.qos import QoSProfile, QoSReliabilityPolicy

    graph = graph_factory(model_path=str(tiny_model_dir))
    runtime = graph.vla.runtime
    # the test graph's camera publisher is reliable (the default profile): auto reads reliably from the start
    assert runtime._camera_reliable is True
    assert runtime._camera_sub.qos_profile.reliability == QoSReliabilityPolicy.RELIABLE
    topic = runtime._camera_sub.topic_name
    graph.send_image(_scene())
    assert spin_until(graph.executor, lambda: runtime.pipeline.frames_received >= 1, 10)
    # a best-effort camera joins: a reliable reader would not match it, so the node goes best effort
    best_effort = graph.peer.create_publisher(Image, topic, QoSProfile(
        depth=5, reliability=QoSReliabilityPolicy.BEST_EFFORT))
    assert _camera_reliability_follows(graph, False)
    assert runtime._camera_sub.qos_profile.reliability == QoSReliabilityPolicy.BEST_EFFORT
    before = runtime.pipeline.frames_received
    message = Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(192))
    best_effort.publish(message)
    assert spin_until(graph.executor, lambda: runtime.pipeline.frames_received > before, 10)
    graph.peer.destroy_publisher(best_effort)
    assert _camera_reliability_follows(graph, True)


def test_fixed_camera_reliability_and_a_bad_value(graph_factory, tiny_model_dir, ros_context):
    graph = graph_factory(model_path=str(tiny_model_dir), camera_reliability="best_effort")
    spin_until(graph.executor, lambda: False, 2.5)  # no auto timer: stays as configured
    assert graph.vla.runtime._camera_reliable is False
    with pytest.raises(ValueError, match="camera_reliability must be one of auto, best_effort, reliable"):
        VlaNode(context=ros_context, parameter_overrides=[Parameter("camera_reliability", value="sometimes"),
                                                           Parameter("model_path", value=str(tiny_model_dir))])


def test_the_old_module_name_still_starts_the_node_with_a_deprecation_line():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "vla_node.node", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "--lifecycle" in run.stdout
    assert "vla_node.node is deprecated: the node is vla_node.ros.node" in run.stderr


# ------------------------------------------------------------------------------------- topics
def test_topic_parameters_come_from_a_params_file_and_hold_the_names_in_use(ros_context, tiny_model_dir, tmp_path):
    """Params file, -p and remaps combine the ROS way; each topic parameter then holds the full
    name the node uses (namespace and remaps applied), and the node is on exactly those topics."""
    params = tmp_path / "params.yaml"
    params.write_text("/**:\n  ros__parameters:\n    camera_topic: /from/yaml/image\n"
                      "    action_topic: from/yaml/actions\n    status_topic: /from/yaml/status\n"
                      "    max_image_age_s: 7.5\n", encoding="utf-8")
    node = VlaNode(context=ros_context, namespace="robot1", cli_args=[
        "--ros-args", "--params-file", str(params), "-p", "status_topic:=/from/p/status",
        "-r", "speech/text:=/remapped/speech"],
        parameter_overrides=[Parameter("model_path", value=str(tiny_model_dir)), Parameter("warmup", value=False)])
    try:
        values = {name: node.get_parameter(name).value for name in
                  ("camera_topic", "speech_topic", "action_topic", "status_topic", "debug_image_topic",
                   "max_image_age_s")}
        assert values == {"camera_topic": "/from/yaml/image", "speech_topic": "/remapped/speech",
                          "action_topic": "/robot1/from/yaml/actions", "status_topic": "/from/p/status",
                          "debug_image_topic": "/robot1/vla/debug_image", "max_image_age_s": 7.5}
        subscribed = {name for name, _ in node.get_subscriber_names_and_types_by_node("vla_node", "/robot1")}
        published = {name for name, _ in node.get_publisher_names_and_types_by_node("vla_node", "/robot1")}
        assert {"/from/yaml/image", "/remapped/speech"} <= subscribed
        assert {"/robot1/from/yaml/actions", "/from/p/status", "/robot1/vla/debug_image"} <= published
        assert not {"/robot1/camera/image_raw", "/camera/image_raw"} & subscribed
        result = node.set_parameters([Parameter("camera_topic", value="/elsewhere")])[0]
        assert not result.successful, "topics are read at start"
    finally:
        node.shutdown()
        node.destroy_node()


def test_a_bad_topic_name_refuses_to_start_naming_the_parameter(ros_context, tiny_model_dir):
    with pytest.raises(ValueError, match="camera_topic: 'not a topic!' is not a valid topic name"):
        VlaNode(context=ros_context, parameter_overrides=[Parameter("camera_topic", value="not a topic!"),
                                                           Parameter("model_path", value=str(tiny_model_dir))])


# ------------------------------------------------------------------------------------- adapters
def test_an_adapter_load_runs_beside_the_executor_and_a_failed_one_keeps_the_old_adapter(graph_factory,
                                                                                         tiny_model_dir, tmp_path):
    first = build_lora_adapter(tiny_model_dir, tmp_path / "a", seed=4, manifest=False)
    second = build_lora_adapter(tiny_model_dir, tmp_path / "b", seed=5, manifest=False)
    broken = build_lora_adapter(tiny_model_dir, tmp_path / "broken", seed=6, manifest=False)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: found at load time, not at the set
    graph = graph_factory(model_path=str(tiny_model_dir), adapters=[f"a={first}"], active_adapter="a",
                          diagnostics_period_s=0.2)
    runtime = graph.vla.runtime
    backend = runtime.core.backend
    reports = []
    from diagnostic_msgs.msg import DiagnosticArray

    graph.peer.create_subscription(DiagnosticArray, "/diagnostics", reports.append, 10)

    def diagnostics() -> dict:
        return {kv.key: kv.value for kv in reports[-1].status[0].values} if reports else {}

    # The model is busy (as during a long generation): the load waits for it, the node does not.
    with backend.lock:
        result = graph.vla.set_parameters_atomically([Parameter("adapters", value=[f"a={first}", f"b={second}"]),
                                                      Parameter("active_adapter", value="b")])
        assert result.successful, result.reason
        assert runtime.adapters.pending() == 1
        before = runtime.pipeline.frames_received
        for seed in range(3):
            graph.send_image(_scene(seed))
        assert spin_until(graph.executor, lambda: runtime.pipeline.frames_received >= before + 3, 10), \
            "camera frames are received while the adapter loads"
        assert spin_until(graph.executor, lambda: diagnostics().get("adapter_change", "").startswith("loading b"), 10)
        assert runtime.adapters.pending() == 1 and backend.adapter_id.startswith("a@")
    assert spin_until(graph.executor, lambda: runtime.adapters.pending() == 0, 60)
    assert spin_until(graph.executor, lambda: diagnostics().get("adapter", "").startswith("b@"), 10)
    assert diagnostics()["adapters_loaded"] == "a, b" and diagnostics()["adapter_change"] == "idle"

    # a load that fails: "b" stays active, and the parameters say what is loaded
    result = graph.vla.set_parameters_atomically([
        Parameter("adapters", value=[f"a={first}", f"b={second}", f"broken={broken}"]),
        Parameter("active_adapter", value="broken")])
    assert result.successful, "the directory exists: the set is accepted, the load decides"
    assert spin_until(graph.executor, lambda: graph.vla.get_parameter("active_adapter").value == "b", 60)
    assert list(graph.vla.get_parameter("adapters").value) == [f"a={first}", f"b={second}"]
    assert backend.adapter_id.startswith("b@")
    assert spin_until(graph.executor, lambda: diagnostics().get("adapter_change", "").startswith("failed"), 10)
    assert "broken" in diagnostics()["adapter_change"] and reports[-1].status[0].level == b"\x01"  # WARN
    graph.send_image(_scene())
    graph.say("pick up the red cube")
    (status,) = graph.wait_statuses(1)  # the node still answers
    assert status.code_name in ("ACCEPTED", "PARSE_ERROR")


def test_an_adapter_set_is_checked_whole_and_a_refused_one_changes_nothing(graph_factory, tiny_model_dir, tmp_path):
    first = build_lora_adapter(tiny_model_dir, tmp_path / "a", seed=4, manifest=False)
    graph = graph_factory(model_path=str(tiny_model_dir), adapters=[f"a={first}"])
    runtime = graph.vla.runtime
    refusals = {
        "not one of the adapters": [Parameter("adapters", value=[f"a={first}", f"b={tmp_path / 'b'}"]),
                                    Parameter("active_adapter", value="c")],
        "is not a directory": [Parameter("adapters", value=[f"a={first}", f"b={tmp_path / 'missing'}"]),
                               Parameter("active_adapter", value="b")],
        "cannot be unloaded": [Parameter("adapters", value=[""])],
        "is loaded from": [Parameter("adapters", value=[f"a={tmp_path}"])],
        "given twice": [Parameter("adapters", value=[f"a={first}", f"a={first}"])],
    }
    (tmp_path / "b").mkdir()
    for reason, parameters in refusals.items():
        result = graph.vla.set_parameters_atomically(parameters)
        assert not result.successful and reason in result.reason, (reason, result.reason)
    assert runtime.adapters.pending() == 0
    assert list(graph.vla.get_parameter("adapters").value) == [f"a={first}"]
    assert graph.vla.get_parameter("active_adapter").value == ""
    assert runtime.core.backend.adapter_names() == ["a"]


@needs_embedded
def test_the_embedded_chinese_adapter_is_loaded_by_default_and_swaps_in(graph_factory):
    from vla_node.factory import EMBEDDED_ADAPTER

    if not (embedded / EMBEDDED_ADAPTER).is_dir():
        pytest.skip("this embedded model comes without its Chinese adapter")
    graph = graph_factory()
    assert list(graph.vla.get_parameter("adapters").value) == ["zh=embedded"]
    assert graph.vla.get_parameter("active_adapter").value == ""
    backend = graph.vla.runtime.core.backend
    assert backend.adapter_names() == ["zh"] and backend.adapter_id == ""
    assert graph.vla.set_parameters([Parameter("active_adapter", value="zh")])[0].successful  # the README's line
    assert spin_until(graph.executor, lambda: backend.adapter_id.startswith("zh@"), 30)


# ------------------------------------------------------------------------------------- debug image
@needs_embedded
def test_the_debug_image_is_drawn_only_when_watched_with_the_plans_boxes(graph_factory):
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy

    from vla_node.drawing import BOX_COLOURS

    graph = graph_factory(max_new_tokens=128)
    debug = graph.vla.runtime.debug_image
    # The drawing is under test, not the model: take the first held-out move command whose plan
    # carries a box (a CLARIFY has nothing to draw). At most a few are needed.
    for attempt, (scene, command) in enumerate(itertools.islice(_embedded_scenes(), 8), start=1):
        graph.send_image(scene)
        graph.say(command)
        status = graph.wait_statuses(attempt)[-1]
        assert status.code_name == "ACCEPTED", status.detail
        assert spin_until(graph.executor, lambda: len(graph.plans) >= attempt, 5)
        if any(step.has_object_box or step.has_destination_box for step in graph.plans[-1].steps):
            break
    else:
        raise AssertionError("none of 8 held-out move commands was answered with a box")
    spin_until(graph.executor, lambda: False, 0.5)
    assert debug.published == 0, "nobody watches: nothing is drawn"

    images = []
    latched = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
    graph.peer.create_subscription(Image, "/vla/debug_image", images.append, latched)
    assert spin_until(graph.executor, lambda: images, 10), "a late joiner gets the latest answer"
    _assert_boxes_drawn(images[-1], graph.plans[-1], scene, BOX_COLOURS)

    graph.send_image(scene)
    graph.say(command)
    graph.wait_statuses(attempt + 1)
    assert spin_until(graph.executor, lambda: len(images) >= 2, 10), "watched: each answer is drawn"
    assert debug.published == 2
    assert images[-1].header.frame_id == "camera_optical"


def _assert_boxes_drawn(image, plan, scene: np.ndarray, colours: dict) -> None:
    assert (image.height, image.width, image.encoding) == (scene.shape[0], scene.shape[1], "bgr8")
    bgr = np.frombuffer(bytes(image.data), np.uint8).reshape(image.height, image.width, 3)
    boxes = [(np.asarray(getattr(step, key)), colour) for step in plan.steps
             for key, colour in colours.items() if getattr(step, f"has_{key}")]
    assert boxes, "the embedded model's held-out move command comes with boxes"
    for box, colour in boxes:
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        y = min(max((y1 + y2) // 2, 0), image.height - 1)
        left = bgr[y, max(x1 - 1, 0):x1 + 2]
        assert (left == colour).all(axis=1).any(), f"no {colour} edge at x={x1}, y={y}: {left.tolist()}"


def test_a_frame_that_cannot_be_decoded_draws_nothing_and_the_next_answer_is_drawn(graph_factory, tiny_model_dir):
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy

    graph = graph_factory(model_path=str(tiny_model_dir))
    images = []
    graph.peer.create_subscription(Image, "/vla/debug_image", images.append, QoSProfile(
        depth=1, reliability=QoSReliabilityPolicy.RELIABLE, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL))
    assert spin_until(graph.executor, lambda: graph.vla.runtime.debug_image.publisher.get_subscription_count(), 10)
    broken = Image(height=120, width=160, encoding="rgb8", step=480, data=bytes(100))  # too few bytes
    broken.header.stamp = graph.vla.get_clock().now().to_msg()
    graph.camera.publish(broken)
    spin_until(graph.executor, lambda: False, 0.3)
    graph.say("pick up the red cube")
    assert graph.wait_statuses(1)[0].code_name == "BAD_IMAGE"
    spin_until(graph.executor, lambda: False, 1.5)
    assert images == [], "no picture of a frame that has none"
    graph.send_image(_scene())
    graph.say("pick up the red cube")
    status = graph.wait_statuses(2)[1]
    assert spin_until(graph.executor, lambda: images, 10)
    assert (images[-1].height, images[-1].width) == (120, 160) and status.code_name != "BAD_IMAGE"
