"""What vla-replay makes of a replay: per-command results, report.json + report.md,
expectation files (write, load, compare with a readable diff) and the ShareGPT export.

No rclpy here: results carry plain pydantic objects (vla_node.actions) and a `decode`
callable for the frame a command used.
"""
from __future__ import annotations

import difflib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vla_node.actions import ActionPlan, ActionStep, CommandStatus, box_iou
from vla_node.files import atomic_write_text, replace_dir
from vla_node.text import visible

NO_STATUS = "NO_STATUS"  # the node never answered the command (not a node status code)
EXPECT_FORMAT = 1
DEFAULT_MIN_IOU = 0.5
STEP_KEYS = ("verb", "object", "destination", "reason")
BOX_KEYS = ("object_box", "destination_box")


class ReportFileError(Exception):
    """A malformed expectation or corrections file (exit code 2); the message names the file."""


@dataclass
class FrameRecord:
    """The last camera message published before a command."""

    bag_time_s: float  # relative to the bag's first message
    stamp_ns: int  # header stamp as published
    decode: Callable[[], np.ndarray]  # -> RGB uint8 HxWx3


@dataclass
class CommandResult:
    index: int
    text: str  # as recorded in the bag
    bag_time_s: float
    sent_ns: int | None = None  # wall clock when published
    frame: FrameRecord | None = None
    status: CommandStatus | None = None
    status_ns: int | None = None  # wall clock when the status arrived
    plan: ActionPlan | None = None

    @property
    def code(self) -> str:
        return self.status.code.value if self.status is not None else NO_STATUS

    @property
    def steps(self) -> list[ActionStep]:
        return list(self.plan.steps) if self.plan is not None else []

    @property
    def latency_ms(self) -> float | None:
        if self.sent_ns is None or self.status_ns is None:
            return None
        return round((self.status_ns - self.sent_ns) / 1e6, 1)


# ------------------------------------------------------------------------------- small helpers
def step_dict(step: ActionStep, boxes: bool = True) -> dict:
    data: dict[str, Any] = {key: getattr(step, key) for key in STEP_KEYS}
    if boxes:
        for key in BOX_KEYS:
            box = getattr(step, key)
            if box is not None:
                data[key] = [round(v, 1) for v in box.as_list()]
    return data


def steps_text(steps: list[ActionStep], vocab=None) -> str:
    """Canonical action text with boxes in ORIGINAL camera pixels (what corrected_actions takes)."""
    if not steps:
        return ""
    if vocab is not None:
        from vla_node.actions import render_steps

        try:
            return render_steps(steps, vocab)
        except Exception:  # a plan from another vocabulary: fall back to the plain form
            pass
    return "\n".join(f"{s.verb}(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}"
                                               for k, v in step_dict(s, boxes=False).items()
                                               if k != "verb" and v) + ")" for s in steps)


# ------------------------------------------------------------------------------- the report
def build_report(results: list[CommandResult], header: dict, vocab=None) -> dict:
    by_status: dict[str, int] = {}
    commands = []
    for result in results:
        by_status[result.code] = by_status.get(result.code, 0) + 1
        entry: dict[str, Any] = {
            "index": result.index,
            "text": result.text,
            "bag_time_s": round(result.bag_time_s, 3),
            "command_id": result.status.command_id if result.status else "",
            "status": result.code,
            "detail": result.status.detail if result.status else "the node sent no status",
            "latency_ms": result.latency_ms,
            "actions": [step_dict(step) for step in result.steps],
            "actions_text": steps_text(result.steps, vocab),
            "confidence": round(min(s.confidence for s in result.steps), 4) if result.steps else None,
            "stage_latency_ms": result.plan.latency.model_dump() if result.plan else None,
            "frame": ({"bag_time_s": round(result.frame.bag_time_s, 3), "stamp_ns": result.frame.stamp_ns}
                      if result.frame else None),
            "corrected_actions": None,
        }
        commands.append(entry)
    return {**header, "summary": {"commands": len(results), "by_status": dict(sorted(by_status.items()))},
            "commands": commands}


