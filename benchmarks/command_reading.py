"""How fast a small model trained from scratch learns to read the command, by recipe.

    python3 benchmarks/command_reading.py [--steps 800] [--samples 3000] [--eval-samples 400] [--work DIR]

Every arm runs `vla-train`'s own train() (full fine-tuning, fp32, batch 16, lr 1e-3 cosine, --steps
steps in all) from the same randomly initialised CPU-sized Qwen2.5-VL checkpoint (hidden 128 x 2
layers, vision 64 x 2, the embedded recipe's 16 px patches merged 2x2) on the same synthetic English
table-top samples (training.synth, the embedded recipe's grammar):

  full        the full system prompt (verbs, names and rules: what a pretrained Qwen-VL needs)
  compact     its first sentence only (prompt_template: compact)
  text-stage  compact, the first half of the steps on the same samples without their pictures
              (answers without boxes: training.text_stage), the second half as `compact`

Then, teacher-forced on --eval-samples scenes of another seed (never trained on, with their
pictures): the accuracy of the answer's first token (the verb: the command decides it) and of
every answer token. A model that
ignores the command cannot name the verb; the full prompt's ~400 shared tokens are what its
attention must look past. Single seed; the figures are a direction, not a fine ranking.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vision_hidden_size=64, vision_intermediate_size=128, vision_depth=2, vision_num_heads=2, merge_size=2)


def teacher_forced_accuracy(model_dir: Path, data: Path, template: str, sizes: dict) -> tuple[float, float, int]:
    """(first answer token accuracy, answer token accuracy, prompt tokens) on data's tabletop_train."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training import sharegpt
    from training.collate import IGNORE_INDEX, VLACollator, pixel_limits_of, set_pixel_limits
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    vocab = Vocabulary.load()
    processor = AutoProcessor.from_pretrained(model_dir)
    limits = pixel_limits_of(processor, sizes["min_pixels"], sizes["max_pixels"])
    set_pixel_limits(processor, limits)
    collator = VLACollator(processor, PromptBuilder(vocab, template=template), limits)
    val = sharegpt.load_validated(str(data), "tabletop_train", vocab=vocab)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    first = tokens = firsts = total = prompt = 0
    with torch.no_grad():
        for start in range(0, len(val), 8):
            batch = collator(val[start:start + 8])
            predicted = model(**batch).logits[:, :-1].argmax(-1)
            targets = batch["labels"][:, 1:]
            labelled = targets != IGNORE_INDEX
            tokens += int((predicted[labelled] == targets[labelled]).sum())
            total += int(labelled.sum())
            for row in range(targets.shape[0]):
                at = int(labelled[row].nonzero()[0])
                first += int(predicted[row, at] == targets[row, at])
                firsts += 1
                prompt = max(prompt, at + 1)
    return first / firsts, tokens / total, prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--samples", type=int, default=3000, help="training scenes")
    parser.add_argument("--eval-samples", type=int, default=400, help="scenes of seed 1 scored after training")
    parser.add_argument("--arms", default="full,compact,text-stage", help="comma list of the arms above")
    parser.add_argument("--work", default=None, help="data and runs (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    from training.build_embedded import MODEL_SIZES, Deadline, base_init, corpus, run_training, synth, synth_config
    from training.text_stage import write_text_stage

    sizes = {**MODEL_SIZES, **SMALL}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data = synth(work / "data", args.samples, 0, ("en",), 2, sizes)
        scored = synth(work / "eval", args.eval_samples, 1, ("en",), 2, sizes)
        init = base_init(work / "init", corpus([synth_config(args.samples, 0, ("en",), sizes)], 2), 0, sizes)
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; $ python3 benchmarks/command_reading.py "
              f"--steps {args.steps} --samples {args.samples} --eval-samples {args.eval_samples} --arms {args.arms}")
        print("| arm | prompt tokens | verb (first answer token) acc | answer token acc | final train loss | train s |")
        print("|---|---|---|---|---|---|")
        common = dict(finetuning_type="full", freeze_vision_tower=False, freeze_multi_modal_projector=False,
                      dataset="tabletop_train", learning_rate=1e-3, weight_decay=0.05, warmup_ratio=0.04,
                      per_device_train_batch_size=16, preprocessing_num_workers=2, seed=0, logging_steps=50,
                      save_steps=10**6, max_grad_norm=1.0, bf16="false", report_to="none", lr_scheduler_type="cosine",
                      disable_tqdm=True, image_min_pixels=sizes["min_pixels"], image_max_pixels=sizes["max_pixels"],
                      overwrite_output_dir=True)
        for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
            template = "full" if arm == "full" else "compact"
            out, start, steps = work / f"run_{arm}", init, args.steps
            started = time.time()
            if arm == "text-stage":
                text = write_text_stage(work / "data_text", synth_config(args.samples, 0, ("en",), sizes))
                start = run_training(Deadline(None), 0, model_path=str(init), dataset_dir=str(text),
                                     output_dir=str(work / "run_text"), prompt_template=template,
                                     max_steps=args.steps // 2, **common)
                steps = args.steps - args.steps // 2
            run_training(Deadline(None), 0, model_path=str(start), dataset_dir=str(data), output_dir=str(out),
                         prompt_template=template, max_steps=steps, fast_path="true", **common)
            seconds = time.time() - started
            verb, token, prompt = teacher_forced_accuracy(out, scored, template, sizes)
            losses = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
            print(f"| {arm} | {prompt} | {verb:.3f} | {token:.3f} | {losses[-1]:.3f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
