"""The runtime core: frame + command -> validated plan, and the threaded request loop.

No ROS here. `InferenceCore` turns one RGB frame and one command into a plan (used by
the node and by `vla-eval`, so evaluation measures exactly what the robot runs).
`CommandPipeline` adds what a live robot needs: the latest frames kept undecoded, a
bounded command queue with an explicit drop policy, one worker thread (commands waiting
together run as one batched generation, `PipelineConfig.max_batch`), staleness checks,
the STOP fast path, a generation watchdog, and exactly one status per command.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

import numpy as np

from vla_node.actions import ActionPlan, ActionStep, CommandStatus, StageLatency, StatusCode
from vla_node.backends.base import DEFAULT_MAX_NEW_TOKENS, Backend, GenerationRequest
from vla_node.image import ImageError, fit_to_limits
from vla_node.parser import BoxCodec, ParseError, parse_actions
from vla_node.policy import SafetyPolicy
from vla_node.presence_check import check_presence, needs_check
from vla_node.prompt import PromptBuilder
from vla_node.settings import check_all, default
from vla_node.text import CommandError, StopPhraseDetector, echo_refused, sanitise_command
from vla_node.vocabulary import Vocabulary

log = logging.getLogger(__name__)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass
class Frame:
    """The newest camera message, kept undecoded until a command needs it."""

    stamp_ns: int
    frame_id: str
    received_ns: int
    decode: Callable[[], np.ndarray]  # -> RGB uint8 HxWx3; raises ImageError


@dataclass
class AnsweredCommand:
    """A command's outcome with the frame it was answered on (for pictures of it: vla/debug_image)."""

    status: CommandStatus
    plan: ActionPlan | None
    frame: Frame  # the frame the command was paired with
    rgb: np.ndarray | None = None  # that frame decoded, when the command got that far (else decode on demand)


def _step_summary(steps: list[ActionStep]) -> str:
    """A plan in a status's words: "2 step(s): MOVE_OBJECT; MOVE_OBJECT"."""
    return f"{len(steps)} step(s): " + "; ".join(step.verb for step in steps)


