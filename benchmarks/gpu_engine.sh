#!/usr/bin/env bash
# The engine benchmark on the GPU machine (< 9 min a call): output and console log under $OUT/engine/.
# The whole plan takes ~16 min: several calls on one $OUT (each runs what is not recorded yet), e.g.
#   --groups engine;  --groups h2o,ttft,ttft128k,infinigen;  --groups overhead,h2otorch,compile
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:?set OUT}/engine"
python3 benchmarks/gpu_engine.py --out "$OUT/engine" "$@" 2>&1 | tee -a "$OUT/engine/log.txt"  # -a: the calls' logs in one file
