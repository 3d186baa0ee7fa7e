"""What 4-bit decoder weights cost and buy: the embedded model exported for backend onnx in float32
and with `--quantize int4`, scored on the same held-out commands through `vla-eval --backend onnx`.

    source scripts/env.sh && python benchmarks/onnx_int4.py [--limit 400]

English commands go to the base model's exports, Chinese ones to the exports with the Chinese
adapter merged (as the node serves them). Per split: the held-out metrics of both exports, how many
answers are identical word for word, and the p50 command latency of each (vla-eval's: the
runtime's InferenceCore on onnxruntime with its default thread count, as the node runs it; both
runs on the same machine one after the other, so compare the ratio; benchmarks/cpu_latency.py
--int4 interleaves them on 1 thread).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = ("plan_exact_match", "object_acc", "destination_acc", "box_iou50", "clarify_precision", "clarify_recall",
        "parse_valid_rate", "latency_p50_ms")


def answers(folder: Path) -> list[str]:
    lines = (folder / "predictions_model.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["raw_text"] for line in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(ROOT / "models"), help="folder with the embedded model + heldout/")
    parser.add_argument("--limit", type=int, default=400, help="held-out commands per language (default %(default)s)")
    args = parser.parse_args(argv)

    import onnxruntime

    from training.evaluate import evaluate
    from training.heldout import input_factor, materialise_heldout
    from training.onnx_export import export_onnx

    models = Path(args.models)
    base, adapter = models / "tabletop-tiny", models / "tabletop-tiny-zh-lora"
    print(f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, default intra-op threads; "
          f"{os.cpu_count()} logical cores; greedy, constrained decoding (the node's default)")
    with tempfile.TemporaryDirectory(prefix="onnx_int4_") as tmp:
        work = Path(tmp)
        for split, merged in (("test_en", None), ("test_zh", adapter)):
            data = materialise_heldout(models / "heldout" / f"{split}.json", work / split, limit=args.limit,
                                       factor=input_factor(base))
            results, texts = {}, {}
            for scheme in ("float32", "int4"):
                export = work / f"{split}-{scheme}"
                export_onnx(str(base), str(export), adapter=str(merged) if merged else None,
                            quantize=None if scheme == "float32" else scheme)
                out = work / f"{split}-{scheme}-eval"
                result = evaluate(str(export), str(data), "tabletop_test", out=str(out), limit=args.limit,
                                  device="cpu", backend="onnx")
                results[scheme] = result["runs"]["model"]
                texts[scheme] = answers(out)
                results[scheme]["decoder_mb"] = (export / "decoder.onnx").stat().st_size / 1e6
            same = sum(a == b for a, b in zip(texts["float32"], texts["int4"]))
            print(f"\n{split} ({'base + ' + merged.name + ' merged' if merged else 'base'}), "
                  f"{results['float32']['n']} commands:")
            print(f"  {'metric':<20s} {'float32':>9s} {'int4':>9s}")
            for row in (*ROWS, "decoder_mb"):
                a, b = results["float32"].get(row), results["int4"].get(row)
                digits = 1 if row in ("latency_p50_ms", "decoder_mb") else 4
                print(f"  {row:<20s} {a:9.{digits}f} {b:9.{digits}f}" if a is not None
                      else f"  {row:<20s} {'-':>9s} {'-':>9s}")
            ratio = results["float32"]["latency_p50_ms"] / results["int4"]["latency_p50_ms"]
            print(f"  answers identical word for word: {same}/{len(texts['int4'])}; "
                  f"p50 float32 / p50 int4: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
