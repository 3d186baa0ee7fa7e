"""How many tensor operations the host dispatches in one fast-path training step, with vla-train's
``torch_compile`` (training/compile_layers.py) against without, in the same run on the same batch.

    python3 benchmarks/compiled_step_ops.py [--shape previous|committed] [--batch 16] [--backend inductor]

A small model's step is bound by the host (results/small_model_training_h200.txt): every operation
costs it a Python call and a launch, whatever its size. Counted with torch.profiler on the CPU
(aten operations, nested ones included, forward + backward of training.shared_prefix_loss with the
vision attention vla-train uses on CUDA); the first compiled step, which compiles, is not counted.
The loss of both arms is printed: compiling must not change it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("committed", "previous"), default="previous")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from training.compile_layers import compile_layers
    from training_step_ops import fast_step_setup

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="compiled_ops_"))
    model, encoded, fast = fast_step_setup(work, args.shape, 64)
    batch = fast.builder([("train", i % len(encoded)) for i in range(args.batch)])

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = fast.loss(model, batch)
        loss.backward()
        return float(loss.detach())

    def counted() -> tuple[int, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = step()
        return sum(1 for event in prof.events() if event.name.startswith("aten::")), loss

    step()  # lazy initialisation is not a step's work
    eager_ops, eager_loss = counted()
    layers = compile_layers(model, args.backend)
    step()  # compiles
    compiled_ops, compiled_loss = counted()
    print(f"$ python3 benchmarks/compiled_step_ops.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# torch {torch.__version__}; shape {args.shape} ({model.config.model_type}), batch {args.batch}; "
          f"{layers} decoder layers and vision blocks compiled one by one, backend "
          f"{args.backend}; aten operations a forward + backward, counted by torch.profiler on the CPU")
    print(f"{'arm':<10} {'operations':>10} {'loss':>12}")
    print(f"{'eager':<10} {eager_ops:10d} {eager_loss:12.6f}")
    print(f"{'compiled':<10} {compiled_ops:10d} {compiled_loss:12.6f}   {eager_ops / compiled_ops:.2f}x fewer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
