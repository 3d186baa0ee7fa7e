"""`vla-data`: check LLaMA-Factory ShareGPT datasets before training, and make synthetic ones.

    vla-data check data/ --dataset tabletop_train --actions
    vla-data check my_set.jsonl
    vla-data synth data/tabletop --num 2000 --seed 0 --languages en,zh
    vla-data synth-vqa data/tabletop_vqa --num 240      # free-form: "What is on the table?"
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "estimate_tokens"]

_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


def estimate_tokens(text: str) -> int:
    """Rough text-token count without a tokenizer: one per CJK character, one per 4 other characters."""
    cjk = len(_CJK.findall(text))
    return cjk + (len(text) - cjk + 3) // 4


def _token_counter(tokenizer_dir: Optional[str]):
    """(count function, description) — the tokenizer's when given, else the estimate."""
    if not tokenizer_dir:
        return estimate_tokens, "estimated: 1 per CJK character + 1 per 4 other characters; pass --tokenizer DIR to count"
    path = Path(tokenizer_dir)
    tok_file = path / "tokenizer.json" if path.is_dir() else path
    if tok_file.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        return (lambda text: len(tok.encode(text, add_special_tokens=False).ids)), f"counted with {tok_file}"
    from transformers import AutoTokenizer  # a directory without tokenizer.json (slow tokenizer files)

    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return (lambda text: len(hf(text, add_special_tokens=False)["input_ids"])), f"counted with {path}"


def _datasets_of(path: Path, dataset: Optional[str]) -> list[Optional[str]]:
    """The dataset names to check: the one given, every sharegpt entry of a directory, or a file.
    Raises DatasetInvalid (dataset_info.json problems)."""
    from training.sharegpt import DATASET_INFO, DataError, DatasetInvalid, read_dataset_info

    if dataset is not None:
        return [dataset]
    if path.is_dir() or path.name == DATASET_INFO:
        info, _ = read_dataset_info(path if path.is_dir() else path.parent)
        names = [n for n, e in info.items() if isinstance(e, dict) and not e.get("ranking")
                 and e.get("formatting", "alpaca") in ("sharegpt", "openai", "alpaca")]
        if not names:
            where = str((path if path.is_dir() else path.parent) / DATASET_INFO)
            raise DatasetInvalid([DataError(where, 1, 1, "registers no dataset vla-data can read (sharegpt, openai or alpaca); pass --dataset NAME")])
        return names
    return [None]


