"""vla/debug_image: the frame each command was answered on, with the plan's boxes, labels and
status drawn (vla_node.drawing, the same drawing as the annotated PNGs).

Drawn and published only while someone subscribes: without subscribers a command costs one
subscription-count check. Transient local, depth 1: a late joiner (rviz2, Foxglove) gets the
latest picture at once; one that joins while nothing was published gets the latest answer drawn
within a second (`poll`, from a 1 s timer of the node: rclpy has no matched-event callback on
Humble). Each answer is drawn once: the worker and the poll claim it under the lock before drawing,
and a picture is published only while its answer is still the newest claimed.
"""
from __future__ import annotations

import threading

import cv2
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import Image

from vla_node.drawing import annotated_frame
from vla_node.pipeline import AnsweredCommand
from vla_node.ros.convert import ns_to_time

LATCHED = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                     durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)


class DebugImagePublisher:
    def __init__(self, node: Node, topic: str):
        self.node = node
        self.publisher = node.create_publisher(Image, topic, LATCHED)
        self._lock = threading.Lock()
        self._latest: AnsweredCommand | None = None
        self._drawn: AnsweredCommand | None = None  # the answer the latched picture shows
        self.published = 0

    def on_answer(self, answer: AnsweredCommand) -> None:
        """From the pipeline's worker (or the STOP path): draw and publish only if watched."""
        with self._lock:
            self._latest = answer
        if self.publisher.get_subscription_count() > 0:
            self._publish(answer)

    def poll(self) -> None:
        """A subscriber came after the latest answer was left undrawn: draw it now."""
        with self._lock:
            latest, drawn = self._latest, self._drawn
        if latest is not None and latest is not drawn and self.publisher.get_subscription_count() > 0:
            self._publish(latest)

    def _publish(self, answer: AnsweredCommand) -> None:
        with self._lock:
            if answer is self._drawn:  # the poll and the worker both saw it: draw it once
                return
            self._drawn = answer
        try:
            rgb = answer.rgb if answer.rgb is not None else answer.frame.decode()
        except Exception:  # BAD_IMAGE: the frame has no picture to draw on (its status says why)
            return
        status = answer.status
        steps = list(answer.plan.steps) if answer.plan is not None else []
        bgr = annotated_frame(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), steps, status.code.value,
                              f"{status.command_id}: {status.command_text}")
        message = Image(height=bgr.shape[0], width=bgr.shape[1], encoding="bgr8", is_bigendian=0,
                        step=bgr.shape[1] * 3, data=bgr.tobytes())
        message.header.stamp = ns_to_time(answer.frame.stamp_ns)  # the camera frame's time and frame:
        message.header.frame_id = answer.frame.frame_id  # rviz2 places it like the camera image
        with self._lock:
            if answer is not self._drawn:  # a newer answer was claimed meanwhile: its picture wins
                return
            self.publisher.publish(message)
            self.published += 1
