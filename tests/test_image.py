"""Camera fields -> RGB: every encoding, padding, endianness, compressed data, corrupt data, resizing."""

import array

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_node.image import (
    SUPPORTED_ENCODINGS,
    ImageError,
    PixelLimits,
    compressed_to_rgb,
    fit_to_limits,
    image_to_rgb,
    smart_resize,
)

H, W = 5, 7
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (H, W), dtype=np.uint8)


def pad_rows(pixels: np.ndarray, padding: int) -> tuple[bytes, int]:
    """Bytes of `pixels` (H x rowbytes) with `padding` junk bytes after each row."""
    rows = pixels.reshape(pixels.shape[0], -1).view(np.uint8)
    junk = np.full((rows.shape[0], padding), 0xAB, np.uint8)
    padded = np.concatenate([rows, junk], axis=1)
    return padded.tobytes(), padded.shape[1]


def decode(encoding, pixels, padding=0, bigendian=False, **kwargs):
    data, step = pad_rows(np.ascontiguousarray(pixels), padding)
    return image_to_rgb(pixels.shape[1], pixels.shape[0], encoding, bigendian, step, data, **kwargs)


# ---- 8-bit colour and grey ----------------------------------------------------------------------
COLOUR_CASES = {
    "rgb8": lambda: RGB,
    "bgr8": lambda: RGB[:, :, ::-1],
    "8UC3": lambda: RGB[:, :, ::-1],  # OpenCV's BGR order
    "rgba8": lambda: np.dstack([RGB, np.full((H, W), 9, np.uint8)]),
    "bgra8": lambda: np.dstack([RGB[:, :, ::-1], np.full((H, W), 9, np.uint8)]),
    "8UC4": lambda: np.dstack([RGB[:, :, ::-1], np.full((H, W), 9, np.uint8)]),
}


@pytest.mark.parametrize("padding", [0, 1, 13])
@pytest.mark.parametrize("encoding", sorted(COLOUR_CASES))
def test_colour_encodings(encoding, padding):
    out = decode(encoding, COLOUR_CASES[encoding](), padding)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("padding", [0, 3])
@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_grey_encodings(encoding, padding):
    out = decode(encoding, GREY, padding)
    np.testing.assert_array_equal(out, np.dstack([GREY] * 3))


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("padding", [0, 2])
@pytest.mark.parametrize("encoding, order", [("rgb16", slice(None)), ("bgr16", slice(None, None, -1))])
def test_16_bit_colour_keeps_the_high_byte(encoding, order, padding, bigendian):
    wide = RGB.astype(np.uint16) * 256 + 77  # low byte is noise
    wide = wide[:, :, order].astype(">u2" if bigendian else "<u2")
    np.testing.assert_array_equal(decode(encoding, wide, padding, bigendian), RGB)


def test_rgba16():
    wide = np.dstack([RGB, np.zeros((H, W), np.uint8)]).astype("<u2") * 256
    np.testing.assert_array_equal(decode("rgba16", wide), RGB)


def test_encoding_names_are_case_insensitive():
    np.testing.assert_array_equal(decode("RGB8", RGB), RGB)
    np.testing.assert_array_equal(decode("8uc3", RGB[:, :, ::-1]), RGB)


# ---- packed YUV ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "encoding, layout",
    [("yuv422", "UYVY"), ("uyvy", "UYVY"), ("yuv422_yuy2", "YUYV"), ("yuyv", "YUYV")],
)
def test_packed_yuv(encoding, layout):
    luma = np.array([[16, 235, 126, 126]], np.uint8).repeat(2, axis=0)  # black, white, mid grey
    chroma = np.full_like(luma, 128)  # no colour
    packed = np.empty((2, 4, 2), np.uint8)
    if layout == "UYVY":
        packed[:, :, 0], packed[:, :, 1] = chroma, luma
    else:
        packed[:, :, 0], packed[:, :, 1] = luma, chroma
    out = decode(encoding, packed, padding=4)
    assert out.shape == (2, 4, 3)
    assert np.all(np.abs(out[:, 0].astype(int) - 0) <= 2)
    assert np.all(np.abs(out[:, 1].astype(int) - 255) <= 2)
    assert np.all(out[:, 2, 0] == out[:, 2, 1]) and np.all(out[:, 2, 1] == out[:, 2, 2])


def test_packed_yuv_needs_an_even_width():
    with pytest.raises(ImageError, match="width must be even, got 3"):
        image_to_rgb(3, 1, "yuv422", False, 8, bytes(8))


