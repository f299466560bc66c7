"""benchmarks/smoke_cv.py: its per-repetition throughput is the harness's (metrics.summarize), on
the shipped smoke reference cells, and its window statistics."""

import importlib.util
import json

import numpy as np

from tests.conftest import REPO

spec_ = importlib.util.spec_from_file_location("smoke_cv", REPO / "benchmarks" / "smoke_cv.py")
cv = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(cv)
CELLS = REPO / "results/reference/smoke-2026-12-03/cells"


def test_per_repetition_throughput_is_the_summary_s():
    checked = 0
    for path in sorted(CELLS.glob("*/*/*/*.json")):
        r = json.loads(path.read_text())
        if r["status"] != "ok" or r["spec"]["repetitions"] < 2:
            continue
        _, tps = cv.per_rep(r)
        s = r["summary"]
        assert np.isclose(np.mean(tps), s["output_tok_s"], rtol=1e-9), path
        assert np.isclose(np.std(tps), s["output_tok_s_std"], rtol=1e-6, atol=1e-9), path
        checked += 1
    assert checked >= 70  # rate cells included


def test_windows_of_constant_repetitions_never_exceed_the_limit():
    d = np.full(32, 0.25)
    rows = cv.window_report(np.ones_like(d), d)
    assert len(rows) == 3 and all("> 10% in 0%" in row for row in rows)


def test_a_step_in_speed_shows_in_the_windows_across_it():
    d = np.r_[np.full(16, 0.2), np.full(16, 0.4)]  # the machine at half speed from repetition 16 on
    row = cv.window_report(np.ones_like(d), d, merges=(1,), sizes=(4,))[0]
    share = int(row.split("> 10% in ")[1].rstrip("%"))
    assert share == round(100 * 3 / 29)  # the 3 of 29 windows that hold both speeds
