"""Thin client for an OpenAI-compatible chat-completions server (vLLM, SGLang, LMDeploy,
`llamafactory-cli api`, `transformers serve`).

The node keeps its own prompt builder, parser and safety gate; only generation moves to the
server. One frame goes out as a PNG data URL (lossless, so the server sees exactly the pixels
whose size we report for box conversion), the adapter is chosen by the request's ``model``
name (vLLM ``--lora-modules NAME=PATH`` serves each adapter under NAME), and the action JSON
Schema is sent as ``response_format`` (or vLLM's older ``guided_json``) while the local parser
still validates whatever comes back.

Failure handling, so a slow or dead server never piles up work on the robot:
  * every attempt has a hard deadline (``timeout_s``): the socket is shut down when it passes,
    also when the server drips bytes slowly;
  * connection errors, timeouts, 408/429/5xx are retried ``max_retries`` times with exponential
    backoff; other 4xx (bad key, unknown model/adapter) and malformed bodies are not;
  * a circuit breaker opens after ``breaker_failures`` consecutive server failures and then fails
    every request at once (BACKEND_ERROR) for ``breaker_reset_s``; after that one trial request
    is let through (half-open): success closes it, failure opens it again;
  * the request's ``stop_event`` (STOP command, pipeline watchdog) aborts the attempt at once.

Stdlib only (http.client, ssl): no HTTP dependency for a robot that may never use a server.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from vla_node import manifest as _manifest
from vla_node.backends.base import DEFAULT_MAX_NEW_TOKENS, Backend, BackendError, GenerationRequest, GenerationResult, PixelLimits
from vla_node.settings import PARAMETERS, ParameterError, check_all, default

__all__ = ["OpenAIBackend", "ServerError", "ServerSettings", "STRUCTURED_OUTPUT_MODES"]

log = logging.getLogger(__name__)

# json_schema: OpenAI `response_format` (vLLM, SGLang, LMDeploy); structured_outputs: vLLM >= 0.12's
# extra body field; guided_json: the same before vLLM 0.12; none: let the model write its trained
# canonical text (servers without constrained decoding ignore or refuse the fields).
STRUCTURED_OUTPUT_MODES = PARAMETERS["server_structured_output"].choices
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Qwen2.5-VL's patch 14 x merge 2; pixel limits a robot camera frame rarely needs more than.
DEFAULT_PIXEL_LIMITS = PixelLimits(min_pixels=4 * 28 * 28, max_pixels=1280 * 28 * 28, factor=28)
_ERROR_PREVIEW = 300


@dataclass
class ServerSettings:
    """The server and how to talk to it. Each field is a node parameter (SERVER_PARAMETERS names
    it; vla_node.settings declares its default, range and meaning)."""

    url: str = default("server_url")  # base URL, e.g. http://gpu-host:8000/v1 ("/v1" is added if missing)
    model: str = default("server_model")  # served base model name (vLLM: --served-model-name or the path)
    api_key_env: str = default("api_key_env")  # environment variable holding the API key ("" = none)
    timeout_s: float = default("server_timeout_s")  # hard deadline of one attempt (connect + request + response)
    max_retries: int = default("server_max_retries")  # extra attempts after a retryable failure
    retry_backoff_s: float = default("server_retry_backoff_s")  # first backoff; doubles each retry (+-20 % jitter)
    breaker_failures: int = default("server_breaker_failures")  # consecutive failures that open the circuit
    breaker_reset_s: float = default("server_breaker_reset_s")  # open this long, then one trial request
    tls_verify: bool = default("server_tls_verify")  # verify https certificates (never off outside a lab)
    ca_file: str = default("server_ca_file")  # extra CA bundle for a private server certificate
    structured_output: str = default("server_structured_output")
    model_family: str = default("server_model_family")  # "" = from model_path or qwen2_5_vl
    min_pixels: int = default("server_min_pixels")  # 0 = from model_path's processor config, else the default
    max_pixels: int = default("server_max_pixels")  # must match the server's processor, or boxes scale wrong

    def __post_init__(self):
        try:
            check_all({SERVER_PARAMETERS[f.name]: getattr(self, f.name) for f in fields(self)})
        except ParameterError as error:
            raise BackendError(str(error)) from None

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any]) -> ServerSettings:
        """From node parameter values (missing names keep their defaults)."""
        return cls(**{name: values[parameter] for name, parameter in SERVER_PARAMETERS.items() if parameter in values})


# ServerSettings field -> the node parameter it is
SERVER_PARAMETERS = {f.name: f.name if f.name == "api_key_env" else f"server_{f.name}" for f in fields(ServerSettings)}


class ServerError(BackendError):
    """The server refused or failed the request; ``status`` is the HTTP status (0: no HTTP answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class _AttemptFailed(Exception):
    def __init__(self, reason: str, retryable: bool, counts_for_breaker: bool = True, status: int = 0):
        super().__init__(reason)
        self.status = status
        self.retryable = retryable
        self.counts_for_breaker = counts_for_breaker


class _Aborted(Exception):
    """The request's stop_event was set while waiting for the server."""


class CircuitBreaker:
    """closed -> (N consecutive failures) -> open -> (reset_s) -> half-open (one trial) -> closed/open."""

    def __init__(self, failures: int, reset_s: float, clock=time.monotonic):
        self.failures_to_open = failures
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self.last_failure = ""

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half_open" if self._clock() - self._opened_at >= self.reset_s else "open"

    def before_request(self) -> bool:
        """Raises BackendError while open; returns True when this request is the half-open trial."""
        with self._lock:
            if self._opened_at is None:
                return False
            waited = self._clock() - self._opened_at
            if waited < self.reset_s or self._trial_in_flight:
                retry_in = max(0.0, self.reset_s - waited)
                raise BackendError(f"circuit open: server failed {self._failures} times in a row "
                                   f"(last: {self.last_failure}); next try in {retry_in:.1f} s")
            self._trial_in_flight = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial_in_flight = False

    def record_failure(self, reason: str) -> None:
        with self._lock:
            self._failures += 1
            self.last_failure = reason
            if self._trial_in_flight or self._failures >= self.failures_to_open:
                self._opened_at = self._clock()
            self._trial_in_flight = False

    def release_trial(self) -> None:
        """A trial that ended without a verdict on the server (aborted, client error)."""
        with self._lock:
            self._trial_in_flight = False


def _read_json(path: Path) -> dict:
    try:
        return _manifest.read_json_object(path)
    except ValueError as e:
        raise BackendError(f"'{path}' is {e}") from e


def local_model_info(model_dir: str) -> tuple[str | None, PixelLimits | None]:
    """(family, pixel limits) from a local copy of the served model's config files (no weights needed)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise BackendError(f"model_path '{path}' is not a directory (for the server backend it is an "
                           "optional local copy of the served model's config.json + processor config)")
    family = None
    if (path / "config.json").is_file():
        model_type = _read_json(path / "config.json").get("model_type")
        family = _manifest.FAMILIES.get(model_type)
        if family is None:
            raise BackendError(f"'{path / 'config.json'}': model_type {model_type!r} is not a supported "
                               f"Qwen-VL family ({', '.join(sorted(_manifest.FAMILIES))})")
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            data = _read_json(path / name)
            image = data.get("image_processor", data)
            size = image.get("size") or {}
            low = size.get("shortest_edge", image.get("min_pixels"))
            high = size.get("longest_edge", image.get("max_pixels"))
            factor = int(image.get("patch_size", 14)) * int(image.get("merge_size", 2))
            if low and high:
                return family, PixelLimits(min_pixels=int(low), max_pixels=int(high), factor=factor)
    return family, None


def encode_png_data_url(rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))  # cv2 writes BGR
    if not ok:
        raise BackendError(f"cannot PNG-encode an image of shape {rgb.shape}")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")


def openai_messages(messages: list[dict], image_url: str) -> list[dict]:
    """PromptBuilder chat messages ({"type": "image"} placeholders) -> OpenAI content parts."""
    converted = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": image_url}} if part.get("type") == "image"
                       else part for part in content]
        converted.append({"role": message["role"], "content": content})
    return converted


def _error_text(body: bytes) -> str:
    """The server's own error message ({"error": {"message"}}, {"detail"}, or the raw body)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:_ERROR_PREVIEW] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)[:_ERROR_PREVIEW]
    return text[:_ERROR_PREVIEW]


class OpenAIBackend(Backend):
    """Generation on an OpenAI-compatible server; see the module docstring for the failure model."""

    def __init__(self, settings: ServerSettings, model_path: str = "", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 json_schema: dict | None = None, vocab_fingerprint: str | None = None):
        if not settings.url:
            raise BackendError("backend 'openai' needs server_url (e.g. http://gpu-host:8000/v1)")
        if not settings.model:
            raise BackendError("backend 'openai' needs server_model (the served base model name)")
        self.settings = settings
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise BackendError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.json_schema = json_schema
        if settings.structured_output != "none" and not json_schema:
            raise BackendError(f"structured_output '{settings.structured_output}' needs the action JSON Schema")
        self.vocab_fingerprint = vocab_fingerprint
        self.warnings: list[str] = []

        url = urllib.parse.urlsplit(settings.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BackendError(f"server_url {settings.url!r} must be http(s)://host[:port][/path]")
        self._scheme, self._host = url.scheme, url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        base = url.path.rstrip("/")
        self._base_path = base if base.endswith("/v1") else base + "/v1"
        self._ssl_context = self._make_ssl_context() if url.scheme == "https" else None
        self._api_key = self._read_api_key(settings.api_key_env)

        family, limits = local_model_info(model_path) if model_path else (None, None)
        self.family = settings.model_family or family or "qwen2_5_vl"
        self.coordinate_convention = _manifest.COORDINATE_CONVENTIONS[self.family]
        if model_path and family == self.family:
            try:  # a model fine-tuned by vla-train answers in the convention its data used (its manifest's)
                self.coordinate_convention = _manifest.coordinate_convention_of(model_path)
            except _manifest.ManifestError as e:
                raise BackendError(str(e)) from None
        limits = limits or DEFAULT_PIXEL_LIMITS
        self.base_pixel_limits = PixelLimits(min_pixels=settings.min_pixels or limits.min_pixels,
                                             max_pixels=settings.max_pixels or limits.max_pixels,
                                             factor=limits.factor)
        if self.base_pixel_limits.min_pixels > self.base_pixel_limits.max_pixels:
            raise BackendError(f"server min_pixels {self.base_pixel_limits.min_pixels} > "
                               f"max_pixels {self.base_pixel_limits.max_pixels}")
        self.pixel_limits = self.base_pixel_limits
        self.model_id = f"{settings.model}@{self._host}:{self._port}"
        self.adapter_id = ""
        self._adapters: dict[str, PixelLimits] = {}  # served adapter name -> pixel limits
        self._active: str | None = None
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self._closed = False

    # ------------------------------------------------------------------ configuration
    def _make_ssl_context(self) -> ssl.SSLContext:
        if not self.settings.tls_verify:
            log.warning("TLS certificate verification is OFF for %s", self.settings.url)
            return ssl._create_unverified_context()  # explicit opt-out for lab servers
        ca_file = self.settings.ca_file or None
        if ca_file and not Path(ca_file).is_file():
            raise BackendError(f"server ca_file '{ca_file}' does not exist")
        try:
            return ssl.create_default_context(cafile=ca_file)
        except ssl.SSLError as e:
            raise BackendError(f"server ca_file '{ca_file}' is not a usable CA bundle: {e}") from e

    @staticmethod
    def _read_api_key(env_name: str) -> str:
        if not env_name:
            return ""
        key = os.environ.get(env_name, "").strip()
        if not key:
            raise BackendError(f"api_key_env names '{env_name}', but that environment variable is not set")
        return key

    # ------------------------------------------------------------------ adapters (served by name)
    def load_adapter(self, path: str, name: str | None = None) -> str:
        """Register an adapter the server serves under ``name`` (vLLM --lora-modules name=path).

        ``path`` is where the server reads it; when that directory also exists here and holds a
        vla_manifest.json, its pixel limits are used and its vocabulary fingerprint is checked.
        """
        name = name or Path(path).name
        if not name:
            raise BackendError(f"adapter at '{path}' needs a name (the server's LoRA module name)")
        if name in self._adapters:
            raise BackendError(f"adapter name {name!r} is already registered")
        limits = self.base_pixel_limits
        local = Path(path)
        if local.is_dir() and _manifest.has_manifest(local):
            try:
                man = _manifest.read_manifest(local)
                _manifest.require_action_answers(man, local / _manifest.MANIFEST_NAME)
            except _manifest.ManifestError as e:
                raise BackendError(f"adapter '{path}' refused: {e}") from e
            fingerprint = (man.get("vocabulary") or {}).get("fingerprint")
            if self.vocab_fingerprint and fingerprint and fingerprint != self.vocab_fingerprint:
                raise BackendError(f"adapter '{path}' refused: trained with vocabulary {fingerprint[:12]}, "
                                   f"the node uses {self.vocab_fingerprint[:12]}")
            limits = PixelLimits(min_pixels=int(man["image"]["min_pixels"]),
                                 max_pixels=int(man["image"]["max_pixels"]), factor=limits.factor)
        self._adapters[name] = limits
        return name

    def set_adapter(self, name: str | None) -> None:
        if name is not None and name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise BackendError(f"adapter {name!r} is not registered (registered: {known})")
        self._active = name
        self.adapter_id = f"{name}@{self._host}:{self._port}" if name else ""
        self.pixel_limits = self._adapters[name] if name else self.base_pixel_limits

    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    @property
    def served_model_name(self) -> str:
        """What goes in the request's "model": the active adapter's served name, or the base model."""
        return self._active or self.settings.model

    # ------------------------------------------------------------------ generation
    def build_body(self, request: GenerationRequest, image: np.ndarray, structured: bool = True) -> dict:
        body = {
            "model": self.served_model_name,
            "messages": openai_messages(request.messages, encode_png_data_url(image)),
            "max_tokens": min(int(request.max_new_tokens), self.max_new_tokens),
            "temperature": 0.0,
            "logprobs": True,  # servers that support it give us a real confidence
        }
        mode = self.settings.structured_output if structured else "none"
        if mode == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "action_plan", "schema": self.json_schema, "strict": True}}
        elif mode == "structured_outputs":
            body["structured_outputs"] = {"json": self.json_schema}
        elif mode == "guided_json":
            body["guided_json"] = self.json_schema
        return body

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self._generate(request, structured=True)

    def _generate(self, request: GenerationRequest, structured: bool) -> GenerationResult:
        if self._closed:
            raise BackendError("backend is closed")
        image = request.image
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
                and image.dtype == np.uint8):
            raise BackendError(f"request.image must be an RGB uint8 HxWx3 array, got "
                               f"{getattr(image, 'shape', type(image))}")
        if int(request.max_new_tokens) < 1:
            raise BackendError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        from vla_node.image import fit_to_limits  # the pipeline already fitted it: then a no-op

        started = time.perf_counter()
        image = fit_to_limits(image, self.pixel_limits)
        size = (int(image.shape[1]), int(image.shape[0]))
        payload = json.dumps(self.build_body(request, image, structured), ensure_ascii=False).encode("utf-8")
        preprocess_ms = (time.perf_counter() - started) * 1000.0
        stop = request.stop_event
        if stop is not None and stop.is_set():
            return GenerationResult("", 1.0, size, 0, 0, preprocess_ms, 0.0)

        sent = time.perf_counter()
        try:
            data = self._post_with_retries("/chat/completions", payload, stop)
        except _Aborted:
            return GenerationResult("", 1.0, size, 0, 0, preprocess_ms, (time.perf_counter() - sent) * 1000.0)
        text, confidence, usage = self._read_completion(data)
        return GenerationResult(
            text=text,
            confidence=confidence,
            model_input_size=size,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            new_tokens=int(usage.get("completion_tokens") or 0),
            preprocess_ms=preprocess_ms,
            generate_ms=(time.perf_counter() - sent) * 1000.0,
        )

    def _read_completion(self, data: dict) -> tuple[str, float, dict]:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"server answer has no choices[0].message.content: "
                               f"{json.dumps(data)[:_ERROR_PREVIEW]}") from None
        if not isinstance(text, str):
            text = "" if text is None else str(text)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return text.strip(), self._confidence(choice), usage

    @staticmethod
    def _confidence(choice: dict) -> float:
        """Geometric mean of the chosen tokens' probabilities when the server sent logprobs, else 1.0."""
        entries = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        values = [e.get("logprob") for e in entries or () if isinstance(e, dict)]
        values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if not values:
            return 1.0
        return min(1.0, max(math.exp(sum(values) / len(values)), 1e-12))

    def _post_with_retries(self, path: str, payload: bytes, stop: threading.Event | None) -> dict:
        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            trial = self.breaker.before_request()
            try:
                data = self._attempt(path, payload, stop)
            except _Aborted:
                self.breaker.release_trial()
                raise
            except _AttemptFailed as failure:
                where = f"{self.settings.url} (model {self.served_model_name!r})"
                if failure.counts_for_breaker:
                    self.breaker.record_failure(str(failure))
                else:
                    self.breaker.release_trial()
                last = attempt == attempts - 1 or trial
                if not failure.retryable or last:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise ServerError(f"server {where}: {failure}{tries}", failure.status) from None
                delay = self.settings.retry_backoff_s * (2 ** attempt) * random.uniform(0.8, 1.2)
                log.warning("server %s: %s; retry %d/%d in %.2f s", where, failure, attempt + 1,
                            attempts - 1, delay)
                if stop is not None and stop.wait(delay):
                    raise _Aborted() from None
                if stop is None:
                    time.sleep(delay)
                continue
            self.breaker.record_success()
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> http.client.HTTPConnection:
        timeout = self.settings.timeout_s
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl_context)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _attempt(self, path: str, payload: bytes, stop: threading.Event | None) -> dict:
        """One HTTP request on a helper thread, so a deadline or a stop can cut it off mid-read."""
        conn = self._connection()
        outcome: dict = {}
        finished = threading.Event()

        def run() -> None:
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            try:
                conn.request("POST", self._base_path + path, body=payload, headers=headers)
                response = conn.getresponse()
                outcome["status"], outcome["body"] = response.status, response.read()
            except BaseException as error:  # reported to the caller, never raised on this thread
                outcome["error"] = error
            finally:
                finished.set()

        worker = threading.Thread(target=run, name="vla-openai-request", daemon=True)
        deadline = time.monotonic() + self.settings.timeout_s
        worker.start()
        try:
            while not finished.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if stop is not None and stop.is_set():
                    raise _Aborted()
                if time.monotonic() >= deadline:
                    raise _AttemptFailed(f"no complete answer within timeout_s={self.settings.timeout_s}",
                                         retryable=True)
        finally:
            if not finished.is_set():
                self._cut(conn)
            conn.close()
        return self._interpret(outcome)

    @staticmethod
    def _cut(conn: http.client.HTTPConnection) -> None:
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the helper thread's blocked recv
            except OSError:
                pass

    def _interpret(self, outcome: dict) -> dict:
        error = outcome.get("error")
        if isinstance(error, ssl.SSLCertVerificationError):
            raise _AttemptFailed(f"TLS certificate verification failed ({error.verify_message}); "
                                 "set server_ca_file to the server's CA", retryable=False,
                                 counts_for_breaker=False)
        if isinstance(error, (socket.timeout, TimeoutError)):
            raise _AttemptFailed(f"no answer within timeout_s={self.settings.timeout_s}", retryable=True)
        if isinstance(error, (OSError, http.client.HTTPException)):
            raise _AttemptFailed(f"cannot reach the server: {type(error).__name__}: {error}", retryable=True)
        if error is not None:
            raise _AttemptFailed(f"request failed: {type(error).__name__}: {error}", retryable=False)
        status, body = outcome["status"], outcome["body"]
        if status >= 400:
            reason = f"HTTP {status}: {_error_text(body)}"
            if status == 404:
                reason += f" (is {self.served_model_name!r} served? vLLM lists names at /v1/models)"
            if status in (401, 403):
                reason += f" (check the key in ${self.settings.api_key_env or '<api_key_env unset>'})"
            retryable = status in RETRYABLE_STATUS
            # 4xx is our request's fault, not the server's health: it does not trip the breaker.
            raise _AttemptFailed(reason, retryable=retryable, counts_for_breaker=retryable or status >= 500,
                                 status=status)
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _AttemptFailed(f"HTTP {status} body is not JSON ({e}): {body[:120]!r}", retryable=False) from None
        if not isinstance(data, dict):
            raise _AttemptFailed(f"HTTP {status} body is JSON but not an object: {body[:120]!r}", retryable=False)
        return data

    # ------------------------------------------------------------------ lifecycle
    def warmup(self) -> None:
        """One tiny request. A wrong model name or key fails here; an unreachable server only warns
        (fleets start robots before the server; the first command reports BACKEND_ERROR then)."""
        f = self.pixel_limits.factor
        side = max(f, int(math.ceil(math.sqrt(self.pixel_limits.min_pixels) / f)) * f)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "warmup"}]}]
        request = GenerationRequest(image=np.full((side, side, 3), 127, np.uint8), messages=messages,
                                    max_new_tokens=2)
        try:
            self._generate(request, structured=False)  # a 2-token answer cannot satisfy the schema
        except BackendError as error:
            if isinstance(error, ServerError) and 400 <= error.status < 500 and error.status not in RETRYABLE_STATUS:
                raise
            message = f"server warmup failed, serving anyway: {error}"
            self.warnings.append(message)
            log.warning(message)

    def close(self) -> None:
        self._closed = True
