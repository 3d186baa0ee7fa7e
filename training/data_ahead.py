"""The next training's data, read, validated and encoded in a thread while the current training runs.

Between two trainings of a build the GPU otherwise waits for the next one's data: on the H100 of
session 33 the embedded base's 206,440 samples took 52 s to read and validate and 89 s to encode,
the adapter's 58,200 another 58 s (benchmarks/results/embedded_build_h100_session33_not_kept.log).
A DataAhead runs ``ready()`` (which waits for renders and returns the training's vla-train overrides
with anything else the caller needs) and then training.train.prepare_data on those overrides, with
the encoded data left in host memory; train(prepared=...) checks it was made for the same data
settings and places it. The encoding's worker processes do the heavy work, so the thread holds the
interpreter little while the other training runs.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from training.config import TrainConfig


class DataAhead:
    def __init__(self, name: str, ready: Callable[[], tuple[Any, dict]], log: Callable[[str], None]):
        """``ready()`` -> (what the caller gets back, the training's vla-train overrides)."""
        self.name, self._ready, self._log = name, ready, log
        self._value: Any = None
        self._prepared = None
        self._thread = threading.Thread(target=self._run, name=f"data ahead: {name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from training.train import prepare_data

        started = time.time()
        try:
            value, overrides = self._ready()
            self._value = value
            self._prepared = prepare_data(TrainConfig(**overrides), place=False)
        except Exception as e:  # noqa: BLE001 - the training prepares its own data, and meets the error there
            self._value, self._prepared = None, None
            self._log(f"{self.name}'s data prepared ahead failed ({type(e).__name__}: {e}): its training "
                      "prepares its own")
            return
        self._log(f"{self.name}'s data prepared ahead in {time.time() - started:.0f} s")

    def result(self) -> tuple[Any, Any]:
        """(ready()'s value, the PreparedData), once the thread is done; (None, None) if it failed."""
        if self._thread.is_alive():
            waited = time.time()
            self._thread.join()
            self._log(f"waited {time.time() - waited:.0f} s for {self.name}'s data")
        value, prepared = self._value, self._prepared
        self._value = self._prepared = None  # the caller's only: its host copy goes once training placed it
        return value, prepared
