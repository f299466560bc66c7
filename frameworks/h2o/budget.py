"""How many tokens H2O keeps per layer, sequence and KV head: `heavy` + `recent`.

As upstream H2O, the knobs are fractions of the prompt length (`heavy_ratio`, `recent_ratio`,
rounded down as upstream's int()) or absolute counts (`heavy_size`, `recent_size`). The cell's
`kv_budget` is their sum: the paper's "KV budget 0.2" is heavy 0.1 + recent 0.1, so with no
knob given the budget is split evenly. Budgets are relative to the prompt: during decode the
cache stays at heavy + recent tokens (+1 slot for the incoming token) while the sequence grows.
"""

from __future__ import annotations

from dataclasses import dataclass

_EPS = 1e-9


@dataclass(frozen=True)
class Budget:
    heavy_ratio: float | None = None
    recent_ratio: float | None = None
    heavy_size: int | None = None
    recent_size: int | None = None

    @classmethod
    def from_spec(cls, kv_budget: float, policy: dict) -> Budget:
        p = dict(policy)
        for part in ("heavy", "recent"):
            if f"{part}_ratio" in p and f"{part}_size" in p:
                raise ValueError(f"h2o: give {part}_ratio or {part}_size, not both")
            size = p.get(f"{part}_size")
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
                raise ValueError(f"h2o: {part}_size must be an integer >= 0, got {size!r}")
            ratio = p.get(f"{part}_ratio")
            if ratio is not None and not (0 <= ratio <= 1):
                raise ValueError(f"h2o: {part}_ratio must be in [0, 1], got {ratio!r}")
        hr, rr = p.get("heavy_ratio"), p.get("recent_ratio")
        if hr is not None and rr is not None:
            if abs(hr + rr - kv_budget) > _EPS:
                raise ValueError(f"h2o: heavy_ratio {hr} + recent_ratio {rr} must equal kv_budget {kv_budget}")
        elif hr is not None:
            rr = kv_budget - hr
        elif rr is not None:
            hr = kv_budget - rr
        else:
            hr = rr = kv_budget / 2
        if hr < -_EPS or rr < -_EPS:
            raise ValueError(f"h2o: a ratio exceeds kv_budget {kv_budget}")
        return cls(max(hr, 0.0), max(rr, 0.0), p.get("heavy_size"), p.get("recent_size"))

    def sizes(self, prompt_len: int) -> tuple[int, int]:
        """(heavy, recent) token counts for a prompt of `prompt_len` tokens."""
        # round() first: 0.1 * 2050 is 204.99999999999997 in floating point, upstream's int() meant 205
        heavy = self.heavy_size if self.heavy_size is not None else int(round(self.heavy_ratio * prompt_len, 6))
        recent = self.recent_size if self.recent_size is not None else int(round(self.recent_ratio * prompt_len, 6))
        if heavy + recent < 1:
            raise ValueError(f"h2o: the budget keeps no token of a {prompt_len}-token prompt "
                             f"(heavy {heavy}, recent {recent}); raise kv_budget or the sizes")
        return heavy, recent


def check(spec) -> None:
    """Raise ValueError if the cell's budget cannot run (called by CellSpec.validate)."""
    Budget.from_spec(spec.kv_budget, spec.policy).sizes(spec.prompt_len)