def _cell(text: str, limit: int = 160) -> str:
    """A Markdown table cell: at most `limit` characters of the text (… when cut), line breaks as
    <br>, other non-printable characters escaped."""
    clipped = len(text) > limit
    text = text[: limit - 1] if clipped else text
    text = "<br>".join(visible(line) for line in text.split("\n"))
    return text.replace("|", "\\|") + ("…" if clipped else "")


def report_markdown(report: dict) -> str:
    node = report.get("node", {})
    lines = [
        f"# vla-replay: {report.get('bag_name', '')}",
        "",
        f"- bag: `{report.get('bag')}` ({report.get('storage')}), camera `{report.get('camera_topic')}` "
        f"({report.get('camera_type')}), speech `{report.get('speech_topic')}`",
        f"- node: {node.get('mode')}, model `{node.get('model_id') or '?'}`, adapter "
        f"`{node.get('adapter_id') or 'none'}`",
        f"- pacing: {report.get('replay', {}).get('pacing')}",
        "- summary: " + ", ".join(f"{k} {v}" for k, v in report["summary"]["by_status"].items()),
        "",
        "| # | t (s) | command | status | actions | latency (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["commands"]:
        latency = "" if c["latency_ms"] is None else f"{c['latency_ms']:.0f}"
        actions = c["actions_text"] or ("" if c["status"] == "ACCEPTED" else c["detail"])
        lines.append(f"| {c['index']} | {c['bag_time_s']:.2f} | {_cell(c['text'])} | {c['status']} | "
                     f"{_cell(actions)} | {latency} |")
    lines += [
        "",
        "Boxes are ORIGINAL camera pixels. To correct a plan for `vla-replay --export-dataset DIR "
        "--corrections report.json`, set a command's `corrected_actions` in report.json to canonical "
        "action text (like `actions_text`; \"\" leaves the command out of the dataset).",
        "",
    ]
    return "\n".join(lines)


def write_report(directory: Path, report: dict) -> None:
    atomic_write_text(directory / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(directory / "report.md", report_markdown(report))


# ------------------------------------------------------------------------------- expectations
def expectations_from_results(results: list[CommandResult], bag_name: str, node_parameters: dict,
                              replay: dict, min_iou: float = DEFAULT_MIN_IOU) -> dict:
    return {
        "format": EXPECT_FORMAT,
        "bag": bag_name,
        "node_parameters": node_parameters,
        "replay": replay,
        "min_iou": min_iou,
        "commands": [{"text": r.text, "status": r.code, "steps": [step_dict(s) for s in r.steps]}
                     for r in results],
    }


def _fail(path: Path, message: str) -> ReportFileError:
    return ReportFileError(f"{path}: {message}")


def load_expectations(path: str | Path) -> dict:
    """Read and check an expectation file; raises ReportFileError naming the file and entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise _fail(path, f"cannot read the expectation file: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise _fail(path, f"line {error.lineno} column {error.colno}: not JSON: {error.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("commands"), list):
        raise _fail(path, 'an expectation file is a JSON object with a "commands" list')
    if data.get("format", EXPECT_FORMAT) != EXPECT_FORMAT:
        raise _fail(path, f"unknown format {data.get('format')!r} (this vla-replay reads {EXPECT_FORMAT})")
    if not isinstance(data.get("node_parameters", {}), dict):
        raise _fail(path, '"node_parameters" must be an object')
    for i, entry in enumerate(data["commands"]):
        where = f"commands[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise _fail(path, f'{where}: needs a "text" string')
        if "status" in entry and not isinstance(entry["status"], (str, type(None))):
            raise _fail(path, f'{where}: "status" must be a status code name such as "ACCEPTED"')
        steps = entry.get("steps")
        if steps is None:
            continue
        if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("verb"), str)
                                                  for s in steps):
            raise _fail(path, f'{where}: "steps" must be a list of objects with a "verb"')
        for j, step in enumerate(steps):
            unknown = set(step) - set(STEP_KEYS) - set(BOX_KEYS) - {"confidence"}
            if unknown:
                raise _fail(path, f"{where}.steps[{j}]: unknown keys {sorted(unknown)}")
            for key in BOX_KEYS:
                box = step.get(key)
                if box is not None and not (isinstance(box, list) and len(box) == 4
                                            and all(isinstance(v, (int, float)) for v in box)):
                    raise _fail(path, f"{where}.steps[{j}].{key}: must be [x_min, y_min, x_max, y_max]")
    return data


def _fmt_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _step_line(step: dict, shown_boxes: dict[str, str]) -> str:
    parts = [step.get("verb", "")]
    for key in STEP_KEYS[1:]:
        if step.get(key):
            parts.append(f"{key}={json.dumps(step[key], ensure_ascii=False)}")
    for key in BOX_KEYS:
        if key in shown_boxes:
            parts.append(f"{key}={shown_boxes[key]}")
    return "    " + " ".join(parts)


def _command_lines(index: int, expected: dict | None, actual: dict | None, min_iou: float) -> tuple[list, list]:
    """Lines for one command on each side; boxes within the IoU tolerance print identically."""
    exp_lines: list[str] = []
    act_lines: list[str] = []
    compare_status = expected is None or expected.get("status") is not None
    compare_steps = expected is None or expected.get("steps") is not None
    for side, entry, lines in (("expected", expected, exp_lines), ("actual", actual, act_lines)):
        if entry is None:
            continue
        status = entry.get("status") if compare_status else "(any status)"
        lines.append(f"#{index} {json.dumps(entry['text'], ensure_ascii=False)} -> {status}")
    if not compare_steps:
        return exp_lines, act_lines
    exp_steps = (expected or {}).get("steps") or []
    act_steps = (actual or {}).get("steps") or []
    for j, step in enumerate(exp_steps):
        exp_lines.append(_step_line(step, {k: _fmt_box(step[k]) for k in BOX_KEYS if step.get(k) is not None}))
    for j, step in enumerate(act_steps):
        shown: dict[str, str] = {}
        reference = exp_steps[j] if expected is not None and j < len(exp_steps) else None
        for key in BOX_KEYS:
            if reference is not None and reference.get(key) is None:
                continue  # the expectation does not pin this box: ignore it
            box = step.get(key)
            if box is None:
                if reference is not None:
                    shown[key] = "(none)"
                continue
            if reference is None:
                shown[key] = _fmt_box(box)
                continue
            overlap = box_iou(reference[key], box)
            shown[key] = (_fmt_box(reference[key]) if overlap >= min_iou
                          else f"{_fmt_box(box)} (IoU {overlap:.2f} < {min_iou:g})")
        act_lines.append(_step_line(step, shown))
    return exp_lines, act_lines


def _paired_lines(expect: dict, report: dict, min_iou: float | None) -> list[tuple[dict | None, list, list]]:
    """(expected entry, its lines, the replay's lines) per position, as far as the longer side goes."""
    min_iou = float(expect.get("min_iou", DEFAULT_MIN_IOU) if min_iou is None else min_iou)
    expected = expect["commands"]
    actual = [{"text": c["text"], "status": c["status"], "steps": c["actions"]} for c in report["commands"]]
    pairs = []
    for i in range(max(len(expected), len(actual))):
        entry = expected[i] if i < len(expected) else None
        pairs.append((entry, *_command_lines(i, entry, actual[i] if i < len(actual) else None, min_iou)))
    return pairs


def compare(expect: dict, report: dict, min_iou: float | None = None,
            expected_name: str = "expected", actual_name: str = "actual") -> list[str]:
    """Unified diff lines between the expectation and the replay (empty: they agree)."""
    pairs = _paired_lines(expect, report, min_iou)
    exp_lines = [line for _, lines, _ in pairs for line in lines]
    act_lines = [line for _, _, lines in pairs for line in lines]
    if exp_lines == act_lines:
        return []
    return list(difflib.unified_diff(exp_lines, act_lines, expected_name, actual_name, lineterm="", n=2))


def command_verdicts(expect: dict, report: dict, min_iou: float | None = None) -> list[tuple[bool, list[str]]]:
    """Per command of the replay: (agrees with the expectation's entry of the same index, the
    expected lines to show when it does not: status, then each step with its boxes)."""
    pairs = _paired_lines(expect, report, min_iou)[:len(report["commands"])]
    return [(entry is not None and exp == act, exp) for entry, exp, act in pairs]


# ------------------------------------------------------------------------------- corrections
def load_corrections(path: str | Path) -> dict[int, tuple[str, str | None]]:
    """{index: (text, corrected_actions)} from an edited report.json (only entries that set it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise _fail(path, f"cannot read the corrections file: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise _fail(path, f"line {error.lineno} column {error.colno}: not JSON: {error.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("commands"), list):
        raise _fail(path, 'a corrections file is a vla-replay report.json (an object with a "commands" list)')
    corrections: dict[int, tuple[str, str | None]] = {}
    for i, entry in enumerate(data["commands"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("index"), int) \
                or not isinstance(entry.get("text"), str):
            raise _fail(path, f'commands[{i}]: needs "index" (integer) and "text" (string)')
        corrected = entry.get("corrected_actions")
        if corrected is None:
            continue
        if not isinstance(corrected, str):
            raise _fail(path, f'commands[{i}]: "corrected_actions" must be canonical action text or null')
        corrections[entry["index"]] = (entry["text"], corrected)
    return corrections


# ------------------------------------------------------------------------------- dataset export
@dataclass
class ExportSummary:
    directory: Path
    dataset_name: str
    samples: int
    skipped: list[str] = field(default_factory=list)


def export_dataset(directory: str | Path, results: list[CommandResult], vocab, bag_name: str,
                   box_codec: Callable[[int, int], Any] | None = None,
                   corrections: dict[int, tuple[str, str | None]] | None = None,
                   corrections_path: str | Path = "", dataset_name: str = "vla_replay") -> ExportSummary:
    """Accepted (or corrected) plans + the frames their commands used -> LLaMA-Factory ShareGPT.

    `box_codec(width, height)` gives the model's BoxCodec for a frame of that size (boxes are
    rendered in the model's coordinate convention); None drops boxes from the answers.
    Written to a temporary directory and renamed, so DIR is either complete or untouched.
    """
    import cv2

    from vla_node.actions import render_steps
    from vla_node.dataset_format import Row, write_sharegpt
    from vla_node.parser import BoxCodec, ParseError, parse_actions
    from vla_node.prompt import PromptBuilder

    directory = Path(directory)
    corrections = corrections or {}
    for index, (text, _) in corrections.items():
        if index >= len(results) or results[index].text != text:
            got = repr(results[index].text) if index < len(results) else "no such command"
            raise _fail(Path(corrections_path), f"command {index} is {text!r} there but {got} in this "
                        "replay: the corrections come from a replay of another bag")
    prompt = PromptBuilder(vocab)
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    samples = []
    skipped: list[str] = []
    try:
        for result in results:
            corrected = corrections.get(result.index, (None, None))[1]
            if corrected == "":
                skipped.append(f"#{result.index}: left out by the corrections file")
                continue
            if corrected is None and (result.code != "ACCEPTED" or result.plan is None):
                continue
            if result.frame is None:
                skipped.append(f"#{result.index}: no camera image before the command")
                continue
            rgb = result.frame.decode()
            height, width = rgb.shape[:2]
            if corrected is not None:
                try:
                    steps = parse_actions(corrected, vocab, BoxCodec("original_pixels", (width, height)))
                except ParseError as error:
                    raise _fail(Path(corrections_path), f"command {result.index} ({result.text!r}): "
                                f"corrected_actions is not a valid plan: {error.reason}: {error.text!r}") from None
            else:
                steps = [step.model_copy(update={"confidence": 1.0}) for step in result.plan.steps]
            codec = box_codec(width, height) if box_codec is not None else None
            if codec is None:
                steps = [step.model_copy(update={"object_box": None, "destination_box": None}) for step in steps]
            answer = render_steps(steps, vocab, codec)
            image = partial / "images" / f"{bag_name}_{result.index:04d}.png"
            if not cv2.imwrite(str(image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write {image}")
            command = result.status.command_text if result.status and result.status.command_text else result.text
            samples.append(Row(messages=prompt.sharegpt_messages(command, answer), images=[image]))
        write_sharegpt(partial / f"{dataset_name}.json", samples, dataset_info_name=dataset_name)
        replace_dir(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ExportSummary(directory, dataset_name, len(samples), skipped)
