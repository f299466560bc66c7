"""`run-cell`: run one experiment cell and write its result JSON atomically.

    python -m frameworks.harness.run_cell --spec '<cell spec JSON>' --out results/cells/.../<id>.json

The cell runs in a child process so that a time limit can always be enforced (a hung CUDA
kernel ignores Python signals). Outcomes:
  ok / oom / unsupported / timeout -> the result JSON is written, exit 0;
  a crash or an unexpected exception -> nothing is written, exit 1 (the job reruns next time);
  a bad spec -> exit 2 with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from frameworks.harness import cputime, lifeline, pause, provenance, result
from frameworks.harness.lifeline import kill_group
from frameworks.harness.spec import CellSpec, SpecError
from frameworks.harness.worker import now


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    finally:  # the launcher registered this pid as a cell root (pause.py); a killed cell's entry is stale, removed by the next scan
        lock = os.environ.get(cputime.ENV)
        if lock and os.environ.get(pause.ROOT_ENV) == str(os.getpid()):
            pause.unregister(cputime.registry(lock), os.getpid())


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="run-cell", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True, help="cell spec as JSON (see frameworks/harness/spec.py)")
    ap.add_argument("--out", required=True, help="result JSON path")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch")
    args = ap.parse_args(argv)
    try:
        spec = CellSpec.from_json(args.spec)
    except (SpecError, json.JSONDecodeError, TypeError) as e:
        print(f"run-cell: bad spec: {e}", file=sys.stderr)
        return 2

    started = now()
    line = None
    try:
        with lifeline.make_temp_dir() as td:
            # the watchdog first: if this process is killed (even by SIGKILL) from here on, the temp
            # dir goes, and from `watch` on the worker's group too (before it, PR_SET_PDEATHSIG kills it)
            line = lifeline.guard(remove=td)
            record_path = Path(td) / "record.json"
            cmd = [sys.executable, "-m", "frameworks.harness.worker", "--spec", spec.to_json(),
                   "--record", str(record_path), "--threads", str(args.threads)]
            proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=lifeline.die_with_parent)
            line.watch(proc.pid)

            def forward(signum, _frame):  # interrupted: stop the cell, write nothing
                kill_group(proc)
                sys.exit(128 + signum)

            signal.signal(signal.SIGTERM, forward)
            signal.signal(signal.SIGINT, forward)
            try:
                rc = proc.wait(timeout=spec.timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                record = result.build(spec.to_dict(), spec.cell_id, "timeout",
                                      f"cell exceeded its time limit of {spec.timeout_s:g} s",
                                      provenance.collect(spec.seed, with_gpu=False, gpu_memory_cap_gb=spec.gpu_memory_gb), started, now())
            else:
                if rc != 0 or not record_path.exists():
                    print(f"run-cell: the cell's process failed (exit {rc}); no result written", file=sys.stderr)
                    return 1
                record = json.loads(record_path.read_text())
                if record["status"] == "error":
                    print(f"run-cell: the cell failed: {record['message']}; no result written", file=sys.stderr)
                    return 1
    finally:  # only once the temp dir is gone: a kill before this still has the watchdog remove it
        if line is not None:
            line.release()
    record["provenance"]["command"] = [sys.executable, "-m", "frameworks.harness.run_cell", *argv]
    record["started_at"], record["ended_at"] = started, now()
    result.validate(record, where=args.out)
    result.write_atomic(args.out, record)
    print(f"run-cell: {spec.cell_id}: {record['status']} {record['message']}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
