"""Runs one cell in this process and writes its record (status + measurement) for run_cell.

Not meant to be called by hand: `python -m frameworks.harness.run_cell` supervises it
(time limit, atomic output). Out-of-memory and unsupported cells are results, not failures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from frameworks import registry
from frameworks.harness.outcome import is_oom, now, run_and_record  # noqa: F401 - is_oom, now: imported from here
from frameworks.harness.spec import CellSpec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="cell spec as JSON")
    ap.add_argument("--record", required=True, help="where to write the record JSON")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = ap.parse_args(argv)
    spec = CellSpec.from_json(args.spec)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    record = run_and_record(spec, lambda: importlib.import_module(registry.get(spec.framework).adapter).run(spec))
    with open(args.record, "w") as f:
        json.dump(record, f, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
