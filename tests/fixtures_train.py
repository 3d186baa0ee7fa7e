"""Session fixtures for the training tests: a small synthetic dataset and one short LoRA run on the
tiny Qwen2.5-VL checkpoint, shared by test_train / test_evaluate / test_export so the suite
trains once. Load it as a plugin (``pytest_plugins = ["tests.fixtures_models", "tests.fixtures_train"]``),
not with ``import *``: an imported session fixture is a new fixture per module (trained again).
Needs ``tiny_model_dir`` from tests.fixtures_models.

    train_model_dir the tiny Qwen2.5-VL checkpoint with its lm_head scaled up (see below)
    synth_dir       Path of a training.synth dataset (tabletop_train 28 samples, tabletop_val 4)
    synth_box_dir   Path of a small synth dataset with absolute_resized boxes (tabletop_val 6)
    lora_run        TrainResult of 24 LoRA steps (checkpoints at 12 and 24) on synth_dir
    training_collator(model_dir)  a function (import it): vla-train's collator for a tiny checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["train_model_dir", "synth_dir", "synth_box_dir", "lora_run", "train_overrides", "LORA_STEPS", "SAVE_STEPS"]

LORA_STEPS = 24
SAVE_STEPS = 12
IMAGE_SIZE = (112, 84)  # 4x3 merged patches for Qwen2.5-VL: tiny prompts


LM_HEAD_SCALE = 16.0


@pytest.fixture(scope="session")
def train_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with lm_head * 16. A random tiny model's logits are capped near +-1.3
    (lm_head std 0.02 times an RMS-normalised 64-d hidden state), and LoRA leaves lm_head and the
    norms frozen, so its loss cannot fall far below ln(vocab); scaled up, 24 LoRA steps learn the
    answer format (loss ~10 -> ~1.5) like a real pretrained model would."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("train_model") / "tiny-qwen2_5_vl"
    shutil.copytree(tiny_model_dir, out)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("lm_head.weight"))
    tensors[key] = (tensors[key] * LM_HEAD_SCALE).contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def _synth(out: Path, num: int, boxes: str = "none", val_frac: float = 0.125, skills=("move", "pick", "stop")) -> Path:
    from training.synth import SynthConfig, generate_dataset

    cfg = SynthConfig(num=num, seed=0, size=IMAGE_SIZE, val_frac=val_frac, test_frac=0.0, skills=tuple(skills),
                      boxes=boxes, min_pixels=56 * 56, max_pixels=224 * 224, factor=28)
    generate_dataset(out, cfg)
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory.mktemp("synth") / "tabletop", num=32)


@pytest.fixture(scope="session")
def synth_box_dir(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory.mktemp("synth_boxes") / "tabletop", num=8, boxes="absolute_resized",
                  val_frac=0.75, skills=("move", "pick", "clarify", "stop"))


def training_collator(model_dir: Path):
    """vla-train's collator for model_dir's processor, images fitted to 56x56..224x224 (the tiny checkpoints')."""
    from transformers import AutoProcessor

    from training.collate import VLACollator, pixel_limits_of, set_pixel_limits
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    processor = AutoProcessor.from_pretrained(model_dir)
    limits = pixel_limits_of(processor, 56 * 56, 224 * 224)
    set_pixel_limits(processor, limits)
    return VLACollator(processor, PromptBuilder(Vocabulary.load()), limits)


def train_overrides(model_dir: Path, data_dir: Path, out_dir: Path, **extra) -> list[str]:
    """key=value list for a fast CPU run on the tiny model."""
    base = {
        "model_path": model_dir,
        "dataset_dir": data_dir,
        "dataset": "tabletop_train",
        "output_dir": out_dir,
        "max_steps": LORA_STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "logging_steps": 2,
        "save_steps": SAVE_STEPS,
        "save_total_limit": 4,
        "seed": 0,
        "report_to": "none",
        "disable_tqdm": True,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def lora_run(train_model_dir, synth_dir, tmp_path_factory):
    from training.config import load_config
    from training.train import train

    out = tmp_path_factory.mktemp("lora_run") / "adapter"
    cfg = load_config(None, train_overrides(train_model_dir, synth_dir, out, eval_dataset="tabletop_val",
                                            eval_steps=SAVE_STEPS, report_to="tensorboard"))
    return train(cfg)
