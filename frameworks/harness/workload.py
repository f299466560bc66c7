"""Synthetic workloads: seeded prompts of exact length, seeded arrival times.

Every framework draws its requests from here, so the same seed gives the same prompts and the
same arrival schedule to vLLM, hf, H2O and InfiniGen.
"""

from __future__ import annotations

import math

import numpy as np


def prompts(seed: int, n: int, prompt_len: int, vocab_size: int) -> np.ndarray:
    """n prompts of exactly prompt_len token ids, uniform over the vocabulary.

    Token ids rather than text keep lengths exact whatever the tokenizer. Engines generate
    exactly gen_len tokens whatever they produce (EOS ignored), so no id is special here.
    """
    if n < 1 or prompt_len < 1 or vocab_size < 2:
        raise ValueError("need n >= 1, prompt_len >= 1 and vocab_size >= 2")
    rng = np.random.default_rng([seed, 0x70])
    return rng.integers(0, vocab_size, size=(n, prompt_len), dtype=np.int64)


def arrival_times(seed: int, n: int, rate: float, burstiness: float = 1.0) -> np.ndarray:
    """Arrival offsets in seconds from the start of the run, first request at 0.

    Inter-arrival gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate,
    Poisson arrivals at burstiness 1 (as `vllm bench serve --burstiness`). rate=inf: all at 0.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if math.isinf(rate):
        return np.zeros(n)
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    rng = np.random.default_rng([seed, 0xA7])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
