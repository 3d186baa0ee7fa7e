"""Rebuild the embedded default model and its LoRA adapter, from nothing, with fixed seeds.

    python -m training.build_embedded [--out models] [--work out/embedded]   (make models)

1. synthetic tabletop data (training.synth): an English set for the base, a Chinese+English
   set for the adapter, a small mixed corpus for the tokenizer;
2. a Qwen2.5-VL-architecture checkpoint with a tokenizer trained on that corpus
   (training.tiny_models), randomly initialised;
3. full fine-tuning of every weight (vision tower included) on the English set -> tabletop-tiny;
4. a LoRA adapter (LLaMA-Factory defaults: rank 8, alpha 16, all language-model linears) on the
   Chinese+English set -> tabletop-tiny-zh-lora: the skill the base lacks is Chinese commands;
5. held-out evaluation of base and base+adapter with vla-eval's code (written next to the models).

Every stage is skipped when its output exists (delete the work folder to start over). A GPU
makes this take minutes; on 2 CPU cores it takes hours (use --base-samples to shrink it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from vla_node.factory import EMBEDDED_ADAPTER, EMBEDDED_MODEL

# The architecture: Qwen2.5-VL with every size shrunk (see training.tiny_models.DEFAULT_SIZES).
MODEL_SIZES = dict(
    vocab_size=3000,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_hidden_size=192,
    vision_intermediate_size=512,
    vision_depth=4,
    vision_num_heads=4,
    min_pixels=56 * 56,
    max_pixels=252 * 196,  # a 320x240 frame is seen as 252x196 (63 visual tokens)
    vision_window_attention=False,  # 6 windows per frame would mean 6x the attention calls
)
IMAGE_SIZE = (320, 240)
# The base never reads Chinese, so the Chinese tokens' embeddings stay at their random init; LoRA
# alone (linear layers only) could not give them meaning: the adapter trains the embedding too.
ADAPTER_TRAINS_EMBEDDINGS = "embed_tokens"
BOXES = "absolute_resized"  # the model answers with boxes in its own input pixels (Qwen2.5-VL style)


def log(message: str) -> None:
    print(f"[build_embedded {time.strftime('%H:%M:%S')}] {message}", flush=True)


def synth_config(num: int, seed: int, languages: tuple[str, ...]):
    from training.synth import SynthConfig

    return SynthConfig(num=num, seed=seed, size=IMAGE_SIZE, languages=languages, boxes=BOXES,
                       min_pixels=MODEL_SIZES["min_pixels"], max_pixels=MODEL_SIZES["max_pixels"],
                       val_frac=0.02, test_frac=0.03)


def synth(out: Path, num: int, seed: int, languages: tuple[str, ...], workers: int) -> Path:
    from training.synth import generate_dataset

    if (out / "dataset_info.json").is_file():
        return out
    report = generate_dataset(out, synth_config(num, seed, languages), workers=workers)
    log(f"synth {out.name}: {report.counts} in {report.seconds:.0f} s")
    return out


def corpus(data_dirs: list[Path]) -> list[str]:
    """Every text the model will read or write: system prompt, commands, answers."""
    texts = []
    for data in data_dirs:
        for sample in json.loads((data / "train.json").read_text(encoding="utf-8")):
            texts += [message["content"] for message in sample["messages"]]
    return texts


def base_init(out: Path, texts: list[str], seed: int) -> Path:
    from training.tiny_models import build_tiny_checkpoint

    if (out / "config.json").is_file():
        return out
    build_tiny_checkpoint(out, family="qwen2_5_vl", vocab_texts=texts, seed=seed, **MODEL_SIZES)
    log(f"initial checkpoint at {out}")
    return out


def run_training(**overrides) -> Path:
    from training.config import TrainConfig
    from training.train import train

    final = Path(overrides["output_dir"])
    if (final / "train_results.json").is_file():
        return final
    if any(final.glob("checkpoint-*")):  # an interrupted run continues where it stopped
        overrides["resume_from_checkpoint"] = "true"
    cfg = TrainConfig(**overrides)
    result = train(cfg)
    log(f"trained {final}: step {result.global_step}, {result.metrics}")
    return final


def export_model(trained: Path, target: Path, files_from: Path | None = None) -> None:
    """Copy the final weights (bf16 to halve the committed size) and processor files."""
    import torch
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for item in sorted(trained.iterdir()):
        if item.is_file() and item.suffix in (".json", ".jinja", ".safetensors", ".png") \
                and not item.name.startswith(("trainer_state", "training_args")):
            shutil.copy2(item, target / item.name)
    for weights in target.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    config = target / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = "bfloat16"
        config.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.build_embedded", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models", help="where the finished models go (default: %(default)s)")
    parser.add_argument("--work", default="out/embedded", help="data, checkpoints and logs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="one seed for data, init and training (default: 0)")
    parser.add_argument("--base-samples", type=int, default=40000, help="English synthetic samples (default: %(default)s)")
    parser.add_argument("--lora-samples", type=int, default=16000, help="Chinese+English samples (default: %(default)s)")
    parser.add_argument("--base-epochs", type=float, default=8, help="full fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--lora-epochs", type=float, default=4, help="LoRA epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch (default: %(default)s)")
    parser.add_argument("--base-lr", type=float, default=1e-3, help="full fine-tuning peak learning rate (default: %(default)s)")
    parser.add_argument("--base-from", default=None,
                        help="start full fine-tuning from this checkpoint instead of a random init (a second stage)")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="processes for data generation and loading (default: cores - 2, at most 12)")
    parser.add_argument("--eval-limit", type=int, default=400, help="held-out samples per evaluation (default: %(default)s)")
    parser.add_argument("--skip-eval", action="store_true", help="stop after exporting the models")
    parser.add_argument("--stop-after", choices=("base", "all"), default="all",
                        help="'base' stops once tabletop-tiny is exported (split a build across machines)")
    args = parser.parse_args(argv)

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    heldout = {"test_en": synth_config(args.base_samples, args.seed, ("en",)),
               "test_zh": synth_config(args.lora_samples, args.seed + 1, ("zh", "en"))}

    common = dict(per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
                  dataloader_num_workers=args.workers, seed=args.seed, logging_steps=20,
                  save_steps=500, save_total_limit=3, eval_steps=500, max_grad_norm=0.5,
                  # fp32: a bf16 run at lr 1e-3 diverged to NaN after two epochs (H200, 2026-11-22);
                  # the small model is bound by data loading, not by matmul speed.
                  bf16="false", report_to="tensorboard", lr_scheduler_type="cosine",
                  image_min_pixels=MODEL_SIZES["min_pixels"], image_max_pixels=MODEL_SIZES["max_pixels"])
    if (out / EMBEDDED_MODEL / "config.json").is_file():  # exported by an earlier (maybe remote) run
        log(f"base model {out / EMBEDDED_MODEL} exists: not retrained")
    else:
        data_en = synth(work / "data_en", args.base_samples, args.seed, ("en",), args.workers)
        data_zh = synth(work / "data_zh", args.lora_samples, args.seed + 1, ("zh", "en"), args.workers)
        init = Path(args.base_from) if args.base_from else \
            base_init(work / "base_init", corpus([data_en, data_zh]), args.seed)
        base = run_training(model_path=str(init), finetuning_type="full", freeze_vision_tower=False,
                            freeze_multi_modal_projector=False, dataset_dir=str(data_en), dataset="tabletop_train",
                            eval_dataset="tabletop_val", output_dir=str(work / "base_train"), learning_rate=args.base_lr,
                            weight_decay=0.01, warmup_ratio=0.03, num_train_epochs=args.base_epochs, **common)
        export_model(base, out / EMBEDDED_MODEL)
    if args.stop_after == "base":
        log(f"base model written to {out / EMBEDDED_MODEL} in {time.time() - started:.0f} s")
        return 0
    data_zh = synth(work / "data_zh", args.lora_samples, args.seed + 1, ("zh", "en"), args.workers)
    lora = run_training(model_path=str(out / EMBEDDED_MODEL), finetuning_type="lora", lora_rank=8, lora_alpha=16,
                        lora_dropout=0.0, additional_target=ADAPTER_TRAINS_EMBEDDINGS, dataset_dir=str(data_zh), dataset="tabletop_train",
                        eval_dataset="tabletop_val", output_dir=str(work / "lora_train"), learning_rate=2e-3,
                        warmup_ratio=0.05, num_train_epochs=args.lora_epochs, **common)
    export_model(lora, out / EMBEDDED_ADAPTER)
    # Training data stays in the work folder; the held-out test splits travel with the models
    # as their recipe (a sample depends on seed and index alone): the images would be 160 MB.
    from training.heldout import write_heldout_spec

    for name, cfg in heldout.items():
        write_heldout_spec(out / "heldout" / f"{name}.json", cfg)
    log(f"models written to {out} in {time.time() - started:.0f} s")
    if not args.skip_eval:
        from training.embedded_metrics import evaluate_embedded

        evaluate_embedded(out, limit=args.eval_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
