"""Adapter changes in the background (vla_node/adapter_switch.py) on a real backend and LoRA adapter."""
from __future__ import annotations

import queue

from tests.fixtures_models import tiny_adapter, tiny_checkpoints, tiny_model_dir, tiny_qwen2_5_vl  # noqa: F401
from vla_node.adapter_switch import AdapterState, AdapterSwitcher, check_change


def test_blank_entries_of_the_adapters_parameter_are_no_adapters(tiny_model_dir, tiny_adapter):
    """ROS's empty string array is [""]; a params file may hold " ": neither names an adapter."""
    from vla_node.backends.transformers_backend import TransformersBackend

    wanted = AdapterState.of([f"a={tiny_adapter}", " ", ""], "a")
    assert wanted.specs == (f"a={tiny_adapter}",)
    assert check_change(AdapterState.of([""], ""), [f"a={tiny_adapter}", " "], "a", local_paths=True) is None

    backend = TransformersBackend(tiny_model_dir, device="cpu")
    outcomes: queue.Queue = queue.Queue()
    switcher = AdapterSwitcher(backend, AdapterState.of([""], ""), outcomes.put)
    try:
        switcher.request(wanted)
        outcome = outcomes.get(timeout=120)
        assert outcome.error == "", outcome.error
        assert outcome.now == wanted and switcher.state == wanted
        assert list(backend.adapters) == ["a"] and backend.adapter_id
    finally:
        switcher.close()
        backend.close()
