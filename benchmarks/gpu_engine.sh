#!/usr/bin/env bash
# The engine benchmark on the GPU machine (< 9 min): output and console log under $OUT/engine/.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:?set OUT}/engine"
python3 benchmarks/gpu_engine.py --out "$OUT/engine" "$@" 2>&1 | tee "$OUT/engine/log.txt"
