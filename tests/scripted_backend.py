"""A Backend whose "model" says what the test scripts: for fuzzing and fault injection around the pipeline.

The pipeline, parser, policy and node are what these tests exercise; the model's weights are not,
so a scripted answer (any text, any confidence, an exception, a hang) stands in for generate().
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vla_node.backends.base import Backend, GenerationRequest, GenerationResult
from vla_node.image import PixelLimits


@dataclass
class Reply:
    text: str = 'MOVE_OBJECT(object="red cube", destination="blue bowl")'
    confidence: float = 0.9
    error: BaseException | None = None  # raised instead of answering
    wait_for_stop_s: float = 0.0  # block until the request's stop_event is set (cooperative), at most this long


@dataclass
class ScriptedBackend(Backend):
    """Answers with `replies` in order (the last one repeats); records every request it got."""

    replies: list[Reply] = field(default_factory=lambda: [Reply()])
    model_id: str = "scripted@00000000"
    adapter_id: str = ""
    coordinate_convention: str = "absolute_resized"
    pixel_limits: PixelLimits = field(default_factory=lambda: PixelLimits(28 * 28, 112 * 112, 28))
    requests: list[GenerationRequest] = field(default_factory=list)
    stopped_early: int = 0  # generations ended by the stop_event

    def __post_init__(self):
        self._lock = threading.Lock()
        self.started = threading.Event()  # set when a generate() call begins

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies = list(replies)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        with self._lock:
            self.requests.append(request)
            reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        self.started.set()
        if reply.wait_for_stop_s and request.stop_event is not None:
            if request.stop_event.wait(reply.wait_for_stop_s):
                self.stopped_early += 1
                return self._result("", 1.0, request)
        if reply.error is not None:
            raise reply.error
        return self._result(reply.text, reply.confidence, request)

    @staticmethod
    def _result(text: str, confidence: float, request: GenerationRequest) -> GenerationResult:
        height, width = request.image.shape[:2]
        return GenerationResult(text=text, confidence=confidence, model_input_size=(width, height),
                                prompt_tokens=1, new_tokens=len(text.split()), preprocess_ms=0.0, generate_ms=0.0)

    def warmup(self) -> None:
        pass

    def load_adapter(self, path: str, name: str | None = None) -> str:
        raise NotImplementedError("the scripted backend has no adapters")

    def set_adapter(self, name: str | None) -> None:
        if name is not None:
            raise NotImplementedError("the scripted backend has no adapters")

    def close(self) -> None:
        pass
