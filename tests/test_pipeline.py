"""CommandPipeline on a real tiny Qwen2.5-VL checkpoint: every path gives exactly one status."""
from __future__ import annotations

import time

import numpy as np
import pytest

from tests.fixtures_models import tiny_checkpoints, tiny_model_dir, tiny_qwen2_5_vl  # noqa: F401
from tests.pipeline_recorder import Recorder
from vla_node.actions import StatusCode
from vla_node.backends.base import BackendError
from vla_node.factory import RuntimeSettings, build_core
from vla_node.image import ImageError
from vla_node.pipeline import CommandPipeline, Frame, PipelineConfig


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    return build_core(RuntimeSettings(model_path=str(tiny_model_dir), max_new_tokens=8))


def _frame(stamp_ns: int, rgb: np.ndarray | None = None, error: str | None = None) -> Frame:
    def decode():
        if error:
            raise ImageError(error)
        return rgb if rgb is not None else np.full((96, 128, 3), 120, np.uint8)

    return Frame(stamp_ns=stamp_ns, frame_id="cam", received_ns=stamp_ns, decode=decode)


def _pipeline(core, recorder, **config):
    pipeline = CommandPipeline(core, PipelineConfig(stop_phrases=("stop", "停下"), **config),
                               recorder.on_plan, recorder.on_status)
    pipeline.start()
    return pipeline


def test_command_before_any_image_gets_no_image(core):
    recorder = Recorder()
    pipeline = _pipeline(core, recorder)
    command_id = pipeline.submit("pick up the red cube")
    (status,) = recorder.wait(1)
    pipeline.stop()
    assert (status.command_id, status.code) == (command_id, StatusCode.NO_IMAGE)
    assert recorder.plans == []


def test_stale_image_gets_stale_image(core):
    recorder = Recorder()
    pipeline = _pipeline(core, recorder, max_image_age_s=0.5)
    pipeline.on_frame(_frame(time.time_ns() - 3_000_000_000))
    pipeline.submit("pick up the red cube")
    (status,) = recorder.wait(1)
    pipeline.stop()
    assert status.code == StatusCode.STALE_IMAGE
    assert "max_image_age_s=0.5" in status.detail


def test_undecodable_image_gets_bad_image(core):
    recorder = Recorder()
    pipeline = _pipeline(core, recorder)
    pipeline.on_frame(_frame(time.time_ns(), error="step 10 is smaller than width*3=384"))
    pipeline.submit("pick up the red cube")
    (status,) = recorder.wait(1)
    pipeline.stop()
    assert status.code == StatusCode.BAD_IMAGE and "step 10" in status.detail


def test_empty_command_gets_bad_command(core):
    recorder = Recorder()
    pipeline = _pipeline(core, recorder)
    pipeline.submit("   \x00\x07  ")
    (status,) = recorder.wait(1)
    pipeline.stop()
    assert status.code == StatusCode.BAD_COMMAND


def test_random_model_output_is_never_published_as_a_plan(core):
    recorder = Recorder()
    pipeline = _pipeline(core, recorder)
    pipeline.on_frame(_frame(time.time_ns()))
    pipeline.submit("put the red cube in the blue bowl")
    (status,) = recorder.wait(1)
    pipeline.stop()
    # A random-weight model emits nonsense: a PARSE_ERROR carrying the text, never an action.
    if status.code == StatusCode.PARSE_ERROR:
        assert recorder.plans == [] and status.detail
    else:
        assert status.code == StatusCode.ACCEPTED and len(recorder.plans) == 1


def test_flood_is_bounded_with_busy_statuses_and_every_command_answered(core):
    recorder = Recorder()
    pipeline = _pipeline(core, recorder, queue_size=2)
    pipeline.on_frame(_frame(time.time_ns() + 10**12))  # stays fresh for the whole test
    ids = [pipeline.submit(f"pick up the red cube {i}") for i in range(12)]
    recorder.wait(len(ids), timeout_s=120)
    pipeline.stop()
    codes = recorder.codes()
    assert sorted(codes) == sorted(ids), "every command gets exactly one status"
    assert len(recorder.statuses) == len(ids)
    busy = [s for s in recorder.statuses if s.code == StatusCode.BUSY]
    assert len(busy) >= 12 - 2 - 1 - 1  # queue of 2, one in flight, one racing the worker
    assert all("queue full" in s.detail for s in busy)
    # the newest command wins: it is never the one dropped
    assert codes[ids[-1]] != "BUSY"


