#!/usr/bin/env python3
"""Write the golden replay bags of tests/data (deterministic) and, on request, their expectations.

    python tests/data/make_golden.py                 # the bags only (seconds)
    python tests/data/make_golden.py --expect        # + replay each through the embedded model
                                                     #   (models/tabletop-tiny + zh LoRA) -> *.expect.json
    python tests/data/make_golden.py --expect --model DIR    # development against another checkpoint:
                                                     #   keeps only the model-independent statuses

Scenes and commands come from training.synth (the generator the embedded model is trained on):
each scripted command picks the first synth sample of the wanted kind and language, so the same
code always writes the same bags. Bags (320x240 images, a few frames each, all < 3 MB):

    golden_mcap     mcap,    raw bgr8 Image: NO_IMAGE (command before the first image), "stop"
                    (STOPPED), English move / pick+place / absent object (CLARIFY), Chinese
                    move / pick, and STALE_IMAGE (the camera stops 3.5 s before a command)
    golden_sqlite3  sqlite3, CompressedImage jpeg: Chinese command, a command pair cut short by
                    "停下" (STOPPED + CANCELLED x2), a burst of 7 commands against a queue of 4
                    (BUSY x2: the two oldest queued)
    demo_bag        mcap,    CompressedImage jpeg: the README demo (python -m vla_node.demo), with
                    demo_bag.truth.json: the plan each scene requires (the generator's answer,
                    boxes on the objects in frame pixels), written by this script, never by a model

The timing is chosen so the statuses do not depend on the model's speed beyond "one generation
takes longer than 50 ms": a command follows its frame by 0.2-0.3 s and the next scene's frame
comes >= 1 s later (the node pairs a command with the closest frame), bursts are 5 ms apart.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from training.synth import SynthConfig, Synthesizer  # noqa: E402
from vla_node.bag_io import package_typestore, write_bag  # noqa: E402
from vla_node.demo import truth_path  # noqa: E402
from vla_node.report import DEFAULT_MIN_IOU, EXPECT_FORMAT, step_dict  # noqa: E402

SIZE = (320, 240)
BASE_NS = 1_700_000_000_000_000_000  # bag clock origin (2023-11-14), any fixed value works
CAMERA = "/camera/image_raw"
CAMERA_COMPRESSED = "/camera/image_raw/compressed"
SPEECH = "/speech/text"
CAMERA_LATENCY_NS = 15_000_000  # header stamp = receive time - 15 ms, like a real driver
MODEL_INDEPENDENT = ("NO_IMAGE", "STALE_IMAGE", "BUSY", "STOPPED", "CANCELLED")
DEMO_PARAMETERS = {"adapters": ["zh=embedded"], "active_adapter": "zh"}


@dataclass
class Script:
    name: str
    storage: str
    compressed: bool
    frames: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (t, BGR image)
    commands: list[tuple[float, str, str | None]] = field(default_factory=list)  # (t, text, designed status)
    truth: list[list[dict]] = field(default_factory=list)  # per command: the plan its scene requires

    def frame(self, t: float, image: np.ndarray) -> None:
        self.frames.append((t, image))

    def say(self, t: float, text: str, status: str | None = None) -> None:
        self.commands.append((t, text, status))


def required_plan(sample) -> list[dict]:
    """The generator's answer to a sample with a box on every object and destination it names
    (frame pixels), as the embedded model is trained to answer: vla-replay expectation steps."""
    boxes = {thing.label: thing.as_box() for thing in sample.things}
    steps = []
    for step in sample.steps:
        step = step.model_copy(update={"object_box": boxes[step.object] if step.object else None,
                                       "destination_box": boxes[step.destination] if step.destination else None})
        steps.append(step_dict(step))
    return steps


class Scenes:
    """First synth sample of a kind/language, searched from index 0 (deterministic)."""

    def __init__(self, seed: int = 20250):
        self.seed = seed
        self._synths: dict[tuple, Synthesizer] = {}
        self._used: set[tuple] = set()

    def synth(self, skill: str, lang: str) -> Synthesizer:
        key = (skill, lang)
        if key not in self._synths:
            self._synths[key] = Synthesizer(SynthConfig(num=1, seed=self.seed, size=SIZE, skills=(skill,),
                                                        languages=(lang,)))
        return self._synths[key]

    def find(self, skill: str, lang: str, kind: str, min_objects: int = 1, min_containers: int = 1,
             absent_object: bool = False):
        syn = self.synth(skill, lang)
        for index in range(2000):
            if (skill, lang, index) in self._used:
                continue
            sample = syn.sample(index)
            objects = [t for t in sample.things if t.kind == "object"]
            containers = [t for t in sample.things if t.kind == "container"]
            if absent_object and not any(step.reason == f"no {label} is visible"
                                         for step in sample.steps for label in syn.objects):
                continue
            if sample.kind == kind and len(objects) >= min_objects and len(containers) >= min_containers:
                self._used.add((skill, lang, index))
                return sample
        raise SystemExit(f"make_golden: no synth sample of kind {kind!r} ({lang}) in 2000 tries")

    def more_commands(self, sample, lang: str, count: int) -> list[str]:
        """Other commands about the same scene, worded by synth's own sentence builder."""
        syn = self.synth("move", lang)
        rng = np.random.default_rng([self.seed, 7, len(sample.command)])
        objects = [t for t in sample.things if t.kind == "object"]
        containers = [t for t in sample.things if t.kind == "container"]
        texts: list[str] = []
        pairs = [(o, d) for o in objects for d in containers]
        for i in range(count * 4):
            o, d = pairs[i % len(pairs)]
            name = o.label if lang == "en" else syn.lang.label(rng, "zh", o.label)
            text = syn.lang.pick(rng, lang, name) if i % 2 else syn.lang.move(rng, lang, name, d)
            if text not in texts and text != sample.command:
                texts.append(text)
            if len(texts) == count:
                return texts
        raise SystemExit("make_golden: not enough distinct commands for one scene")


