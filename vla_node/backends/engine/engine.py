"""The engine: TransformersBackend's fast path, one object configured by EngineOptions.

Given the model the backend loaded, it turns a request's inputs into the answer's tokens as the
plain path (``model.generate``) would, faster:

- inputs: one image's prompt without the processor's call (one_image_inputs.py), images
  processed on the GPU;
- vision: one encoding per camera frame (frame_cache.py); on CUDA one attention call per layer
  (vision_attention.py) and the tower replayed as a CUDA graph per image grid (vision_graph.py);
- prefill: the shared system-prompt prefix prefilled once (prefix_cache.py); with the static
  cache the rest by a CUDA graph per length bucket (prefill_graph.py);
- decode: ``generate`` on a prefix-seeded DynamicCache ("dynamic"), or the engine's own loop on
  one StaticCache (static_decode.py: a CUDA-graph replay per token, fused projections, Triton
  kernels, the fused layer step);
- batches: several requests decoded together (batched_generation.py).

It changes the model in place only where the plain path computes the same: joint q/k/v and
gate/up matrices whose views the projections become, padded vision MLPs over the same storage.
The vision tower's block attention is a switch of the model's config, put back by ``close()``
(and while ``plain_model()`` lets the plain path run alone). Recorded graphs keep the weights
and kernels they were recorded with: ``adapter_changed()`` drops them.
"""
from __future__ import annotations

import contextlib
import logging
import math

from vla_node.backends.base import BackendError
from vla_node.backends.engine.batched_generation import BatchedGeneration
from vla_node.backends.engine.frame_cache import VisionCache
from vla_node.backends.engine.fused_projections import FusedProjections
from vla_node.backends.engine.guard import unknown_model
from vla_node.backends.engine.one_image_inputs import OneImageInputs
from vla_node.backends.engine.options import EngineOptions
from vla_node.backends.engine.prefill_graph import PREFILL_BUCKET, PrefillGraphs, host_inputs
from vla_node.backends.engine.prefix_cache import PrefixCache
from vla_node.backends.engine.prefix_cache import reset as reset_static_cache
from vla_node.backends.engine.static_decode import DecodeResult, StaticDecoder, greedy_choice
from vla_node.backends.engine.vision_attention import use_block_attention
from vla_node.backends.engine.vision_graph import VisionGraphs
from vla_node.backends.engine.vision_graph import supports as vision_graph_supported
from vla_node.backends.generation import LoadedModel, Tokens, generate_kwargs, greedy_config, tokens_of

__all__ = ["Engine"]

log = logging.getLogger(__name__)

_STATIC_CACHE_BUCKET = 256  # static KV caches are sized in steps of this, so recorded decode steps get reused


