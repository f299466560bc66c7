"""Offline cells: one batch, every request at t=0, through `vllm.LLM`.

`LLM.generate` returns only finished outputs, so the batch is run as LLM.generate runs it
(vllm/entrypoints/llm.py: add every request, then step the LLMEngine until none is left), with
output_kind=DELTA and each step's new tokens stamped when step() hands them to this process.
"""

from __future__ import annotations

import time

import numpy as np

from frameworks.vllm import engine_args
from frameworks.vllm.mapping import TokenClock, request_id, request_index


def build(kwargs: dict):
    from vllm import LLM

    return LLM(**kwargs)


def sampling_params(gen_len: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(**engine_args.sampling_kwargs(gen_len), output_kind=RequestOutputKind.DELTA)


def generate(llm, prompts: np.ndarray, gen_len: int, rep: int):
    """One batch; returns (timings, duration_s). Request ids are unique per engine."""
    engine = llm.llm_engine
    params = sampling_params(gen_len)
    inputs = [{"prompt_token_ids": p.tolist()} for p in prompts]
    clock = TokenClock(np.zeros(len(inputs)), prompts.shape[1], rep)
    t0 = time.perf_counter()
    for i, prompt in enumerate(inputs):
        engine.add_request(request_id(rep, i), prompt, params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        t = time.perf_counter() - t0
        for out in outputs:
            clock.record(request_index(out.request_id), len(out.outputs[0].token_ids), t)
    timings = clock.timings(gen_len)
    return timings, max(tm.token_times_s[-1] for tm in timings)
