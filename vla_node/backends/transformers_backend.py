"""transformers + peft backend for local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints.

Loads offline (``local_files_only=True``) with ``AutoModelForImageTextToText`` + ``AutoProcessor``,
decodes greedily, reports a confidence (geometric mean of the chosen tokens' probabilities) and
hot-swaps LoRA adapters without reloading the base model.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import threading
import time
from pathlib import Path

from vla_node import manifest as _manifest
from vla_node.backends.base import (
    DEFAULT_MAX_NEW_TOKENS,
    Backend,
    BackendError,
    GenerationRequest,
    GenerationResult,
    PixelLimits,
    token_budget,
    warmup_request,
)
from vla_node.backends.engine.batched_generation import BatchedGeneration
from vla_node.backends.engine.frame_cache import VisionCache
from vla_node.backends.engine.prefix_cache import PrefixCache
from vla_node.backends.engine.prefix_cache import reset as reset_static_cache
from vla_node.backends.engine.fused_projections import FusedProjections
from vla_node.backends.engine.one_image_inputs import OneImageInputs
from vla_node.backends.engine.prefill_graph import PREFILL_BUCKET, PrefillGraphs, host_inputs
from vla_node.backends.engine.static_decode import DecodeResult, StaticDecoder, greedy_choice
from vla_node.backends.engine.vision_attention import use_block_attention
from vla_node.backends.engine.vision_graph import VisionGraphs
from vla_node.backends.engine.vision_graph import supports as vision_graph_supported

__all__ = ["TransformersBackend"]

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_DECODE_CACHES = ("auto", "dynamic", "static")
_STATIC_CACHE_BUCKET = 256  # static KV caches are sized in steps of this, so compiled decode graphs get reused


def _template_id() -> str:
    """The prompt template id adapters must have been trained with (vla_node.prompt may define it)."""
    try:
        from vla_node import prompt as _prompt  # CORE module; optional here

        for attr in ("TEMPLATE_ID", "PROMPT_TEMPLATE_ID", "TEMPLATE_VERSION"):
            val = getattr(_prompt, attr, None)
            if isinstance(val, str) and val:
                return val
    except Exception:  # pragma: no cover - prompt.py missing or broken must not block serving
        pass
    return _manifest.TEMPLATE_ID


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class _StopOnEvent:
    """StoppingCriteria: stop every sequence once ``event`` is set (checked after each token)."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.triggered = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = self.event.is_set()
        self.triggered = self.triggered or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _AdapterInfo:
    __slots__ = ("name", "path", "adapter_id", "manifest", "pixel_limits")

    def __init__(self, name, path, adapter_id, manifest, pixel_limits):
        self.name = name
        self.path = path
        self.adapter_id = adapter_id
        self.manifest = manifest
        self.pixel_limits = pixel_limits


