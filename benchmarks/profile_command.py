"""Where one command's time goes on a GPU: the runtime's phases and the kernels each runs.

    python3 benchmarks/profile_command.py --model qwen2_5_vl_3b [--commands 10] [--trace OUT.json]
    python3 benchmarks/profile_command.py --model qwen2_5_vl_3b --tiny      # CPU smoke run

Builds the random-weight checkpoint gpu_latency.py times (benchmarks/random_checkpoint.py) and runs
the node's pipeline (InferenceCore.infer, runtime defaults, the action grammar off so every command
emits exactly --new-tokens) on one 640x480 frame and command, a new frame each time (no
frame-cache hits). Three views of the same commands:

  phases   each backend phase timed with the GPU finished before and after it (so a phase's time
           is its own, host and device; the sum exceeds the pipelined end-to-end time, printed
           too), medians over --commands:
             inputs       chat template, image resized / normalised / patchified, prompt ids, upload
             cache        the prompt's cached prefix found and copied into the static cache
             positions    the prompt's rope positions and image rows (PrefillGraphs.prepare)
             vision       the vision tower (its recorded graph), features split per image
             prefill      the prompt after the prefix (its recorded graph) and the first token
             decode       the other tokens (the recorded decode step, one replay per token)
             rest         everything else of InferenceCore.infer: prompt, detokenise, parse, gate
  kernels  torch.profiler over two commands (no synchronisation): per phase the GPU kernels' summed
           time and count, the phase's GPU span, and its costliest kernels by name and grid
  host     cProfile over the same commands: the host's functions by their own time and by
           cumulative time (the decode loop's waits for the GPU included)
  steps    the recorded decode step replayed alone (state put back between replays), ms per step,
           with the kernels launched programmatically dependent (prefetching the first loop step of
           their weights, nothing, or whole rows) and in plain order (layer_step.py), and whether
           all decode the same tokens

Not a latency claim (gpu_latency.py makes those): a map of where the next milliseconds are.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from gpu_latency import COMMAND, camera_frame, node_command, synchronize, timed, versions  # noqa: E402

PHASES = ("inputs", "cache", "positions", "vision", "prefill", "decode")


class PhaseTimer:
    """Wraps the backend's phase methods: each call timed (``sync``: the GPU finished before and
    after) and marked for torch.profiler with a record_function range of the phase's name."""

    def __init__(self, backend, device: str):
        from vla_node.backends.engine import engine as engine_module

        self.device = device
        self.sync = True
        self.samples: dict[str, list[float]] = collections.defaultdict(list)
        self._undo = []
        engine = backend.engine
        self._wrap(backend, "prepare_inputs", "inputs")
        self._wrap(engine, "_initial_cache", "cache")
        self._wrap(engine, "model_inputs", "vision")
        self._wrap(engine, "_static_first_token", "prefill")
        self._wrap(engine, "_decode_rest", "decode")
        graphs = engine_module.PrefillGraphs
        original = graphs.__dict__["prepare"]
        graphs.prepare = staticmethod(self._timed("positions", original.__func__))
        self._undo.append(lambda: setattr(graphs, "prepare", original))

    def _timed(self, phase: str, fn):
        import torch

        def phase_call(*args, **kwargs):
            if self.sync:
                synchronize(self.device)
            started = time.perf_counter()
            with torch.profiler.record_function(f"phase:{phase}"):
                out = fn(*args, **kwargs)
            if self.sync:
                synchronize(self.device)
            self.samples[phase].append((time.perf_counter() - started) * 1000.0)
            return out

        return phase_call

    def _wrap(self, owner, method: str, phase: str) -> None:
        setattr(owner, method, self._timed(phase, getattr(owner, method)))
        self._undo.append(lambda: delattr(owner, method))

    def close(self) -> None:
        for undo in self._undo:
            undo()


