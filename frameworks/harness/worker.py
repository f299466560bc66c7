"""Runs one cell in this process and writes its record (status + measurement) for run_cell.

Not meant to be called by hand: `python -m frameworks.harness.run_cell` supervises it
(time limit, atomic output). Out-of-memory and unsupported cells are results, not failures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from frameworks import registry
from frameworks.harness.outcome import is_oom, now, run_and_record  # noqa: F401 - is_oom, now: imported from here
from frameworks.harness.spec import CellSpec


# transformers imports these whenever they are installed (lm-eval brings both), for code an engine
# cell never runs: scikit-learn for assisted decoding's ROC curve (generation/candidate_generator),
# SciPy for the object-detection losses (loss/loss_*detr*). Both imports cost ~1.3 s of CPU in every
# cell's process, more than a smoke cell computes.
UNUSED_TRANSFORMERS_EXTRAS = ("is_sklearn_available", "is_scipy_available")


def skip_unused_transformers_extras() -> None:
    """Tell transformers that scikit-learn and SciPy are absent, before it imports its modeling code.
    Engine cells only (the vLLM venv's transformers is vLLM's); anything that imports either package
    itself (lm-eval's metrics) still gets it."""
    try:
        import transformers.utils as tu
        import transformers.utils.import_utils as iu
    except ImportError:
        return
    for name in UNUSED_TRANSFORMERS_EXTRAS:
        if hasattr(iu, name):
            setattr(iu, name, lambda: False)
            setattr(tu, name, lambda: False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="cell spec as JSON")
    ap.add_argument("--record", required=True, help="where to write the record JSON")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = ap.parse_args(argv)
    spec = CellSpec.from_json(args.spec)
    if args.threads:
        # before torch loads its OpenMP runtime, and inherited by any process the engine starts
        # (vLLM's engine core): every pool of the cell has `threads` threads, not one per core.
        # The launcher pinned this process tree to the cell's cores (KVSTUDY_CPU_CORES), so the
        # threads stay there too
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)  # else one per core of the host, off the pinned set
    if registry.get(spec.framework).on_engine:
        skip_unused_transformers_extras()
    record = run_and_record(spec, lambda: importlib.import_module(registry.get(spec.framework).adapter).run(spec))
    with open(args.record, "w") as f:
        json.dump(record, f, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
