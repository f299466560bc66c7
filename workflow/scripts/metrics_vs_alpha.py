"""Figure: InfiniGen's alpha (speculation threshold) vs tokens fetched, bytes moved and throughput.

A token is fetched when its speculated logit is > max - alpha (capped by the KV budget): a larger
alpha fetches more. With random weights attention is nearly uniform, so the budget may cap every
alpha; real weights (`weights:` in the preset) show the threshold at work. Bytes are those moved
host->GPU on CUDA (the selected rows); the CPU path gathers the whole budget, padding included.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
df["fetched_mb_per_step"] = df["fetched_bytes_per_step"] / 1e6
panels = [("fetched_tokens_per_seq_layer_speculated", "tokens fetched per sequence and layer"),
          ("fetched_mb_per_step", "KV MB moved host->GPU per decode step"), ("output_tok_s", "output throughput (tok/s)")]
if df["gpu_name"].isna().all():
    # on CPU nothing crosses a bus: the host gather copies the whole budget whatever alpha, a flat line
    panels.pop(1)
fig, axes = P.plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 3.0))
for ax, (metric, label) in zip(axes, panels):
    P.lines(ax, df, "policy.alpha", metric, by=("framework", "model"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("alpha (logit units)")
    ax.set_ylabel(label)
    P.zero_based(ax)
    P.finish(ax)
P.save(fig, snakemake, df)  # noqa: F821
