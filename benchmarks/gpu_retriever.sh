#!/usr/bin/env bash
# GPU run of the paper's fact-retention experiment on the retrieval model trained here:
# the pipeline trains retriever-small on the GPU (rule train_model, registry `train:`), then runs
# the fact_retention cells of the paper preset (hf, h2o, infinigen; context 1K/4K/8K; budgets
# 1.0/0.2/0.1) with the local runner, and draws the figure. ~7 min on one H200 (estimate:
# training ~2 min, 21 cells of ~15 s). Everything it made is copied to $OUT, ready to ship under
# results/reference/<gpu>-<date>/retriever/ (checkpoint + train_log.json = the provenance).
set -euo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
PY=${PY:-.venv/bin/python}
"$PY" -m snakemake --cores all --resources gpu=1 --config preset=paper runner=local experiments='[fact_retention]' \
    results/tables/fact_retention.csv results/figures/fact_retention_vs_context.png 2>&1 | tee "$OUT/snakemake.log"
mkdir -p "$OUT/models" "$OUT/cells"
cp -r results/models/retriever-small "$OUT/models/"
cp -r results/cells/fact_retention "$OUT/cells/"
cp results/tables/fact_retention.csv results/figures/fact_retention_vs_context.* "$OUT/"
cp -r logs/models "$OUT/train-logs"
nvidia-smi > "$OUT/nvidia-smi.txt" || true
"$PY" - <<'PY' | tee "$OUT/summary.txt"
import pandas as pd
df = pd.read_csv("results/tables/fact_retention.csv")
print(df[["framework", "kv_budget", "prompt_len", "status", "value", "stderr", "n", "kv_kept_fraction", "kv_fetched_fraction"]]
      .sort_values(["framework", "kv_budget", "prompt_len"]).to_string(index=False))
PY
