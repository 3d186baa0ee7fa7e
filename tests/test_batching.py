"""Batched inference: several waiting commands become one generation.

Backend level (real tiny Qwen2.5-VL / Qwen3-VL): every row of a greedy batch equals that request run
alone (different image sizes, commands, budgets; with and without the action grammar), and a bad
row, a stopped row, fails or ends alone. Pipeline level (scripted batching backend, real tiny core):
waiting commands become one batch call, one status per command in submit order (plans first), a
stop cancels the whole batch, a bad image affects only its command.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from tests.fixtures_models import (  # noqa: F401
    tiny_checkpoints,
    tiny_image,
    tiny_messages,
    tiny_model_dir,
    tiny_qwen2_5_vl,
)
from tests.pipeline_recorder import Recorder
from tests.scripted_backend import Reply, ScriptedBackend
from tests.stop_events import SetOnCheck
from vla_node.actions import StatusCode
from vla_node.backends.base import BackendError, GenerationRequest, GenerationResult
from vla_node.image import ImageError
from vla_node.pipeline import CommandPipeline, Frame, InferenceCore, InferenceJob, PipelineConfig
from vla_node.policy import SafetyPolicy
from vla_node.prompt import PromptBuilder
from vla_node.vocabulary import Vocabulary

VOCAB = Vocabulary.load()
BUDGET = 12


def _requests(budgets=(BUDGET, BUDGET, BUDGET)) -> list[GenerationRequest]:
    """Three requests that differ in image size (so in prompt length and box bounds) and command."""
    specs = [((160, 120), "put the red cube in the blue bowl"),
             ((64, 200), "pick up the green ball"),
             ((300, 90), "把红色方块放到蓝色碗里")]
    return [GenerationRequest(tiny_image(w, h, seed), tiny_messages(command), max_new_tokens=budget)
            for seed, (((w, h), command), budget) in enumerate(zip(specs, budgets))]


def _same(alone: GenerationResult, batched: GenerationResult) -> None:
    assert batched.text == alone.text
    assert (batched.new_tokens, batched.prompt_tokens, batched.model_input_size) == (
        alone.new_tokens, alone.prompt_tokens, alone.model_input_size)
    assert batched.confidence == pytest.approx(alone.confidence, rel=1e-4)


@pytest.fixture(scope="module", params=[("qwen2_5_vl", "dynamic"), ("qwen3_vl", "dynamic"), ("qwen2_5_vl", "static"),
                                        ("qwen3_vl", "static")], ids=lambda p: "-".join(p))
def backend(request, tiny_checkpoints):
    """dynamic: one left-padded generate; static: prefilled one by one, decoded together (batch_cache.py)."""
    from vla_node.backends.transformers_backend import TransformersBackend

    family, decode_cache = request.param
    real = TransformersBackend(tiny_checkpoints[family], device="cpu", max_new_tokens=BUDGET,
                               decode_cache=decode_cache)
    yield real
    real.close()


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "grammar"])
def test_every_batch_row_equals_the_request_run_alone(backend, constrained):
    if constrained:
        backend.enable_constrained_decoding(VOCAB)
    try:
        requests = _requests()
        alone = [backend.generate(r) for r in requests]
        batched = backend.generate_batch(requests)
    finally:
        backend.disable_constrained_decoding()
    assert len(batched) == len(requests)
    for one, row in zip(alone, batched):
        _same(one, row)
    # the rows really differ (else equality would prove little)
    assert len({(r.text, r.model_input_size) for r in batched}) == len(batched)
    if backend.decode_cache == "static":  # three rows decoded by one decoder over a 4-row cache
        assert list(backend.engine.batches.decoders) == [4] and backend.engine.batches.decoders[4].rows == 4


def test_rows_keep_their_own_budget_and_a_bad_row_fails_alone(backend):
    backend.enable_constrained_decoding(VOCAB)
    try:
        requests = _requests(budgets=(BUDGET, 3, BUDGET))
        requests.insert(1, GenerationRequest(np.zeros((10, 10), np.uint8), tiny_messages()))  # not RGB
        alone = [backend.generate(r) for r in requests if r.image.ndim == 3]
        batched = backend.generate_batch(requests)
    finally:
        backend.disable_constrained_decoding()
    assert isinstance(batched[1], BackendError) and "RGB uint8" in str(batched[1])
    rows = [batched[0], batched[2], batched[3]]
    assert rows[1].new_tokens <= 3
    for one, row in zip(alone, rows):
        _same(one, row)


def test_a_stopped_row_ends_alone(backend):
    requests = _requests()
    alone = [backend.generate(r) for r in requests]
    already = threading.Event()
    already.set()
    requests[0].stop_event = already
    requests[1].stop_event = SetOnCheck(5)
    batched = backend.generate_batch(requests)
    assert (batched[0].text, batched[0].new_tokens) == ("", 0)
    assert 1 <= batched[1].new_tokens < alone[1].new_tokens
    _same(alone[2], batched[2])


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_cuda_batched_graph_steps_equal_single_commands(tiny_checkpoints, family):
    """On CUDA the batch's steps are compiled and recorded (cuBLAS products and compiled attention
    over 4 rows) while single commands use the Triton kernels: in float32 both give the same answers."""
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_checkpoints[family], device="cuda", dtype="float32", max_new_tokens=24)
    assert backend.decode_cache == "static"
    for constrained in (False, True):
        if constrained:
            backend.enable_constrained_decoding(VOCAB)
        requests = _requests(budgets=(24, 7, 24))
        alone = [backend.generate(r) for r in requests]
        batched = backend.generate_batch(requests)
        for one, row in zip(alone, batched):
            _same(one, row)
        assert batched[1].new_tokens <= 7
    assert backend.engine.batches.decoders[4].graph_replays > 0, "the batch's steps were recorded and replayed"
    backend.close()


def test_batch_warm_up_builds_a_decoder_per_padded_row_count(tiny_checkpoints):
    from vla_node.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_checkpoints["qwen2_5_vl"], device="cpu", decode_cache="static")
    backend.warmup_batches(3)  # batches of 2 and 3 run on 2- and 4-row caches
    assert sorted(backend.engine.batches.decoders) == [2, 4]
    backend.use_engine(replace(backend.engine.options, max_batch_size=6))
    backend.warmup_batches(16)  # capped by the engine: 5 and 6 commands run on a 6-row cache
    assert sorted(backend.engine.batches.decoders) == [2, 4, 6]
    backend.close()


def test_default_generate_batch_loops_and_keeps_errors_in_their_row():
    backend = ScriptedBackend()
    backend.script(Reply(text="first"), Reply(error=RuntimeError("CUDA out of memory")), Reply(text="third"))
    image = np.zeros((56, 56, 3), np.uint8)
    results = backend.generate_batch([GenerationRequest(image, []) for _ in range(3)])
    assert backend.max_batch_size == 1
    assert results[0].text == "first" and results[2].text == "third"
    assert isinstance(results[1], BackendError) and "RuntimeError: CUDA out of memory" in str(results[1])


# ---- pipeline ------------------------------------------------------------------------------------
class BatchingBackend(ScriptedBackend):
    """Scripted backend that batches: records each call's size; `gate` holds every call until opened."""

    def __post_init__(self):
        super().__post_init__()
        self.max_batch_size = 4
        self.calls: list[tuple[str, list[str]]] = []  # ("generate" | "batch", commands in the call)
        self.gate = threading.Event()
        self.gate.set()
        self._in_batch = False

    def _record(self, kind: str, requests: list[GenerationRequest]) -> None:
        with self._lock:
            self.calls.append((kind, [r.messages[-1]["content"][-1]["text"] for r in requests]))
        self.started.set()
        self.gate.wait(30)

    def generate(self, request):
        if not self._in_batch:
            self._record("generate", [request])
        return super().generate(request)

    def generate_batch(self, requests):
        self._record("batch", requests)
        self._in_batch = True  # the base class's loop answers the rows: not separate calls
        try:
            return super().generate_batch(requests)
        finally:
            self._in_batch = False


