"""Decision guide: the grid as data (CSV) and one figure of its most populated model and context."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from workflow.lib import guide  # noqa: E402
from workflow.lib import plotting as P  # noqa: E402

smk = snakemake  # noqa: F821
tables = {Path(p).stem: pd.read_csv(p) for p in smk.input.tables}
g = guide.guide(tables)
g.to_csv(smk.output.csv, index=False)


def level(x: float, unit: str) -> str:
    return "no limit" if math.isinf(x) else f"{x:g} {unit}"


f = guide.focus(g)
tpots = sorted(f["tpot_slo_ms"].unique()) if not f.empty else [math.inf]
fig, axes = P.plt.subplots(1, len(tpots), figsize=(3.6 * len(tpots), 3.4), squeeze=False)
if f.empty:  # no experiment of guide.SOURCES in this run: say so instead of an empty grid
    axes[0, 0].text(0.5, 0.5, "no configuration measured\n(experiments: " + ", ".join(guide.SOURCES) + ")",
                    ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[0, 0].set_axis_off()
    tpots = []
for ax, tpot in zip(axes.flat, tpots):
    s = f[f["tpot_slo_ms"] == tpot]
    mems, ttfts = sorted(s["mem_limit_gb"].unique()), sorted(s["ttft_slo_ms"].unique())
    img = np.ones((len(mems), len(ttfts), 3))
    for _, r in s.iterrows():
        i, j = mems.index(r["mem_limit_gb"]), ttfts.index(r["ttft_slo_ms"])
        if r["framework"] in P.COLORS:
            img[i, j] = [0.55 + 0.45 * c for c in to_rgb(P.COLORS[r["framework"]])]  # lightened: text stays legible
            text = f"{P.LABELS[r['framework']]}\nbs{int(r['batch_size'])} kv{r['kv_budget']:g}\n{r['output_tok_s']:.3g} tok/s"
        else:
            text = "none\nmeets"
        ax.text(j, i, text, ha="center", va="center", fontsize=5.5)
    ax.imshow(img, origin="lower", aspect="auto")
    ax.set_xticks(range(len(ttfts)), [level(x, "ms") for x in ttfts], fontsize=6)
    ax.set_yticks(range(len(mems)), [level(x, "GB") for x in mems], fontsize=6)
    ax.set_xlabel("TTFT SLO (p90)")
    ax.set_ylabel(f"memory limit ({'GPU' if (s['memory_basis'] == 'peak_device_mem_gb').all() else 'RSS, CPU run'})")
    ax.set_title(f"TPOT SLO (p90): {level(tpot, 'ms')}", fontsize=8)
    ax.grid(False)
if not f.empty:
    fig.suptitle(f"{f['model'].iloc[0]}, context {int(f['context_len'].iloc[0])} tokens", fontsize=9)
stamp_df = pd.concat(list(tables.values()), ignore_index=True) if tables else pd.DataFrame()
P.save(fig, smk, stamp_df)
