"""Request-rate cells: vLLM's serving engine (AsyncLLM) in this process, open loop.

AsyncLLM is the engine behind `vllm serve`, without the HTTP layer. Requests are submitted at
the arrival times of frameworks.harness.workload (the same seeded schedule and prompts the
transformers engines get), whatever the engine is doing; vLLM batches them continuously up to
max_num_seqs. Each streamed delta is stamped when it reaches this process, as `vllm bench
serve` stamps chunks. The arrival recorded is the scheduled one: lateness counts in TTFT.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from frameworks.vllm.mapping import TokenClock, request_id
from frameworks.vllm.offline import sampling_params


async def build_in_loop(kwargs: dict):
    """Built inside the event loop that will run its requests (its output handler lives there)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


async def generate(engine, prompts: np.ndarray, arrivals_s: np.ndarray, gen_len: int, rep: int):
    """All requests on their schedule; returns (timings, duration_s)."""
    params = sampling_params(gen_len)
    inputs = [{"prompt_token_ids": p.tolist()} for p in prompts]
    clock = TokenClock(arrivals_s, prompts.shape[1], rep)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        delay = arrivals_s[i] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        async for out in engine.generate(inputs[i], params, request_id(rep, i)):
            clock.record(i, len(out.outputs[0].token_ids), time.perf_counter() - t0)

    await asyncio.gather(*(one(i) for i in range(len(inputs))))
    timings = clock.timings(gen_len)
    return timings, max(tm.token_times_s[-1] for tm in timings)
