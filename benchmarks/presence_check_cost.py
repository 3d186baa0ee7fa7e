"""What the presence check costs a command on a CPU: its counting questions answered whole (to EOS
or the 24-token budget, as session 27 shipped it) vs ended once the answer can no longer say
"absent" (GenerationRequest.answer_choices, vla_node/backends/answer_choices.py).

    source scripts/env.sh && python benchmarks/presence_check_cost.py [--limit 80] [--threads 1]
        [--backends transformers,onnx-int4] [--onnx-dir DIR]

The English held-out commands (models/heldout/test_en.json, the first --limit) go through the
node's core (InferenceCore.infer, presence check off) on the embedded model; for every plan the
node would check (two or more acting steps), vla_node.presence_check.check_presence runs on the
same fitted frame, both ways interleaved, --repeats times. Printed per backend: the plan's own time,
the check's time either way (p50 / p95), the ratio, the command's whole time (plan + check), tokens
decoded per question, and whether every way reached the same verdict on every plan. Backend
onnx-int4: the same on backend onnx serving `vla-export --onnx --quantize int4` of the model; its
"whole" way runs as session 27's did, on a backend without the frame cache (every question ran the
vision encoder), and a third way shows the frame cache's share: ended answers on that backend.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class WholeAnswers:
    """The backend, asked as session 27 asked it: no answer choices (every answer runs to its end)."""

    def __init__(self, backend):
        self.backend = backend

    def generate(self, request):
        return self.backend.generate(dataclasses.replace(request, answer_choices=()))


class Tokens:
    """Counts the tokens each question decoded."""

    def __init__(self, backend):
        self.backend, self.counts = backend, []

    def generate(self, request):
        result = self.backend.generate(request)
        self.counts.append(result.new_tokens)
        return result


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def checked_plans(core, limit: int) -> list[tuple[np.ndarray, list, float]]:
    """(fitted frame, plan steps, plan ms) of every held-out command whose plan the node checks."""
    from training.collate import load_rgb
    from training.heldout import input_factor, materialise_heldout
    from vla_node.image import fit_to_limits
    from vla_node.presence_check import needs_check

    out = materialise_heldout(ROOT / "models" / "heldout" / "test_en.json", Path(tempfile.mkdtemp(prefix="presence_")),
                              limit=limit, factor=input_factor(ROOT / "models" / "tabletop-tiny"))
    core.presence_check = False
    plans = []
    for row in json.loads((out / "test.json").read_text(encoding="utf-8")):
        rgb = load_rgb(out / row["images"][0])
        command = json.loads(row["messages"][-2]["content"].split("Command: ", 1)[1])
        started = time.perf_counter()
        plan, _ = core.infer(rgb, command)
        ms = (time.perf_counter() - started) * 1000.0
        if plan is not None and needs_check(plan.steps):
            plans.append((fit_to_limits(rgb, core.backend.pixel_limits), plan.steps, ms))
    return plans


def measure(label: str, core, limit: int, repeats: int, uncached=None) -> list[str]:
    """``uncached``: the same model on a backend without a frame cache: session 27's onnx path (whole
    answers on it), and a third way (ended answers on it)."""
    from vla_node.presence_check import check_presence

    plans = checked_plans(core, limit)
    tokens = {"whole": Tokens(WholeAnswers(uncached or core.backend)), "ended": Tokens(core.backend)}
    if uncached is not None:
        tokens["uncached"] = Tokens(uncached)
    times = {way: [] for way in tokens}
    same = 0
    for fitted, steps, _ in plans:
        verdicts = {}
        for _ in range(repeats):
            for way, backend in tokens.items():  # interleaved: the machine's load hits every way alike
                started = time.perf_counter()
                verdicts[way] = check_presence(backend, core.prompt, fitted, steps).absent
                times[way].append((time.perf_counter() - started) * 1000.0)
        same += len(set(verdicts.values())) == 1
    plan_ms = [ms for _, _, ms in plans]
    whole_total = [p + c for p, c in zip(np.repeat(plan_ms, repeats), times["whole"])]
    ended_total = [p + c for p, c in zip(np.repeat(plan_ms, repeats), times["ended"])]
    row = "  {:<44} p50 {:7.1f} ms  p95 {:7.1f} ms"
    uncached_rows = [row.format("check, ended, vision encoder every question", percentile(times["uncached"], 50),
                                percentile(times["uncached"], 95))] if uncached is not None else []
    return [
        f"{label}: {len(plans)} of {limit} commands checked (two or more acting steps), x{repeats}",
        row.format("plan (InferenceCore.infer, no check)", percentile(plan_ms, 50), percentile(plan_ms, 95)),
        row.format("check, whole answers (session 27)", percentile(times["whole"], 50), percentile(times["whole"], 95)),
        row.format("check, ended answers (answer_choices)", percentile(times["ended"], 50),
                   percentile(times["ended"], 95)),
        *uncached_rows,
        f"  check whole / ended p50                        {percentile(times['whole'], 50) / percentile(times['ended'], 50):5.2f}x",
        row.format("command, plan + check whole", percentile(whole_total, 50), percentile(whole_total, 95)),
        row.format("command, plan + check ended", percentile(ended_total, 50), percentile(ended_total, 95)),
        f"  tokens per question p50: whole {statistics.median(tokens['whole'].counts):.0f}, "
        f"ended {statistics.median(tokens['ended'].counts):.0f}; same verdict every way on {same} of {len(plans)} plans",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=80, help="held-out English commands scanned")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime intra-op threads")
    parser.add_argument("--backends", default="transformers", help="transformers and/or onnx-int4, comma-separated")
    parser.add_argument("--onnx-dir", default=None, help="for onnx-int4: where the export is kept (reused when there)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from cpu_latency import onnx_core, onnx_export_dir
    from vla_node.backends.onnx_backend import OnnxBackend
    from vla_node.factory import RuntimeSettings, build_core

    torch.set_num_threads(args.threads)
    lines = [f"$ python benchmarks/presence_check_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, threads "
             f"{args.threads}, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, transformers "
             f"{transformers.__version__}; models/tabletop-tiny, greedy, fp32"]
    backends = {name.strip() for name in args.backends.split(",") if name.strip()}
    if not backends or backends - {"transformers", "onnx-int4"}:
        parser.error(f"--backends: transformers and/or onnx-int4, got {args.backends!r}")
    if "transformers" in backends:
        core = build_core(RuntimeSettings(model_path=str(ROOT / "models" / "tabletop-tiny"), device="cpu"))
        lines += measure("backend transformers", core, args.limit, args.repeats)
        core.backend.close()
    if "onnx-int4" in backends:
        export = onnx_export_dir(Path(args.onnx_dir or tempfile.mkdtemp(prefix="presence_onnx_")),
                                 ROOT / "models" / "tabletop-tiny", None, "int4")
        core = onnx_core(export, args.threads, 128)
        uncached = OnnxBackend(export, device="cpu", threads=args.threads, frame_cache=0)
        lines += measure("backend onnx int4", core, args.limit, args.repeats, uncached)
        uncached.close()
        core.backend.close()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