class InferenceCore:
    """Image -> prompt -> generate -> parse -> safety gate, for one command (`infer`) or several
    sharing one batched generation (`infer_batch`)."""

    def __init__(
        self,
        backend: Backend,
        vocab: Vocabulary,
        prompt: PromptBuilder,
        policy: SafetyPolicy,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        presence_check: bool = False,
    ):
        self.backend = backend
        self.vocab = vocab
        self.prompt = prompt
        self.policy = policy
        self.max_new_tokens = max_new_tokens
        # ask the model whether each thing a multi-step plan names is on the table (vla_node.presence_check);
        # only a model that answers the counting question (its manifest) is asked
        self.presence_check = presence_check

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
        job = InferenceJob(rgb, command, command_id, stamp_ns, frame_id, stop_event, latency)
        return self.infer_batch([job])[0]

    def infer_batch(self, jobs: list["InferenceJob"]) -> list[tuple[ActionPlan | None, CommandStatus]]:
        """`infer` for several commands: one backend.generate_batch call for all of them (a single
        job goes through backend.generate, exactly as before). One (plan, status) per job, in order;
        a job's bad image or backend error stays in its own row."""
        outcomes: list[tuple[ActionPlan | None, CommandStatus] | None] = [None] * len(jobs)
        requests: list[GenerationRequest] = []
        waiting: list[tuple[int, float]] = []  # (job index, resize ms) of the jobs that reach the model
        for index, job in enumerate(jobs):
            prepared = self._request(job)
            if isinstance(prepared, CommandStatus):
                outcomes[index] = (None, prepared)
            else:
                requests.append(prepared[0])
                waiting.append((index, prepared[1]))
        if len(requests) == 1:
            try:
                results: list = [self.backend.generate(requests[0])]
            except Exception as error:  # a backend failure (CUDA OOM included) must never kill the caller
                results = [error]
        elif requests:
            try:
                results = list(self.backend.generate_batch(requests))
                if len(results) != len(requests):
                    raise RuntimeError(f"backend answered {len(results)} of {len(requests)} batched requests")
            except Exception as error:  # the whole batch failed: every row reports it
                results = [error] * len(requests)
        else:
            results = []
        for (index, resize_ms), request, result in zip(waiting, requests, results):
            outcomes[index] = self._conclude(jobs[index], resize_ms, result, request.image)
        return outcomes  # type: ignore[return-value]

    def _status(self, job: "InferenceJob", code: StatusCode, detail: str) -> CommandStatus:
        return CommandStatus(command_id=job.command_id, command_text=job.command, code=code, detail=detail)

    def _request(self, job: "InferenceJob") -> tuple[GenerationRequest, float] | CommandStatus:
        """The job's generation request (+ the ms spent fitting its image), or its BAD_IMAGE status."""
        started = time.perf_counter()
        try:  # e.g. an aspect ratio the model cannot take (a 1x300 frame): the image's fault
            fitted = fit_to_limits(job.rgb, self.backend.pixel_limits)
        except ImageError as error:
            return self._status(job, StatusCode.BAD_IMAGE, f"cannot fit the image to the model: {error}")
        request = GenerationRequest(
            image=fitted,
            messages=self.prompt.chat_messages(job.command),
            max_new_tokens=self.max_new_tokens,
            stop_event=job.stop_event,
        )
        return request, _ms(time.perf_counter() - started)

    def _conclude(self, job: "InferenceJob", resize_ms: float, result,
                  fitted: np.ndarray) -> tuple[ActionPlan | None, CommandStatus]:
        """Generated text -> parsed, policy-checked (and, multi-step, presence-checked) plan and status
        (or the backend's error status). ``fitted``: the image the model was asked about."""
        if isinstance(result, BaseException):
            log.error("backend failed on command %s: %s: %s", job.command_id, type(result).__name__, result,
                      exc_info=result)
            return None, self._status(job, StatusCode.BACKEND_ERROR, f"{type(result).__name__}: {result}")
        latency = job.latency
        latency.preprocess_ms = resize_ms + result.preprocess_ms
        latency.generate_ms = result.generate_ms
        original_size = (int(job.rgb.shape[1]), int(job.rgb.shape[0]))

        parse_started = time.perf_counter()
        codec = BoxCodec(self.backend.coordinate_convention, original_size, result.model_input_size)
        try:
            steps = parse_actions(result.text, self.vocab, codec)
        except ParseError as error:
            latency.parse_ms = _ms(time.perf_counter() - parse_started)
            return None, self._status(job, StatusCode.PARSE_ERROR, f"{error.reason}: {error.text!r}")
        steps = [step.model_copy(update={"confidence": result.confidence}) for step in steps]
        refusal = self.policy.check(steps, original_size)
        latency.parse_ms = _ms(time.perf_counter() - parse_started)
        if refusal is not None:
            return None, self._status(job, StatusCode.REJECTED_BY_POLICY, f"{refusal}; model text: {result.text!r}")
        checked = self._presence_checked(job, steps, fitted, original_size)
        if isinstance(checked, CommandStatus):
            return None, checked
        steps, note = checked
        plan = ActionPlan(
            stamp_ns=job.stamp_ns,
            frame_id=job.frame_id,
            command_id=job.command_id,
            command_text=job.command,
            steps=steps,
            raw_text=result.text,
            model_id=self.backend.model_id,
            adapter_id=self.backend.adapter_id,
            latency=latency,
        )
        return plan, self._status(job, StatusCode.ACCEPTED, f"{_step_summary(steps)}{note}")

    def _presence_checked(self, job: "InferenceJob", steps: list[ActionStep], fitted: np.ndarray,
                          original_size: tuple[int, int]) -> tuple[list[ActionStep], str] | CommandStatus:
        """The plan's steps after the presence check (vla_node.presence_check) and a note for the
        status ("" when unchecked or nothing was absent), or the status that ends the command."""
        if not (self.presence_check and self.backend.answers_count_questions and needs_check(steps)):
            return steps, ""
        try:
            check = check_presence(self.backend, self.prompt, fitted, steps, job.stop_event)
        except Exception as error:  # as a failed generation: never publish a plan the check could not finish
            log.error("presence check failed on command %s: %s: %s", job.command_id, type(error).__name__, error)
            return self._status(job, StatusCode.BACKEND_ERROR, f"presence check: {type(error).__name__}: {error}")
        job.latency.generate_ms += check.ms
        if check.absent is None:
            return steps, ""
        clarify = [ActionStep(verb="CLARIFY", reason=check.reason, confidence=check.confidence)]
        refusal = self.policy.check(clarify, original_size)
        if refusal is not None:
            return self._status(job, StatusCode.REJECTED_BY_POLICY,
                                f"{refusal}; after the presence check (the model says {check.reason})")
        return clarify, f" (presence check: the model says {check.reason}; its plan was {_step_summary(steps)})"