def _core(backend) -> InferenceCore:
    return InferenceCore(backend, VOCAB, PromptBuilder(VOCAB), SafetyPolicy.from_config(VOCAB.policy_config, VOCAB), 16)


def _frame(stamp_ns: int, error: str | None = None) -> Frame:
    def decode():
        if error:
            raise ImageError(error)
        return np.full((96, 128, 3), 120, np.uint8)

    return Frame(stamp_ns=stamp_ns, frame_id="cam", received_ns=stamp_ns, decode=decode)


def _held_pipeline(backend, recorder, now_ns=time.time_ns, **config):
    """A started pipeline (batches of up to 4 unless told) whose worker is busy with command 'first'
    until backend.gate opens."""
    config.setdefault("max_batch", 4)
    pipeline = CommandPipeline(_core(backend), PipelineConfig(stop_phrases=("stop",), **config),
                               recorder.on_plan, recorder.on_status, now_ns=now_ns)
    pipeline.start()
    backend.gate.clear()
    pipeline.on_frame(_frame(now_ns() + 10**9))
    pipeline.submit("pick up the red cube first", "first")
    assert backend.started.wait(30)
    return pipeline


def test_waiting_commands_become_one_batch_with_one_status_each_in_order():
    backend = BatchingBackend()
    recorder = Recorder()
    pipeline = _held_pipeline(backend, recorder, queue_size=8)
    ids = ["first"] + [pipeline.submit(f"pick up the red cube {i}", f"c{i}") for i in range(5)]
    assert pipeline.queue_depth() == 6
    backend.gate.set()
    recorder.wait(len(ids))
    pipeline.stop()
    assert [(kind, len(texts)) for kind, texts in backend.calls] == [("generate", 1), ("batch", 4), ("generate", 1)]
    assert [s.command_id for s in recorder.statuses] == ids
    assert all(s.code == StatusCode.ACCEPTED for s in recorder.statuses)
    for command_id in ids:  # its plan, then its status
        assert recorder.events.index(("plan", command_id, "")) + 1 == recorder.events.index(
            ("status", command_id, "ACCEPTED"))


