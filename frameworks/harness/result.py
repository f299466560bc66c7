"""The cell result: what adapters return, how it becomes the one result JSON, how it is stored."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from frameworks.harness.metrics import RequestTiming, request_sample, summarize

STATUSES = ("ok", "oom", "timeout", "error", "unsupported")


class Unsupported(Exception):
    """The framework cannot run this cell; the message says why. Recorded, not retried."""


class ResultError(ValueError):
    """A result file that is missing fields, has wrong types or is not JSON."""


@dataclass
class Measurement:
    """What an adapter measured. Metrics are derived from it in one place (metrics.py)."""

    timings: list[RequestTiming]
    rep_durations_s: list[float]
    memory: dict
    kv_cache_bytes: int | None = None
    extra: dict = field(default_factory=dict)
    accuracy: dict | None = None  # accuracy cells (no timed requests: their summary is null)


@cache
def schema() -> dict:
    return json.loads(resources.files("frameworks.harness").joinpath("result.schema.json").read_text())


def build(spec: dict, cell_id: str, status: str, message: str, provenance: dict, started_at: str, ended_at: str,
          measurement: Measurement | None = None) -> dict:
    samples, summary, extra, accuracy = [], None, {}, None
    if measurement is not None:
        samples = [request_sample(t) for t in measurement.timings]
        if samples:
            summary = summarize(samples, measurement.rep_durations_s, measurement.memory, measurement.kv_cache_bytes)
        extra, accuracy = measurement.extra, measurement.accuracy
    result = {
        "schema_version": 1,
        "cell_id": cell_id,
        "status": status,
        "message": message,
        "spec": spec,
        "samples": samples,
        "summary": summary,
        "extra": extra,
        "accuracy": accuracy,
        "provenance": provenance,
        "started_at": started_at,
        "ended_at": ended_at,
    }
    validate(result)
    return result


def validate(result: dict, where: str = "result") -> None:
    import jsonschema  # here: Measurement and Unsupported are used where jsonschema may be absent (GPU benchmarks)

    try:
        jsonschema.validate(result, schema())
    except jsonschema.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise ResultError(f"{where}: invalid at {path}: {e.message}") from None
    if result["status"] == "ok" and result["summary"] is None and result["accuracy"] is None:
        raise ResultError(f"{where}: status ok needs a summary (or, for an accuracy cell, an accuracy block)")


def write_atomic(path: str | Path, result: dict) -> None:
    """Temp file in the same folder + rename: readers never see a partial result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResultError(f"{path}: not a readable result JSON ({e}); delete it to rerun the cell") from None
    try:
        validate(result, where=str(path))
    except ResultError as e:
        raise ResultError(f"{e}; delete it to rerun the cell") from None
    return result
