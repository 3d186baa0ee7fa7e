"""The colcon install exposes launch and config files, and a fresh clone sets up from scratch."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ament_index = pytest.importorskip("ament_index_python.packages", reason="ament_index_python missing")


def test_share_directory_has_launch_config_and_messages():
    share = Path(ament_index.get_package_share_directory("vla_node"))
    assert (share / "launch" / "robot.launch.py").is_file()
    assert (share / "config" / "vla_node.yaml").is_file()
    assert (share / "config" / "actions.yaml").is_file()
    assert (share / "msg" / "ActionPlan.msg").is_file()
    assert (share / "package.xml").is_file()


def test_installed_executable_exists():
    prefix = Path(ament_index.get_package_prefix("vla_node"))
    executable = prefix / "lib" / "vla_node" / "vla_node"
    assert executable.is_file() and os.access(executable, os.X_OK)


@pytest.mark.slow
def test_fresh_clone_sets_up_and_imports_messages(tmp_path):
    """git clone + the README's set-up, then `import vla_node.msg` from the clone's install.

    The clone borrows this checkout's venv (the multi-GB wheels are the same) but builds
    its own package from scratch with colcon.
    """
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # Uncommitted work of a developer's tree is not in the clone: copy the tracked-to-be files.
    subprocess.run(f"cd {REPO} && git ls-files -co --exclude-standard -z | xargs -0 -I{{}} cp --parents {{}} {clone}",
                   shell=True, check=True)
    (clone / ".venv").symlink_to(REPO / ".venv")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AMENT_", "COLCON_", "CMAKE_PREFIX", "PYTHONPATH", "LD_LIBRARY_PATH"))}
    setup = subprocess.run(["make", "setup"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    check = subprocess.run(
        ["bash", "-c", f"source {clone}/scripts/env.sh && cd / && "
                       "python -c 'import vla_node.msg as m; print(m.__file__); print(m.ActionPlan())'"],
        env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert str(clone / "install") in check.stdout


# ------------------------------------------------------------------------------- pip extras
ONNX_RUN = """
import sys
import numpy as np
from vla_node.backends.base import GenerationRequest
from vla_node.factory import RuntimeSettings, build_core
from vla_node.prompt import PromptBuilder

core = build_core(RuntimeSettings(backend="onnx", model_path=sys.argv[1], device="cpu", max_new_tokens=48))
rgb = np.random.RandomState(0).randint(0, 256, (120, 160, 3), dtype=np.uint8)
plan, status = core.infer(rgb, "pick up the red cube")
print("STATUS", status.code.value, status.detail[:200])
result = core.backend.generate(GenerationRequest(image=rgb, messages=core.prompt.chat_messages("pick up the red cube"),
                                                 max_new_tokens=16))
print("TEXT", repr(result.text))
print("LOADED", sorted(m for m in ("torch", "transformers", "peft", "rclpy") if m in sys.modules))
"""


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml here")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _project() -> dict:
    return _pyproject()["project"]


def _build_system() -> dict:
    return _pyproject()["build-system"]


def _pip(python, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", *args, "--disable-pip-version-check", "--no-input"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_onnx_extra_alone_runs_the_onnx_backend_without_torch(tmp_path):
    """A fresh venv with `pip install "vla_node[onnx]"` (no torch, no ROS) answers a command with the
    onnx backend on a trained model's `vla-export --onnx` folder (the Qwen2.5-VL embedded model of 2026-12-01,
    tests/data/tabletop-tiny-qwen2_5_vl; tests/test_onnx_backend.py covers today's Qwen3-VL one).

    Wheels come from a wheelhouse (~/.cache/vla_node/wheelhouse, or $VLA_WHEELHOUSE) filled from
    PyPI on first use, at the versions this checkout's venv runs; the test skips when PyPI cannot
    be reached and the wheelhouse lacks them."""
    embedded = REPO / "tests" / "data" / "tabletop-tiny-qwen2_5_vl"
    if not (embedded / "config.json").is_file():
        pytest.skip("the Qwen2.5-VL test model is missing")
    pytest.importorskip("torch", reason="the export needs torch (this checkout's venv)")
    project = _project()
    requirements = list(project["dependencies"]) + list(project["optional-dependencies"]["onnx"])
    assert not any(r.split(">")[0].split("=")[0] in ("torch", "transformers") for r in requirements)
    wheelhouse = Path(os.environ.get("VLA_WHEELHOUSE", Path.home() / ".cache" / "vla_node" / "wheelhouse"))
    wheelhouse.mkdir(parents=True, exist_ok=True)
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout
    constraints = tmp_path / "constraints.txt"  # the versions this checkout is tested with
    constraints.write_text("\n".join(line for line in frozen.splitlines() if "==" in line) + "\n")
    build = list(_build_system()["requires"]) + ["wheel"]  # the isolated build takes them from the wheelhouse too
    fetched = _pip(sys.executable, "download", "--dest", str(wheelhouse), "--find-links", str(wheelhouse),
                   "--only-binary", ":all:", "-c", str(constraints), *requirements, *build)
    if fetched.returncode != 0:
        pytest.skip(f"cannot fetch the [onnx] wheels (PyPI unreachable?): {fetched.stderr.strip()[-300:]}")

    from training.export import main as export_main

    exported = tmp_path / "tabletop-tiny-onnx"
    assert export_main(["--model", str(embedded), "--onnx", str(exported)]) == 0

    source = tmp_path / "src"  # the package's own files only: the build writes next to them
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "config", "vla_node"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (REPO / name).is_dir() else {}))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "AMENT_", "COLCON_", "LD_LIBRARY"))}
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
                              "--disable-pip-version-check", f"{source}[onnx]"],
                             capture_output=True, text=True, timeout=900, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            env=env, check=True).stdout.lower()
    assert "onnxruntime==" in listed and "torch==" not in listed and "transformers==" not in listed

    run = subprocess.run([str(python), "-c", ONNX_RUN, str(exported)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert lines["STATUS"].split()[0] in ("ACCEPTED", "PARSE_ERROR", "REJECTED_BY_POLICY"), run.stdout
    assert lines["TEXT"] not in ("''", '""'), "the model generated text"
    assert lines["LOADED"] == "[]", "no torch, transformers, peft or rclpy in that process"
