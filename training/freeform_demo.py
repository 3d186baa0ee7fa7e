"""The README's "Coming from LLaMA-Factory" example, end to end on a CPU in a few minutes:

    python -m training.freeform_demo [--out out/freeform_demo] [--steps 150] [--num 240]

1. vla-data synth-vqa OUT/data --languages en     ("What is on the table?" on synthetic scenes)
2. vla-train training/configs/tabletop_vqa_lora.yaml dataset_dir=OUT/data output_dir=OUT/lora max_steps=STEPS
                                                  (LoRA on the embedded base, models/tabletop-tiny)
3. vla-eval --model models/tabletop-tiny --adapter OUT/lora --dataset-dir OUT/data
            --dataset tabletop_vqa_val --compare-base --out OUT/eval
                                                  (BLEU-4 / ROUGE before and after)

Each step is the command's own main(), so the commands above do the same. The table is printed and
left in OUT/eval/metrics.md, next to LLaMA-Factory's generated_predictions.jsonl and predict_results.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "configs" / "tabletop_vqa_lora.yaml"


def main(argv: list[str] | None = None) -> int:
    from training.data_cli import main as data_main
    from training.evaluate import main as eval_main
    from training.train import main as train_main
    from vla_node.factory import EMBEDDED_MODEL, embedded_path

    p = argparse.ArgumentParser(prog="python -m training.freeform_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/freeform_demo", help="folder for the data, the adapter and the evaluation")
    p.add_argument("--steps", type=int, default=150, help="LoRA optimizer steps (default 150)")
    p.add_argument("--num", type=int, default=240, help="synthetic samples, 20%% held out for evaluation (default 240)")
    a = p.parse_args(argv)
    out = Path(a.out)
    model = str(embedded_path(EMBEDDED_MODEL))
    data = out / "data"
    if not (data / "dataset_info.json").is_file():
        rc = data_main(["synth-vqa", str(data), "--num", str(a.num), "--languages", "en"])
        if rc:
            return rc
    rc = train_main([str(CONFIG), f"model_name_or_path={model}", f"dataset_dir={data}", f"output_dir={out / 'lora'}",
                     f"max_steps={a.steps}", "disable_tqdm=true"])
    if rc:
        return rc
    return eval_main(["--model", model, "--adapter", str(out / "lora"), "--dataset-dir", str(data),
                      "--dataset", "tabletop_vqa_val", "--compare-base", "--out", str(out / "eval"),
                      "--max-new-tokens", "48"])


if __name__ == "__main__":
    sys.exit(main())
