#!/usr/bin/env bash
# The reference run, made by the pipeline itself on one GPU (issue 15):
#   snakemake --cores all --config preset=$PRESET runner=local      (PRESET default h200)
# in calls of at most ~9 minutes (the device machine's limit is 10): the run stops cleanly at
# DEADLINE_S seconds (default 480) after this script started, keeping every finished cell (a cell
# is a file, written only when complete), and the next call resumes from the cells of the last.
#
# On the GPU machine (no network, no Snakemake): carry the wheels of benchmarks/gpu_wheels.sh (.whl/).
# To resume, carry what the last call left: unpack its tar into results/ and carry results/cells,
# results/run and results/logs (the cells, this run's history, the cell logs).
#   OUT=/tmp/out bash benchmarks/gpu_reference.sh     # carry: .whl (+ results/cells results/run results/logs)
# Writes ONE file, $OUT/reference-<preset>-call<N>.tar.gz, holding what results/reference/<gpu>-<date>/
# ships: cells/ tables/ figures/ logs/ and run/ (command, per-call wall time, snakemake log,
# nvidia-smi, pip freeze, git commit, time model, cap check). Exit 0: the run is complete; 3: stopped by the
# deadline, run again with the cells carried; anything else: a failure (see run/snakemake-call<N>.log).
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
PRESET=${PRESET:-h200}
DEADLINE_S=${DEADLINE_S:-480}
OUT=${OUT:-benchmarks/out/reference}
EXTRA_CONFIG=${EXTRA_CONFIG:-} # more --config keys, e.g. "gpu_memory_gb=off"
# vLLM cells in this Python: on the H200 machine (torch 2.11, no network, no vLLM 0.32.0, which needs
# torch 2.13) they are recorded `unsupported`, saying so; a host with a vLLM venv: VLLM_CONFIG=vllm_venv=<path>
VLLM_CONFIG=${VLLM_CONFIG-vllm_venv=none}
# first the cells of this target (the memory boundaries, what the cap is for); "" for Snakemake's order
PRIORITIZE=${PRIORITIZE-results/tables/ttft_prompt.csv}
case "$EXTRA_CONFIG" in *experiments=*) [[ "$EXTRA_CONFIG" == *ttft_prompt* ]] || PRIORITIZE="" ;; esac # not in the DAG
mkdir -p "$OUT" results/run logs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MPLCONFIGDIR=${MPLCONFIGDIR:-/tmp/kvstudy-mpl}

