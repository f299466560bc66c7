"""What every figure shares: colours per framework, OOM markers, axis labels, saving."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from frameworks import registry  # noqa: E402

# the same colour for a framework in every figure (tests/unit/test_one_list.py: one per framework)
COLORS = {"vllm": "#1f77b4", "hf": "#7f7f7f", "h2o": "#d62728", "infinigen": "#2ca02c"}
LABELS = {n: f.label for n, f in registry.FRAMEWORKS.items()}
LINESTYLES = {"eager": ":", "sdpa": "-", "flash": "-", "chunked": "--", "graph": "-"}
MARKERS = {"eager": "s", "sdpa": "o", "flash": "o", "chunked": "^"}
FAILED = {"oom": "OOM", "timeout": "timeout", "unsupported": "unsupported"}

plt.rcParams.update({"figure.dpi": 150, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
                     "legend.fontsize": 7, "savefig.bbox": "tight", "figure.constrained_layout.use": True})


def model_order(names) -> list[str]:
    """Models smallest first (registry parameter count), so panels and bars read in size order."""
    from frameworks import models

    return sorted(dict.fromkeys(names), key=lambda m: (models.entry(m).get("params") or 0, m))


def load(path: str) -> pd.DataFrame:
    df = pd.read_csv(path)
    # memory axis: device-level GPU memory on GPU runs (every framework has it, vLLM included),
    # process RSS on CPU runs (said in the label)
    df["mem_gb"] = df["peak_device_mem_gb"].where(df["peak_device_mem_gb"].notna(), df["peak_rss_gb"])
    return df


def mem_label(df: pd.DataFrame) -> str:
    gpu = df["peak_device_mem_gb"].notna().any()
    return "peak GPU memory in use (GB)" if gpu else "peak process RSS (GB, CPU run)"


def per_gb_label(df: pd.DataFrame) -> str:
    gpu = df["peak_device_mem_gb"].notna().any()
    return "output tok/s per GB of peak GPU memory" if gpu else "output tok/s per GB of peak RSS (CPU run)"


def series_label(fw: str, extra: str | None = None) -> str:
    return LABELS.get(fw, fw) + (f" ({extra})" if extra else "")


# error bars: throughput +- one std over repetitions; latency means from p50 to p90 over requests
ERRORS = {"output_tok_s": "output_tok_s_std"}
LATENCY_BARS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def error_bars(g: pd.DataFrame, y: str):
    """(lower, upper) distances from y for errorbar(), or None where the metric has no spread."""
    if y in ERRORS and ERRORS[y] in g:
        sd = g[ERRORS[y]].fillna(0).to_numpy()
        return [sd, sd]
    base = y.rsplit("_", 1)[0]
    if base in LATENCY_BARS and f"{base}_p50" in g and f"{base}_p90" in g:
        lo = (g[y] - g[f"{base}_p50"]).clip(lower=0).to_numpy()
        hi = (g[f"{base}_p90"] - g[y]).clip(lower=0).to_numpy()
        return [lo, hi]
    return None


def lines(ax, df: pd.DataFrame, x: str, y: str, by: tuple[str, ...] = ("framework",)) -> None:
    """One line per group over x, with error bars where the metric has a spread; cells that did not
    produce a number (OOM, timeout) are marked with an x at the top edge of the axis at their x."""
    for key, g in df.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        fw = key[0]
        style = key[1] if len(key) > 1 else None
        g = g.sort_values(x)
        ok = g[(g["status"] == "ok") & g[y].notna()]
        # a third key (the engine's decode mode) sets the line style, the second the marker
        ax.errorbar(ok[x], ok[y], yerr=error_bars(ok, y), color=COLORS.get(fw), linestyle=LINESTYLES.get(key[-1], "-"),
                    marker=MARKERS.get(style, "o"), markersize=4, capsize=2, elinewidth=0.8,
                    label=series_label(fw, ", ".join(map(str, key[1:])) or None))
    mark_failed(ax, df, x)


def mark_failed(ax, df: pd.DataFrame, x: str) -> None:
    bad = df[df["status"].isin(list(FAILED))]
    if bad.empty:
        return
    ax.figure.canvas.draw()  # fix limits first so markers sit on the top edge
    top = ax.get_ylim()[1]
    for _, r in bad.iterrows():
        ax.plot([r[x]], [top], marker="x", color=COLORS.get(r["framework"]), markersize=8, clip_on=False,
                linestyle="none")
        ax.annotate(FAILED[r["status"]], (r[x], top), textcoords="offset points", xytext=(0, 4), ha="center",
                    fontsize=6, color=COLORS.get(r["framework"]))
    ax.set_ylim(top=top)


def chance(ax, df: pd.DataFrame) -> None:
    """The accuracy of a random guess (the table's `chance`), as a dashed grey line."""
    levels = df["chance"].dropna().unique() if "chance" in df else []
    for level in levels:
        ax.axhline(level, color="#999999", linestyle="--", linewidth=0.8, label=f"chance ({level:.2g})")


def by_model(df: pd.DataFrame, ncols_max: int = 3, height: float = 3.0):
    """One panel per model (most figures have a single model)."""
    model_names = model_order(df["model"])
    n = max(1, len(model_names))
    cols = min(n, ncols_max)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(zip(model_names, axes.flat))


def memory_note(df: pd.DataFrame) -> str | None:
    """Which GPU-memory cap the figure's cells ran under, and on which card (None on CPU runs)."""
    if df["device"].ne("cuda").all():
        return None
    card = ", ".join(sorted(df["gpu_name"].dropna().unique())) or "GPU"
    total = df["gpu_total_mem_gb"].dropna() if "gpu_total_mem_gb" in df else pd.Series(dtype=float)
    card += f" of {total.max():.1f} GB" if len(total) else ""
    caps = sorted(df["gpu_memory_gb"].dropna().unique()) if "gpu_memory_gb" in df else []
    if not caps:
        return f"GPU memory: the whole card ({card})"
    some = "; some cells uncapped" if df["gpu_memory_gb"].isna().any() else ""
    return f"GPU memory capped at {' / '.join(f'{c:g}' for c in caps)} GB per cell{some} ({card})"


def stamp(df: pd.DataFrame, preset: str) -> str:
    """What ran where, for the corner of every figure: a CPU smoke run must not pass for an H100."""
    gpus = sorted(df["gpu_name"].dropna().unique()) if "gpu_name" in df else []
    where = ", ".join(gpus) if gpus else "CPU run (no GPU): tiny random models, numbers show the pipeline works"
    dtypes = ", ".join(sorted(df["dtype"].dropna().astype(str).unique())) if "dtype" in df else ""
    return f"preset {preset} | {where} | {dtypes}"


def save(fig, smk, df: pd.DataFrame) -> None:
    """Stamp the run's preset and hardware, save PDF + PNG, and say in the rule's log what was drawn."""
    fig.text(0.0, -0.02, stamp(df, smk.config.get("preset", "?")), fontsize=6, color="#555555", ha="left", va="top")
    note = memory_note(df)
    if note:  # where the out-of-memory points come from
        fig.text(0.0, -0.06, note, fontsize=6, color="#555555", ha="left", va="top")
    for path in (smk.output.pdf, smk.output.png):
        fig.savefig(path)
    plt.close(fig)
    counts = df["status"].value_counts().to_dict() if "status" in df else {}
    with open(smk.log[0], "w") as log:
        print(f"{Path(smk.output.png).stem}: {len(df)} cells from {', '.join(map(str, smk.input))} ({counts}); "
              f"wrote {smk.output.pdf}, {smk.output.png}", file=log)


def zero_based(ax) -> None:
    """Memory and linear throughput axes start at zero: a 0.1 GB difference must look like one."""
    if ax.get_yscale() == "linear":
        ax.set_ylim(bottom=0)


def finish(ax, title: str | None = None) -> None:
    """Title, and the legend outside the data (right of the panel)."""
    if title:
        ax.set_title(title)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def lines_per_model(df: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, smk,
                    by: tuple[str, ...] = ("framework", "prefill"), logy: bool = False) -> None:
    """The common figure: one panel per model, a line per group over a log2 x axis; saved. Where a
    framework ran in both decode modes (hf in the paper's `batch`), each mode is its own line."""
    if "decode" in df and df.groupby("framework")["decode"].nunique().gt(1).any():
        by = (*by, "decode")
    fig, panels = by_model(df)
    for model, ax in panels:
        lines(ax, df[df["model"] == model], x, y, by=by)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        else:
            zero_based(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        finish(ax, model)
    save(fig, smk, df)
