"""How a cell ended: one classification (ok / oom / timeout / unsupported / error) and the one
record built from it, for the pipeline's worker and the GPU benchmark scripts alike.

An out-of-memory, a cell the framework cannot run (`result.Unsupported`) and a time limit the
framework itself hit (`TimeoutError`) are results, recorded and not retried; anything else is
`error` with its traceback printed (run_cell then writes nothing, so the cell reruns).
"""

from __future__ import annotations

import traceback
from datetime import datetime, timezone

from frameworks.harness import result


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def is_oom(e: BaseException) -> bool:
    if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def classify(e: BaseException) -> tuple[str, str]:
    """An exception a cell raised -> (status, message)."""
    if isinstance(e, result.Unsupported):
        return "unsupported", str(e)
    if is_oom(e):
        return "oom", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if isinstance(e, TimeoutError):
        return "timeout", f"{type(e).__name__}: {e}"
    traceback.print_exc()
    return "error", f"{type(e).__name__}: {e}"


def run_and_record(spec, run, provenance=None) -> dict:
    """Call run() -> Measurement for `spec` and return its validated result record (result.build).
    provenance: a dict, or None to collect it after the run (GPU state included).
    Ctrl-C / SystemExit propagate: an interrupted cell is no result."""
    from frameworks.harness import provenance as prov

    started = now()
    measurement, status, message = None, "ok", ""
    try:
        measurement = run()
    except Exception as e:  # noqa: BLE001 - classified: an OOM is a result, an error is recorded
        measurement = None
        status, message = classify(e)
    if provenance is None:
        provenance = prov.collect(spec.seed)
    return result.build(spec.to_dict(), spec.cell_id, status, message, provenance, started, now(),
                        measurement if status == "ok" else None)
