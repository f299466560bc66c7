"""Figure: TTFT and end-to-end latency vs request rate (open loop, Poisson arrivals)."""

import numpy as np

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
# an infinite rate (all requests at once) is drawn one step right of the largest finite rate
finite = df.loc[np.isfinite(df["request_rate"]), "request_rate"]
inf_x = (finite.max() * 2) if len(finite) else 1.0
df["rate_x"] = df["request_rate"].where(np.isfinite(df["request_rate"]), inf_x)
fig, axes = P.plt.subplots(1, 2, figsize=(8.4, 3.0))
for ax, (metric, label) in zip(axes, [("ttft_ms_mean", "TTFT (ms, mean)"), ("e2e_ms_mean", "end-to-end latency (ms, mean)")]):
    P.lines(ax, df, "rate_x", metric, by=("framework", "model"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(df["rate_x"].unique())
    ax.set_xticks(ticks, [("∞" if t == inf_x and not np.isfinite(df["request_rate"]).all() else f"{t:g}") for t in ticks])
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel(label)
    P.finish(ax)
P.save(fig, snakemake, df)  # noqa: F821
