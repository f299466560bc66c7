"""Benchmark (not a test): per-cell overhead, no-op rerun time, paper dry-run time.

    .venv/bin/python benchmarks/overhead.py [--reps 5] [--out benchmarks/out/overhead.json]

Per-cell overhead = wall time of `run-cell` on a minimal cell minus the measured part: process
starts (supervisor + worker), imports, model build, result writing. The no-op rerun is timed on
the smoke preset after making sure it is complete; the dry-run on the paper preset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from frameworks.harness.spec import CellSpec  # noqa: E402


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    return time.perf_counter() - t, p


def cell_overhead(reps: int) -> dict:
    spec = CellSpec.from_dict(dict(experiment="bench", framework="hf", model="tiny-llama-3.1", batch_size=1,
                                   prompt_len=16, gen_len=2, warmup=0, repetitions=1, device="cpu", dtype="float32"))
    walls, builds, measured = [], [], []
    with tempfile.TemporaryDirectory() as td:
        for _ in range(reps):
            out = Path(td) / "cell.json"
            wall, p = timed([sys.executable, "-m", "frameworks.harness.run_cell", "--spec", spec.to_json(), "--out", str(out)])
            if p.returncode:
                raise SystemExit(p.stderr)
            r = json.loads(out.read_text())
            walls.append(wall)
            builds.append(r["extra"]["model_build_s"])
            measured.append(r["summary"]["duration_s"])
    return {"wall_s_median": statistics.median(walls), "model_build_s_median": statistics.median(builds),
            "measured_s_median": statistics.median(measured),
            "overhead_s_median": statistics.median(w - m for w, m in zip(walls, measured)), "reps": reps}


def snakemake_times() -> dict:
    sm = [sys.executable, "-m", "snakemake", "--cores", "all"]
    _, p = timed(sm + ["--config", "preset=smoke", "runner=local"])  # complete it first (may run cells)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    noop, p = timed(sm + ["--config", "preset=smoke", "runner=local"])
    assert "Nothing to be done" in p.stdout + p.stderr, "the second smoke run was not a no-op"
    dry, p = timed(sm + ["-n", "--config", "preset=paper"])
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return {"noop_rerun_smoke_s": noop, "dry_run_paper_s": dry}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks/out/overhead.json"))
    args = ap.parse_args()
    res = {"cell": cell_overhead(args.reps), **snakemake_times()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    c = res["cell"]
    print(f"per-cell: wall {c['wall_s_median']:.2f} s, of which measured {c['measured_s_median']:.3f} s, "
          f"model build {c['model_build_s_median']:.2f} s -> overhead {c['overhead_s_median']:.2f} s (median of {c['reps']})")
    print(f"no-op rerun (smoke): {res['noop_rerun_smoke_s']:.2f} s; dry-run (paper): {res['dry_run_paper_s']:.2f} s")


if __name__ == "__main__":
    main()
