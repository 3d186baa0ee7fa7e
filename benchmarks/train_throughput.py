"""LoRA SFT throughput: vla-train's trainer set-up vs plain transformers Trainer defaults, same run.

    python3 benchmarks/train_throughput.py --model qwen2_5_vl_3b [--steps 30] [--batch-size 8] [--json OUT.json]
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --model qwen2_5_vl_3b     # DDP scaling
    python3 benchmarks/train_throughput.py --model qwen2_5_vl_3b --tiny                  # CPU smoke run

Random-weight checkpoint with the public architecture (benchmarks/random_checkpoint.py) and
synthetic table-top samples (training.synth, 640x480 frames, pixel limits 200704..401408 as in
training/configs/qwen2_5_vl_3b_lora.yaml). Both arms train the same LoRA (rank 8 on every linear
layer of the language model) on the same samples with the same collator (training.collate, the
serving prompt), and differ only in what the trainer set-up does:

  baseline   from_pretrained with its default dtype, peft get_peft_model, Trainer with default
             TrainingArguments (random sampler, no bf16 autocast; --baseline-gradient-checkpointing
             adds what LLaMA-Factory turns on by default)
  vla-train  training.train.build_model + training.train.training_args_for, exactly what `vla-train`
             builds: bf16 base weights with fp32 LoRA, bf16 autocast, length-grouped batches,
             SDPA attention, gradient checkpointing only when the config asks for it

Timed: optimizer steps after --warmup-steps, in one process per GPU. Prints samples/s, tokens/s
(non-padding tokens), and MFU = model FLOPs / time / peak, with model FLOPs per sample =
4 x language-model weights x tokens (forward + activation gradients; frozen weights get no weight
gradients) + causal attention + 2 x vision weights x patches (frozen vision tower: forward only);
peak = the GPU's nominal dense bf16 rate, and the measured matmul rate next to it.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NOMINAL_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def wait_for(marker: Path, timeout_s: float = 1800.0) -> None:
    """Ranks > 0 wait for rank 0 to write the checkpoint and the data (no process group yet)."""
    deadline = time.time() + timeout_s
    while not marker.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank()}: {marker} did not appear")
        time.sleep(1.0)


def prepare(args, work: Path, family: str, device: str, dtype_name: str) -> tuple[Path, Path]:
    from random_checkpoint import build_random_checkpoint
    from training.synth import SynthConfig, generate_dataset

    checkpoint, data, ready = work / args.model, work / "data", work / "READY"
    if rank() == 0 and not ready.exists():
        build_random_checkpoint(checkpoint, args.model, device=device, dtype=dtype_name, tiny=args.tiny)
        width, height = (int(v) for v in args.frame_size.lower().split("x"))
        factor = 32 if family == "qwen3_vl" else 28
        generate_dataset(data, SynthConfig(num=args.samples, size=(width, height), val_frac=0.0, test_frac=0.0,
                                           boxes="absolute_resized", min_pixels=args.min_pixels,
                                           max_pixels=args.max_pixels, factor=factor),
                         overwrite=True, workers=max(1, min(8, (os.cpu_count() or 2) // max(1, world()))))
        ready.write_text("ok\n")
    wait_for(ready)
    return checkpoint, data


class StepClock:
    """TrainerCallback timing optimizer steps after the warm-up, and the tokens they consumed."""

    def __init__(self, warmup_steps: int, counter: "ConsumedCounter"):
        self.warmup_steps = warmup_steps
        self.counter = counter
        self.start = None
        self.start_counts = (0, 0, 0)
        self.end = None
        self.end_counts = (0, 0, 0)

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == clock.warmup_steps:
                    clock._sync()
                    clock.start, clock.start_counts = time.perf_counter(), clock.counter.totals()
                elif state.global_step > clock.warmup_steps:
                    clock._sync()
                    clock.end, clock.end_counts = time.perf_counter(), clock.counter.totals()

        return _Callback()

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def rates(self) -> dict:
        if self.start is None or self.end is None:
            raise RuntimeError("too few steps: raise --steps above --warmup-steps")
        seconds = self.end - self.start
        samples, tokens, patches = (e - s for e, s in zip(self.end_counts, self.start_counts))
        return {"seconds": seconds, "samples": samples, "tokens": tokens, "patches": patches,
                "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


class ConsumedCounter:
    """Counts samples, non-padding tokens and vision patches the model trains on, from a forward
    pre-hook in the training process: collator-side counts would stay in DataLoader workers and
    include batches prefetched ahead."""

    def __init__(self, model):
        self.samples = self.tokens = self.patches = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not module.training:
            return None
        self.samples += int(kwargs["input_ids"].shape[0])
        self.tokens += int(kwargs["attention_mask"].sum())
        grid = kwargs.get("image_grid_thw")
        if grid is not None:
            self.patches += int(grid.prod(dim=-1).sum())
        return None

    def totals(self) -> tuple[int, int, int]:
        return self.samples, self.tokens, self.patches


def model_flops_per_second(model, rates: dict) -> float:
    """Model FLOPs (see the module docstring) of the timed window, per second."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.config.text_config
    vision_params = sum(p.numel() for p in base.model.visual.parameters())
    embedding = base.get_input_embeddings().weight
    language = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n) - vision_params
    language -= embedding.numel()  # a lookup, not a matmul (tied: the lm_head matmul is added below)
    head = base.get_output_embeddings().weight.numel()
    per_token = 4 * (language + head if embedding.data_ptr() == base.get_output_embeddings().weight.data_ptr()
                     else language)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tokens_per_sample = rates["tokens"] / max(1, rates["samples"])
    attention = 3 * 2 * text.num_hidden_layers * tokens_per_sample * text.num_attention_heads * head_dim  # per token
    flops = (per_token + attention) * rates["tokens"] + 2 * vision_params * rates["patches"]
    return flops / rates["seconds"]


