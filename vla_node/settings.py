"""Every node parameter, declared once: name, type (that of its default), default, range, description.

From this one declaration:
  - the ROS node declares its parameters, with descriptors (vla_node.ros.node), and checks
    every value at configure;
  - config/vla_node.yaml is written (`python -m vla_node.settings > config/vla_node.yaml`;
    tests/test_settings.py compares it), and the README's parameter table is checked;
  - the core's settings (factory.RuntimeSettings, pipeline.PipelineConfig,
    openai_backend.ServerSettings) take their defaults and their value checks;
  - vla-replay types its `-p NAME:=VALUE` options.
No rclpy, no torch: the core and the tools read it too.
"""
from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from vla_node.manifest import FAMILIES
from vla_node.text import DEFAULT_STOP_PHRASES

__all__ = ["NodeParameter", "ParameterError", "PARAMETERS", "GROUPS", "default", "check", "check_all", "coerce",
           "yaml_text"]


class ParameterError(ValueError):
    """A parameter value outside its declared type or range; the message names the parameter."""


@dataclass(frozen=True)
class NodeParameter:
    name: str
    default: Any  # its type is the parameter's: bool, int, float, str or list of str
    description: str
    group: str  # the section of config/vla_node.yaml
    runtime: bool = False  # may change while the node runs (ros2 param set); the rest is read at configure
    topic: bool = False  # a topic name: once started, the node holds the full name it resolved (remaps applied)
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound

    @property
    def type(self) -> type:
        return type(self.default)

    def range_text(self) -> str:
        """The range as `ros2 param describe` and the generated files show it ('' = any value)."""
        if self.choices:
            return "one of: " + " | ".join(c if c else "''" for c in self.choices)
        if self.above is not None:
            return f"> {self.above:g}"
        if self.minimum is not None:
            return f">= {self.minimum:g}"
        return ""

    def check(self, value: Any) -> None:
        """Raise ParameterError naming the parameter when `value` is out of its type or range."""
        expected = self.type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is list:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ParameterError(f"{self.name} must be a list of strings, got {value!r}")
        elif type(value) is not expected:
            raise ParameterError(f"{self.name} must be a {expected.__name__}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ParameterError(f"{self.name} must be one of {', '.join(repr(c) if not c else c for c in self.choices)}"
                                 f", not {value!r}")
        if self.above is not None and not value > self.above:
            raise ParameterError(f"{self.name} must be > {self.above:g}, got {value}")
        if self.minimum is not None and not value >= self.minimum:
            raise ParameterError(f"{self.name} must be >= {self.minimum:g}, got {value}")


# The sections of config/vla_node.yaml, in order, with the lines that introduce them.
GROUPS: dict[str, tuple[str, ...]] = {
    "model": (),
    "backend: openai (vLLM / SGLang / LMDeploy / llamafactory-cli api / transformers serve)": (
        'adapters are then "name=path" with name = the server\'s LoRA module name (vLLM --lora-modules);',
        "model_path may point at a local copy of the served model's config.json + processor config.",
    ),
    "running the model here (backends transformers and onnx)": (),
    "actions and safety": (
        "The safety gate (allowed_verbs/objects/destinations, min_confidence, max_steps, boxes inside the",
        "image) is the `policy:` section of the vocabulary file; a refused plan is never published",
        "(REJECTED_BY_POLICY).",
    ),
    "topics": (
        "A topic parameter may be relative (resolved in the node's namespace) and is remapped like any",
        "topic; once started, the node sets it to the full name it uses: `ros2 param get` shows the real topic.",
    ),
    "request handling": (),
}
_MODEL, _SERVER, _RUN, _ACTIONS, _TOPICS, _REQUESTS = GROUPS

