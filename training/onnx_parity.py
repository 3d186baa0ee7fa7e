"""Greedy-token parity between the torch TransformersBackend and an ONNX export, on held-out commands.

Used by tests/test_onnx_backend.py (a few commands) and benchmarks/onnx_vs_torch.py (100 commands).
Images go through vla_node.image.fit_to_limits first, as the pipeline feeds every backend.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["HeldoutCommand", "heldout_commands", "torch_greedy_ids", "compare_greedy"]


@dataclass
class HeldoutCommand:
    language: str
    image: np.ndarray  # RGB uint8, as recorded (not yet fitted)
    messages: list[dict]  # chat messages (system + user with the image), no answer


def heldout_commands(models_dir: Path, workdir: Path, count: int) -> list[HeldoutCommand]:
    """``count`` held-out commands, half English, half Chinese (models/heldout/test_{en,zh}.json)."""
    from training.collate import load_rgb
    from training.heldout import materialise_heldout
    from vla_node.factory import EMBEDDED_MODEL
    from vla_node.manifest import prompt_template_of
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    builder = PromptBuilder(Vocabulary.load(None), template=prompt_template_of(Path(models_dir) / EMBEDDED_MODEL))
    per_language = {"en": count - count // 2, "zh": count // 2}
    commands: list[HeldoutCommand] = []
    for language, n in per_language.items():
        if n == 0:
            continue
        out = materialise_heldout(Path(models_dir) / "heldout" / f"test_{language}.json",
                                  Path(workdir) / language, limit=n)
        samples = json.loads((out / "test.json").read_text(encoding="utf-8"))
        for sample in samples[:n]:
            # the system prompt the node sends this model (its manifest's template), not the sample's own
            # (the full one the generator writes): the model was trained on the node's
            user = [m for m in sample["messages"] if m["role"] not in ("system", "assistant")]
            chat = builder.chat_from_sharegpt([{"role": "system", "content": builder.system_text}, *user])
            commands.append(HeldoutCommand(language, load_rgb(out / sample["images"][0]), chat))
    return commands


def torch_greedy_ids(backend, image: np.ndarray, messages: list[dict], max_new_tokens: int) -> list[int]:
    """Greedy new-token ids from a TransformersBackend (same inputs and stop ids as its generate)."""
    import torch

    inputs = backend.prepare_inputs(image, messages)
    with torch.inference_mode():
        out = backend.base_model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                          eos_token_id=list(backend.loaded.eos_ids), pad_token_id=backend.loaded.pad_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def compare_greedy(torch_backend, onnx_backend, commands: list[HeldoutCommand], max_new_tokens: int) -> dict:
    """{'commands', 'identical', 'mismatches': [(index, torch_ids, onnx_ids)], 'tokens'}."""
    from vla_node.image import fit_to_limits

    mismatches = []
    tokens = 0
    for index, command in enumerate(commands):
        image = fit_to_limits(command.image, torch_backend.pixel_limits)
        expected = torch_greedy_ids(torch_backend, image, command.messages, max_new_tokens)
        got = onnx_backend.generate_ids(image, command.messages, max_new_tokens)
        tokens += len(expected)
        if expected != got:
            mismatches.append((index, expected, got))
    return {"commands": len(commands), "identical": len(commands) - len(mismatches),
            "mismatches": mismatches, "tokens": tokens}
