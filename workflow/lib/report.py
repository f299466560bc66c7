"""The reviewer's page: one self-contained HTML file (figures inlined, no CDN: it opens offline).

Sections: setup (preset, hardware, versions, images, git, dates), repeatability, claims, decision
guide, figures with captions, comparison with a reference run, cells that did not measure.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
from pathlib import Path

import pandas as pd

from workflow.lib.tables import CV_LIMIT

CSS = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .4rem;
vertical-align:top;text-align:left}th{background:#f3f3f3}figure{margin:1.5rem 0}img{max-width:100%}
figcaption{font-size:.9rem;color:#444;max-width:60rem}.supported{background:#e6f4e6}.not-supported{background:#fbe3e3}
.not-measured{background:#f1f1f1}.outside,.status-differs{background:#fbe3e3}nav a{margin-right:1rem}code{font-size:.85em}"""
SECTIONS = (("setup", "Setup"), ("repeatability", "Repeatability"), ("claims", "Claims"), ("guide", "Decision guide"),
            ("figures", "Figures"), ("compare", "Comparison with a reference run"), ("failed", "Cells that did not measure"))


def esc(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return html.escape("∞" if math.isinf(x) else f"{x:.4g}")
    return html.escape(str(x))


def table(df: pd.DataFrame, cols=None, row_class: str | None = None, limit: int = 500) -> str:
    if df is None or df.empty:
        return "<p><em>none</em></p>"
    cols = [c for c in (cols or df.columns) if c in df.columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for _, r in df.head(limit).iterrows():
        cls = f' class="{esc(r[row_class]).replace(" ", "-")}"' if row_class else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{esc(r[c])}</td>" for c in cols) + "</tr>")
    more = f"<p>… {len(df) - limit} more rows in the CSV</p>" if len(df) > limit else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def image(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def setup(cells: pd.DataFrame, provenance: list[dict], preset: str, report_commit: str) -> pd.DataFrame:
    """What was run, where, with what: one row per fact, each from the cells' own provenance."""
    def values(get) -> str:
        vals = sorted({str(v) for v in map(get, provenance) if v not in (None, "")})
        return ", ".join(vals) or "none"

    status = cells["status"].value_counts().to_dict() if not cells.empty else {}
    rows = [("preset", preset), ("cells", f"{len(cells)}: " + ", ".join(f"{k} {v}" for k, v in sorted(status.items()))),
            ("device", ", ".join(sorted(cells["device"].dropna().unique())) if not cells.empty else ""),
            ("GPU", values(lambda p: p.get("gpu_name")) + (f" (driver {values(lambda p: p.get('driver'))})"
                                                             if any(p.get("driver") for p in provenance) else "")),
            ("host", values(lambda p: p.get("host")) + "; " + values(lambda p: p.get("platform"))),
            ("runner images", values(lambda p: p.get("image_id"))),
            ("git commit of the cells", values(lambda p: (p.get("git") or {}).get("commit"))
             + (" (dirty tree)" if any((p.get("git") or {}).get("dirty") for p in provenance) else "")),
            ("git commit of this report", report_commit or "unknown"),
            ("cells ran", f"{min((p.get('_started') or '' for p in provenance), default='')[:19]} … "
                          f"{max((p.get('_ended') or '' for p in provenance), default='')[:19]}"),
            ("report built", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    for lib in ("python", "torch", "transformers", "vllm", "numpy", "nvidia-ml-py"):
        rows.append((lib, values(lambda p, lib=lib: (p.get("versions") or {}).get(lib))))
    rows[-6:] = [r for r in rows[-6:] if r[1] != "none"]
    return pd.DataFrame(rows, columns=["what", "value"])


def repeatability(cells: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Throughput CV (std / mean over repetitions, the tables' output_tok_s_cv) of every cell with
    >= 2 repetitions; returns the summary and every cell above the limit (tables.CV_LIMIT), worst first."""
    ok = cells[(cells["status"] == "ok") & (cells["repetitions"] >= 2) & (cells["output_tok_s"] > 0)].copy()
    if ok.empty:
        return "No cell had two or more repetitions.", ok
    if "output_tok_s_cv" not in ok:  # tables written before the column
        ok["output_tok_s_cv"] = ok["output_tok_s_std"] / ok["output_tok_s"]
    cv = ok["output_tok_s_cv"]
    over = ok[cv > CV_LIMIT].sort_values("output_tok_s_cv", ascending=False)
    text = (f"Output-throughput coefficient of variation over repetitions (column output_tok_s_cv of every "
            f"table), {len(ok)} cells with ≥ 2 repetitions: median {cv.median():.1%}, max {cv.max():.1%}; "
            f"{int((cv <= CV_LIMIT).sum())} of {len(ok)} at ≤ {CV_LIMIT:.0%}, {len(over)} above (flagged).")
    return text, over[["experiment", "framework", "model", "cell_id", "repetitions", "output_tok_s",
                       "output_tok_s_std", "output_tok_s_cv"]]


def build(*, preset: str, cells: pd.DataFrame, provenance: list[dict], claims: pd.DataFrame, guide: pd.DataFrame,
          guide_png: Path, figures: list[tuple[str, Path, str]], compare: pd.DataFrame | None, reference: str | None,
          report_commit: str, links: dict[str, str]) -> str:
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>kvstudy report: {esc(preset)}</title>"
             f"<style>{CSS}</style></head><body><h1>kvstudy: KV cache management strategies, preset <code>{esc(preset)}</code></h1>",
             "<nav>" + "".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS) + "</nav>"]
    if not cells.empty and (cells["device"] == "cpu").all():
        parts.append("<p><strong>A CPU run</strong> of tiny random models: it shows the pipeline works end to end; "
                     "its numbers say nothing about an H100.</p>")
    parts += ['<h2 id="setup">Setup</h2>', table(setup(cells, provenance, preset, report_commit))]
    text, worst = repeatability(cells)
    parts += ['<h2 id="repeatability">Repeatability</h2>',
              f"<p>{esc(text)}" + (f" Cells above {CV_LIMIT:.0%}:</p>" if not worst.empty else "</p>"), table(worst)]
    parts += ['<h2 id="claims">Claims</h2>',
              "<p>Each claim of the paper (docs/PAPER.md) judged by code (workflow/lib/claims.py) on this run's tables "
              f'only: <a href="{links["claims"]}">claims.csv</a>.</p>',
              table(claims, ["claim", "statement", "verdict", "evidence", "threshold", "missing"], row_class="verdict")]
    parts += ['<h2 id="guide">Decision guide</h2>',
              f'<p>Which framework and configuration meets a memory limit and latency SLOs with the highest throughput '
              f'(workflow/lib/guide.py): <a href="{links["guide"]}">decision_guide.csv</a> holds every model, context '
              "length, limit and SLO.</p>", figure("decision_guide", guide_png, figures_caption(figures, "decision_guide"))]
    g = guide[guide["framework"] != "none meets"] if not guide.empty else guide
    parts.append(table(g.drop_duplicates(["model", "context_len", "framework", "cell_id"]) if not g.empty else g,
                       ["model", "context_len", "framework", "batch_size", "kv_budget", "prefill", "output_tok_s",
                        "peak_mem_gb", "ttft_p90_ms", "tpot_p90_ms", "cell_id"]))
    parts.append('<h2 id="figures">Figures</h2>')
    parts += [figure(name, png, cap) for name, png, cap in figures if name != "decision_guide"]
    parts.append('<h2 id="compare">Comparison with a reference run</h2>')
    parts.append(compare_section(compare, reference, links.get("compare")))
    bad = cells[cells["status"] != "ok"] if not cells.empty else cells
    parts += ['<h2 id="failed">Cells that did not measure</h2>',
              "<p>Out of memory, timeout and unsupported cells are results; error cells are failures.</p>",
              table(bad, ["experiment", "framework", "model", "cell_id", "status", "message"])]
    parts.append("</body></html>")
    return "\n".join(parts)


def figures_caption(figures, name: str) -> str:
    return next((c for n, _, c in figures if n == name), "")


def figure(name: str, png: Path, caption: str) -> str:
    return (f'<figure id="fig-{esc(name)}"><img src="{image(png)}" alt="{esc(name)}">'
            f"<figcaption><strong>{esc(name)}.</strong> {esc(caption)}</figcaption></figure>")


def compare_section(df: pd.DataFrame | None, reference: str | None, link: str | None) -> str:
    if df is None or reference is None:
        return "<p>No reference run for this preset (results/reference/&lt;preset&gt;-*/; or set <code>reference</code>).</p>"
    counts = df["flag"].value_counts().to_dict()
    tol = df.dropna(subset=["tolerance"]).drop_duplicates("metric")[["metric", "tolerance"]]
    head = (f"<p>This run against <code>{esc(reference)}</code> (<a href=\"{link}\">compare CSV</a>): "
            + ", ".join(f"{esc(k)} {v}" for k, v in sorted(counts.items()))
            + ". Tolerance (relative, this / reference − 1): "
            + ", ".join(f"{esc(r.metric)} ±{r.tolerance:.0%}" for r in tol.itertuples()) + ".</p>")
    flagged = df[df["flag"].isin(["outside", "status differs"])]
    one_sided = df[df["flag"].str.startswith("missing")]
    cols = ["experiment", "framework", "model", "cell_id", "metric", "this", "reference", "ratio", "flag"]
    return (head + "<h3>Outside tolerance or status differs</h3>" + table(flagged, cols, row_class="flag")
            + "<h3>Cells on one side only</h3>" + table(one_sided, cols[:4] + ["flag"]))
