"""Command latency of the node's pipeline on a GPU vs a naive HF serving path and a hardware floor.

    python3 benchmarks/gpu_latency.py --model qwen2_5_vl_3b [--iters 20] [--json OUT.json]
    python3 benchmarks/gpu_latency.py --model qwen3_vl_2b
    python3 benchmarks/gpu_latency.py --model qwen2_5_vl_3b --tiny      # CPU smoke run: shrunken dims, fp32

Builds a random-weight checkpoint with the public Qwen2.5-VL-3B (or Qwen3-VL-2B) architecture on
the GPU in bf16 (benchmarks/random_checkpoint.py: no download) and times, in the same run, for one
640x480 camera frame and one command:

  baseline       AutoProcessor + model.generate (default dynamic cache, no compile) + decode +
                 parse: what a plain HF / LLaMA-Factory serving path does
  node paths     InferenceCore.infer (what the ROS node runs per command, minus ROS: fit the frame
                 to the pixel limits, prompt, TransformersBackend.generate, parse, safety gate),
                 with the runtime's speed options switched on one loaded backend:
    plain            dynamic KV cache, transformers' generate loop, no prefix reuse
    + prefix KV reuse    the system-prompt prefix prefilled once (vla_node/backends/engine/prefix_cache.py)
    + static cache, graphed decode   decode_cache=static: generate prefills, StaticDecoder
                     (vla_node/backends/engine/static_decode.py) decodes with one compiled CUDA-graph
                     replay per token (q/k/v and gate/up as one product each,
                     fused_projections.py); the first such request compiles (its time is printed)
    prefix reuse + static  both; these four rows run the vision tower eagerly inside generate
    + graphed vision tower  the tower replayed as a CUDA graph per image grid (vision_graph.py)
    + graphed prefill  the prompt after the prefix prefilled on the static cache by one CUDA-graph
                     replay per length bucket (prefill_graph.py), the prefix left in the cache
                     between requests; no transformers generate at all
    + Triton decode kernels  the decode step's one-row products, its attention and the greedy
                     choice by decode_kernels.py's Triton kernels (the rows above use cuBLAS and
                     inductor's kernels; a second decoder compiles)
    + compiled layers  the vision tower recorded with its blocks, the prefill with its norms and
                     MLPs compiled by torch.compile (regional_compile.py; the rows above record them
                     uncompiled; the first command compiles them for the frame size and prompt
                     bucket, its time is printed)
    + fused layer step  the one-row decode step by layer_step.py's fused layer kernels (seven
                     launches per layer, nothing compiled; the rows above run transformers' layers
                     compiled around the Triton kernels), each launch waiting for the one before
    + dependent launches  the runtime default: the same kernels launched programmatically
                     dependent (Hopper and later: each overlaps the end of the one before,
                     layer_kernels.py)
    default + grammar  constrained decoding on (the node's default); the grammar may end the plan
                     before --new-tokens, the token count is printed
    default + frame cache  every timed command is about the same frame, so the vision tower runs
                     once (vla_node/backends/engine/frame_cache.py); the others encode it every time
    default + LoRA adapter  after the batches: a random rank --adapter-rank LoRA adapter
                     on every language-model projection loaded and active; the fused layer step
                     merges it into copies of the matrices (layer_step.py), the prefill and vision
                     run peft's layers
    LoRA adapter, peft layers (compiled step)  the same adapter with the decode step through
                     peft's layers, compiled around the Triton kernels (what an adapter cost before)
                 Constrained decoding is off except in "+ grammar", so each path, like the
                 baseline, emits exactly --new-tokens.

For each: end-to-end p50/p95, time to first token (the same call with 1 new token), decode
ms/token ((p50 e2e - p50 ttft) / (tokens - 1)). Then the floor: (tokens - 1) decode steps, each
reading every language-model weight byte plus the KV cache once at the measured device copy
bandwidth, plus prefill and vision FLOPs at the measured bf16 matmul rate; and speed-up over the
baseline and p50 / floor. --batches also times InferenceCore.infer_batch (the node's max_batch
path: on the static cache each command prefilled alone, then one decode step per token for the
whole batch, vla_node/backends/engine/batch_cache.py) against a naive batched model.generate at batch 1,
4, 16. Each command of a batch has its own frame (several cameras: no frame-cache hits); the first
batch of each size (its decoder compiled and recorded) is timed apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# inductor's parallel compile starts a pool of worker processes (one per core) that keep the host
# busy for tens of seconds after the first static-decode request and slow the host-bound paths
# timed next; compiling in-process keeps the timed rows clean
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

COMMAND = "put the red cube in the blue bowl"


# ---------------------------------------------------------------------------------------- timing

def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples


def p(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=float), q))


# ---------------------------------------------------------------------------------------- hardware rates

def copy_bandwidth(device: str, dtype, tiny: bool) -> float:
    """Bytes/s of a device-to-device copy, counting read + write (what a weight read can reach)."""
    import torch

    n_bytes = (64 << 20) if tiny else (2 << 30)
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(timed(lambda: dst.copy_(src), device, iters=10 if tiny else 30, warmup=3))
    return 2 * n_bytes / (ms / 1000.0)


def matmul_rate(device: str, dtype, tiny: bool) -> float:
    """FLOP/s of a large square matmul in the model's dtype."""
    import torch

    n = 1024 if tiny else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = statistics.median(timed(lambda: a @ b, device, iters=5 if tiny else 30, warmup=2))
    return 2 * n**3 / (ms / 1000.0)


