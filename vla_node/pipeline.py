"""The runtime core: frame + command -> validated plan, and the threaded request loop.

No ROS here. `InferenceCore` turns one RGB frame and one command into a plan (used by
the node and by `vla-eval`, so evaluation measures exactly what the robot runs).
`CommandPipeline` adds what a live robot needs: the latest frames kept undecoded, a
bounded command queue with an explicit drop policy, one worker thread, staleness checks,
the STOP fast path, a generation watchdog, and exactly one status per command.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vla_node.actions import ActionPlan, ActionStep, CommandStatus, StageLatency, StatusCode
from vla_node.backends.base import DEFAULT_MAX_NEW_TOKENS, Backend, GenerationRequest
from vla_node.image import ImageError, fit_to_limits
from vla_node.parser import BoxCodec, ParseError, parse_actions
from vla_node.policy import SafetyPolicy
from vla_node.prompt import PromptBuilder
from vla_node.text import DEFAULT_STOP_PHRASES, CommandError, StopPhraseDetector, sanitise_command
from vla_node.vocabulary import Vocabulary

log = logging.getLogger(__name__)

QUEUE_POLICIES = ("drop_oldest", "reject_newest")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _echo(text: object, limit: int = 200) -> str:
    """A refused command as it may be echoed in a status: text, no control/surrogate characters."""
    raw = text if isinstance(text, str) else repr(text)
    return "".join(c for c in raw[:limit] if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn"))


@dataclass
class Frame:
    """The newest camera message, kept undecoded until a command needs it."""

    stamp_ns: int
    frame_id: str
    received_ns: int
    decode: Callable[[], np.ndarray]  # -> RGB uint8 HxWx3; raises ImageError


class InferenceCore:
    """One command at a time: image -> prompt -> generate -> parse -> safety gate."""

    def __init__(
        self,
        backend: Backend,
        vocab: Vocabulary,
        prompt: PromptBuilder,
        policy: SafetyPolicy,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ):
        self.backend = backend
        self.vocab = vocab
        self.prompt = prompt
        self.policy = policy
        self.max_new_tokens = max_new_tokens

    def infer(
        self,
        rgb: np.ndarray,
        command: str,
        command_id: str = "",
        stamp_ns: int = 0,
        frame_id: str = "",
        stop_event: threading.Event | None = None,
        latency: StageLatency | None = None,
    ) -> tuple[ActionPlan | None, CommandStatus]:
        latency = latency if latency is not None else StageLatency()

        def status(code: StatusCode, detail: str) -> CommandStatus:
            return CommandStatus(command_id=command_id, command_text=command, code=code, detail=detail)

        started = time.perf_counter()
        original_size = (int(rgb.shape[1]), int(rgb.shape[0]))
        try:  # e.g. an aspect ratio the model cannot take (a 1x300 frame): the image's fault
            fitted = fit_to_limits(rgb, self.backend.pixel_limits)
        except ImageError as error:
            return None, status(StatusCode.BAD_IMAGE, f"cannot fit the image to the model: {error}")
        request = GenerationRequest(
            image=fitted,
            messages=self.prompt.chat_messages(command),
            max_new_tokens=self.max_new_tokens,
            stop_event=stop_event,
        )
        resize_ms = _ms(time.perf_counter() - started)
        try:
            result = self.backend.generate(request)
        except Exception as error:  # a backend failure (CUDA OOM included) must never kill the caller
            log.exception("backend failed on command %s", command_id)
            return None, status(StatusCode.BACKEND_ERROR, f"{type(error).__name__}: {error}")
        latency.preprocess_ms = resize_ms + result.preprocess_ms
        latency.generate_ms = result.generate_ms

        parse_started = time.perf_counter()
        codec = BoxCodec(self.backend.coordinate_convention, original_size, result.model_input_size)
        try:
            steps = parse_actions(result.text, self.vocab, codec)
        except ParseError as error:
            latency.parse_ms = _ms(time.perf_counter() - parse_started)
            return None, status(StatusCode.PARSE_ERROR, f"{error.reason}: {error.text!r}")
        steps = [step.model_copy(update={"confidence": result.confidence}) for step in steps]
        refusal = self.policy.check(steps, original_size)
        latency.parse_ms = _ms(time.perf_counter() - parse_started)
        if refusal is not None:
            return None, status(StatusCode.REJECTED_BY_POLICY, f"{refusal}; model text: {result.text!r}")
        plan = ActionPlan(
            stamp_ns=stamp_ns,
            frame_id=frame_id,
            command_id=command_id,
            command_text=command,
            steps=steps,
            raw_text=result.text,
            model_id=self.backend.model_id,
            adapter_id=self.backend.adapter_id,
            latency=latency,
        )
        summary = "; ".join(step.verb for step in steps)
        return plan, status(StatusCode.ACCEPTED, f"{len(steps)} step(s): {summary}")


@dataclass
class PipelineConfig:
    queue_size: int = 4
    queue_policy: str = "drop_oldest"  # drop_oldest: newest command wins; reject_newest: keep the queue
    max_image_age_s: float = 2.0
    frame_buffer: int = 8  # undecoded frames kept to pair a command with the closest one
    generation_timeout_s: float = 30.0
    max_command_bytes: int = 512
    stop_phrases: tuple[str, ...] = DEFAULT_STOP_PHRASES  # () turns the STOP fast path off

    def __post_init__(self):
        if self.queue_policy not in QUEUE_POLICIES:
            raise ValueError(f"queue_policy must be one of {QUEUE_POLICIES}, got {self.queue_policy!r}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.frame_buffer < 1:
            raise ValueError(f"frame_buffer must be >= 1, got {self.frame_buffer}")
        if self.max_image_age_s <= 0 or self.generation_timeout_s <= 0:
            raise ValueError("max_image_age_s and generation_timeout_s must be > 0")


@dataclass
class _Command:
    command_id: str
    text: str
    received_ns: int
    cancelled: threading.Event = field(default_factory=threading.Event)  # by a stop command or shutdown
    cancel_reason: str = ""
    # Set -> the backend aborts this command's generation (stop command, watchdog, shutdown).
    # One per command, so a late stop can never abort the NEXT command's generation.
    abort: threading.Event = field(default_factory=threading.Event)

    def cancel_generation(self, reason: str) -> None:
        """Cancel this command while it generates: CANCELLED with `reason`, generation aborted."""
        self.cancel_reason = reason
        self.cancelled.set()
        self.abort.set()


class PipelineStats:
    """Counters and recent latencies for diagnostics (thread-safe)."""

    def __init__(self, window: int = 256):
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)

    def record(self, status: CommandStatus, total_ms: float | None) -> None:
        with self._lock:
            self.counts[status.code.value] += 1
            if total_ms is not None:
                self._latencies.append(total_ms)

    def latency_percentiles(self) -> dict[str, float]:
        with self._lock:
            values = np.array(self._latencies, dtype=float)
        if values.size == 0:
            return {}
        return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


class CommandPipeline:
    """Latest frames + bounded command queue + one worker; emits plans and statuses.

    Every submitted command gets exactly one status through `on_status`; a plan goes to
    `on_plan` only when it parsed and passed the safety gate, and always before its
    ACCEPTED status.
    """

    def __init__(
        self,
        core: InferenceCore,
        config: PipelineConfig,
        on_plan: Callable[[ActionPlan], None],
        on_status: Callable[[CommandStatus], None],
        now_ns: Callable[[], int] = time.time_ns,
    ):
        self.core = core
        self.config = config
        self._on_plan = on_plan
        self._on_status = on_status
        self._now_ns = now_ns
        self._frames: collections.deque[Frame] = collections.deque(maxlen=config.frame_buffer)
        self._queue: collections.deque[_Command] = collections.deque()
        self._queue_lock = threading.Lock()
        self._work_ready = threading.Condition(self._queue_lock)
        self._in_flight: _Command | None = None
        self._running = False
        self._stopped = False  # stop() was called: new commands are refused, not queued forever
        self._worker: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._stop_detector = StopPhraseDetector(config.stop_phrases)
        self.stats = PipelineStats()

    # ------------------------------------------------------------------ inputs
    def on_frame(self, frame: Frame) -> None:
        """Keep the frame without decoding it (cheap enough for 30 Hz 1080p)."""
        self._frames.append(frame)

    def submit(self, text: str, command_id: str | None = None) -> str:
        """Queue a command (or run the STOP fast path); returns its id."""
        command_id = command_id or f"cmd-{next(self._ids)}"
        received_ns = self._now_ns()
        try:
            clean = sanitise_command(text, self.config.max_command_bytes)
        except CommandError as error:
            self._emit_status(CommandStatus(command_id=command_id, command_text=_echo(text),
                                            code=StatusCode.BAD_COMMAND, detail=str(error)), None)
            return command_id
        if self._stop_detector.is_stop(clean):
            self._stop_now(command_id, clean, received_ns)
            return command_id
        command = _Command(command_id, clean, received_ns)
        dropped: _Command | None = None
        rejected = False
        with self._queue_lock:
            stopped = self._stopped
            if not stopped and len(self._queue) >= self.config.queue_size:
                if self.config.queue_policy == "drop_oldest":
                    dropped = self._queue.popleft()
                else:
                    rejected = True
            if not rejected and not stopped:
                self._queue.append(command)
                self._work_ready.notify()
        if stopped:
            self._emit_status(self._status(command, StatusCode.CANCELLED, "pipeline is shut down"), None)
        if dropped is not None:
            self._emit_status(self._status(dropped, StatusCode.BUSY,
                                           f"dropped: queue full ({self.config.queue_size}), "
                                           f"newer command {command_id} wins"), None)
        if rejected:
            self._emit_status(self._status(command, StatusCode.BUSY,
                                           f"rejected: queue full ({self.config.queue_size}) "
                                           "and queue_policy is reject_newest"), None)
        return command_id

    def queue_depth(self) -> int:
        with self._queue_lock:
            return len(self._queue) + (1 if self._in_flight is not None else 0)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._worker = threading.Thread(target=self._work, name="vla-worker", daemon=True)
        self._worker.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker; queued commands get CANCELLED statuses."""
        with self._queue_lock:
            self._running = False
            self._stopped = True
            pending = list(self._queue)
            self._queue.clear()
            if self._in_flight is not None:
                self._in_flight.cancel_generation("pipeline shutting down during generation")
            self._work_ready.notify_all()
        for command in pending:
            self._emit_status(self._status(command, StatusCode.CANCELLED, "pipeline shutting down"), None)
        if self._worker is not None:
            self._worker.join(timeout_s)
            self._worker = None

    # ------------------------------------------------------------------ internals
    def _status(self, command: _Command, code: StatusCode, detail: str) -> CommandStatus:
        return CommandStatus(stamp_ns=self._now_ns(), command_id=command.command_id,
                             command_text=command.text, code=code, detail=detail)

    def _emit_status(self, status: CommandStatus, total_ms: float | None) -> None:
        if not status.stamp_ns:
            status = status.model_copy(update={"stamp_ns": self._now_ns()})
        self.stats.record(status, total_ms)
        try:
            self._on_status(status)
        except Exception:  # a publisher failure must not stop the worker
            log.exception("status callback failed")

    def _stop_now(self, command_id: str, text: str, received_ns: int) -> None:
        with self._queue_lock:
            pending = list(self._queue)
            self._queue.clear()
            in_flight = self._in_flight
            if in_flight is not None:  # the backend's stopping criteria end its generate() early
                in_flight.cancel_generation(f"cancelled by stop command {command_id} during generation")
        latest = self._frames[-1] if self._frames else None
        plan = ActionPlan(
            stamp_ns=latest.stamp_ns if latest else received_ns,
            frame_id=latest.frame_id if latest else "",
            command_id=command_id,
            command_text=text,
            steps=[ActionStep(verb="STOP")],
            raw_text="",
            model_id=self.core.backend.model_id,
            adapter_id=self.core.backend.adapter_id,
            latency=StageLatency(total_ms=_ms((self._now_ns() - received_ns) / 1e9)),
        )
        try:
            self._on_plan(plan)
        except Exception:
            log.exception("plan callback failed for STOP")
        cancelled = [c.command_id for c in pending] + ([in_flight.command_id] if in_flight else [])
        detail = "stop phrase: STOP published without the model"
        if cancelled:
            detail += f"; cancelled {', '.join(cancelled)}"
        self._emit_status(CommandStatus(command_id=command_id, command_text=text,
                                        code=StatusCode.STOPPED, detail=detail), plan.latency.total_ms)
        for command in pending:
            self._emit_status(self._status(command, StatusCode.CANCELLED, f"cancelled by stop command {command_id}"), None)
        # The in-flight command reports its own CANCELLED status when its generation returns.

    def _pick_frame(self, command: _Command) -> Frame | None:
        frames = list(self._frames)
        if not frames:
            return None
        return min(frames, key=lambda frame: abs(frame.stamp_ns - command.received_ns))

    def _work(self) -> None:
        while True:
            with self._queue_lock:
                while self._running and not self._queue:
                    self._work_ready.wait()
                if not self._running:
                    return
                command = self._queue.popleft()
                self._in_flight = command
            try:
                self._handle(command)
            except Exception as error:  # last line of defence: the worker never dies
                log.exception("unexpected failure on command %s", command.command_id)
                self._emit_status(self._status(command, StatusCode.BACKEND_ERROR,
                                               f"internal error: {type(error).__name__}: {error}"), None)
            finally:
                with self._queue_lock:
                    self._in_flight = None

    def _handle(self, command: _Command) -> None:
        latency = StageLatency(queue_ms=_ms((self._now_ns() - command.received_ns) / 1e9))
        frame = self._pick_frame(command)
        if frame is None:
            self._emit_status(self._status(command, StatusCode.NO_IMAGE, "no camera image received yet"), None)
            return
        age_s = (command.received_ns - frame.stamp_ns) / 1e9
        if age_s > self.config.max_image_age_s:
            self._emit_status(self._status(
                command, StatusCode.STALE_IMAGE,
                f"closest image is {age_s:.2f} s older than the command (max_image_age_s="
                f"{self.config.max_image_age_s})"), None)
            return
        decode_started = time.perf_counter()
        try:
            rgb = frame.decode()
        except ImageError as error:
            self._emit_status(self._status(command, StatusCode.BAD_IMAGE, str(error)), None)
            return
        except Exception as error:  # a decoder bug on hostile bytes is still the image's fault
            log.exception("image decoder failed on command %s", command.command_id)
            self._emit_status(self._status(command, StatusCode.BAD_IMAGE,
                                           f"image could not be decoded: {type(error).__name__}: {error}"), None)
            return
        latency.decode_image_ms = _ms(time.perf_counter() - decode_started)

        timed_out = threading.Event()

        def watchdog() -> None:
            timed_out.set()
            command.abort.set()

        timer = threading.Timer(self.config.generation_timeout_s, watchdog)
        timer.daemon = True
        timer.start()
        try:
            plan, status = self.core.infer(rgb, command.text, command.command_id, frame.stamp_ns,
                                           frame.frame_id, command.abort, latency)
        finally:
            timer.cancel()
        status = status.model_copy(update={"stamp_ns": self._now_ns()})
        total_ms = _ms((self._now_ns() - command.received_ns) / 1e9)
        if command.cancelled.is_set():
            self._emit_status(self._status(command, StatusCode.CANCELLED, command.cancel_reason), None)
            return
        if timed_out.is_set():
            self._emit_status(self._status(command, StatusCode.TIMEOUT,
                                           f"generation exceeded {self.config.generation_timeout_s} s"), None)
            return
        if plan is not None:
            plan.latency.total_ms = total_ms
            try:
                self._on_plan(plan)
            except Exception as error:
                log.exception("plan callback failed")
                self._emit_status(self._status(command, StatusCode.BACKEND_ERROR,
                                               f"publishing the plan failed: {error}"), None)
                return
        self._emit_status(status, total_ms if plan is not None else None)

