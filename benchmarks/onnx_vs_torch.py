"""onnxruntime backend vs the torch (transformers) CPU backend on a trained model.

    source scripts/env.sh && python benchmarks/onnx_vs_torch.py [--commands 100] [--max-new-tokens 64] [--threads 1]

Exports --model (default models/tabletop-tiny, the embedded Qwen3-VL; tests/data/tabletop-tiny-qwen2_5_vl
is the Qwen2.5-VL one of 2026-12-01) with `vla-export --onnx` into a temporary folder (or uses --onnx-dir;
with --adapter, merged into the export and loaded into torch with peft, as the node serves it),
then runs the same held-out commands (half English, half Chinese) through both backends on CPU:
greedy token ids must be identical (parity), and the per-command latency (preprocess + greedy
decode, same tokens on both sides) is reported as p50/p90 for both and their ratio, measured in
the same run; the torch side here is transformers' own ``generate`` over the whole prompt (the
parity reference), the onnx side the backend as it serves (prefix KV reuse on). Then, on the first
--constrained-commands commands, both backends' ``generate`` with constrained decoding on (the
node's default; the onnx backend runs it where xgrammar is installed), each with its prefix KV
reuse: identical answers, and the latency of each: the like-for-like comparison. Also prints the
install size of each runtime's Python packages in .venv (du). --threads N gives both runtimes N
intra-op threads (torch.set_num_threads, onnxruntime's intra_op_num_threads); 0 leaves each its
default.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ONNX_PACKAGES = ("onnxruntime", "numpy", "tokenizers")
TORCH_PACKAGES = ("torch", "torchvision", "transformers", "peft")


def package_mb(site: Path, name: str) -> float:
    """du of a package's directories in site-packages (the package, its .libs, its dist-info)."""
    paths = [p for p in site.iterdir()
             if p.name == name or p.name == f"{name}.libs"
             or (p.name.startswith(f"{name}-") and p.name.endswith(".dist-info"))]
    if not paths:
        return 0.0
    out = subprocess.run(["du", "-sk", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines()) / 1024.0


def closure_mb(roots) -> tuple[float, list[str]]:
    """Installed size (from each wheel's RECORD) of ``roots`` plus everything they require (no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict[str, float] = {}
    todo = list(roots)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = sum((f.size or 0) for f in (dist.files or [])) / 2**20
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sum(seen.values()), sorted(seen)


def install_sizes() -> dict:
    import numpy

    site = Path(numpy.__file__).resolve().parent.parent
    sizes = {name: package_mb(site, name) for name in ONNX_PACKAGES + TORCH_PACKAGES}
    onnx_closure, onnx_names = closure_mb(ONNX_PACKAGES)
    torch_closure, torch_names = closure_mb(TORCH_PACKAGES)
    return {"site": site, "sizes": sizes, "onnx_closure": onnx_closure, "onnx_names": onnx_names,
            "torch_closure": torch_closure, "torch_names": torch_names,
            "onnx_total": sum(sizes[n] for n in ONNX_PACKAGES),
            "torch_total": sum(sizes[n] for n in TORCH_PACKAGES)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "tabletop-tiny"),
                    help="a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (default: the embedded Qwen3-VL model)")
    ap.add_argument("--adapter", default="",
                    help="a LoRA adapter of --model: merged into the export, loaded (peft) into torch")
    ap.add_argument("--onnx-dir", default="", help="an existing vla-export --onnx folder of --model (+ --adapter) "
                                                   "('' = export now)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads of both torch and onnxruntime (default 0: each runtime's own default)")
    ap.add_argument("--commands", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--constrained-commands", type=int, default=20,
                    help="commands also run with constrained decoding on both backends (0 = none)")
    ap.add_argument("--out", default="", help="also write the report to this file")
    a = ap.parse_args(argv)

    import onnxruntime
    import torch

    from training.onnx_parity import heldout_commands, torch_greedy_ids
    from vla_node.backends.onnx_backend import OnnxBackend
    from vla_node.backends.transformers_backend import TransformersBackend
    from vla_node.image import fit_to_limits

    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="vla_onnx_bench_") as tmp:
        onnx_dir = Path(a.onnx_dir) if a.onnx_dir else Path(tmp) / "onnx"
        if not a.onnx_dir:
            from training.onnx_export import export_onnx

            started = time.perf_counter()
            export_onnx(a.model, str(onnx_dir), adapter=a.adapter or None)
            export_s = time.perf_counter() - started
        else:
            export_s = float("nan")
        commands = heldout_commands(ROOT / "models", Path(tmp) / "heldout", a.commands)
        torch_backend = TransformersBackend(a.model, device="cpu", dtype="float32")
        if a.adapter:
            torch_backend.load_adapter(a.adapter, "adapter")
            torch_backend.set_adapter("adapter")
        onnx_backend = OnnxBackend(onnx_dir, device="cpu", threads=a.threads)
        torch_backend.warmup()
        onnx_backend.warmup()

        torch_ms, onnx_ms, mismatches, tokens = [], [], [], 0
        for index, command in enumerate(commands):
            image = fit_to_limits(command.image, torch_backend.pixel_limits)
            started = time.perf_counter()
            expected = torch_greedy_ids(torch_backend, image, command.messages, a.max_new_tokens)
            torch_ms.append((time.perf_counter() - started) * 1000.0)
            started = time.perf_counter()
            got = onnx_backend.generate_ids(image, command.messages, a.max_new_tokens)
            onnx_ms.append((time.perf_counter() - started) * 1000.0)
            tokens += len(expected)
            if expected != got:
                mismatches.append((index, command.language, expected, got))

        constrained = []  # (torch ms, onnx ms, same answer) per command
        if a.constrained_commands:
            from vla_node.backends.base import GenerationRequest
            from vla_node.vocabulary import Vocabulary

            torch_backend.enable_constrained_decoding(Vocabulary.load())
            onnx_backend.enable_constrained_decoding(Vocabulary.load())
            for command in commands[:a.constrained_commands]:
                request = GenerationRequest(fit_to_limits(command.image, torch_backend.pixel_limits),
                                            command.messages, max_new_tokens=a.max_new_tokens)
                started = time.perf_counter()
                expected = torch_backend.generate(request)
                torch_done = time.perf_counter()
                got = onnx_backend.generate(request)
                onnx_done = time.perf_counter()
                constrained.append(((torch_done - started) * 1000.0, (onnx_done - torch_done) * 1000.0,
                                    (expected.text, expected.new_tokens) == (got.text, got.new_tokens)))

    sizes = install_sizes()
    p50_t, p50_o = statistics.median(torch_ms), statistics.median(onnx_ms)
    options = "".join(f" --{name} {value}" for name, value in (("model", a.model), ("adapter", a.adapter),
                                                                  ("threads", a.threads)) if value)
    lines = [
        f"$ source scripts/env.sh && python benchmarks/onnx_vs_torch.py{options} --commands {a.commands} "
        f"--max-new-tokens {a.max_new_tokens} --constrained-commands {a.constrained_commands}",
        f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores (shared), no GPU; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} ({onnx_backend.providers[0]}, "
        f"{a.threads or 'default'} intra-op threads)",
        f"model {a.model}{' + adapter ' + a.adapter + ' (merged in the export)' if a.adapter else ''}, "
        f"family {onnx_backend.family}, export {export_s:.1f} s",
        f"parity: {len(commands) - len(mismatches)}/{len(commands)} commands with identical greedy tokens "
        f"({tokens} tokens; {sum(c.language == 'en' for c in commands)} en, "
        f"{sum(c.language == 'zh' for c in commands)} zh, max_new_tokens {a.max_new_tokens})",
        f"latency per command (preprocess + greedy decode), torch CPU  p50 {p50_t:8.1f} ms  "
        f"p90 {float(np.percentile(torch_ms, 90)):8.1f} ms  (transformers generate, whole prompt)",
        f"latency per command (preprocess + greedy decode), onnxruntime p50 {p50_o:8.1f} ms  "
        f"p90 {float(np.percentile(onnx_ms, 90)):8.1f} ms  (onnx backend, prefix KV reuse "
        f"{'on' if onnx_backend.prefix_cache_stats['hits'] else 'off'})",
        f"speed-up onnxruntime over torch (p50 ratio)  {p50_t / p50_o:.2f}x",
    ]
    if constrained:
        c_torch = statistics.median(row[0] for row in constrained)
        c_onnx = statistics.median(row[1] for row in constrained)
        lines += [
            f"constrained decoding (each backend's generate, the node's default: prefix KV reuse on both), "
            f"first {len(constrained)} commands: "
            f"{sum(row[2] for row in constrained)}/{len(constrained)} identical answers",
            f"  torch p50 {c_torch:8.1f} ms, onnxruntime p50 {c_onnx:8.1f} ms, ratio {c_torch / c_onnx:.2f}x; "
            f"onnxruntime greedy on the same commands p50 {statistics.median(onnx_ms[:len(constrained)]):8.1f} ms",
        ]
    lines += [
        f"install size (du in {sizes['site']}):",
        "  onnx runtime deps:  " + ", ".join(f"{n} {sizes['sizes'][n]:.0f} MB" for n in ONNX_PACKAGES)
        + f"  = {sizes['onnx_total']:.0f} MB",
        "  torch runtime deps: " + ", ".join(f"{n} {sizes['sizes'][n]:.0f} MB" for n in TORCH_PACKAGES)
        + f"  = {sizes['torch_total']:.0f} MB",
        f"  difference {sizes['torch_total'] - sizes['onnx_total']:.0f} MB "
        f"({sizes['torch_total'] / max(sizes['onnx_total'], 1e-9):.1f}x smaller)",
        f"  with all their pip dependencies (wheel RECORD sizes): onnx side {sizes['onnx_closure']:.0f} MB "
        f"({len(sizes['onnx_names'])} dists), torch side {sizes['torch_closure']:.0f} MB "
        f"({len(sizes['torch_names'])} dists), difference {sizes['torch_closure'] - sizes['onnx_closure']:.0f} MB",
        "  onnx side dists: " + " ".join(sizes["onnx_names"]),
    ]
    for index, language, expected, got in mismatches[:5]:
        lines.append(f"MISMATCH command {index} ({language}): torch {expected} onnx {got}")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if a.out:
        Path(a.out).write_text(report, encoding="utf-8")
    return 0 if not mismatches and all(row[2] for row in constrained) else 1


if __name__ == "__main__":
    sys.exit(main())
