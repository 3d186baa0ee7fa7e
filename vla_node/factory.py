"""Builds the inference core from plain settings (shared by the node, vla-eval and the demo)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from vla_node.backends.base import Backend, BackendError
from vla_node.manifest import ManifestError, prompt_template_of
from vla_node.backends.openai_backend import OpenAIBackend, ServerSettings
from vla_node.pipeline import InferenceCore, PipelineConfig
from vla_node.settings import PARAMETERS, check_all, default
from vla_node.policy import SafetyPolicy
from vla_node.prompt import PromptBuilder
from vla_node.vocabulary import Vocabulary

EMBEDDED_MODEL = "tabletop-tiny"
EMBEDDED_ADAPTER = "tabletop-tiny-zh-lora"
EMBEDDED_ADAPTER_NAME = "zh"  # the name the embedded model's Chinese adapter is loaded under by default


def package_data_dir(name: str) -> Path | None:
    """`config`, `models` or `launch`: source tree, installed share dir, or a wheel's copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here / name):
        if candidate.is_dir():
            return candidate
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        return None
    try:
        share = Path(get_package_share_directory("vla_node")) / name
    except PackageNotFoundError:
        return None
    return share if share.is_dir() else None


def embedded_path(name: str) -> Path:
    models = package_data_dir("models")
    if models is None or not (models / name).is_dir():
        raise BackendError(f"the embedded model '{name}' is not installed (looked in {models}); "
                           "pass model_path explicitly or build it: make models")
    return models / name


