"""Ship this run as a reference run: results/reference/<preset>-<date>/ (`make smoke-reference`).

Copies exactly the preset's cells (not leftovers of other runs), its tables, claims, decision
guide and report, and writes a README.md with when, where, the summed cell time (Snakemake's
benchmark records) and the machine's load: what a later run is compared with (`make compare`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

from workflow.lib import celltable


def cell_seconds(paths) -> float:
    """Sum of Snakemake's wall-clock seconds (benchmark `s`) over the cells: the run's cell time."""
    total = 0.0
    for p in paths:
        tsv = Path("logs/benchmarks") / Path(p).relative_to("results").with_suffix(".tsv")
        if tsv.exists():
            total += float(pd.read_csv(tsv, sep="\t")["s"].iloc[-1])
    return total


def repeatability(tables: Path) -> str:
    """The run's throughput CV as the report states it (report.repeatability), with the count at
    <= 5% and the worst cells: what the README says about how repeatable the numbers are."""
    from workflow.lib import report

    frames = [pd.read_csv(f) for f in sorted(tables.glob("*.csv"))]
    frames = [f for f in frames if {"status", "repetitions", "output_tok_s"} <= set(f.columns)]
    if not frames:
        return ""
    cells = pd.concat(frames, ignore_index=True)
    text, _ = report.repeatability(cells)
    ok = cells[(cells["status"] == "ok") & (cells["repetitions"] >= 2) & (cells["output_tok_s"] > 0)]
    if ok.empty or "output_tok_s_cv" not in ok:
        return text
    worst = ok.sort_values("output_tok_s_cv", ascending=False).head(3)
    named = "; ".join(f"{r.experiment}/{r.framework}/{r.model}/{r.cell_id} {r.output_tok_s_cv:.1%}"
                      for r in worst.itertuples())
    return f"{text} {int((ok['output_tok_s_cv'] <= 0.05).sum())} at ≤ 5%. Worst: {named}."


def cpu_timing(paths) -> str:
    """How the cells were timed (their provenance.cpu_timing), and how long cells kept others stopped."""
    import json

    modes, paused = set(), 0.0
    for p in paths:
        t = (json.loads(Path(p).read_text()).get("provenance") or {}).get("cpu_timing") or {}
        if t:
            modes.add(t.get("mode"))
            paused += t.get("paused_others_s") or 0.0
    if not modes:
        return ""
    return (f"CPU cells timed with cpu_timing: {', '.join(sorted(modes))}"
            + (f"; {paused:.0f} s in all with the other cells stopped" if "pause" in modes else "") + ". ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--runner", default="local")
    ap.add_argument("--wall-s", type=float, help="wall time of the run that made it (make smoke-reference measures it)")
    args = ap.parse_args(argv)
    cells = celltable.build_cells({"preset": args.preset, "runner": args.runner}, celltable.load_preset(args.preset))
    missing = [p for p in cells if not Path(p).exists()]
    needed = ["results/claims.csv", "results/report/index.html", "results/guide/decision_guide.csv"]
    missing += [p for p in needed if not Path(p).exists()]
    if missing:
        print(f"reference: run the preset first (make smoke); missing: {', '.join(missing[:5])}"
              f"{' …' if len(missing) > 5 else ''}", file=sys.stderr)
        return 2
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path("results/reference") / f"{args.preset}-{date}"
    if out.exists():
        shutil.rmtree(out)
    for p in cells:
        dest = out / Path(p).relative_to("results")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
    for p in ["results/tables", "results/guide", "results/report", "results/claims.csv"]:
        (shutil.copytree if Path(p).is_dir() else shutil.copy2)(p, out / Path(p).relative_to("results"))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    wall = f"{args.wall_s:.0f} s of wall time (`make smoke`), " if args.wall_s else ""
    (out / "README.md").write_text(
        f"# {args.preset} reference run, {date}\n\n"
        f"Made by `make {args.preset}-reference` on host {os.uname().nodename} ({os.cpu_count()} CPUs): "
        f"{len(cells)} cells, {wall}{cell_seconds(cells):.0f} s summed over the cells (Snakemake's benchmark "
        f"records), load average at the end {load} (1, 5, 15 min). `report/index.html` is the run's report; "
        "`make compare REF=<this folder>` compares a later run with it cell by cell.\n\n"
        f"{cpu_timing(cells)}{repeatability(out / 'tables')}\n")
    print(f"reference: {len(cells)} cells -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
