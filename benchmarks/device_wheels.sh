#!/usr/bin/env bash
# Download the wheels the GPU benchmarks need beyond the device image (Python 3.12, x86-64, no
# network there) into .whl/, which is git-ignored and travels with `carry: [".whl"]`; also
# LLaMA-Factory's ZeRO configs (.whl/llamafactory/examples/deepspeed/) for deepspeed_zero.py.
# Versions: requirements/python.txt. Run here, where pip reaches PyPI (after source scripts/env.sh):
#     bash benchmarks/device_wheels.sh
# On the device, before the benchmark:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"  # a worktree's .git is a file
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
pin() { grep -i "^$1==" requirements/python.txt | head -1; }
packages=(
  "$(pin transformers)" "$(pin tokenizers)" "$(pin peft)" "$(pin xgrammar)" "$(pin pydantic)"
  "pydantic-core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')"
  "annotated-types==$(python3 -c 'import importlib.metadata as m; print(m.version("annotated-types"))')"
  "apache-tvm-ffi==$(python3 -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')"
  "typing-inspection==$(python3 -c 'import importlib.metadata as m; print(m.version("typing-inspection"))')"
  "$(pin hjson)"  # deepspeed's one requirement the device image lacks
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"

# DeepSpeed: PyPI has only its sdist. Build a pure-Python wheel with no op compiled (DS_BUILD_OPS=0):
# ZeRO-2/3 with the Trainer's torch optimizer needs none, so it imports without building CUDA code.
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
python3 -m pip download --no-deps --no-binary=:all: -d "$src" "$(pin deepspeed)"
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps -w .whl "$src"/deepspeed-*.tar.gz
# LLaMA-Factory's examples/deepspeed, as its PyPI sdist ships them (not committed here)
python3 -m pip download --no-deps --no-binary=:all: -d "$src" llamafactory==0.9.5
tar -xzf "$src"/llamafactory-0.9.5.tar.gz -C "$src" llamafactory-0.9.5/examples/deepspeed
mkdir -p .whl/llamafactory && mv "$src"/llamafactory-0.9.5/examples .whl/llamafactory/
du -sh .whl
