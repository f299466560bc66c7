"""Figure: throughput, peak memory and KV bytes vs KV budget (1.0 = full cache)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
df["kv_cache_gb"] = df["kv_cache_bytes"] / 1e9
panels = [("output_tok_s", "output throughput (tok/s)"), ("mem_gb", P.mem_label(df)), ("kv_cache_gb", "KV cache on device (GB)")]
fig, axes = P.plt.subplots(1, 3, figsize=(14.0, 3.0))
for ax, (metric, label) in zip(axes, panels):
    P.lines(ax, df, "kv_budget", metric, by=("framework", "model"))
    ax.set_xlim(1.05, 0.0)  # budget shrinks to the right
    ax.set_xlabel("KV budget")
    ax.set_ylabel(label)
    P.zero_based(ax)
    P.finish(ax)
# one axis, two meanings (frameworks/harness/spec.py): said under the panels
fig.supxlabel("KV budget: H2O, fraction of the prompt kept on the GPU; InfiniGen, fraction of the sequence "
              "(prompt + output) fetched from CPU memory per step", fontsize=8)
P.save(fig, snakemake, df)  # noqa: F821