def golden_mcap(scenes: Scenes) -> Script:
    s = Script("golden_mcap", "mcap", compressed=False)
    s.say(0.0, scenes.find("pick", "en", "pick").command, "NO_IMAGE")
    s.say(0.2, "stop", "STOPPED")
    t = 0.5
    for skill, lang, kind in (("move", "en", "move"), ("multi", "en", "multi_pick_place"),
                              ("clarify", "en", "clarify_absent"), ("move", "zh", "move"),
                              ("pick", "zh", "pick")):
        sample = scenes.find(skill, lang, kind, absent_object=kind == "clarify_absent")
        s.frame(t, sample.image)
        s.say(t + 0.2, sample.command)
        t += 1.5
    stale = scenes.find("pick", "en", "pick")
    s.say(t - 1.5 + 3.5, stale.command, "STALE_IMAGE")  # 3.5 s after the last frame (> max_image_age_s 2.0)
    return s


def golden_sqlite3(scenes: Scenes) -> Script:
    s = Script("golden_sqlite3", "sqlite3", compressed=True)
    a = scenes.find("move", "zh", "move")
    for t in (0.0, 0.5, 1.0, 1.5):
        s.frame(t, a.image)
    s.say(0.7, a.command)
    b = scenes.find("move", "en", "move", min_objects=2)
    for t in (2.0, 2.5, 3.0, 3.5):
        s.frame(t, b.image)
    (other,) = scenes.more_commands(b, "zh", 1)
    s.say(2.6, b.command, "CANCELLED")  # in flight when the stop phrase arrives
    s.say(2.62, other, "CANCELLED")  # still queued
    s.say(2.64, "停下", "STOPPED")
    c = scenes.find("move", "en", "move", min_objects=3, min_containers=2)
    for i in range(8):
        s.frame(4.0 + 0.5 * i, c.image)
    burst = [c.command] + scenes.more_commands(c, "en", 6)
    s.say(4.3, burst[0])  # taken by the worker at once
    designed = ["BUSY", "BUSY", None, None, None, None]  # queue of 4, drop_oldest: b2 and b3 dropped
    for i, (text, status) in enumerate(zip(burst[1:], designed)):
        s.say(4.32 + 0.005 * i, text, status)
    return s


def demo_bag(scenes: Scenes) -> Script:
    """Five scenes of the demo: the first generated sample of each kind below, from the seed of
    `Scenes` (20250: no training split draws from it); the kinds are chosen, the samples are not."""
    s = Script("demo_bag", "mcap", compressed=True)
    t = 0.0
    for skill, lang, kind in (("move", "en", "move"), ("move", "zh", "move"), ("multi", "en", "multi_pick_place"),
                              ("clarify", "en", "clarify_absent"), ("pick", "zh", "pick")):
        sample = scenes.find(skill, lang, kind, absent_object=kind == "clarify_absent")
        s.frame(t, sample.image)
        s.frame(t + 1.0, sample.image)
        s.say(t + 0.3, sample.command)
        s.truth.append(required_plan(sample))
        t += 2.0
    return s


def truth_expectations(script: Script) -> dict:
    """An expectation file (vla-replay --expect, python -m vla_node.demo) of what each scene requires."""
    return {
        "format": EXPECT_FORMAT,
        "bag": script.name,
        "note": "what each scene requires (the generator's answers, boxes on the objects in frame pixels), "
                "written by tests/data/make_golden.py, not by a model",
        "node_parameters": dict(DEMO_PARAMETERS),
        "min_iou": DEFAULT_MIN_IOU,
        "commands": [{"text": text, "status": "ACCEPTED", "steps": steps}
                     for (_, text, _), steps in zip(script.commands, script.truth)],
    }


