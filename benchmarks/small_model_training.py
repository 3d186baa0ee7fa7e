"""Training throughput of a small (embedded-size) model: vla-train's ordinary path vs its fast path.

    python3 benchmarks/small_model_training.py [--shape previous|embedded|committed] [--samples 8192] [--steps 60]

Both arms run `vla-train`'s own train() on the same synthetic table-top samples and a randomly
initialised checkpoint of the chosen shape:

  ordinary  fast_path=false: DataLoader workers decode, fit and process every image each epoch,
            the whole prompt (system text included) runs for every sample; the recipe the
            embedded model was built with before (fp32, batch 64, 14 workers)
  fast      fast_path=true: the data encoded once and kept on the GPU, the shared prompt prefix
            computed once per batch, bf16 autocast over fp32 weights, batch 256
  compiled  (--arms ...,compiled) the fast arm with torch_compile=true: each decoder layer and vision
            block compiled (training/compile_layers.py); --warmup-steps must cover the compiling

Shapes: `previous` = the embedded model as committed before the fast path (hidden 256, 4 layers,
vision 192 x 4, 28 px visual tokens, 252x196 input, Qwen2.5-VL, the full system prompt);
`embedded` = training.build_embedded's MODEL_SIZES (Qwen2.5-VL, random init); `committed` = the
committed models/tabletop-tiny itself (Qwen3-VL, 6 layers, its weights, its manifest's compact
prompt), trained on as the builds since session 22 did.

Timed (on a GPU): after --warmup-steps, a torch.profiler window of 5 steps, then the wall time of the
remaining steps, the GPU synchronised only at the ends (until session 28 every step was: that sync
itself kept the host from queueing the next step while the GPU worked). Printed: samples/s, the
ratio, model FLOPs per second against the measured bf16 matmul peak (the FLOPs of the ordinary
forward of a whole sample, so both arms are measured against the same work), GPU busy time (the
CUDA kernels' time over the profiler window's wall time), where one step made the host wait for the
GPU (torch.cuda.set_sync_debug_mode over step --warmup-steps) and the kernels taking most GPU time.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PREVIOUS = dict(vocab_size=3000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vision_hidden_size=192, vision_intermediate_size=512, vision_depth=4,
                vision_num_heads=4, min_pixels=56 * 56, max_pixels=252 * 196, vision_window_attention=False)


COMMITTED = ROOT / "models" / "tabletop-tiny"


def shape(name: str) -> dict | None:
    """tiny_models sizes of the shape (None: the committed checkpoint as it is)."""
    if name == "previous":
        return PREVIOUS
    if name == "committed":
        return None
    from training.build_embedded import MODEL_SIZES

    return MODEL_SIZES


def prepare(work: Path, sizes: dict | None, samples: int) -> tuple[Path, Path]:
    from training.heldout import input_factor
    from training.synth import SynthConfig, generate_dataset
    from training.tiny_models import DEFAULT_SIZES, build_tiny_checkpoint, patch_size_of

    from training.build_embedded import IMAGE_SIZE, MODEL_SIZES, corpus

    data = work / "data"
    workers = max(1, (os.cpu_count() or 2) - 1)
    if sizes is None:
        pixels, factor = MODEL_SIZES, input_factor(COMMITTED)
    else:
        pixels = sizes
        factor = patch_size_of("qwen2_5_vl", sizes) * sizes.get("merge_size", DEFAULT_SIZES["merge_size"])
    synth = SynthConfig(num=samples, seed=0, size=IMAGE_SIZE, val_frac=0.0, test_frac=0.0, boxes="absolute_resized",
                        min_pixels=pixels["min_pixels"], max_pixels=pixels["max_pixels"], factor=factor)
    if not (data / "dataset_info.json").is_file():
        generate_dataset(data, synth, workers=workers)
    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        if sizes is None:
            shutil.copytree(COMMITTED, checkpoint)
        else:  # a tokenizer trained on the data's text, as a build's
            build_tiny_checkpoint(checkpoint, family="qwen2_5_vl", seed=0, vocab_texts=corpus([synth], workers),
                                  **sizes)
    return checkpoint, data


class Clock:
    """TrainerCallback: a profiler window of a few steps after the warm-up, then the wall time of the
    remaining steps. The GPU is synchronised only at the window's and the run's ends: a sync every
    step would stop the host from queueing the next step while the GPU works, which is what a small
    model's training lives on."""

    def __init__(self, warmup: int, profile_steps: int = 5):
        self.warmup, self.profile_steps = warmup, profile_steps
        self.timed_from: tuple[int, float] | None = None
        self.timed_to: tuple[int, float] | None = None
        self.busy_fraction = None
        self.syncs: collections.Counter | None = None  # where one step made the host wait for the GPU
        self.top_kernels: list[tuple[str, float, int]] = []  # (kernel, share of GPU time, launches a step)

    def callback(self):
        import torch
        from transformers import TrainerCallback

        clock = self
        cuda = torch.cuda.is_available()

        def now() -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        class _Callback(TrainerCallback):
            profiler = None
            started = 0.0
            caught = None

            def on_step_begin(self, args, state, control, **kw):
                # the step after the warm-up (global_step is the steps done): every synchronising call
                if cuda and state.global_step == clock.warmup - 1:
                    self.caught = warnings.catch_warnings(record=True)
                    self.records = self.caught.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")

            def on_step_end(self, args, state, control, **kw):
                step = state.global_step
                if self.caught is not None:
                    torch.cuda.set_sync_debug_mode("default")
                    self.caught.__exit__(None, None, None)
                    clock.syncs = collections.Counter(
                        f"{Path(r.filename).name}:{r.lineno}" for r in self.records
                        if "synchroniz" in str(r.message))
                    self.caught = None
                if step == clock.warmup and cuda:
                    self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    self.started = now()
                    self.profiler.__enter__()
                elif self.profiler is not None and step == clock.warmup + clock.profile_steps:
                    wall = now() - self.started
                    self.profiler.__exit__(None, None, None)
                    kernels = [e for e in self.profiler.key_averages()
                               if e.device_type == torch.autograd.DeviceType.CUDA]
                    kernel_us = sum(e.device_time_total for e in kernels)
                    clock.busy_fraction = kernel_us / 1e6 / wall
                    clock.top_kernels = [(e.key, e.device_time_total / kernel_us, e.count // clock.profile_steps)
                                         for e in sorted(kernels, key=lambda e: -e.device_time_total)[:12]]
                    self.profiler = None
                if step == clock.warmup + (clock.profile_steps if cuda else 0):
                    clock.timed_from = (step, now())
                elif step == state.max_steps and clock.timed_from is not None:
                    clock.timed_to = (step, now())

        return _Callback()

    def seconds_per_step(self) -> float:
        if self.timed_from is None or self.timed_to is None or self.timed_to[0] <= self.timed_from[0]:
            raise RuntimeError("too few steps to time: raise --steps above --warmup-steps + 5")
        return (self.timed_to[1] - self.timed_from[1]) / (self.timed_to[0] - self.timed_from[0])


def flops_per_sample(checkpoint: Path, data: Path) -> float:
    """Matmul FLOPs of forward + backward (x3) of one whole sample in the ordinary forward."""
    import json

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(checkpoint)
    text, vision = cfg.text_config, cfg.vision_config
    sample = json.loads((data / "train.json").read_text())[0]
    from transformers import AutoProcessor

    from training.collate import VLACollator, pixel_limits_of
    from vla_node.manifest import prompt_template_of
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    processor = AutoProcessor.from_pretrained(checkpoint)
    builder = PromptBuilder(Vocabulary.load(), template=prompt_template_of(checkpoint))  # the template trained
    collator = VLACollator(processor, builder, pixel_limits_of(processor))
    sample["images"] = [str(data / sample["images"][0])]
    enc = collator.encode(sample)
    tokens, patches = int(enc["input_ids"].shape[0]), int(enc["image_grid_thw"].prod())
    h = text.hidden_size
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    per_token = 2 * text.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * text.intermediate_size)
    attention = 2 * text.num_hidden_layers * tokens * h * 2  # QK and AV, causal ~ half of the square
    vh = vision.hidden_size
    per_patch = 2 * vision.depth * (4 * vh * vh + 3 * vh * vision.intermediate_size)
    return 3.0 * (tokens * (per_token + attention / 2) + patches * per_patch + tokens * 2 * h * text.vocab_size)