def parse_adapter_specs(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["zh=/path/a", "/path/b"] -> {"zh": "/path/a", "b": "/path/b"} (name defaults to the dir name)."""
    adapters: dict[str, str] = {}
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        if path == "embedded":
            path = str(embedded_path(EMBEDDED_ADAPTER))
        name = name.strip() or Path(path).name
        if name in adapters:
            raise ValueError(f"adapter name '{name}' is given twice")
        adapters[name] = path
    return adapters


def adapter_specs(settings: "RuntimeSettings") -> list[str]:
    """The adapters to load: those given; none given with the embedded model (transformers backend):
    its Chinese adapter as "zh=embedded", loaded and inactive unless active_adapter names it, so
    `ros2 param set /vla_node active_adapter zh` works from a fresh start."""
    if settings.adapters:
        return list(settings.adapters)
    if settings.backend == "transformers" and not settings.model_path:
        models = package_data_dir("models")
        if models is not None and (models / EMBEDDED_ADAPTER).is_dir():  # an embedded model may come without one
            return [f"{EMBEDDED_ADAPTER_NAME}=embedded"]
    return []


@dataclass
class RuntimeSettings:
    """What the core is built from; defaults and meanings are the node parameters' (vla_node.settings)."""

    model_path: str = default("model_path")  # "" -> the embedded tabletop-tiny model
    adapters: list[str] = field(default_factory=list)  # "name=path" entries; "embedded" = bundled LoRA
    active_adapter: str = default("active_adapter")  # name of the adapter to use; "" -> base model
    backend: str = default("backend")
    device: str = default("device")
    dtype: str = default("dtype")
    prefix_cache: bool = default("prefix_cache")  # transformers, onnx: reuse the system-prompt prefix's KV cache
    decode_cache: str = default("decode_cache")  # transformers: auto | dynamic | static
    compile_decode: bool = default("compile_decode")  # transformers, static on CUDA: torch.compile the decode step
    compile_layers: bool = default("compile_layers")  # transformers on CUDA: compile vision blocks, prefill norms/MLPs
    torch_threads: int = default("torch_threads")  # transformers: torch CPU threads (0 = torch's default)
    onnx_threads: int = default("onnx_threads")  # onnx: onnxruntime intra-op threads (0 = its default)
    vocabulary_path: str = default("vocabulary_path")  # "" -> config/actions.yaml
    max_new_tokens: int = default("max_new_tokens")
    min_confidence: float | None = None  # overrides the vocabulary file's policy when set
    max_steps: int | None = None
    constrained_decoding: bool = default("constrained_decoding")  # only grammar-valid plans (vla_node.grammar)
    constrain_to_policy: bool = default("constrain_to_policy")  # the grammar also applies the policy's labels
    presence_check: bool = default("presence_check")  # ask whether a multi-step plan's things are on the table
    server: ServerSettings = field(default_factory=ServerSettings)  # backend "openai" only


BACKENDS = PARAMETERS["backend"].choices


def settings_from_parameters(values: Mapping[str, Any]) -> tuple[RuntimeSettings, PipelineConfig]:
    """The node's parameter values (vla_node.settings names; missing ones keep their defaults) ->
    what the core is built from and how the pipeline handles requests. Values are checked first."""
    values = {**{name: default(name) for name in PARAMETERS}, **values}
    check_all(values)
    runtime = RuntimeSettings(
        adapters=[a for a in values["adapters"] if a],  # [""]: ROS has no empty string array default
        min_confidence=values["min_confidence"] if values["min_confidence"] >= 0 else None,
        max_steps=values["max_steps"] if values["max_steps"] >= 0 else None,
        server=ServerSettings.from_parameters(values) if values["backend"] == "openai" else ServerSettings(),
        **{f.name: values[f.name] for f in fields(RuntimeSettings)
           if f.name not in ("adapters", "min_confidence", "max_steps", "server")},
    )
    return runtime, PipelineConfig.from_parameters(values)


def build_backend(settings: RuntimeSettings, vocab: Vocabulary, policy: SafetyPolicy | None = None) -> Backend:
    if settings.backend not in BACKENDS:
        raise BackendError(f"unknown backend '{settings.backend}' (available: {', '.join(BACKENDS)})")
    if settings.backend == "openai":
        return _build_server_backend(settings, vocab)
    if settings.backend == "onnx":
        return _build_onnx_backend(settings, vocab, policy)
    from vla_node.backends.transformers_backend import TransformersBackend

    model_path = settings.model_path or str(embedded_path(EMBEDDED_MODEL))
    backend = TransformersBackend(model_path, device=settings.device, dtype=settings.dtype,
                                  max_new_tokens=settings.max_new_tokens,
                                  vocab_fingerprint=vocab.fingerprint(),
                                  prefix_cache=settings.prefix_cache, decode_cache=settings.decode_cache,
                                  compile_decode=settings.compile_decode, compile_layers=settings.compile_layers,
                                  torch_threads=settings.torch_threads)
    for name, path in parse_adapter_specs(adapter_specs(settings)).items():
        backend.load_adapter(path, name)
    backend.set_adapter(settings.active_adapter or None)
    if settings.constrained_decoding:
        backend.enable_constrained_decoding(vocab, policy, restrict_to_policy=settings.constrain_to_policy)
    return backend


def _build_onnx_backend(settings: RuntimeSettings, vocab: Vocabulary, policy: SafetyPolicy | None) -> Backend:
    """onnxruntime: model_path is a `vla-export --onnx` folder; adapters must be merged at export.
    Constrained decoding where xgrammar is installed (it brings torch); without it, unconstrained."""
    import logging

    from vla_node.backends.onnx_backend import OnnxBackend

    if not settings.model_path:
        raise BackendError("backend 'onnx' needs model_path: a folder written by `vla-export --model DIR --onnx OUT`")
    backend = OnnxBackend(settings.model_path, device=settings.device, max_new_tokens=settings.max_new_tokens,
                          threads=settings.onnx_threads, prefix_cache=settings.prefix_cache)
    for name, path in parse_adapter_specs(settings.adapters).items():
        backend.load_adapter(path, name)  # raises: merge adapters at export time
    backend.set_adapter(settings.active_adapter or None)
    if settings.constrained_decoding:
        missing = backend.constrained_decoding_unavailable()
        if missing is None:
            backend.enable_constrained_decoding(vocab, policy, restrict_to_policy=settings.constrain_to_policy)
        else:
            # why not refuse: the onnx backend exists to serve without torch, and constrained decoding is on by
            # default; the parser + safety gate still check every plan
            logging.getLogger(__name__).warning(
                "backend 'onnx': %s; generating unconstrained (parser and safety gate still apply)", missing)
    return backend


def _build_server_backend(settings: RuntimeSettings, vocab: Vocabulary) -> Backend:
    """Thin client: adapters are names the server serves (model_path: optional local config copy)."""
    backend = OpenAIBackend(settings.server, model_path=settings.model_path,
                            max_new_tokens=settings.max_new_tokens, json_schema=vocab.json_schema(),
                            vocab_fingerprint=vocab.fingerprint())
    for name, path in parse_adapter_specs(settings.adapters).items():
        backend.load_adapter(path, name)
    backend.set_adapter(settings.active_adapter or None)
    return backend


def build_core(settings: RuntimeSettings, backend: Backend | None = None) -> InferenceCore:
    vocab = Vocabulary.load(settings.vocabulary_path or None)
    overrides = {key: value for key, value in (("min_confidence", settings.min_confidence),
                                              ("max_steps", settings.max_steps)) if value is not None}
    policy = SafetyPolicy.from_config({**(vocab.policy_config or {}), **overrides}, vocab)
    backend = backend or build_backend(settings, vocab, policy)
    # the model is asked the way it was trained: its manifest names the prompt template (the backend
    # read it from the model it loaded: model_path "" is the embedded model, not "no manifest")
    template = getattr(backend, "prompt_template", None)
    try:
        prompt = PromptBuilder(vocab, template=template or prompt_template_of(settings.model_path))
    except ManifestError as e:
        raise BackendError(str(e)) from None
    return InferenceCore(backend, vocab, prompt, policy, settings.max_new_tokens,
                         presence_check=settings.presence_check)