class TransformersBackend(BatchedGeneration, Backend):
    """Serve a local Qwen-VL checkpoint (+ optional LoRA adapters) with transformers.

    Attributes for reuse (training, evaluation): ``processor``, ``model`` (the transformers model;
    LoRA layers are injected into it in place when adapters are loaded), ``peft_model`` (the
    ``PeftModel`` wrapper or None), ``family``, ``device``, ``dtype``, ``adapters`` (name -> info),
    ``warnings`` (list of str: e.g. adapters loaded without a manifest).

    Runtime speed options:

    ``prefix_cache`` (default True): the prompt tokens before the image (system text + user turn
    opening, about half the prompt) are prefilled once per (prefix tokens, active adapter, dtype,
    device) and each request starts from a copy of that KV cache (vla_node/backends/engine/prefix_cache.py,
    LRU of 4). Greedy outputs are token-identical with and without it. Hits/misses:
    ``prefix_cache_stats``.

    ``decode_cache``: "dynamic" (DynamicCache, transformers' ``generate`` loop), "static" (a
    preallocated StaticCache; vla_node/backends/engine/prefill_graph.py prefills the prompt and the first
    token is chosen from its logits (``static_prefill``; requests without an image use
    ``generate``), then vla_node/backends/engine/static_decode.py decodes the rest with the step's inputs
    on the device and q/k/v, gate/up fused (fused_projections.py); on CUDA both are CUDA-graph
    replays) or "auto" (static on CUDA, dynamic elsewhere). Static composes with ``prefix_cache``:
    the prefix is copied into the one StaticCache and stays there while requests share it (the
    cache is sized to the longest request so far rounded up to 256 tokens, at least
    ``static_cache_min_slots``), so the recorded steps keep their addresses. ``compile_decode``
    (default True): torch.compile the decode step before recording it (CUDA only). The attribute
    ``decode_kernels`` (default True): the step's one-row products, attention and greedy choice by
    Triton kernels (vla_node/backends/engine/decode_kernels.py; CUDA with Triton only). The attribute
    ``layer_kernels`` (default True, with ``decode_kernels``): a one-row step by layer_step.py's fused
    layer kernels (seven launches per layer, nothing for torch.compile; an active plain LoRA adapter
    merged into copies of the matrices it adapts) where LayerStep.unsupported allows; the attribute
    ``dependent_launch`` (default True): those kernels launched programmatically dependent on Hopper
    and later GPUs (each overlaps the end of the one before; layer_kernels.py).

    On CUDA, images are preprocessed on the GPU, the vision tower's attention runs as one call per
    layer (vla_node/backends/engine/vision_attention.py) and the tower is replayed as a CUDA graph per
    image grid (vla_node/backends/engine/vision_graph.py). ``compile_layers`` (default True): the vision
    blocks, and the language model's norms and MLPs in the prefill graphs, are compiled by
    torch.compile before recording (regional_compile.py; the first frame of each size compiles, seconds).

    ``generate_batch`` (batched_generation.py): waiting commands decoded together, up to
    ``max_batch_size`` at once.

    ``torch_threads`` (default 0 = torch's own choice, one per core): torch's CPU intra-op
    threads, process-wide. On a CPU robot shared with other processes, 1 can be several times
    faster than one per core (benchmarks/results/cpu_latency.txt).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        adapter_path: str | os.PathLike | None = None,
        device: str = "auto",
        dtype="auto",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        attn_implementation: str | None = "sdpa",
        vocab_fingerprint: str | None = None,
        prefix_cache: bool = True,
        decode_cache: str = "auto",
        torch_threads: int = 0,
        compile_decode: bool = True,
        compile_layers: bool = True,
    ):
        import torch

        self.warnings: list[str] = []
        self._lock = threading.RLock()
        self._closed = False
        self.model_path = Path(model_path)
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise BackendError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.vocab_fingerprint = vocab_fingerprint
        self.compile_decode = bool(compile_decode)  # torch.compile the static decode step on CUDA (static_decode.py)
        # torch.compile the vision blocks and the prefill's norms and MLPs on CUDA (regional_compile.py)
        self.compile_layers = bool(compile_layers)
        if int(torch_threads) < 0:
            raise BackendError(f"torch_threads must be >= 0 (0 = torch's default), got {torch_threads}")
        if torch_threads:
            torch.set_num_threads(int(torch_threads))

        cfg = self._read_config(self.model_path)
        model_type = cfg.get("model_type")
        if model_type not in _manifest.FAMILIES:
            raise BackendError(
                f"model directory '{self.model_path}': config.json model_type {model_type!r} is not a "
                f"supported Qwen-VL family ({', '.join(sorted(_manifest.FAMILIES))})"
            )
        self.family: str = _manifest.FAMILIES[model_type]
        self.coordinate_convention: str = _manifest.COORDINATE_CONVENTIONS[self.family]
        self.config_sha256 = _manifest.config_sha256(self.model_path)

        self.device = self._pick_device(device, torch)
        self.dtype = self._pick_dtype(dtype, self.device, torch)
        if decode_cache not in _DECODE_CACHES:
            raise BackendError(f"invalid decode_cache {decode_cache!r}; use one of {', '.join(_DECODE_CACHES)}")
        requested_decode_cache = decode_cache
        if decode_cache == "auto":
            decode_cache = "static" if self.device.type == "cuda" else "dynamic"
        self.decode_cache: str = decode_cache  # resolved: "dynamic" or "static" (checked once the model is loaded)
        self._static_cache = None  # the one StaticCache static decoding reuses (see _initial_cache)
        self._decoder: StaticDecoder | None = None  # decode steps on that cache (static_decode.py)
        self._prefill_graphs: PrefillGraphs | None = None  # prefills on that cache (prefill_graph.py)
        # batched decoding: a StaticCache per padded row count and a decoder per such cache (batch_cache.py)
        self._batch_caches: dict[int, object] = {}
        self._batch_decoders: dict[int, StaticDecoder] = {}
        self.static_prefill = True  # prefill with PrefillGraphs where supported (else generate's prefill)
        # the decode step's one-row products and attention by Triton kernels (decode_kernels.py), CUDA only;
        # read when a decoder is built
        self.decode_kernels = True
        # ... and, for one row, the whole step by fused layer kernels (layer_step.py; with decode_kernels)
        self.layer_kernels = True
        self.dependent_launch = True  # ... launched programmatically dependent where the GPU allows
        self._static_cache_len = 0
        self._gpu_image_processing = True  # see _process

        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(str(self.model_path), local_files_only=True)
        except Exception as e:
            raise BackendError(f"model directory '{self.model_path}': cannot load processor: {e}") from e
        self._one_image_inputs = OneImageInputs(self.processor)  # see _call_processor
        kwargs = {"dtype": self.dtype, "local_files_only": True}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForImageTextToText.from_pretrained(str(self.model_path), **kwargs)
        except Exception as e:
            raise BackendError(f"model directory '{self.model_path}': cannot load model weights: {e}") from e
        model.to(self.device)
        model.eval()
        # one block-masked attention call per vision layer instead of one per window: see vision_attention.py
        self.block_vision_attention = self.device.type == "cuda" and use_block_attention(model)
        # ... which lets the tower be recorded as one CUDA graph per image grid (vision_graph.py)
        self.vision_graphs = (VisionGraphs(model, use_graph=True, compile_blocks=self.compile_layers)
                              if self.block_vision_attention
                              and vision_graph_supported(model) else None)
        self.model = model
        self.base_model = model  # never replaced; LoRA layers get injected into it
        if self.decode_cache == "static" and not StaticDecoder.supports(model, self._new_static_cache(1)):
            if requested_decode_cache == "static":
                raise BackendError(f"model directory '{self.model_path}': decode_cache 'static' needs full "
                                   "attention in every layer and transformers' StaticCache with a device-side fill count")
            self.decode_cache = "dynamic"
        self._static_prefill_supported = PrefillGraphs.supports(model, self._new_static_cache(1))
        # decode steps multiply q/k/v and gate/up in one product each (fused_projections.py)
        self._fused_projections = (FusedProjections.build(model.model.language_model)
                                   if self.decode_cache == "static" else None)
        self.peft_model = None

        ip = self.processor.image_processor
        self.patch_size = int(ip.patch_size)
        self.merge_size = int(ip.merge_size)
        self.base_pixel_limits = PixelLimits(
            min_pixels=int(self._size_get(ip.size, "shortest_edge", "min_pixels")),
            max_pixels=int(self._size_get(ip.size, "longest_edge", "max_pixels")),
            factor=self.patch_size * self.merge_size,
        )
        self.pixel_limits: PixelLimits = self.base_pixel_limits
        self.model_id = f"{self.model_path.name}@{self.config_sha256[:8]}"
        self.adapter_id = ""
        self.adapters: dict[str, _AdapterInfo] = {}
        self._active: str | None = None
        self.action_grammar = None  # vla_node.grammar.ActionGrammar when constrained decoding is on
        self.vision_cache = VisionCache()  # one vision encoding per frame for commands about the same frame
        # the image's vision-start token ends the prefix all prompts share (see prefix_cache.py)
        vision_start = getattr(model.config, "vision_start_token_id", None)
        self.prefix_cache = PrefixCache(
            -1 if vision_start is None else int(vision_start),
            capacity=4 if prefix_cache and vision_start is not None else 0,
        )

        tok = self.processor.tokenizer
        eos = []
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        for e in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
            if e is not None:
                eos.append(int(e))
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i not in eos:
                eos.append(i)
        self._eos_ids = eos
        pad = getattr(model.generation_config, "pad_token_id", None)
        self._pad_id = pad if pad is not None else tok.pad_token_id if tok.pad_token_id is not None else eos[0]

        if adapter_path is not None:
            name = self.load_adapter(str(adapter_path))
            self.set_adapter(name)

    # ------------------------------------------------------------------------------ loading

    @staticmethod
    def _read_config(path: Path) -> dict:
        if not path.exists():
            raise BackendError(f"model directory '{path}' does not exist")
        if not path.is_dir():
            raise BackendError(f"model path '{path}' is not a directory")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise BackendError(f"model directory '{path}' has no config.json (not a Hugging Face checkpoint)")
        try:
            return _manifest.read_json_object(cfg)
        except ValueError as e:
            raise BackendError(f"model directory '{path}': config.json is {e}") from e

    @staticmethod
    def _pick_device(device: str, torch):
        d = (device or "auto").lower()
        if d == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r} requested but CUDA is not available")
        try:
            return torch.device(d)
        except (RuntimeError, ValueError) as e:
            raise BackendError(f"invalid device {device!r}: {e}") from e

    @staticmethod
    def _pick_dtype(dtype, device, torch):
        if dtype is None or dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if isinstance(dtype, torch.dtype):
            return dtype
        name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
        if name is None:
            raise BackendError(f"invalid dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return getattr(torch, name)

    @staticmethod
    def _size_get(size, *keys):
        for k in keys:
            v = size.get(k) if isinstance(size, dict) else getattr(size, k, None)
            if v is not None:
                return v
        raise BackendError(f"image processor size {size!r} has none of {keys}")

    # ------------------------------------------------------------------------------ adapters

    def _check_adapter_dir(self, path: Path) -> Path:
        if not path.exists():
            raise BackendError(f"adapter directory '{path}' does not exist")
        if not path.is_dir():
            raise BackendError(f"adapter path '{path}' is not a directory")
        cfg = path / "adapter_config.json"
        if not cfg.is_file():
            raise BackendError(f"adapter directory '{path}' has no adapter_config.json")
        try:
            acfg = _manifest.read_json_object(cfg)
        except ValueError as e:
            raise BackendError(f"adapter '{cfg}' is {e}") from e
        if "peft_type" not in acfg:
            raise BackendError(f"adapter '{cfg}' is not a peft adapter config (no peft_type)")
        weights = next((path / w for w in _ADAPTER_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise BackendError(f"adapter directory '{path}' has no {' or '.join(_ADAPTER_WEIGHTS)}")
        if weights.suffix == ".safetensors":
            # read it fully now: a truncated/corrupt file must fail before peft touches the base model
            try:
                from safetensors.torch import load_file

                tensors = load_file(str(weights))
            except Exception as e:
                raise BackendError(f"adapter weights '{weights}' are corrupt or truncated: {e}") from e
            if not tensors:
                raise BackendError(f"adapter weights '{weights}' contain no tensors")
        return weights

    def load_adapter(self, path: str, name: str | None = None) -> str:
        """Load a peft adapter; validate its vla_manifest.json against the base; return its name.

        Loading does not change which adapter is active (use :meth:`set_adapter`); the
        constructor's ``adapter_path`` is loaded and activated. Raises BackendError with the
        path and the reason (missing, corrupt, manifest mismatch, duplicate name).
        """
        p = Path(path)
        with self._lock:
            self._ensure_open()
            weights = self._check_adapter_dir(p)
            if name is None:
                name = (p.resolve().name or "adapter").replace(".", "_")
            elif not name or "." in name:
                # peft stores adapters as torch submodule keys, which cannot be empty or contain dots
                raise BackendError(f"adapter name {name!r} for '{p}' must be non-empty and contain no '.'")
            if name in self.adapters:
                raise BackendError(f"adapter name {name!r} is already loaded (from '{self.adapters[name].path}')")

            man = None
            limits = self.base_pixel_limits
            if _manifest.has_manifest(p):
                expected = {
                    "family": self.family,
                    "template": _template_id(),
                    "coordinate_convention": self.coordinate_convention,
                    "vocabulary_fingerprint": self.vocab_fingerprint,
                }
                try:
                    man = _manifest.read_manifest(p)
                    _manifest.check_adapter_against_base(
                        man, self.model_path, expected, source=p / _manifest.MANIFEST_NAME
                    )
                except _manifest.ManifestError as e:
                    raise BackendError(f"adapter '{p}' refused: {e}") from e
                limits = PixelLimits(
                    min_pixels=int(man["image"]["min_pixels"]),
                    max_pixels=int(man["image"]["max_pixels"]),
                    factor=self.base_pixel_limits.factor,
                )
                if self.vocab_fingerprint is None:
                    self.warnings.append(
                        f"adapter '{p}': vocabulary fingerprint not checked (backend has no vocab_fingerprint)"
                    )

            try:
                if self.peft_model is None:
                    from peft import PeftModel

                    self.peft_model = PeftModel.from_pretrained(
                        self.base_model, str(p), adapter_name=name, is_trainable=False
                    )
                    self.peft_model.eval()
                else:
                    self.peft_model.load_adapter(str(p), adapter_name=name, is_trainable=False)
            except Exception as e:
                self._undo_failed_load(name)
                raise BackendError(f"adapter '{p}': peft cannot load it: {e}") from e
            if man is None:
                msg = f"adapter '{p}' has no {_manifest.MANIFEST_NAME}; loaded without compatibility checks"
                self.warnings.append(msg)
                log.warning(msg)
            self.base_model.to(self.device)  # new LoRA weights land on the base model's device
            adapter_id = f"{name}@{_sha256_file(weights)[:8]}"
            self.adapters[name] = _AdapterInfo(name, p, adapter_id, man, limits)
            self._apply_active()  # peft activates the first adapter it loads; keep ours
            return name

    def _undo_failed_load(self, name: str) -> None:
        """peft injects LoRA layers before it loads weights: remove them again after a failure."""
        self._forget_recordings()
        try:
            if self.peft_model is not None:
                if name in getattr(self.peft_model, "peft_config", {}):
                    self.peft_model.delete_adapter(name)
            else:
                from peft.tuners.tuners_utils import BaseTunerLayer

                model = self.base_model
                for mod_name, module in list(model.named_modules()):
                    if isinstance(module, BaseTunerLayer) and mod_name:
                        parent_name, _, child = mod_name.rpartition(".")
                        parent = model.get_submodule(parent_name) if parent_name else model
                        if getattr(parent, child, None) is module:
                            setattr(parent, child, module.get_base_layer())
                for attr in ("peft_config", "_hf_peft_config_loaded"):
                    if attr in model.__dict__:
                        delattr(model, attr)
        except Exception as e:  # pragma: no cover - best effort; report that the base may be dirty
            msg = f"could not fully undo the failed load of adapter {name!r}: {e}"
            self.warnings.append(msg)
            log.error(msg)

    def set_adapter(self, name: str | None) -> None:
        """Activate a loaded adapter, or None for the bare base model. No base reload."""
        with self._lock:
            self._ensure_open()
            if name is not None and name not in self.adapters:
                known = ", ".join(sorted(self.adapters)) or "none"
                raise BackendError(f"adapter {name!r} is not loaded (loaded: {known})")
            self._active = name
            self._apply_active()

    def _forget_recordings(self) -> None:
        """Drop the CUDA graphs (prefill, decode step, vision tower): they keep the kernels and
        weights of the adapter they were recorded with."""
        self._decoder = None
        self._batch_decoders.clear()
        self._prefill_graphs = None
        if self.vision_graphs is not None:
            self.vision_graphs.clear()

    def _apply_active(self) -> None:
        self._forget_recordings()
        pm = self.peft_model
        name = self._active
        if pm is not None:
            if name is None:
                pm.base_model.disable_adapter_layers()
            else:
                pm.set_adapter(name)
                pm.base_model.enable_adapter_layers()
        if name is None:
            self.adapter_id = ""
            self.pixel_limits = self.base_pixel_limits
        else:
            info = self.adapters[name]
            self.adapter_id = info.adapter_id
            self.pixel_limits = info.pixel_limits

    @property
    def prefix_cache_stats(self) -> dict:
        """Prefix KV reuse counters: hits, misses (prefills), skipped (no usable prefix), entries."""
        return self.prefix_cache.stats

    @property
    def active_adapter(self) -> str | None:
        """Name of the active adapter, None for the bare base model."""
        return self._active

    def adapter_names(self) -> list[str]:
        with self._lock:
            return list(self.adapters)

    @property
    def lock(self) -> threading.RLock:
        """The (re-entrant) lock serialising generate/load_adapter/set_adapter; hold it to make
        ``set_adapter(x)`` + ``generate()`` one atomic unit."""
        return self._lock

    # ------------------------------------------------------------------------------ constrained decoding

    def enable_constrained_decoding(
        self, vocab, policy=None, restrict_to_policy: bool = False, reason_max_chars: int | None = None
    ) -> None:
        """Constrain every generation to the action grammar of ``vocab`` (see vla_node.grammar).

        The tokenizer is indexed once here; each grammar is compiled on first use per image size
        (box bounds) and cached; every request gets fresh matchers. Raises BackendError.
        """
        from vla_node import grammar as _grammar

        with self._lock:
            self._ensure_open()
            try:
                vocab_size = int(self.base_model.get_output_embeddings().weight.shape[0])
                self.action_grammar = _grammar.ActionGrammar.for_vocabulary(
                    self.processor.tokenizer, vocab_size, self._eos_ids, vocab, policy, restrict_to_policy,
                    reason_max_chars)
            except _grammar.GrammarError as e:
                raise BackendError(f"constrained decoding: {e}") from e

    def disable_constrained_decoding(self) -> None:
        with self._lock:
            self.action_grammar = None

    def _box_bounds(self, model_input_size: tuple[int, int]) -> tuple[int, int]:
        from vla_node.grammar import box_bounds

        return box_bounds(self.coordinate_convention, model_input_size)

    # ------------------------------------------------------------------------------ generation

    def _ensure_open(self):
        if self._closed:
            raise BackendError("backend is closed")

    def _process(self, texts: list[str], images: list, **text_kwargs) -> dict:
        """The processor call (images resized within the active pixel limits) -> tensors on the
        backend's device in its dtype. On CUDA the image processor resizes, normalises and patchifies
        on the GPU (uploading uint8 pixels, not 7 MB of float patches per 640x480 frame); a processor
        that refuses ``device`` runs on the CPU."""
        import torch

        lim = self.pixel_limits
        images_kwargs = {"size": {"shortest_edge": lim.min_pixels, "longest_edge": lim.max_pixels}}
        inputs = None
        if self.device.type == "cuda" and self._gpu_image_processing:
            try:
                inputs = self._call_processor(texts, images, {**images_kwargs, "device": str(self.device)},
                                              text_kwargs)
            except (TypeError, ValueError) as error:
                self._gpu_image_processing = False
                log.info("image processor cannot run on %s (%s): preprocessing on the CPU", self.device, error)
        if inputs is None:
            inputs = self._call_processor(texts, images, images_kwargs, text_kwargs)
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def _call_processor(self, texts: list[str], images: list, images_kwargs: dict, text_kwargs: dict):
        """The processor's tensors for ``texts`` + ``images``; one prompt with one image by
        one_image_inputs.py once its output equalled the processor's (compared on the first such request)."""
        direct = self._one_image_inputs
        if len(texts) == 1 and len(images) == 1 and not text_kwargs and direct.usable:
            inputs = direct(texts[0], images[0], images_kwargs)
            if inputs is not None and direct.verified:
                return inputs
            reference = self.processor(text=texts, images=images, return_tensors="pt", images_kwargs=images_kwargs)
            if inputs is not None:
                direct.check(inputs, reference)
            return reference
        return self.processor(text=texts, images=images, return_tensors="pt", images_kwargs=images_kwargs,
                              **text_kwargs)

    def _input_size(self, grid_thw) -> tuple[int, int]:
        """(width, height) in pixels of the image the model saw, from its (t, h, w) patch grid."""
        _, height, width = (int(v) for v in grid_thw.tolist())
        return width * self.patch_size, height * self.patch_size

    def prepare_inputs(self, image, messages: list[dict]) -> dict:
        """Model inputs (tensors on the backend's device) for one image + chat messages.

        The chat template is applied once, the image is resized by the processor within the
        active pixel limits. Exactly what :meth:`generate` feeds the model.
        """
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._process([text], [image])

    def generate(self, request: GenerationRequest) -> GenerationResult:
        import torch

        image = request.image
        n_max = token_budget(request, self.max_new_tokens, image_required=False)

        with self._lock:
            self._ensure_open()
            t0 = time.perf_counter()
            try:
                inputs = self.prepare_inputs(image, request.messages)
            except Exception as e:
                raise BackendError(f"preprocessing failed: {e}") from e
            size = self._input_size(inputs["image_grid_thw"][0])
            prompt_len = int(inputs["input_ids"].shape[1])
            t1 = time.perf_counter()
            preprocess_ms = (t1 - t0) * 1000.0

            ev = request.stop_event
            if ev is not None and ev.is_set():
                return GenerationResult("", 1.0, size, prompt_len, 0, preprocess_ms, 0.0)

            # static: PrefillGraphs (or generate) prefills and picks the first token, StaticDecoder the rest
            constraint = None
            if self.action_grammar is not None:
                try:
                    constraint = self.action_grammar.logits_processor(n_max, self._box_bounds(size))
                except Exception as e:
                    raise BackendError(f"constrained decoding: {e}") from e
            kwargs, stop_check = self._generate_kwargs(ev, constraint)
            try:
                with torch.inference_mode():
                    if self.decode_cache == "static":
                        first, stopped, rope_deltas = self._static_prefill(inputs, image, n_max, ev, constraint,
                                                                           kwargs, stop_check)
                        new_ids, confidence = self._decode_rest(first, rope_deltas, n_max, ev, stopped, constraint)
                    else:
                        cache, _ = self._initial_cache(inputs["input_ids"], prompt_len + n_max)
                        model_inputs = self._model_inputs(inputs, image)
                        if cache is not None:
                            model_inputs = {**model_inputs, "past_key_values": cache}
                        gc = self._greedy_generation_config(n_max)
                        out = self.base_model.generate(**model_inputs, generation_config=gc, **kwargs)
            except Exception as e:
                raise BackendError(f"generation failed: {e}") from e
            if self.decode_cache != "static":
                seq = out.sequences[0, prompt_len:]
                logits = out.logits or ()
                new_ids = seq.tolist()
                # drop right padding (only when generation ended early with pad != eos; batch of 1: none)
                new_ids = new_ids[:min(len(new_ids), len(logits))]
                confidence = self._confidence(logits, new_ids)
            n_new = len(new_ids)
            text = self.processor.tokenizer.decode(
                new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            ).strip()
            generate_ms = (time.perf_counter() - t1) * 1000.0
            return GenerationResult(
                text=text,
                confidence=confidence,
                model_input_size=size,
                prompt_tokens=prompt_len,
                new_tokens=n_new,
                preprocess_ms=preprocess_ms,
                generate_ms=generate_ms,
            )

    # The smallest StaticCache: a new size means a new decoder, compiled again (tens of seconds on
    # CUDA), and 2048 slots hold a 640x480 frame's prompt + 128 new tokens, so the warm-up's cache
    # already fits the camera's commands; attending over unused slots costs ~20 us per token (3B).
    static_cache_min_slots = 2048

    def _static_slots(self, total_len: int) -> int:
        """Slots of a StaticCache for ``total_len`` tokens: rounded up to a multiple of
        _STATIC_CACHE_BUCKET, at least ``static_cache_min_slots``."""
        return max(self.static_cache_min_slots, -(-total_len // _STATIC_CACHE_BUCKET) * _STATIC_CACHE_BUCKET)

    def _new_static_cache(self, slots: int):
        from transformers import StaticCache

        return StaticCache(config=self.base_model.config, max_cache_len=slots)

    def _uses_static_prefill(self, inputs: dict) -> bool:
        """Whether this request prefills with PrefillGraphs (prefill_graph.py) rather than ``generate``."""
        return (self.static_prefill and self.decode_cache == "static" and self._static_prefill_supported
                and inputs.get("image_grid_thw") is not None and inputs.get("pixel_values") is not None)

    def _model_inputs(self, inputs: dict, image) -> dict:
        """The model's inputs with the frame's vision encoding from the frame cache (encoded by the
        recorded vision tower where there is one)."""
        encoder = self.vision_graphs.encode if self.vision_graphs is not None else None
        return self.vision_cache.model_inputs(self.base_model, inputs, image, self.adapter_id, encoder)

    def _static_prefill(self, inputs: dict, image, n_max: int, stop_event, constraint, generate_kwargs: dict,
                        stop_check) -> tuple[tuple[int, float] | None, bool, object]:
        """The prompt prefilled into the backend's StaticCache (from the cached prefix) and the first
        token chosen: ((token, log-probability) or None, stopped, rope_deltas). PrefillGraphs where
        supported, else a one-token ``generate`` (with ``generate_kwargs``: its stop criteria and
        grammar processor; ``stop_check`` its stop criterion)."""
        prompt_len = int(inputs["input_ids"].shape[1])
        host = host_inputs(inputs)  # read back before the vision tower is queued: the reads wait for nothing
        model_inputs = self._model_inputs(inputs, image)
        # the host work (prefix lookup, rope positions) while the GPU runs the tower: nothing below
        # reads the device back before the prefill
        cache, start = self._initial_cache(inputs["input_ids"], prompt_len + n_max + PREFILL_BUCKET,
                                           host["input_ids"])
        prefill = (PrefillGraphs.prepare(self.base_model, inputs, start, host) if self._uses_static_prefill(inputs)
                   else None)
        if prefill is not None:
            first, stopped = self._static_first_token(prefill, model_inputs, stop_event, constraint)
            return first, stopped, prefill.rope_deltas
        out = self.base_model.generate(**model_inputs, past_key_values=cache,
                                       generation_config=self._greedy_generation_config(1), **generate_kwargs)
        stopped = stop_check is not None and stop_check.triggered
        return self._first_of(out, prompt_len), stopped, self.base_model.model.rope_deltas

    @staticmethod
    def _first_of(out, prompt_len: int) -> tuple[int, float] | None:
        """(token, log-probability) of the first new token of a one-token ``generate``; None if none."""
        import torch

        first = out.sequences[0, prompt_len:].tolist()[:1]
        if not first:
            return None
        return first[0], float(torch.log_softmax(out.logits[0][0].float(), dim=-1)[first[0]])

    def _static_first_token(self, prefill, model_inputs: dict, stop_event, constraint):
        """The prompt prefilled by PrefillGraphs on the StaticCache and the first token chosen from
        its logits as ``generate`` would (grammar mask, greedy); returns ((token, log-probability),
        stopped), ``stopped`` being the stop event seen set after that token, as generate's criteria check."""
        graphs = self._prefill_graphs
        if (graphs is None or graphs.cache is not self._static_cache
                or graphs.requested_compile_layers != self.compile_layers):
            graphs = self._prefill_graphs = PrefillGraphs(self.base_model, self._static_cache,
                                                          use_graph=self.device.type == "cuda",
                                                          compile_layers=self.compile_layers)
        features = (model_inputs.get("mm_encoder_outputs") or {}).get("image")
        if features is None:  # the frame cache did not encode it: the tower's own call
            features = self.base_model.model.get_image_features(model_inputs["pixel_values"],
                                                                model_inputs["image_grid_thw"], return_dict=True)
        scores = graphs.run(prefill, features)
        if constraint is not None:  # masks in place, as in generate (whose returned logits are the masked ones)
            scores = constraint(prefill.input_ids, scores)
        token, logprob = greedy_choice(scores)
        return (int(token), float(logprob)), stop_event is not None and stop_event.is_set()

    def _decode_rest(self, first: tuple[int, float] | None, rope_deltas, n_max: int, stop_event, stopped: bool,
                     constraint) -> tuple[list[int], float]:
        """The tokens after the prefill's first one, by StaticDecoder on the backend's StaticCache;
        returns (all new token ids, confidence). ``first``: the prefill's (token, log-probability);
        ``stopped``: the stop event was seen set after it."""
        if first is None:
            return [], 1.0
        steps = self._steps_after(first, n_max, stopped)
        if steps <= 0:
            return self._answer(first, DecodeResult([], []))
        decoder = self._decoder = self._current_decoder(self._decoder, self._static_cache)
        return self._answer(first, decoder.decode(first[0], rope_deltas, steps, stop_event, constraint))

    def _steps_after(self, first: tuple[int, float], n_max: int, stopped: bool) -> int:
        """Decode steps left after the first token: none when it ended the answer or a stop came."""
        return 0 if stopped or first[0] in self._eos_ids else n_max - 1

    def _current_decoder(self, decoder: StaticDecoder | None, cache) -> StaticDecoder:
        """``decoder`` if it still decodes on ``cache`` with the requested kernels, else a new one."""
        if (decoder is not None and decoder.cache is cache and decoder.requested_kernels == self.decode_kernels
                and decoder.requested_layer_step == self.layer_kernels
                and decoder.requested_dependent_launch == self.dependent_launch):
            return decoder
        cuda = self.device.type == "cuda"
        return StaticDecoder(self.base_model, cache, self._eos_ids, use_graph=cuda,
                             compile_step=cuda and self.compile_decode, fused=self._fused_projections,
                             kernels=self.decode_kernels, layer_step=self.layer_kernels,
                             dependent_launch=self.dependent_launch)

    @staticmethod
    def _answer(first: tuple[int, float], rest) -> tuple[list[int], float]:
        """(all new token ids, confidence: the geometric mean probability of the choices)."""
        logprobs = [first[1], *rest.logprobs]
        mean_logprob = sum(logprobs) / len(logprobs)
        return [first[0], *rest.tokens], min(1.0, max(math.exp(mean_logprob), 1e-12))

    def _initial_cache(self, input_ids, total_len: int, ids_host=None):
        """(cache, tokens it holds): the KV cache generation starts from: the prompt's cached shared
        prefix (see prefix_cache.py) in a fresh DynamicCache or in the backend's one StaticCache, an
        empty StaticCache, or None (generate's default DynamicCache).

        Like transformers' own static caches, the StaticCache is allocated once and reused per
        request (emptied, or set back to the prefix it still holds), so its tensors keep their
        addresses (the CUDA graphs are recorded once); it holds ``total_len`` slots rounded up to
        256, at least ``static_cache_min_slots``, and only ever grows. ``ids_host``: ``input_ids`` on
        the host, when the caller has them (nothing is read back from the device then).
        """
        static = None
        if self.decode_cache == "static":
            slots = self._static_slots(total_len)
            if self._static_cache is None or slots > self._static_cache_len:
                self._static_cache_len = slots
                self._static_cache = self._new_static_cache(slots)
            static = self._static_cache
        scope = (self.adapter_id, str(self.dtype), str(self.device))
        ids_host = ids_host if ids_host is not None else input_ids.cpu()
        length = self.prefix_cache.prefix_length(ids_host)
        seeded = self.prefix_cache.seed(self.base_model, input_ids, scope, into=static, length=length,
                                        ids_host=ids_host)
        if seeded is None:
            if static is not None:
                reset_static_cache(static)
            return static, 0
        return seeded, length

    def _generate_kwargs(self, stop_event, constraint) -> tuple[dict, object]:
        """``generate``'s stopping criteria and logits processors for a stop event and a grammar
        processor (either may be None), and the stop criterion."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        kwargs, stop_check = {}, None
        if stop_event is not None:
            stop_check = _StopOnEvent(stop_event)
            kwargs["stopping_criteria"] = StoppingCriteriaList([stop_check])
        if constraint is not None:
            kwargs["logits_processor"] = LogitsProcessorList([constraint])
        return kwargs, stop_check

    def _greedy_generation_config(self, max_new_tokens: int):
        """Greedy decoding, our stop tokens, logits returned (for the confidence)."""
        gc = copy.deepcopy(self.base_model.generation_config)
        gc.do_sample = False
        gc.num_beams = 1
        gc.temperature = None
        gc.top_p = None
        gc.top_k = None
        gc.max_new_tokens = max_new_tokens
        gc.max_length = None
        gc.eos_token_id = self._eos_ids
        gc.pad_token_id = self._pad_id
        gc.output_logits = True
        gc.output_scores = False
        gc.return_dict_in_generate = True
        # the KV cache is ours (_initial_cache: static or prefix-seeded) or generate's DynamicCache
        gc.cache_implementation = None
        return gc

    @staticmethod
    def _confidence(logits, new_ids: list[int], row: int = 0) -> float:
        """Geometric mean probability of the chosen tokens: one log_softmax over all steps and one
        host transfer (not one per token)."""
        import torch

        if not new_ids:
            return 1.0
        steps = torch.stack([logits[i][row] for i in range(len(new_ids))]).float()
        chosen = torch.tensor(new_ids, device=steps.device).unsqueeze(1)
        mean_logp = float(torch.log_softmax(steps, dim=-1).gather(1, chosen).mean())
        return min(1.0, max(math.exp(mean_logp), 1e-12))

    # On CUDA the warm-up also encodes a grey frame of this (width, height): the common camera size,
    # whose vision blocks are then compiled and recorded before the first command; None: skip it.
    warmup_frame_size: tuple[int, int] | None = (640, 480)

    def warmup(self) -> None:
        """One tiny generation (smallest allowed image, 2 tokens) to initialise kernels/caches; on
        CUDA also one for a ``warmup_frame_size`` frame."""
        import numpy as np

        request = warmup_request(self.pixel_limits)
        self.generate(request)
        if self.vision_graphs is not None and self.warmup_frame_size is not None:
            width, height = self.warmup_frame_size
            request.image = np.full((int(height), int(width), 3), 127, dtype=np.uint8)
            self.generate(request)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.peft_model = None
            self.model = None
            self.base_model = None
            self.adapters.clear()
            self.vision_cache.clear()
            self.prefix_cache.clear()
            self._static_cache = None
            self._batch_caches.clear()
            self._batch_decoders.clear()
            self._forget_recordings()
            self.vision_graphs = None
            self._fused_projections = None  # holds the joint weight matrices
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # pragma: no cover
                pass
