"""`vla-replay BAG`: replay a recorded rosbag2 bag through the vla node and report what it did.

Camera + speech messages are read with `rosbags` (vla_node.bag_io) and published through
rclpy to the REAL node: by default a VlaNode started in this process in its own rclpy
context on a random free ROS domain (nothing else on the network sees the traffic), or with
--external an already running node on $ROS_DOMAIN_ID. The node's plans and statuses are
recorded into an output bag and summarised in report.json / report.md (vla_node.report);
--expect compares them with an expectation file, --export-dataset turns accepted (or
corrected) plans into a LLaMA-Factory ShareGPT dataset.

Its rclpy side is vla_node.ros.replay_session (rclpy lives in vla_node.ros only), imported
when a replay starts, so `vla-replay --help` is instant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vla_node.bag_io import BagError, BagInfo, OutputBag, inspect_bag, iter_messages
from vla_node.files import atomic_write_text, replace_dir
from vla_node.replay_table import print_table  # noqa: F401  (the demo prints it too)
from vla_node.report import (
    DEFAULT_MIN_IOU,
    CommandResult,
    FrameRecord,
    ReportFileError,
    build_report,
    compare,
    expectations_from_results,
    export_dataset,
    load_corrections,
    load_expectations,
    write_report,
)
from vla_node.settings import PARAMETERS, ParameterError, coerce

if TYPE_CHECKING:  # the rclpy side, imported only when a replay runs
    from vla_node.ros.replay_session import ReplaySession

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT = 0, 1, 2
AFAP_SETTLE_S = 0.05  # --as-fast-as-possible: pause between the last frame and a command
FOREIGN_CLOCK_S = 60.0  # a header stamp this far from its bag time comes from another clock


class ReplayError(Exception):
    """The replay cannot run (node does not start, no node to talk to, bad option): exit code 2."""


DESCRIPTION = """\
Replay a rosbag2 bag (sqlite3 or mcap, as `ros2 bag record` writes it) with a camera topic
(sensor_msgs/msg/Image or CompressedImage) and a speech topic (std_msgs/msg/String) through
the vla node, record its plans (/vla/actions) and statuses (/vla/status) and report them.

By default the REAL node (vla_node.ros.node.VlaNode) is started in this process, in its own rclpy
context on a random free ROS domain 10..99 with localhost-only discovery; node parameters come
from --model/--adapter/--active-adapter/-p (and from an --expect file's "node_parameters" for
those not given). With --external an already running node on $ROS_DOMAIN_ID is used instead
(it keeps the frames it already has: NO_IMAGE is only seen by a freshly started node).

Timing: at --rate R (default 1.0) each message goes out at its recorded time divided by R,
and image header stamps are rewritten to the replay clock: now + (t - t0)/R for a frame
recorded at t (t0 = the bag's first message; a camera's stamp-to-receive latency is kept), so
the node's staleness check (max_image_age_s) sees the recorded gaps divided by R: at the
default rate exactly the recorded ones. --as-fast-as-possible does not wait for recorded
times but still waits for each command's status before publishing anything after it (so a
burst of commands never meets a full queue: expect no BUSY); frames are then stamped so that
each command sees its frame exactly as old as in the recording (a frame reused by a later
command is waited on until it is that old, at most until just past the node's
max_image_age_s). --keep-stamps publishes the recorded stamps unchanged (the node will then
usually answer STALE_IMAGE).

Statuses are matched to the commands sent by command text in FIFO order (the node assigns
its own ids), the text taken as ROS delivers it (cut at the first NUL byte) and as the node
echoes it (sanitised, or the first 200 characters of a refused one). Output (a temporary directory renamed when complete): output_bag/ (the node's
ActionPlan + CommandStatus messages, message definitions included), report.json, report.md.