# ---------------------------------------------------------------------------------------- floor

def count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def floor_terms(model, prompt_tokens: int, image_grid_thw, new_tokens: int) -> dict:
    """Bytes read per decode step and FLOPs of prefill + vision for one command."""
    config = model.config
    text, vision = config.text_config, config.vision_config
    element = next(model.parameters()).element_size()
    embedding = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings().weight
    tied = embedding.data_ptr() == lm_head.data_ptr()
    vision_params = count(model.model.visual)
    language_params = count(model) - vision_params  # decoder + embedding (+ lm_head when untied)
    # a decode step reads every decoder weight and the whole lm_head, but one embedding row only
    step_weights = language_params - (0 if tied else embedding.numel())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element
    mean_context = prompt_tokens + new_tokens / 2
    step_bytes = step_weights * element + kv_per_token * mean_context

    decoder_params = language_params - embedding.numel() - (0 if tied else lm_head.numel())
    attention = 2 * text.num_hidden_layers * prompt_tokens**2 * text.num_attention_heads * head_dim  # causal
    prefill_flops = 2 * decoder_params * prompt_tokens + attention + 2 * lm_head.numel()  # logits: last token

    t, h, w = (int(v) for v in image_grid_thw)
    patches = t * h * w
    width = vision.hidden_size
    full_indexes = getattr(vision, "fullatt_block_indexes", None)  # Qwen2.5-VL: the rest use windows
    full_blocks = len(full_indexes) if full_indexes else vision.depth
    window = getattr(vision, "window_size", 0) // vision.patch_size
    window_patches = min(patches, window * window) if window else patches
    vision_attention = 4 * width * patches * (full_blocks * patches + (vision.depth - full_blocks) * window_patches)
    vision_flops = 2 * vision_params * patches + vision_attention
    return {"step_bytes": step_bytes, "prefill_flops": prefill_flops, "vision_flops": vision_flops,
            "patches": patches, "prompt_tokens": prompt_tokens, "language_params": language_params,
            "vision_params": vision_params}


# ---------------------------------------------------------------------------------------- the paths