# Snakemake and jsonschema (with their closures) are not on the GPU image: install the carried wheels
if ! python3 -c "import snakemake, jsonschema" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_reference: no Snakemake here and no wheels in .whl/ (run benchmarks/gpu_wheels.sh, carry .whl)" >&2; exit 2; }
    site=$(mktemp -d /tmp/kvstudy-site.XXXXXX)
    # only the distributions the image lacks: PYTHONPATH would shadow the image's own (torch's stack)
    missing=$(python3 - .whl/*.whl <<'PY'
import sys
from importlib import metadata
for w in sys.argv[1:]:
    try:
        metadata.distribution(w.rsplit("/", 1)[-1].split("-")[0])
    except metadata.PackageNotFoundError:
        print(w)
PY
)
    python3 -m pip install -q --no-index --no-deps --target "$site" $missing || exit 2
    export PYTHONPATH="$PYTHONPATH:$site"
    if ! python3 -c "import jsonschema, snakemake.api" 2>/dev/null; then
        # an image package too old for Snakemake: all the wheels, as gpu_two_cells.sh ran them on this image
        python3 -m pip install -q --no-index --no-deps --upgrade --target "$site" .whl/*.whl || exit 2
        missing=$(ls .whl/*.whl)
    fi
    mkdir -p results/run && printf '%s\n' $missing > results/run/wheels-installed.txt
fi
# KVSTUDY_ALLOW_CPU=1: the same steps on a CPU preset (how this script is checked without a GPU)
python3 -c "import snakemake, jsonschema, torch; assert torch.cuda.is_available() or '${KVSTUDY_ALLOW_CPU:-0}' == '1', 'no CUDA GPU visible'" || exit 2
# results/logs: the cell logs of the last call, when its tar was unpacked into results/ and carried
[ -d results/logs ] && mkdir -p logs && cp -rn results/logs/. logs/ && rm -rf results/logs

call=$(( $(ls results/run/call*.json 2>/dev/null | wc -l) + 1 ))
run=results/run
commit=${KVSTUDY_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}  # the device copy's .git can lag the tree: the caller may name it
{ nvidia-smi && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$run/nvidia-smi-call$call.txt" 2>&1
python3 -m pip freeze > "$run/pip-freeze-call$call.txt" 2>/dev/null
git status --porcelain --untracked-files=no > "$run/git-status-call$call.txt" 2>/dev/null
cells_before=$(find results/cells -name '*.json' 2>/dev/null | wc -l)

# Resume: cells carried from the last call have the copy's mtimes, and .snakemake/ (the metadata of
# params and code) does not travel, so the mtime trigger is left out: a cell that exists is kept;
# one missing (or interrupted: written only when complete) runs. Same commit in every call (run/call*.json).
cmd=(python3 -m snakemake --cores all ${PRIORITIZE:+--prioritize "$PRIORITIZE"} --config "preset=$PRESET" runner=local
     $VLLM_CONFIG $EXTRA_CONFIG --rerun-triggers params input code software-env)
printf '%q ' "${cmd[@]}" > "$run/command.txt"; echo >> "$run/command.txt"
echo "(through: OUT=$OUT PRESET=$PRESET DEADLINE_S=$DEADLINE_S EXTRA_CONFIG='$EXTRA_CONFIG' PRIORITIZE='$PRIORITIZE' bash benchmarks/gpu_reference.sh, at git $commit)" >> "$run/command.txt"
# a lock left by a call killed past its grace (a warm machine keeps .snakemake/)
if [ -n "$(ls -A .snakemake/locks 2>/dev/null)" ]; then
    python3 -m snakemake --unlock --cores 1 --config "preset=$PRESET" runner=local $VLLM_CONFIG $EXTRA_CONFIG >/dev/null 2>&1
fi
left=$(( DEADLINE_S - ($(date +%s) - t0) ))
s0=$(date +%s)
# SIGINT: Snakemake stops its jobs (run-cell writes nothing for a cell it did not finish) and exits
if [ "$left" -ge 1 ]; then
    timeout --signal=INT --kill-after=40 "$left" "${cmd[@]}" > "$run/snakemake-call$call.log" 2>&1
    rc=$?
else  # the deadline passed while setting up: nothing started, as if stopped at once
    echo "gpu_reference: deadline reached before Snakemake started" > "$run/snakemake-call$call.log"; rc=124
fi
s1=$(date +%s)
tail -n 25 "$run/snakemake-call$call.log"
cells_after=$(find results/cells -name '*.json' 2>/dev/null | wc -l)
state=complete; code=0
if [ $rc -eq 124 ] || [ $rc -eq 137 ] || [ $rc -eq 130 ]; then state=stopped_by_deadline; code=3
elif [ $rc -ne 0 ]; then state=failed; code=1; fi
cat > "$run/call$call.json" <<EOF
{"call": $call, "preset": "$PRESET", "git_commit": "$commit", "state": "$state", "snakemake_exit": $rc,
 "snakemake_wall_s": $((s1 - s0)), "script_wall_s_before_tar": $(( $(date +%s) - t0 )),
 "cells_before": $cells_before, "cells_after": $cells_after, "deadline_s": $DEADLINE_S,
 "started_at": "$(date -u -d @"$t0" +%FT%TZ)", "ended_at": "$(date -u +%FT%TZ)"}
EOF
# per-cell wall times -> the estimate for the full paper preset (also in the tar)
python3 benchmarks/time_model.py --cells results/cells --logs logs/benchmarks/cells --gpus 1 2 4 8 --json "$run/time_model.json" \
    > "$run/time_model.txt" 2>&1 || true
cat "$run/time_model.txt"
# the cap: where eager prefill ran out of memory, and no allocator peak above the cap
python3 benchmarks/check_cap.py results/cells > "$run/cap_check.txt" 2>&1 || true
cat "$run/cap_check.txt"

stage=$(mktemp -d /tmp/kvstudy-ref.XXXXXX)
for d in cells tables figures run; do [ -d "results/$d" ] && cp -r "results/$d" "$stage/$d"; done
[ -d logs ] && cp -r logs "$stage/logs"
tarball="$OUT/reference-$PRESET-call$call.tar.gz"
tar -czf "$tarball" -C "$stage" .
rm -rf "$stage"
echo "gpu_reference: call $call $state (snakemake exit $rc, $((s1 - s0)) s); cells $cells_before -> $cells_after;" \
     "$(du -h "$tarball" | cut -f1) in $tarball; script $(( $(date +%s) - t0 )) s"
[ $code -eq 3 ] && echo "gpu_reference: not finished: unpack the tar into results/ and run again, carrying results/cells results/run results/logs .whl"
exit $code
