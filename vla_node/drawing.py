"""What a plan looks like on its frame: the boxes, labels and status drawn on the camera image.

One drawing for every picture of a plan: the node's vla/debug_image and the demo's and vla-replay's
annotated PNGs (vla_node.demo). Images are BGR uint8 (OpenCV's order); text in any script (CJK
through OpenCV 5's Unicode font or PIL with a CJK font, else '?').
"""
from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from vla_node.actions import ActionStep

BOX_COLOURS = {"object_box": (40, 200, 40), "destination_box": (230, 120, 30)}  # BGR: green, blue
STATUS_COLOURS = {"ACCEPTED": (60, 170, 60), "STOPPED": (40, 140, 230)}  # BGR; anything else red
OTHER_STATUS_COLOUR = (60, 60, 220)
_FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
)


def status_colour(code: str) -> tuple[int, int, int]:
    return STATUS_COLOURS.get(code, OTHER_STATUS_COLOUR)


@functools.lru_cache(maxsize=8)  # a .ttc is tens of MB: read once per size, not per label
def _cjk_font(size: int):
    try:
        from PIL import ImageFont
    except ImportError:
        return None
    for path in _FONT_CANDIDATES:
        if Path(path).is_file():
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return None


def clip(text: str, width: int) -> str:
    """`text` cut to `width` characters, a cut marked with "~"."""
    return text if len(text) <= width else text[: width - 1] + "~"


def put_text(image: np.ndarray, text: str, origin: tuple[int, int], colour=(255, 255, 255),
             scale: float = 0.5) -> None:
    """ASCII with cv2's Hershey font; other scripts with OpenCV 5's Unicode font face, else through
    PIL when a CJK font is installed, else '?'."""
    if text.isascii():
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
        return
    if hasattr(cv2, "FontFace"):  # OpenCV >= 5 ships a Unicode font (CJK included)
        try:
            cv2.putText(image, text, origin, colour, cv2.FontFace("uni"), int(round(32 * scale)))
            return
        except cv2.error:
            pass
    font = _cjk_font(int(28 * scale))
    if font is None:
        text = "".join(c if c.isascii() else "?" for c in text)
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
        return
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image[:, :, ::-1])
    ImageDraw.Draw(pil).text((origin[0], origin[1] - int(22 * scale)), text, font=font, fill=colour[::-1])
    image[:] = np.asarray(pil)[:, :, ::-1]


def draw_plan(image: np.ndarray, steps: list[ActionStep], scale: float = 1.0) -> None:
    """Each step's boxes (object green, destination blue; original camera pixels times `scale`)
    with a 'step:label' tag above, drawn in place."""
    for number, step in enumerate(steps, 1):
        for key, colour in BOX_COLOURS.items():
            box = getattr(step, key)
            if box is None:
                continue
            x1, y1, x2, y2 = (int(round(v * scale)) for v in box.as_list())
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, 2)
            label = f"{number}:{step.object if key == 'object_box' else step.destination}"
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
            top = max(y1 - th - 6, 0)
            cv2.rectangle(image, (x1, top), (x1 + tw + 6, top + th + 6), colour, -1)
            put_text(image, label, (x1 + 3, top + th + 2))


def draw_status(image: np.ndarray, code: str, text: str) -> None:
    """A banner along the top edge: the status code in its colour, then `text` (cut to fit)."""
    height = 24
    banner = image[:height]
    banner[:] = (banner.astype(np.uint16) * 2 // 5).astype(np.uint8)  # darkened, the scene still shows
    line = f"{code}  {text}" if text else code
    limit = max(8, image.shape[1] // 9)  # about what fits at this font size
    put_text(image, clip(line, limit), (6, 17), status_colour(code), 0.5)


def annotated_frame(bgr: np.ndarray, steps: list[ActionStep], code: str, text: str = "",
                    scale: float = 1.0) -> np.ndarray:
    """A copy of the frame (resized by `scale`) with the plan's boxes and labels and the status drawn."""
    if scale != 1.0:
        image = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    else:
        image = np.array(bgr, dtype=np.uint8, copy=True)
    draw_plan(image, steps, scale)
    draw_status(image, code, text)
    return image
