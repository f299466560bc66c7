"""Throughput CV of single smoke cells, each run alone: how much a timed repetition varies and
what longer repetitions or more of them do to that (issue 14: CV <= 10% on `smoke`).

    .venv/bin/python benchmarks/smoke_cv.py --ref results/reference/smoke-2026-12-03 \
        --cell ttft_prompt/vllm/tiny-llama-3.1/bs1_in2048_out1_kv1_flash --runs 3 [--set gen_len=128 repetitions=8]

Each run goes through the launcher as the pipeline runs a cell (pinned to a core, one thread,
pause mode), with the reference cell's spec (plus --set overrides), into a scratch folder.
Per run it prints the repetitions' durations, the CV (std/mean of per-repetition output tok/s,
as metrics.summarize) and the CPU seconds other processes used on the host meanwhile (from
/proc/stat minus this script's children): a run that overlapped foreign load is redone.

    .venv/bin/python benchmarks/smoke_cv.py --windows LOG     # runs of many repetitions, from --log
    .venv/bin/python benchmarks/smoke_cv.py --floor 20        # the machine alone: no harness, no model

--windows splits each logged run's repetitions into windows of n consecutive ones (a cell's
repetitions) and reports how often their CV exceeds 10%, also with 2 or 4 consecutive repetitions
merged into one (a longer repetition). --floor times two fixed single-thread torch loops (compute-
bound: a 256x256 matmul; memory-bound: a 64 MB matrix-vector product) in alternating 0.25 s
chunks for the given seconds each, pinned to the last core, and reports the same for them; then
the memory-bound loop on the first and the last core in turn (is one core quieter?).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VLLM_PYTHON = ".venv-vllm/bin/python"
FOREIGN_MAX_S = 0.5  # CPU seconds of other processes during a run (its start-up included) still taken as quiet


def busy_s() -> float:
    """CPU seconds the host spent busy (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def per_rep(result: dict) -> tuple[list[float], list[float]]:
    """Durations (s) and output tok/s of each repetition, as metrics.summarize computes them
    (a repetition lasts from its start to its last token: the largest arrival + e2e)."""
    reps = sorted({s["rep"] for s in result["samples"]})
    durs, tps = [], []
    for r in reps:
        ss = [s for s in result["samples"] if s["rep"] == r]
        d = max(s["arrival_s"] + s["e2e_ms"] / 1e3 for s in ss)
        durs.append(d)
        tps.append(sum(s["out_tokens"] for s in ss) / d)
    return durs, tps


def run_once(spec: dict, framework: str, out: Path, cpu_timing: str = "pause") -> dict:
    py = VLLM_PYTHON if framework == "vllm" else sys.executable
    cmd = [sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--cpus", "1", "--cpu-timing", cpu_timing]
    if framework == "vllm":
        cmd += ["--python", str(Path(py).absolute())]
    cmd += ["--", "--spec", json.dumps(spec), "--out", str(out), "--threads", "1"]
    load0, b0, c0 = os.getloadavg()[0], busy_s(), children_s()
    p = subprocess.run(cmd, capture_output=True, text=True)
    load1, b1, c1 = os.getloadavg()[0], busy_s(), children_s()
    if p.returncode != 0 or not out.exists():
        raise SystemExit(f"cell failed ({p.returncode}): {p.stderr[-2000:]}")
    res = json.loads(out.read_text())
    durs, tps = per_rep(res)
    cv = float(np.std(tps) / np.mean(tps))
    stored = res["summary"]["output_tok_s_std"] / res["summary"]["output_tok_s"]
    assert abs(cv - stored) < 1e-6, (cv, stored)
    return {"durations_s": durs, "tok_s": tps, "cv": cv, "mean_tok_s": float(np.mean(tps)),
            "foreign_cpu_s": round((b1 - b0) - (c1 - c0), 2), "load": (round(load0, 2), round(load1, 2)),
            "wall_s": round(sum(durs), 3)}


def wait_idle(max_wait_s: float = 600) -> None:
    """Until the host has been (nearly) idle for 3 s: another job's load spoils a timing."""
    import time

    t_end = time.monotonic() + max_wait_s
    while time.monotonic() < t_end:
        b0 = busy_s()
        time.sleep(3)
        if busy_s() - b0 < 0.3:
            return
    print("smoke_cv: host not idle; measuring anyway (the run is marked)", file=sys.stderr)


def window_report(tok: np.ndarray, durs: np.ndarray, merges=(1, 2, 4), sizes=(4, 8, 16)) -> list[str]:
    """CV over sliding windows of n consecutive repetitions (tok: tokens per repetition)."""
    rows = []
    for k in merges:
        m = len(durs) // k
        d = durs[: m * k].reshape(m, k).sum(1)
        tp = tok[: m * k].reshape(m, k).sum(1) / d
        cells = []
        for n in sizes:
            if m < n + 2:
                continue
            cv = np.array([tp[i:i + n].std() / tp[i:i + n].mean() for i in range(m - n + 1)])
            cells.append(f"n={n}: median {100 * np.median(cv):.1f}%, > 10% in {100 * (cv > 0.1).mean():.0f}%")
        rows.append(f"  repetition x{k} ({d.mean():.3f} s): " + " | ".join(cells))
    return rows


def windows(log: str) -> None:
    for line in Path(log).read_text().splitlines():
        r = json.loads(line)
        d, tp = np.array(r["durations_s"]), np.array(r["tok_s"])
        print(f"{r['cell']} {r['set'] or ''} {r.get('cpu_timing', 'pause')} run {r['run']}: {len(d)} repetitions, "
              f"CV {100 * r['cv']:.1f}%, max/min duration {d.max() / d.min():.2f}, foreign {r['foreign_cpu_s']} s")
        print("\n".join(window_report(tp * d, d)))


def floor(seconds: float) -> None:
    import time

    import torch

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    a, w, v = torch.randn(256, 256), torch.randn(4096, 4096), torch.randn(4096)
    loops = {"compute": lambda: [a @ a for _ in range(20)], "memory": lambda: w @ v}
    reps = {}
    for name, f in loops.items():  # calls per 0.25 s chunk
        t = time.perf_counter()
        for _ in range(20):
            f()
        reps[name] = max(1, int(0.25 / ((time.perf_counter() - t) / 20)))
    wait_idle()
    b0, durs = busy_s(), {name: [] for name in loops}
    for _ in range(int(seconds / 0.25)):
        for name, f in loops.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                f()
            durs[name].append(time.perf_counter() - t)
    own = sum(sum(d) for d in durs.values())
    print(f"CPU seconds of other processes meanwhile: {busy_s() - b0 - own:.2f} (this loop: {own:.1f})")
    for name, d in durs.items():
        d = np.array(d)
        print(f"{name}: {len(d)} chunks of {d.mean():.3f} s, CV {100 * (1 / d).std() / (1 / d).mean():.1f}%, "
              f"max/min {d.max() / d.min():.2f}")
        print("\n".join(window_report(np.ones_like(d), d, merges=(1, 4), sizes=(4, 8))))
    print(f"correlation of the two loops' chunk times: {np.corrcoef(durs['compute'], durs['memory'])[0, 1]:.2f}")
    cores = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
    first, last = cores[0], cores[-1]
    if first != last:  # is one core quieter? the memory-bound loop on each in turn
        per_core = {first: [], last: []}
        for i in range(int(seconds / 0.25)):
            c = (first, last)[i % 2]
            os.sched_setaffinity(0, {c})
            loops["memory"]()  # settle on the core
            t = time.perf_counter()
            for _ in range(reps["memory"]):
                loops["memory"]()
            per_core[c].append(time.perf_counter() - t)
        for c, d in per_core.items():
            d = np.array(d)
            print(f"memory loop on core {c}: CV {100 * (1 / d).std() / (1 / d).mean():.1f}%, max/min {d.max() / d.min():.2f}")
            print("\n".join(window_report(np.ones_like(d), d, merges=(1,), sizes=(4,))))
        n = min(len(v) for v in per_core.values())
        print(f"correlation of the two cores' adjacent chunks: {np.corrcoef(per_core[first][:n], per_core[last][:n])[0, 1]:.2f}")


def parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        out[k] = json.loads(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", help="a reference run (its cells/ give the specs)")
    ap.add_argument("--cell", action="append", help="<experiment>/<framework>/<model>/<cell id>")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], help="spec overrides, key=JSON value")
    ap.add_argument("--log", help="append one JSON line per run here")
    ap.add_argument("--cpu-timing", default="pause", choices=("pause", "lock"),
                    help="lock: no pause sidecar on the cell's core (nothing else to stop when it runs alone)")
    ap.add_argument("--windows", metavar="LOG", help="only analyse the runs of a --log file")
    ap.add_argument("--floor", type=float, metavar="SECONDS", help="only time the fixed loops")
    args = ap.parse_args()
    if args.windows:
        windows(args.windows)
        return 0
    if args.floor:
        floor(args.floor)
        return 0
    if not (args.ref and args.cell):
        ap.error("--ref and --cell are required to run cells")
    overrides = parse_set(args.set)
    with tempfile.TemporaryDirectory() as td:
        for cell in args.cell:
            ref = json.loads((Path(args.ref) / "cells" / f"{cell}.json").read_text())
            spec = {**ref["spec"], **overrides}
            for i in range(args.runs):
                for _attempt in range(3):  # a run that overlapped another job's load is redone
                    wait_idle()
                    r = run_once(spec, spec["framework"], Path(td) / f"{i}.json", args.cpu_timing)
                    if r["foreign_cpu_s"] <= FOREIGN_MAX_S:
                        break
                    print(f"{cell} run {i}: overlapped {r['foreign_cpu_s']} s of foreign CPU: redone", flush=True)
                flag = "  <- foreign load" if r["foreign_cpu_s"] > FOREIGN_MAX_S else ""
                print(f"{cell} {overrides or ''} run {i}: CV {100 * r['cv']:.1f}%  mean {r['mean_tok_s']:.1f} tok/s  "
                      f"reps {' '.join(f'{d:.3f}' for d in r['durations_s'])} s  foreign {r['foreign_cpu_s']} s  "
                      f"load {r['load']}{flag}", flush=True)
                if args.log:
                    with open(args.log, "a") as f:
                        f.write(json.dumps({"cell": cell, "set": overrides, "cpu_timing": args.cpu_timing, "run": i, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
