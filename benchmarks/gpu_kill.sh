#!/usr/bin/env bash
# A hard kill on a GPU host (issue 18): SIGKILL Snakemake's whole process group while a CUDA cell
# computes (runner local: launcher -> run-cell -> worker, each supervisor with its lifeline), then
# check that 5 s later no cell process holds the GPU, no cell process or temp dir is left, and that
# the next run (after removing the stale lock) redoes only the unfinished cells.
# Needs what benchmarks/gpu_two_cells.sh needs (torch with CUDA, .whl/ from `make gpu-wheels`).
# Writes under $OUT (default benchmarks/out/gpu-kill): evidence.txt, nvidia-smi-*.csv, logs.
# Exit 0 only if all checks pass. About 2 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu-kill}
mkdir -p "$OUT"
. benchmarks/offline_snakemake.sh  # the GPU machine has no Snakemake: offline wheels
export TMPDIR=$(mktemp -d /tmp/kvstudy-kill-tmp.XXXXXX)  # the cells' temp dirs land here
rm -rf results/cells/batch/hf/tiny-llama-3.1 logs/cells/batch/hf/tiny-llama-3.1
apps() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; }
cellprocs() { pgrep -af 'frameworks\.harness|workflow\.lib\.launch' | grep -v pgrep || true; }
check() { if eval "$2"; then echo "PASS $1"; else echo "FAIL $1"; fi; }
ncells() { find results/cells/batch/hf/tiny-llama-3.1 -name '*.json' 2>/dev/null | wc -l; }

setsid python3 -m snakemake --cores 8 --config preset=gpu2 runner=local > "$OUT/run1.log" 2>&1 &
smk=$!
for _ in $(seq 600); do  # up to 5 minutes for the first cell to be written and the next on the GPU
    [ "$(ncells)" -ge 1 ] && [ -n "$(apps)" ] && break
    sleep 0.5
done
apps | tee "$OUT/nvidia-smi-before.csv"
cellprocs > "$OUT/procs-before.txt"
ls "$TMPDIR" > "$OUT/tmp-before.txt"
kill -9 -- "-$smk"
sleep 5
apps | tee "$OUT/nvidia-smi-after.csv"
cellprocs | tee "$OUT/procs-after.txt"
ls -A "$TMPDIR" | tee "$OUT/tmp-after.txt"
done_before=$(ncells)
{
    check "a cell was on the GPU when killed" '[ -s "$OUT/nvidia-smi-before.csv" ]'
    check "no process on the GPU 5 s after the kill" '[ ! -s "$OUT/nvidia-smi-after.csv" ]'
    check "no cell process left" '[ ! -s "$OUT/procs-after.txt" ]'
    check "no cell temp dir left" '[ ! -s "$OUT/tmp-after.txt" ]'
    check "some cells finished before the kill ($done_before of 4)" '[ "$done_before" -ge 1 ] && [ "$done_before" -lt 4 ]'
} | tee "$OUT/evidence.txt"
python3 -m workflow.lib.lock 2>&1 | tee -a "$OUT/evidence.txt"
python3 -m snakemake --cores 8 --config preset=gpu2 runner=local > "$OUT/run2.log" 2>&1 || true
reran=$(grep -cE '^rule run_cell:|^localrule run_cell:' "$OUT/run2.log" || true)
{
    check "the next run redid only the $((4 - done_before)) unfinished cell(s) (ran $reran)" '[ "$reran" -eq $((4 - done_before)) ]'
    check "all 4 cells written" '[ "$(ncells)" -eq 4 ]'
} | tee -a "$OUT/evidence.txt"
cp -r logs/cells "$OUT/logs"
grep -q FAIL "$OUT/evidence.txt" && exit 1
exit 0
