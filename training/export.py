"""`vla-export`: a LoRA adapter merged into its base model (training.merge), or a model (with
its adapter merged first) exported for onnxruntime (training.onnx_export).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from training.merge import DTYPES, export_merged

__all__ = ["export_merged", "main"]


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vla-export",
        description="Merge a LoRA adapter into its base Qwen-VL model (peft merge_and_unload) and save a plain\n"
        "safetensors checkpoint + processor + vla_manifest.json (with a 'merged' note) that loads\n"
        "without peft. The adapter's manifest is checked against the base first.",
        epilog="examples:\n  vla-export --model models/tabletop-tiny --adapter out/lora --out out/merged\n"
        "  vla-export --model models/tabletop-tiny --onnx out/tabletop-tiny-onnx   # for backend: onnx\n"
        "  vla-export --model models/tabletop-tiny --onnx out/tabletop-tiny-int4 --quantize int4   # for a CPU robot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base checkpoint directory the adapter was trained on")
    p.add_argument("--adapter", help="LoRA adapter directory (adapter_config.json); optional with --onnx")
    p.add_argument("--out", help="output directory for the merged checkpoint")
    p.add_argument("--onnx", metavar="OUT",
                   help="instead: export to an onnxruntime folder OUT (vision encoder + KV-cache decoder + "
                        "tokenizer + manifest; the adapter, if given, is merged first). Qwen2-VL, Qwen2.5-VL, Qwen3-VL")
    p.add_argument("--quantize", choices=("int4",),
                   help="with --onnx: store the decoder's weights in 4 bits (onnxruntime MatMulNBits, blocks of 32, "
                        "int8 activations): about 2x faster decoding on a CPU; the vision encoder stays float32")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights (default: %(default)s)")
    p.add_argument("--no-manifest-check", action="store_true",
                   help="merge even if the adapter's manifest does not match the base model")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser()
    a = parser.parse_args(argv)
    if a.onnx is None and (a.adapter is None or a.out is None):
        parser.error("--adapter and --out are required (or use --onnx OUT)")
    if a.quantize and a.onnx is None:
        parser.error("--quantize applies to --onnx exports only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if a.onnx is not None:
        from training.onnx_export import export_onnx

        try:
            onnx_dir = export_onnx(a.model, a.onnx, adapter=a.adapter, quantize=a.quantize)
        except (ValueError, OSError) as e:  # OnnxExportError is a ValueError
            print(f"vla-export: {e}", file=sys.stderr)
            return 1
        print(json.dumps({"onnx": str(onnx_dir)}))
        return 0
    try:
        out = export_merged(a.model, a.adapter, a.out, dtype=a.dtype, check_manifest=not a.no_manifest_check)
    except (ValueError, OSError) as e:  # ManifestError is a ValueError
        print(f"vla-export: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"merged": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
