"""Records what a CommandPipeline (or node) hands its plan and status callbacks, for assertions."""
from __future__ import annotations

import threading

from vla_node.actions import StatusCode


class Recorder:
    """`on_plan` / `on_status` callbacks; `events` keeps their order: ("plan" | "status", id, code)."""

    def __init__(self):
        self.plans, self.statuses = [], []
        self.events: list[tuple[str, str, str]] = []
        self.changed = threading.Condition()

    def on_plan(self, plan):
        with self.changed:
            self.plans.append(plan)
            self.events.append(("plan", plan.command_id, ""))
            self.changed.notify_all()

    def on_status(self, status):
        with self.changed:
            self.statuses.append(status)
            self.events.append(("status", status.command_id, status.code.value))
            self.changed.notify_all()

    def wait(self, count: int, timeout_s: float = 120.0) -> list:
        """The statuses once at least `count` have arrived (fails the test after `timeout_s`)."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.statuses) >= count, timeout_s), (
                f"expected {count} statuses, got {[(s.command_id, s.code.value) for s in self.statuses]}")
            return list(self.statuses)

    def code(self, command_id: str) -> StatusCode:
        """The one status code of `command_id` (a str enum: compares equal to "ACCEPTED" etc.)."""
        (status,) = [s for s in self.statuses if s.command_id == command_id]
        return status.code

    def codes(self) -> dict[str, str]:
        return {s.command_id: s.code.value for s in self.statuses}
