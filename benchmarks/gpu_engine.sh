#!/usr/bin/env bash
# The engine benchmark on the GPU machine (< 9 min a call): output and console log under $OUT/engine/.
# The whole plan takes ~15 min: several calls on one $OUT, e.g. --groups engine, then
# --groups infinigen,overhead,ttft, then --groups compile,ttft128k (each runs what is not recorded yet).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:?set OUT}/engine"
python3 benchmarks/gpu_engine.py --out "$OUT/engine" "$@" 2>&1 | tee -a "$OUT/engine/log.txt"  # -a: the calls' logs in one file