def _check(args) -> int:
    from training.answer_kinds import ACTIONS, classify
    from training.sharegpt import DatasetInvalid, read_samples, validate_sample
    from vla_node.vocabulary import Vocabulary

    vocab = Vocabulary.load(args.vocab)
    count_tokens, how = _token_counter(args.tokenizer)
    path = Path(args.path)
    if not path.exists():
        print(f"{path}: no such file or directory", file=sys.stderr)
        return 2
    try:
        names = _datasets_of(path, args.dataset)
    except DatasetInvalid as e:
        for err in e.errors:
            print(str(err))
        return 1
    from vla_node.prompt import PromptBuilder

    system_text = PromptBuilder(vocab).system_text
    total_errors = 0
    shown = 0
    usable = True
    for name in names:
        try:
            samples, errors = read_samples(path, dataset=name)
        except DatasetInvalid as e:
            errors, samples = e.errors, []
        bad_samples = {e.file + ":" + str(e.line) for e in errors}
        errors = list(errors)
        declared = ACTIONS if args.actions else next(
            (s._where.mapping.answers for s in samples if s._where is not None), None)
        try:
            verdict = classify((a for s in samples for a in s.answers), vocab, declared)
        except ValueError as e:
            print(f"{path} [{name}]: {e}")
            usable = False
            continue
        check_vocab = vocab if verdict.answers_need_checking else None
        cache: dict = {}
        valid = 0
        for s in samples:
            errs = validate_sample(s, check_vocab, not args.no_images, cache)
            if verdict.typo_hint:
                errs = [replace(e, message=e.message + verdict.typo_hint) if "action parser" in e.message else e
                        for e in errs]
            if errs:
                errors.extend(errs)
            else:
                valid += 1
        dropped = len(samples) - valid + len(bad_samples)
        turns = sum(1 for s in samples for m in s.messages if m["role"] == "assistant")
        images = sum(len(s.images) for s in samples)
        unique = len({str(p) for s in samples for p in s.images})
        text_tokens = sum(count_tokens(m["content"]) for s in samples for m in s.messages)
        answer_tokens = sum(count_tokens(m["content"]) for s in samples for m in s.messages
                            if m["role"] == "assistant")
        label = f"{path}" + (f" [{name}]" if name else "")
        print(f"{label}")
        print(f"  samples: {len(samples)} read, {valid} valid")
        print(f"  turns (assistant answers): {turns}")
        print(f"  images: {images} ({unique} distinct files)")
        print(f"  text tokens: {text_tokens} total, {answer_tokens} in answers "
              f"(image tokens not included; {how})")
        print("  answers: " + ("actions (--actions)" if args.actions else verdict.describe()))
        if verdict.kind == ACTIONS:
            print("  answers checked with vla_node.parser.parse_actions")
            other = sum(1 for s in samples if not s.messages or s.messages[0]["role"] != "system"
                        or s.messages[0]["content"] != system_text)
            if other:
                print(f"  note: {other} sample(s) have a system prompt other than vla_node.prompt's "
                      "(serving always uses vla_node.prompt's; train on the same text to avoid drift)")
        for e in errors:
            if shown < args.max_errors:
                print(str(e))
                shown += 1
        total_errors += len(errors)
        if errors:
            print(f"  errors: {len(errors)}")
            fatal = any(e.fatal for e in errors)
            if args.skip_invalid:
                if fatal or valid == 0:
                    print("  --skip-invalid cannot help: " + ("the file cannot be read to its end" if fatal
                                                               else "no valid sample is left"))
                    usable = False
                else:
                    print(f"  --skip-invalid: {dropped} invalid sample(s) would be dropped, {valid} kept")
            else:
                usable = False
    if total_errors > shown:
        print(f"... and {total_errors - shown} more error(s) (raise --max-errors to see them)")
    if total_errors == 0:
        print("OK: no errors")
    return 0 if usable else 1