def write_script(script: Script, out_dir: Path) -> Path:
    store = package_typestore()
    Image = store.types["sensor_msgs/msg/Image"]
    CompressedImage = store.types["sensor_msgs/msg/CompressedImage"]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    String = store.types["std_msgs/msg/String"]
    messages = []
    camera = CAMERA_COMPRESSED if script.compressed else CAMERA
    for t, bgr in script.frames:
        log_ns = BASE_NS + int(round(t * 1e9))
        stamp = log_ns - CAMERA_LATENCY_NS
        header = Header(stamp=Time(sec=stamp // 10**9, nanosec=stamp % 10**9), frame_id="camera_optical")
        if script.compressed:
            ok, jpeg = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), 85])
            assert ok
            message = CompressedImage(header=header, format="jpeg", data=np.frombuffer(jpeg.tobytes(), np.uint8))
            messages.append((camera, "sensor_msgs/msg/CompressedImage", log_ns, message))
        else:
            h, w = bgr.shape[:2]
            message = Image(header=header, height=h, width=w, encoding="bgr8", is_bigendian=0, step=w * 3,
                            data=np.ascontiguousarray(bgr).reshape(-1))
            messages.append((camera, "sensor_msgs/msg/Image", log_ns, message))
    for t, text, _ in script.commands:
        messages.append((SPEECH, "std_msgs/msg/String", BASE_NS + int(round(t * 1e9)), String(data=text)))
    return write_bag(out_dir / script.name, messages, storage=script.storage, typestore=store)


def expectations(script: Script, bag: Path, model: str | None) -> None:
    """Replay the bag with --write-expect; with a non-embedded model keep model-independent statuses only."""
    target = bag.parent / f"{script.name}.expect.json"
    scratch = REPO / "out" / "make_golden"
    raw = scratch / f"{script.name}.expect.json"
    argv = [sys.executable, "-m", "vla_node.replay", str(bag), "--out", str(scratch / script.name),
            "--write-expect", str(raw), "-q"]
    if model:  # a development checkpoint has no zh adapter: base model only
        argv += ["--model", model]
    else:
        for name, value in DEMO_PARAMETERS.items():
            argv += ["-p", f"{name}:={json.dumps(value) if isinstance(value, list) else value}"]
    print("+", " ".join(argv))
    rc = subprocess.call(argv, cwd=REPO)
    if rc not in (0, 1):
        raise SystemExit(f"make_golden: replay of {bag} failed (exit {rc})")
    data = json.loads(raw.read_text(encoding="utf-8"))
    problems = []
    for (t, text, designed), entry in zip(script.commands, data["commands"]):
        if designed is not None and entry["status"] != designed:
            problems.append(f"  t={t:.2f} {text!r}: designed {designed}, got {entry['status']}")
        if model:
            if entry["status"] not in MODEL_INDEPENDENT or designed is None:
                entry["status"] = None  # not compared
                entry.pop("steps", None)
            elif entry["status"] != "STOPPED":
                entry.pop("steps", None)
    if problems:
        raise SystemExit(f"make_golden: {bag.name} did not replay as designed:\n" + "\n".join(problems))
    if model:
        data["node_parameters"] = {}
        data["note"] = ("development expectations (random model): only the model-independent statuses "
                        "are pinned; regenerate with `python tests/data/make_golden.py --expect`")
    target.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {target}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE, help="where the bags go (default: tests/data)")
    p.add_argument("--expect", action="store_true", help="also replay each golden bag and write NAME.expect.json")
    p.add_argument("--model", help="with --expect: a development checkpoint instead of the embedded model")
    p.add_argument("--only", action="append", help="only these bags (golden_mcap, golden_sqlite3, demo_bag)")
    args = p.parse_args(argv)
    scenes = Scenes()
    scripts = [golden_mcap(scenes), golden_sqlite3(scenes), demo_bag(scenes)]
    for script in scripts:
        if args.only and script.name not in args.only:
            continue
        bag = write_script(script, args.out)
        size = sum(f.stat().st_size for f in bag.iterdir())
        print(f"wrote {bag} ({size / 1024:.0f} KiB, {len(script.frames)} frames, {len(script.commands)} commands)")
        if script.truth:
            target = truth_path(args.out / script.name)
            target.write_text(json.dumps(truth_expectations(script), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {target}")
        if args.expect and script.name != "demo_bag":
            expectations(script, bag, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
