"""One declaration per node parameter (vla_node.settings): the YAML, the README table, the core's
defaults and the ROS descriptors all come from it or agree with it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vla_node import settings
from vla_node.backends.base import BackendError
from vla_node.backends.openai_backend import ServerSettings
from vla_node.factory import RuntimeSettings, settings_from_parameters
from vla_node.pipeline import PipelineConfig
from vla_node.settings import PARAMETERS, ParameterError

ROOT = Path(__file__).resolve().parents[1]


def test_the_yaml_file_is_the_generated_one():
    committed = (ROOT / "config" / "vla_node.yaml").read_text(encoding="utf-8")
    assert committed == settings.yaml_text(), \
        "config/vla_node.yaml is stale: python -m vla_node.settings > config/vla_node.yaml"
    values = yaml.safe_load(committed)["/**"]["ros__parameters"]
    assert values == {name: p.default for name, p in PARAMETERS.items()}


def _readme_rows() -> list[tuple[list[str], list[str]]]:
    """(parameter names, default cells) of the README's parameter table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("Useful parameters"):]
    table = table[table.index("| parameter | default |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        names_cell, defaults_cell = (cell.strip() for cell in line.split(" | ")[:2])
        names = re.findall(r"`([a-z_]+)`", names_cell)
        defaults = [d.strip() for d in re.split(r", | / ", defaults_cell)]
        rows.append((names, defaults))
    return rows


def _literal(cell: str):
    """A default cell's value: `yaml` in backticks or a bare number; None for words."""
    if re.fullmatch(r"`[^`]*`", cell):
        return yaml.safe_load(cell[1:-1])
    if re.fullmatch(r"-?\d+(\.\d+)?", cell):
        return yaml.safe_load(cell)
    return None


def test_the_readme_table_names_declared_parameters_with_their_defaults():
    rows = _readme_rows()
    assert len(rows) >= 15
    checked = 0
    for names, defaults in rows:
        assert names and all(name in PARAMETERS for name in names), f"README names unknown parameters: {names}"
        assert len(defaults) in (1, len(names)), f"README row {names}: defaults {defaults}"
        for name, cell in zip(names, defaults * len(names) if len(defaults) == 1 else defaults):
            value = _literal(cell)
            if value is not None:
                assert value == PARAMETERS[name].default, f"README says {name} defaults to {cell}"
                checked += 1
    assert checked >= 20


def test_the_core_defaults_are_the_declared_ones():
    runtime, pipeline = settings_from_parameters({})
    assert runtime == RuntimeSettings() and pipeline == PipelineConfig()
    assert ServerSettings.from_parameters({name: p.default for name, p in PARAMETERS.items()}) == ServerSettings()
    assert PipelineConfig().queue_size == PARAMETERS["queue_size"].default
    assert RuntimeSettings().max_new_tokens == PARAMETERS["max_new_tokens"].default


def test_parameter_values_become_the_core_settings():
    runtime, pipeline = settings_from_parameters({
        "adapters": ["", "zh=/adapters/zh"], "min_confidence": 0.4, "max_steps": -1, "backend": "openai",
        "server_url": "http://gpu:8000/v1", "server_timeout_s": 3.0, "api_key_env": "KEY",
        "queue_size": 2, "stop_phrases": ["halt"]})
    assert runtime.adapters == ["zh=/adapters/zh"]
    assert runtime.min_confidence == 0.4 and runtime.max_steps is None
    assert runtime.server.url == "http://gpu:8000/v1" and runtime.server.timeout_s == 3.0
    assert runtime.server.api_key_env == "KEY"
    assert pipeline.queue_size == 2 and pipeline.stop_phrases == ("halt",)
    runtime, _ = settings_from_parameters({"server_url": "http://ignored"})
    assert runtime.server == ServerSettings()  # server settings only for backend openai


@pytest.mark.parametrize("name, value, message", [
    ("queue_size", 0, "queue_size must be >= 1, got 0"),
    ("max_image_age_s", 0.0, "max_image_age_s must be > 0, got 0.0"),
    ("camera_reliability", "sometimes",
     "camera_reliability must be one of auto, best_effort, reliable, not 'sometimes'"),
    ("server_model_family", "llava", "server_model_family must be one of '', qwen2_vl"),
    ("warmup", 1, "warmup must be a bool, got 1"),
    ("max_batch", 2.0, "max_batch must be a int, got 2.0"),
    ("stop_phrases", ["stop", 3], "stop_phrases must be a list of strings"),
    ("no_such_parameter", 1, "unknown parameter 'no_such_parameter'"),
])
def test_a_value_out_of_range_is_refused_by_name(name, value, message):
    with pytest.raises(ParameterError, match=re.escape(message)):
        settings.check(name, value)
    if name in PARAMETERS:
        with pytest.raises(ParameterError, match=re.escape(message)):
            settings_from_parameters({name: value})


def test_the_core_settings_check_their_values_by_the_declaration():
    with pytest.raises(ValueError, match="frame_buffer must be >= 1"):
        PipelineConfig(frame_buffer=0)
    with pytest.raises(BackendError, match="server_breaker_failures must be >= 1"):
        ServerSettings(breaker_failures=0)
    assert settings.check("min_confidence", 0) is None  # an int where a float is declared is a number


def test_coerce_types_command_line_text_like_the_default():
    assert settings.coerce("warmup", "false") is False
    assert settings.coerce("queue_size", "3") == 3
    assert settings.coerce("max_image_age_s", "2") == 2.0
    assert settings.coerce("adapters", "a=/x, b=/y") == ["a=/x", "b=/y"]
    assert settings.coerce("stop_phrases", '["停", "halt"]') == ["停", "halt"]
    with pytest.raises(ParameterError, match="queue_size: 'many' is not a int"):
        settings.coerce("queue_size", "many")


def test_the_node_declares_every_parameter_with_its_descriptor():
    rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (run `make setup`)")
    from rcl_interfaces.msg import ParameterType

    from vla_node.ros.node import VlaRuntime

    context = rclpy.context.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("settings_probe", context=context, start_parameter_services=False)
    try:
        own = set(node.list_parameters([], 0).names)  # use_sim_time and the like
        VlaRuntime(node)  # declares; the model loads only at configure
        assert set(node.list_parameters([], 0).names) - own == set(PARAMETERS)
        for name, parameter in PARAMETERS.items():
            (descriptor,) = node.describe_parameters([name])
            assert descriptor.description == parameter.description
            assert descriptor.read_only is (not parameter.runtime)
            assert descriptor.additional_constraints == parameter.range_text()
            expected = "/" + parameter.default if parameter.topic else parameter.default  # resolved in "/"
            assert node.get_parameter(name).value == expected
        assert node.describe_parameters(["stop_phrases"])[0].type == ParameterType.PARAMETER_STRING_ARRAY
        assert node.describe_parameters(["queue_size"])[0].additional_constraints == ">= 1"
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
