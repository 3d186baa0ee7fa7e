"""The first stage of the embedded model's curriculum: its commands and answers without pictures.

On the same commands without their pictures, the answers without boxes, a model trained from
scratch learns the command language at a fraction of a pictured step's cost. It looked like the
lever for reading the command while batches were length-sorted (one verb per batch); with batches
drawn at random, the pictured training alone reads the command as well per step, so
`build_embedded --text-steps` is 0 by default (benchmarks/results/command_reading_cpu.txt). The
samples are the rendered dataset's own (same synth options and indices), drawn without rendering:
seconds for ~100k samples.
"""
from __future__ import annotations

from pathlib import Path

from training.synth import SynthConfig, Synthesizer
from vla_node.actions import render_steps
from vla_node.dataset_format import Row, write_sharegpt
from vla_node.parser import parse_actions
from vla_node.prompt import IMAGE_PLACEHOLDER

__all__ = ["write_text_stage"]


def _without_picture(messages: list[dict], synthesizer: Synthesizer) -> list[dict]:
    """The user turn without its image tag, the answer without its boxes (parsed, written again)."""
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] == "user":
            content = content.replace(IMAGE_PLACEHOLDER, "")
        elif message["role"] == "assistant":
            steps = parse_actions(content, synthesizer.vocab, synthesizer.codec)
            content = render_steps([step.model_copy(update={"object_box": None, "destination_box": None})
                                    for step in steps], synthesizer.vocab)
        out.append({**message, "content": content})
    return out


def write_text_stage(out: Path, cfg: SynthConfig, workers: int = 1, splits: tuple[str, ...] = ("train", "val"),
                     prefix: str = "tabletop") -> Path:
    """Write ``<prefix>_<split>`` datasets (LLaMA-Factory ShareGPT, no images column content, action
    answers without boxes) of cfg's samples to ``out``; returns out. Skipped when already written."""
    out = Path(out)
    if (out / "dataset_info.json").is_file():
        return out
    synthesizer = Synthesizer(cfg, None)  # cfg's own boxes: they steer the draws, so the samples stay the same
    indices = synthesizer.splits()
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for split in splits:
        rows = [Row(_without_picture(messages, synthesizer))
                for messages in synthesizer.texts(indices[split], workers=workers)]
        write_sharegpt(partial / f"{split}.json", rows, dataset_info_name=f"{prefix}_{split}", answers="actions")
    partial.rename(out)  # complete or absent: a rerun never trains on half a dataset
    return out
