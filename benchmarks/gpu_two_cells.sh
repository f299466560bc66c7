#!/usr/bin/env bash
# One GPU per cell, on a host with two GPUs (issue 6): Snakemake with `--resources gpu=2` runs the
# four cells of config/presets/gpu2.yaml two at a time, each on a GPU of its own (runner local).
# Needs: python3 with torch (CUDA), transformers, numpy, pandas, matplotlib; the wheels in .whl/
# (benchmarks/gpu_wheels.sh) for Snakemake; no network. Writes under $OUT (default benchmarks/out/gpu2):
#   evidence.json / evidence.txt   per cell: GPU (CUDA_VISIBLE_DEVICES = GPU UUID), start, end; overlaps
#   nvidia-smi-apps.csv            which process ran on which GPU, sampled every second
#   cells/, logs/                  the results and the launcher's logs
# Exit 0 only if: >= 2 distinct GPUs were used, two cells overlapped in time, and no two
# overlapping cells shared a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu2}
mkdir -p "$OUT"
. benchmarks/offline_snakemake.sh  # the GPU machine has no Snakemake: offline wheels
nvidia-smi -L | tee "$OUT/nvidia-smi-L.txt"
rm -rf results/cells/batch/hf/tiny-llama-3.1 logs/cells/batch/hf/tiny-llama-3.1
nvidia-smi --query-compute-apps=timestamp,gpu_uuid,pid,used_memory --format=csv -l 1 > "$OUT/nvidia-smi-apps.csv" &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
start=$(date +%s)
python3 -m snakemake --cores 8 --resources gpu=2 --config preset=gpu2 runner=local 2>&1 | tee "$OUT/snakemake.log"
echo "snakemake: $(( $(date +%s) - start )) s" | tee -a "$OUT/snakemake.log"
cp -r results/cells "$OUT/cells" && cp -r logs/cells "$OUT/logs"
python3 - "$OUT" <<'PY'
import glob, json, sys
from datetime import datetime
out = sys.argv[1]
cells = []
for f in sorted(glob.glob("results/cells/batch/hf/tiny-llama-3.1/*.json")):
    r = json.load(open(f))
    p = r["provenance"]
    cells.append({"cell": r["cell_id"], "status": r["status"], "gpu": p["cuda_visible_devices"], "gpu_name": p["gpu_name"],
                  "start": r["started_at"], "end": r["ended_at"], "torch": p["versions"]["torch"]})
t = lambda s: datetime.fromisoformat(s).timestamp()
pairs = [(a["cell"], b["cell"], a["gpu"], b["gpu"]) for i, a in enumerate(cells) for b in cells[i + 1:]
         if t(a["start"]) < t(b["end"]) and t(b["start"]) < t(a["end"])]
ok = (len(cells) == 4 and all(c["status"] == "ok" for c in cells) and len({c["gpu"] for c in cells}) >= 2
      and bool(pairs) and all(ga != gb for _, _, ga, gb in pairs))
ev = {"cells": cells, "overlapping_pairs": pairs, "distinct_gpus": sorted({c["gpu"] for c in cells}), "pass": ok}
json.dump(ev, open(f"{out}/evidence.json", "w"), indent=1)
lines = [f"{c['cell']:32} {c['status']:4} {c['gpu']} {c['start']} -> {c['end']}" for c in cells]
lines += [f"overlap: {a} ({ga}) with {b} ({gb})" for a, b, ga, gb in pairs]
lines.append("PASS: cells overlapped, each on its own GPU" if ok else "FAIL")
open(f"{out}/evidence.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if ok else 1)
PY
