"""Held-out metrics of the embedded model, base vs base+LoRA, written next to the models.

    python -m training.embedded_metrics [--models models] [--limit 400] [--device cpu]

Writes models/METRICS.json and models/METRICS.md. The held-out samples are re-created from
their recipes in models/heldout/ (training.heldout), and each set of hand-written phrasings
(PHRASING_SETS in models/heldout/) is put on fresh scenes beside the generator's own wording of
the same scenes (training.phrasings): English with the base, Chinese with the adapter, as the node
serves them. METRICS.json also holds a `ci_check`: the same evaluation on the first --ci-limit
samples (of the phrasing sets, CI_PHRASING_SETS only), which tests/test_embedded_model.py re-runs
and compares (quality figures only: latency depends on the machine).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vla_node.factory import EMBEDDED_ADAPTER, EMBEDDED_MODEL

SPLITS = ("test_en", "test_zh")
# (language, the run that serves it): English commands reach the base, Chinese ones the adapter
PHRASINGS = (("en", "base"), ("zh", "adapter"))
# phrasings.json: written apart from the generator; phrasings_blind.json: by a writer who had read
# neither the generator nor the first set (the first one's author had seen the generator's gaps);
# phrasings_blind2.json: by a writer who had read no file of the project at all (session 23)
PHRASING_SETS = ("phrasings", "phrasings_blind", "phrasings_blind2")
CI_LIMIT = 12
# the ci_check's phrasing sets: the blind one alone keeps the test's time down (each set is 4 runs)
CI_PHRASING_SETS = ("phrasings_blind",)
# What must reproduce: greedy decoding in fp32 on the CPU is deterministic.
REPRODUCED = ("n", "parse_valid_rate", "accepted_rate", "plan_exact_match", "verb_acc", "object_acc",
              "destination_acc", "box_iou50", "bleu4", "rouge_l")
HEADLINE = ("parse_valid_rate", "accepted_rate", "plan_exact_match", "verb_acc", "object_acc",
            "destination_acc", "box_iou50", "clarify_precision", "clarify_recall", "bleu4", "rouge_l",
            "latency_p50_ms")


def _headline(metrics: dict) -> dict:
    return {"n": metrics.get("n"), **{key: metrics.get(key) for key in HEADLINE}}


def evaluate_embedded(models: Path, limit: int | None = 400, device: str = "cpu", write: bool = True,
                      ci_limit: int | None = CI_LIMIT, phrasing_sets: tuple[str, ...] = PHRASING_SETS) -> dict:
    import tempfile
    from dataclasses import replace

    from training.evaluate import evaluate
    from training.heldout import input_factor, materialise_heldout, read_heldout_spec
    from training.phrasings import DATASETS, materialise_phrasings

    model, adapter = str(models / EMBEDDED_MODEL), str(models / EMBEDDED_ADAPTER)
    # the references' boxes in the model's own input frame (a merge-1 model's differs from the recipe's)
    factor = input_factor(Path(model))
    results = {}
    for split in SPLITS:
        with tempfile.TemporaryDirectory(prefix=f"vla-{split}-") as tmp:
            data = materialise_heldout(models / "heldout" / f"{split}.json", Path(tmp), limit=limit, factor=factor)
            result = evaluate(model=model, adapter=adapter, dataset_dir=str(data), dataset="tabletop_test",
                              compare_base=True, limit=limit, device=device)
        results[split] = {run: _headline(metrics) for run, metrics in result["runs"].items()}
    gaps: dict[str, dict] = {}
    scenes, _ = read_heldout_spec(models / "heldout" / "test_en.json")  # the box set-up
    scenes = replace(scenes, factor=factor)  # in the model's input frame
    for name in phrasing_sets:
        phrasings = models / "heldout" / f"{name}.json"
        if not phrasings.is_file():
            continue
        for lang, run in PHRASINGS:
            with tempfile.TemporaryDirectory(prefix=f"vla-{name}-{lang}-") as tmp:
                data = materialise_phrasings(phrasings, scenes, lang, Path(tmp))
                for dataset in DATASETS:
                    result = evaluate(model=model, adapter=adapter if run == "adapter" else None, dataset_dir=str(data),
                                      dataset=dataset, limit=limit, device=device)
                    metrics = next(iter(result["runs"].values()))
                    results[f"{name}_{lang}/{dataset}"] = {run: _headline(metrics)}
            generated = results[f"{name}_{lang}/generated"][run]["plan_exact_match"]
            phrased = results[f"{name}_{lang}/phrased"][run]["plan_exact_match"]
            gaps.setdefault(name, {})[lang] = round(generated - phrased, 4)
    summary = {"device": device, "limit": limit, "splits": results, "phrasing_gap": gaps,
               "command": f"python -m training.embedded_metrics --models {models} --limit {limit} --device {device}"}
    if ci_limit:
        check = evaluate_embedded(models, ci_limit, device, write=False, ci_limit=None, phrasing_sets=CI_PHRASING_SETS)
        summary["ci_check"] = {"limit": ci_limit, "splits": {
            split: {run: {key: metrics[key] for key in REPRODUCED} for run, metrics in runs.items()}
            for split, runs in check["splits"].items()}}
    if write:
        (models / "METRICS.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (models / "METRICS.md").write_text(markdown(summary), encoding="utf-8")
        print(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    lines = [f"# Embedded model: held-out metrics ({summary['device']}, up to {summary['limit']} samples a split)",
             "", f"`{summary['command']}`", "",
             "| split | model | n | " + " | ".join(HEADLINE) + " |",
             "|---|---|---|" + "---|" * len(HEADLINE)]
    for split, runs in summary["splits"].items():
        for run, metrics in runs.items():
            cells = [f"{metrics[k]:.3f}" if isinstance(metrics.get(k), float) else str(metrics.get(k))
                     for k in HEADLINE]
            lines.append(f"| {split} | {run} | {metrics.get('n')} | " + " | ".join(cells) + " |")
    gaps = summary.get("phrasing_gap") or {}
    if gaps:
        lines += ["", "Hand-written phrasings against the generator's own wording of the same scenes: plan exact "
                      "match, generated minus phrased:", ""]
        lines += [f"- models/heldout/{name}.json, {lang}: {gap * 100:+.1f} points"
                  for name, by_lang in gaps.items() for lang, gap in by_lang.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.embedded_metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models", help="folder with the embedded model (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=400, help="samples per split (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: %(default)s)")
    parser.add_argument("--ci-limit", type=int, default=CI_LIMIT,
                        help="samples per split of the ci_check the tests reproduce (default: %(default)s)")
    args = parser.parse_args(argv)
    evaluate_embedded(Path(args.models), args.limit, args.device, ci_limit=args.ci_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
