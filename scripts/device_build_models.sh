#!/usr/bin/env bash
# `make models` on a GPU machine of the device tool, whose calls last at most 10 minutes, with what
# comes back fitting its limits (8 files of 16 MiB): the build's log, every stage's log history and
# the learning curve, and (once the build has ended) the models folder as a tar split into 15 MB parts.
# Run from the repository root there, with the wheels of benchmarks/device_wheels.sh carried in .whl/:
#     bash scripts/device_build_models.sh [build_embedded arguments]
# The build runs in a process session of its own (setsid), so it outlives the call: each call starts
# it (unless it already runs, or has ended), then follows its log for FOLLOW_SECONDS (default 560) or
# until it ends. Repeat the same call on the still-warm machine (it is given back after 30 s idle) until
# it says the build ended: one process trains the whole schedule, encoding and compiling once. A build
# that a lost machine interrupted resumes from its last checkpoint in the work folder (/tmp/emb) when
# run again on the same machine; --deadline-minutes stops each training early and saves instead.
# And here, to unpack what came back:
#     cat FILES_AT/models.tgz.* | tar -xzf - -C .
# Arguments go to `python -m training.build_embedded` (--work, --out and --skip-eval are set here).
set -uo pipefail
out="${OUT:?run on the device tool, which sets OUT}"
follow="${FOLLOW_SECONDS:-560}"
run=/tmp/build_run  # the running build's pid, log and exit status
mkdir -p "$run" /tmp/build
if [ -f "$run/pid" ] && kill -0 "$(cat "$run/pid")" 2>/dev/null; then
  echo "build running since $(date -r "$run/pid" +%T) (pid $(cat "$run/pid")): following it; arguments of this call unused"
elif [ -f "$run/status" ]; then
  echo "the build already ended with status $(cat "$run/status"): packing it (rm -r $run to build again)"
else
  # the wheels once per machine
  wheels="$(ls -l .whl/*.whl | md5sum)"
  if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    echo "$wheels" > /tmp/site/.wheels
  fi
  # KEEP_BASE=1: the base in models/ (an earlier call's) is kept and only the adapter is trained
  [ "${KEEP_BASE:-0}" = 1 ] && cp -r models/tabletop-tiny /tmp/build/
  rm -f "$run/pid" "$run/log" "$run/seen"
  # the session's own shell writes its pid (setsid may fork, so $! need not be it)
  RUN="$run" PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    setsid bash -c 'echo $$ > "$RUN/pid.new" && mv "$RUN/pid.new" "$RUN/pid"
                    python3 -m training.build_embedded --work /tmp/emb --out /tmp/build --skip-eval "$@" > "$RUN/log" 2>&1
                    echo $? > "$RUN/status"' build "$@" < /dev/null > /dev/null 2>&1 &
  until [ -f "$run/pid" ]; do sleep 0.1; done
  echo "build started at $(date +%T) (pid $(cat "$run/pid"))"
fi
touch "$run/log"
# the log from where the previous call left it, until the build ends or this call's time is up
seen=$(cat "$run/seen" 2>/dev/null || echo 0)
timeout "$follow" tail -c "+$((seen + 1))" -f --pid="$(cat "$run/pid")" "$run/log"
stat -c %s "$run/log" > "$run/seen"
cp "$run/log" "$out/build.log"
# every stage's log history in one file (what comes back is at most 8 files)
python3 - "$out/log_histories.json" <<'PY'
import json, pathlib, sys
runs = {run.name: json.loads((run / "log_history.json").read_text())
        for run in sorted(pathlib.Path("/tmp/emb").glob("*_train")) if (run / "log_history.json").is_file()}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=1) + "\n")
PY
if [ ! -f "$run/status" ]; then
  echo "build still running at $(date +%T): call again within 30 s (the machine is given back when idle)"
  exit 0
fi
[ -f /tmp/build/learning_curve.png ] && cp /tmp/build/learning_curve.png "$out/"
tar -C /tmp/build -czf - . | split -b 15m - "$out/models.tgz."
ls -la "$out"
echo "build ended with status $(cat "$run/status")"
exit "$(cat "$run/status")"
