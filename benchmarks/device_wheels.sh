#!/usr/bin/env bash
# Download the wheels the GPU benchmarks need beyond the device image (Python 3.12, x86-64, no
# network there) into .whl/, which is git-ignored and travels with `carry: [".whl"]`.
# Versions: requirements/python.txt. Run here, where pip reaches PyPI:
#     bash benchmarks/device_wheels.sh
# On the device, before the benchmark:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i "^$1==" requirements/python.txt | head -1; }
packages=(
  "$(pin transformers)" "$(pin tokenizers)" "$(pin peft)" "$(pin xgrammar)" "$(pin pydantic)"
  "pydantic-core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')"
  "annotated-types==$(python3 -c 'import importlib.metadata as m; print(m.version("annotated-types"))')"
  "apache-tvm-ffi==$(python3 -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')"
  "typing-inspection==$(python3 -c 'import importlib.metadata as m; print(m.version("typing-inspection"))')"
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"
du -sh .whl
