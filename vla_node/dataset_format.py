"""LLaMA-Factory ShareGPT files as this project writes them: one row per conversation, image
paths, and the dataset's registration in dataset_info.json.

Written by `vla-replay --export-dataset` (vla_node.report) and `vla-data synth`; read back and
validated, with file:line:col errors, by training.sharegpt. It lives in the runtime package
because the replay tool writes datasets and the runtime never imports training.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from vla_node.files import atomic_write_text

ANSWERS_MARKER = "vla_answers"  # the dataset_info.json key declaring a dataset's kind of answer

DATASET_INFO = "dataset_info.json"


class Conversation(Protocol):
    """A sample to write (training.sharegpt.Sample is one): normalised messages and image paths."""

    messages: list[dict]  # {"role": "user" | "assistant" | "system", "content": str}
    images: list[Path]


@dataclass
class Row:
    """The plain Conversation, for writers that have no training.sharegpt.Sample."""

    messages: list[dict]
    images: list[Path] = field(default_factory=list)


def sharegpt_registration(file_name: str, answers: str | None = None) -> dict:
    """The entry write_sharegpt adds to dataset_info.json (LLaMA-Factory's sharegpt columns and tags);
    ``answers`` ("actions" | "text") declares the dataset's kind of answer (ANSWERS_MARKER, read by
    training.answer_kinds; LLaMA-Factory ignores the key)."""
    marker = {ANSWERS_MARKER: answers} if answers else {}
    return {
        "file_name": file_name,
        **marker,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "observation_tag": "observation",
                 "function_tag": "function", "system_tag": "system"},
    }


def _image_ref(p: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(Path(p).resolve(), base.resolve())).as_posix() \
            if Path(p).resolve().is_relative_to(base.resolve()) else str(Path(p).resolve())
    except ValueError:  # other drive (Windows)
        return str(Path(p).resolve())


def _registrations(info_path: Path) -> dict:
    """The datasets already registered next to the file (kept when one is (re-)registered)."""
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_path}:1:1: dataset_info.json must be an object of datasets")
    return info


def write_sharegpt(path: str | os.PathLike, samples: Iterable[Conversation],
                   dataset_info_name: str | None = None, answers: str | None = None) -> Path:
    """Write samples as LLaMA-Factory ShareGPT (``messages``/``role``/``content``, ``images``).

    ``.jsonl`` -> one sample per line; anything else -> a JSON array with one sample per line
    (sample i is on line i + 2). Image paths are written relative to the file's directory when
    inside it (LLaMA-Factory's media_dir default), else absolute. With ``dataset_info_name`` the
    dataset is (re-)registered in dataset_info.json next to the file, other entries kept, its kind
    of answer declared when ``answers`` is given. Output is deterministic (same samples -> same bytes).
    """
    path = Path(path)
    base = path.parent
    rows = []
    for s in samples:
        row: dict[str, Any] = {"messages": [{"role": m["role"], "content": m["content"]} for m in s.messages]}
        row["images"] = [_image_ref(Path(p), base) for p in s.images]
        rows.append(json.dumps(row, ensure_ascii=False))
    if path.suffix == ".jsonl":
        text = "".join(r + "\n" for r in rows)
    else:
        text = "[\n" + ",\n".join(rows) + "\n]\n" if rows else "[]\n"
    atomic_write_text(path, text)
    if dataset_info_name:
        info_path = base / DATASET_INFO
        info = _registrations(info_path)
        info[dataset_info_name] = sharegpt_registration(path.name, answers)
        atomic_write_text(info_path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return path
