"""Adapter changes while the node runs: checked at once, carried out in the background.

A parameter callback must answer at once and must not wait for the model (a load takes seconds
and waits for the generation in progress). So `check_change` decides from the parameter values
alone whether a change can be made (it takes no model lock), and `AdapterSwitcher` makes the
accepted changes one at a time on its own thread: load the new adapters, then activate the one
asked for. A load that fails stops that change: the adapter active before stays active, and the
outcome says what is loaded and active now, so the caller can report it and set its parameters
back to the truth. No ROS here.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vla_node.backends.base import BackendError
from vla_node.factory import parse_adapter_specs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterState:
    specs: tuple[str, ...]  # "name=path" entries as given (e.g. "zh=embedded"), in load order
    active: str  # "" = the base model

    @classmethod
    def of(cls, specs, active: str) -> AdapterState:
        """From parameter values: blank entries ("" is ROS's empty string array, or spaces) dropped."""
        return cls(tuple(spec.strip() for spec in specs if spec.strip()), active)

    def names(self) -> list[str]:
        return list(parse_adapter_specs(self.specs))


@dataclass(frozen=True)
class SwitchOutcome:
    requested: AdapterState
    now: AdapterState  # what is loaded and active after the change
    error: str = ""  # "" = done as requested

    def summary(self) -> str:
        active = self.now.active or "none (base model)"
        if self.error:
            return f"adapter change failed: {self.error}; active adapter still {active}"
        return f"adapters loaded: {', '.join(self.now.names()) or 'none'}; active adapter now {active}"


def check_change(current: AdapterState, specs: list[str] | tuple[str, ...], active: str,
                 local_paths: bool) -> str | None:
    """Why the adapters could not become `specs` with `active` in use, after `current` (the values
    accepted so far); None when they can. `local_paths`: adapter paths must be directories here
    (backends that load them; a server's adapters are names)."""
    try:
        wanted = parse_adapter_specs(specs)  # blank entries are skipped there
        have = parse_adapter_specs(current.specs)
    except (ValueError, BackendError) as error:  # a name given twice; 'embedded' without the bundled adapter
        return str(error)
    dropped = [name for name in have if name not in wanted]
    if dropped:
        return (f"adapters cannot be unloaded while the node runs: keep {', '.join(repr(n) for n in dropped)} "
                "in the list (restart the node without them to unload)")
    for name, path in wanted.items():
        if name in have and Path(path) != Path(have[name]):
            return f"adapter {name!r} is loaded from {have[name]}; give {path} another name"
        if local_paths and name not in have and not Path(path).is_dir():
            return f"adapter {name!r}: {path} is not a directory"
    if active and active not in wanted:
        return f"active_adapter {active!r} is not one of the adapters ({', '.join(wanted) or 'none'})"
    return None


class AdapterSwitcher:
    """Carries out accepted adapter changes in order on one background thread; `on_done(outcome)`
    hears each result from that thread. Generation goes on meanwhile (the backend's own lock
    serialises a load with the generation in progress)."""

    def __init__(self, backend, state: AdapterState, on_done: Callable[[SwitchOutcome], None]):
        self.backend = backend
        self.state = state  # what is loaded and active (the truth, not the request)
        self.doing = ""  # the change in progress, for diagnostics ("" = idle)
        self._on_done = on_done
        self._requests: queue.Queue[AdapterState | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vla-adapters", daemon=True)
        self._thread.start()

    def request(self, wanted: AdapterState) -> None:
        with self._lock:
            self._pending += 1
        self._requests.put(wanted)

    def pending(self) -> int:
        """Changes accepted and not finished yet."""
        with self._lock:
            return self._pending

    def close(self, timeout_s: float = 30.0) -> None:
        self._requests.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            wanted = self._requests.get()
            if wanted is None:
                return
            try:
                outcome = self._apply(wanted)
            except Exception as error:  # last line of defence: the thread goes on serving changes
                log.exception("adapter change failed")
                outcome = SwitchOutcome(wanted, self.state, f"{type(error).__name__}: {error}")
            finally:
                self.doing = ""
            with self._lock:
                self._pending -= 1
            try:
                self._on_done(outcome)
            except Exception:
                log.exception("adapter change callback failed")

    def _apply(self, wanted: AdapterState) -> SwitchOutcome:
        loaded = list(self.state.specs)
        have = parse_adapter_specs(loaded)
        active = self.state.active
        error = ""
        for spec, (name, path) in zip(wanted.specs, parse_adapter_specs(wanted.specs).items()):
            if name in have:
                continue
            self.doing = f"loading {name} from {path}"
            try:
                self.backend.load_adapter(path, name)
            except Exception as failure:
                error = f"adapter {name!r} at {path} refused: {failure}"
                break
            loaded.append(spec)
            have[name] = path
        if not error and wanted.active != active:
            self.doing = f"activating {wanted.active or 'the base model'}"
            try:
                self.backend.set_adapter(wanted.active or None)
                active = wanted.active
            except Exception as failure:
                error = f"cannot activate {wanted.active!r}: {failure}"
        self.state = AdapterState(tuple(loaded), active)
        return SwitchOutcome(wanted, self.state, error)
