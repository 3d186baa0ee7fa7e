"""Command latency of the embedded default model on a CPU: the node's pipeline vs a naive HF call.

    source scripts/env.sh && python benchmarks/cpu_latency.py [--samples 8] [--repeats 2] [--threads 2] [--onnx] [--int4]

For each held-out command (models/heldout/test_{en,zh}.json: real synthetic table-top scenes the
model never trained on, camera frame upscaled to --frame-size), three ways are timed in the same
run, interleaved so a noisy neighbour hits all alike:

  node      InferenceCore.infer, what the ROS node runs per command minus ROS: fit the frame to
            the adapter's pixel limits, build the prompt, generate (max_new_tokens 64, greedy),
            parse, safety gate. models/tabletop-tiny for English commands, + the LoRA adapter
            models/tabletop-tiny-zh-lora for Chinese ones.
  node, same frame again: the same command once more right after, about the same frame: the
            backend's per-frame vision cache (vla_node/backends/engine/frame_cache.py) skips the vision tower
  baseline  what a plain transformers serving path does with the same weights: AutoProcessor on
            the raw frame + model.generate (default dynamic cache, no compile, max_new_tokens
            64, greedy) + tokenizer.decode, then the same parser.
  node, backend onnx (with --onnx): the same InferenceCore.infer on backend onnx (onnxruntime with
            --threads intra-op threads, constrained decoding on as the factory sets it) serving a
            `vla-export --onnx` of the same model (the Chinese adapter merged into its own export);
            exports go to --onnx-dir (reused when there) or a temporary folder.
  node, backend onnx int4 (with --int4): the same on `vla-export --onnx --quantize int4` of the same
            model (decoder weights in 4 bits, training/onnx_quantize.py).

Prints end-to-end p50/p95 per model, new tokens per command, the statuses, and baseline/node.
The machine is shared, so repeat runs vary by ~10-20%; compare the ratio, not absolute ms.
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
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=float), q))


def heldout_commands(spec: Path, limit: int, frame_size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """(command, RGB frame) for the first `limit` samples of a held-out spec, frames resized."""
    import cv2

    from training.collate import load_rgb
    from training.heldout import materialise_heldout

    out = materialise_heldout(spec, Path(tempfile.mkdtemp(prefix="cpu_latency_")) / spec.stem, limit=limit)
    samples = json.loads((out / "test.json").read_text(encoding="utf-8"))
    commands = []
    for sample in samples:
        user = next(m["content"] for m in sample["messages"] if m["role"] == "user")
        command = json.loads(user.split("Command: ", 1)[1])
        rgb = load_rgb(out / sample["images"][0])
        commands.append((command, cv2.resize(rgb, frame_size, interpolation=cv2.INTER_LINEAR)))
    return commands


def naive_generate(backend, core, rgb: np.ndarray, command: str, max_new_tokens: int) -> tuple[str, int]:
    """Plain HF: processor on the raw frame, model.generate with its defaults, decode."""
    import torch

    processor = backend.processor
    messages = core.prompt.chat_messages(command)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[rgb], return_tensors="pt")
    with torch.inference_mode():
        out = backend.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    return answer, int(new.shape[0])


def naive_parse(core, answer: str, rgb: np.ndarray, backend) -> str:
    from vla_node.parser import BoxCodec, ParseError, parse_actions

    size = (rgb.shape[1], rgb.shape[0])
    try:
        parse_actions(answer, core.vocab, BoxCodec(backend.coordinate_convention, size, size))
        return "parsed"
    except ParseError:
        return "PARSE_ERROR"


def onnx_core(export_dir: Path, threads: int, max_new_tokens: int):
    """InferenceCore on backend onnx as the node builds it, with ``threads`` onnxruntime intra-op threads
    (the node's onnx_threads)."""
    from vla_node.factory import RuntimeSettings, build_core

    return build_core(RuntimeSettings(backend="onnx", model_path=str(export_dir), device="cpu",
                                      max_new_tokens=max_new_tokens, onnx_threads=threads))


def onnx_export_dir(root: Path, model: Path, adapter: Path | None, quantize: str | None = None) -> Path:
    """`vla-export --onnx` of ``model`` (+ ``adapter`` merged; ``quantize``) under ``root``, exported
    unless already there."""
    from training.onnx_export import export_onnx

    out = root / (model.name + (f"+{adapter.name}" if adapter else "") + (f"-{quantize}" if quantize else ""))
    if not (out / "onnx_manifest.json").is_file():
        export_onnx(str(model), str(out), adapter=str(adapter) if adapter else None, quantize=quantize)
    return out


def measure(core, commands, repeats: int, max_new_tokens: int, onnx: dict | None = None) -> dict:
    """``onnx``: {label: InferenceCore on backend onnx}, each timed right after the torch node."""
    backend = core.backend
    node_ms, again_ms, base_ms, base_tokens, node_tokens = [], [], [], [], []
    onnx = onnx or {}
    onnx_ms = {label: [] for label in onnx}
    onnx_same = Counter()
    tokenizer = backend.processor.tokenizer
    statuses: Counter[str] = Counter()
    onnx_statuses = {label: Counter() for label in onnx}
    baseline_parsed: Counter[str] = Counter()
    # warm-up: first calls pay one-off allocation and kernel selection
    core.infer(commands[0][1], commands[0][0])
    naive_generate(backend, core, commands[0][1], commands[0][0], max_new_tokens)
    for variant in onnx.values():
        variant.infer(commands[0][1], commands[0][0])
    for _ in range(repeats):
        for command, rgb in commands:
            started = time.perf_counter()
            plan, status = core.infer(rgb, command)
            node_ms.append((time.perf_counter() - started) * 1000.0)
            statuses[status.code.name] += 1
            if plan is not None:  # the answer's tokens + its end
                node_tokens.append(len(tokenizer(plan.raw_text, add_special_tokens=False)["input_ids"]) + 1)

            for label, variant in onnx.items():  # the same command on backend onnx, right after
                started = time.perf_counter()
                onnx_plan, onnx_status = variant.infer(rgb, command)
                onnx_ms[label].append((time.perf_counter() - started) * 1000.0)
                onnx_statuses[label][onnx_status.code.name] += 1
                onnx_same[label] += (onnx_status.code == status.code and (onnx_plan is None) == (plan is None)
                                     and (plan is None or onnx_plan.raw_text == plan.raw_text))

            started = time.perf_counter()  # a second command about the same frame
            core.infer(rgb, command)
            again_ms.append((time.perf_counter() - started) * 1000.0)

            started = time.perf_counter()
            answer, n_new = naive_generate(backend, core, rgb, command, max_new_tokens)
            baseline_parsed[naive_parse(core, answer, rgb, backend)] += 1
            base_ms.append((time.perf_counter() - started) * 1000.0)
            base_tokens.append(n_new)
    return {"node": node_ms, "again": again_ms, "baseline": base_ms, "statuses": statuses, "baseline_parsed": baseline_parsed,
            "baseline_tokens": base_tokens, "node_tokens": node_tokens, "onnx": onnx_ms,
            "onnx_statuses": onnx_statuses, "onnx_same": onnx_same}


def report(name: str, result: dict) -> list[str]:
    node, base = result["node"], result["baseline"]
    lines = [
        f"{name}: {len(node)} commands",
        f"  node pipeline (InferenceCore.infer)      p50 {statistics.median(node):8.1f} ms  "
        f"p95 {percentile(node, 95):8.1f} ms  (new tokens p50 "
        f"{statistics.median(result['node_tokens']) if result['node_tokens'] else float('nan'):.0f})",
        f"  node, same frame again (vision cached)   p50 {statistics.median(result['again']):8.1f} ms  "
        f"p95 {percentile(result['again'], 95):8.1f} ms",
        f"  baseline (AutoProcessor + generate)      p50 {statistics.median(base):8.1f} ms  "
        f"p95 {percentile(base, 95):8.1f} ms  (new tokens p50 {statistics.median(result['baseline_tokens']):.0f})",
        f"  baseline p50 / node p50                  {statistics.median(base) / statistics.median(node):8.2f}x",
        f"  node statuses: {dict(result['statuses'])}; baseline answers: {dict(result['baseline_parsed'])}",
    ]
    for label, onnx in result["onnx"].items():
        lines += [
            f"  node pipeline, backend {label:<17s} p50 {statistics.median(onnx):8.1f} ms  "
            f"p95 {percentile(onnx, 95):8.1f} ms",
            f"  node p50 (torch) / node p50 ({label}){' ' * max(0, 10 - len(label))} "
            f"{statistics.median(node) / statistics.median(onnx):8.2f}x",
            f"  {label} statuses: {dict(result['onnx_statuses'][label])}; same status and answer text as torch: "
            f"{result['onnx_same'][label]}/{len(onnx)}",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="held-out commands per language (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the commands (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads (and onnxruntime's with --onnx / --int4; default %(default)s)")
    parser.add_argument("--frame-size", default="640x480", help="camera frame WxH (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation cap (default %(default)s)")
    parser.add_argument("--models", default=str(ROOT / "models"), help="folder with the embedded model + heldout/")
    parser.add_argument("--onnx", action="store_true",
                        help="also time the node pipeline on backend onnx (onnxruntime, --threads threads), "
                             "interleaved")
    parser.add_argument("--int4", action="store_true",
                        help="also time backend onnx on an export with the decoder's weights in 4 bits "
                             "(vla-export --quantize int4), interleaved")
    parser.add_argument("--onnx-dir", default="",
                        help="with --onnx / --int4: where the exports are kept (reused when there; default: a temporary folder)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from vla_node.factory import RuntimeSettings, build_core

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.frame_size.lower().split("x"))
    models = Path(args.models)
    runs = [
        ("tabletop-tiny, English commands", models / "heldout" / "test_en.json", RuntimeSettings(
            model_path=str(models / "tabletop-tiny"), device="cpu", max_new_tokens=args.max_new_tokens), None),
        ("tabletop-tiny + tabletop-tiny-zh-lora, Chinese commands", models / "heldout" / "test_zh.json",
         RuntimeSettings(model_path=str(models / "tabletop-tiny"), device="cpu", max_new_tokens=args.max_new_tokens,
                         adapters=[f"zh={models / 'tabletop-tiny-zh-lora'}"], active_adapter="zh"),
         models / "tabletop-tiny-zh-lora"),
    ]
    onnx_root = Path(args.onnx_dir or tempfile.mkdtemp(prefix="cpu_latency_onnx_"))
    lines = [
        f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"torch threads {args.threads}, no GPU; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"frames {width}x{height} RGB, greedy, max_new_tokens {args.max_new_tokens}, fp32",
    ]
    variants = ([("onnx", None)] if args.onnx else []) + ([("onnx int4", "int4")] if args.int4 else [])
    if variants:
        import onnxruntime

        lines.append(f"backend onnx: onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, "
                     f"{args.threads} intra-op threads")
    for name, spec, settings, adapter in runs:
        commands = heldout_commands(spec, args.samples, (width, height))
        onnx = {label: onnx_core(onnx_export_dir(onnx_root, models / "tabletop-tiny", adapter, quantize),
                                 args.threads, args.max_new_tokens)
                for label, quantize in variants}
        core = build_core(settings)
        lines += report(name, measure(core, commands, args.repeats, args.max_new_tokens, onnx))
        core.backend.close()
        for variant in onnx.values():
            variant.backend.close()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
