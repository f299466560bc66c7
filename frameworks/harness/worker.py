"""Runs one cell in this process and writes its record (status + measurement) for run_cell.

Not meant to be called by hand: `python -m frameworks.harness.run_cell` supervises it
(time limit, atomic output). Out-of-memory and unsupported cells are results, not failures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from datetime import datetime, timezone

from frameworks import registry
from frameworks.harness import provenance, result
from frameworks.harness.spec import CellSpec


def is_oom(e: BaseException) -> bool:
    if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


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
    started = now()
    measurement, status, message = None, "ok", ""
    try:
        adapter = importlib.import_module(registry.get(spec.framework).adapter)
        measurement = adapter.run(spec)
    except result.Unsupported as e:
        status, message = "unsupported", str(e)
    except BaseException as e:  # noqa: BLE001 - classify, then report
        if is_oom(e):
            status, message = "oom", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            traceback.print_exc()
            status, message = "error", f"{type(e).__name__}: {e}"
    record = result.build(
        spec.to_dict(), spec.cell_id, status, message, provenance.collect(spec.seed, gpu_memory_cap_gb=spec.gpu_memory_gb), started, now(),
        measurement if status == "ok" else None,
    )
    with open(args.record, "w") as f:
        json.dump(record, f, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
