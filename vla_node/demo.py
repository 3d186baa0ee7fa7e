"""The README demo: replay the bundled demo bag through the real node on the embedded model.

    python -m vla_node.demo [--out DIR] [--bag PATH]      (or: make demo)

Starts vla_node.ros.node.VlaNode in this process (own rclpy context, random free ROS domain,
localhost only) with the embedded tabletop-tiny model and its Chinese LoRA adapter active
(adapters=["zh=embedded"], active_adapter="zh"), plays tests/data/demo_bag (camera +
English/Chinese speech) at recorded timing, prints command -> actions -> status -> latency,
and writes one annotated PNG per command (boxes and labels drawn on the frame the command
used) plus report.md / report.json / output_bag into the output folder (default out/demo).
Then it says which answers are right: against the bag's truth file (demo_bag.truth.json beside
the bag: the plan each scene requires, boxes on the objects, IoU >= 0.5), command by command,
showing what the scene required where the model answered otherwise. CPU only, no network.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from vla_node.drawing import annotated_frame, clip, put_text
from vla_node.text import visible
from vla_node.report import CommandResult

DEFAULT_OUT = Path("out") / "demo"
DEMO_BAG = "demo_bag"
PANEL_WIDTH = 640


def truth_path(bag: Path) -> Path:
    """The bag's truth file: BAG.truth.json beside the bag's folder."""
    return bag.parent / f"{bag.name}.truth.json"


def print_verdicts(source: Path, truth: dict, report: dict, out=None) -> int:
    """Right / WRONG per command against the truth (a loaded truth file); returns how many are right."""
    from vla_node.report import command_verdicts

    out = out if out is not None else sys.stdout
    verdicts = command_verdicts(truth, report)
    right = sum(ok for ok, _ in verdicts)
    print(f"\n{right} of {len(verdicts)} commands answered as the scene requires ({source}):", file=out)
    for command, (ok, required) in zip(report["commands"], verdicts):
        print(f"  #{command['index']} {'right' if ok else 'WRONG'}  {visible(command['text'])}", file=out)
        if not ok:
            print("      the scene requires:", file=out)
            for line in required or ["(no entry in the truth file)"]:  # the status line, then each step
                print(f"      {line.strip()}", file=out)
    return right


def find_demo_bag() -> Path | None:
    """tests/data/demo_bag in the source tree, else demo_bag in the installed models/ share dir."""
    source = Path(__file__).resolve().parent.parent / "tests" / "data" / DEMO_BAG
    if (source / "metadata.yaml").is_file():
        return source
    from vla_node.factory import package_data_dir

    models = package_data_dir("models")
    if models is not None and (models / DEMO_BAG / "metadata.yaml").is_file():
        return models / DEMO_BAG
    return None


# ------------------------------------------------------------------------------- drawing
def annotate(result: CommandResult) -> np.ndarray:
    """BGR picture: the frame (scaled to 640 px wide) with the plan's boxes and status drawn as the
    node's vla/debug_image draws them (vla_node.drawing), over a panel with the command and plan."""
    from vla_node.report import steps_text

    rgb = result.frame.decode() if result.frame is not None else None
    latency = f"{result.latency_ms:.0f} ms" if result.latency_ms is not None else "-"
    if rgb is None:
        frame = np.full((480, PANEL_WIDTH, 3), 60, np.uint8)
        put_text(frame, "no camera image before this command", (150, 240), scale=0.7)
        frame = annotated_frame(frame, [], result.code, f"#{result.index}  {latency}")
    else:
        frame = annotated_frame(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), result.steps, result.code,
                                f"#{result.index}  {latency}", scale=PANEL_WIDTH / rgb.shape[1])
    lines = [f"command: {result.text}"]
    actions = steps_text(result.steps)
    lines += [f"  {line}" for line in actions.splitlines()] or ["  (no plan)"]
    if result.code != "ACCEPTED" and result.status is not None:
        lines.append(f"  {clip(result.status.detail, 74)}")
    panel = np.full((12 + 22 * len(lines), frame.shape[1], 3), 30, np.uint8)
    for i, line in enumerate(lines):
        put_text(panel, clip(line, 78), (10, 24 + 22 * i))
    return np.vstack([frame, panel])


