"""Held-out splits stored as recipes: the synth options and the test indices, not the images.

A synthetic sample depends on (seed, index) alone (training.synth), so the exact held-out
samples of a training run can be re-created anywhere in seconds, for evaluation and tests,
without committing their images.
"""
from __future__ import annotations

import json
from dataclasses import asdict
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


def materialise_heldout(spec_path: Path, out_dir: Path, limit: int | None = None, workers: int = 1) -> Path:
    """Write the first `limit` held-out samples of a spec as a LLaMA-Factory dataset dir
    (dataset name ``tabletop_test``); returns out_dir."""
    cfg, indices = read_heldout_spec(spec_path)
    if limit is not None:
        indices = indices[:limit]
    generate_dataset(out_dir, cfg, overwrite=True, workers=workers, only={"test": indices})
    return Path(out_dir)
