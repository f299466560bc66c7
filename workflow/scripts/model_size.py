"""Figure: throughput and peak memory per model and framework (models ordered by size)."""

import numpy as np

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
order = P.model_order(df["model"])  # smallest first
fws = list(dict.fromkeys(df["framework"]))
width = 0.8 / max(1, len(fws))
fig, axes = P.plt.subplots(1, 2, figsize=(8.4, 3.0))
for ax, (metric, label) in zip(axes, [("output_tok_s", "output throughput (tok/s)"), ("mem_gb", P.mem_label(df))]):
    for i, fw in enumerate(fws):
        g = df[df["framework"] == fw].set_index("model")
        xs = np.arange(len(order)) + i * width
        okm = [m in g.index and g.loc[m, "status"] == "ok" for m in order]
        vals = [g.loc[m, metric] if good else np.nan for m, good in zip(order, okm)]
        err = P.error_bars(g.reindex(order), metric)  # +- one std over repetitions (throughput)
        ax.bar(xs, vals, width, color=P.COLORS.get(fw), label=P.series_label(fw),
               yerr=None if err is None else np.nan_to_num(err), capsize=2, error_kw={"elinewidth": 0.8})
        for x, m in zip(xs, order):
            if m in g.index and g.loc[m, "status"] in P.FAILED:
                ax.annotate(P.FAILED[g.loc[m, "status"]], (x, 0), ha="center", va="bottom", rotation=90, fontsize=6)
    ax.set_xticks(np.arange(len(order)) + width * (len(fws) - 1) / 2, order, rotation=15)
    ax.set_ylabel(label)
    P.zero_based(ax)
    P.finish(ax)
P.save(fig, snakemake, df)  # noqa: F821