# ---- depth-like encodings -----------------------------------------------------------------------
@pytest.mark.parametrize("encoding, dtype", [("mono16", "<u2"), ("16UC1", "<u2"), ("32FC1", "<f4")])
def test_depth_encodings_are_refused_as_the_camera(encoding, dtype):
    with pytest.raises(ImageError, match=f"depth encoding '{encoding}' cannot be used as the camera"):
        decode(encoding, np.zeros((H, W), dtype))


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("encoding, dtype", [("16UC1", "u2"), ("mono16", "u2"), ("32FC1", "f4")])
def test_depth_is_normalised_to_grey_when_allowed(encoding, dtype, bigendian):
    values = np.array([[1000, 2000], [3000, 5000]], dtype=(">" if bigendian else "<") + dtype)
    out = decode(encoding, values, padding=2, bigendian=bigendian, allow_depth=True)
    expected = np.array([[0, 64], [128, 255]])
    assert np.all(np.abs(out[:, :, 0].astype(int) - expected) <= 1)
    assert np.array_equal(out[:, :, 0], out[:, :, 2])


def test_float_depth_with_nan_and_constant_images():
    values = np.array([[np.nan, 1.0], [2.0, np.inf]], "<f4")
    out = decode("32FC1", values, allow_depth=True)[:, :, 0]
    np.testing.assert_array_equal(out, [[0, 0], [255, 0]])
    assert not decode("32FC1", np.full((2, 2), np.nan, "<f4"), allow_depth=True).any()
    assert not decode("16UC1", np.full((2, 2), 7, "<u2"), allow_depth=True).any()


# ---- buffers and copies -------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: array.array("B", b), lambda b: np.frombuffer(b, np.uint8)])
def test_any_byte_buffer_is_accepted(wrap):
    out = image_to_rgb(W, H, "rgb8", False, W * 3, wrap(RGB.tobytes()))
    np.testing.assert_array_equal(out, RGB)


def test_unpadded_rgb8_is_a_read_only_view_of_the_message():
    data = bytearray(RGB.tobytes())
    out = image_to_rgb(W, H, "rgb8", False, W * 3, data)
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))
    assert not out.flags.writeable


def test_padded_rgb8_is_one_contiguous_copy():
    out = decode("rgb8", RGB, padding=5)
    assert out.flags.c_contiguous and out.flags.writeable


def test_numpy_integer_fields_are_accepted():
    out = image_to_rgb(np.uint32(W), np.uint32(H), "rgb8", np.uint8(0), np.uint32(W * 3), RGB.tobytes())
    np.testing.assert_array_equal(out, RGB)


def test_extra_trailing_bytes_are_ignored():
    out = image_to_rgb(W, H, "rgb8", False, W * 3, RGB.tobytes() + b"\x00" * 10)
    np.testing.assert_array_equal(out, RGB)


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        ((7, 5, "rgb8", False, 20, bytes(200)), "step 20 is smaller than width*bytes_per_pixel = 7*3 = 21 for 'rgb8'"),
        ((7, 5, "rgb16", False, 41, bytes(300)), "step 41 is smaller than width*bytes_per_pixel = 7*6 = 42"),
        ((7, 5, "rgb8", False, 21, bytes(104)), "data has 104 bytes, expected at least step*height = 21*5 = 105"),
        ((7, 5, "rgb8", False, 10**12, bytes(105)), "data has 105 bytes, expected at least step*height"),
        ((0, 5, "rgb8", False, 0, b""), "image size 0x5 is invalid"),
        ((7, 0, "rgb8", False, 21, b""), "image size 7x0 is invalid"),
        ((20000, 5, "rgb8", False, 60000, b""), "image size 20000x5 is invalid"),
        ((-1, 5, "rgb8", False, 21, b""), "image size -1x5 is invalid"),
        ((7.0, 5, "rgb8", False, 21, bytes(105)), "image size 7.0x5 is invalid"),
        ((7, 5, "rgb8", False, 21.5, bytes(105)), "step must be an integer number of bytes, got 21.5"),
        ((7, 5, "bayer_rggb8", False, 7, bytes(35)), "unknown image encoding 'bayer_rggb8' (supported:"),
        ((7, 5, "", False, 7, bytes(35)), "unknown image encoding ''"),
        ((7, 5, "rgb8", False, 21, "not bytes"), "image data is not a byte buffer"),
    ],
)
def test_invalid_images_say_exactly_what_is_wrong(args, message):
    with pytest.raises(ImageError) as caught:
        image_to_rgb(*args)
    assert message in str(caught.value)


def test_every_supported_encoding_decodes_a_blank_image():
    for encoding in SUPPORTED_ENCODINGS:
        out = image_to_rgb(4, 2, encoding, False, 4 * 8, bytes(2 * 4 * 8), allow_depth=True)
        assert out.shape == (2, 4, 3) and out.dtype == np.uint8, encoding