_DECLARED = (
    # --- model
    NodeParameter("model_path", "", "Local Qwen2-VL/Qwen2.5-VL/Qwen3-VL directory (backend onnx: a vla-export --onnx "
                  "folder); '' = the embedded tabletop-tiny model", _MODEL),
    NodeParameter("adapters", [""], "LoRA adapters to load, each 'name=path' ('embedded' = the bundled Chinese LoRA); "
                  "several may be loaded, more added at runtime (loaded in the background; the parameter then "
                  "lists what is loaded). [''] with the embedded model: ['zh=embedded'], loaded and inactive",
                  _MODEL, runtime=True),
    NodeParameter("active_adapter", "", "Name of the adapter in use ('' = base model); change it at runtime to "
                  "hot-swap (a failed load keeps the previous one)", _MODEL, runtime=True),
    NodeParameter("backend", "transformers", "Inference backend: transformers (the model runs here) | onnx (a "
                  "vla-export --onnx folder, no torch) | openai (an OpenAI-compatible server)", _MODEL,
                  choices=("transformers", "onnx", "openai")),
    # --- backend openai
    NodeParameter("server_url", "", "Server base URL, e.g. http://gpu-host:8000/v1", _SERVER),
    NodeParameter("server_model", "", "Served base model name (vLLM --served-model-name); adapters are requested by "
                  "their served name", _SERVER),
    NodeParameter("api_key_env", "", "Environment variable holding the API key, sent as Bearer ('' = no key)",
                  _SERVER),
    NodeParameter("server_timeout_s", 10.0, "Hard deadline of one request attempt", _SERVER, above=0),
    NodeParameter("server_max_retries", 2, "Retries after timeouts, connection errors, 408/429/5xx; never after "
                  "other 4xx", _SERVER, minimum=0),
    NodeParameter("server_retry_backoff_s", 0.25, "First retry delay, doubling each retry", _SERVER, minimum=0),
    NodeParameter("server_breaker_failures", 3, "Consecutive failures that open the circuit breaker (then "
                  "BACKEND_ERROR at once)", _SERVER, minimum=1),
    NodeParameter("server_breaker_reset_s", 15.0, "Seconds the open breaker fails fast before one trial request",
                  _SERVER, minimum=0),
    NodeParameter("server_tls_verify", True, "Verify https certificates", _SERVER),
    NodeParameter("server_ca_file", "", "CA bundle of a private server certificate", _SERVER),
    NodeParameter("server_structured_output", "json_schema", "json_schema | structured_outputs (vLLM >= 0.12) | "
                  "guided_json (older vLLM) | none", _SERVER,
                  choices=("json_schema", "structured_outputs", "guided_json", "none")),
    NodeParameter("server_model_family", "", "qwen2_vl | qwen2_5_vl | qwen3_vl; '' = from model_path (else "
                  "qwen2_5_vl)", _SERVER, choices=("", *FAMILIES)),
    NodeParameter("server_min_pixels", 0, "Image pixel limits of the server's processor; 0 = from model_path (else "
                  "3136)", _SERVER, minimum=0),
    NodeParameter("server_max_pixels", 0, "Must match the server, or boxes are scaled wrong; 0 = from model_path "
                  "(else 1003520)", _SERVER, minimum=0),
    # --- running the model here
    NodeParameter("device", "auto", "auto | cpu | cuda | cuda:N", _RUN),
    NodeParameter("dtype", "auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16", _RUN,
                  choices=("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half")),
    NodeParameter("prefix_cache", True, "backends transformers and onnx: prefill the shared system-prompt prefix "
                  "once and reuse its KV cache (same outputs)", _RUN),
    NodeParameter("decode_cache", "auto", "backend transformers: KV cache for decoding: auto (static + CUDA-graphed "
                  "prefill and decode on CUDA, dynamic on CPU) | dynamic | static", _RUN,
                  choices=("auto", "dynamic", "static")),
    NodeParameter("compile_decode", True, "backend transformers, static decode cache on CUDA: torch.compile the "
                  "decode step before recording it (faster steps; the first request compiles, tens of seconds)",
                  _RUN),
    NodeParameter("compile_layers", True, "backend transformers on CUDA: torch.compile the vision tower's blocks "
                  "and the language model's norms and MLPs before the vision and prefill graphs are recorded "
                  "(faster frames; the first frame of each size compiles, seconds)", _RUN),
    NodeParameter("torch_threads", 0, "backend transformers: torch CPU threads, process-wide (0 = torch's default, "
                  "one per core; 1 is often fastest on a shared CPU)", _RUN, minimum=0),
    NodeParameter("onnx_threads", 0, "backend onnx: onnxruntime intra-op threads of each session (0 = "
                  "onnxruntime's default, one per physical core; 1 leaves the other cores to the robot's other "
                  "nodes)", _RUN, minimum=0),
    # A two-step plan with boxes is ~110 tokens for the embedded model; 64 cut such plans short.
    NodeParameter("max_new_tokens", 128, "Upper bound on generated tokens per command (a two-step plan with boxes "
                  "is ~110 tokens)", _RUN, minimum=1),
    NodeParameter("warmup", True, "Run one generation at configure so the first command is not slow (with "
                  "max_batch > 1, one tiny batch per batch size as well)", _RUN),
    # --- actions and safety
    NodeParameter("vocabulary_path", "", "Action vocabulary + safety policy YAML (verbs, allowlists); '' = "
                  "config/actions.yaml", _ACTIONS),
    NodeParameter("min_confidence", -1.0, "Refuse plans below this confidence; < 0 keeps the vocabulary file's "
                  "policy", _ACTIONS, minimum=-1),
    NodeParameter("max_steps", -1, "Refuse plans with more steps; < 0 keeps the vocabulary file's policy",
                  _ACTIONS, minimum=-1),
    NodeParameter("constrained_decoding", True, "Grammar-constrained decoding: only well-formed plans of the "
                  "vocabulary (<= max_steps lines) can be generated", _ACTIONS),
    NodeParameter("presence_check", True, "Before publishing a plan of two or more steps, ask the model whether each "
                  "thing it names is on the table; one it says is absent makes the plan CLARIFY (models whose "
                  "manifest says count_questions, e.g. the embedded one; backends transformers and onnx)", _ACTIONS),
    NodeParameter("constrain_to_policy", False, "The grammar also applies the policy's allowed verbs/objects/"
                  "destinations (off: a refused label is reported as REJECTED_BY_POLICY instead)", _ACTIONS),
    NodeParameter("stop_phrases", list(DEFAULT_STOP_PHRASES), "Utterances that publish STOP at once, without the "
                  "model, and cancel pending work (whole-utterance match)", _ACTIONS),
    # --- topics
    NodeParameter("camera_topic", "camera/image_raw", "Camera topic; relative names resolve in the node's "
                  "namespace (one node per robot)", _TOPICS, topic=True),
    NodeParameter("camera_transport", "raw", "raw (sensor_msgs/Image) | compressed (sensor_msgs/CompressedImage)",
                  _TOPICS, choices=("raw", "compressed")),
    NodeParameter("camera_reliability", "auto", "auto (reliable unless a camera publisher is best effort; "
                  "re-checked each second) | best_effort | reliable", _TOPICS,
                  choices=("auto", "best_effort", "reliable")),
    NodeParameter("speech_topic", "speech/text", "Transcribed speech topic (std_msgs/String)", _TOPICS, topic=True),
    NodeParameter("action_topic", "vla/actions", "Plans out (vla_node/ActionPlan)", _TOPICS, topic=True),
    NodeParameter("status_topic", "vla/status", "One status per command (vla_node/CommandStatus)", _TOPICS,
                  topic=True),
    NodeParameter("debug_image_topic", "vla/debug_image", "The frame each command was answered on, with the "
                  "plan's boxes, labels and status drawn (sensor_msgs/Image; drawn only while subscribed; "
                  "transient local, depth 1)", _TOPICS, topic=True),
    NodeParameter("diagnostics_period_s", 1.0, "Period of /diagnostics messages", _TOPICS, above=0),
    # --- request handling
    NodeParameter("max_image_age_s", 2.0, "A command whose closest image is older than this gets STALE_IMAGE",
                  _REQUESTS, above=0),
    NodeParameter("frame_buffer", 8, "Undecoded camera messages kept to pair a command with the closest frame",
                  _REQUESTS, minimum=1),
    NodeParameter("queue_size", 4, "Commands waiting for the model at most", _REQUESTS, minimum=1),
    NodeParameter("queue_policy", "drop_oldest", "drop_oldest (newest command wins, BUSY for the dropped) | "
                  "reject_newest", _REQUESTS, choices=("drop_oldest", "reject_newest")),
    NodeParameter("max_batch", 1, "Waiting commands run as one batched generation at most (capped by the backend; "
                  "1 = one at a time)", _REQUESTS, minimum=1),
    NodeParameter("generation_timeout_s", 30.0, "Watchdog: generation longer than this gives TIMEOUT", _REQUESTS,
                  above=0),
    NodeParameter("max_command_bytes", 512, "Longer speech text (UTF-8 bytes, after control characters are "
                  "stripped) is refused with BAD_COMMAND", _REQUESTS, minimum=1),
)