def test_max_batch_one_keeps_one_command_per_call():
    assert PipelineConfig().max_batch == 1  # the default: see PipelineConfig.max_batch
    backend = BatchingBackend()
    recorder = Recorder()
    pipeline = _held_pipeline(backend, recorder, max_batch=1)
    for i in range(3):
        pipeline.submit(f"pick up the red cube {i}", f"c{i}")
    backend.gate.set()
    recorder.wait(4)
    pipeline.stop()
    assert [kind for kind, _ in backend.calls] == ["generate"] * 4


def test_a_stop_cancels_every_command_of_the_batch():
    backend = BatchingBackend(replies=[Reply(), Reply(wait_for_stop_s=30)])
    recorder = Recorder()
    pipeline = _held_pipeline(backend, recorder)
    batch = [pipeline.submit(f"pick up the red cube {i}", f"c{i}") for i in range(3)]
    backend.started.clear()
    backend.gate.set()
    assert backend.started.wait(30)  # the batch is generating now
    assert pipeline.queue_depth() == 3
    pipeline.submit("stop", "halt")
    recorder.wait(5)
    pipeline.stop()
    assert [(kind, len(texts)) for kind, texts in backend.calls] == [("generate", 1), ("batch", 3)]
    assert [recorder.code(i) for i in batch] == ["CANCELLED"] * 3
    stopped = next(s for s in recorder.statuses if s.command_id == "halt")
    assert stopped.code == StatusCode.STOPPED and all(i in stopped.detail for i in batch)
    assert backend.stopped_early == 3
    assert [e[1] for e in recorder.events if e[0] == "plan"] == ["first", "halt"]


def test_the_watchdog_times_out_the_whole_batch():
    backend = BatchingBackend(replies=[Reply(), Reply(wait_for_stop_s=30)])
    recorder = Recorder()
    pipeline = _held_pipeline(backend, recorder, generation_timeout_s=0.2)
    batch = [pipeline.submit(f"pick up the red cube {i}", f"c{i}") for i in range(2)]
    backend.gate.set()
    recorder.wait(3)
    pipeline.stop()
    assert [recorder.code(i) for i in batch] == ["TIMEOUT"] * 2


def test_a_bad_image_in_a_batch_affects_only_its_command():
    clock = [10**15]
    backend = BatchingBackend()
    recorder = Recorder()
    pipeline = _held_pipeline(backend, recorder, now_ns=lambda: clock[0])
    pipeline.on_frame(_frame(clock[0] + 5 * 10**9, error="step 10 is smaller than width*3=384"))
    ids = []
    for i, offset_s in enumerate((0, 5, 0)):  # the middle command pairs with the broken frame
        clock[0] = 10**15 + offset_s * 10**9
        ids.append(pipeline.submit(f"pick up the red cube {i}", f"c{i}"))
    clock[0] = 10**15
    backend.gate.set()
    recorder.wait(4)
    pipeline.stop()
    assert [(kind, len(texts)) for kind, texts in backend.calls] == [("generate", 1), ("batch", 2)]
    assert [s.command_id for s in recorder.statuses] == ["first"] + ids
    assert [recorder.code(i) for i in ids] == ["ACCEPTED", "BAD_IMAGE", "ACCEPTED"]
    assert "step 10" in recorder.statuses[2].detail


def test_infer_batch_on_a_real_model_equals_infer_one_by_one(tiny_model_dir):
    from vla_node.factory import RuntimeSettings, build_core

    core = build_core(RuntimeSettings(model_path=str(tiny_model_dir), max_new_tokens=BUDGET, device="cpu"))
    jobs = [InferenceJob(tiny_image(160, 120, 0), "put the red cube in the blue bowl", "a"),
            InferenceJob(np.zeros((1, 300, 3), np.uint8), "pick up the green ball", "bad"),  # cannot be fitted
            InferenceJob(tiny_image(64, 200, 1), "pick up the green ball", "b")]
    alone = [core.infer(job.rgb, job.command, job.command_id) for job in jobs]
    batched = core.infer_batch(jobs)
    assert [status.code for _, status in batched] == [status.code for _, status in alone]
    assert batched[1][1].code == StatusCode.BAD_IMAGE
    for (plan_a, status_a), (plan_b, status_b) in zip(alone, batched):
        assert status_b.detail == status_a.detail
        assert (plan_a is None) == (plan_b is None)
        if plan_a is not None:
            assert plan_b.raw_text == plan_a.raw_text and plan_b.steps == plan_a.steps
    core.backend.close()
