"""transformers + peft backend for local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints.

Loads offline (``local_files_only=True``) with ``AutoModelForImageTextToText`` + ``AutoProcessor``,
decodes greedily, reports a confidence (geometric mean of the chosen tokens' probabilities) and
hot-swaps LoRA adapters without reloading the base model. The plain path is transformers' own
``generate``; the fast path (caches, CUDA graphs, Triton kernels, batching) is the engine
(vla_node/backends/engine/), which answers with the same tokens in float32.
"""

from __future__ import annotations

import hashlib
import logging
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
from vla_node.backends.engine import Engine, EngineOptions
from vla_node.backends.engine.guard import probe_disagreement
from vla_node.backends.generation import LoadedModel, generate_kwargs, greedy_config, on_device, tokens_of
from vla_node.clarify_threshold import ClarifyThreshold, ClarifyThresholdError, clarify_first_token

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
_PROBE_TOKENS = 4  # tokens the warm-up's probe compares between the engine and the plain path


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class _AdapterInfo:
    __slots__ = ("name", "path", "adapter_id", "manifest", "pixel_limits", "clarify_rule")

    def __init__(self, name, path, adapter_id, manifest, pixel_limits, clarify_rule=None):
        self.name = name
        self.path = path
        self.adapter_id = adapter_id
        self.manifest = manifest
        self.pixel_limits = pixel_limits
        self.clarify_rule = clarify_rule  # the adapter's own CLARIFY threshold (None: greedy alone)


def pick_device(device: str, torch):
    """The torch device for a device setting ("auto": CUDA when there is one); BackendError if unusable."""
    d = (device or "auto").lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} requested but CUDA is not available")
    try:
        return torch.device(d)
    except (RuntimeError, ValueError) as e:
        raise BackendError(f"invalid device {device!r}: {e}") from e