class NaiveServer:
    """What a plain HF serving path does: its own model + processor, defaults everywhere."""

    def __init__(self, checkpoint: Path, device: str, dtype, core):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(str(checkpoint))
        self.model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=dtype).to(device).eval()
        self.device = device
        self.core = core  # only for its prompt builder and parser: the same text in and out

    def inputs(self, rgb: np.ndarray, commands: list[str]):
        texts = [self.processor.apply_chat_template(self.core.prompt.chat_messages(c), add_generation_prompt=True,
                                                    tokenize=False) for c in commands]
        self.processor.tokenizer.padding_side = "left"
        return self.processor(text=texts, images=[rgb] * len(commands), return_tensors="pt",
                              padding=True).to(self.device)

    def command(self, rgb: np.ndarray, command: str, new_tokens: int) -> int:
        from vla_node.parser import BoxCodec, ParseError, parse_actions

        inputs = self.inputs(rgb, [command])
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        size = (rgb.shape[1], rgb.shape[0])
        try:
            parse_actions(text, self.core.vocab, BoxCodec(self.core.backend.coordinate_convention, size, size))
        except ParseError:
            pass
        return int(new.shape[0])

    def batch(self, rgb: np.ndarray, batch_size: int, new_tokens: int) -> None:
        inputs = self.inputs(rgb, [COMMAND] * batch_size)
        with self.torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)


