"""A stop event that turns set in the middle of a generation, deterministically: the backends read
a request's ``stop_event`` once before generating and then after every token."""
from __future__ import annotations

import threading


class SetOnCheck(threading.Event):
    """Reads as set from its ``check``-th ``is_set()`` call on (or once ``set()`` was called)."""

    def __init__(self, check: int):
        super().__init__()
        self.check = check
        self.calls = 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.check or super().is_set()
