"""The terminal table vla-replay and the demo print: one row per command, each cell fitted to
its column in one pass over the text (a 100,000-character command costs what its column shows),
control characters shown escaped so that a recorded command cannot move the cursor or hide
itself in the table."""
from __future__ import annotations

import itertools
import sys
import unicodedata

from vla_node.report import CommandResult, steps_text
from vla_node.text import visible

COLUMNS = (("#", 3), ("command", 40), ("actions", 70), ("status", 18), ("latency", 9))
ELLIPSIS = "…"


def char_width(char: str) -> int:
    """Terminal columns of one character (East Asian wide and full-width take two)."""
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def fit(text: str, width: int) -> str:
    """`text` cut to `width` columns (ending in … when cut) and padded with spaces to exactly `width`.
    Reads at most width + 1 characters of the text."""
    kept: list[str] = []
    used = 0
    for char in text:
        w = char_width(char)
        if used + w > width:  # too wide: make room for the ellipsis
            while kept and used + 1 > width:
                used -= char_width(kept.pop())
            kept.append(ELLIPSIS)
            used += 1
            break
        kept.append(char)
        used += w
    return "".join(kept) + " " * (width - used)


def print_table(results: list[CommandResult], out=None) -> None:
    out = out if out is not None else sys.stdout  # looked up now: callers may have redirected it
    rows = [tuple(name for name, _ in COLUMNS)]
    for r in results:
        actions = steps_text(r.steps).replace("\n", "; ") or "-"
        latency = f"{r.latency_ms:.0f} ms" if r.latency_ms is not None else "-"
        rows.append((str(r.index), visible(r.text), visible(actions), r.code, latency))
    widths = [min(cap, max(columns(row[i], cap) for row in rows)) for i, (_, cap) in enumerate(COLUMNS)]
    for n, row in enumerate(rows):
        print("  ".join(fit(cell, width) for cell, width in zip(row, widths)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def columns(text: str, limit: int) -> int:
    """Terminal columns of `text`, counted up to just past `limit` (enough to know it is wider)."""
    return sum(char_width(c) for c in itertools.islice(text, limit + 1))
