#!/usr/bin/env bash
# `make models` on a GPU machine of the device tool, within one call (<= 10 minutes), with what
# comes back fitting its limits (8 files of 16 MiB): the build's log and learning curve, and the
# models folder as a tar split into 15 MB parts. Run from the repository root there, with the
# wheels of benchmarks/device_wheels.sh carried in .whl/:
#     bash scripts/device_build_models.sh --stop-after base --base-steps auto --base-minutes 6
# A build stopped by --deadline-minutes resumes its schedule when the next call (on the same, still
# warm machine: the work folder is /tmp/emb) runs the same command again.
# and here, to unpack what came back:
#     cat FILES_AT/models.tgz.* | tar -xzf - -C .
# Arguments go to `python -m training.build_embedded` (--work and --out are set here).
set -uo pipefail
out="${OUT:?run on the device tool, which sets OUT}"
# the wheels once per machine: a second call on a warm machine (a resumed build) skips the install
wheels="$(ls -l .whl/*.whl | md5sum)"
if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  echo "$wheels" > /tmp/site/.wheels
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/build
# KEEP_BASE=1: the base in models/ (an earlier call's) is kept and only the adapter is trained
[ "${KEEP_BASE:-0}" = 1 ] && cp -r models/tabletop-tiny /tmp/build/
python3 -m training.build_embedded --work /tmp/emb --out /tmp/build --skip-eval "$@" 2>&1 | tee "$out/build.log"
status=${PIPESTATUS[0]}
# every stage's log history in one file (what comes back is at most 8 files)
python3 - "$out/log_histories.json" <<'PY'
import json, pathlib, sys
runs = {run.name: json.loads((run / "log_history.json").read_text())
        for run in sorted(pathlib.Path("/tmp/emb").glob("*_train")) if (run / "log_history.json").is_file()}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=1) + "\n")
PY
[ -f /tmp/build/learning_curve.png ] && cp /tmp/build/learning_curve.png "$out/"
tar -C /tmp/build -czf - . | split -b 15m - "$out/models.tgz."
ls -la "$out"
exit "$status"
