"""Figure: accuracy vs KV budget, one panel per task, a line per framework; chance level dashed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
tasks = sorted(df["task"].dropna().unique()) or ["(no task)"]
fig, axes = P.plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.0), squeeze=False)
for ax, task in zip(axes[0], tasks):
    d = df[df["task"] == task]
    for model in sorted(d["model"].unique()):
        P.lines(ax, d[d["model"] == model], "kv_budget", "value", by=("framework",))
    P.chance(ax, d)
    ax.set_xlim(1.05, 0.0)  # budget shrinks to the right
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("KV budget (fraction of the context)")
    metric = d["metric"].dropna().iloc[0] if d["metric"].notna().any() else "accuracy"
    ax.set_ylabel(f"{metric} (fraction)")
    P.finish(ax, f"{task} ({', '.join(sorted(d['model'].unique()))})")
P.save(fig, snakemake, df)  # noqa: F821
