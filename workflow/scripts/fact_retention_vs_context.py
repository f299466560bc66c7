"""Figure: fact retention (exact-match recall) vs context length, one line per framework and KV
budget (line style by budget), one panel per model and task; chance level dashed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
df["x"] = df["prompt_len"]  # requested context length (the table's context_len: the tokens really fed)
panels = sorted(set(zip(df["model"], df["task"].fillna(""))))
fig, axes = P.plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.2), squeeze=False)
styles = ["-", "--", ":", "-."]
for ax, (model, task) in zip(axes[0], panels):
    d = df[(df["model"] == model) & (df["task"].fillna("") == task)]
    budgets = sorted(d["kv_budget"].unique(), reverse=True)
    for (fw, budget), g in d.groupby(["framework", "kv_budget"]):
        ok = g[(g["status"] == "ok") & g["value"].notna()].sort_values("x")
        ax.plot(ok["x"], ok["value"], color=P.COLORS.get(fw), linestyle=styles[budgets.index(budget) % len(styles)],
                marker="o", markersize=4, label=P.series_label(fw, f"budget {budget:g}"))
    P.mark_failed(ax, d, "x")
    P.chance(ax, d)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("recall (exact match, fraction)")
    P.finish(ax, f"{model}: {task}")
P.save(fig, snakemake, df)  # noqa: F821