PARAMETERS: dict[str, NodeParameter] = {p.name: p for p in _DECLARED}


def default(name: str) -> Any:
    """The declared default (a fresh copy of a list)."""
    value = PARAMETERS[name].default
    return list(value) if isinstance(value, list) else value


def check(name: str, value: Any) -> None:
    if name not in PARAMETERS:
        raise ParameterError(f"unknown parameter {name!r}")
    PARAMETERS[name].check(value)


def check_all(values: Mapping[str, Any]) -> None:
    """Check each value; the first one out of range raises ParameterError naming it."""
    for name, value in values.items():
        check(name, value)


def coerce(name: str, value: Any) -> Any:
    """A value typed like the parameter's default: text as given on a command line ('true', '3',
    'a,b' or a JSON list), or a value read from JSON. Raises ParameterError when it is not one."""
    if name not in PARAMETERS:
        raise ParameterError(f"unknown parameter {name!r}")
    expected = PARAMETERS[name].type
    try:
        if expected is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return lowered in ("true", "1")
        if expected is list:
            if isinstance(value, str):
                text = value.strip()
                value = json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",")]
            return [str(v) for v in value] or [""]
        return expected(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ParameterError(f"parameter {name}: {value!r} is not a {expected.__name__}") from None


# ------------------------------------------------------------------------------- config/vla_node.yaml
YAML_HEADER = (
    "# Parameters of the vla_node node (ros2 launch vla_node robot.launch.py params_file:=...).",
    "# Written by `python -m vla_node.settings > config/vla_node.yaml` from their one declaration",
    "# (vla_node/settings.py); `ros2 param describe /vla_node NAME` shows the same description.",
    "# Values marked [runtime] may be changed while the node runs (`ros2 param set`); the rest",
    "# are read at configure. A refused value is reported and the old value kept.",
)
_WIDTH = 100


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    plain = value and yaml.safe_load(value) == value and not any(c in value for c in ":#[]{},'\"")
    return value if plain else json.dumps(value, ensure_ascii=False)


def _yaml_list(name: str, values: list[str], width: int = 100) -> list[str]:
    items = [json.dumps(v, ensure_ascii=False) for v in values]
    lines, line = [], f"    {name}: ["
    indent = " " * len(line)
    for i, item in enumerate(items):
        piece = item + ("]" if i == len(items) - 1 else ",")
        if len(line) + len(piece) + 1 > width and not line.endswith("["):
            lines.append(line.rstrip())
            line = indent
        line += piece + " "
    lines.append(line.rstrip())
    return lines


def _comment(parameter: NodeParameter) -> str:
    limits = parameter.range_text()
    # choices are spelled out in most descriptions already; numeric ranges are not
    extra = f" ({limits})" if limits and not parameter.choices else ""
    return ("[runtime] " if parameter.runtime else "") + parameter.description + extra


def yaml_text() -> str:
    """config/vla_node.yaml: every parameter with its default and description, by section."""
    lines = list(YAML_HEADER) + ["/**:", "  ros__parameters:"]
    for group, notes in GROUPS.items():
        lines.append(f"    # --- {group} " + "-" * max(3, _WIDTH - 12 - len(group)))
        lines += [f"    # {note}" for note in notes]
        for parameter in (p for p in _DECLARED if p.group == group):
            if isinstance(parameter.default, list):
                entries = _yaml_list(parameter.name, parameter.default)
            else:
                entries = [f"    {parameter.name}: {_yaml_scalar(parameter.default)}"]
            lines += textwrap.wrap(_comment(parameter), _WIDTH, initial_indent="    # ",
                                   subsequent_indent="    #   ")
            lines += entries
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vla_node.settings",
                                     description="Print config/vla_node.yaml, generated from the parameters' "
                                                 "one declaration (vla_node/settings.py).")
    parser.parse_args(argv)
    sys.stdout.write(yaml_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
