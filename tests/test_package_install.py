"""The colcon install exposes launch and config files, and a fresh clone sets up from scratch."""
import os
import subprocess
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