def _synth(args) -> int:
    from training.synth import SynthConfig, SynthError, generate_dataset, parse_size

    try:
        cfg = SynthConfig(
            num=args.num, seed=args.seed, size=parse_size(args.size),
            languages=tuple(x.strip() for x in args.languages.split(",") if x.strip()),
            val_frac=args.val_frac, test_frac=args.test_frac,
            skills=tuple(x.strip() for x in args.skills.split(",") if x.strip()),
            objects=tuple(x.strip() for x in args.objects.split(",") if x.strip()) if args.objects else None,
            destinations=(tuple(x.strip() for x in args.destinations.split(",") if x.strip())
                          if args.destinations else None),
            boxes=args.boxes, vocab_path=args.vocab, name_prefix=args.name_prefix,
            max_objects=args.max_objects, max_containers=args.max_containers,
            missing_rate=args.missing_rate, missing_lookalikes=args.missing_lookalikes,
            **_pixel_limits(args),
        )
        report = generate_dataset(args.out_dir, cfg, overwrite=args.overwrite, workers=args.workers)
    except SynthError as e:
        print(f"vla-data synth: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _synth_vqa(args) -> int:
    from training.synth import SynthError, parse_size
    from training.synth_vqa import VQAConfig, generate_vqa_dataset

    try:
        counts = generate_vqa_dataset(args.out_dir, VQAConfig(
            num=args.num, seed=args.seed, size=parse_size(args.size), val_frac=args.val_frac,
            languages=tuple(x.strip() for x in args.languages.split(",") if x.strip())))
    except SynthError as e:
        print(f"vla-data synth-vqa: {e}", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} free-form samples to {args.out_dir}: "
          + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


def _pixel_limits(args) -> dict:
    """min/max pixels and factor: a processor's preprocessor_config.json, then explicit flags."""
    out: dict = {}
    if args.processor:
        import json

        cfg_file = Path(args.processor)
        if cfg_file.is_dir():
            cfg_file = cfg_file / "preprocessor_config.json"
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
        size = data.get("size") or {}
        mn = size.get("shortest_edge", data.get("min_pixels"))
        mx = size.get("longest_edge", data.get("max_pixels"))
        if mn is not None:
            out["min_pixels"] = int(mn)
        if mx is not None:
            out["max_pixels"] = int(mx)
        out["factor"] = int(data.get("patch_size", 14)) * int(data.get("merge_size", 2))
    if args.min_pixels is not None:
        out["min_pixels"] = args.min_pixels
    if args.max_pixels is not None:
        out["max_pixels"] = args.max_pixels
    if args.factor is not None:
        out["factor"] = args.factor
    return out


def _scene_arguments(parser, out_help: str, num: int, val_frac: float, languages: str) -> None:
    """The options both generators of drawn scenes take."""
    parser.add_argument("out_dir", metavar="OUT_DIR", help=out_help)
    parser.add_argument("--num", type=int, default=num, help=f"number of samples in all splits (default {num})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", default="320x240", metavar="WxH", help="image size in pixels (default 320x240)")
    parser.add_argument("--languages", default="en,zh", help=f"comma-separated {languages}: en, zh (default en,zh)")
    parser.add_argument("--val-frac", type=float, default=val_frac,
                        help=f"fraction of samples in val (default {val_frac})")


def build_parser() -> argparse.ArgumentParser:
    from training.synth import BOX_MODES, SKILLS

    p = argparse.ArgumentParser(
        prog="vla-data",
        description="Check LLaMA-Factory ShareGPT datasets before training, or generate synthetic tabletop data.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "check", help="validate a dataset; every problem is printed as file:line:col",
        description="Read a ShareGPT dataset (JSON array or JSONL; messages/role/content or "
                    "conversations/from/value) the way LLaMA-Factory would, and report every problem as "
                    "file:line:col: samples that do not parse, <image> tags that do not match the images, "
                    "missing or undecodable images, roles out of order, empty answers, video or audio (refused), "
                    "and in an action dataset the answers the vla_node action parser rejects. A dataset is an "
                    "action dataset when dataset_info.json declares it (\"vla_answers\": \"actions\"), with "
                    "--actions, or when more than half of its answers parse as actions (then the others are "
                    "likely typos); otherwise its answers are free-form text, as vla-train reads it. Prints a "
                    "summary (samples, turns, images, text tokens, kind of answer). Exit status 1 when there "
                    "are errors (see --skip-invalid), 0 otherwise.")
    c.add_argument("path", metavar="PATH",
                   help="a .json/.jsonl file, or a dataset directory with dataset_info.json (without "
                        "--dataset every sharegpt dataset registered there is checked)")
    c.add_argument("--dataset", metavar="NAME", help="dataset name registered in PATH/dataset_info.json")
    c.add_argument("--actions", action="store_true",
                   help="treat every dataset as an action dataset: parse every assistant answer with "
                        "vla_node.parser.parse_actions")
    c.add_argument("--vocab", metavar="YAML", help="action vocabulary (default: config/actions.yaml)")
    c.add_argument("--skip-invalid", action="store_true",
                   help="exit 0 when the invalid samples could simply be dropped (as vla-train's "
                        "skip_invalid does); errors are still printed with the count that would be dropped")
    c.add_argument("--max-errors", type=int, default=50, metavar="N",
                   help="print at most N errors (default 50); the total is always reported")
    c.add_argument("--tokenizer", metavar="DIR",
                   help="count text tokens with this tokenizer (a tokenizer.json or a checkpoint directory); "
                        "without it the count is an estimate")
    c.add_argument("--no-images", action="store_true", help="do not open the images (faster; existence not checked)")
    c.set_defaults(func=_check)

    s = sub.add_parser(
        "synth", help="generate a synthetic tabletop dataset (images + train/val/test ShareGPT JSON)",
        description="Draw tabletop scenes with OpenCV and write English/Chinese commands with their action "
                    "answers (rendered by vla_node.actions, prompts by vla_node.prompt) as LLaMA-Factory "
                    "ShareGPT files: OUT_DIR/images/*.png, train.json, val.json, test.json, dataset_info.json "
                    "(registering <prefix>_train, <prefix>_val, <prefix>_test) and synth_config.json. "
                    "The same options and seed give byte-identical files.")
    _scene_arguments(s, "output directory (must be empty unless --overwrite)", num=1000, val_frac=0.1,
                     languages="command languages")
    s.add_argument("--test-frac", type=float, default=0.1, help="fraction of samples in test (default 0.1)")
    s.add_argument("--skills", default=",".join(SKILLS),
                   help=f"comma-separated subset of {','.join(SKILLS)} (default: all)")
    s.add_argument("--objects", metavar="LABELS",
                   help="comma-separated object labels to use (default: every drawable label in the vocabulary)")
    s.add_argument("--destinations", metavar="LABELS",
                   help="comma-separated destination labels to use (default: every drawable one)")
    s.add_argument("--boxes", choices=BOX_MODES, default="none",
                   help="boxes in the answers: none (default; tiny models learn faster), absolute_resized "
                        "(Qwen2/2.5-VL: pixels of the processor-resized image, see --processor), "
                        "normalized_1000 (Qwen3-VL)")
    s.add_argument("--processor", metavar="DIR",
                   help="read min/max pixels and patch factor from DIR/preprocessor_config.json "
                        "(for --boxes absolute_resized)")
    s.add_argument("--min-pixels", type=int, help="processor min_pixels for absolute_resized (default 3136)")
    s.add_argument("--max-pixels", type=int, help="processor max_pixels for absolute_resized (default 1003520)")
    s.add_argument("--factor", type=int, help="patch_size*merge_size for absolute_resized (default 28; Qwen3-VL 32)")
    s.add_argument("--vocab", metavar="YAML", help="action vocabulary (default: config/actions.yaml)")
    s.add_argument("--max-objects", type=int, metavar="N",
                   help="at most N objects per scene beyond those a command needs (default: 1-5 drawn)")
    s.add_argument("--max-containers", type=int, metavar="N",
                   help="at most N containers per scene beyond those a command needs (default: 1-3 drawn)")
    s.add_argument("--missing-rate", type=float, default=0.2, metavar="P",
                   help="with the clarify skill: how often a multi-step command names one thing the scene lacks "
                        "(answered CLARIFY) (default %(default)s)")
    s.add_argument("--missing-lookalikes", action="store_true",
                   help="that absent thing shares a colour or shape with one on the table (hard negatives)")
    s.add_argument("--name-prefix", default="tabletop", help="dataset name prefix in dataset_info.json (default tabletop)")
    s.add_argument("--overwrite", action="store_true", help="replace a previous synth output in OUT_DIR")
    s.add_argument("--workers", type=int, default=1,
                   help="processes drawing and encoding scenes (output is identical for any count)")
    s.set_defaults(func=_synth)

    q = sub.add_parser(
        "synth-vqa", help="generate a free-form dataset: \"What is on the table?\" answered in words",
        description="Draw training.synth's table-top scenes and ask what is on the table; the answer names every "
                    "object and container from left to right (English or Chinese, as the question). Writes "
                    "OUT_DIR/images/*.png, vqa_train.json, vqa_val.json and dataset_info.json registering "
                    "tabletop_vqa_train and tabletop_vqa_val as free-form (\"vla_answers\": \"text\").")
    _scene_arguments(q, "output directory", num=240, val_frac=0.2, languages="question languages")
    q.set_defaults(func=_synth_vqa)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