def camera_frame(rgb: np.ndarray, camera: int) -> np.ndarray:
    """``rgb`` as camera ``camera`` sees it: one pixel differs, so no two cameras share a frame
    cache entry."""
    frame = rgb.copy()
    frame[0, 0] = (camera % 256, camera // 256 % 256, 7)
    return frame


def node_command(core, rgb, new_tokens: int) -> None:
    core.max_new_tokens = new_tokens
    _, status = core.infer(rgb, COMMAND)
    if status.code.name == "BACKEND_ERROR":  # infer turns backend failures into a status: never time those
        raise RuntimeError(status.detail)


def spy_on_generate(backend, seen: list) -> None:
    """Record each GenerationResult (token counts) without touching the backend's code."""
    original = backend.generate

    def generate(request):
        result = original(request)
        seen.append(result)
        return result

    backend.generate = generate


def measure_path(name: str, run, device: str, new_tokens: int, iters: int, warmup: int, tokens_of,
                 preprocess_of=None) -> dict:
    e2e = timed(lambda: run(new_tokens), device, iters, warmup)
    tokens = tokens_of()
    preprocess = preprocess_of(iters) if preprocess_of else None
    ttft = timed(lambda: run(1), device, iters, warmup)
    p50, first = statistics.median(e2e), statistics.median(ttft)
    return {"name": name, "p50_ms": p50, "p95_ms": p(e2e, 95), "ttft_p50_ms": first, "new_tokens": tokens,
            "decode_ms_per_token": (p50 - first) / max(1, tokens - 1), "preprocess_p50_ms": preprocess}


# ---------------------------------------------------------------------------------------- main

def versions(device: str) -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        info["device"] = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
        info["capability"] = ".".join(str(v) for v in torch.cuda.get_device_capability())
    else:
        info["device"] = f"CPU {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return info


def main(argv: list[str] | None = None) -> int:
    from random_checkpoint import ARCHITECTURES, build_random_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="qwen2_5_vl_3b")
    parser.add_argument("--tiny", action="store_true", help="shrunken dims, fp32, CPU, 3 iterations: a smoke run")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cuda | cpu")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens generated per command (default %(default)s)")
    parser.add_argument("--frame-size", default="640x480", help="camera frame WxH (default %(default)s)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per path (default 20; --tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; --tiny 1)")
    parser.add_argument("--batches", default=None,
                        help="batch sizes for commands/s (default 1,4,16; --tiny 1,2; '' skips)")
    parser.add_argument("--no-static", action="store_true", help="skip the static-cache (+ compile) variant")
    parser.add_argument("--adapter-rank", type=int, default=16,
                        help="rank of the random LoRA adapter of the adapter rows (default %(default)s; 0 skips them)")
    parser.add_argument("--only", default=None,
                        help="time only the node paths whose names contain one of these comma-separated words "
                             "(the baseline and the first plain path always run: the ratios' references)")
    parser.add_argument("--checkpoint-dir", default=None, help="where to write the random checkpoint (default: tmp)")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch

    from vla_node.factory import RuntimeSettings, build_core

    if args.tiny and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the smoke run shares a small CPU: one thread beats two waiting ones
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype_name = "float32" if args.tiny else "bfloat16"
    dtype = getattr(torch, dtype_name)
    iters = args.iters or (3 if args.tiny else 20)
    batches = args.batches if args.batches is not None else ("1,2" if args.tiny else "1,4,16")
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    width, height = (int(v) for v in args.frame_size.lower().split("x"))
    rgb = np.random.RandomState(0).randint(0, 256, (height, width, 3), dtype=np.uint8)

    started = time.perf_counter()
    work = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="gpu_latency_"))
    checkpoint = build_random_checkpoint(work / args.model, args.model, device=device, dtype=dtype_name,
                                         tiny=args.tiny)
    print(f"random {args.model}{' (tiny)' if args.tiny else ''} checkpoint built in "
          f"{time.perf_counter() - started:.1f} s: {checkpoint}", flush=True)

    settings = RuntimeSettings(model_path=str(checkpoint), device=device, dtype=dtype_name,
                               max_new_tokens=args.new_tokens, constrained_decoding=True)
    core = build_core(settings)
    backend = core.backend
    seen: list = []
    spy_on_generate(backend, seen)
    naive = NaiveServer(checkpoint, device, dtype, core)

    def last_tokens() -> int:
        return seen[-1].new_tokens

    def preprocess_of(calls: int) -> float:  # chat template + processor + upload, inside the backend
        return statistics.median(result.preprocess_ms for result in seen[-calls:])

    results = []
    naive_tokens: list[int] = []
    results.append(measure_path("baseline (AutoProcessor + generate)",
                                lambda n: naive_tokens.append(naive.command(rgb, COMMAND, n)),
                                device, args.new_tokens, iters, warmup, lambda: naive_tokens[-1]))

    # The runtime's speed options: one engine per configuration on the one loaded model
    # (TransformersBackend.use_engine; vla_node/backends/engine/options.py), built when a row's
    # options differ from the engine's.
    grammar = backend.action_grammar
    default_options = backend.engine.options
    default_decode = backend.decode_cache
    vision_graphs = backend.engine.vision_graphs
    static_prefill_supported = backend.engine.static_prefill
    import torch._dynamo

    # every configuration's decoder compiles its step once: more than dynamo's default 8 in a full run
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def configure(decode: str, prefix: bool, constrained: bool = False, frames: bool = False,
                  vision_graph: bool = True, prefill_graph: bool = True, kernels: bool = True,
                  compiled_layers: bool = True, layer_step: bool = True, dependent_launch: bool = True,
                  max_batch_size: int | None = None) -> None:
        options = replace(
            default_options, decode_cache=decode, prefix_cache=prefix,
            frame_cache=default_options.frame_cache if frames else 0,  # off: a new frame per command
            vision_graphs=vision_graph,  # the vision tower: recorded (compiled blocks or as it is) or eager
            compile_layers=compiled_layers,  # the tower's blocks, the prefill graphs' norms and MLPs
            static_prefill=prefill_graph,  # static decoding's prefill: PrefillGraphs or generate's
            decode_kernels=kernels,  # the decode step's Triton kernels
            layer_kernels=layer_step,  # ... the whole one-row step by fused layer kernels
            dependent_launch=dependent_launch,  # ... those launched programmatically dependent
            max_batch_size=max_batch_size or default_options.max_batch_size)
        if backend.engine is None or backend.engine.options != options:
            backend.use_engine(options)
        backend.action_grammar = grammar if constrained else None  # off: exactly --new-tokens, like the baseline

    # session 5's runtime: transformers' prefill, eager tower, cuBLAS / inductor decode kernels
    eager = dict(vision_graph=False, prefill_graph=False, kernels=False, compiled_layers=False, layer_step=False)
    static_warmup = max(warmup, 1 if args.tiny else 2)  # after the untimed first static request (compile)
    variants = [
        ("node, plain (dynamic cache, no reuse)", dict(decode="dynamic", prefix=False, **eager), warmup),
        ("node + prefix KV reuse", dict(decode="dynamic", prefix=True, **eager), warmup),
    ]
    if not args.no_static:
        variants += [
            ("node + static cache, graphed decode", dict(decode="static", prefix=False, **eager), static_warmup),
            ("node + prefix reuse + static", dict(decode="static", prefix=True, **eager), static_warmup),
        ]
    default = dict(decode=default_decode if not args.no_static else "dynamic", prefix=True)
    if vision_graphs is not None:
        variants.append(("+ graphed vision tower", dict(default, prefill_graph=False, kernels=False,
                                                        compiled_layers=False, layer_step=False), warmup))
    if default_decode == "static" and not args.no_static and static_prefill_supported:
        variants.append(("+ graphed prefill", dict(default, kernels=False, compiled_layers=False, layer_step=False),
                         warmup))
    if default_decode == "static" and not args.no_static:
        # a new decoder: its first request compiles again, inside this row's warm-up
        variants.append(("+ Triton decode kernels", dict(default, compiled_layers=False, layer_step=False),
                         static_warmup))
    if vision_graphs is not None and default_options.compile_layers:
        variants.append(("+ compiled layers", dict(default, layer_step=False), warmup))
    if default_decode == "static" and not args.no_static:
        variants.append(("+ fused layer step", dict(default, dependent_launch=False), warmup))
        variants.append(("+ dependent launches (default)", default, warmup))
    if grammar is not None:
        variants.append(("default + grammar (runtime default)", dict(default, constrained=True), warmup))
    variants.append(("default + frame cache (same frame)", dict(default, frames=True), warmup))
    if args.only:
        words = [word.strip() for word in args.only.split(",") if word.strip()]
        variants = [variant for index, variant in enumerate(variants)
                    if index == 0 or any(word in variant[0] for word in words)]
    texts: dict[str, str] = {}

    def once_s(run) -> float:
        """Seconds of one call of ``run``, the GPU finished (a first request: it builds, compiles, records)."""
        synchronize(device)
        started_at = time.perf_counter()
        run()
        synchronize(device)
        return time.perf_counter() - started_at

    def first_command() -> None:
        node_command(core, rgb, args.new_tokens)

    first_static_s = None  # the first static-decode request compiles and records the decode step
    first_kernels_s = None  # ... and the first with the Triton kernels (their shapes timed, the step compiled again)
    first_compiled_layers_s = None  # ... and the first through the compiled vision blocks (compiled, recorded)
    first_layer_step_s = None  # ... and the first with the fused layer step (its products timed, recorded)
    for name, options, variant_warmup in variants:
        configure(**options)
        try:  # an optional variant that breaks (say, compile) must not cost the other figures
            compiled_tower = vision_graphs is not None and default_options.compile_layers
            if options.get("compiled_layers", True) and options.get("vision_graph", True) \
                    and first_compiled_layers_s is None and compiled_tower:
                first_compiled_layers_s = once_s(first_command)
            if options["decode"] == "static" and options.get("layer_step", True) and first_layer_step_s is None:
                first_layer_step_s = once_s(first_command)
            if options["decode"] == "static" and (first_static_s is None
                                                  or (options.get("kernels", True) and first_kernels_s is None)):
                seconds = once_s(first_command)
                if first_static_s is None:
                    first_static_s = seconds
                if options.get("kernels", True) and first_kernels_s is None:
                    first_kernels_s = seconds
            results.append(measure_path(name, lambda n: node_command(core, rgb, n), device, args.new_tokens,
                                        iters, variant_warmup, last_tokens, preprocess_of))
            node_command(core, rgb, args.new_tokens)
            texts[name] = seen[-1].text
        except Exception as error:
            if name.startswith("node, plain"):
                raise
            print(f"{name}: FAILED, {type(error).__name__}: {error}", flush=True)
    configure(**default)
    # a camera of a new size or a prompt of a new length bucket: the runtime records its graphs again
    new_size_ms = None
    if default.get("decode") == "static":
        for graphs in (backend.engine.vision_graphs, backend.engine.prefill_graphs):
            if graphs is not None:
                graphs.clear()
        new_size_ms = once_s(first_command) * 1000.0
    plain_text = texts.get(variants[0][0])
    same_tokens = {name: text == plain_text for name, text in texts.items() if "grammar" not in name}

    # the floor, from the node's own view of the input (prompt length, image grid)
    inputs = naive.inputs(rgb, [COMMAND])
    terms = floor_terms(naive.model, int(inputs["input_ids"].shape[1]), inputs["image_grid_thw"][0].tolist(),
                        args.new_tokens)
    bandwidth = copy_bandwidth(device, dtype, args.tiny)
    flops = matmul_rate(device, dtype, args.tiny)
    decode_floor = terms["step_bytes"] / bandwidth * (args.new_tokens - 1) * 1000.0
    compute_floor = (terms["prefill_flops"] + terms["vision_flops"]) / flops * 1000.0
    floor_ms = decode_floor + compute_floor

    from vla_node.pipeline import InferenceJob

    batch_rows = []
    for batch_size in [int(b) for b in batches.split(",") if b.strip()]:
        configure(**default, max_batch_size=max(batch_size, 1))
        first_command()  # a new engine: its one-command graphs recorded before the first batch is timed
        core.max_new_tokens = args.new_tokens
        jobs = [InferenceJob(camera_frame(rgb, camera), COMMAND) for camera in range(batch_size)]
        first_batch_s = once_s(lambda: core.infer_batch(jobs))
        node_ms = statistics.median(timed(lambda: core.infer_batch(jobs), device, max(2, iters // 4), 0))
        naive_ms = statistics.median(timed(lambda: naive.batch(rgb, batch_size, args.new_tokens), device,
                                           max(2, iters // 4), 1))
        batch_rows.append({"batch": batch_size, "p50_ms": node_ms, "commands_per_s": batch_size / (node_ms / 1000.0),
                           "first_batch_s": first_batch_s,
                           "naive_p50_ms": naive_ms, "naive_commands_per_s": batch_size / (naive_ms / 1000.0)})

    if args.adapter_rank > 0:  # last, so the rows and batches above run without peft's wrappers in the model
        from random_checkpoint import build_random_adapter

        adapter = build_random_adapter(checkpoint, work / "adapter", device=device, rank=args.adapter_rank)
        backend.set_adapter(backend.load_adapter(str(adapter)))
        adapter_rows = [(f"default + LoRA adapter r{args.adapter_rank}", default)]
        if default_decode == "static" and not args.no_static:
            adapter_rows.append((f"LoRA adapter r{args.adapter_rank}, peft layers (compiled step)",
                                 dict(default, layer_step=False)))
        for name, options in adapter_rows:
            configure(**options)
            try:
                node_command(core, rgb, args.new_tokens)  # builds the decoder (merges, or compiles the step)
                results.append(measure_path(name, lambda n: node_command(core, rgb, n), device, args.new_tokens,
                                            iters, warmup, last_tokens, preprocess_of))
            except Exception as error:
                print(f"{name}: FAILED, {type(error).__name__}: {error}", flush=True)
        configure(**default)

    info = versions(device)
    baseline = results[0]
    lines = [
        f"$ python3 benchmarks/gpu_latency.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "# " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"# model {args.model}{' TINY (shrunken dims, smoke run only)' if args.tiny else ''}, {dtype_name}, "
        f"random weights; frame {width}x{height}; command {COMMAND!r}; {args.new_tokens} new tokens; "
        f"{iters} timed calls per path after {warmup} warm-up",
        f"# prompt {terms['prompt_tokens']} tokens, {terms['patches']} vision patches; language params "
        f"{terms['language_params'] / 1e6:.1f} M, vision params {terms['vision_params'] / 1e6:.1f} M",
        f"{'path':<48} {'p50 ms':>9} {'p95 ms':>9} {'ttft ms':>9} {'ms/token':>9} {'tokens':>6} {'speed-up':>8}"
        f" {'prep ms':>8}",
    ]
    for row in results:
        lines.append(f"{row['name']:<48} {row['p50_ms']:9.2f} {row['p95_ms']:9.2f} {row['ttft_p50_ms']:9.2f} "
                     f"{row['decode_ms_per_token']:9.3f} {row['new_tokens']:6d} "
                     f"{baseline['p50_ms'] / row['p50_ms']:7.2f}x"
                     + (f" {row['preprocess_p50_ms']:8.2f}" if row.get("preprocess_p50_ms") is not None else ""))
    lines += [
        f"floor: decode {decode_floor:.2f} ms ({terms['step_bytes'] / 1e9:.3f} GB/step at copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s x {args.new_tokens - 1} steps) + prefill/vision {compute_floor:.2f} ms "
        f"({(terms['prefill_flops'] + terms['vision_flops']) / 1e9:.1f} GFLOP at {flops / 1e12:.2f} TFLOP/s) "
        f"= {floor_ms:.2f} ms",
    ]
    for row in results:
        lines.append(f"  {row['name']:<46} p50 / floor {row['p50_ms'] / floor_ms:7.2f}")
    lines.append(f"same tokens as the plain node path ({dtype_name}): " + ", ".join(
        f"{name}: {'yes' if same else 'NO'}" for name, same in same_tokens.items()))
    lines.append(f"prefix cache {backend.prefix_cache_stats}; default decode cache on this device: {default_decode}")
    if first_static_s is not None:
        lines.append(f"first static-decode request (decoder built, step compiled and recorded): {first_static_s:.1f} s")
    if first_kernels_s is not None and first_kernels_s != first_static_s:
        lines.append(f"first request with the Triton decode kernels (product configs timed per matrix shape, "
                     f"a second decoder compiled and recorded): {first_kernels_s:.1f} s")
    if first_compiled_layers_s is not None:
        lines.append(f"first command with compiled layers (vision blocks, norms and MLPs compiled for this frame "
                     f"size and prompt bucket, the graphs recorded): {first_compiled_layers_s:.1f} s")
    if first_layer_step_s is not None:
        lines.append(f"first command with the fused layer step (its products' block shapes timed, the step "
                     f"recorded; nothing compiled): {first_layer_step_s:.1f} s")
    if new_size_ms is not None:
        lines.append(f"first default command after the vision and prefill graphs were dropped (a new frame size and "
                     f"prompt bucket: both recorded again): {new_size_ms:.1f} ms")
    for row in batch_rows:
        lines.append(f"batch {row['batch']:>2}: runtime InferenceCore.infer_batch p50 {row['p50_ms']:9.2f} ms = "
                     f"{row['commands_per_s']:7.2f} commands/s; naive batched generate {row['naive_p50_ms']:9.2f} ms = "
                     f"{row['naive_commands_per_s']:7.2f} commands/s; first batch of this size "
                     f"{row['first_batch_s']:.1f} s")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": lines[0], "versions": info, "model": args.model, "tiny": args.tiny, "dtype": dtype_name,
            "paths": results, "floor_ms": floor_ms, "decode_floor_ms": decode_floor,
            "compute_floor_ms": compute_floor, "copy_bandwidth_Bps": bandwidth, "matmul_flops": flops,
            "floor_terms": terms, "batches": batch_rows, "same_tokens_as_plain": same_tokens,
            "prefix_cache": backend.prefix_cache_stats, "first_static_request_s": first_static_s,
            "first_kernels_request_s": first_kernels_s, "first_compiled_layers_s": first_compiled_layers_s,
            "first_layer_step_s": first_layer_step_s,
            "new_size_first_command_ms": new_size_ms},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
