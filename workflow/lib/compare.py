"""This run vs a reference run, cell by cell: this / reference for each headline metric, flagged
outside a stated tolerance; cells present on one side only are listed.

    python -m workflow.lib.compare --ref results/reference/<run> [--run results/cells] [--out results/compare.csv]
(`make compare REF=results/reference/<run>`). A cell is matched by experiment/framework/model/cell id;
both sides are read from their cell JSONs (a reference folder may hold other files: they are skipped).
The cell id is the one today's code gives the stored spec (canonical_id): a framework's default
decode mode keeps no suffix in the id, so a reference made under an older default (InfiniGen's
eager step before graph decode became its default) would otherwise meet this run's other mode
under the same name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from frameworks.harness.spec import CellSpec
from workflow.lib.tables import row


def canonical_id(head: dict) -> str:
    """The id today's code gives a stored cell spec; a spec from before the `decode` key ran
    transformers as-is (eager). The stored id where the spec no longer builds (a framework or a
    mode gone): listed under it."""
    spec = dict(head["spec"])
    spec.setdefault("decode", "eager")
    try:
        return CellSpec.from_dict(spec).cell_id
    except Exception:  # noqa: BLE001 - an older or foreign spec: its own id
        return head["cell_id"]

# relative tolerance per headline metric: timings move with the machine's load, memory little,
# KV bytes not at all
TOLERANCE = {"output_tok_s": 0.30, "ttft_ms_mean": 0.30, "tpot_ms_mean": 0.30, "e2e_ms_mean": 0.30,
             "peak_mem_gb": 0.10, "kv_cache_bytes": 0.01}
KEY = ("experiment", "framework", "model", "cell_id")
COLUMNS = (*KEY, "metric", "this", "reference", "ratio", "tolerance", "flag")


def read_cells(root: Path) -> pd.DataFrame:
    """Every cell result under root (one row each); JSON files that are not cell results are skipped."""
    rows = []
    for p in sorted(root.rglob("*.json")):
        try:
            head = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(head, dict) or "cell_id" not in head or "spec" not in head:
            continue
        try:
            rows.append({**row(str(p)), "cell_id": canonical_id(head)})
        except Exception as e:  # noqa: BLE001 - an older schema: listed, not fatal
            print(f"compare: skipped {p}: {e}", file=sys.stderr)
    df = pd.DataFrame(rows)
    if not df.empty:
        dup = df.duplicated(list(KEY))
        if dup.any():  # a folder of several runs: the first of each cell counts
            print(f"compare: {dup.sum()} cells under {root} appear more than once; the first is used", file=sys.stderr)
            df = df[~dup]
        gpu = df["peak_device_mem_gb"].notna()
        df["peak_mem_gb"] = df["peak_device_mem_gb"].where(gpu, df["peak_rss_gb"])
    return df


def compare(this: pd.DataFrame, ref: pd.DataFrame, tolerance: dict[str, float] = TOLERANCE) -> pd.DataFrame:
    out = []
    a = this.set_index(list(KEY)) if not this.empty else pd.DataFrame()
    b = ref.set_index(list(KEY)) if not ref.empty else pd.DataFrame()
    for key in sorted(set(a.index) | set(b.index)):
        base = dict(zip(KEY, key))
        if key not in b.index:
            out.append({**base, "metric": "", "flag": "missing in reference"})
            continue
        if key not in a.index:
            out.append({**base, "metric": "", "flag": "missing in this run"})
            continue
        x, y = a.loc[key], b.loc[key]
        if x["status"] != y["status"]:
            out.append({**base, "metric": "status", "this": x["status"], "reference": y["status"],
                        "flag": "status differs"})
            continue
        for m, tol in tolerance.items():
            v, r = x.get(m), y.get(m)
            if v is None or r is None or pd.isna(v) or pd.isna(r):
                continue
            ratio = v / r if r else math.inf
            flag = "within" if abs(ratio - 1) <= tol else "outside"
            out.append({**base, "metric": m, "this": v, "reference": r, "ratio": ratio, "tolerance": tol, "flag": flag})
    return pd.DataFrame(out, columns=list(COLUMNS))


def summary(df: pd.DataFrame) -> str:
    counts = df["flag"].value_counts().to_dict() if not df.empty else {}
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing to compare"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="a reference run folder (results/reference/<run>)")
    ap.add_argument("--run", default="results/cells", help="this run's cells (default results/cells)")
    ap.add_argument("--out", default="results/compare.csv", help="where to write the comparison CSV")
    args = ap.parse_args(argv)
    for what, p in (("reference", args.ref), ("run", args.run)):
        if not Path(p).is_dir():
            print(f"compare: {what} folder {p} does not exist (runs: {sorted(map(str, Path('results/reference').glob('*')))})",
                  file=sys.stderr)
            return 2
    this, ref = read_cells(Path(args.run)), read_cells(Path(args.ref))
    if ref.empty:
        print(f"compare: no cell results under {args.ref}", file=sys.stderr)
        return 2
    df = compare(this, ref)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"compare: {len(this)} cells here, {len(ref)} in {args.ref}: {summary(df)} -> {args.out}")
    for _, r in df[df["flag"].isin(["outside", "status differs"])].iterrows():
        print(f"  {r['experiment']}/{r['framework']}/{r['model']}/{r['cell_id']} {r['metric']}: "
              f"{r['this']} vs {r['reference']} ({r['flag']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