exit status: 0 done; 1 the results differ from --expect (a unified diff is printed) or the
node left commands unanswered; 2 bad input (missing topics, unreadable or corrupt bag, unknown
message types, malformed expectation/corrections file) or the replay could not run; no
output is left behind then."""

EPILOG = """\
examples:
  vla-replay session_bag/
  vla-replay tests/data/golden_mcap --expect tests/data/golden_mcap.expect.json
  vla-replay bag/ --adapter zh=embedded --active-adapter zh --write-expect bag.expect.json
  vla-replay bag/ --export-dataset data/from_robot --corrections out/replay/bag/report.json
  vla-replay bag/ --external --as-fast-as-possible     # a node already running on $ROS_DOMAIN_ID"""


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla-replay", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bag", type=Path, help="rosbag2 directory (or its .mcap/.db3 file)")
    g = p.add_argument_group("input")
    g.add_argument("--camera-topic", help="camera topic in the bag (default: the one Image/CompressedImage topic)")
    g.add_argument("--speech-topic", help="speech topic in the bag (default: the one std_msgs/msg/String topic)")
    g = p.add_argument_group("timing")
    g.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0 = recorded timing)")
    g.add_argument("--as-fast-as-possible", action="store_true",
                   help="no recorded timing; wait for each command's status before going on")
    g.add_argument("--keep-stamps", action="store_true", help="publish the recorded image header stamps unchanged")
    g = p.add_argument_group("node")
    g.add_argument("--external", action="store_true",
                   help="talk to a running node on $ROS_DOMAIN_ID instead of starting one")
    g.add_argument("--model", metavar="DIR", help="model_path parameter ('' = the embedded tabletop-tiny model)")
    g.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="add to the adapters parameter (repeatable; PATH 'embedded' = the bundled zh LoRA)")
    g.add_argument("--active-adapter", metavar="NAME", help="active_adapter parameter")
    g.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE",
                   help="any other node parameter, e.g. -p max_image_age_s:=3.0 (see config/vla_node.yaml)")
    g.add_argument("--to-camera-topic", help="with --external: publish the camera here (default: the bag's topic)")
    g.add_argument("--to-speech-topic", help="with --external: publish speech here (default: the bag's topic)")
    g.add_argument("--action-topic", default="/vla/actions", help="plans topic to record (default /vla/actions)")
    g.add_argument("--status-topic", default="/vla/status", help="status topic to record (default /vla/status)")
    g.add_argument("--status-timeout", type=float, default=60.0, metavar="S",
                   help="give up on missing statuses after S seconds without progress (default 60)")
    g.add_argument("--startup-timeout", type=float, default=20.0, metavar="S",
                   help="seconds to wait for the node's topics to connect (default 20)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="output directory (default out/replay/<bag name>)")
    g.add_argument("--out-storage", choices=("mcap", "sqlite3"), default="mcap", help="output bag storage")
    g.add_argument("--expect", type=Path, metavar="FILE",
                   help="compare with this expectation file (status per command, steps verb/object/"
                        "destination/reason, boxes by IoU); exit 1 with a diff when they differ")
    g.add_argument("--min-iou", type=float, help=f"box tolerance for --expect (default: the file's, else "
                                                 f"{DEFAULT_MIN_IOU})")
    g.add_argument("--write-expect", type=Path, metavar="FILE", help="write the results as an expectation file")
    g.add_argument("--export-dataset", type=Path, metavar="DIR",
                   help="write accepted plans + the frames their commands used as a ShareGPT dataset")
    g.add_argument("--corrections", type=Path, metavar="REPORT.json",
                   help="with --export-dataset: an edited report.json whose corrected_actions replace plans")
    g.add_argument("--dataset-name", default="vla_replay", help="dataset name in dataset_info.json")
    p.add_argument("-v", "--verbose", action="store_true", help="show the node's own log output")
    p.add_argument("-q", "--quiet", action="store_true", help="no table, only errors and the diff")
    return p


# ------------------------------------------------------------------------------- options
@dataclass
class ReplayOptions:
    bag: Path
    out: Path | None = None
    camera_topic: str | None = None
    speech_topic: str | None = None
    rate: float = 1.0
    as_fast_as_possible: bool = False
    keep_stamps: bool = False
    external: bool = False
    node_parameters: dict[str, Any] = field(default_factory=dict)
    to_camera_topic: str | None = None
    to_speech_topic: str | None = None
    action_topic: str = "/vla/actions"
    status_topic: str = "/vla/status"
    status_timeout_s: float = 60.0
    startup_timeout_s: float = 20.0
    out_storage: str = "mcap"
    export_dataset: Path | None = None
    corrections: Path | None = None
    dataset_name: str = "vla_replay"
    verbose: bool = False

    def pacing(self) -> dict:
        return {"rate": self.rate, "as_fast_as_possible": self.as_fast_as_possible,
                "keep_stamps": self.keep_stamps}


def parse_node_parameter(spec: str) -> tuple[str, Any]:
    """'name:=value' typed like the parameter's default (vla_node.settings)."""
    name, sep, text = spec.partition(":=")
    if not sep:
        name, sep, text = spec.partition("=")
    name = name.strip()
    if not sep or name not in PARAMETERS:
        known = ", ".join(PARAMETERS)
        raise ReplayError(f"-p {spec!r}: expected NAME:=VALUE with NAME one of: {known}")
    return name, coerce_parameter(name, text)


def coerce_parameter(name: str, value: Any) -> Any:
    try:
        return coerce(name, value)
    except ParameterError as error:
        raise ReplayError(str(error)) from None


def options_from_args(args: argparse.Namespace) -> ReplayOptions:
    params: dict[str, Any] = {}
    if args.model is not None:
        params["model_path"] = args.model
    if args.adapter:
        params["adapters"] = list(args.adapter)
    if args.active_adapter is not None:
        params["active_adapter"] = args.active_adapter
    for spec in args.param:
        name, value = parse_node_parameter(spec)
        params[name] = value
    for option, value in (("--rate", args.rate), ("--status-timeout", args.status_timeout),
                          ("--startup-timeout", args.startup_timeout)):
        if not (math.isfinite(value) and value > 0):  # a nan timeout would wait forever
            raise ReplayError(f"{option} must be a finite number > 0, got {value}")
    if args.min_iou is not None and not 0.0 <= args.min_iou <= 1.0:  # also refuses nan
        raise ReplayError(f"--min-iou must be between 0 and 1, got {args.min_iou}")
    if args.corrections is not None and args.export_dataset is None:
        raise ReplayError("--corrections only makes sense with --export-dataset DIR")
    if args.external and params:
        raise ReplayError("--external talks to a running node: its parameters cannot be set from here "
                          f"(got {', '.join(params)}); use `ros2 param set` on that node")
    return ReplayOptions(
        bag=args.bag, out=args.out, camera_topic=args.camera_topic, speech_topic=args.speech_topic,
        rate=args.rate, as_fast_as_possible=args.as_fast_as_possible, keep_stamps=args.keep_stamps,
        external=args.external, node_parameters=params, to_camera_topic=args.to_camera_topic,
        to_speech_topic=args.to_speech_topic, action_topic=args.action_topic, status_topic=args.status_topic,
        status_timeout_s=args.status_timeout, startup_timeout_s=args.startup_timeout,
        out_storage=args.out_storage, export_dataset=args.export_dataset, corrections=args.corrections,
        dataset_name=args.dataset_name, verbose=args.verbose,
    )


# ------------------------------------------------------------------------------- what the node runs
@dataclass
class BackendInfo:
    """The model that answered: its ids, and what turns its boxes back into pixels."""

    model_id: str = ""
    adapter_id: str = ""
    coordinate_convention: str = ""
    pixel_limits: Any = None

    @classmethod
    def of(cls, backend) -> BackendInfo:
        return cls(backend.model_id, backend.adapter_id, backend.coordinate_convention, backend.pixel_limits)


def node_parameters(options: ReplayOptions, info: BagInfo) -> dict[str, Any]:
    """The in-process node's parameters: the user's, and the topics and transport of the bag."""
    params = {name: coerce_parameter(name, value) for name, value in options.node_parameters.items()}
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ReplayError(f"unknown node parameters: {', '.join(unknown)}")
    params.update({
        "camera_topic": info.camera_topic,
        "speech_topic": info.speech_topic,
        "camera_transport": "compressed" if info.compressed else "raw",
        "action_topic": options.action_topic,
        "status_topic": options.status_topic,
    })
    return params


class Tracker:
    """Sent commands, matched FIFO by text with the statuses that come back; plans by id."""

    def __init__(self, results: list[CommandResult]):
        self.results = results
        self._cond = threading.Condition()
        self._waiting: list[tuple[CommandResult, set[str]]] = []
        self.plans: dict[str, Any] = {}
        self.unmatched: list[Any] = []
        self.failure: str | None = None  # set when the ROS side died: waiting is pointless
        self.progress_ns = time.monotonic_ns()

    @staticmethod
    def _keys(text: str) -> set[str]:
        """The command texts a status for `text` may carry: the node sees the text as ROS delivers
        it (cut at the first NUL) and echoes it sanitised, or, when it refuses it, as echo_refused."""
        from vla_node.text import CommandError, as_delivered, echo_refused, sanitize_command

        delivered = as_delivered(text)
        keys = {delivered, delivered.strip(), echo_refused(delivered)}
        try:
            keys.add(sanitize_command(delivered, max_bytes=1 << 20))
        except CommandError:
            pass
        return keys

    def sent(self, result: CommandResult) -> None:
        with self._cond:
            self._waiting.append((result, self._keys(result.text)))

    def on_status(self, status, received_ns: int) -> None:
        with self._cond:
            for i, (result, keys) in enumerate(self._waiting):
                if status.command_text in keys:
                    del self._waiting[i]
                    result.status, result.status_ns = status, received_ns
                    break
            else:
                self.unmatched.append(status)
            self.progress_ns = time.monotonic_ns()
            self._cond.notify_all()

    def on_plan(self, plan) -> None:
        with self._cond:
            self.plans[plan.command_id] = plan
            self._cond.notify_all()

    def wait(self, condition, timeout_s: float) -> bool:
        """Wait until condition() (called under the lock) or timeout_s without any progress."""
        with self._cond:
            while not condition():
                if self.failure is not None:
                    raise ReplayError(self.failure)
                idle_s = (time.monotonic_ns() - self.progress_ns) / 1e9
                if idle_s >= timeout_s:
                    return False
                self._cond.wait(min(0.1, timeout_s - idle_s))
            return True

    def fail(self, reason: str) -> None:
        with self._cond:
            self.failure = reason
            self._cond.notify_all()

    def all_answered(self) -> bool:
        return not self._waiting

    def attach_plans(self, wait_s: float = 2.0) -> None:
        def have_plans() -> bool:
            return all(r.status.command_id in self.plans for r in self.results
                       if r.status is not None and r.status.code.value in ("ACCEPTED", "STOPPED"))

        deadline = time.monotonic() + wait_s
        with self._cond:
            while not have_plans() and time.monotonic() < deadline:
                self._cond.wait(0.05)
            for result in self.results:
                if result.status is not None:
                    result.plan = self.plans.get(result.status.command_id)


# ------------------------------------------------------------------------------- playback
def _camera_offset_ns(message, log_ns: int) -> int:
    """Recorded stamp-to-receive offset of a camera message (0 when the stamp is another clock)."""
    from vla_node.ros.convert import time_to_ns

    stamp = time_to_ns(message.header.stamp)
    offset = stamp - log_ns
    return offset if stamp and abs(offset) < FOREIGN_CLOCK_S * 1e9 else 0


def _sleep_until(target_monotonic: float) -> None:
    while True:
        left = target_monotonic - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def play(session: ReplaySession, info: BagInfo, options: ReplayOptions, tracker: Tracker,
         log=print) -> list[CommandResult]:
    """Publish the bag's camera and speech messages; returns one result per command."""
    from vla_node.ros.convert import image_decoder, ns_to_time, time_to_ns

    results = tracker.results
    command_times = [c.log_ns for c in info.commands]
    next_command = 0
    last_frame: FrameRecord | None = None
    last_frame_bag_ns = 0  # bag time the last frame's stamp stands for (receive time + camera offset)
    origin_mono = time.monotonic()
    origin_ns = time.time_ns()
    afap = options.as_fast_as_possible
    for topic, log_ns, raw in iter_messages(info):
        bag_s = (log_ns - info.start_ns) / 1e9
        if not afap:
            _sleep_until(origin_mono + bag_s / options.rate)
        if topic == info.camera_topic:
            message = session.deserialize_camera(raw)
            offset = _camera_offset_ns(message, log_ns)
            last_frame_bag_ns = log_ns + offset
            if not options.keep_stamps:
                if afap:  # exactly as old, for the next command, as in the recording
                    upcoming = command_times[next_command] if next_command < len(command_times) else log_ns
                    stamp = time.time_ns() - (upcoming - last_frame_bag_ns)
                else:
                    stamp = origin_ns + int((last_frame_bag_ns - info.start_ns) / options.rate)
                message.header.stamp = ns_to_time(stamp)
            session.publish_camera(message)
            last_frame = FrameRecord(bag_s, time_to_ns(message.header.stamp), image_decoder(message))
            continue
        command = info.commands[next_command]
        next_command += 1
        result = results[command.index]
        result.frame = last_frame
        if afap:
            time.sleep(AFAP_SETTLE_S)
            if last_frame is not None and not options.keep_stamps:
                _age_frame(last_frame, command.log_ns - last_frame_bag_ns, session.max_image_age_s)
        tracker.sent(result)
        result.sent_ns = time.time_ns()
        session.publish_command(command.text)
        if afap and not tracker.wait(lambda r=result: r.status is not None, options.status_timeout_s):
            log(f"vla-replay: no status for command {command.index} ({command.text!r}) after "
                f"{options.status_timeout_s} s; going on")
    if not tracker.wait(tracker.all_answered, options.status_timeout_s):
        missing = [r.index for r in results if r.status is None]
        log(f"vla-replay: the node sent no status for command(s) {missing} within {options.status_timeout_s} s")
    tracker.attach_plans()
    return results


def _age_frame(frame: FrameRecord, recorded_age_ns: int, max_image_age_s: float | None) -> None:
    """--as-fast-as-possible: a frame reused by a later command must look as old as recorded.

    Its stamp was set for the first command after it; wait (really) until it has the age the
    recording gives this command, capped just past max_image_age_s when the node's is known
    (older than that is STALE_IMAGE either way).
    """
    target_ns = recorded_age_ns
    if max_image_age_s is not None:
        target_ns = min(target_ns, int((max_image_age_s + 0.5) * 1e9))
    wait_s = (target_ns - (time.time_ns() - frame.stamp_ns)) / 1e9
    if wait_s > 0:
        time.sleep(wait_s)


# ------------------------------------------------------------------------------- one replay
@dataclass
class ReplayResult:
    info: BagInfo
    results: list[CommandResult]
    report: dict
    out_dir: Path
    backend: BackendInfo
    node_parameters: dict[str, Any]
    export: Any = None


def default_out_dir(info: BagInfo) -> Path:
    return Path("out") / "replay" / info.name


def replay_bag(options: ReplayOptions, log=print, finish=None) -> ReplayResult:
    """Inspect the bag, run it through the node, write output bag + report (+ dataset).

    `finish(directory, results)`, if given, adds files to the output directory before it is
    renamed into place (the demo's annotated frames).
    """
    from vla_node.bag_io import PLAN_TYPE, STATUS_TYPE, package_typestore

    store = package_typestore()
    info = inspect_bag(options.bag, options.camera_topic, options.speech_topic, typestore=store)
    corrections = load_corrections(options.corrections) if options.corrections else None
    out_dir = options.out or default_out_dir(info)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        results = [CommandResult(c.index, c.text, (c.log_ns - info.start_ns) / 1e9) for c in info.commands]
        tracker = Tracker(results)
        params = {} if options.external else node_parameters(options, info)
        output = OutputBag(partial / "output_bag", options.out_storage, typestore=store)
        output.add_topic(options.action_topic, PLAN_TYPE)
        output.add_topic(options.status_topic, STATUS_TYPE)
        from vla_node.ros.replay_session import ReplaySession, SessionError  # rclpy lives in vla_node.ros

        session = ReplaySession(options, info, params, tracker, output)
        started = time.time()
        backend = BackendInfo()
        try:
            try:
                session.start()
            except SessionError as error:
                raise ReplayError(str(error)) from None
            if session.served_by is not None:
                backend = BackendInfo.of(session.served_by)
                log(f"vla-replay: {info.name}: {len(info.commands)} command(s), {info.camera_count} image(s), "
                    f"{info.duration_s:.1f} s; node on ROS domain {session.domain_id}, model "
                    f"{backend.model_id} (adapter: {backend.adapter_id or 'none'})")
            play(session, info, options, tracker, log=log)
        finally:
            session.stop()
            output.close()
        if options.external:  # what the plans say
            plans = [r.plan for r in results if r.plan is not None and r.plan.model_id]
            if plans:
                backend = BackendInfo(plans[-1].model_id, plans[-1].adapter_id)
        vocab = _vocabulary(params)
        header = {
            "format": 1,
            "tool": "vla-replay",
            "bag": str(options.bag),
            "bag_name": info.name,
            "storage": info.storage,
            "camera_topic": info.camera_topic,
            "camera_type": info.camera_type,
            "speech_topic": info.speech_topic,
            "node": {"mode": "external" if options.external else "in-process", "domain_id": session.domain_id,
                     "model_id": backend.model_id, "adapter_id": backend.adapter_id,
                     "parameters": options.node_parameters},
            "replay": {**options.pacing(), "pacing": _pacing_text(options)},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": round(time.time() - started, 2),
            "output_bag": "output_bag",
            "unmatched_statuses": [s.model_dump(mode="json") for s in tracker.unmatched],
        }
        report = build_report(results, header, vocab)
        write_report(partial, report)
        export = None
        if options.export_dataset is not None:
            export = export_dataset(options.export_dataset, results, vocab, info.name,
                                    box_codec=_box_codec_factory(backend), corrections=corrections,
                                    corrections_path=options.corrections or "", dataset_name=options.dataset_name)
        if finish is not None:
            finish(partial, results)
        replace_dir(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ReplayResult(info, results, report, out_dir, backend, params, export)


def _pacing_text(options: ReplayOptions) -> str:
    if options.as_fast_as_possible:
        text = "as fast as possible (each command waits for the previous status)"
    else:
        text = f"recorded timing x{options.rate:g}"
    return text + (", recorded stamps" if options.keep_stamps else ", stamps rewritten to the replay clock")


def _vocabulary(params: dict):
    from vla_node.vocabulary import Vocabulary

    try:
        return Vocabulary.load(params.get("vocabulary_path") or None)
    except Exception:
        return None


def _box_codec_factory(backend: BackendInfo):
    """The model's BoxCodec for a frame size, or None (boxes dropped) when the model is unknown."""
    if not backend.coordinate_convention or backend.pixel_limits is None:
        return None
    from vla_node.image import smart_resize
    from vla_node.parser import BoxCodec

    def make(width: int, height: int):
        resized_h, resized_w = smart_resize(height, width, backend.pixel_limits)
        return BoxCodec(backend.coordinate_convention, (width, height), (resized_w, resized_h))

    return make


# ------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    try:
        options = options_from_args(args)
        expect = load_expectations(args.expect) if args.expect else None
        if expect is not None:
            taken = {k: v for k, v in expect.get("node_parameters", {}).items()
                     if k not in options.node_parameters}
            if taken and not options.external:
                unknown = sorted(set(taken) - set(PARAMETERS))
                if unknown:
                    raise ReportFileError(f"{args.expect}: node_parameters has unknown parameters {unknown}")
                options.node_parameters.update({k: coerce_parameter(k, v) for k, v in taken.items()})
                log(f"vla-replay: node parameters from {args.expect}: "
                    + ", ".join(f"{k}={v!r}" for k, v in taken.items()))
        result = replay_bag(options, log=log)
    except (BagError, ReplayError, ReportFileError) as error:
        print(f"vla-replay: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("vla-replay: interrupted; no output written", file=sys.stderr)
        return 130
    if not args.quiet:
        print_table(result.results)
        print(f"\nreport: {result.out_dir / 'report.md'}  output bag: {result.out_dir / 'output_bag'}")
        if result.export is not None:
            print(f"dataset: {result.export.samples} sample(s) in {result.export.directory} "
                  f"(dataset_info.json name {result.export.dataset_name!r})")
            for line in result.export.skipped:
                print(f"  skipped {line}")
    if args.write_expect:
        expectation = expectations_from_results(result.results, result.info.name, options.node_parameters,
                                                options.pacing(),
                                                args.min_iou if args.min_iou is not None else DEFAULT_MIN_IOU)
        atomic_write_text(args.write_expect, json.dumps(expectation, ensure_ascii=False, indent=2) + "\n")
        log(f"vla-replay: wrote expectations to {args.write_expect}")
    unanswered = [r.index for r in result.results if r.status is None]
    if expect is not None:
        diff = compare(expect, result.report, args.min_iou, expected_name=str(args.expect),
                       actual_name=str(result.out_dir / "report.json"))
        if diff:
            print("\n".join(diff))
            print(f"vla-replay: the replay differs from {args.expect}", file=sys.stderr)
            return EXIT_DIFFERENT
        log(f"vla-replay: matches {args.expect}")
    if unanswered:
        print(f"vla-replay: the node left command(s) {unanswered} unanswered", file=sys.stderr)
        return EXIT_DIFFERENT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
