"""What every figure shares: colours per framework, OOM markers, axis labels, saving."""

from __future__ import annotations

import math

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


def lines(ax, df: pd.DataFrame, x: str, y: str, by: tuple[str, ...] = ("framework",)) -> None:
    """One line per group over x; cells that did not produce a number (OOM, timeout) are marked
    with an x at the top edge of the axis at their x, labelled by status."""
    for key, g in df.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        fw = key[0]
        style = key[1] if len(key) > 1 else None
        g = g.sort_values(x)
        ok = g[(g["status"] == "ok") & g[y].notna()]
        # a third key (the engine's decode mode) sets the line style, the second the marker
        ax.plot(ok[x], ok[y], color=COLORS.get(fw), linestyle=LINESTYLES.get(key[-1], "-"),
                marker=MARKERS.get(style, "o"), markersize=4, label=series_label(fw, ", ".join(map(str, key[1:])) or None))
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
    model_names = list(dict.fromkeys(df["model"]))
    n = max(1, len(model_names))
    cols = min(n, ncols_max)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height * rows), squeeze=False)
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


def save(fig, outputs, df: pd.DataFrame | None = None) -> None:
    note = memory_note(df) if df is not None else None
    if note:  # where the out-of-memory points come from
        fig.text(0.5, 0, note, ha="center", va="top", fontsize=6, color="0.35")
    for path in (outputs.pdf, outputs.png):
        fig.savefig(path)
    plt.close(fig)


def finish(ax, title: str | None = None) -> None:
    if title:
        ax.set_title(title)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend()


def lines_per_model(df: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, outputs,
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
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        finish(ax, model)
    save(fig, outputs, df)