def phase_table(run, timer: PhaseTimer, commands: int) -> dict:
    """Medians of each phase and of the whole command over ``commands`` calls of ``run()``."""
    timer.samples.clear()
    totals = timed(run, timer.device, commands, 0)
    medians = {phase: statistics.median(timer.samples[phase]) for phase in PHASES if timer.samples[phase]}
    medians["rest"] = statistics.median(totals) - sum(medians.values())
    medians["total (phases synchronised)"] = statistics.median(totals)
    return medians


def kernel_tables(trace_path: Path, top: int) -> dict:
    """Per phase from a chrome trace of torch.profiler: kernels' summed device time, count, the
    span from the phase's first kernel start to its last kernel end, and the costliest kernels."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"][len("phase:"):]) for e in events
              if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("phase:")]
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    tables: dict[str, dict] = {}
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        launched = launches.get(e.get("args", {}).get("correlation"))
        phase = "rest"
        if launched is not None:
            inside = [r for r in ranges if r[0] <= launched <= r[1]]
            if inside:
                phase = min(inside, key=lambda r: r[1] - r[0])[2]
        table = tables.setdefault(phase, {"kernels": 0, "kernel_us": 0.0, "first": float("inf"), "last": 0.0,
                                          "by_name": collections.defaultdict(lambda: [0, 0.0])})
        table["kernels"] += 1
        table["kernel_us"] += e["dur"]
        table["first"] = min(table["first"], e["ts"])
        table["last"] = max(table["last"], e["ts"] + e["dur"])
        args = e.get("args", {})
        name = f"{e['name'][:70]} grid={args.get('grid')}" if args.get("grid") else e["name"][:90]
        entry = table["by_name"][name]
        entry[0] += 1
        entry[1] += e["dur"]
    out = {}
    for phase, table in tables.items():
        ranked = sorted(table["by_name"].items(), key=lambda item: -item[1][1])[:top]
        out[phase] = {"kernels": table["kernels"], "kernel_us": table["kernel_us"],
                      "span_us": table["last"] - table["first"],
                      "top": [{"kernel": name, "count": count, "total_us": total} for name, (count, total) in ranked]}
    return out


def step_ms(decoder, replays: int = 20, rounds: int = 5) -> float:
    """GPU ms per replay of ``decoder``'s recorded greedy step (the cache fill and the step's own
    state put back after each round, so the step attends over the same slots every time)."""
    import torch

    graph = decoder._graphs.get("greedy")
    if graph is None:
        return float("nan")
    with torch.inference_mode():
        return _replays_ms(decoder, graph, replays, rounds)


def _replays_ms(decoder, graph, replays: int, rounds: int) -> float:
    import torch

    state = [layer.cumulative_length for layer in decoder.cache.layers] + [decoder._token, decoder._index,
                                                                          decoder._ended, decoder._all_ended]
    saved = [t.clone() for t in state]
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / replays)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
    return best


def main(argv: list[str] | None = None) -> int:
    from random_checkpoint import ARCHITECTURES, build_random_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="qwen2_5_vl_3b")
    parser.add_argument("--tiny", action="store_true", help="shrunken dims, fp32, CPU: a smoke run")
    parser.add_argument("--commands", type=int, default=None, help="timed commands per table (default 10; --tiny 2)")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens per command (default %(default)s)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per phase (default %(default)s)")
    parser.add_argument("--trace", default=None, help="also keep the profiler's chrome trace here")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch

    from vla_node.factory import RuntimeSettings, build_core

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = "float32" if args.tiny else "bfloat16"
    commands = args.commands or (2 if args.tiny else 10)
    rgb = np.random.RandomState(0).randint(0, 256, (480, 640, 3), dtype=np.uint8)
    work = Path(tempfile.mkdtemp(prefix="profile_command_"))
    checkpoint = build_random_checkpoint(work / args.model, args.model, device=device, dtype=dtype, tiny=args.tiny)
    core = build_core(RuntimeSettings(model_path=str(checkpoint), device=device, dtype=dtype,
                                      max_new_tokens=args.new_tokens, constrained_decoding=False))
    backend = core.backend
    core.max_new_tokens = args.new_tokens
    print(f"$ python3 benchmarks/profile_command.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {json.dumps(versions(device))}")
    counter = iter(range(1, 1 << 30))

    def command() -> None:  # a new frame each time: the vision tower runs for every command
        node_command(core, camera_frame(rgb, next(counter)), args.new_tokens)

    report: dict = {"model": args.model, "device": device, "new_tokens": args.new_tokens, "commands": commands}
    # three untimed commands first: they build, time block shapes, record
    report["end_to_end_ms"] = statistics.median(timed(command, device, commands, 3))

    timer = PhaseTimer(backend, device)
    try:
        report["phases_ms"] = phase_table(command, timer, commands)
        print(f"\nphases, GPU synchronised around each (median of {commands} commands; the pipelined command "
              f"end to end: {report['end_to_end_ms']:.2f} ms)")
        for phase, ms in report["phases_ms"].items():
            print(f"  {phase:30s} {ms:8.2f} ms")

        timer.sync = False
        trace = Path(args.trace) if args.trace else work / "trace.json"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(2):
                command()
            synchronize(device)
        profiler.export_chrome_trace(str(trace))
    finally:
        timer.close()
    tables = kernel_tables(trace, args.top)
    report["kernels"] = tables
    print("\nkernels per phase (torch.profiler, 2 commands, no synchronisation; us summed over both)")
    for phase in (*PHASES, "rest"):
        table = tables.get(phase)
        if table is None:
            continue
        print(f"  {phase}: {table['kernels']} kernels, {table['kernel_us'] / 2:.0f} us of kernels per command, "
              f"GPU span {table['span_us'] / 1000.0:.2f} ms over both commands")
        for row in table["top"]:
            print(f"      {row['total_us'] / 2:9.1f} us  x{row['count'] // 2:<5d} {row['kernel']}")

    import cProfile
    import io
    import pstats

    host_profile = cProfile.Profile()
    host_profile.enable()
    for _ in range(commands):
        command()
    synchronize(device)
    host_profile.disable()
    for order, lines in (("tottime", 25), ("cumulative", 45)):
        text = io.StringIO()
        pstats.Stats(host_profile, stream=text).strip_dirs().sort_stats(order).print_stats(lines)
        print(f"\nhost functions by {order} over {commands} commands (cProfile)")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:12000])

    engine = backend.engine
    if device == "cuda" and engine is not None and engine.decoder is not None:
        from vla_node.backends.engine import layer_step

        variants = [("dependent launches, first loop step prefetched (default)", True, layer_step.PREFETCH_STEPS),
                    ("dependent launches, no prefetch", True, 0),
                    ("dependent launches, whole rows prefetched", True, 1 << 16),
                    ("plain launch order", False, 0)]
        default_prefetch = layer_step.PREFETCH_STEPS
        steps, tokens = {}, {}
        options = engine.options
        for name, dependent, prefetch in variants:
            layer_step.PREFETCH_STEPS = prefetch
            # a new engine: its decoder's step recorded with these launches
            backend.use_engine(replace(options, dependent_launch=dependent))
            command()
            core.infer(rgb, COMMAND)
            tokens[name] = backend.engine.decoder._tokens[:args.new_tokens - 1].flatten().tolist()
            steps[name] = step_ms(backend.engine.decoder)
        layer_step.PREFETCH_STEPS = default_prefetch
        backend.use_engine(options)
        same = len({tuple(t) for t in tokens.values()}) == 1
        report["steps_ms"] = steps
        report["steps_same_tokens"] = same
        print("\nthe recorded decode step replayed alone (best of 5 rounds of 20 replays)")
        for name, ms in steps.items():
            print(f"  {name:58s} {ms:.4f} ms/step")
        print(f"  same tokens: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
