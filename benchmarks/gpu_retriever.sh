#!/usr/bin/env bash
# Trains retriever-small, the GPU retrieval model (registry `train:`: a length curriculum up to
# 8192 tokens, bf16 autocast), on one GPU of the device machine and evaluates its full-cache
# recall at 1K/4K/8K tokens on held-out trials. Everything lands in $OUT/retriever-small/
# (7 files: the checkpoint, config, tokenizer, train_log.json with the provenance, train.log),
# ready to ship as results/reference/h200-2026-12-02/models/retriever-small/, which the h200
# preset's fact_retention cells load (weights:). Runs with the machine's own python3 (torch,
# transformers, numpy, pyyaml, tokenizers, safetensors: no .venv, no network, no Snakemake).
#   KVSTUDY_GIT_COMMIT=$(git rev-parse HEAD) OUT=... benchmarks/gpu_retriever.sh [--set KEY=JSON ...]
# Time (estimate, one H200): ~2-3 min of training (max_train_s stops it at 300 s, the log says
# so), under a minute of evaluation; the machine's start comes on top.
# EVAL_LENGTHS / EVAL_N / PY override the evaluation and the interpreter (the CPU test of this
# script: tests/unit/test_accuracy_train.py, a few steps on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder the results go to}
PY=${PY:-python3}
EVAL_LENGTHS=${EVAL_LENGTHS:-1024,4096,8192}
EVAL_N=${EVAL_N:-128}
[ -n "${KVSTUDY_GIT_COMMIT:-}" ] || echo "gpu_retriever: KVSTUDY_GIT_COMMIT is not set: the log's git commit is what git says here (none without .git)" >&2
dest="$OUT/retriever-small"
mkdir -p "$dest"
export PYTHONUNBUFFERED=1
start=$(date +%s)
"$PY" -m frameworks.accuracy.train --model retriever-small --out "$dest" \
    --eval-lengths "$EVAL_LENGTHS" --eval-n "$EVAL_N" "$@" 2>&1 | tee "$dest/train.log"
echo "gpu_retriever: $(($(date +%s) - start)) s in all; $(du -h "$dest/model.safetensors" | cut -f1) checkpoint" | tee -a "$dest/train.log"
# the verdict: the issue's target, >= 95% full-cache recall at every evaluated length (exit 1 if not)
"$PY" - "$dest/train_log.json" <<'PY' | tee -a "$dest/train.log"
import json, sys
log = json.load(open(sys.argv[1]))
recall = log["recall_full_cache"]
ok = bool(recall) and min(recall.values()) >= 0.95
print(f"gpu_retriever: {log['steps_done']} steps in {log['train_s']} s on {log['provenance'].get('gpu_name')}; "
      f"full-cache recall {recall} (n={log['eval_n']}): {'target met' if ok else 'BELOW the 0.95 target'}")
sys.exit(0 if ok else 1)
PY
