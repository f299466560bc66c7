"""InfiniGen's policy keys, their defaults and checks. Torch-free: the host validates every cell
of a preset with `check` before any cell runs (registry.Framework.policy_check).

alpha (default 4, logit units: a token is critical when its speculated logit is > max - alpha),
partial_weight_ratio (0.2: share of a head's dimensions kept for speculation), max_num_kv (a
token cap per sequence and kv head; default: the cell's kv_budget x the current sequence
length), full_layers (1: the first layers load the whole cache, as upstream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULTS = {"alpha": 4.0, "partial_weight_ratio": 0.2, "max_num_kv": None, "full_layers": 1}


@dataclass(frozen=True)
class Options:
    alpha: float
    ratio: float
    max_num_kv: int | None
    full_layers: int


def _number(name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    return float(v)


def _integer(name, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return v


def parse(policy: dict | None) -> Options:
    """The cell's policy dict (keys as registry.Framework.policy_keys) -> checked Options."""
    opts = {**DEFAULTS, **(policy or {})}
    alpha = _number("alpha", opts["alpha"])
    if alpha < 0 or math.isnan(alpha):
        raise ValueError(f"alpha must be >= 0, got {opts['alpha']!r}")
    ratio = _number("partial_weight_ratio", opts["partial_weight_ratio"])
    if not 0 < ratio <= 1:
        raise ValueError(f"partial_weight_ratio must be in (0, 1], got {opts['partial_weight_ratio']!r}")
    max_num_kv = None if opts["max_num_kv"] is None else _integer("max_num_kv", opts["max_num_kv"], 1)
    try:
        full_layers = _integer("full_layers", opts["full_layers"], 1)
    except ValueError as e:
        raise ValueError(f"{e} (layer 0 has no previous layer to speculate from)") from None
    return Options(alpha, ratio, max_num_kv, full_layers)


def check(spec) -> None:
    """Raise ValueError if the cell's policy cannot run (called by CellSpec.validate)."""
    parse(spec.policy)