def test_reject_newest_policy_keeps_the_queue(core):
    recorder = Recorder()
    pipeline = _pipeline(core, recorder, queue_size=1, queue_policy="reject_newest")
    pipeline.on_frame(_frame(time.time_ns() + 10**12))
    ids = [pipeline.submit(f"pick up the red cube {i}") for i in range(6)]
    recorder.wait(len(ids), timeout_s=120)
    pipeline.stop()
    codes = recorder.codes()
    assert codes[ids[-1]] == "BUSY"
    assert codes[ids[0]] != "BUSY"


def test_stop_phrase_publishes_stop_at_once_and_cancels_pending_work(core):
    recorder = Recorder()
    pipeline = _pipeline(core, recorder, queue_size=8)
    pipeline.on_frame(_frame(time.time_ns() + 10**12))
    queued = [pipeline.submit(f"pick up the red cube {i}") for i in range(5)]
    stop_id = pipeline.submit("停下")
    recorder.wait(6, timeout_s=120)
    pipeline.stop()
    stop_plans = [p for p in recorder.plans if p.command_id == stop_id]
    assert len(stop_plans) == 1 and [s.verb for s in stop_plans[0].steps] == ["STOP"]
    codes = recorder.codes()
    assert codes[stop_id] == "STOPPED"
    assert len(recorder.statuses) == 6
    assert sum(codes[i] == "CANCELLED" for i in queued) >= 3
    assert all(codes[i] in ("CANCELLED", "PARSE_ERROR", "ACCEPTED") for i in queued)


class FailingBackend:
    """Fault injection around the real backend: raises on chosen calls."""

    def __init__(self, real, failures):
        self._real, self._failures = real, list(failures)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def generate(self, request):
        if self._failures:
            raise self._failures.pop(0)
        return self._real.generate(request)


def test_backend_failure_gives_backend_error_and_the_next_command_works(core):
    from vla_node.pipeline import InferenceCore

    failing = InferenceCore(FailingBackend(core.backend, [RuntimeError("CUDA out of memory")]),
                            core.vocab, core.prompt, core.policy, core.max_new_tokens)
    recorder = Recorder()
    pipeline = _pipeline(failing, recorder)
    pipeline.on_frame(_frame(time.time_ns() + 10**12))
    first = pipeline.submit("pick up the red cube")
    recorder.wait(1)
    second = pipeline.submit("pick up the red cube")
    recorder.wait(2)
    pipeline.stop()
    codes = recorder.codes()
    assert codes[first] == "BACKEND_ERROR"
    assert "CUDA out of memory" in recorder.statuses[0].detail
    assert codes[second] in ("PARSE_ERROR", "ACCEPTED")


def test_watchdog_turns_slow_generation_into_timeout(core, tiny_model_dir):
    # Unconstrained: the grammar would end the random model's answer early; this needs a long one.
    slow = build_core(RuntimeSettings(model_path=str(tiny_model_dir), max_new_tokens=4000, constrained_decoding=False))
    recorder = Recorder()
    pipeline = _pipeline(slow, recorder, generation_timeout_s=0.3)
    pipeline.on_frame(_frame(time.time_ns() + 10**12))
    pipeline.submit("pick up the red cube")
    (status,) = recorder.wait(1, timeout_s=120)
    pipeline.stop()
    assert status.code in (StatusCode.TIMEOUT, StatusCode.PARSE_ERROR)
    if status.code == StatusCode.PARSE_ERROR:  # the model ended on its own before the watchdog
        pytest.skip("the random model stopped generating before the 0.3 s watchdog")
    assert "0.3" in status.detail


def test_pipeline_config_rejects_bad_values():
    with pytest.raises(ValueError, match="queue_policy"):
        PipelineConfig(queue_policy="fifo")
    with pytest.raises(ValueError, match="queue_size"):
        PipelineConfig(queue_size=0)


def test_missing_model_dir_fails_with_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackendError, match=str(missing)):
        build_core(RuntimeSettings(model_path=str(missing)))
