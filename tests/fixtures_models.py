"""Reusable pytest fixtures: tiny Qwen-VL checkpoints and LoRA adapters (built once per session).

Use from tests/conftest.py with ``from tests.fixtures_models import *`` (or import the fixtures
you need into a test module). Everything is made locally; nothing touches a model hub.

Fixtures (session scope):
    tiny_checkpoints      dict family -> Path, built lazily (``tiny_checkpoints["qwen3_vl"]``)
    tiny_qwen2_vl / tiny_qwen2_5_vl / tiny_qwen3_vl     Path of that family's checkpoint
    tiny_model_dir        Path, the default family's (qwen2_5_vl) checkpoint
    tiny_adapter          Path, LoRA adapter (+ vla_manifest.json) for tiny_model_dir, seed 1
    tiny_adapter_b        Path, a second adapter for tiny_model_dir, seed 2
    make_tiny_adapter     callable(base_dir, out_dir, seed=1, manifest=True, **manifest_overrides) -> Path
Helpers (plain functions): build_lora_adapter, lora_target_modules, tiny_messages, tiny_image,
TEST_VOCAB_FINGERPRINT.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = [
    "TEST_VOCAB_FINGERPRINT",
    "TEST_VOCAB_VERSION",
    "lora_target_modules",
    "build_lora_adapter",
    "tiny_messages",
    "tiny_image",
    "tiny_checkpoints",
    "tiny_qwen2_vl",
    "tiny_qwen2_5_vl",
    "tiny_qwen3_vl",
    "tiny_model_dir",
    "make_tiny_adapter",
    "tiny_adapter",
    "tiny_adapter_b",
]

TEST_VOCAB_FINGERPRINT = "0" * 63 + "1"  # stands in for Vocabulary.fingerprint() in model tests
TEST_VOCAB_VERSION = "1"

# every linear layer of the language model (not the vision tower, not lm_head)
_LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def lora_target_modules() -> str:
    """peft ``target_modules`` regex selecting all linear layers of a Qwen-VL language model."""
    return _LM_LINEARS


def build_lora_adapter(
    base_dir,
    out_dir,
    seed: int = 1,
    r: int = 8,
    lora_alpha: int = 16,
    manifest: bool = True,
    vocab_fingerprint: str = TEST_VOCAB_FINGERPRINT,
    **manifest_overrides,
) -> Path:
    """Save a random (non-identity) LoRA adapter for ``base_dir`` to ``out_dir`` (+ manifest).

    ``manifest_overrides`` replace top-level manifest fields after it is built (e.g.
    ``family="qwen3_vl"`` to make a deliberately mismatching manifest).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vla_node import manifest as m

    out = Path(out_dir)
    model = AutoModelForImageTextToText.from_pretrained(str(base_dir), local_files_only=True)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=_LM_LINEARS,
        lora_dropout=0.0,
        init_lora_weights=False,  # random B too, so the adapter visibly changes the logits
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    if manifest:
        ip = AutoProcessor.from_pretrained(str(base_dir), local_files_only=True).image_processor
        data = m.make_manifest(
            base_dir,
            min_pixels=int(ip.size.shortest_edge),
            max_pixels=int(ip.size.longest_edge),
            vocabulary_version=TEST_VOCAB_VERSION,
            vocabulary_fingerprint=vocab_fingerprint,
            dataset_sha256="",
            metrics={"note": "random test adapter"},
        )
        data.update(manifest_overrides)
        m.write_manifest(out, data)
    return out


def tiny_messages(command: str = "put the red cube in the blue bowl") -> list[dict]:
    """Chat messages in the SPEC form; uses vla_node.prompt.PromptBuilder when it is available."""
    try:
        from vla_node.prompt import PromptBuilder
        from vla_node.vocabulary import Vocabulary

        return PromptBuilder(Vocabulary.load()).chat_messages(command)
    except Exception:
        import json

        return [
            {"role": "system", "content": [{"type": "text", "text": "You turn commands into robot actions."}]},
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Command: " + json.dumps(command)}],
            },
        ]


def tiny_image(width: int = 160, height: int = 120, seed: int = 0) -> np.ndarray:
    """Deterministic RGB uint8 HxWx3 test image."""
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


class _LazyCheckpoints(dict):
    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        from training.tiny_models import build_tiny_checkpoint

        path = build_tiny_checkpoint(self.root / family, family=family, seed=0)
        self[family] = path
        return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    return _LazyCheckpoints(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tiny_checkpoints) -> Path:
    return tiny_checkpoints["qwen2_vl"]


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tiny_checkpoints) -> Path:
    return tiny_checkpoints["qwen2_5_vl"]


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tiny_checkpoints) -> Path:
    return tiny_checkpoints["qwen3_vl"]


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_qwen2_5_vl) -> Path:
    return tiny_qwen2_5_vl


@pytest.fixture(scope="session")
def make_tiny_adapter():
    return build_lora_adapter


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return build_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "lora_a", seed=1)


@pytest.fixture(scope="session")
def tiny_adapter_b(tiny_model_dir, tmp_path_factory) -> Path:
    return build_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "lora_b", seed=2)
