"""An accuracy cell on the transformers engine, for any KV policy.

experiment `accuracy`: an lm-eval task (spec.task: a task of lm-eval's registry such as piqa,
or `kvstudy_recall`, the fact corpus as a local multiple-choice task) through EngineLM.
experiment `fact_retention`: spec.task `facts-tokens` (the trained model, token level) or
`facts-chat` (a real model's tokenizer and chat template). Context length = prompt_len.
The result's `accuracy` block: task, metric, value, stderr, n, chance, context_len and the
budget actually kept on the device / fetched.
"""

from __future__ import annotations

import math
import time

from frameworks import models
from frameworks.harness.memory import MemoryMonitor
from frameworks.harness.result import Measurement, Unsupported

RETENTION_TASKS = ("facts-tokens", "facts-chat")


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a mean of n 0/1 outcomes (lm-eval's `acc_stderr` is the sample form)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def kept_fraction(model, calls: list[tuple[int, int, int]]) -> float | None:
    """Mean over engine calls (batch, tokens, KV bytes on the device at the call's end) of the
    bytes kept / the full cache of that batch and length."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    elem = next(model.parameters()).element_size()
    ratios = [kv / (2 * c.num_hidden_layers * b * kv_heads * n * head_dim * elem) for b, n, kv in calls if kv]
    return sum(ratios) / len(ratios) if ratios else None


def fetched_fraction(metrics: dict, length: float) -> float | None:
    """InfiniGen: tokens fetched per sequence and speculated layer / the context length."""
    fetched = metrics.get("fetched_tokens_per_seq_layer_speculated")
    return fetched / length if fetched is not None and length else None


def run_accuracy_cell(spec, policy_cls) -> Measurement:
    import torch
    from transformers import AutoTokenizer

    from frameworks.hf.engine import Engine

    if spec.weights == "random":
        raise Unsupported(f"accuracy needs trained weights: set weights=<path> (a local checkpoint or hub id) "
                          f"for model {spec.model}; random weights have no accuracy to measure")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this cell needs a CUDA GPU and none is visible (use a CPU preset such as `smoke`)")
    torch.manual_seed(spec.seed)
    policy = policy_cls(spec)
    t0 = time.perf_counter()
    model = models.build(spec.model, spec.weights, spec.device, spec.dtype, policy.attn_implementation(spec.prefill), spec.seed)
    policy.prepare(model)
    engine = Engine(model, policy, spec.device, spec.prefill, spec.chunk_size)
    tok = AutoTokenizer.from_pretrained(spec.weights)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with MemoryMonitor(spec.device) as mon:
        if spec.experiment == "fact_retention":
            from frameworks.accuracy import retention

            acc = retention.run(engine, tok, spec)
        else:
            from frameworks.accuracy import harness

            acc = harness.run(engine, tok, spec)
    eval_s = time.perf_counter() - t0
    extra = {"model_build_s": build_s, "eval_s": eval_s, "attn_implementation": model.config._attn_implementation}
    extra.update(policy.metrics())
    length = sum(n for _, n, _ in engine.calls) / max(len(engine.calls), 1)
    acc.update({"kv_budget": spec.kv_budget, "kv_kept_fraction": kept_fraction(model, engine.calls),
                "kv_fetched_fraction": fetched_fraction(extra, length)})
    return Measurement([], [eval_s], mon.result(), engine.kv_bytes_peak, extra, accuracy=acc)