def matmul_peak() -> float:
    import torch

    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    times = []
    for i in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def run_arm(arm: str, checkpoint: Path, data: Path, out: Path, args) -> dict:
    from training.config import TrainConfig
    from training.train import train

    fast = arm in ("fast", "compiled")
    batch = args.fast_batch if fast else args.ordinary_batch
    clock = Clock(args.warmup_steps)
    run_dir = out / f"{arm}_batch{batch}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run left there would be resumed, at its last step
    cfg = TrainConfig(model_path=str(checkpoint), finetuning_type="full", freeze_vision_tower=False,
                      freeze_multi_modal_projector=False, dataset_dir=str(data), dataset="tabletop_train",
                      output_dir=str(run_dir), max_steps=args.steps, per_device_train_batch_size=batch,
                      learning_rate=1e-3, warmup_ratio=0.0, save_steps=10**6, logging_steps=10**6, report_to="none",
                      plot_loss=False, disable_tqdm=True, seed=0, fast_path="true" if fast else "false",
                      bf16="auto" if fast else "false", dataloader_num_workers=None if fast else args.workers,
                      preprocessing_num_workers=args.workers, torch_compile=arm == "compiled")
    started = time.perf_counter()
    train(cfg, callbacks=[clock.callback()])
    step = clock.seconds_per_step()
    return {"batch": batch, "seconds_per_step": step, "samples_per_s": batch / step,
            "busy": clock.busy_fraction, "wall_s": time.perf_counter() - started, "syncs": clock.syncs,
            "top_kernels": clock.top_kernels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("previous", "embedded", "committed"), default="previous")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--ordinary-batch", type=int, default=64)
    parser.add_argument("--fast-batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--arms", default="ordinary,fast",
                        help="of ordinary, fast and compiled (the fast path with torch_compile: its warm-up steps "
                             "compile)")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)

    import torch

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="small_train_"))
    sizes = shape(args.shape)
    checkpoint, data = prepare(work, sizes, args.samples)
    results = {arm: run_arm(arm, checkpoint, data, work / "runs", args) for arm in args.arms.split(",")}
    per_sample = flops_per_sample(checkpoint, data)
    peak = matmul_peak() if torch.cuda.is_available() else None
    print(f"$ python3 benchmarks/small_model_training.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}; "
          f"shape {args.shape}; {args.samples} samples; {args.steps} steps, first {args.warmup_steps} untimed; "
          f"{per_sample / 1e9:.1f} GFLOP per sample (whole ordinary forward + backward)"
          + (f"; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    base = results.get("ordinary")
    for arm, r in results.items():
        ratio = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        mfu = f"{per_sample * r['samples_per_s'] / peak:6.1%}" if peak else "   n/a"
        busy = f"{r['busy']:.0%}" if r["busy"] is not None else "n/a"
        print(f"{arm:<9} batch {r['batch']:4d}  {r['samples_per_s']:9.1f} samples/s  {ratio:6.2f}x  "
              f"MFU {mfu}  GPU busy {busy}  (run {r['wall_s']:.0f} s)")
        if r["syncs"] is not None:
            where = ", ".join(f"{place} x{n}" for place, n in r["syncs"].most_common(8))
            print(f"# {arm}: {sum(r['syncs'].values())} host syncs in step {args.warmup_steps}: {where or 'none'}")
        for name, share, launches in r["top_kernels"]:
            print(f"#   {arm} kernel {share:6.1%} of GPU time, {launches:4d} a step: {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
