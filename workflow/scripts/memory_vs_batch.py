"""Figure: peak memory vs batch size per framework (paper C2)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
fig, panels = P.by_model(df)
for model, ax in panels:
    P.lines(ax, df[df["model"] == model], "batch_size", "mem_gb", by=("framework", "prefill"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel(P.mem_label(df))
    P.finish(ax, model)
P.save(fig, snakemake.output)  # noqa: F821