class Engine:
    """The fast path for one loaded model. Build it with ``Engine.start`` (None: a model it does
    not know, with the reason logged); ``generate`` / ``generate_batch`` answer like the plain path."""

    @classmethod
    def start(cls, loaded: LoadedModel, options: EngineOptions) -> Engine | None:
        reason = unknown_model(loaded.model)
        if reason is not None:
            log.warning("engine off, serving the plain path: %s", reason)
            return None
        return cls(loaded, options)

    def __init__(self, loaded: LoadedModel, options: EngineOptions):
        self.loaded = loaded
        self.options = options
        model, device = loaded.model, loaded.device
        cuda = device.type == "cuda"
        decode_cache = options.decode_cache
        if decode_cache == "auto":
            decode_cache = "static" if cuda else "dynamic"
        self.decode_cache: str = decode_cache  # resolved: "dynamic" or "static"
        if self.decode_cache == "static" and not StaticDecoder.supports(model, self._new_static_cache(1)):
            if options.decode_cache == "static":
                raise BackendError("decode_cache 'static' needs full attention in every layer and transformers' "
                                   "StaticCache with a device-side fill count")
            self.decode_cache = "dynamic"
        self._vision_config = getattr(getattr(model.model, "visual", None), "config", None)
        self._vision_attention = getattr(self._vision_config, "_attn_implementation", None)  # put back by close()
        # one block-masked attention call per vision layer instead of one per window: see vision_attention.py
        self.block_vision_attention = cuda and options.block_vision_attention and use_block_attention(model)
        # ... which lets the tower be recorded as one CUDA graph per image grid (vision_graph.py)
        self.vision_graphs = (VisionGraphs(model, use_graph=True, compile_blocks=options.compile_layers)
                              if self.block_vision_attention and options.vision_graphs
                              and vision_graph_supported(model) else None)
        self.static_prefill = (options.static_prefill and self.decode_cache == "static"
                               and PrefillGraphs.supports(model, self._new_static_cache(1)))
        # decode steps multiply q/k/v and gate/up in one product each (fused_projections.py)
        self.fused_projections = (FusedProjections.build(model.model.language_model)
                                  if self.decode_cache == "static" else None)
        self.vision_cache = VisionCache(capacity=options.frame_cache)  # one encoding per frame
        # the image's vision-start token ends the prefix all prompts share (see prefix_cache.py)
        vision_start = getattr(model.config, "vision_start_token_id", None)
        self.prefix_cache = PrefixCache(-1 if vision_start is None else int(vision_start),
                                        capacity=4 if options.prefix_cache and vision_start is not None else 0)
        self.one_image_inputs = OneImageInputs(loaded.processor) if options.one_image_inputs else None
        self._gpu_image_processing = cuda and options.gpu_image_processing
        self.adapter_id = ""  # the active adapter: part of every cache's key
        self.static_cache = None  # the one StaticCache static decoding reuses (see _initial_cache)
        self._static_cache_len = 0
        self.decoder: StaticDecoder | None = None  # decode steps on that cache (static_decode.py)
        self.prefill_graphs: PrefillGraphs | None = None  # prefills on that cache (prefill_graph.py)
        self.batches = BatchedGeneration(self)
        self.closed = False

    # ------------------------------------------------------------------------------ lifecycle

    def adapter_changed(self, adapter_id: str) -> None:
        """Another adapter is active (or new weights loaded): drop what was recorded with the old ones."""
        self.adapter_id = adapter_id
        self.forget_recordings()

    def forget_recordings(self) -> None:
        """Drop the CUDA graphs (prefill, decode steps, vision tower): they keep the kernels and
        weights of the adapter they were recorded with."""
        self.decoder = None
        self.prefill_graphs = None
        self.batches.forget_decoders()
        if self.vision_graphs is not None:
            self.vision_graphs.clear()

    @contextlib.contextmanager
    def plain_model(self):
        """While inside, the model computes as loaded (the vision tower's own attention): the plain
        path's reference run at the probe."""
        config, own = self._vision_config, self._vision_attention
        engine = getattr(config, "_attn_implementation", None)
        if config is not None and own is not None:
            config._attn_implementation = own
        try:
            yield
        finally:
            if config is not None and own is not None:
                config._attn_implementation = engine

    def close(self) -> None:
        """Put the model's vision attention back and drop every cache and recording."""
        if self.closed:
            return
        self.closed = True
        if self._vision_config is not None and self._vision_attention is not None:
            self._vision_config._attn_implementation = self._vision_attention
        self.forget_recordings()
        self.batches.clear()
        self.vision_cache.clear()
        self.prefix_cache.clear()
        self.static_cache = None
        self.vision_graphs = None
        self.fused_projections = None  # holds the joint weight matrices (the projections' views stay valid)

    @property
    def prefix_cache_stats(self) -> dict:
        return self.prefix_cache.stats

    # ------------------------------------------------------------------------------ inputs

    def process(self, texts: list[str], images: list, images_kwargs: dict, text_kwargs: dict):
        """The processor's tensors for ``texts`` + ``images`` (on the host, or already on the device
        where the image processor ran there). On CUDA the image processor resizes, normalises and
        patchifies on the GPU (uploading uint8 pixels, not 7 MB of float patches per 640x480
        frame); a processor that refuses ``device`` runs on the CPU from then on."""
        if self._gpu_image_processing:
            try:
                return self._call_processor(texts, images, {**images_kwargs, "device": str(self.loaded.device)},
                                            text_kwargs)
            except (TypeError, ValueError) as error:
                self._gpu_image_processing = False
                log.info("image processor cannot run on %s (%s): preprocessing on the CPU", self.loaded.device, error)
        return self._call_processor(texts, images, images_kwargs, text_kwargs)

    def _call_processor(self, texts: list[str], images: list, images_kwargs: dict, text_kwargs: dict):
        """One prompt with one image by one_image_inputs.py once its output equalled the
        processor's (compared on the first such request); otherwise the processor."""
        processor = self.loaded.processor
        direct = self.one_image_inputs
        if direct is not None and len(texts) == 1 and len(images) == 1 and not text_kwargs and direct.usable:
            inputs = direct(texts[0], images[0], images_kwargs)
            if inputs is not None and direct.verified:
                return inputs
            reference = processor(text=texts, images=images, return_tensors="pt", images_kwargs=images_kwargs)
            if inputs is not None:
                direct.check(inputs, reference)
            return reference
        return processor(text=texts, images=images, return_tensors="pt", images_kwargs=images_kwargs, **text_kwargs)

    # ------------------------------------------------------------------------------ one request

    def generate(self, inputs: dict, image, budget: int, stop_event, constraint, first_token=None) -> Tokens:
        """The answer's tokens for one prompt's ``inputs`` (on the device) about ``image``, at most
        ``budget`` of them; ``stop_event`` ends it early, ``constraint`` (a grammar processor)
        masks each choice, ``first_token`` (vla_node.clarify_threshold's processor) may change the
        first. The caller holds the backend's lock, in inference mode."""
        if self.decode_cache == "static":
            kwargs, stop_check = generate_kwargs(stop_event, constraint, first_token)
            first, stopped, rope_deltas = self.static_prefill_first(inputs, image, budget, stop_event, constraint,
                                                                    kwargs, stop_check, first_token)
            return self._decode_rest(first, rope_deltas, budget, stop_event, stopped, constraint)
        prompt_len = int(inputs["input_ids"].shape[1])
        cache, _ = self._initial_cache(inputs["input_ids"], prompt_len + budget)
        model_inputs = self.model_inputs(inputs, image)
        if cache is not None:
            model_inputs = {**model_inputs, "past_key_values": cache}
        kwargs, _ = generate_kwargs(stop_event, constraint, first_token)
        out = self.loaded.model.generate(**model_inputs, generation_config=greedy_config(self.loaded, budget),
                                         **kwargs)
        return tokens_of(out, prompt_len)

    def model_inputs(self, inputs: dict, image) -> dict:
        """The model's inputs with the frame's vision encoding from the frame cache (encoded by the
        recorded vision tower where there is one)."""
        encoder = self.vision_graphs.encode if self.vision_graphs is not None else None
        return self.vision_cache.model_inputs(self.loaded.model, inputs, image, self.adapter_id, encoder)

    def static_prefill_first(self, inputs: dict, image, budget: int, stop_event, constraint, generate_kwargs: dict,
                             stop_check, first_token=None) -> tuple[tuple[int, float] | None, bool, object]:
        """The prompt prefilled into the engine's StaticCache (from the cached prefix) and the first
        token chosen: ((token, log-probability) or None, stopped, rope_deltas). PrefillGraphs where
        supported, else a one-token ``generate`` (with ``generate_kwargs``: its stop criteria and
        processors, ``first_token`` among them; ``stop_check`` its stop criterion)."""
        model = self.loaded.model
        prompt_len = int(inputs["input_ids"].shape[1])
        host = host_inputs(inputs)  # read back before the vision tower is queued: the reads wait for nothing
        model_inputs = self.model_inputs(inputs, image)
        # the host work (prefix lookup, rope positions) while the GPU runs the tower: nothing below
        # reads the device back before the prefill
        cache, start = self._initial_cache(inputs["input_ids"], prompt_len + budget + PREFILL_BUCKET,
                                           host["input_ids"])
        prefill = (PrefillGraphs.prepare(model, inputs, start, host) if self._uses_static_prefill(inputs)
                   else None)
        if prefill is not None:
            first, stopped = self._static_first_token(prefill, model_inputs, stop_event, constraint, first_token)
            return first, stopped, prefill.rope_deltas
        out = model.generate(**model_inputs, past_key_values=cache,
                             generation_config=greedy_config(self.loaded, 1), **generate_kwargs)
        stopped = stop_check is not None and stop_check.triggered
        return self._first_of(out, prompt_len), stopped, model.model.rope_deltas

    def _uses_static_prefill(self, inputs: dict) -> bool:
        """Whether this request prefills with PrefillGraphs (prefill_graph.py) rather than ``generate``."""
        return (self.static_prefill and inputs.get("image_grid_thw") is not None
                and inputs.get("pixel_values") is not None)

    @staticmethod
    def _first_of(out, prompt_len: int) -> tuple[int, float] | None:
        """(token, log-probability) of the first new token of a one-token ``generate``; None if none."""
        import torch

        first = out.sequences[0, prompt_len:].tolist()[:1]
        if not first:
            return None
        return first[0], float(torch.log_softmax(out.logits[0][0].float(), dim=-1)[first[0]])

    def _static_first_token(self, prefill, model_inputs: dict, stop_event, constraint, first_token=None):
        """The prompt prefilled by PrefillGraphs on the StaticCache and the first token chosen from
        its logits as ``generate`` would (first-token rule, grammar mask, greedy); returns ((token, log-probability),
        stopped), ``stopped`` being the stop event seen set after that token, as generate's criteria check."""
        model = self.loaded.model
        graphs = self.prefill_graphs
        if graphs is None or graphs.cache is not self.static_cache:
            graphs = self.prefill_graphs = PrefillGraphs(model, self.static_cache,
                                                         use_graph=self.loaded.device.type == "cuda",
                                                         compile_layers=self.options.compile_layers)
        features = (model_inputs.get("mm_encoder_outputs") or {}).get("image")
        if features is None:  # the frame cache did not encode it: the tower's own call
            features = model.model.get_image_features(model_inputs["pixel_values"], model_inputs["image_grid_thw"],
                                                      return_dict=True)
        scores = graphs.run(prefill, features)
        if first_token is not None:  # on the raw scores, as in generate (its processor comes first)
            scores = first_token(prefill.input_ids, scores)
        if constraint is not None:  # masks in place, as in generate (whose returned logits are the masked ones)
            scores = constraint(prefill.input_ids, scores)
        token, logprob = greedy_choice(scores)
        return (int(token), float(logprob)), stop_event is not None and stop_event.is_set()

    def _decode_rest(self, first: tuple[int, float] | None, rope_deltas, budget: int, stop_event, stopped: bool,
                     constraint) -> Tokens:
        """The tokens after the prefill's first one, by StaticDecoder on the engine's StaticCache.
        ``first``: the prefill's (token, log-probability); ``stopped``: the stop event was seen set after it."""
        if first is None:
            return Tokens([], 1.0)
        steps = self.steps_after(first, budget, stopped)
        if steps <= 0:
            return self.answer(first, DecodeResult([], []))
        decoder = self.decoder = self.current_decoder(self.decoder, self.static_cache)
        return self.answer(first, decoder.decode(first[0], rope_deltas, steps, stop_event, constraint))

    def steps_after(self, first: tuple[int, float], budget: int, stopped: bool) -> int:
        """Decode steps left after the first token: none when it ended the answer or a stop came."""
        return 0 if stopped or first[0] in self.loaded.eos_ids else budget - 1

    def current_decoder(self, decoder: StaticDecoder | None, cache) -> StaticDecoder:
        """``decoder`` if it still decodes on ``cache``, else a new one."""
        if decoder is not None and decoder.cache is cache:
            return decoder
        cuda = self.loaded.device.type == "cuda"
        options = self.options
        return StaticDecoder(self.loaded.model, cache, list(self.loaded.eos_ids), use_graph=cuda,
                             compile_step=cuda and options.compile_decode, fused=self.fused_projections,
                             kernels=options.decode_kernels, layer_step=options.layer_kernels,
                             dependent_launch=options.dependent_launch)

    @staticmethod
    def answer(first: tuple[int, float], rest: DecodeResult) -> Tokens:
        """All new token ids and the confidence: the geometric mean probability of the choices."""
        logprobs = [first[1], *rest.logprobs]
        mean_logprob = sum(logprobs) / len(logprobs)
        return Tokens([first[0], *rest.tokens], min(1.0, max(math.exp(mean_logprob), 1e-12)))

    # ------------------------------------------------------------------------------ caches

    def static_slots(self, total_len: int) -> int:
        """Slots of a StaticCache for ``total_len`` tokens: rounded up to a multiple of
        _STATIC_CACHE_BUCKET, at least ``options.static_cache_min_slots``."""
        return max(self.options.static_cache_min_slots, -(-total_len // _STATIC_CACHE_BUCKET) * _STATIC_CACHE_BUCKET)

    def _new_static_cache(self, slots: int):
        from transformers import StaticCache

        return StaticCache(config=self.loaded.model.config, max_cache_len=slots)

    def _initial_cache(self, input_ids, total_len: int, ids_host=None):
        """(cache, tokens it holds): the KV cache generation starts from: the prompt's cached shared
        prefix (see prefix_cache.py) in a fresh DynamicCache or in the engine's one StaticCache, an
        empty StaticCache, or None (generate's default DynamicCache).

        Like transformers' own static caches, the StaticCache is allocated once and reused per
        request (emptied, or set back to the prefix it still holds), so its tensors keep their
        addresses (the CUDA graphs are recorded once); it holds ``total_len`` slots rounded up to
        256, at least ``static_cache_min_slots``, and only ever grows. ``ids_host``: ``input_ids`` on
        the host, when the caller has them (nothing is read back from the device then).
        """
        static = None
        if self.decode_cache == "static":
            slots = self.static_slots(total_len)
            if self.static_cache is None or slots > self._static_cache_len:
                self._static_cache_len = slots
                self.static_cache = self._new_static_cache(slots)
            static = self.static_cache
        scope = (self.adapter_id, str(self.loaded.dtype), str(self.loaded.device))
        ids_host = ids_host if ids_host is not None else input_ids.cpu()
        length = self.prefix_cache.prefix_length(ids_host)
        seeded = self.prefix_cache.seed(self.loaded.model, input_ids, scope, into=static, length=length,
                                        ids_host=ids_host)
        if seeded is None:
            if static is not None:
                reset_static_cache(static)
            return static, 0
        return seeded, length
