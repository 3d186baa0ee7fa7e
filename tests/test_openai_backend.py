"""OpenAIBackend: a real `transformers serve` on loopback, and a scripted http.server for faults.

The real server runs the embedded tabletop-tiny model; the pipeline must parse and validate its
answer, and the server must have seen the image at exactly the size used for box conversion. The
scripted server injects what a real one does only on a bad day (500s, timeouts, dripping bodies,
malformed JSON, TLS with a private CA); it never stands in for the real one.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from vla_node.actions import StatusCode
from vla_node.backends.base import BackendError, GenerationRequest
from vla_node.backends.openai_backend import CircuitBreaker, OpenAIBackend, ServerError, ServerSettings
from vla_node.factory import EMBEDDED_MODEL, RuntimeSettings, build_core, embedded_path
from vla_node.pipeline import CommandPipeline, Frame, PipelineConfig
from vla_node.prompt import PromptBuilder
from vla_node.vocabulary import Vocabulary

VALID_ANSWER = 'MOVE_OBJECT(object="red cube", destination="blue bowl")'
SERVER_START_TIMEOUT_S = 180  # a bound on waiting for uvicorn, not a speed assertion


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _completion(text: str, logprobs: list[float] | None = None) -> bytes:
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": lp} for lp in logprobs]}
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [choice],
                       "usage": {"prompt_tokens": 100, "completion_tokens": 12}}).encode()


# ------------------------------------------------------------------------------ scripted server
class ScriptedServer:
    """Answers POSTs from a script of steps; records every request (headers + JSON body).

    Steps: ("reply", status, body_bytes) | ("hold",) (blocks until release()) |
    ("drip",) (headers, then one body byte at a time until release()). An empty script replies 200.
    """

    def __init__(self, tls_context: ssl.SSLContext | None = None):
        self.script: queue.Queue = queue.Queue()
        self.requests: list[dict] = []
        self.released = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                       "body": json.loads(body)})
                try:
                    step = outer.script.get_nowait()
                except queue.Empty:
                    step = ("reply", 200, _completion(VALID_ANSWER))
                try:
                    if step[0] == "hold":
                        outer.released.wait(30)
                        self._send(200, _completion(VALID_ANSWER))
                    elif step[0] == "drip":
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", "100000")
                        self.end_headers()
                        while not outer.released.wait(0.05):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                    else:
                        self._send(step[1], step[2])
                except OSError:  # the client cut the connection: exactly what a timeout should do
                    pass

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def url(self, scheme="http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    def push(self, *steps):
        for step in steps:
            self.script.put(step)

    def close(self):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load(None)


def _backend(url, vocab, **overrides) -> OpenAIBackend:
    fields = dict(url=url, model="base", max_retries=2, retry_backoff_s=0.01, timeout_s=5.0)
    fields.update(overrides)
    return OpenAIBackend(ServerSettings(**fields), json_schema=vocab.json_schema(),
                         vocab_fingerprint=vocab.fingerprint())


def _request(vocab, image=None, stop_event=None) -> GenerationRequest:
    image = np.full((56, 84, 3), 90, np.uint8) if image is None else image
    return GenerationRequest(image=image, messages=PromptBuilder(vocab).chat_messages("put the red cube in the blue bowl"),
                             max_new_tokens=32, stop_event=stop_event)


# ------------------------------------------------------------------------------ request shape
def test_request_carries_image_schema_adapter_and_bearer_key(scripted, vocab, monkeypatch):
    monkeypatch.setenv("VLA_TEST_API_KEY", "sk-test-123")
    backend = _backend(scripted.url(), vocab, api_key_env="VLA_TEST_API_KEY")
    backend.load_adapter("/srv/loras/zh", "zh")
    backend.set_adapter("zh")
    image = np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    scripted.push(("reply", 200, _completion(VALID_ANSWER, logprobs=[-0.1, -0.3])))

    result = backend.generate(_request(vocab, image))

    sent = scripted.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == "Bearer sk-test-123"
    body = sent["body"]
    assert body["model"] == "zh"  # the adapter is chosen by its served name
    assert body["temperature"] == 0.0 and body["max_tokens"] == 32
    assert body["response_format"]["json_schema"]["schema"] == vocab.json_schema()
    parts = body["messages"][1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    png = base64.b64decode(url.split(",", 1)[1])
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.array_equal(decoded, image)  # lossless: the server sees exactly these pixels
    assert result.text == VALID_ANSWER
    assert result.model_input_size == (84, 56)
    assert result.confidence == pytest.approx(np.exp(-0.2))
    assert (result.prompt_tokens, result.new_tokens) == (100, 12)
    assert backend.adapter_id.startswith("zh@") and backend.adapter_names() == ["zh"]
    backend.set_adapter(None)
    backend.generate(_request(vocab))
    assert scripted.requests[1]["body"]["model"] == "base"


@pytest.mark.parametrize("mode,field,expected", [
    ("structured_outputs", "structured_outputs", lambda schema: {"json": schema}),
    ("guided_json", "guided_json", lambda schema: schema),
    ("none", None, None),
])
def test_structured_output_modes(scripted, vocab, mode, field, expected):
    _backend(scripted.url(), vocab, structured_output=mode).generate(_request(vocab))
    body = scripted.requests[0]["body"]
    fields = {"response_format", "structured_outputs", "guided_json"} & set(body)
    assert fields == ({field} if field else set())
    if field:
        assert body[field] == expected(vocab.json_schema())


def test_bad_settings_are_refused_with_a_reason(vocab, monkeypatch):
    monkeypatch.delenv("VLA_UNSET_KEY", raising=False)
    with pytest.raises(BackendError, match="VLA_UNSET_KEY"):
        _backend("http://127.0.0.1:9/v1", vocab, api_key_env="VLA_UNSET_KEY")
    with pytest.raises(BackendError, match="server_url"):
        _backend("", vocab)
    with pytest.raises(BackendError, match="server_model"):
        _backend("http://127.0.0.1:9", vocab, model="")
    with pytest.raises(BackendError, match="structured_output"):
        ServerSettings(url="http://x", model="m", structured_output="grammar")
    backend = _backend("http://127.0.0.1:9", vocab)
    with pytest.raises(BackendError, match="not registered"):
        backend.set_adapter("missing")


# ------------------------------------------------------------------------------ faults
def test_5xx_is_retried_with_backoff_then_succeeds(scripted, vocab):
    scripted.push(("reply", 500, b'{"error": {"message": "CUDA out of memory"}}'), ("reply", 503, b"busy"))
    result = _backend(scripted.url(), vocab).generate(_request(vocab))
    assert result.text == VALID_ANSWER
    assert len(scripted.requests) == 3


def test_persistent_5xx_gives_up_after_bounded_retries(scripted, vocab):
    for _ in range(5):
        scripted.push(("reply", 500, b'{"error": {"message": "CUDA out of memory"}}'))
    with pytest.raises(ServerError, match=r"HTTP 500: CUDA out of memory after 3 attempts"):
        _backend(scripted.url(), vocab, breaker_failures=10).generate(_request(vocab))
    assert len(scripted.requests) == 3


@pytest.mark.parametrize("status,body,reason", [
    (404, b'{"error": {"message": "The model `zh` does not exist."}}', r"HTTP 404: The model `zh` does not exist.*served"),
    (401, b'{"detail": "bad key"}', r"HTTP 401: bad key"),
    (400, b"plain text failure", r"HTTP 400: plain text failure"),
])
def test_4xx_is_not_retried_and_does_not_trip_the_breaker(scripted, vocab, status, body, reason):
    backend = _backend(scripted.url(), vocab, breaker_failures=1)
    scripted.push(("reply", status, body))
    with pytest.raises(ServerError, match=reason) as caught:
        backend.generate(_request(vocab))
    assert caught.value.status == status
    assert len(scripted.requests) == 1
    assert backend.breaker.state == "closed"


@pytest.mark.parametrize("body,reason", [
    (b"<html>502 from the proxy</html>", "not JSON"),
    (b'{"choices": [', "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"choices": []}', r"no choices\[0\]"),
])
def test_malformed_bodies_give_a_reason(scripted, vocab, body, reason):
    scripted.push(("reply", 200, body))
    with pytest.raises(BackendError, match=reason):
        _backend(scripted.url(), vocab).generate(_request(vocab))
    assert len(scripted.requests) == 1


@pytest.mark.parametrize("step", [("hold",), ("drip",)])
def test_nothing_hangs_past_the_timeout(scripted, vocab, step):
    # The server only lets go once the client has returned: a client that waited for the
    # server instead of its own deadline would get the valid answer and fail this test.
    scripted.push(step)
    backend = _backend(scripted.url(), vocab, timeout_s=0.3, max_retries=0)
    with pytest.raises(BackendError, match="timeout_s=0.3"):
        backend.generate(_request(vocab))
    assert not scripted.released.is_set()
    scripted.released.set()


def test_stop_event_aborts_a_request_in_flight(scripted, vocab):
    scripted.push(("hold",))
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    result = _backend(scripted.url(), vocab, timeout_s=60).generate(_request(vocab, stop_event=stop))
    assert result.text == "" and not scripted.released.is_set()
    scripted.released.set()


def test_server_down_is_a_backend_error(vocab):
    backend = _backend(f"http://127.0.0.1:{_free_port()}/v1", vocab, max_retries=1)
    with pytest.raises(ServerError, match="cannot reach the server.*after 2 attempts"):
        backend.generate(_request(vocab))


def test_warmup_only_warns_when_the_server_is_down(vocab):
    backend = _backend(f"http://127.0.0.1:{_free_port()}/v1", vocab, max_retries=0)
    backend.warmup()  # robots may start before the server: the first command reports it
    assert len(backend.warnings) == 1 and "cannot reach the server" in backend.warnings[0]


def test_circuit_breaker_fails_fast_then_half_opens(scripted, vocab):
    now = [1000.0]
    backend = _backend(scripted.url(), vocab, max_retries=0)
    backend.breaker = CircuitBreaker(failures=2, reset_s=10.0, clock=lambda: now[0])
    scripted.push(*[("reply", 502, b"bad gateway")] * 3)
    for _ in range(2):
        with pytest.raises(ServerError, match="HTTP 502"):
            backend.generate(_request(vocab))
    assert backend.breaker.state == "open"
    with pytest.raises(BackendError, match=r"circuit open: server failed 2 times.*HTTP 502.*next try in 10.0 s"):
        backend.generate(_request(vocab))
    assert len(scripted.requests) == 2  # failing fast: no request reached the server

    now[0] += 10.0  # half-open: one trial; it fails (no retry) and opens the circuit again
    with pytest.raises(ServerError, match="HTTP 502"):
        backend.generate(_request(vocab))
    assert backend.breaker.state == "open" and len(scripted.requests) == 3
    now[0] += 10.0  # the next trial succeeds and closes it
    assert backend.generate(_request(vocab)).text == VALID_ANSWER
    assert backend.breaker.state == "closed"


def test_pipeline_reports_backend_error_and_keeps_serving(scripted, vocab):
    settings = RuntimeSettings(backend="openai", server=ServerSettings(
        url=scripted.url(), model="base", max_retries=0, timeout_s=5.0))
    core = build_core(settings)
    statuses: queue.Queue = queue.Queue()
    plans = []
    pipeline = CommandPipeline(core, PipelineConfig(), on_plan=plans.append, on_status=statuses.put)
    frame = np.full((240, 320, 3), 128, np.uint8)
    pipeline.on_frame(Frame(stamp_ns=time.time_ns(), frame_id="cam", received_ns=time.time_ns(),
                            decode=lambda: frame))
    # What json_schema-constrained decoding returns: the JSON form, boxes in resized-image pixels.
    constrained = json.dumps({"actions": [{"action": "PICK_OBJECT", "object": "red cube",
                                           "object_box": [28, 56, 84, 112]}]})
    scripted.push(("reply", 404, b'{"error": {"message": "model nope not found"}}'),
                  ("reply", 200, b"not json"),
                  ("reply", 200, _completion(constrained, logprobs=[-0.05, -0.05])))
    pipeline.start()
    try:
        codes = []
        for command in ("put the red cube in the blue bowl", "pick up the red cube", "pick up the red cube"):
            pipeline.submit(command)
            codes.append(statuses.get(timeout=30))
    finally:
        pipeline.stop()
    assert [s.code for s in codes] == [StatusCode.BACKEND_ERROR, StatusCode.BACKEND_ERROR, StatusCode.ACCEPTED]
    assert "HTTP 404: model nope not found" in codes[0].detail
    assert "not JSON" in codes[1].detail
    (plan,) = plans
    sent = scripted.requests[2]["body"]["messages"][1]["content"][0]["image_url"]["url"]
    width, height = cv2.imdecode(np.frombuffer(base64.b64decode(sent.split(",", 1)[1]), np.uint8),
                                 cv2.IMREAD_COLOR).shape[1::-1]
    assert (width, height) != (320, 240)  # fitted to the pixel grid before sending
    box = plan.steps[0].object_box
    assert box.as_list() == pytest.approx([28 * 320 / width, 56 * 240 / height, 84 * 320 / width, 112 * 240 / height])
    assert plan.steps[0].confidence == pytest.approx(np.exp(-0.05))


# ------------------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_is_verified_by_default(self_signed, vocab):
    cert, key = self_signed
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ScriptedServer(tls_context=context)
    try:
        url = server.url("https")
        with pytest.raises(ServerError, match="TLS certificate verification failed.*server_ca_file"):
            _backend(url, vocab).generate(_request(vocab))
        assert server.requests == []  # nothing was sent to an unverified server
        assert _backend(url, vocab, ca_file=str(cert)).generate(_request(vocab)).text == VALID_ANSWER
        assert _backend(url, vocab, tls_verify=False).generate(_request(vocab)).text == VALID_ANSWER
        with pytest.raises(BackendError, match="does not exist"):
            _backend(url, vocab, ca_file=str(cert) + ".missing")
    finally:
        server.close()


# ------------------------------------------------------------------------------ real server
@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """`transformers serve` (transformers[serving]) with the embedded model on a free loopback port."""
    model = str(embedded_path(EMBEDDED_MODEL))
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cli = Path(sys.executable).with_name("transformers")
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(cli), "serve", model, "--host", "127.0.0.1", "--port", str(port),
                                    "--device", "cpu", "--dtype", "float32"],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield model, f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _scene(vocab):
    """A synthetic scene and the plainest wording of its move command (this is about the protocol,
    not about how well the small model reads varied speech)."""
    from training.synth import SynthConfig, Synthesizer
    from training.synth_language import prepositions

    synth = Synthesizer(SynthConfig(num=200, seed=0, size=(320, 240), languages=["en"], skills=["move"]), vocab)
    sample = synth.sample(0)
    step = sample.steps[0]
    command = f"put the {step.object} {prepositions(step.destination.rpartition(' ')[2])[0]} the {step.destination}"
    return np.ascontiguousarray(sample.image[:, :, ::-1]), command, sample.answer


def test_real_server_answer_passes_the_pipeline_at_the_sent_size(real_server, vocab):
    model, url = real_server
    rgb, command, _ = _scene(vocab)
    core = build_core(RuntimeSettings(backend="openai", model_path=model, server=ServerSettings(
        url=url, model=model, timeout_s=120.0, max_retries=0)))
    backend = core.backend
    # the embedded Qwen3-VL model was trained on pixel boxes: its manifest says so, not the family
    assert (backend.family, backend.coordinate_convention) == ("qwen3_vl", "absolute_resized")
    assert backend.pixel_limits.max_pixels == 76800  # read from the local copy of the processor config
    exchanged = []  # (request, result) of the one real round trip
    generate = backend.generate
    backend.generate = lambda request: exchanged.append((request, generate(request))) or exchanged[-1][1]

    # transformers serve ignores response_format and logprobs (with a warning): plain canonical text
    plan, status = core.infer(rgb, command, command_id="real-1")

    assert status.code in (StatusCode.ACCEPTED, StatusCode.REJECTED_BY_POLICY), status.detail
    if plan is not None:
        assert plan.model_id == backend.model_id and plan.steps
    (request, remote), = exchanged
    assert remote.confidence == 1.0  # no logprobs from this server: the documented fallback
    assert remote.text and remote.new_tokens > 0
    # The server's processor saw exactly the image size used for box conversion: its prompt is
    # as long as the robot's own processor makes it for these pixels (image tokens = pixels / (patch * merge)^2).
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model, local_files_only=True)
    text = processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
    local = processor(text=[text], images=[request.image], return_tensors="np")
    assert remote.prompt_tokens == local["input_ids"].shape[1]
    grid, patch = local["image_grid_thw"][0], processor.image_processor.patch_size
    assert remote.model_input_size == (int(grid[2]) * patch, int(grid[1]) * patch) == request.image.shape[1::-1]


def test_real_server_refuses_an_unknown_model_name(real_server, vocab):
    _, url = real_server
    backend = _backend(url, vocab, model="no-such-adapter", timeout_s=60.0)
    with pytest.raises(ServerError, match="HTTP 400: Server is pinned") as caught:
        backend.generate(_request(vocab))
    assert caught.value.status == 400
    with pytest.raises(ServerError, match="HTTP 400"):
        backend.warmup()  # a wrong name fails at start, not at the first command


# ------------------------------------------------------------------------------ node parameters
def test_node_parameters_select_the_server_backend(scripted, vocab):
    pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter

    from tests.ros_helpers import rclpy
    from vla_node.ros.node import VlaNode

    context = rclpy.context.Context()
    rclpy.init(context=context)
    try:
        common = [Parameter("backend", value="openai"), Parameter("server_url", value=scripted.url()),
                  Parameter("server_timeout_s", value=3.0), Parameter("server_max_retries", value=0),
                  Parameter("server_structured_output", value="structured_outputs"),
                  Parameter("server_max_pixels", value=200704)]
        node = VlaNode(context=context, parameter_overrides=common + [
            Parameter("server_model", value="qwen2.5-vl-3b"),
            Parameter("adapters", value=["tabletop=/srv/adapters/tabletop_lora"]),
            Parameter("active_adapter", value="tabletop")])
        try:
            backend = node.runtime.core.backend
            assert isinstance(backend, OpenAIBackend)
            assert backend.settings.structured_output == "structured_outputs"
            assert backend.pixel_limits.max_pixels == 200704
            assert scripted.requests[0]["body"]["model"] == "tabletop"  # the warmup reached the server
            assert "structured_outputs" not in scripted.requests[0]["body"]  # 2 tokens cannot fit a schema
        finally:
            node.shutdown()
            node.destroy_node()
        scripted.push(("reply", 404, b'{"error": {"message": "The model `nope` does not exist."}}'))
        with pytest.raises(ServerError, match="does not exist"):  # a wrong name fails the start
            VlaNode(context=context, parameter_overrides=common + [Parameter("server_model", value="nope")])
    finally:
        rclpy.try_shutdown(context=context)
