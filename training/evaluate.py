"""`vla-eval`: score a model (+ adapter) on a ShareGPT split, action or free-form
(training.answer_kinds decides which, as for training).

Free-form datasets (visual question answering, captions, ...) are scored like LLaMA-Factory's
`do_predict`: BLEU-4 and ROUGE-1/2/L of the generated last answer (training.freeform_eval,
training.nlg_metrics). Action datasets are scored as follows.

Every action sample goes through exactly what the node runs for a command: the command text is
sanitised (vla_node.text), then vla_node.pipeline.InferenceCore (built by vla_node.factory:
TransformersBackend, PromptBuilder, parser, safety policy) turns image + command into a plan.
The stop-phrase fast path of the live pipeline is NOT used: the model itself is scored.

The reference is the sample's last assistant answer, parsed by vla_node.parser. Metrics (all
fractions in 0..1 except latencies in ms):

    parse_valid_rate     model text parsed into a valid plan (policy verdict aside)
    accepted_rate        plan parsed AND passed the safety policy (what the robot would execute)
    plan_exact_match     accepted plan == reference: same verbs and labels in order (boxes ignored)
    verb_acc / object_acc / destination_acc
                         per reference step, the accepted plan's step at the same index agrees
                         (object/destination over reference steps that have one)
    box_iou50            reference boxes matched by a predicted box with IoU >= 0.5 (original pixels)
    clarify_precision / clarify_recall
                         "plan contains CLARIFY" as a binary decision (prediction: accepted plan)
    bleu4 / rouge_l      raw model text vs reference text (training.metrics: per-character Chinese)
    latency_p50_ms / latency_p95_ms
                         wall time of InferenceCore.infer (preprocess + generate + parse + policy)

Multi-turn samples: the last assistant answer is the target, the turns before it are context
(action samples: the last user turn is the command).

Outputs in --out: metrics.json, metrics.md (a table; base vs adapter with --compare-base),
LLaMA-Factory's generated_predictions.jsonl ({"prompt", "predict", "label"} per sample) and
predict_results.json (predict_bleu-4, predict_rouge-1/2/l, ...) for the adapter (or model) at the
top and for the base model in base/, and for action datasets predictions_<run>.jsonl (one line per
sample with the plan and status). Every dataset problem is reported before a model loads; --out is
written only when the whole run succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.metrics import iou, percentile, rouge_l, sentence_bleu
from vla_node.backends.base import DEFAULT_MAX_NEW_TOKENS

log = logging.getLogger("vla_eval")

__all__ = ["command_from_user_text", "score_sample", "aggregate", "evaluate", "evaluate_core", "markdown_table",
           "main"]

ADAPTER_NAME = "eval_adapter"
EVAL_BACKENDS = ("transformers", "onnx")  # the local ones


# ------------------------------------------------------------------------------------------------
# command extraction
# ------------------------------------------------------------------------------------------------


def command_from_user_text(text: str, prompt) -> str:
    """The spoken command inside a user message built by ``prompt.user_text`` (after the <image>
    tags): the inverse of PromptBuilder.user_text. Falls back to the text without image tags."""
    from vla_node.prompt import IMAGE_PLACEHOLDER

    inverse = getattr(prompt, "command_from_user_text", None)
    if callable(inverse):  # CORE's own inverse, when it provides one
        return inverse(text)
    body = text.replace(IMAGE_PLACEHOLDER, "").strip()
    empty = prompt.user_text("")  # e.g. 'Command: ""' -> prefix 'Command: ', suffix ''
    cut = empty.find('""')
    if cut >= 0:
        prefix, suffix = empty[:cut], empty[cut + 2:]
        if body.startswith(prefix) and body.endswith(suffix):
            literal = body[len(prefix): len(body) - len(suffix) if suffix else None]
            try:
                value = json.loads(literal)
                if isinstance(value, str):
                    return value
            except json.JSONDecodeError:
                pass
    return body


def _sample_parts(sample, prompt) -> tuple[str, str, Path]:
    """(command, reference answer, image path) of a ShareGPT sample."""
    users = [m for m in sample.messages if m["role"] == "user"]
    answers = [m for m in sample.messages if m["role"] == "assistant"]
    if not users or not answers or len(sample.images) != 1:
        raise ValueError(f"{sample.source}: needs a user turn, an assistant answer and exactly one image")
    return command_from_user_text(users[-1]["content"], prompt), answers[-1]["content"], Path(sample.images[0])


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


class _Recorder:
    """Passes everything through to the real backend and keeps the last GenerationResult, so the raw
    text is known even when the parser or the policy refuses it."""

    def __init__(self, backend):
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "last", None)

    def generate(self, request):
        result = self._backend.generate(request)
        if not request.free_text:  # a presence check's question is not the plan's answer
            object.__setattr__(self, "last", result)
        return result

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def __setattr__(self, name, value):
        setattr(self._backend, name, value)


def _key(step) -> tuple[str, str, str]:
    return (step.verb, step.object or "", step.destination or "")


def score_sample(pred_steps: list | None, parse_ok: bool, ref_steps: list, raw_text: str, ref_text: str) -> dict:
    """Per-sample counts; ``pred_steps`` is the accepted plan's steps (None when not accepted)."""
    pred = list(pred_steps or [])
    s: dict[str, Any] = {
        "parse_valid": bool(parse_ok),
        "accepted": pred_steps is not None,
        "exact": pred_steps is not None and len(pred) == len(ref_steps)
        and all(_key(p) == _key(r) for p, r in zip(pred, ref_steps)),
        "verb": [0, 0], "object": [0, 0], "destination": [0, 0], "box": [0, 0],
        "ref_clarify": any(r.verb == "CLARIFY" for r in ref_steps),
        "pred_clarify": any(p.verb == "CLARIFY" for p in pred),
        "bleu4": sentence_bleu(raw_text, ref_text) if raw_text else 0.0,
        "rouge_l": rouge_l(raw_text, ref_text) if raw_text else 0.0,
    }
    for i, r in enumerate(ref_steps):
        p = pred[i] if i < len(pred) else None
        s["verb"][1] += 1
        s["verb"][0] += int(p is not None and p.verb == r.verb)
        for fld in ("object", "destination"):
            if getattr(r, fld):
                s[fld][1] += 1
                s[fld][0] += int(p is not None and getattr(p, fld) == getattr(r, fld))
        for fld in ("object_box", "destination_box"):
            rb = getattr(r, fld)
            if rb is not None:
                s["box"][1] += 1
                pb = getattr(p, fld) if p is not None else None
                s["box"][0] += int(pb is not None and iou(pb, rb) >= 0.5)
    return s


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def aggregate(scores: list[dict], latencies_ms: list[float], statuses: list[str]) -> dict:
    n = len(scores)
    if n == 0:
        return {"n": 0}
    tot = lambda key: [sum(s[key][0] for s in scores), sum(s[key][1] for s in scores)]  # noqa: E731
    tp = sum(s["pred_clarify"] and s["ref_clarify"] for s in scores)
    fp = sum(s["pred_clarify"] and not s["ref_clarify"] for s in scores)
    fn = sum(not s["pred_clarify"] and s["ref_clarify"] for s in scores)
    counts: dict[str, int] = {}
    for st in statuses:
        counts[st] = counts.get(st, 0) + 1
    return {
        "n": n,
        "parse_valid_rate": _ratio(sum(s["parse_valid"] for s in scores), n),
        "accepted_rate": _ratio(sum(s["accepted"] for s in scores), n),
        "plan_exact_match": _ratio(sum(s["exact"] for s in scores), n),
        "verb_acc": _ratio(*tot("verb")),
        "object_acc": _ratio(*tot("object")),
        "destination_acc": _ratio(*tot("destination")),
        "box_iou50": _ratio(*tot("box")),
        "boxes_in_reference": tot("box")[1],
        "clarify_precision": _ratio(tp, tp + fp),
        "clarify_recall": _ratio(tp, tp + fn),
        "bleu4": round(sum(s["bleu4"] for s in scores) / n, 4),
        "rouge_l": round(sum(s["rouge_l"] for s in scores) / n, 4),
        "latency_p50_ms": _round(percentile(latencies_ms, 50)),
        "latency_p95_ms": _round(percentile(latencies_ms, 95)),
        "status_counts": counts,
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


@dataclass
class _Item:
    source: str
    command: str
    reference: str
    image: Path


def evaluate_core(core, samples, ref_limits=None, predictions_path: Path | None = None,
                  records: list | None = None) -> dict:
    """Score ``samples`` (training.sharegpt.Sample) with an InferenceCore as it is configured now
    (its backend's current adapter) and aggregate. ``ref_limits`` (PixelLimits) is the pixel budget
    that the references' absolute boxes refer to (default: the backend's current one)."""
    items = []
    for s in samples:
        command, reference, image = _sample_parts(s, core.prompt)
        items.append(_Item(s.source, command, reference, image))
    wrap = not isinstance(core.backend, _Recorder)
    if wrap:  # observe the raw text without changing what runs
        core.backend = _Recorder(core.backend)
    try:
        recorder = core.backend
        return _run(core, recorder, items, core.vocab, ref_limits or recorder.pixel_limits, predictions_path,
                    records)
    finally:
        if wrap:
            core.backend = core.backend._backend


def _run(core, recorder, items: list[_Item], vocab, ref_limits, predictions_path: Path | None,
         records: list | None = None) -> dict:
    """Infer every item with ``core`` (its backend's current adapter) and aggregate."""
    from vla_node.actions import StageLatency, StatusCode
    from vla_node.image import smart_resize
    from vla_node.parser import BoxCodec, ParseError, parse_actions
    from vla_node.text import CommandError

    from training.collate import load_rgb

    sanitise = _sanitiser()
    scores, latencies, statuses = [], [], []
    out = predictions_path.open("w", encoding="utf-8") if predictions_path else None
    try:
        for i, it in enumerate(items):
            rgb = load_rgb(it.image)
            h, w = rgb.shape[:2]
            rh, rw = smart_resize(h, w, ref_limits)
            codec = BoxCodec(recorder.coordinate_convention, (w, h), (rw, rh))
            try:
                ref_steps = parse_actions(it.reference, vocab, codec)
            except (ParseError, ValueError) as e:
                raise ValueError(f"{it.source}: reference answer does not parse: {e}") from None
            object.__setattr__(recorder, "last", None)
            plan = None
            started = time.perf_counter()
            try:
                command = sanitise(it.command)
            except CommandError as e:
                status_code, detail = StatusCode.BAD_COMMAND.value, str(e)
            else:
                plan, status = core.infer(rgb, command, command_id=f"eval-{i}", latency=StageLatency())
                status_code, detail = status.code.value, status.detail
            wall_ms = (time.perf_counter() - started) * 1000.0
            raw = recorder.last.text if recorder.last is not None else ""
            parse_ok = status_code in (StatusCode.ACCEPTED.value, StatusCode.REJECTED_BY_POLICY.value)
            s = score_sample(plan.steps if plan is not None else None, parse_ok, ref_steps, raw, it.reference)
            scores.append(s)
            latencies.append(wall_ms)
            statuses.append(status_code)
            if records is not None:  # LLaMA-Factory's generated_predictions.jsonl row
                from training.freeform_eval import Prediction

                records.append(Prediction(it.command, raw, it.reference, it.source))
            if out is not None:
                out.write(json.dumps({
                    "source": it.source, "command": it.command, "reference": it.reference, "raw_text": raw,
                    "status": status_code, "detail": detail, "exact": s["exact"],
                    "steps": [st.model_dump(exclude_none=True) for st in plan.steps] if plan else None,
                    "latency_ms": round(wall_ms, 2),
                }, ensure_ascii=False) + "\n")
    finally:
        if out is not None:
            out.close()
    return aggregate(scores, latencies, statuses)


def _sanitiser():
    from vla_node import text as _text

    fn = getattr(_text, "sanitise_command", None) or getattr(_text, "sanitize_command")
    return fn


# ------------------------------------------------------------------------------------------------
# the evaluation
# ------------------------------------------------------------------------------------------------

_ROWS = [
    ("n", "samples", "{:d}"),
    ("parse_valid_rate", "parse-valid rate", "pct"),
    ("accepted_rate", "accepted by policy", "pct"),
    ("plan_exact_match", "plan exact match", "pct"),
    ("verb_acc", "verb accuracy", "pct"),
    ("object_acc", "object accuracy", "pct"),
    ("destination_acc", "destination accuracy", "pct"),
    ("box_iou50", "box IoU>=0.5", "pct"),
    ("clarify_precision", "CLARIFY precision", "pct"),
    ("clarify_recall", "CLARIFY recall", "pct"),
    ("bleu4", "BLEU-4", "pct"),
    ("rouge_l", "ROUGE-L", "pct"),
    ("latency_p50_ms", "latency p50 (ms)", "{:.1f}"),
    ("latency_p95_ms", "latency p95 (ms)", "{:.1f}"),
]


def _fmt(v, fmt: str) -> str:
    if v is None:
        return "n/a"
    if fmt == "pct":
        return f"{100.0 * v:.1f}%"
    return fmt.format(v)


def markdown_table(runs: dict[str, dict], rows=None) -> str:
    """Rows = metrics, columns = runs (e.g. base, adapter) and, for two runs, the change."""
    names = list(runs)
    header = ["metric"] + names + (["change"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, fmt in rows or _ROWS:
        vals = [runs[n].get(key) for n in names]
        row = [label] + [_fmt(v, fmt) for v in vals]
        if len(names) == 2:
            a, b = vals
            if a is None or b is None or key == "n":
                row.append("")
            elif fmt == "pct":
                row.append(f"{100.0 * (b - a):+.1f} pt")
            else:  # the row's own precision, signed
                row.append(fmt.replace("{:", "{:+", 1).format(b - a))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_FREE_FORM_ROWS = [
    ("n", "samples", "{:d}"),
    ("predict_bleu-4", "BLEU-4", "{:.2f}"),
    ("predict_rouge-1", "ROUGE-1", "{:.2f}"),
    ("predict_rouge-2", "ROUGE-2", "{:.2f}"),
    ("predict_rouge-l", "ROUGE-L", "{:.2f}"),
    ("predict_samples_per_second", "samples/s", "{:.2f}"),
]


def load_eval_samples(dataset_dir: str, dataset: str, vocab, skip_invalid: bool = False, limit: int | None = None):
    """(samples, kind) of a comma list of datasets, every one checked before any model loads: the
    reader's checks, one kind of answer for all, and what scoring that kind needs (one image per
    action sample, a user turn before each scored answer). Raises ValueError naming file:line."""
    from training.answer_kinds import ACTIONS
    from training.freeform_eval import check_samples
    from training.sharegpt import DatasetInvalid, load_validated

    samples, kinds = [], {}
    for name in [n.strip() for n in dataset.split(",") if n.strip()]:
        try:
            got = load_validated(dataset_dir, name, vocab=vocab, skip_invalid=skip_invalid)
        except DatasetInvalid as e:
            raise ValueError(f"evaluation dataset {name!r}: {e}") from None
        kinds[name] = got.verdict.kind
        samples.extend(got)
    if len(set(kinds.values())) > 1:
        raise ValueError("evaluate action and free-form datasets separately: "
                         + ", ".join(f"{n}: {k}" for n, k in kinds.items()))
    if limit:
        samples = samples[: int(limit)]
    kind = next(iter(kinds.values()), ACTIONS)
    if kind == ACTIONS:
        from vla_node.prompt import PromptBuilder

        prompt = PromptBuilder(vocab)
        for s in samples:
            _sample_parts(s, prompt)
    else:
        check_samples(samples)
    return samples, kind


def evaluate(
    model: str,
    dataset_dir: str,
    dataset: str,
    adapter: str | None = None,
    compare_base: bool = False,
    out: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str = "auto",
    dtype: str = "auto",
    vocabulary: str | None = None,
    skip_invalid: bool = False,
    backend: str = "transformers",
    presence_check: bool = True,
) -> dict:
    """Run the evaluation; returns the metrics dict that metrics.json holds. ``out`` is written only
    when the whole evaluation succeeded (a failed run leaves no folder, an existing one untouched).
    ``backend`` "onnx": ``model`` is a `vla-export --onnx` folder (an adapter merged at export), served
    by the runtime's onnx backend, as a robot without torch would. ``presence_check``: the node's
    parameter (on by default, as the node runs; off scores the plans as the model answers them)."""
    import shutil
    import tempfile

    from training.answer_kinds import ACTIONS
    from vla_node.vocabulary import Vocabulary

    vocab = Vocabulary.load(vocabulary)
    samples, kind = load_eval_samples(dataset_dir, dataset, vocab, skip_invalid, limit)
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (available: {', '.join(EVAL_BACKENDS)})")
    if backend == "onnx" and adapter:
        raise ValueError("backend onnx serves an export with its adapter merged (vla-export --model M --adapter A "
                         "--onnx OUT): pass the export as the model, without an adapter")
    if backend == "onnx" and kind != ACTIONS:
        raise ValueError(f"backend onnx scores action datasets only; {dataset!r} holds {kind} answers "
                         "(free-form answers are generated with transformers)")
    runs_todo: list[tuple[str, bool]] = [("base", False), ("adapter", True)] if adapter and compare_base \
        else [("adapter" if adapter else "model", bool(adapter))]
    out_dir = Path(out) if out else None
    staging = None
    if out_dir:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} is a file")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if kind == ACTIONS:
            runs = _evaluate_actions(model, adapter, samples, runs_todo, staging, max_new_tokens, device, dtype,
                                     vocabulary, vocab, backend, presence_check)
        else:
            runs = _evaluate_free_form(model, adapter, samples, runs_todo, staging, max_new_tokens, device, dtype)
        result = {
            "dataset": {"dir": str(dataset_dir), "name": dataset, "samples": len(samples), "answers": kind},
            "model": str(model),
            "adapter": str(adapter) if adapter else None,
            "backend": backend,
            **({"presence_check": presence_check} if kind == ACTIONS else {}),
            "runs": runs,
        }
        if staging is not None:
            (staging / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
            title = f"# vla-eval: {dataset} ({len(samples)} samples)\n\nmodel: `{model}`" + (
                f"  \nadapter: `{adapter}`" if adapter else "") + (
                f"  \nbackend: {backend}" if backend != "transformers" else "") + "\n\n"
            (staging / "metrics.md").write_text(title + table_for(result), encoding="utf-8")
            _publish(staging, out_dir)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished files into out_dir (created if needed; other files in it are kept)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        item.replace(target)


def _run_folder(staging: Path | None, name: str, runs_todo) -> Path | None:
    """The last run (the adapter, or the model) writes LLaMA-Factory's files at the top, a base run
    compared with it into base/."""
    if staging is None:
        return None
    return staging if name == runs_todo[-1][0] else staging / name


def _evaluate_free_form(model, adapter, samples, runs_todo, staging, max_new_tokens, device, dtype) -> dict:
    from training.freeform_eval import FreeFormModel, run_predictions, write_predictions

    generator = FreeFormModel(str(model), adapter, device=device, dtype=dtype)
    runs: dict[str, dict] = {}
    for name, with_adapter in runs_todo:
        log.info("evaluating %s on %d free-form samples", name, len(samples))
        predictions, results = run_predictions(generator, samples, max_new_tokens, with_adapter)
        folder = _run_folder(staging, name, runs_todo)
        if folder is not None:
            write_predictions(folder, predictions, results)
        runs[name] = {"n": len(samples), **results}
    return runs


def _evaluate_actions(model, adapter, samples, runs_todo, staging, max_new_tokens, device, dtype, vocabulary,
                      vocab, backend_name: str = "transformers", presence_check: bool = True) -> dict:
    from training.freeform_eval import write_predictions
    from training.nlg_metrics import predict_results, sample_scores
    from vla_node.factory import RuntimeSettings, build_backend, build_core

    settings = RuntimeSettings(
        backend=backend_name,
        model_path=str(model),
        adapters=[f"{ADAPTER_NAME}={adapter}"] if adapter else [],
        active_adapter=ADAPTER_NAME if adapter else "",
        device=device,
        dtype=dtype,
        vocabulary_path=vocabulary or "",
        max_new_tokens=max_new_tokens,
        presence_check=presence_check,
    )
    backend = build_backend(settings, vocab)
    core = build_core(settings, backend=_Recorder(backend))
    # reference boxes are in the convention of the pixel limits the data was made for: the
    # adapter's (its manifest) when there is one, else the model's
    ref_limits = backend.pixel_limits
    runs: dict[str, dict] = {}
    try:
        for name, with_adapter in runs_todo:
            backend.set_adapter(ADAPTER_NAME if with_adapter else None)
            log.info("evaluating %s (%s) on %d samples", name, backend.adapter_id or backend.model_id, len(samples))
            folder = _run_folder(staging, name, runs_todo)
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            records: list = []
            started = time.perf_counter()
            runs[name] = evaluate_core(core, samples, ref_limits,
                                       staging / f"predictions_{name}.jsonl" if staging else None, records)
            runs[name]["model_id"] = backend.model_id
            runs[name]["adapter_id"] = backend.adapter_id
            if folder is not None:
                scores = [sample_scores(r.predict, r.label) for r in records]
                write_predictions(folder, records, predict_results(scores, time.perf_counter() - started,
                                                                   len(records), len(records)))
    finally:
        backend.close()
    return runs


def table_for(result: dict) -> str:
    """The before/after table of a metrics.json result (action or free-form rows)."""
    rows = _FREE_FORM_ROWS if result["dataset"].get("answers") == "text" else _ROWS
    return markdown_table(result["runs"], rows)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vla-eval",
        description="Evaluate a Qwen-VL checkpoint (+ LoRA adapter) on a ShareGPT split.\n\n"
        "Action datasets run through the robot's own inference path (vla_node.pipeline.InferenceCore +\n"
        "TransformersBackend; the live pipeline's stop-phrase shortcut is not used, the model answers every\n"
        "command): parse-valid rate, policy acceptance, plan exact match (verbs + labels), per-field\n"
        "accuracy, box IoU@0.5, CLARIFY precision/recall, BLEU-4 and ROUGE-L of the raw text, latency.\n"
        "Free-form datasets (answers that are not actions) are scored like LLaMA-Factory's do_predict:\n"
        "BLEU-4 and ROUGE-1/2/L of the generated last answer. Both write LLaMA-Factory's\n"
        "generated_predictions.jsonl and predict_results.json. Dataset problems are reported before any\n"
        "model loads, and a failed run leaves no --out folder.",
        epilog="example:\n  vla-eval --model models/tabletop-tiny --adapter out/lora --dataset-dir data "
        "--dataset tabletop_val --compare-base --out out/eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base (or merged) checkpoint directory")
    p.add_argument("--adapter", help="LoRA adapter directory (with vla_manifest.json)")
    p.add_argument("--dataset-dir", required=True, help="folder with dataset_info.json")
    p.add_argument("--dataset", required=True,
                   help="dataset name registered in dataset_info.json (a comma list of one kind of answer)")
    p.add_argument("--compare-base", action="store_true", help="also score the base model (adapter off) and tabulate both")
    p.add_argument("--out", help="write metrics.json, metrics.md, generated_predictions.jsonl, predict_results.json "
                                 "(base run: in base/) and, for action datasets, predictions_*.jsonl here")
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="generation budget (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: %(default)s)")
    p.add_argument("--vocabulary", help="actions.yaml (default: the packaged config/actions.yaml)")
    p.add_argument("--skip-invalid", action="store_true", help="drop invalid samples instead of failing")
    p.add_argument("--backend", choices=EVAL_BACKENDS, default="transformers",
                   help="transformers (default), or onnx: --model is a `vla-export --onnx` folder (an adapter merged "
                        "at export, a quantised decoder as exported), served by the node's onnx backend")
    p.add_argument("--no-presence-check", dest="presence_check", action="store_false",
                   help="score the plans as the model answers them, without the node's presence check (which asks "
                        "the model about each thing a multi-step plan names; models whose manifest says "
                        "count_questions)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if a.compare_base and not a.adapter:
        print("vla-eval: --compare-base needs --adapter", file=sys.stderr)
        return 2
    try:
        result = evaluate(a.model, a.dataset_dir, a.dataset, adapter=a.adapter, compare_base=a.compare_base,
                          out=a.out, limit=a.limit, max_new_tokens=a.max_new_tokens, device=a.device,
                          dtype=a.dtype, vocabulary=a.vocabulary, skip_invalid=a.skip_invalid, backend=a.backend,
                          presence_check=a.presence_check)
    except (ValueError, OSError) as e:
        print(f"vla-eval: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # BackendError and friends: one line, not a traceback
        if type(e).__name__ in ("BackendError", "ManifestError"):
            print(f"vla-eval: {e}", file=sys.stderr)
            return 1
        raise
    print(table_for(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