def pick_dtype(dtype, device, torch):
    """The torch dtype for a dtype setting ("auto": bf16 on CUDA, fp32 elsewhere); BackendError if unknown."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise BackendError(f"invalid dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


class TransformersBackend(Backend):
    """Serve a local Qwen-VL checkpoint (+ optional LoRA adapters) with transformers.

    Attributes for reuse (training, evaluation): ``processor``, ``model`` (the transformers model;
    LoRA layers are injected into it in place when adapters are loaded), ``peft_model`` (the
    ``PeftModel`` wrapper or None), ``family``, ``device``, ``dtype``, ``adapters`` (name -> info),
    ``warnings`` (list of str: e.g. adapters loaded without a manifest).

    Speed: ``engine`` (vla_node/backends/engine/) is the fast path, configured by one frozen
    EngineOptions: ``engine=EngineOptions(...)``, or from the node parameters' arguments
    ``prefix_cache``, ``decode_cache``, ``compile_decode`` and ``compile_layers`` (see
    vla_node.settings); ``engine=False``: the plain path only. ``use_engine()`` replaces it (another
    configuration on the same weights). The engine refuses a model it does not know, and is
    dropped at warm-up if its first answer is not the plain path's (engine/guard.py): one log line
    each, and the plain path serves.

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
        engine: EngineOptions | bool | None = None,
    ):
        import torch

        options = self._engine_options(engine, prefix_cache=prefix_cache, decode_cache=decode_cache,
                                       compile_decode=compile_decode, compile_layers=compile_layers)
        self.warnings: list[str] = []
        self._lock = threading.RLock()
        self._closed = False
        self.model_path = Path(model_path)
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise BackendError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.vocab_fingerprint = vocab_fingerprint
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
        self.config_sha256 = _manifest.config_sha256(self.model_path)
        try:  # the template and box convention the model was trained with: an adapter's must be the same
            self.coordinate_convention: str = _manifest.coordinate_convention_of(self.model_path)
            self.prompt_template: str = _manifest.prompt_template_of(self.model_path)
            clarify_threshold = _manifest.clarify_threshold_of(self.model_path)
            self.answers_count_questions = _manifest.answers_count_questions(self.model_path)
        except _manifest.ManifestError as e:
            raise BackendError(str(e)) from None

        self.device = pick_device(device, torch)
        self.dtype = pick_dtype(dtype, self.device, torch)

        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(str(self.model_path), local_files_only=True)
        except Exception as e:
            raise BackendError(f"model directory '{self.model_path}': cannot load processor: {e}") from e
        kwargs = {"dtype": self.dtype, "local_files_only": True}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForImageTextToText.from_pretrained(str(self.model_path), **kwargs)
        except Exception as e:
            raise BackendError(f"model directory '{self.model_path}': cannot load model weights: {e}") from e
        model.to(self.device)
        model.eval()
        self.model = model
        self.base_model = model  # never replaced; LoRA layers get injected into it
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
        pad = getattr(model.generation_config, "pad_token_id", None)
        pad_id = pad if pad is not None else tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        self.loaded = LoadedModel(model, self.processor, self.device, self.dtype, tuple(eos), int(pad_id))
        # the answering model's calibrated CLARIFY threshold (vla_node.clarify_threshold; None: greedy
        # alone): the base's, and while an adapter is active the adapter's own (an adapter changes the
        # first token's distribution, so the base's does not carry over)
        self.base_clarify_rule = self._clarify_rule(clarify_threshold, f"model directory '{self.model_path}'")
        self.clarify_rule: ClarifyThreshold | None = self.base_clarify_rule
        self.engine: Engine | None = None
        self._engine_probed = False
        self.use_engine(options)

        if adapter_path is not None:
            name = self.load_adapter(str(adapter_path))
            self.set_adapter(name)

    # ------------------------------------------------------------------------------ the engine

    @staticmethod
    def _engine_options(engine, **node_parameters) -> EngineOptions | None:
        """The engine's options from ``engine`` or, when it is None, from the node parameters'
        arguments (None: no engine). Both given: an error, not a silent choice."""
        if engine is None:
            try:
                return EngineOptions(**node_parameters)
            except ValueError as e:
                raise BackendError(str(e)) from None
        defaults = EngineOptions()
        changed = sorted(name for name, value in node_parameters.items() if value != getattr(defaults, name))
        if changed:
            raise BackendError(f"give the engine's options as engine=EngineOptions(...) or as arguments, not both "
                               f"(engine={engine!r}, arguments {', '.join(changed)})")
        if engine is False:
            return None
        if not isinstance(engine, EngineOptions):
            raise BackendError(f"engine must be EngineOptions, False or None, not {engine!r}")
        return engine

    def use_engine(self, options: EngineOptions | None) -> None:
        """Serve with a new engine built from ``options`` (None: the plain path). The current one
        is closed first (its caches and recordings dropped, the model as it loaded it). The new
        engine is probed again at the next warm-up."""
        with self._lock:
            self.ensure_open()
            if self.engine is not None:
                self.engine.close()
                self.engine = None
            self._engine_probed = False
            if options is not None:
                try:
                    self.engine = Engine.start(self.loaded, options)
                except BackendError as e:
                    raise BackendError(f"model directory '{self.model_path}': {e}") from None
                if self.engine is not None:
                    self.engine.adapter_changed(self.adapter_id)

    @property
    def decode_cache(self) -> str:
        """The KV cache decoding uses: "static" (the engine's own loop) or "dynamic" (``generate``)."""
        return self.engine.decode_cache if self.engine is not None else "dynamic"

    @property
    def max_batch_size(self) -> int:
        """Requests generate_batch() decodes together (the engine batches; the plain path does not)."""
        return self.engine.options.max_batch_size if self.engine is not None else 1

    @property
    def prefix_cache_stats(self) -> dict:
        """Prefix KV reuse counters: hits, misses (prefills), skipped (no usable prefix), entries."""
        if self.engine is None:
            return {"hits": 0, "misses": 0, "skipped": 0, "entries": 0}
        return self.engine.prefix_cache_stats

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
            self.ensure_open()
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
            clarify_rule = None
            if _manifest.has_manifest(p):
                expected = {
                    "family": self.family,
                    "template": self.prompt_template,
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
                clarify_rule = self._clarify_rule(man.get("clarify_threshold"), f"adapter '{p}'")
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
            self.adapters[name] = _AdapterInfo(name, p, adapter_id, man, limits, clarify_rule)
            self._apply_active()  # peft activates the first adapter it loads; keep ours
            return name

    def _undo_failed_load(self, name: str) -> None:
        """peft injects LoRA layers before it loads weights: remove them again after a failure."""
        if self.engine is not None:
            self.engine.forget_recordings()
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
            self.ensure_open()
            if name is not None and name not in self.adapters:
                known = ", ".join(sorted(self.adapters)) or "none"
                raise BackendError(f"adapter {name!r} is not loaded (loaded: {known})")
            self._active = name
            self._apply_active()

    def _apply_active(self) -> None:
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
            self.clarify_rule = self.base_clarify_rule
        else:
            info = self.adapters[name]
            self.adapter_id = info.adapter_id
            self.pixel_limits = info.pixel_limits
            self.clarify_rule = info.clarify_rule
        if self.engine is not None:  # its recordings keep the weights they were made with
            self.engine.adapter_changed(self.adapter_id)

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

    def constrained_decoding_unavailable(self) -> str | None:
        return None

    def grammar_tokens(self) -> tuple[object, int, list[int]]:
        with self._lock:
            self.ensure_open()
            vocab_size = int(self.base_model.get_output_embeddings().weight.shape[0])
            return self.processor.tokenizer, vocab_size, list(self.loaded.eos_ids)

    def _box_bounds(self, model_input_size: tuple[int, int]) -> tuple[int, int]:
        from vla_node.grammar import box_bounds

        return box_bounds(self.coordinate_convention, model_input_size)

    def constraint(self, budget: int, size: tuple[int, int]):
        """The grammar's logits processor for one request (None: unconstrained)."""
        if self.action_grammar is None:
            return None
        return self.action_grammar.logits_processor(budget, self._box_bounds(size))

    def answer_choices_stop(self, choices: tuple[str, ...]):
        """A free-text answer's constraint: end it once it can be none of ``choices`` (None: no choices)."""
        if not choices:
            return None
        from vla_node.backends.answer_choices import AnswerChoicesStop

        _, vocab_size, eos_ids = self.grammar_tokens()  # the scores' width and stop tokens, as the grammar's
        return AnswerChoicesStop(self.answer_text, choices, eos_ids, vocab_size)

    def batch_constraint(self, budgets: list[int], sizes: list[tuple[int, int]]):
        """The grammar's logits processor for the rows of one ``generate`` (None: unconstrained)."""
        if self.action_grammar is None:
            return None
        return self.action_grammar.batch_logits_processor(budgets, [self._box_bounds(size) for size in sizes])

    # ------------------------------------------------------------------------------ requests -> inputs

    def ensure_open(self) -> None:
        if self._closed:
            raise BackendError("backend is closed")


    def _process(self, texts: list[str], images: list, **text_kwargs) -> dict:
        """The processor's tensors (images resized within the active pixel limits) on the backend's
        device, floating ones in its dtype; the engine builds them where it can do so faster."""
        lim = self.pixel_limits
        images_kwargs = {"size": {"shortest_edge": lim.min_pixels, "longest_edge": lim.max_pixels}}
        if self.engine is not None:
            inputs = self.engine.process(texts, images, images_kwargs, text_kwargs)
        else:
            inputs = self.processor(text=texts, images=images, return_tensors="pt", images_kwargs=images_kwargs,
                                    **text_kwargs)
        return on_device(inputs, self.device, self.dtype)

    def chat_text(self, messages: list[dict]) -> str:
        """The prompt text of chat ``messages`` (the chat template, generation prompt added)."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def batch_inputs(self, images: list, texts: list[str]) -> dict:
        """One processor call for several prompts, left padded (generation appends on the right)."""
        return self._process(texts, images, padding=True, padding_side="left")

    def input_size(self, grid_thw) -> tuple[int, int]:
        """(width, height) in pixels of the image the model saw, from its (t, h, w) patch grid."""
        _, height, width = (int(v) for v in grid_thw.tolist())
        return width * self.patch_size, height * self.patch_size

    def prepare_inputs(self, image, messages: list[dict]) -> dict:
        """Model inputs (tensors on the backend's device) for one image + chat messages.

        The chat template is applied once, the image is resized by the processor within the
        active pixel limits. Exactly what :meth:`generate` feeds the model.
        """
        return self._process([self.chat_text(messages)], [image])

    def answer_text(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

    # ------------------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest) -> GenerationResult:
        import torch

        image = request.image
        budget = token_budget(request, self.max_new_tokens, image_required=False)

        with self._lock:
            self.ensure_open()
            t0 = time.perf_counter()
            try:
                inputs = self.prepare_inputs(image, request.messages)
            except Exception as e:
                raise BackendError(f"preprocessing failed: {e}") from e
            size = self.input_size(inputs["image_grid_thw"][0])
            prompt_len = int(inputs["input_ids"].shape[1])
            t1 = time.perf_counter()
            preprocess_ms = (t1 - t0) * 1000.0

            ev = request.stop_event
            if ev is not None and ev.is_set():
                return GenerationResult("", 1.0, size, prompt_len, 0, preprocess_ms, 0.0)
            try:
                constraint = (self.answer_choices_stop(request.answer_choices) if request.free_text
                              else self.constraint(budget, size))
            except Exception as e:
                raise BackendError(f"constrained decoding: {e}") from e
            first_token = None if request.free_text else self.first_token_processor()
            try:
                with torch.inference_mode():
                    if self.engine is not None:
                        answer = self.engine.generate(inputs, image, budget, ev, constraint, first_token)
                    else:
                        answer = self._generate_plain(inputs, budget, ev, constraint, first_token=first_token)
            except Exception as e:
                raise BackendError(f"generation failed: {e}") from e
            generate_ms = (time.perf_counter() - t1) * 1000.0
            return GenerationResult(
                text=self.answer_text(answer.ids),
                confidence=answer.confidence,
                model_input_size=size,
                prompt_tokens=prompt_len,
                new_tokens=len(answer.ids),
                preprocess_ms=preprocess_ms,
                generate_ms=generate_ms,
            )

    def _clarify_rule(self, threshold: float | None, where: str) -> ClarifyThreshold | None:
        if threshold is None:
            return None
        try:
            return ClarifyThreshold(clarify_first_token(self.processor.tokenizer), threshold)
        except ClarifyThresholdError as e:
            raise BackendError(f"{where}: {e}") from None

    def first_token_processor(self):
        """The model's CLARIFY threshold as a processor for one ``generate`` (None: none calibrated)."""
        return None if self.clarify_rule is None else self.clarify_rule.processor()

    def _generate_plain(self, inputs: dict, budget: int, stop_event, constraint, with_logits: bool = False,
                        first_token=None):
        """The plain path: transformers' ``generate`` with its own DynamicCache, greedy. Returns the
        answer's Tokens (and, ``with_logits``, generate's per-step logits)."""
        kwargs, _ = generate_kwargs(stop_event, constraint, first_token)
        out = self.base_model.generate(**inputs, generation_config=greedy_config(self.loaded, budget), **kwargs)
        answer = tokens_of(out, int(inputs["input_ids"].shape[1]))
        return (answer, out.logits) if with_logits else answer

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | BackendError]:
        """Several requests decoded together by the engine (engine/batched_generation.py: greedy
        rows equal each request alone); without it, one after the other."""
        if self.engine is None:
            return super().generate_batch(requests)
        return self.engine.batches.generate_batch(requests, self)

    # ------------------------------------------------------------------------------ warm-up

    def warmup(self) -> None:
        """One tiny generation (smallest allowed image, 2 tokens) to initialise kernels/caches; on
        CUDA also one for the engine's ``warmup_frame_size`` frame. The first warm-up with an engine
        probes it first: its answer to the warm-up image must be the plain path's (engine/guard.py),
        else it is dropped, with one log line, and the plain path serves."""
        import numpy as np

        request = warmup_request(self.pixel_limits)
        if self.engine is not None and not self._engine_probed:
            self._probe_engine(request)
        self.generate(request)
        engine = self.engine
        if engine is not None and engine.vision_graphs is not None and engine.options.warmup_frame_size is not None:
            width, height = engine.options.warmup_frame_size
            request.image = np.full((int(height), int(width), 3), 127, dtype=np.uint8)
            self.generate(request)

    def warmup_batches(self, max_rows: int) -> None:
        """With the engine's static cache, one tiny batch per padded row count up to ``max_rows``
        (capped by ``max_batch_size``): on CUDA each count's decoder is compiled and recorded here
        (~30-35 s each for the 3B architecture on an H200), not at the first batch of that size."""
        if self.engine is None or self.engine.decode_cache != "static":
            return
        for rows in self.engine.batches.row_counts(max_rows):
            for result in self.generate_batch([warmup_request(self.pixel_limits) for _ in range(rows)]):
                if isinstance(result, BackendError):
                    raise result

    def _probe_engine(self, request: GenerationRequest) -> None:
        """The engine's first answer against the plain path's, for the same inputs (built by the
        processor) and the model as loaded; a disagreement drops the engine."""
        import torch

        with self._lock:
            self.ensure_open()
            engine = self.engine
            self._engine_probed = True
            lim = self.pixel_limits
            images_kwargs = {"size": {"shortest_edge": lim.min_pixels, "longest_edge": lim.max_pixels}}
            inputs = on_device(self.processor(text=[self.chat_text(request.messages)], images=[request.image],
                                              return_tensors="pt", images_kwargs=images_kwargs),
                               self.device, self.dtype)
            try:
                with torch.inference_mode():
                    with engine.plain_model():
                        plain, logits = self._generate_plain(inputs, _PROBE_TOKENS, None, None, with_logits=True)
                    fast = engine.generate(inputs, request.image, _PROBE_TOKENS, None, None)
            except Exception as e:
                reason = f"the engine's first answer failed: {type(e).__name__}: {e}"
            else:
                reason = probe_disagreement(plain.ids, logits, fast.ids, str(self.dtype).replace("torch.", ""))
            if reason is not None:
                log.warning("engine off, serving the plain path: %s", reason)
                self.warnings.append(f"engine off: {reason}")
                engine.close()
                self.engine = None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.engine is not None:
                self.engine.close()
                self.engine = None
            self.peft_model = None
            self.model = None
            self.base_model = None
            self.loaded = None
            self.adapters.clear()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # pragma: no cover
                pass
