"""Camera message fields -> RGB uint8 ndarray, and the Qwen pixel-limit resize.

Works on plain fields (no rclpy) so the node, rosbag replay and tests share it. The raw path is a
view over the message buffer (np.frombuffer + reshape/slice) plus at most one cvtColor.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import cv2
import numpy as np

MAX_SIDE = 16384
# A compressed frame may claim any size in a few bytes of header; decoding a claimed 30000x30000 JPEG
# would allocate gigabytes. 8K UHD (7680x4320, 33 Mpx) fits; more is refused before decoding.
MAX_COMPRESSED_PIXELS = 40_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0..SOF15 except DHT C4, JPG C8, DAC CC) carry height and width.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageError(ValueError):
    """The image cannot be used; the message says exactly what is wrong."""


@dataclass(frozen=True)
class _Encoding:
    channels: int
    dtype: str  # numpy dtype of one channel, little-endian form
    to_rgb: int | None  # cv2 conversion code; None = already RGB
    depth: bool = False  # depth-like: only with allow_depth=True
    sixteen_bit_colour: bool = False

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * np.dtype(self.dtype).itemsize


# sensor_msgs/image_encodings names. 8UC3/8UC4 are OpenCV's BGR(A) order (cv_bridge "passthrough").
# yuv422 is UYVY in ROS; yuv422_yuy2 is YUYV. Two bytes per pixel, hence channels=2.
_ENCODINGS: dict[str, _Encoding] = {
    "rgb8": _Encoding(3, "u1", None),
    "bgr8": _Encoding(3, "u1", cv2.COLOR_BGR2RGB),
    "rgba8": _Encoding(4, "u1", cv2.COLOR_RGBA2RGB),
    "bgra8": _Encoding(4, "u1", cv2.COLOR_BGRA2RGB),
    "mono8": _Encoding(1, "u1", cv2.COLOR_GRAY2RGB),
    "8uc1": _Encoding(1, "u1", cv2.COLOR_GRAY2RGB),
    "8uc3": _Encoding(3, "u1", cv2.COLOR_BGR2RGB),
    "8uc4": _Encoding(4, "u1", cv2.COLOR_BGRA2RGB),
    "rgb16": _Encoding(3, "<u2", None, sixteen_bit_colour=True),
    "bgr16": _Encoding(3, "<u2", cv2.COLOR_BGR2RGB, sixteen_bit_colour=True),
    "rgba16": _Encoding(4, "<u2", cv2.COLOR_RGBA2RGB, sixteen_bit_colour=True),
    "bgra16": _Encoding(4, "<u2", cv2.COLOR_BGRA2RGB, sixteen_bit_colour=True),
    "mono16": _Encoding(1, "<u2", cv2.COLOR_GRAY2RGB, depth=True),
    "16uc1": _Encoding(1, "<u2", cv2.COLOR_GRAY2RGB, depth=True),
    "32fc1": _Encoding(1, "<f4", cv2.COLOR_GRAY2RGB, depth=True),
    "yuv422": _Encoding(2, "u1", cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": _Encoding(2, "u1", cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": _Encoding(2, "u1", cv2.COLOR_YUV2RGB_YUYV),
    "yuyv": _Encoding(2, "u1", cv2.COLOR_YUV2RGB_YUYV),
}
SUPPORTED_ENCODINGS = tuple(sorted(_ENCODINGS))


def image_to_rgb(
    width: int,
    height: int,
    encoding: str,
    is_bigendian: bool | int,
    step: int,
    data,
    allow_depth: bool = False,
) -> np.ndarray:
    """sensor_msgs/Image fields -> HxWx3 uint8 RGB.

    When no conversion is needed (rgb8 without row padding) the result is a read-only view of `data`.
    """
    spec = _ENCODINGS.get(str(encoding).lower())
    if spec is None:
        raise ImageError(f"unknown image encoding '{encoding}' (supported: {', '.join(SUPPORTED_ENCODINGS)})")
    width, height = _check_size(width, height)
    if _as_int(step) is None:
        raise ImageError(f"step must be an integer number of bytes, got {step!r}")
    step = _as_int(step)
    if spec.depth and not allow_depth:
        raise ImageError(f"depth encoding '{encoding}' cannot be used as the camera image (use an RGB stream)")
    if spec.channels == 2 and width % 2:
        raise ImageError(f"'{encoding}' packs two pixels per 4 bytes, so width must be even, got {width}")
    row_bytes = width * spec.bytes_per_pixel
    if step < row_bytes:
        raise ImageError(
            f"step {step} is smaller than width*bytes_per_pixel = {width}*{spec.bytes_per_pixel} = {row_bytes} "
            f"for '{encoding}'"
        )
    try:
        buffer = np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"image data is not a byte buffer ({type(data).__name__}): {exc}") from None
    if buffer.size < step * height:
        raise ImageError(
            f"data has {buffer.size} bytes, expected at least step*height = {step}*{height} = {step * height}"
        )

    # Views only: rows (step may include padding) -> the pixel bytes of each row -> typed channels.
    rows = buffer[: step * height].reshape(height, step)[:, :row_bytes]
    dtype = np.dtype(spec.dtype).newbyteorder(">" if is_bigendian else "<") if spec.dtype != "u1" else np.uint8
    pixels = rows.view(dtype).reshape(height, width, spec.channels)

    if spec.sixteen_bit_colour:
        pixels = (pixels >> 8).astype(np.uint8)  # keep the high byte; one copy
    elif spec.depth:
        pixels = _depth_to_grey(pixels[:, :, 0])
    if spec.to_rgb is None:
        rgb = pixels if pixels.flags.c_contiguous else np.ascontiguousarray(pixels)
    else:
        source = pixels if spec.channels != 1 else pixels.reshape(height, width)
        rgb = cv2.cvtColor(source, spec.to_rgb)  # OpenCV reads padded (strided) rows without a copy
    if rgb.base is not None and np.may_share_memory(rgb, buffer):
        rgb.flags.writeable = False  # never let a consumer write into the message buffer
    return rgb


def _as_int(value) -> int | None:
    # numpy integers (rosbags) are fine; bool, float and str are not.
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_size(width, height) -> tuple[int, int]:
    w, h = _as_int(width), _as_int(height)
    if w is None or h is None or not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise ImageError(f"image size {width}x{height} is invalid: width and height must be integers 1..{MAX_SIDE}")
    return w, h


def _depth_to_grey(values: np.ndarray) -> np.ndarray:
    """Min-max of the finite values -> 0..255 (NaN/inf -> 0): a viewable picture, not a measurement."""
    values = values.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.where(finite, (values - low) * scale, 0.0)
    return np.clip(grey, 0, 255).astype(np.uint8)


def compressed_to_rgb(format: str, data) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> HxWx3 uint8 RGB."""
    fmt = str(format).lower()
    if "compresseddepth" in fmt:
        raise ImageError(f"compressed depth image ('{format}') cannot be used as the camera image")
    try:
        buffer = np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"compressed image data is not a byte buffer ({type(data).__name__}): {exc}") from None
    if buffer.size == 0:
        raise ImageError("compressed image data is empty")
    claimed = compressed_header_size(buffer)
    if claimed is not None:
        width, height = claimed
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or width * height > MAX_COMPRESSED_PIXELS:
            raise ImageError(f"compressed image header claims {width}x{height} pixels: width and height must be "
                             f"1..{MAX_SIDE} and the area at most {MAX_COMPRESSED_PIXELS} pixels")
    if buffer[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in bytes(buffer[-1024:]).rstrip(b"\x00")[-64:]:
        # libjpeg decodes a truncated file into a partly grey image and only warns; refuse it.
        # (Some cameras pad frames with zeros after the end-of-image marker; that is fine.)
        raise ImageError(f"truncated JPEG ({buffer.size} bytes, no end-of-image marker)")
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"could not decode {buffer.size} bytes of '{format}' (corrupt or unsupported data)")
    _check_size(bgr.shape[1], bgr.shape[0])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def compressed_header_size(buffer: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG start-of-frame header, without decoding; None if not found."""
    head = bytes(buffer[:24])
    if head.startswith(_PNG_SIGNATURE):
        if len(head) < 24 or head[12:16] != b"IHDR":
            return None
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not head.startswith(b"\xff\xd8"):
        return None
    data = buffer.tobytes() if buffer.size <= 65536 else bytes(buffer[:65536])  # headers come first
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None  # not a marker where one must be: corrupt, cv2 will say so
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in _JPEG_SOF:
            if position + 9 > len(data):
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return width, height
        if length < 2:
            return None
        position += 2 + length
    return None


@dataclass(frozen=True)
class PixelLimits:
    """Qwen processor pixel budget; factor = patch_size * merge_size (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""

    min_pixels: int
    max_pixels: int
    factor: int = 28

    def __post_init__(self):
        if not (0 < self.factor and 0 < self.min_pixels <= self.max_pixels):
            raise ValueError(f"need 0 < min_pixels <= max_pixels and factor > 0, got {self}")


def smart_resize(height: int, width: int, limits: PixelLimits) -> tuple[int, int]:
    """Same maths as transformers' qwen2_vl smart_resize: sides multiple of factor, area within limits."""
    factor, min_pixels, max_pixels = limits.factor, limits.min_pixels, limits.max_pixels
    if height <= 0 or width <= 0:
        raise ImageError(f"cannot resize a {width}x{height} image")
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ImageError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fit_to_limits(rgb: np.ndarray, limits: PixelLimits) -> np.ndarray:
    """Resize to the smart_resize size (cv2.INTER_AREA); returns `rgb` itself when it already fits."""
    height, width = rgb.shape[:2]
    new_height, new_width = smart_resize(height, width, limits)
    if (new_height, new_width) == (height, width):
        return rgb
    return cv2.resize(rgb, (new_width, new_height), interpolation=cv2.INTER_AREA)
