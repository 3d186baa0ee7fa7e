"""Spoken command text: sanitising before it reaches the model, and stop-phrase detection.

Stop phrases are matched on the WHOLE normalised utterance ("Stop!", "stop now", "停！停！"), never as
a substring, so "don't stop" or "put the stop sign in the bowl" are ordinary commands.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Iterable

DEFAULT_MAX_COMMAND_BYTES = 1024
DEFAULT_STOP_PHRASES: tuple[str, ...] = (
    "stop", "stop now", "stop it", "stop please", "please stop",
    "stop moving", "stop everything", "stop the robot", "halt", "freeze", "abort", "emergency stop",
    "停", "停下", "停止", "停下来", "停一下", "别动", "不要动", "住手", "急停", "紧急停止",
)

# Line breaks and tabs become spaces; the rest of these categories is dropped:
# Cc control, Cf format (zero-width, bidi overrides), Cs lone surrogates, Co private use, Cn unassigned.
_WHITESPACE_CONTROLS = frozenset("\t\n\r\v\f\x1c\x1d\x1e\x1f\x85\u2028\u2029")
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
# Ideographs and kana have no spaces between words: each character is its own unit.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs: extension A, unified, compatibility
_CJK_CHAR = re.compile(f"[\u3040-\u30ff{_HAN}]")
# whitespace with a Han character on each side: written Chinese has no spaces between words, so these
# are a speech recogniser's pauses or chunk joins ("红 色 圆锥"), never meaning
_HAN_GAP = re.compile(f"(?<=[{_HAN}])\\s+(?=[{_HAN}])")


def drop_han_spaces(command: str) -> str:
    """The command without the spaces between two Chinese characters (any other space is kept)."""
    return _HAN_GAP.sub("", command)


class CommandError(ValueError):
    """The command cannot be used; the message says why (reported as BAD_COMMAND)."""


def sanitise_command(text: str, max_bytes: int = DEFAULT_MAX_COMMAND_BYTES) -> str:
    """NFC, control/format characters removed, whitespace collapsed; raises CommandError."""
    if not isinstance(text, str):
        raise CommandError(f"command must be text, got {type(text).__name__}")
    if len(text) > 4 * max_bytes:  # refuse huge input before spending time on it
        raise CommandError(f"command has {len(text)} characters, far over the limit of {max_bytes} bytes")
    kept = []
    for char in text:
        if char in _WHITESPACE_CONTROLS:
            kept.append(" ")
        elif unicodedata.category(char) not in _DROPPED_CATEGORIES:
            kept.append(char)
    cleaned = " ".join(unicodedata.normalize("NFC", "".join(kept)).split())
    if not cleaned:
        raise CommandError("command is empty after removing control characters and whitespace")
    size = len(cleaned.encode("utf-8"))
    if size > max_bytes:
        raise CommandError(f"command is {size} bytes of UTF-8 after sanitising, over the limit of {max_bytes} bytes")
    return cleaned


sanitize_command = sanitise_command  # US spelling, same function


def as_delivered(text: str) -> str:
    """What a ROS subscriber receives when `text` is published as a std_msgs/String: ROS strings
    are C strings, so everything from the first NUL on is lost ("\\x00go" arrives as "")."""
    return text.partition("\x00")[0]


def visible(text: str) -> str:
    """`text` for a table or a log line: line breaks, tabs and other non-printable characters
    (ANSI escapes included) written as Python escapes, so they can neither move the cursor nor hide."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def echo_refused(text: object, limit: int = 200) -> str:
    """A refused command as its status echoes it: the first `limit` characters, without control,
    format, surrogate, private-use or unassigned characters."""
    raw = text if isinstance(text, str) else repr(text)
    return "".join(c for c in raw[:limit] if unicodedata.category(c) not in _DROPPED_CATEGORIES)


def normalise_utterance(text: str) -> str:
    """NFKC, case-folded, punctuation and symbols turned into spaces, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    spaced = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in folded)
    return " ".join(spaced.split())


def _units(normalised: str) -> tuple[str, ...]:
    units: list[str] = []
    for word in normalised.split():
        units.extend(list(word) if _all_cjk(word) else [word])
    return tuple(units)


def _all_cjk(word: str) -> bool:
    return all(_CJK_CHAR.fullmatch(c) for c in word)


class StopPhraseDetector:
    """True when the whole utterance is a stop phrase, or only stop phrases repeated ("stop, stop!").

    An empty phrase list disables detection.
    """

    def __init__(self, phrases: Iterable[str] = DEFAULT_STOP_PHRASES):
        self.phrases = tuple(phrases)
        self._phrase_units = {_units(normalise_utterance(p)) for p in self.phrases} - {()}
        self._longest = max((len(u) for u in self._phrase_units), default=0)

    def is_stop(self, text: str) -> bool:
        units = _units(normalise_utterance(text))
        if not units or len(units) > 8 * self._longest:  # a long sentence is never just "stop"
            return False
        # covered[i]: units[:i] splits exactly into stop phrases.
        covered = [True] + [False] * len(units)
        for end in range(1, len(units) + 1):
            covered[end] = any(
                covered[end - size] and units[end - size : end] in self._phrase_units
                for size in range(1, min(self._longest, end) + 1)
            )
        return covered[-1]


def is_stop_phrase(text: str, phrases: Iterable[str] = DEFAULT_STOP_PHRASES) -> bool:
    """Whole-utterance stop check against `phrases` (an empty list never matches)."""
    return _detector(tuple(phrases)).is_stop(text)


@functools.lru_cache(maxsize=16)
def _detector(phrases: tuple[str, ...]) -> StopPhraseDetector:
    return StopPhraseDetector(phrases)
