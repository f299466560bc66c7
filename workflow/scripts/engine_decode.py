"""Figure: the engine's own effect: decode step (TPOT p50) and output throughput of `hf` vs batch
size, decode `graph` (one captured static step) vs `eager` (transformers as-is), from `batch`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
df = df[df["framework"] == "hf"]
if df.empty or "decode" not in df:
    raise SystemExit("engine_decode: the batch table has no hf cells with a decode column")
models = list(dict.fromkeys(df["model"]))
fig, axes = P.plt.subplots(len(models), 2, figsize=(8.4, 3.0 * len(models)), squeeze=False)
for (ax_t, ax_s), model in zip(axes, models):
    d = df[df["model"] == model]
    for ax, y, label in ((ax_t, "tpot_ms_p50", "decode step, TPOT p50 (ms)"), (ax_s, "output_tok_s", "output throughput (tok/s)")):
        P.lines(ax, d, "batch_size", y, by=("framework", "decode"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel(label)
        P.finish(ax, f"{model}: engine decode mode")
P.save(fig, snakemake, df)  # noqa: F821