# ---- compressed ---------------------------------------------------------------------------------
def encoded(ext: str, rgb: np.ndarray = RGB) -> bytes:
    ok, buffer = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buffer.tobytes()


_XS, _YS = np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 48))
SMOOTH = np.dstack([_XS, _YS, np.full_like(_XS, 90.0)]).astype(np.uint8)  # gradients survive JPEG well


@pytest.mark.parametrize("fmt", ["png", "rgb8; png compressed bgr8", "PNG"])
def test_png_is_lossless(fmt):
    np.testing.assert_array_equal(compressed_to_rgb(fmt, encoded(".png")), RGB)


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8"])
def test_jpeg_decodes_to_rgb(fmt):
    out = compressed_to_rgb(fmt, encoded(".jpg", SMOOTH))
    assert out.shape == SMOOTH.shape
    assert np.abs(out.astype(int) - SMOOTH.astype(int)).mean() < 4  # channel order right, lossy codec


def test_grey_png_becomes_three_channels():
    ok, buffer = cv2.imencode(".png", GREY)
    out = compressed_to_rgb("png", buffer.tobytes())
    np.testing.assert_array_equal(out, np.dstack([GREY] * 3))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "compressed image data is empty"),
        (b"definitely not an image" * 10, "could not decode 230 bytes of 'jpeg'"),
        (bytes(RNG.integers(0, 256, 500, dtype=np.uint8)), "could not decode 500 bytes"),
    ],
)
def test_corrupt_compressed_data(data, message):
    with pytest.raises(ImageError, match=message):
        compressed_to_rgb("jpeg", data)


def test_truncated_jpeg_is_refused_not_half_decoded():
    data = encoded(".jpg", SMOOTH)
    with pytest.raises(ImageError, match="truncated JPEG"):
        compressed_to_rgb("jpeg", data[: len(data) // 2])


def test_jpeg_padded_with_zeros_after_the_end_marker_is_fine():
    out = compressed_to_rgb("jpeg", encoded(".jpg", SMOOTH) + bytes(300))
    assert out.shape == SMOOTH.shape


def test_truncated_png_is_refused():
    data = encoded(".png", SMOOTH)
    with pytest.raises(ImageError, match="could not decode"):
        compressed_to_rgb("png", data[: len(data) // 2])


def test_compressed_depth_is_refused():
    with pytest.raises(ImageError, match="compressed depth image"):
        compressed_to_rgb("16UC1; compressedDepth png", encoded(".png"))


# ---- smart_resize and fit_to_limits -------------------------------------------------------------
QWEN25 = PixelLimits(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, factor=28)
QWEN3 = PixelLimits(min_pixels=64 * 64, max_pixels=32 * 32 * 1280, factor=32)


@pytest.mark.parametrize(
    "height, width, limits, expected",
    [
        (480, 640, QWEN25, (476, 644)),
        (480, 640, QWEN3, (480, 640)),
        (1080, 1920, QWEN25, (728, 1316)),  # over max_pixels: scaled down, multiples of 28
        (10, 10, QWEN25, (56, 56)),  # under min_pixels: scaled up
        (480, 640, PixelLimits(min_pixels=3136, max_pixels=200704, factor=28), (364, 504)),
    ],
)
def test_smart_resize_known_values(height, width, limits, expected):
    assert smart_resize(height, width, limits) == expected
    h, w = expected
    assert h % limits.factor == 0 and w % limits.factor == 0
    assert limits.min_pixels <= h * w <= limits.max_pixels


def test_smart_resize_refuses_extreme_aspect_ratios_and_bad_limits():
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(1, 300, QWEN25)
    with pytest.raises(ValueError):
        PixelLimits(min_pixels=100, max_pixels=10)


@settings(max_examples=200, deadline=None)
@given(st.integers(20, 4000), st.integers(20, 4000), st.sampled_from([QWEN25, QWEN3]))
def test_smart_resize_matches_transformers(height, width, limits):
    qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    if max(height, width) / min(height, width) > 200:
        return
    expected = qwen.smart_resize(height, width, factor=limits.factor, min_pixels=limits.min_pixels, max_pixels=limits.max_pixels)
    assert smart_resize(height, width, limits) == tuple(expected)
    assert smart_resize(*expected, limits) == tuple(expected)  # idempotent: the processor will not resize again


def test_fit_to_limits_resizes_to_the_smart_size_and_skips_fitting_images():
    frame = np.zeros((480, 640, 3), np.uint8)
    fitted = fit_to_limits(frame, QWEN25)
    assert fitted.shape == (476, 644, 3) and fitted.dtype == np.uint8
    assert fit_to_limits(fitted, QWEN25) is fitted
    assert fit_to_limits(frame, QWEN3) is frame
