"""InfiniGen's policy keys, their defaults and checks. Torch-free: the host validates every cell
of a preset with `check` before any cell runs (registry.Framework.policy_check).

The defaults are upstream's (snu-comparch/InfiniGen, speedup/): each key that departs from it
names the alternative this artifact used before, kept for comparison (README, InfiniGen).

alpha (4, logit units): a token is critical when its speculated logit is > max - alpha.
partial_weight_ratio (0.2): share of a head's dimensions kept for speculation.
max_num_kv (None): a fixed token cap per sequence and kv head (upstream's --max-num-kv); None:
    from kv_budget by `budget_rule`.
budget_rule ("fixed"): with max_num_kv None, the cap is kv_budget x (prompt_len + gen_len)
    tokens, fixed for the whole cell like upstream's max_num_kv (upstream's 400 for 1920 + 128
    tokens is kv_budget 0.195); "current": kv_budget x the current sequence length, each step.
full_layers (1): the first layers load the whole cache, as upstream.
speculation_input ("own_norm"): layer i speculates layer i+1 from its own normalised attention
    input (upstream); "next_norm": layer i+1's norm applied to layer i's un-normalised input.
partial_columns ("prefill"): the kept columns are picked from each batch's prompt at prefill
    (upstream: the summed |skewed query| of its first sequence); "warmup": once, from the
    warm-up queries that also give the skew.
min_fetch (0): fewest tokens a speculated layer fetches per step; upstream fetches none when
    no token is within alpha (alpha = 0), 1 was this artifact's former floor.
gather_sms (8): CUDA graph decode only, an engine setting, not upstream's algorithm: SMs of the
    GPU kept for the gather of host rows (a CUDA green context, green.py), the captured step and
    the speculation on the others; 0: every kernel on every SM (the layout until 2026-12-03).
    Where the split cannot be made the cell runs unpartitioned and says why (`sm_partition`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULTS = {"alpha": 4.0, "partial_weight_ratio": 0.2, "max_num_kv": None, "full_layers": 1, "budget_rule": "fixed",
            "speculation_input": "own_norm", "partial_columns": "prefill", "min_fetch": 0,
            "gather_sms": 8}
CHOICES = {"budget_rule": ("fixed", "current"), "speculation_input": ("own_norm", "next_norm"),
           "partial_columns": ("prefill", "warmup")}


@dataclass(frozen=True)
class Options:
    alpha: float
    ratio: float
    max_num_kv: int | None
    full_layers: int
    budget_rule: str = DEFAULTS["budget_rule"]
    speculation_input: str = DEFAULTS["speculation_input"]
    partial_columns: str = DEFAULTS["partial_columns"]
    min_fetch: int = DEFAULTS["min_fetch"]
    gather_sms: int = DEFAULTS["gather_sms"]


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
    for key, allowed in CHOICES.items():
        if opts[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {opts[key]!r}")
    return Options(alpha, ratio, max_num_kv, full_layers, opts["budget_rule"], opts["speculation_input"],
                   opts["partial_columns"], _integer("min_fetch", opts["min_fetch"], 0),
                   _integer("gather_sms", opts["gather_sms"], 0))


def check(spec) -> None:
    """Raise ValueError if the cell's policy cannot run (called by CellSpec.validate)."""
    parse(spec.policy)
