"""Calibrate a model's CLARIFY threshold (vla_node.clarify_threshold) on scenes of a seed of their own.

    python -m training.calibrate_clarify --model models/tabletop-tiny \\
        [--adapter DIR] [--recipe models/heldout/test_en.json] [--seed 777] [--samples 800] [--write]

The scenes are the held-out recipe's (its synth options and test split) drawn on ``--seed``
instead of the recipe's own, so neither the training data nor the held-out test set is looked at.
The model answers each one through the runtime (vla_node.factory's backend and core, greedy, as the
node serves it) with the threshold observed, not applied: the probability it gives CLARIFY's first
token, its greedy answer, the reference. A threshold t makes every answer with that probability
>= t a CLARIFY; the one chosen maximises the smaller of the precision and the recall of "answers
CLARIFY" against "should" on these scenes (both kinds of error count: a needless question and a
move on a thing that is not there), ties: the middle of the longest run of equals, away from its
edges. ``--write`` records it in the model's vla_manifest.json (``clarify_threshold``), which every
local backend then applies; the table printed shows precision and recall at some candidates. With ``--adapter`` the model answers with the
adapter active and the threshold is the adapter's (written into its manifest): an adapter changes
the first token's distribution, so the base's threshold does not carry over to it (use the
adapter's own recipe, e.g. models/heldout/test_zh.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

CANDIDATES = [round(0.01 * i, 2) for i in range(1, 51)]  # 0.01 .. 0.50


@dataclass(frozen=True)
class Observation:
    probability: float  # of CLARIFY's first token, before any threshold
    answered_clarify: bool  # the greedy answer
    should_clarify: bool  # the reference


def scores(observations: list[Observation], threshold: float | None) -> tuple[float, float, float]:
    """(precision, recall, F1) of answering CLARIFY with ``threshold`` applied (None: greedy alone)."""
    tp = fp = fn = 0
    for o in observations:
        said = o.answered_clarify or (threshold is not None and o.probability >= threshold)
        tp += said and o.should_clarify
        fp += said and not o.should_clarify
        fn += (not said) and o.should_clarify
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def choose_threshold(observations: list[Observation], candidates=CANDIDATES) -> float:
    """The candidate with the largest min(precision, recall); among equals, the middle one of the
    longest run of them."""
    worst = [min(scores(observations, t)[:2]) for t in candidates]
    best = max(worst)
    runs, current = [], []
    for t, value in zip(candidates, worst):
        if abs(value - best) < 1e-12:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    longest = max(runs, key=len)
    return longest[len(longest) // 2]


def observe(model: str, data_dir: Path, device: str, adapter: str | None = None) -> list[Observation]:
    """The model's (with ``adapter`` active) observations on the samples of ``data_dir`` (dataset
    tabletop_test)."""
    from training.evaluate import _sample_parts, evaluate_core, load_eval_samples
    from vla_node.clarify_threshold import ClarifyThreshold, clarify_first_token
    from vla_node.factory import RuntimeSettings, build_backend, build_core
    from vla_node.vocabulary import Vocabulary

    vocab = Vocabulary.load(None)
    samples, _ = load_eval_samples(str(data_dir), "tabletop_test", vocab, False, None)
    # the threshold decides the plan's first token; the presence check (multi-step plans) comes after it
    settings = RuntimeSettings(model_path=model, device=device, adapters=[f"calibrated={adapter}"] if adapter else [],
                               active_adapter="calibrated" if adapter else "", presence_check=False)
    backend = build_backend(settings, vocab)
    probabilities: list[float] = []
    # observe only: the greedy answers are the model's own, whatever its manifest holds now
    backend.clarify_rule = ClarifyThreshold(clarify_first_token(backend.processor.tokenizer), None, probabilities)
    core = build_core(settings, backend=backend)
    predictions = data_dir / "predictions.jsonl"
    try:
        evaluate_core(core, samples, predictions_path=predictions)
    finally:
        backend.close()
    answers = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    if len(probabilities) != len(answers):
        raise RuntimeError(f"{len(answers)} answers but {len(probabilities)} first tokens seen: every sample must "
                           "be answered by exactly one generation")
    for sample, answer in zip(samples, answers):
        _, reference, _ = _sample_parts(sample, core.prompt)
        if reference != answer["reference"]:
            raise RuntimeError(f"{sample.source}: predictions out of order")
    return [Observation(p, a["raw_text"].lstrip().startswith("CLARIFY"), a["reference"].lstrip().startswith("CLARIFY"))
            for p, a in zip(probabilities, answers)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.calibrate_clarify",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model folder (with its vla_manifest.json)")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter of the model: calibrated with it active, written into its manifest")
    parser.add_argument("--recipe", default="models/heldout/test_en.json",
                        help="a held-out spec whose synth options are used (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=777,
                        help="the scenes' seed: one the model was neither trained nor tested on (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=800, help="scenes (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: %(default)s)")
    parser.add_argument("--write", action="store_true", help="record the threshold in the model's vla_manifest.json")
    args = parser.parse_args(argv)

    from training.heldout import input_factor, materialise_heldout, read_heldout_spec, write_heldout_spec
    from vla_node.manifest import read_manifest, write_manifest

    model = Path(args.model)
    cfg, _ = read_heldout_spec(Path(args.recipe))
    with tempfile.TemporaryDirectory(prefix="vla-calibrate-") as tmp:
        spec = write_heldout_spec(Path(tmp) / "calibration.json", replace(cfg, seed=args.seed))
        data = materialise_heldout(spec, Path(tmp) / "data", limit=args.samples, factor=input_factor(model))
        observations = observe(str(model), data, args.device, args.adapter)
    chosen = choose_threshold(observations)
    should = sum(o.should_clarify for o in observations)
    print(f"{len(observations)} scenes of seed {args.seed} ({args.recipe}'s options), {should} should be CLARIFY")
    print("threshold  precision  recall  F1")
    greedy = scores(observations, None)
    print(f"greedy     {greedy[0]:.3f}      {greedy[1]:.3f}   {greedy[2]:.3f}")
    for t in sorted({0.1, 0.2, 0.3, 0.4, 0.5, chosen}):
        p, r, f1 = scores(observations, t)
        print(f"{t:<9.2f}  {p:.3f}      {r:.3f}   {f1:.3f}{'  <- chosen' if t == chosen else ''}")
    if args.write:
        target = Path(args.adapter) if args.adapter else model
        manifest = read_manifest(target)
        manifest["clarify_threshold"] = chosen
        write_manifest(target, manifest)
        print(f"clarify_threshold {chosen} written to {target / 'vla_manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
