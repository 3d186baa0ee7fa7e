"""CPU cost of the node's own work (model time excluded), at 30 Hz 1920x1080.

    source scripts/env.sh && python benchmarks/node_overhead.py [--frames 300] [--commands 50]

Per camera frame: the real node callback (VlaRuntime._on_image on a live VlaNode: keep the
message, decode nothing) against the baseline most ROS wrappers use, converting every frame
to an RGB array (cv_bridge-style) and resizing it for the model. Per command: everything the
node does around the model (decode the chosen frame once, fit to the model's pixel limits,
build the chat messages, parse the answer, safety gate, build the plan + status messages).
Prints ms and the share of one core at 30 Hz, and the baseline/ours ratio from the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def timed(fn, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples


def summary(name: str, samples_ms: list[float], rate_hz: float | None = None) -> str:
    p50 = statistics.median(samples_ms)
    p99 = float(np.percentile(samples_ms, 99))
    load = f", {p50 * rate_hz / 10:.2f}% of one core at {rate_hz:.0f} Hz" if rate_hz else ""
    return f"{name:<58} p50 {p50:8.3f} ms  p99 {p99:8.3f} ms{load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300, help="camera frames to time (default %(default)s)")
    parser.add_argument("--commands", type=int, default=50, help="commands to time (default %(default)s)")
    parser.add_argument("--model", default="", help="checkpoint for the node (default: a tiny random one)")
    args = parser.parse_args(argv)

    import rclpy
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image

    from vla_node.image import fit_to_limits, image_to_rgb
    from vla_node.ros.node import VlaNode
    from vla_node.parser import BoxCodec, parse_actions
    from vla_node.ros.convert import image_decoder, plan_to_msg, status_to_msg
    from vla_node.actions import ActionPlan, CommandStatus, StatusCode

    model = args.model
    if not model:
        from training.tiny_models import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", family="qwen2_5_vl"))
    rclpy.init()
    node = VlaNode(parameter_overrides=[Parameter("model_path", value=model), Parameter("warmup", value=False)])
    runtime = node.runtime
    core = runtime.core

    rgb = np.random.RandomState(0).randint(0, 256, (1080, 1920, 3), dtype=np.uint8)
    message = Image(height=1080, width=1920, encoding="bgr8", step=1920 * 3, data=rgb.tobytes())
    message.header.frame_id = "camera"
    limits = core.backend.pixel_limits

    ours = timed(lambda: runtime._on_image(message), args.frames)
    naive = timed(lambda: fit_to_limits(image_to_rgb(1920, 1080, "bgr8", False, 1920 * 3, message.data), limits),
                  max(10, args.frames // 10))

    answer = 'MOVE_OBJECT(object="red cube", object_box=[10, 20, 60, 80], destination="blue bowl")'

    def per_command():
        frame = image_decoder(message)()
        fitted = fit_to_limits(frame, limits)
        core.prompt.chat_messages("put the red cube in the blue bowl")
        codec = BoxCodec(core.backend.coordinate_convention, (1920, 1080), (fitted.shape[1], fitted.shape[0]))
        steps = parse_actions(answer, core.vocab, codec)
        assert core.policy.check(steps, (1920, 1080)) is None
        plan = ActionPlan(command_id="c", command_text="put", steps=steps, raw_text=answer)
        plan_to_msg(plan)
        status_to_msg(CommandStatus(command_id="c", code=StatusCode.ACCEPTED))

    command = timed(per_command, args.commands)
    node.shutdown()
    node.destroy_node()
    rclpy.shutdown()

    print("node overhead, 1920x1080 bgr8 frames, model time excluded")
    print(summary("per frame, vla_node (keep latest, decode on demand)", ours, 30))
    print(summary("per frame, baseline (convert + resize every frame)", naive, 30))
    print(f"{'per-frame speed-up over baseline':<58} {statistics.median(naive) / statistics.median(ours):8.0f}x")
    print(summary("per command (decode once, prompt, parse, policy, msgs)", command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
