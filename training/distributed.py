"""DeepSpeed for `vla-train`: the `deepspeed` key checked before anything heavy, then handed to the
Trainer, whose own DeepSpeed integration (transformers + accelerate) runs the engine.

LLaMA-Factory's ZeRO configs (examples/deepspeed/ds_z{0,2,3}_config.json) work as they are: their
"auto" values are filled in by the Trainer from the config (batch size, accumulation, clipping,
bf16/fp16), and without an "optimizer" section the Trainer's AdamW runs inside ZeRO (no compiled
DeepSpeed op is needed). Launch one process per GPU:

    deepspeed --num_gpus 4 -m training.train CONFIG.yaml
    torchrun --standalone --nproc_per_node 4 -m training.train CONFIG.yaml
    accelerate launch --num_processes 4 -m training.train CONFIG.yaml
"""

from __future__ import annotations

from pathlib import Path

from training.config import ConfigError
from vla_node.manifest import read_json_object

__all__ = ["deepspeed_config", "DEEPSPEED_PIN"]

DEEPSPEED_PIN = "deepspeed==0.19.8"  # requirements/python.txt


def deepspeed_config(path: str | None) -> str | None:
    """``path`` when it is a readable DeepSpeed JSON object and DeepSpeed imports; None for no DeepSpeed.
    Raises ConfigError naming the file or the missing package."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed: config file {p} not found (e.g. LLaMA-Factory's "
                          "examples/deepspeed/ds_z3_config.json)")
    try:
        read_json_object(p)
    except ValueError as e:
        raise ConfigError(f"deepspeed: {p} is not a JSON file holding an object: {e}") from None
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"deepspeed: {p} needs the deepspeed package, which does not import here ({e}); "
                          f"pip install {DEEPSPEED_PIN}") from None
    return str(p)