def write_annotations(directory: Path, results: list[CommandResult]) -> list[Path]:
    paths = []
    for result in results:
        path = directory / f"command_{result.index:02d}_{result.code.lower()}.png"
        if not cv2.imwrite(str(path), annotate(result)):
            raise OSError(f"cannot write {path}")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------- CLI
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vla_node.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--bag", type=Path, help="bag to replay (default: the bundled tests/data/demo_bag)")
    p.add_argument("--model", default="", metavar="DIR",
                   help="model_path ('' = the embedded tabletop-tiny; backend onnx: a `vla-export --onnx` folder)")
    p.add_argument("--backend", choices=("transformers", "onnx"), default="transformers",
                   help="the node's backend (default %(default)s); onnx serves --model, an export with the adapter "
                        "merged, e.g. vla-export --model models/tabletop-tiny --adapter models/tabletop-tiny-zh-lora "
                        "--onnx out/onnx-zh-int4 --quantize int4")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="adapters (default: zh=embedded, the bundled Chinese LoRA; none on backend onnx)")
    p.add_argument("--active-adapter", default=None, metavar="NAME",
                   help="active adapter (default: zh; '' = base model)")
    p.add_argument("--as-fast-as-possible", action="store_true", help="do not wait for the recorded timing")
    p.add_argument("--truth", type=Path, metavar="FILE",
                   help="what each command's scene requires (vla-replay expectation format; default: BAG.truth.json "
                        "beside the bag, when there is one)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the node's log output")
    return p


def main(argv: list[str] | None = None) -> int:
    from vla_node.bag_io import BagError
    from vla_node.replay import ReplayError, ReplayOptions, print_table, replay_bag
    from vla_node.report import ReportFileError, load_expectations

    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.backend == "onnx" and not args.model:
        parser.error("--backend onnx needs --model: a `vla-export --onnx` folder (adapters merged at export)")
    bag = args.bag or find_demo_bag()
    if bag is None:
        print("demo: the demo bag is missing (tests/data/demo_bag); make it with "
              "`python tests/data/make_golden.py` or pass --bag", file=sys.stderr)
        return 2
    truth_file = args.truth or truth_path(bag)
    truth = None
    if args.truth is not None or truth_file.is_file():  # read before the model loads: a bad file fails fast
        try:
            truth = load_expectations(truth_file)
        except ReportFileError as error:
            print(f"demo: {error}", file=sys.stderr)
            return 2
    if args.adapter is not None:
        adapters, active = args.adapter, ""
    elif args.backend == "transformers":  # the bundled Chinese adapter, active
        adapters, active = ["zh=embedded"], "zh"
    else:  # onnx: adapters are merged at export
        adapters, active = [], ""
    if args.active_adapter is not None:
        active = args.active_adapter
    parameters = {"backend": args.backend, "model_path": args.model, "adapters": adapters or [""],
                  "active_adapter": active}
    options = ReplayOptions(bag=bag, out=args.out, node_parameters=parameters,
                            as_fast_as_possible=args.as_fast_as_possible, verbose=args.verbose)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k))
    try:
        result = replay_bag(options, log=log, finish=lambda directory, results: write_annotations(directory, results))
    except (BagError, ReplayError) as error:
        print(f"demo: {error}", file=sys.stderr)
        if "tabletop-tiny" in str(error) and "make models" not in str(error):
            print("demo: build the embedded model first: make models", file=sys.stderr)
        return 2
    print()
    print_table(result.results)
    if truth is not None:
        print_verdicts(truth_file, truth, result.report)
    print(f"\nannotated frames, report.md and the output bag are in {result.out_dir}/")
    for path in sorted(result.out_dir.glob("command_*.png")):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