def peak_flops(tiny: bool) -> tuple[float | None, float]:
    """(nominal dense bf16 FLOP/s of this GPU or None, measured square-matmul FLOP/s)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 1024 if tiny else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    samples = []
    for i in range(12 if not tiny else 4):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            samples.append(time.perf_counter() - t)
    measured = 2 * n**3 / statistics.median(samples)
    nominal = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        nominal = next((v for k, v in NOMINAL_BF16_DENSE.items() if k in name), None)
    return nominal, measured


def base_model_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def run_arm(arm: str, args, checkpoint: Path, data: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

    from training.collate import EncodedDataset, VLACollator, pixel_limits_of, set_pixel_limits
    from training.config import TrainConfig
    from training.train import (build_model, checkpointing_kwargs, load_split, lora_target_regex, trainer_classes,
                                training_args_for, use_bf16)
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    cfg = TrainConfig(model_path=str(checkpoint), dataset_dir=str(data), dataset="tabletop_train",
                      output_dir=str(out / arm), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                      image_min_pixels=args.min_pixels, image_max_pixels=args.max_pixels, report_to="none",
                      save_steps=10**6, logging_steps=10**6, disable_tqdm=True, plot_loss=False,
                      gradient_checkpointing=args.gradient_checkpointing, seed=0)
    vocab = Vocabulary.load(None)
    samples, _ = load_split(cfg, cfg.datasets, vocab, "training")
    processor = AutoProcessor.from_pretrained(str(checkpoint))
    limits = pixel_limits_of(processor, cfg.image_min_pixels, cfg.image_max_pixels)
    set_pixel_limits(processor, limits)
    collator = VLACollator(processor, PromptBuilder(vocab), limits)

    if arm == "vla-train":
        bf16 = use_bf16(cfg)
        model = build_model(cfg, bf16)
        dataset = EncodedDataset(samples, collator, compute_lengths=cfg.group_by_length)
        training_args = training_args_for(cfg, bf16, has_eval=False)
        trainer_class = trainer_classes()[0]
    else:
        from peft import LoraConfig, get_peft_model

        model = AutoModelForImageTextToText.from_pretrained(str(checkpoint))
        regex, _ = lora_target_regex(model, "all")
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=regex,
                                                 task_type="CAUSAL_LM"))
        dataset = EncodedDataset(samples, collator, compute_lengths=False)
        extra = checkpointing_kwargs(TrainingArguments, args.baseline_gradient_checkpointing)
        training_args = TrainingArguments(output_dir=str(out / arm), per_device_train_batch_size=args.batch_size,
                                          max_steps=args.steps, report_to="none", save_strategy="no",
                                          remove_unused_columns=False, disable_tqdm=True,
                                          use_cpu=not torch.cuda.is_available(), **extra)
        trainer_class = Trainer
    clock = StepClock(args.warmup_steps, ConsumedCounter(base_model_of(model)))
    trainer = trainer_class(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                            callbacks=[clock.callback()])
    trainer.train()
    rates = clock.rates()
    rates["model_flops_per_s"] = model_flops_per_second(model, rates)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if not p.requires_grad})
    checkpointing = any(getattr(training_args, name, False)
                        for name in ("gradient_checkpointing", "activation_checkpointing"))
    rates["settings"] = (f"base {'/'.join(dtypes)}, bf16 autocast {training_args.bf16}, optim "
                         f"{getattr(training_args.optim, 'value', training_args.optim)}, sampler "
                         f"{getattr(training_args, 'train_sampling_strategy', 'random')}, "
                         f"gradient checkpointing {checkpointing}, dataloader workers "
                         f"{training_args.dataloader_num_workers}, vision attention "
                         f"{base_model_of(model).model.visual.config._attn_implementation}")
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rates


def main(argv: list[str] | None = None) -> int:
    from random_checkpoint import ARCHITECTURES, architecture

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="qwen2_5_vl_3b")
    parser.add_argument("--tiny", action="store_true", help="shrunken dims, fp32, CPU, few steps: a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 30; --tiny 4)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed first steps (default 5; --tiny 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="per device (default 8; --tiny 2)")
    parser.add_argument("--samples", type=int, default=None, help="synthetic samples (default 640; --tiny 16)")
    parser.add_argument("--frame-size", default=None, help="camera frame WxH (default 640x480; --tiny 112x84)")
    parser.add_argument("--min-pixels", type=int, default=200704)
    parser.add_argument("--max-pixels", type=int, default=401408)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="vla-train arm: turn it on")
    parser.add_argument("--baseline-gradient-checkpointing", action="store_true",
                        help="baseline arm: turn it on (LLaMA-Factory's default)")
    parser.add_argument("--arms", default="baseline,vla-train", help="which arms, in order (default %(default)s)")
    parser.add_argument("--work-dir", default=None, help="checkpoint + data + outputs (default: tmp; shared by ranks)")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here (rank 0)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 30)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if args.tiny else 5)
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.samples = args.samples or (16 if args.tiny else 640)
    args.frame_size = args.frame_size or ("112x84" if args.tiny else "640x480")
    if args.tiny:
        args.min_pixels, args.max_pixels = min(args.min_pixels, 3136), min(args.max_pixels, 12544)

    import torch
    import transformers

    if args.tiny and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the smoke run shares a small CPU: one thread beats two waiting ones
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    work = Path(args.work_dir or os.environ.get("TRAIN_THROUGHPUT_DIR") or tempfile.mkdtemp(prefix="train_tp_"))
    if world() > 1 and not (args.work_dir or os.environ.get("TRAIN_THROUGHPUT_DIR")):
        raise SystemExit("with several processes pass --work-dir (a folder all ranks see)")
    family = architecture(args.model)["family"]
    checkpoint, data = prepare(args, work, family, device, "float32" if args.tiny else "bfloat16")

    results = {}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        results[arm] = run_arm(arm, args, checkpoint, data, work / "runs")
    if rank() != 0:
        return 0
    nominal, measured = peak_flops(args.tiny)
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": (f"{torch.cuda.get_device_name()} x{world()} processes" if torch.cuda.is_available()
                       else f"CPU {platform.machine()}, {os.cpu_count()} cores")}
    lines = [
        f"$ {'torchrun --nproc_per_node ' + str(world()) + ' ' if world() > 1 else 'python3 '}"
        f"benchmarks/train_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "# " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"# model {args.model}{' TINY (shrunken dims, smoke run only)' if args.tiny else ''}, random weights, LoRA r8 "
        f"all linear LM layers; {args.samples} synthetic samples {args.frame_size}; batch {args.batch_size}/device; "
        f"{args.steps} steps, first {args.warmup_steps} untimed; figures of rank 0 x {world()} processes",
        f"# peak: nominal {'%.0f TFLOP/s' % (nominal / 1e12) if nominal else 'unknown'}, measured matmul "
        f"{measured / 1e12:.2f} TFLOP/s",
        f"{'arm':<10} {'samples/s':>10} {'tokens/s':>10} {'MFU':>7} {'MFU(matmul)':>11} {'vs baseline':>11}  settings",
    ]
    base = results.get("baseline")
    for arm, r in results.items():
        samples_per_s = r["samples_per_s"] * world()  # DDP: every rank trains its own batch
        tokens_per_s = r["tokens_per_s"] * world()
        mfu = f"{r['model_flops_per_s'] / nominal:7.1%}" if nominal else "    n/a"
        ratio = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        lines.append(f"{arm:<10} {samples_per_s:10.2f} {tokens_per_s:10.0f} {mfu} "
                     f"{r['model_flops_per_s'] / measured:11.1%} {ratio:10.2f}x  {r['settings']}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": lines[0], "versions": info, "world_size": world(),
                                               "nominal_flops": nominal, "matmul_flops": measured,
                                               "arms": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