@dataclass
class InferenceJob:
    """One command for `InferenceCore.infer_batch`: its frame, text, ids and abort event."""

    rgb: np.ndarray
    command: str
    command_id: str = ""
    stamp_ns: int = 0
    frame_id: str = ""
    stop_event: threading.Event | None = None
    latency: StageLatency = field(default_factory=StageLatency)

    def __post_init__(self):
        if self.latency is None:
            self.latency = StageLatency()


@dataclass
class PipelineConfig:
    """The request handling of the node; fields, defaults and ranges are node parameters (vla_node.settings)."""

    queue_size: int = default("queue_size")
    queue_policy: str = default("queue_policy")  # drop_oldest: newest command wins; reject_newest: keep the queue
    max_image_age_s: float = default("max_image_age_s")
    frame_buffer: int = default("frame_buffer")  # undecoded frames kept to pair a command with the closest one
    generation_timeout_s: float = default("generation_timeout_s")
    max_command_bytes: int = default("max_command_bytes")
    stop_phrases: tuple[str, ...] = tuple(default("stop_phrases"))  # () turns the STOP fast path off
    # Waiting commands the worker runs as one batch (capped by the backend's max_batch_size); 1: one at a time.
    # Default 1: a batch answers all its commands at the end; on an H200 (3B) a batch of 4 took 642 ms
    # against 176 ms for one command, for 10 % more commands/s (benchmarks/results/gpu_latency_*_h200.txt).
    max_batch: int = default("max_batch")

    def __post_init__(self):
        check_all({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any]) -> PipelineConfig:
        """From node parameter values (missing names keep their defaults)."""
        taken = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        if "stop_phrases" in taken:
            taken["stop_phrases"] = tuple(taken["stop_phrases"])
        return cls(**taken)


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
    reported: bool = False  # the worker emitted this command's status
    frame: Frame | None = None  # the frame it was paired with, once picked
    rgb: np.ndarray | None = None  # that frame decoded
    plan: ActionPlan | None = None  # its published plan

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
        on_answer: Callable[[AnsweredCommand], None] | None = None,
    ):
        """`on_answer`, if given, hears after the status of every command that was paired with a
        frame (STOP: the newest frame), from the thread that emitted the status."""
        self.core = core
        self._on_answer = on_answer
        self.config = config
        self._on_plan = on_plan
        self._on_status = on_status
        self._now_ns = now_ns
        self._frames: collections.deque[Frame] = collections.deque(maxlen=config.frame_buffer)
        self._queue: collections.deque[_Command] = collections.deque()
        self._queue_lock = threading.Lock()
        self._work_ready = threading.Condition(self._queue_lock)
        self._in_flight: list[_Command] = []  # the command (or batch) the worker is running
        self._running = False
        self._stopped = False  # stop() was called: new commands are refused, not queued forever
        self._worker: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._stop_detector = StopPhraseDetector(config.stop_phrases)
        self.stats = PipelineStats()
        self.frames_received = 0

    # ------------------------------------------------------------------ inputs
    def on_frame(self, frame: Frame) -> None:
        """Keep the frame without decoding it (cheap enough for 30 Hz 1080p)."""
        self._frames.append(frame)
        self.frames_received += 1

    def latest_frame(self) -> Frame | None:
        """The newest frame kept (for diagnostics: how old the camera feed is)."""
        return self._frames[-1] if self._frames else None

    def submit(self, text: str, command_id: str | None = None) -> str:
        """Queue a command (or run the STOP fast path); returns its id."""
        command_id = command_id or f"cmd-{next(self._ids)}"
        received_ns = self._now_ns()
        try:
            clean = sanitise_command(text, self.config.max_command_bytes)
        except CommandError as error:
            self._emit_status(CommandStatus(command_id=command_id, command_text=echo_refused(text),
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
            return len(self._queue) + len(self._in_flight)

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
            for command in self._in_flight:
                command.cancel_generation("pipeline shutting down during generation")
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

    def _emit_status(self, status: CommandStatus, total_ms: float | None) -> CommandStatus:
        """Publish the status (stamped now if it is not yet); returns it as published."""
        if not status.stamp_ns:
            status = status.model_copy(update={"stamp_ns": self._now_ns()})
        self.stats.record(status, total_ms)
        try:
            self._on_status(status)
        except Exception:  # a publisher failure must not stop the worker
            log.exception("status callback failed")
        return status

    def _stop_now(self, command_id: str, text: str, received_ns: int) -> None:
        with self._queue_lock:
            pending = list(self._queue)
            self._queue.clear()
            in_flight = list(self._in_flight)
            for command in in_flight:  # the backend's stopping criteria end its generation early
                command.cancel_generation(f"cancelled by stop command {command_id} during generation")
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
        cancelled = [c.command_id for c in pending] + [c.command_id for c in in_flight]
        detail = "stop phrase: STOP published without the model"
        if cancelled:
            detail += f"; cancelled {', '.join(cancelled)}"
        stopped = CommandStatus(command_id=command_id, command_text=text, code=StatusCode.STOPPED, detail=detail)
        stopped = self._emit_status(stopped, plan.latency.total_ms)
        if latest is not None:
            self._answered(AnsweredCommand(stopped, plan, latest))
        for command in pending:
            self._emit_status(self._status(command, StatusCode.CANCELLED, f"cancelled by stop command {command_id}"), None)
        # In-flight commands report their own CANCELLED status when their generation returns.

    def _pick_frame(self, command: _Command) -> Frame | None:
        frames = list(self._frames)
        if not frames:
            return None
        return min(frames, key=lambda frame: abs(frame.stamp_ns - command.received_ns))

    def _batch_limit(self) -> int:
        return max(1, min(self.config.max_batch, int(getattr(self.core.backend, "max_batch_size", 1) or 1)))

    def _work(self) -> None:
        while True:
            with self._queue_lock:
                while self._running and not self._queue:
                    self._work_ready.wait()
                if not self._running:
                    return
                count = min(self._batch_limit(), len(self._queue))
                commands = [self._queue.popleft() for _ in range(count)]
                self._in_flight = commands
            try:
                if len(commands) == 1:
                    self._handle(commands[0])
                else:
                    self._handle_batch(commands)
            except Exception as error:  # last line of defence: the worker never dies
                log.exception("unexpected failure on command(s) %s", ", ".join(c.command_id for c in commands))
                for command in commands:
                    if not command.reported:
                        self._emit_status(self._status(command, StatusCode.BACKEND_ERROR,
                                                       f"internal error: {type(error).__name__}: {error}"), None)
            finally:
                with self._queue_lock:
                    self._in_flight = []

    def _handle(self, command: _Command) -> None:
        prepared = self._prepare(command)
        if isinstance(prepared, CommandStatus):
            self._report(command, prepared, None)
            return
        with self._watchdog([command]) as timed_out:
            plan, status = self.core.infer_batch([prepared])[0]
        self._finish(command, plan, status, timed_out.is_set())

    def _handle_batch(self, commands: list[_Command]) -> None:
        """Check every command's frame alone, run the rest as one batch, report in submit order."""
        prepared = [self._prepare(command) for command in commands]
        jobs = [job for job in prepared if isinstance(job, InferenceJob)]
        outcomes = iter([])
        timed_out = threading.Event()
        if jobs:
            with self._watchdog(commands) as timed_out:
                outcomes = iter(self.core.infer_batch(jobs))
        for command, job in zip(commands, prepared):
            if isinstance(job, InferenceJob):
                plan, status = next(outcomes)
                self._finish(command, plan, status, timed_out.is_set())
            elif command.cancelled.is_set():  # a stop arrived while its batch ran: it is cancelled too
                self._report(command, self._status(command, StatusCode.CANCELLED, command.cancel_reason), None)
            else:
                self._report(command, job, None)

    def _prepare(self, command: _Command) -> InferenceJob | CommandStatus:
        """The command's job (closest frame, decoded), or the status saying why it has none."""
        latency = StageLatency(queue_ms=_ms((self._now_ns() - command.received_ns) / 1e9))
        frame = self._pick_frame(command)
        if frame is None:
            return self._status(command, StatusCode.NO_IMAGE, "no camera image received yet")
        command.frame = frame
        age_s = (command.received_ns - frame.stamp_ns) / 1e9
        if age_s > self.config.max_image_age_s:
            return self._status(
                command, StatusCode.STALE_IMAGE,
                f"closest image is {age_s:.2f} s older than the command (max_image_age_s="
                f"{self.config.max_image_age_s})")
        decode_started = time.perf_counter()
        try:
            rgb = frame.decode()
        except ImageError as error:
            return self._status(command, StatusCode.BAD_IMAGE, str(error))
        except Exception as error:  # a decoder bug on hostile bytes is still the image's fault
            log.exception("image decoder failed on command %s", command.command_id)
            return self._status(command, StatusCode.BAD_IMAGE,
                                f"image could not be decoded: {type(error).__name__}: {error}")
        latency.decode_image_ms = _ms(time.perf_counter() - decode_started)
        command.rgb = rgb
        return InferenceJob(rgb, command.text, command.command_id, frame.stamp_ns, frame.frame_id,
                            command.abort, latency)

    @contextlib.contextmanager
    def _watchdog(self, commands: list[_Command]):
        """generation_timeout_s for the whole call: when it fires, every command's generation aborts."""
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            for command in commands:
                command.abort.set()

        timer = threading.Timer(self.config.generation_timeout_s, expire)
        timer.daemon = True
        timer.start()
        try:
            yield timed_out
        finally:
            timer.cancel()

    def _finish(self, command: _Command, plan: ActionPlan | None, status: CommandStatus, timed_out: bool) -> None:
        status = status.model_copy(update={"stamp_ns": self._now_ns()})
        total_ms = _ms((self._now_ns() - command.received_ns) / 1e9)
        if command.cancelled.is_set():
            self._report(command, self._status(command, StatusCode.CANCELLED, command.cancel_reason), None)
            return
        if timed_out:
            self._report(command, self._status(command, StatusCode.TIMEOUT,
                                               f"generation exceeded {self.config.generation_timeout_s} s"), None)
            return
        if plan is not None:
            plan.latency.total_ms = total_ms
            try:
                self._on_plan(plan)
                command.plan = plan
            except Exception as error:
                log.exception("plan callback failed")
                self._report(command, self._status(command, StatusCode.BACKEND_ERROR,
                                                   f"publishing the plan failed: {error}"), None)
                return
        self._report(command, status, total_ms if plan is not None else None)

    def _report(self, command: _Command, status: CommandStatus, total_ms: float | None) -> None:
        """The command's one status (the worker's last line of defence skips reported commands)."""
        command.reported = True
        status = self._emit_status(status, total_ms)
        if command.frame is not None:
            self._answered(AnsweredCommand(status, command.plan, command.frame, command.rgb))

    def _answered(self, answer: AnsweredCommand) -> None:
        if self._on_answer is None:
            return
        try:
            self._on_answer(answer)
        except Exception:  # a picture of the answer must never cost the answer
            log.exception("answer callback failed on command %s", answer.status.command_id)
