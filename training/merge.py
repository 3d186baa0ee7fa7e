"""Merge a LoRA adapter into its base model (`vla-export --adapter`, and before an onnx export).

The result is an ordinary checkpoint (safetensors + config + generation config + processor) that
TransformersBackend (or any transformers / vLLM / llama.cpp converter) loads with no peft. The
adapter's manifest is checked against the base before merging and copied to the output as
``vla_manifest.json`` with a ``merged`` note (adapter path and weights sha256, base path), so the
export keeps its provenance; the processor is saved with the manifest's pixel limits, so the
merged model sees images exactly as the adapter did in training.

Merging is done in float32 (``--dtype`` casts the merged weights afterwards).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger("vla_export")

__all__ = ["DTYPES", "export_merged"]

DTYPES = ("float32", "bfloat16", "float16")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_merged(model: str, adapter: str, out: str, dtype: str = "float32", check_manifest: bool = True) -> Path:
    """Merge ``adapter`` into ``model`` and save the merged checkpoint to ``out``; returns ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training.collate import set_pixel_limits
    from vla_node import manifest as mf
    from vla_node.image import PixelLimits

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    model_dir, adapter_dir, out_dir = Path(model), Path(adapter), Path(out)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    if out_dir.resolve() in (model_dir.resolve(), adapter_dir.resolve()):
        raise ValueError("--out must be a new directory, not the model or adapter directory")

    manifest = None
    if mf.has_manifest(adapter_dir):
        manifest = mf.read_manifest(adapter_dir)
        if check_manifest:
            mf.check_adapter_against_base(manifest, model_dir, source=adapter_dir / mf.MANIFEST_NAME)
    else:
        log.warning("%s has no %s: merging without a compatibility check", adapter_dir, mf.MANIFEST_NAME)

    base = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if dtype != "float32":
        merged = merged.to(getattr(torch, dtype))
    merged.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))  # safetensors

    has_processor = any((adapter_dir / n).is_file() for n in ("processor_config.json", "preprocessor_config.json"))
    processor = AutoProcessor.from_pretrained(str(adapter_dir if has_processor else model_dir))
    if manifest is not None:
        ip = processor.image_processor
        factor = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))
        set_pixel_limits(processor, PixelLimits(manifest["image"]["min_pixels"], manifest["image"]["max_pixels"], factor))
    processor.save_pretrained(str(out_dir))

    if manifest is not None:
        weights = next((adapter_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                        if (adapter_dir / n).is_file()), None)
        note = dict(manifest)
        note["merged"] = {
            "adapter_path": str(adapter_dir),
            "adapter_weights_sha256": _sha256(weights) if weights else "",
            "base_path": str(model_dir),
            "dtype": dtype,
        }
        # the base's counting skill is the merged model's too, as it is with the adapter active unmerged
        # (the node's presence check asks either: vla_node/presence_check.py reads both answer forms)
        if mf.answers_count_questions(model_dir):
            note["count_questions"] = True
        mf.write_manifest(out_dir, note)
    log.info("merged %s into %s -> %s", adapter_dir, model_dir, out_dir)
    return out_dir
