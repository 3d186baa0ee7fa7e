"""How much host work one training step of a small model issues: tensor operations dispatched and
values read back to the host, per optimizer step, by batch size.

    python3 benchmarks/training_step_ops.py [--shape committed|previous] [--batches 64,256,512] [--ordinary-batches 64]

A small model's step on a GPU is bound by the host (results/small_model_training_h200.txt: the GPU
busy 34-53 % of the step at every batch): each operation costs the host ~10-20 us of Python,
dispatch and launch, whatever its size, and a value read back (``.item()``, ``.tolist()``) waits
for the GPU to drain. This counts both, with a TorchDispatchMode, on the CPU (the count does not
depend on the device), for forward + backward of vla-train's paths on the same batch:

  ordinary        the ordinary forward (whole sequences, the processor's per-image grids)
  fast, per image the fast path as it was (shared prefix once per batch; the vision tower given one
                  grid row per image: transformers loops over them)
  fast            the fast path now: the batch's images given as the frames of one clip
                  (training.shared_prefix.one_clip_grid)

The vision attention is the one vla-train switches on with CUDA (one call a layer,
vla_node/backends/engine/vision_attention.py). "kernels" counts the operations that launch work
on a GPU (views, transposes and other metadata-only operations excluded). The ratio column is
against "fast, per image" at the same batch. The ordinary arm runs only at --ordinary-batches (its
whole sequences need ~15 GB of host memory at batch 256 in fp32).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# metadata-only operations: no kernel on a GPU
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "expand", "unsqueeze", "squeeze",
         "detach", "alias", "as_strided", "split", "split_with_sizes", "unbind", "reshape", "_reshape_alias",
         "unflatten", "flatten", "narrow", "view_as", "lift_fresh", "_to_copy_view"}


def count_step(step) -> tuple[int, int, int]:
    """(operations, kernel-launching operations, host reads) of one call of ``step``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count() as counted:
        step()
    total = sum(counted.names.values())
    kernels = total - sum(n for name, n in counted.names.items() if name in VIEWS)
    return total, kernels, counted.names["_local_scalar_dense"]


def fast_step_setup(work: Path, shape_name: str, samples: int):
    """(model, encoded data, training.fast_path.FastPath) of a random checkpoint of the shape, on the
    CPU in fp32, with the vision attention vla-train uses on CUDA (one call a layer)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from small_model_training import prepare, shape
    from training import sharegpt
    from training.collate import VLACollator, pixel_limits_of
    from training.encoded_tensors import encode_samples, processor_arithmetic
    from training.fast_path import BatchBuilder, FastPath
    from vla_node.backends.engine.vision_attention import use_block_attention
    from vla_node.manifest import prompt_template_of
    from vla_node.prompt import PromptBuilder
    from vla_node.vocabulary import Vocabulary

    checkpoint, data = prepare(work, shape(shape_name), samples)
    processor = AutoProcessor.from_pretrained(checkpoint)
    collator = VLACollator(processor, PromptBuilder(Vocabulary.load(), template=prompt_template_of(checkpoint)),
                           pixel_limits_of(processor))
    encoded = encode_samples(sharegpt.load_validated(str(data), "tabletop_train", vocab=Vocabulary.load()), collator,
                             workers=0)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    if not use_block_attention(model):
        raise SystemExit("the vision tower did not take the one-call attention vla-train uses on CUDA")
    builder = BatchBuilder({"train": encoded}, processor_arithmetic(processor.image_processor), torch.device("cpu"))
    return model, encoded, FastPath(train=encoded, eval=None, builder=builder, bf16=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("committed", "previous"), default="committed")
    parser.add_argument("--batches", default="64,256,512")
    parser.add_argument("--ordinary-batches", default="64", help="the batches the ordinary arm also runs at")
    parser.add_argument("--samples", type=int, default=64, help="scenes encoded; a batch repeats them")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)

    import tempfile

    import torch

    from training.shared_prefix import ordinary_inputs, shared_prefix_loss

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="step_ops_"))
    model, encoded, fast = fast_step_setup(work, args.shape, args.samples)
    builder = fast.builder

    ordinary_batches = {int(b) for b in args.ordinary_batches.split(",") if b}

    def arms(inputs: dict, batch: int) -> dict:
        total = inputs["prefix_ids"].shape[1] + inputs["input_ids"].shape[1]
        positions = fast.positions(model, total)

        def shared(one_clip: bool):
            return lambda: shared_prefix_loss(model, position_ids=positions, same_size_images=one_clip,
                                              image_grid=encoded.grid_thw if one_clip else None,
                                              **inputs).backward()

        ordinary = {"ordinary": lambda: model(**ordinary_inputs(model, **inputs)).loss.backward()}
        return {**(ordinary if batch in ordinary_batches else {}), "fast, per image": shared(False),
                "fast": shared(True)}

    print(f"$ python3 benchmarks/training_step_ops.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# torch {torch.__version__}; shape {args.shape} ({model.config.model_type}); forward + backward, "
          "operations dispatched per optimizer step (CPU; the same on a GPU)")
    print(f"{'batch':>5}  {'arm':<16} {'operations':>10} {'kernels':>8} {'host reads':>10}  {'kernels vs per image':>20}")
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = builder([("train", i % len(encoded)) for i in range(batch)])
        counts = {}
        for arm, step in arms(inputs, batch).items():
            step()  # first call: lazy initialisation is not a step's work
            model.zero_grad(set_to_none=True)
            counts[arm] = count_step(step)
            model.zero_grad(set_to_none=True)
        baseline = counts["fast, per image"][1]
        for arm, (total, kernels, reads) in counts.items():
            print(f"{batch:5d}  {arm:<16} {total:10d} {kernels:8d} {reads:10d}  {baseline / kernels:19.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
