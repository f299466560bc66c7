#!/usr/bin/env bash
# The engine benchmark on the GPU machine (< 9 min a call): output and console log under $OUT/engine/.
# The whole plan takes ~16 min: several calls on one $OUT (each runs what is not recorded yet), e.g.
#   --groups engine;  --groups h2o,ttft,ttft128k,infinigen;  --groups overhead,h2otorch,compile
# Issue 12's missed figures with the old paths beside the new ones, in one call of ~7.5 min:
#   --groups engine,h2o,ttft128k,overhead,ttft --time-budget-s 430 \
#   --skip hf/eager,hf/graph-matmul,h2o/eager,hf/graph-nocompile,correct/8b,overhead/hf-graph-nocompile
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:?set OUT}/engine"
python3 benchmarks/gpu_engine.py --out "$OUT/engine" "$@" 2>&1 | tee -a "$OUT/engine/log.txt"  # -a: the calls' logs in one file
