"""Synthetic workloads: exact lengths, seeded, the arrival process."""

import numpy as np
import pytest

from frameworks.harness import workload


def test_prompts_exact_length_and_seeded():
    a = workload.prompts(seed=3, n=4, prompt_len=37, vocab_size=100)
    assert a.shape == (4, 37) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() < 100
    assert np.array_equal(a, workload.prompts(3, 4, 37, 100))
    assert not np.array_equal(a, workload.prompts(4, 4, 37, 100))
    assert not np.array_equal(a[0], a[1])  # different prompts in one batch


def test_arrivals_poisson_mean_rate():
    t = workload.arrival_times(seed=0, n=20001, rate=5.0)
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 5.0, rel=0.05)  # exponential: std == mean


def test_arrivals_burstiness_and_determinism():
    bursty = np.diff(workload.arrival_times(1, 20001, rate=2.0, burstiness=0.25))
    assert bursty.mean() == pytest.approx(0.5, rel=0.05)
    assert bursty.std() > 1.5 * bursty.mean()  # gamma shape 0.25: cv = 2
    assert np.array_equal(workload.arrival_times(7, 50, 3.0), workload.arrival_times(7, 50, 3.0))


def test_infinite_rate_all_at_once():
    assert np.array_equal(workload.arrival_times(0, 5, float("inf")), np.zeros(5))


def test_bad_rate():
    with pytest.raises(ValueError):
        workload.arrival_times(0, 5, 0.0)
