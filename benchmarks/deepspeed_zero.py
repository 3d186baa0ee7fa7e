"""Proof that `vla-train`'s `deepspeed:` key trains under ZeRO-2 and ZeRO-3 with LLaMA-Factory's own configs.

    python3 benchmarks/deepspeed_zero.py --out results_dir [--configs DIR] [--steps 8] [--gpus 1] [--work DIR]

Four short runs of `vla-train` on the embedded model (models/tabletop-tiny, Qwen2.5-VL architecture) and a
synthetic table-top dataset made here (training.synth), each launched by torchrun, one process per GPU:

    plain      LoRA, no DeepSpeed (the reference)
    zero2      LoRA, deepspeed: ds_z2_config.json
    zero3      LoRA, deepspeed: ds_z3_config.json
    zero3_full full fine-tuning with the vision tower and projector frozen, ds_z3_config.json
               (the layout of LLaMA-Factory's examples/train_full Qwen-VL YAMLs)

The ZeRO configs are LLaMA-Factory's examples/deepspeed files as they are (--configs; by default the ones
benchmarks/device_wheels.sh extracts from its PyPI sdist into .whl/llamafactory/). Checked for each
run: exit status 0, the steps done, a loss logged, DeepSpeed's partitioned checkpoint
(checkpoint-N/global_stepN/*optim_states.pt) for the ZeRO runs, and a saved adapter (or model) whose
tensors are all non-empty, with a vla_manifest.json. Prints a table (seconds, steps, first and final
loss) and writes it with the commands and versions to OUT/deepspeed_zero.txt, each run's log to
OUT/logs/; the data, checkpoints and weights stay in --work (default: a temporary folder, removed).
Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "transformers", "accelerate", "peft", "deepspeed"):
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            parts.append(f"{name} missing")
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
    except ImportError:
        pass
    return ", ".join(parts)


def _make_data(work: Path) -> Path:
    from training.synth import SynthConfig, generate_dataset

    data = work / "data"
    if not (data / "dataset_info.json").is_file():
        generate_dataset(data, SynthConfig(num=64, seed=0, val_frac=0.0, test_frac=0.0, skills=("move", "pick")))
    return data


def _check(out: Path, steps: int, zero: bool, lora: bool) -> list[str]:
    from safetensors.torch import load_file

    problems = []
    weights = out / ("adapter_model.safetensors" if lora else "model.safetensors")
    if not weights.is_file():
        return [f"{weights} not written"]
    tensors = load_file(str(weights))
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if not tensors or empty:
        problems.append(f"{weights}: {len(empty)} empty tensor(s) of {len(tensors)} (ZeRO-3 did not gather them)")
    if not (out / "vla_manifest.json").is_file():
        problems.append("no vla_manifest.json")
    if zero:
        states = list(out.glob(f"checkpoint-{steps}/global_step{steps}/*optim_states.pt"))
        if not states:
            problems.append(f"no DeepSpeed optimizer partitions in checkpoint-{steps}/global_step{steps}/")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "out/deepspeed_zero"), help="results and run folders")
    p.add_argument("--configs", default=str(ROOT / ".whl" / "llamafactory" / "examples" / "deepspeed"),
                   help="folder with LLaMA-Factory's ds_z2_config.json and ds_z3_config.json")
    p.add_argument("--model", default=str(ROOT / "models" / "tabletop-tiny"), help="base checkpoint")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per run (default 1)")
    p.add_argument("--work", help="folder for the data, checkpoints and weights (default: a temporary one, removed)")
    a = p.parse_args(argv)

    out = Path(a.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="deepspeed_zero."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run_all(a, out, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def _run_all(a, out: Path, work: Path) -> int:
    configs = Path(a.configs)
    for name in ("ds_z2_config.json", "ds_z3_config.json"):
        if not (configs / name).is_file():
            print(f"missing {configs / name}: run benchmarks/device_wheels.sh (it extracts LLaMA-Factory's "
                  "examples/deepspeed from its PyPI sdist into .whl/llamafactory/)", file=sys.stderr)
            return 2
    data = _make_data(work)
    common = [f"model_path={a.model}", f"dataset_dir={data}", "dataset=tabletop_train", f"max_steps={a.steps}",
              f"save_steps={a.steps}", "logging_steps=1", "per_device_train_batch_size=4",
              "gradient_accumulation_steps=2", "learning_rate=1e-4", "report_to=none", "disable_tqdm=true",
              "plot_loss=false", "overwrite_output_dir=true", "bf16=true", "dataloader_num_workers=2",
              "fast_path=false"]  # the same (ordinary) training path with and without DeepSpeed
    runs = [
        ("plain", [], False, True),
        ("zero2", [f"deepspeed={configs / 'ds_z2_config.json'}"], True, True),
        ("zero3", [f"deepspeed={configs / 'ds_z3_config.json'}"], True, True),
        ("zero3_full", [f"deepspeed={configs / 'ds_z3_config.json'}", "finetuning_type=full", "learning_rate=1e-5",
                        "freeze_vision_tower=true", "freeze_multi_modal_projector=true",
                        "freeze_language_model=false"], True, False),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false")
    empty_yaml = work / "empty.yaml"
    empty_yaml.write_text("{}\n")
    lines, failed = [], False
    rows = ["| run | seconds | steps | first loss | final loss | checks |", "|---|---|---|---|---|---|"]
    for name, extra, zero, lora in runs:
        run_out = work / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.gpus),
               "-m", "training.train", str(empty_yaml), *common, f"output_dir={run_out}", *extra]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        (out / "logs" / f"{name}.log").write_text(proc.stdout + proc.stderr)
        result = {}
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("{") and "global_step" in line:
                result = json.loads(line)
                break
        problems = [f"exit status {proc.returncode} (log: logs/{name}.log)"] if proc.returncode else []
        if not problems:
            problems = _check(run_out, a.steps, zero, lora)
            if result.get("global_step") != a.steps:
                problems.append(f"global_step {result.get('global_step')} != {a.steps}")
        failed |= bool(problems)
        rows.append(f"| {name} | {seconds:.1f} | {result.get('global_step', '-')} | {_first_loss(proc.stdout)} | "
                    f"{result.get('final_logged_loss', float('nan')):.4f} | {'; '.join(problems) or 'ok'} |")
        lines.append("$ " + " ".join(cmd[2:]))
        print(rows[-1], flush=True)
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
    text = "\n".join([
        "# benchmarks/deepspeed_zero.py: vla-train under DeepSpeed ZeRO-2 / ZeRO-3 (LLaMA-Factory's configs)",
        "", f"command: python3 benchmarks/deepspeed_zero.py {' '.join(sys.argv[1:])}",
        f"versions: {_versions()}", f"configs: {configs}", "", *rows, "", "runs:", *lines, ""])
    (out / "deepspeed_zero.txt").write_text(text)
    print(text)
    return 1 if failed else 0


def _first_loss(log: str) -> str:
    """The Trainer's first logged training loss ({'loss': '4.559', ...} lines)."""
    import ast

    for line in log.splitlines():
        if line.startswith("{'loss'"):
            try:
                return f"{float(ast.literal_eval(line)['loss']):.4f}"
            except (ValueError, SyntaxError):
                break
    return "-"


if __name__ == "__main__":
    sys.exit(main())
