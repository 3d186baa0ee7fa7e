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
  pick-stage  compact, the first half of the steps on the same generator's PICK_OBJECT commands alone
              (an answer whose only unknown is the object's box), the second half as `compact`
  one-object-stage  as pick-stage, in scenes with the named object alone (no other object, no
              container: the box is found without reading a word)
  vqa-stage   compact, the first half of the steps on "What is on the table?" about the same kind of
              scenes (training.synth_vqa: every answer needs the picture), the second half as `compact`

Modifiers, in this order: `<arm>+frozen-vision` keeps the vision tower at its random init
(freeze_vision_tower: the projector and the language model train); `<arm>:grouped` batches samples
of similar length together (group_by_length, vla-train's default before 2026-12-02; the others draw
batches at random); `<arm>@qwen3_vl` starts from a Qwen3-VL checkpoint of the same sizes (its vision
tower adds learned absolute position embeddings and DeepStack features to the 2-D rotary positions,
all that Qwen2.5-VL's has). Example: `compact+frozen-vision@qwen3_vl`.

Then, teacher-forced on --eval-samples scenes of another seed (never trained on, with their
pictures): the accuracy of the answer's first token (the verb: the command decides it), of every
answer token and of the box coordinates' tokens; and the answer loss with each scene's own picture
against the next scene's (a model that does not look at the picture loses nothing by the swap).
Single seed; the figures are a direction, not a fine ranking.
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


def teacher_forced_accuracy(model_dir: Path, data: Path, template: str, sizes: dict) -> dict:
    """Teacher-forced on data's tabletop_train: the answer's first token (verb), every answer token and
    the box coordinates' tokens (numbers) right; the answer loss with each sample's own picture and with
    the next sample's (another scene): a model that reads the picture loses more with the wrong one;
    and the prompt length."""
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
    tokenizer = processor.tokenizer
    number = torch.tensor([tokenizer.decode([i]).strip().isdigit() for i in range(len(tokenizer))])
    n = dict(first=0, firsts=0, tokens=0, total=0, numbers=0, number_total=0, prompt=0)
    own_loss = other_loss = 0.0
    with torch.no_grad():
        for start in range(0, len(val), 8):
            batch = collator(val[start:start + 8])
            logits = model(**batch).logits[:, :-1]
            predicted = logits.argmax(-1)
            targets = batch["labels"][:, 1:]
            labelled = targets != IGNORE_INDEX
            right = predicted == targets
            n["tokens"] += int(right[labelled].sum())
            n["total"] += int(labelled.sum())
            numbers = labelled & number[targets.clamp(min=0)]
            n["numbers"] += int(right[numbers].sum())
            n["number_total"] += int(numbers.sum())
            loss = torch.nn.functional.cross_entropy(logits[labelled], targets[labelled], reduction="sum")
            own_loss += float(loss)
            # each sample with the next one's picture (every frame has the same grid: roll the patches)
            per_image = int(batch["image_grid_thw"][0].prod())
            other = dict(batch, pixel_values=batch["pixel_values"].roll(-per_image, dims=0))
            other_logits = model(**other).logits[:, :-1]
            other_loss += float(torch.nn.functional.cross_entropy(other_logits[labelled], targets[labelled],
                                                                  reduction="sum"))
            for row in range(targets.shape[0]):
                at = int(labelled[row].nonzero()[0])
                n["first"] += int(right[row, at])
                n["firsts"] += 1
                n["prompt"] = max(n["prompt"], at + 1)
    return {"verb": n["first"] / n["firsts"], "token": n["tokens"] / n["total"],
            "coordinate": n["numbers"] / max(1, n["number_total"]), "own_loss": own_loss / n["total"],
            "other_loss": other_loss / n["total"], "prompt": n["prompt"]}


STAGES = ("text-stage", "pick-stage", "one-object-stage", "vqa-stage")


def first_stage_data(recipe: str, work: Path, samples: int, sizes: dict) -> tuple[Path, str]:
    """(dataset dir, dataset name) of a recipe's first stage, written once into ``work``."""
    from training.build_embedded import GROUNDING, synth, synth_config

    if recipe == "text-stage":
        from training.text_stage import write_text_stage

        return write_text_stage(work / "data_text", synth_config(samples, 0, ("en",), sizes)), "tabletop_train"
    if recipe == "pick-stage":
        return synth(work / "data_pick", samples, 0, ("en",), 2, sizes, skills=("pick",)), "tabletop_train"
    if recipe == "one-object-stage":
        return synth(work / "data_one_object", samples, 0, ("en",), 2, sizes, **GROUNDING), "tabletop_train"
    from training.synth_vqa import VQAConfig, generate_vqa_dataset

    vqa = work / "data_vqa"
    if not (vqa / "dataset_info.json").is_file():
        generate_vqa_dataset(vqa, VQAConfig(num=samples, seed=0, languages=("en",), val_frac=0.01))
    return vqa, "tabletop_vqa_train"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--samples", type=int, default=3000, help="training scenes")
    parser.add_argument("--eval-samples", type=int, default=400, help="scenes of seed 1 scored after training")
    parser.add_argument("--arms", default="full,compact,text-stage", help="comma list of the arms above")
    parser.add_argument("--work", default=None, help="data and runs (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    from training.build_embedded import MODEL_SIZES, Deadline, base_init, corpus, run_training, synth, synth_config

    sizes = {**MODEL_SIZES, **SMALL}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data = synth(work / "data", args.samples, 0, ("en",), 2, sizes)
        scored = synth(work / "eval", args.eval_samples, 1, ("en",), 2, sizes)
        texts = corpus([synth_config(args.samples, 0, ("en",), sizes)], 2)
        inits: dict[str, Path] = {}
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; $ python3 benchmarks/command_reading.py "
              f"--steps {args.steps} --samples {args.samples} --eval-samples {args.eval_samples} --arms {args.arms}")
        print("| arm | prompt tokens | verb (first answer token) acc | answer token acc | coordinate token acc "
              "| answer loss, own picture | answer loss, another scene's | final train loss | train s |")
        print("|---|---|---|---|---|---|---|---|---|")
        common = dict(finetuning_type="full", freeze_vision_tower=False, freeze_multi_modal_projector=False,
                      dataset="tabletop_train", learning_rate=1e-3, weight_decay=0.05, warmup_ratio=0.04,
                      per_device_train_batch_size=16, preprocessing_num_workers=2, seed=0, logging_steps=50,
                      save_steps=10**6, max_grad_norm=1.0, bf16="false", report_to="none", lr_scheduler_type="cosine",
                      disable_tqdm=True, image_min_pixels=sizes["min_pixels"], image_max_pixels=sizes["max_pixels"],
                      overwrite_output_dir=True)
        for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
            recipe, _, family = arm.partition("@")
            recipe, _, sampling = recipe.partition(":")
            recipe, _, frozen = recipe.partition("+")
            family = family or "qwen2_5_vl"
            if family not in inits:
                inits[family] = base_init(work / f"init_{family}", texts, 0, sizes, family=family)
            template = "full" if recipe == "full" else "compact"
            settings = dict(common, freeze_vision_tower=frozen == "frozen-vision", group_by_length=sampling == "grouped")
            out, start, steps = work / f"run_{arm}", inits[family], args.steps
            started = time.time()
            if recipe in STAGES:  # the first half of the steps on the stage's data, from the same init
                stage, dataset = first_stage_data(recipe, work, args.samples, sizes)
                start = run_training(Deadline(None), 0, model_path=str(start), dataset_dir=str(stage),
                                     output_dir=str(work / f"run_{recipe}_{family}"), prompt_template=template,
                                     max_steps=args.steps // 2, **dict(settings, dataset=dataset))
                steps = args.steps - args.steps // 2
            run_training(Deadline(None), 0, model_path=str(start), dataset_dir=str(data), output_dir=str(out),
                         prompt_template=template, max_steps=steps, fast_path="true", **settings)
            seconds = time.time() - started
            m = teacher_forced_accuracy(out, scored, template, sizes)
            losses = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
            print(f"| {arm} | {m['prompt']} | {m['verb']:.3f} | {m['token']:.3f} | {m['coordinate']:.3f} | "
                  f"{m['own_loss']:.3f} | {m['other_loss']:.3f} | {losses[-1]:.3f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
