"""A checkpoint folder made from another one (training.widen_vision, training.deepen): what is carried
over, and a folder that appears whole or not at all."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["NOT_CARRIED", "carried_files", "partial_folder", "move_into_place"]

# the source's own training records and weights: not the derived checkpoint's
NOT_CARRIED = {"train_config.json", "train_results.json", "all_results.json", "eval_results.json",
               "trainer_state.json", "log_history.json", "model.safetensors.index.json"}
_NOT_CARRIED_SUFFIXES = (".safetensors", ".png", ".bin")  # weights and loss curves


def carried_files(source: Path) -> Iterator[Path]:
    """The source's files a derived checkpoint starts from: tokenizer, chat template, configs, manifest."""
    for item in sorted(Path(source).iterdir()):
        if item.is_file() and item.suffix not in _NOT_CARRIED_SUFFIXES and item.name not in NOT_CARRIED:
            yield item


def partial_folder(source: Path, out: Path, overwrite: bool, error: type[Exception], made: str) -> Path:
    """An empty OUT.partial to write into, once ``out`` is known not to be ``source`` and not to exist
    (unless ``overwrite``); ``error`` (the caller's exception type) says otherwise. ``made``: e.g. "deeper"."""
    if Path(out).resolve() == Path(source).resolve():
        raise error(f"--out {out} is the source checkpoint: write the {made} one elsewhere")
    if Path(out).exists() and not overwrite:
        raise error(f"{out} exists; remove it or pass overwrite (--overwrite)")
    partial = Path(out).with_name(Path(out).name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def move_into_place(partial: Path, out: Path) -> Path:
    """The written folder at ``out`` (an older one replaced), in one rename."""
    if Path(out).exists():
        shutil.rmtree(out)
    Path(partial).rename(out)
    return Path(out)
