"""vla_node.drawing: the boxes, labels and status of a plan on its frame (the node's debug image and
the annotated PNGs draw with it)."""
from __future__ import annotations

import numpy as np

from vla_node.actions import ActionStep, Box
from vla_node.drawing import BOX_COLOURS, annotated_frame, status_colour


def test_boxes_land_where_the_plan_says_and_the_frame_is_not_touched():
    frame = np.full((240, 320, 3), 128, np.uint8)
    step = ActionStep(verb="MOVE_OBJECT", object="red cube", destination="blue bowl",
                      object_box=Box(x_min=40, y_min=60, x_max=120, y_max=150),
                      destination_box=Box(x_min=200, y_min=100, x_max=300, y_max=220))
    image = annotated_frame(frame, [step], "ACCEPTED", "cmd-1: put the red cube in the blue bowl")
    assert image.shape == frame.shape and (frame == 128).all(), "drawn on a copy"
    assert (image[105, 40] == BOX_COLOURS["object_box"]).all()  # left edge, half-way down
    assert (image[150, 80] == BOX_COLOURS["object_box"]).all()  # bottom edge
    assert (image[160, 300] == BOX_COLOURS["destination_box"]).all()  # right edge
    assert (image[200, 160] == 128).all(), "outside the boxes the scene is as it was"
    banner = image[:24].reshape(-1, 3)
    assert (banner == status_colour("ACCEPTED")).all(axis=1).any(), "the status is written in its colour"


def test_a_scaled_picture_scales_its_boxes_and_any_script_is_drawn():
    frame = np.zeros((100, 200, 3), np.uint8)
    step = ActionStep(verb="PICK_OBJECT", object="红色方块", object_box=Box(x_min=20, y_min=20, x_max=60, y_max=80))
    image = annotated_frame(frame, [step], "REJECTED_BY_POLICY", "停下", scale=2.0)
    assert image.shape == (200, 400, 3)
    assert (image[100, 40] == BOX_COLOURS["object_box"]).all()
    assert (image[:24].reshape(-1, 3) == status_colour("REJECTED_BY_POLICY")).all(axis=1).any()
