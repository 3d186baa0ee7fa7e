"""Held-out splits stored as recipes: the synth options and the test indices, not the images.

A synthetic sample depends on (seed, index) alone (training.synth), so the exact held-out
samples of a training run can be re-created anywhere in seconds, for evaluation and tests,
without committing their images.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from training.synth import SynthConfig, Synthesizer, generate_dataset

SPEC_VERSION = 1


def write_heldout_spec(path: Path, cfg: SynthConfig, split: str = "test") -> Path:
    """Record cfg and the indices of its `split` (never trained on) in a small JSON file."""
    indices = Synthesizer(cfg, None).splits()[split]
    spec = {"spec_version": SPEC_VERSION, "generator": "training.synth", "split": split,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "indices": indices}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_heldout_spec(spec_path: Path) -> tuple[SynthConfig, list[int]]:
    """The synth options and held-out indices recorded by write_heldout_spec."""
    try:
        spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        if spec.get("spec_version") != SPEC_VERSION:
            raise ValueError(f"spec_version {spec.get('spec_version')!r}, this code reads {SPEC_VERSION}")
        fields = dict(spec["config"])
        for key in ("size", "languages", "skills", "objects", "destinations"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        cfg = SynthConfig(**fields)
        indices = [int(i) for i in spec["indices"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{spec_path}: not a held-out spec ({exc})") from exc
    return cfg, indices


def input_factor(model_dir: Path) -> int:
    """patch_size x spatial_merge_size of a Qwen-VL checkpoint: the multiple its input frame is resized
    to, in whose pixels an absolute_resized answer writes its boxes."""
    path = Path(model_dir) / "config.json"
    try:
        vision = json.loads(path.read_text(encoding="utf-8"))["vision_config"]
        return int(vision["patch_size"]) * int(vision["spatial_merge_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: no vision_config patch_size and spatial_merge_size ({exc})") from exc


def materialise_heldout(spec_path: Path, out_dir: Path, limit: int | None = None, workers: int = 1,
                        factor: int | None = None) -> Path:
    """Write the first `limit` held-out samples of a spec as a LLaMA-Factory dataset dir
    (dataset name ``tabletop_test``); returns out_dir. ``factor``: the boxes for a model whose input
    frame is resized to that multiple (input_factor) instead of the spec's; the scenes and commands
    are the same (the factor decides the boxes' frame only)."""
    cfg, indices = read_heldout_spec(spec_path)
    if factor is not None:
        cfg = replace(cfg, factor=int(factor))
    if limit is not None:
        indices = indices[:limit]
    generate_dataset(out_dir, cfg, overwrite=True, workers=workers, only={"test": indices})
    return Path(out_dir)
