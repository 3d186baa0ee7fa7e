"""onnxruntime backend: serves a `vla-export --onnx` folder without torch or transformers.

Runtime needs only onnxruntime, numpy, the ``tokenizers`` library (and jinja2 for the chat
template when present). Everything the transformers processor and model do around the two
exported graphs is re-done here in numpy, exactly as transformers does it for Qwen2-VL /
Qwen2.5-VL / Qwen3-VL (the manifest's ``family`` says which):

* chat template -> text; ``<|image_pad|>`` expanded to one token per merged image patch; tokenised
  with the exported ``tokenizer.json``;
* image: fitted to the pixel limits (vla_node.image, the pipeline's own resize), rescaled,
  normalised and patchified into ``pixel_values`` + ``grid_thw``;
* vision rotary positions, Qwen2.5-VL window order and window attention bias, Qwen3-VL's learned
  position grid resampled to the image grid (bilinear gather indices and weights);
* 3D M-RoPE position ids for the prompt (rope index) and the decode steps;
* Qwen3-VL deepstack: the vision graph's per-layer features go to the decoder with the image
  tokens' positions on the prompt call, and zero image tokens on each decode step;
* greedy decoding with an explicit KV cache, confidence = geometric mean of chosen-token
  probabilities (as TransformersBackend reports it);
* prefix KV reuse (``prefix_cache``, as TransformersBackend's): the tokens before the image (the
  system text every command shares) are prefilled once and each command's prompt call starts from
  their keys and values;
* frame cache (``frame_cache``, as the torch engine's, engine/frame_cache.py): the vision encoder's
  outputs kept for the last frames, so several requests about one frame (the presence check's
  questions after its plan, a burst of commands) encode it once;
* constrained decoding (``enable_constrained_decoding``) with the same action grammar and logits
  processor as TransformersBackend (vla_node.grammar); it needs xgrammar, which imports torch and
  transformers, so a host without them serves unconstrained plans (the parser and the safety gate
  still check each one).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np

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
from vla_node.clarify_threshold import ClarifyThreshold, ClarifyThresholdError, clarify_first_token
from vla_node.lru import CountingLru
from vla_node.manifest import COORDINATE_CONVENTIONS

__all__ = ["OnnxBackend", "render_chat", "rope_index", "patchify", "vision_inputs", "position_embedding_taps"]

ONNX_FORMAT = 1
_IMAGE_PAD = "<|image_pad|>"
_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_PREFIX_ENTRIES = 4  # prefilled prompt prefixes kept (one system text per vocabulary / template in use)
_MIN_PREFIX_TOKENS = 16  # shorter prefixes are not worth a second decoder call


# ------------------------------------------------------------------------------ prompt


def _builtin_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The Qwen2-VL / Qwen2.5-VL chat format (the embedded Qwen3-VL's too), for hosts without jinja2
    (tests check it matches the exported templates)."""
    parts = []
    for i, msg in enumerate(messages):
        if i == 0 and msg["role"] != "system":
            parts.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        parts.append(f"<|im_start|>{msg['role']}\n")
        content = msg["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            for item in content:
                if item.get("type") == "image" or "image" in item or "image_url" in item:
                    parts.append("<|vision_start|><|image_pad|><|vision_end|>")
                elif item.get("type") == "video" or "video" in item:
                    parts.append("<|vision_start|><|video_pad|><|vision_end|>")
                elif "text" in item:
                    parts.append(item["text"])
        parts.append("<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def render_chat(template: str | None, messages: list[dict]) -> str:
    """Render ``messages`` like transformers' apply_chat_template(add_generation_prompt=True)."""
    if template:
        compiled = _compiled_template(template)
        if compiled is not None:
            return compiled.render(messages=messages, add_generation_prompt=True)
    return _builtin_chat(messages)


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """The jinja2 template compiled once (compiling it took 6 ms of every command), or None without
    jinja2."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)

    def raise_exception(message):
        raise BackendError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


# ------------------------------------------------------------------------------ image


def patchify(rgb: np.ndarray, mean, std, rescale: float, patch: int, merge: int, temporal: int):
    """Qwen2-VL image processor maths: (x*rescale - mean)/std, one frame repeated ``temporal``
    times, patches ordered merge-block-major. Returns (pixel_values (N, C*T*P*P) float32, (t, h, w))."""
    height, width = rgb.shape[:2]
    if height % (patch * merge) or width % (patch * merge):
        raise BackendError(f"image {width}x{height} is not a multiple of {patch * merge} (fit it to the limits first)")
    # rescale fused into float32 mean/std, as the torchvision-backed transformers processor does:
    # this gives bit-identical pixel values
    fused_mean = np.asarray(mean, np.float32) * np.float32(1.0 / rescale)
    fused_std = np.asarray(std, np.float32) * np.float32(1.0 / rescale)
    x = (rgb.astype(np.float32) - fused_mean) / fused_std
    x = x.transpose(2, 0, 1)[None]  # 1, C, H, W
    x = np.repeat(x, temporal, axis=0)  # T, C, H, W
    channels = x.shape[1]
    gh, gw = height // patch, width // patch
    x = x.reshape(1, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gh * gw, channels * temporal * patch * patch)), (1, gh, gw)


def vision_inputs(grid_thw, merge: int, window_size: int, patch: int, windowed: bool) -> dict:
    """Grid-dependent vision inputs (transformers.vision_utils maths for one image)."""
    t, h, w = grid_thw
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    position_ids = np.tile(np.stack([hpos, wpos], -1), (t, 1)).astype(np.int64)
    n = t * h * w
    unit = merge * merge
    lh, lw = h // merge, w // merge
    if not windowed:
        window_index = np.arange(n // unit, dtype=np.int64)
        out = {"position_ids": position_ids, "window_index": window_index, "reverse_index": window_index.copy()}
        return out
    win = window_size // merge // patch
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = win - lh % win, win - lw % win
    nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
    padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
    seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
    flat = padded.reshape(-1)
    window_index = flat[flat != -100].astype(np.int64)
    bounds = np.unique(np.concatenate([[0], np.cumsum(seqlens) * unit]))
    window_id = np.zeros(n, dtype=np.int64)
    for k in range(len(bounds) - 1):
        window_id[bounds[k]:bounds[k + 1]] = k
    bias = np.where(window_id[:, None] == window_id[None, :], 0.0, np.finfo(np.float32).min).astype(np.float32)
    return {"position_ids": position_ids, "window_index": window_index,
            "reverse_index": np.argsort(window_index).astype(np.int64), "window_bias": bias}


def _axis_taps(index: np.ndarray, size: int, side: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (floor, floor + 1, clamped) and weights on one axis of a ``side``-long table for
    positions ``index`` of a ``size``-long axis, in float32 and in transformers' order of operations
    (vision_utils._interpolation_axis_taps_weights) so the weights are bit-identical."""
    index = index.astype(np.float32)
    if align_corners:
        src = index * np.float32(side - 1) / np.float32(max(size - 1, 1))
    else:
        src = (index + np.float32(0.5)) * np.float32(side) / np.float32(size) - np.float32(0.5)
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets)
    return taps, np.maximum(np.float32(1.0) - distance, np.float32(0.0))


def position_embedding_taps(grid_thw, grid_per_side: int, merge: int, align_corners: bool = True):
    """Qwen3-VL: the learned ``grid_per_side`` x ``grid_per_side`` position embedding resampled to the
    image grid as 4 gather indices + bilinear weights per patch (patches in merge-block order), as
    transformers' get_vision_interpolation_indices_and_weights. Returns ((N, 4) int64, (N, 4) float32)."""
    t, h, w = grid_thw
    within = np.arange(t * h * w) % (h * w)
    blocks_w = w // merge
    row = (within // (merge * merge * blocks_w)) * merge + (within // merge) % merge
    col = ((within // (merge * merge)) % blocks_w) * merge + within % merge
    h_taps, h_weights = _axis_taps(row, h, grid_per_side, align_corners)
    w_taps, w_weights = _axis_taps(col, w, grid_per_side, align_corners)
    indices = (h_taps[:, :, None] * grid_per_side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int64), weights.astype(np.float32)


def rope_index(input_ids: np.ndarray, image_token_id: int, grid_thw, merge: int) -> tuple[np.ndarray, int]:
    """3D M-RoPE position ids (3, 1, S) for one prompt with one image + the decode-step delta.

    Qwen2-VL, Qwen2.5-VL and Qwen3-VL agree for one still image (one temporal patch): text tokens
    count on, image tokens take (start, start + row, start + column), and the text after the image
    restarts at start + max(rows, columns)."""
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    t, h, w = grid_thw
    lt, lh, lw = t, h // merge, w // merge
    chunks, pos, i = [], 0, 0
    while i < len(ids):
        j = i
        while j < len(ids) and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            chunks.append(np.broadcast_to(np.arange(j - i) + pos, (3, j - i)))
            pos += j - i
        else:
            if j - i != lt * lh * lw:
                raise BackendError(f"prompt has {j - i} image tokens, the image needs {lt * lh * lw}")
            tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
            chunks.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos)
            pos += max(h, w) // merge
        i = j
    positions = np.concatenate(chunks, axis=1).astype(np.int64)
    delta = int(positions.max()) + 1 - len(ids)
    return positions[:, None, :], delta


# ------------------------------------------------------------------------------ backend


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


class OnnxBackend(Backend):
    """Serve a `vla-export --onnx` folder with onnxruntime (CPU EP; CUDA EP when present)."""

    def __init__(self, export_dir: str | os.PathLike, device: str = "auto",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 threads: int = 0, prefix_cache: bool = True, frame_cache: int = 2):
        self._lock = threading.RLock()
        self._closed = False
        self.warnings: list[str] = []
        self.export_dir = Path(export_dir)
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise BackendError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if int(threads) < 0:
            raise BackendError(f"onnx_threads must be >= 0 (0 = onnxruntime's default), got {threads}")
        man = self._read_manifest(self.export_dir)
        self.manifest = man
        self.family = man["family"]
        # the source model's (an export older than the field: its family's native one)
        self.coordinate_convention = man.get("coordinate_convention") or COORDINATE_CONVENTIONS[self.family]
        v = man["vision"]
        self._vision = v
        self.patch_size, self.merge_size = int(v["patch_size"]), int(v["merge_size"])
        self.pixel_limits = PixelLimits(int(v["min_pixels"]), int(v["max_pixels"]),
                                        self.patch_size * self.merge_size)
        self._eos_ids = {int(e) for e in man["eos_token_ids"]}
        # "int4": `vla-export --quantize int4` stored the decoder's weights in 4 bits (training.onnx_quantize)
        self.decoder_weights = str(man.get("decoder_weights", {}).get("scheme", "float32"))
        self.model_id = f"{self.export_dir.name}@{man['source_config_sha256'][:8]}" + (
            "" if self.decoder_weights == "float32" else f"+{self.decoder_weights}")
        self.adapter_id = ""

        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise BackendError(f"backend 'onnx' needs onnxruntime and tokenizers installed: {e}") from e
        self.providers = self._pick_providers(device, ort)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self._vision_session = ort.InferenceSession(str(self.export_dir / "vision.onnx"), opts,
                                                        providers=self.providers)
            self._decoder_session = ort.InferenceSession(str(self.export_dir / "decoder.onnx"), opts,
                                                         providers=self.providers)
            self.tokenizer = Tokenizer.from_file(str(self.export_dir / "tokenizer.json"))
            self._embed = np.load(self.export_dir / "embed_tokens.npy", mmap_mode="r")
        except Exception as e:
            raise BackendError(f"ONNX export '{self.export_dir}' cannot be loaded: {e}") from e
        template = self.export_dir / "chat_template.jinja"
        self._template = template.read_text(encoding="utf-8") if template.is_file() else None
        self._image_token_id = int(man["image_token_id"])
        self._vision_start_id = int(man["vision_start_token_id"])
        self._prefixes = CountingLru(_PREFIX_ENTRIES if prefix_cache else 0)
        if int(frame_cache) < 0:
            raise BackendError(f"frame_cache must be >= 0 (0 = every request encodes its frame), got {frame_cache}")
        self._frames = CountingLru(int(frame_cache))
        self._layers = int(man["num_layers"])
        self._past_shape = (1, int(man["num_key_value_heads"]), 0, int(man["head_dim"]))
        self._vision_names = list(man["vision_inputs"])
        # Qwen3-VL: decoder layers 0..n-1 each add one row of the vision graph's deepstack features
        self._deepstack_layers = int(man.get("deepstack_layers", 0))
        self._hidden = int(man["hidden_size"])
        if self.tokenizer.token_to_id(_IMAGE_PAD) != self._image_token_id:
            raise BackendError(f"ONNX export '{self.export_dir}': tokenizer.json and onnx_manifest.json disagree "
                               f"on the image token id")
        self.action_grammar = None  # vla_node.grammar.ActionGrammar when constrained decoding is on
        # the source model's calibrated CLARIFY threshold (vla_node.clarify_threshold; None: greedy alone)
        self.clarify_rule: ClarifyThreshold | None = None
        if man.get("clarify_threshold") is not None:
            try:
                self.clarify_rule = ClarifyThreshold(clarify_first_token(self.tokenizer), man["clarify_threshold"])
            except ClarifyThresholdError as e:
                raise BackendError(f"ONNX export '{self.export_dir}': {e}") from None
        # the source model answers the counting question (vla_node.presence_check may ask it)
        self.answers_count_questions = man.get("count_questions") is True

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        if not path.is_dir():
            raise BackendError(f"ONNX export directory '{path}' does not exist or is not a directory")
        mpath = path / "onnx_manifest.json"
        if not mpath.is_file():
            hint = ""
            if (path / "config.json").is_file():
                hint = f" (a model checkpoint: export it with `vla-export --model {path} --onnx OUT`)"
            raise BackendError(f"'{path}' has no onnx_manifest.json: not a `vla-export --onnx` folder{hint}")
        try:
            man = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BackendError(f"'{mpath}' is not valid JSON: {e}") from e
        if man.get("format") != ONNX_FORMAT:
            raise BackendError(f"'{mpath}': format {man.get('format')!r} is not supported (expected {ONNX_FORMAT})")
        if man.get("family") not in _FAMILIES:
            raise BackendError(f"'{mpath}': family {man.get('family')!r} is not supported by the onnx backend "
                               f"({', '.join(_FAMILIES)}; use backend 'transformers')")
        missing = [f for f in ("vision.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json")
                   if not (path / f).is_file()]
        if missing:
            raise BackendError(f"ONNX export '{path}' is incomplete: missing {', '.join(missing)}")
        return man

    @staticmethod
    def _pick_providers(device: str, ort) -> list[str]:
        available = ort.get_available_providers()
        d = (device or "auto").lower()
        if d == "cpu":
            return ["CPUExecutionProvider"]
        if d.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise BackendError(f"device {device!r} requested but onnxruntime has no CUDAExecutionProvider "
                                   f"(available: {', '.join(available)})")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if d != "auto":
            raise BackendError(f"invalid device {device!r}; use auto, cpu or cuda")
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    # ------------------------------------------------------------------------------ inputs

    def prepare_inputs(self, image: np.ndarray, messages: list[dict]) -> dict:
        """input_ids, pixel_values, grid_thw and position ids for one image + chat messages."""
        from vla_node.image import fit_to_limits

        fitted = fit_to_limits(image, self.pixel_limits)
        v = self._vision
        pixel_values, grid = patchify(fitted, v["image_mean"], v["image_std"], v["rescale_factor"],
                                      self.patch_size, self.merge_size, int(v["temporal_patch_size"]))
        text = render_chat(self._template, messages)
        n_image = text.count(_IMAGE_PAD)
        if n_image != 1:
            raise BackendError(f"the chat messages must hold exactly one image, found {n_image}")
        tokens = grid[0] * grid[1] * grid[2] // (self.merge_size ** 2)
        text = text.replace(_IMAGE_PAD, _IMAGE_PAD * tokens)
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)
        positions, delta = rope_index(ids, self._image_token_id, grid, self.merge_size)
        return {"input_ids": ids, "pixel_values": pixel_values, "grid_thw": grid,
                "position_ids": positions, "rope_delta": delta}

    def _image_features(self, pixel_values: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray | None]:
        """(merged image embeddings (tokens, hidden), Qwen3-VL deepstack features (layers, tokens, hidden)
        or None for the families without them), from the frame cache when this frame was encoded
        lately: the key is the pixels the encoder is fed and their grid, all its output depends on."""
        if self._frames.capacity == 0:
            return self._encode_image(pixel_values, grid)
        key = hashlib.sha256(np.ascontiguousarray(pixel_values).data)
        key.update(repr((pixel_values.shape, str(pixel_values.dtype), tuple(int(g) for g in grid))).encode())
        return self._frames.get_or_make(key.digest(), lambda: self._encode_image(pixel_values, grid))

    def _encode_image(self, pixel_values: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray | None]:
        v = self._vision
        feeds = vision_inputs(grid, self.merge_size, int(v["window_size"]), self.patch_size, bool(v["windowed"]))
        feeds["pixel_values"] = pixel_values
        if "interp_indices" in self._vision_names:
            grid_pe = v["position_embedding"]
            feeds["interp_indices"], feeds["interp_weights"] = position_embedding_taps(
                grid, int(grid_pe["grid_per_side"]), self.merge_size, bool(grid_pe["align_corners"]))
        outputs = self._vision_session.run(None, {k: feeds[k] for k in self._vision_names})
        return outputs[0], (outputs[1] if self._deepstack_layers else None)

    # ------------------------------------------------------------------------------ constrained decoding

    @staticmethod
    def constrained_decoding_unavailable() -> str | None:
        """Why constrained decoding cannot run on this host (xgrammar missing), or None."""
        try:
            import xgrammar  # noqa: F401  (it imports torch and transformers)
            from transformers import PreTrainedTokenizerFast  # noqa: F401
        except ImportError as e:
            return f"constrained decoding needs xgrammar (and the torch and transformers it imports): {e}"
        return None

    def grammar_tokens(self) -> tuple[object, int, list[int]]:
        """The exported tokenizer wrapped as transformers' fast tokenizer, the embedding rows, the end ids."""
        from transformers import PreTrainedTokenizerFast

        with self._lock:
            self._ensure_open()
            return (PreTrainedTokenizerFast(tokenizer_object=self.tokenizer), int(self._embed.shape[0]),
                    sorted(self._eos_ids))

    # ------------------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest) -> GenerationResult:
        image = request.image
        n_max = token_budget(request, self.max_new_tokens)
        with self._lock:
            self._ensure_open()
            t0 = time.perf_counter()
            try:
                inputs = self.prepare_inputs(image, request.messages)
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"preprocessing failed: {e}") from e
            grid = inputs["grid_thw"]
            size = (grid[2] * self.patch_size, grid[1] * self.patch_size)
            ids = inputs["input_ids"]
            t1 = time.perf_counter()
            preprocess_ms = (t1 - t0) * 1000.0
            ev = request.stop_event
            if ev is not None and ev.is_set():
                return GenerationResult("", 1.0, size, len(ids), 0, preprocess_ms, 0.0)
            constraint = None
            if request.free_text and request.answer_choices:  # ends once it can be none of them
                from vla_node.backends.answer_choices import AnswerChoicesStop

                constraint = AnswerChoicesStop(self._answer_text, request.answer_choices, self._eos_ids,
                                               int(self._embed.shape[0]))
            elif self.action_grammar is not None and not request.free_text:
                from vla_node.grammar import box_bounds

                try:
                    constraint = self.action_grammar.logits_processor(
                        n_max, box_bounds(self.coordinate_convention, size))
                except Exception as e:
                    raise BackendError(f"constrained decoding: {e}") from e
            try:
                new_ids, logps = self._greedy(inputs, n_max, ev, constraint,
                                              clarify_rule=None if request.free_text else self.clarify_rule)
            except Exception as e:
                raise BackendError(f"generation failed: {e}") from e
            confidence = 1.0
            if logps:
                confidence = min(1.0, max(float(math.exp(sum(logps) / len(logps))), 1e-12))
            text = self._answer_text(new_ids)
            return GenerationResult(text=text, confidence=confidence, model_input_size=size,
                                    prompt_tokens=len(ids), new_tokens=len(new_ids),
                                    preprocess_ms=preprocess_ms,
                                    generate_ms=(time.perf_counter() - t1) * 1000.0)

    def _answer_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_ids(self, image: np.ndarray, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Greedy token ids only (parity checks against the torch backend)."""
        with self._lock:
            self._ensure_open()
            return self._greedy(self.prepare_inputs(image, messages), max_new_tokens, None,
                                clarify_rule=self.clarify_rule)[0]

    @property
    def prefix_cache_stats(self) -> dict:
        """Prefix KV reuse counters: hits, misses (prefills), entries."""
        return {"hits": self._prefixes.hits, "misses": self._prefixes.misses, "entries": len(self._prefixes)}

    @property
    def frame_cache_stats(self) -> dict:
        """Frame cache counters: hits, misses (vision encoder runs), entries."""
        return {"hits": self._frames.hits, "misses": self._frames.misses, "entries": len(self._frames)}

    def _prompt_feeds(self, inputs: dict) -> dict:
        """The prompt call's inputs: the prompt's embeddings with the image features merged in at the
        image tokens (Qwen3-VL: with its deepstack features and those tokens' positions); with a
        prefilled prefix, only the tokens after it, on top of its keys and values."""
        ids = inputs["input_ids"]
        embeds = np.asarray(self._embed[ids], dtype=np.float32)
        image_rows = ids == self._image_token_id
        image_embeds, deepstack = self._image_features(inputs["pixel_values"], inputs["grid_thw"])
        embeds[image_rows] = image_embeds
        start = self._prefix_length(ids)
        if start:
            past = self._prefixes.get_or_make(ids[:start].tobytes(), lambda: self._prefill(ids[:start]))
        else:
            past = [np.zeros(self._past_shape, dtype=np.float32)] * (2 * self._layers)
        return self._decoder_feeds(embeds[None, start:], inputs["position_ids"][:, :, start:], past,
                                   deepstack, np.flatnonzero(image_rows[start:]).astype(np.int64))

    def _prefix_length(self, ids: np.ndarray) -> int:
        """Tokens before the image (0: no reuse). Their keys and values depend on nothing else: their
        M-RoPE positions are plain text positions 0..P-1 and no image feature reaches them."""
        if self._prefixes.capacity == 0:
            return 0
        where = np.flatnonzero(ids == self._vision_start_id)
        return int(where[0]) if len(where) and where[0] >= _MIN_PREFIX_TOKENS else 0

    def _prefill(self, prefix_ids: np.ndarray) -> list[np.ndarray]:
        """The prefix's per-layer keys and values (past_key_0, past_value_0, ...)."""
        embeds = np.asarray(self._embed[prefix_ids], dtype=np.float32)[None]
        positions = np.broadcast_to(np.arange(len(prefix_ids), dtype=np.int64), (3, 1, len(prefix_ids))).copy()
        empty = np.zeros(self._past_shape, dtype=np.float32)
        return self._decoder_session.run(None, self._decoder_feeds(embeds, positions, [empty] * (2 * self._layers)))[1:]

    def _decoder_feeds(self, embeds: np.ndarray, positions: np.ndarray, past: list[np.ndarray],
                       deepstack: np.ndarray | None = None, visual_positions: np.ndarray | None = None) -> dict:
        """One decoder call's inputs; for Qwen3-VL without ``deepstack`` (a decode step) its deepstack
        inputs hold zero image tokens."""
        feeds = {"inputs_embeds": embeds, "position_ids": positions}
        if self._deepstack_layers:
            if deepstack is None:
                deepstack = np.zeros((self._deepstack_layers, 0, self._hidden), dtype=np.float32)
                visual_positions = np.zeros(0, dtype=np.int64)
            feeds["deepstack_embeds"] = deepstack
            feeds["visual_positions"] = visual_positions
        for i in range(self._layers):
            feeds[f"past_key_{i}"] = past[2 * i]
            feeds[f"past_value_{i}"] = past[2 * i + 1]
        return feeds

    def _greedy(self, inputs: dict, n_max: int, stop_event, constraint=None,
                clarify_rule: ClarifyThreshold | None = None) -> tuple[list[int], list[float]]:
        """Greedy tokens and their log-probabilities; under ``constraint`` (a grammar logits
        processor) among the tokens its bitmask allows, as transformers' generate applies it, and
        with ``clarify_rule`` (the CLARIFY threshold) applied to the first token."""
        ids = inputs["input_ids"]
        feeds = self._prompt_feeds(inputs)
        delta, cache_len = inputs["rope_delta"], len(ids)
        new_ids: list[int] = []
        logps: list[float] = []
        seen = ids[None]  # what the grammar is shown: the prompt, then each new token
        if constraint is not None:
            from vla_node.grammar import allowed_tokens
        while True:
            outputs = self._decoder_session.run(None, feeds)
            logits = outputs[0][0]
            if not new_ids and clarify_rule is not None:  # on the raw scores, before the grammar's mask
                logits = clarify_rule.apply_numpy(logits)
            if constraint is not None:
                allowed = allowed_tokens(constraint.next_bitmask(seen), logits.shape[-1])
                logits = np.where(allowed, logits, -np.inf)
            token = int(np.argmax(logits))
            seen = np.array([[token]])
            new_ids.append(token)
            logps.append(float(_log_softmax(logits)[token]))
            if token in self._eos_ids or len(new_ids) >= n_max or (stop_event is not None and stop_event.is_set()):
                return new_ids, logps
            feeds = self._decoder_feeds(np.asarray(self._embed[[token]], dtype=np.float32)[None],
                                        np.full((3, 1, 1), cache_len + delta, dtype=np.int64), outputs[1:])
            cache_len += 1

    # ------------------------------------------------------------------------------ interface

    def _ensure_open(self):
        if self._closed:
            raise BackendError("backend is closed")

    def warmup(self) -> None:
        self.generate(warmup_request(self.pixel_limits))

    def load_adapter(self, path: str, name: str | None = None) -> str:
        raise BackendError(f"backend 'onnx' cannot load adapter '{path}': merge it at export time "
                           "(vla-export --model BASE --adapter LORA --onnx OUT)")

    def set_adapter(self, name: str | None) -> None:
        if name is not None:
            raise BackendError(f"adapter {name!r} is not loaded (backend 'onnx' has no adapters; merge at export)")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._vision_session = None
            self._decoder_session = None
