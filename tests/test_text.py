"""Command sanitising and whole-utterance stop-phrase detection."""

import time
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_node.text import (
    DEFAULT_STOP_PHRASES,
    CommandError,
    StopPhraseDetector,
    is_stop_phrase,
    sanitise_command,
    sanitize_command,
)


# ---- sanitising ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, clean",
    [
        ("put the red cube in the blue bowl", "put the red cube in the blue bowl"),
        ("  put\tthe cube\n\nin the bowl  ", "put the cube in the bowl"),
        ("caf\u0065\u0301", "caf\u00e9"),  # NFC composes e + combining acute
        ("red\x00 cube\x07\x1b[31m", "red cube[31m"),  # C0 controls removed
        ("blue\u200b bowl\ufeff", "blue bowl"),  # zero-width space and BOM removed
        ("\u202eevil\u202c text", "evil text"),  # bidi override removed
        ("line\u2028break\x85here", "line break here"),
        ("把红色方块\r\n放到蓝色碗里", "把红色方块 放到蓝色碗里"),
        ("private\ue000use", "privateuse"),
    ],
)
def test_sanitise(raw, clean):
    assert sanitise_command(raw) == clean


def test_us_spelling_is_the_same_function():
    assert sanitize_command is sanitise_command


@pytest.mark.parametrize("raw", ["", "   ", "\n\t", "\x00\x01", "\u200b\u200d"])
def test_empty_after_sanitising_is_refused(raw):
    with pytest.raises(CommandError, match="command is empty after removing control characters"):
        sanitise_command(raw)


def test_byte_limit_counts_utf8_bytes_and_says_so():
    assert sanitise_command("停" * 10, max_bytes=30) == "停" * 10  # 3 bytes each: exactly at the limit
    with pytest.raises(CommandError, match="command is 33 bytes of UTF-8 after sanitising, over the limit of 30 bytes"):
        sanitise_command("停" * 11, max_bytes=30)
    assert sanitise_command("a" * 30 + "\x00" * 5, max_bytes=30) == "a" * 30  # limit applies to the clean text


def test_huge_input_is_refused_quickly():
    started = time.perf_counter()
    with pytest.raises(CommandError, match="far over the limit of 512 bytes"):
        sanitise_command("x" * 10_000_000, max_bytes=512)
    assert time.perf_counter() - started < 0.5


def test_non_text_is_refused():
    with pytest.raises(CommandError, match="command must be text, got bytes"):
        sanitise_command(b"stop")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_sanitised_text_is_clean_or_refused(raw):
    try:
        clean = sanitise_command(raw, max_bytes=256)
    except CommandError:
        return
    assert clean == clean.strip() and "  " not in clean
    assert unicodedata.is_normalized("NFC", clean)
    assert all(unicodedata.category(c) not in {"Cc", "Cf", "Cs", "Co", "Cn"} for c in clean)
    assert len(clean.encode("utf-8")) <= 256
    assert sanitise_command(clean, max_bytes=256) == clean  # idempotent


# ---- stop phrases -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "utterance",
    [
        "stop", "Stop", "STOP!", "stop.", "Stop now", "stop now!!", "  stop  ", "Stop, stop!", "stop stop stop",
        "Halt!", "emergency stop", "Please stop.", "stop moving",
        "停", "停！", "停下", "停下来。", "别动", "别动！别动！", "停停停", "不要动", "急停", "ｓｔｏｐ",
    ],
)
def test_stop_phrases_are_detected(utterance):
    assert is_stop_phrase(utterance)


@pytest.mark.parametrize(
    "utterance",
    [
        "don't stop", "stop the red cube from rolling into the bowl", "put the stop sign in the bowl",
        "nonstop", "stopping", "bus stop", "stop by the blue bowl and pick the red cube",
        "不要停", "停车场", "把红色方块放到停车位", "", "!!!",
    ],
)
def test_ordinary_commands_are_not_stops(utterance):
    assert not is_stop_phrase(utterance)


def test_phrase_list_is_configurable():
    detector = StopPhraseDetector(["abort mission", "止まれ"])
    assert detector.is_stop("Abort mission!") and detector.is_stop("止まれ")
    assert not detector.is_stop("stop")
    assert is_stop_phrase("freeze", ["freeze"]) and not is_stop_phrase("halt", ["freeze"])


def test_an_empty_phrase_list_disables_detection():
    assert not is_stop_phrase("stop", [])
    assert not StopPhraseDetector(()).is_stop("stop")


def test_defaults_cover_english_and_chinese():
    assert {"stop", "halt", "停", "停下", "别动"} <= set(DEFAULT_STOP_PHRASES)
