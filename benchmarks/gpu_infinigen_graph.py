"""GPU check of InfiniGen's graph decode (issue 12): captured == eager, and its step against the target.

    python benchmarks/gpu_infinigen_graph.py --out DIR [--budget-s 210] [--tiny] [--checks A,B,...] [--list]

On one GPU (the H200), in priority order, each check on its own (an exception is printed with its
traceback and recorded, and the next check runs; after a CUDA error the worker exits and a fresh
one continues with the checks not yet recorded, so one call gives every answer it can):
  rates        pinned host -> device copy rate (cudaMemcpy of 1 GiB, page-locked): the PCIe rate
  correct/*    tiny fp32 models on the GPU, batch 3: graph (captured: decode_graphs >= 1, every step
               on device positions) == eager, logits within rtol/atol 1e-4, same greedy tokens, same
               counters (steps, fetched tokens and bytes); a 2- and a 3-layer Llama, all-full layers,
               OPT; with the regional compile (compile layers) after the 8B figures (a cold compile)
  8b/graph-*   Llama-3.1-8B random bf16, prompt 2048, 256 generated, kv_budget 0.2, batch 1/8/32: graph
               decode with the fetch and without it (speculation only, every kernel on every SM), median step (CUDA events);
               target: step <= 1.2 x max(step without fetch, fetched bytes per step / PCIe rate)
  8b/graph-fetch-V  overlap variant V (benchmarks/infinigen_overlap.py: split, serial, greenN, ...) at
               batch 8/32: the default graph step with one setting changed, its step against the default's
               (step_vs_default) and against the target; correct/tiny-llama@V: graph == eager under V.
               A variant this torch / driver cannot run is recorded `unsupported` with the reason
  spec/bsB     the fused speculation vs the torch ops it replaced, bf16 at the 8B's shapes: same k and
               tokens (pass: overlap >= 0.99 of the selected tokens: bf16 near-ties), time a layer on an idle GPU
  gather/bsB   the Triton gather alone at the 8B's shapes: GB/s of each kernel shape on all SMs, 8 and 16
  gather-store/bsB  the same from a whole 32-layer host store (the policy's; and with huge pages), layers cycled
  profile/bsB  the default step under torch.profiler: kernels per step, the gather's rate inside the step
  8b/correct   8B bf16 graph vs eager, batch 2, 16 generated: logit difference and token agreement (report)
  8b/eager-*   the eager step at the same batches (64 generated), for comparison
Writes DIR/infinigen_graph.jsonl (one line per check) and DIR/infinigen_graph_summary.json.
The whole plan takes ~3300 s (--list; every variant ever measured): --checks picks groups (a group
is a check's name up to /bs or @, e.g. 8b/graph-fetch-split; the figures' prerequisites are
added), --budget-s caps a call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import infinigen_overlap as overlap  # noqa: E402 - beside this file

TARGET = 1.2
TOL = 1e-4
BATCHES = (1, 8, 32)
COUNTERS = ("decode_steps", "fetched_tokens_per_step", "fetched_tokens_per_step_speculated", "fetched_bytes_per_step",
            "selected_bytes_per_step")
# (name, model, prefill, kv_budget, policy, compile)
TINY = [("correct/tiny-llama", "tiny-llama-3.1", "eager", 0.4, {}, "none"),
        ("correct/tiny-llama-compiled", "tiny-llama-3.1", "eager", 0.4, {}, "layers"),
        ("correct/tiny-llama-3layers-chunked", "tiny-llama-3.2-3b", "chunked", 0.4, {}, "none"),
        ("correct/tiny-llama-full2", "tiny-llama-3.1", "eager", 0.4, {"full_layers": 2}, "none"),
        ("correct/tiny-opt", "tiny-opt", "chunked", 0.4, {"partial_columns": "warmup"}, "none")]


# overlap variants (infinigen_overlap.VARIANTS) in the order they run: the new ones at every batch (one
# that wins at 8 and 32 must not lose at 1), the old ones at the batches that miss the target
# (the default step: `split` with the gather on 8 SMs of its own, since 2026-12-03; `split` alone
# is the layout it replaced, `side` the one before)
NEW_VARIANTS = ("full-chunked", "full-gather", "spec-torch", "spec-select", "gather-best", "gather-r32", "gather-s2")
GATHER_SHAPES = [{}, {"block_rows": 32}, {"block_rows": 64}, {"num_warps": 8}, {"block_rows": 32, "num_warps": 8},
                 {"stages": 2}, {"stages": 3}, {"block_rows": 8}, {"programs": 128}, {"programs": 128, "block_rows": 32},
                 {"programs": 256}]  # gather/bsB: the Triton gather alone ({} = the default shape)
# measured at 9ec5a6d, 5000dc8 and f746a34 (results/reference/h200-2026-12-03/), df09fb5 (side, split-prio), a4dbfbb
# (serial, green16), 7d916f0 (prio, fullgrid): kept, for the record
OLD_VARIANTS = ("split", "split-gathergreen8-prog128", "split-gathergreen16", "split-gathergreen8", "split-gathergreen8-prio", "split-gathergreen8-prog32", "split-gathergreen32",
                "split-prog16", "split-prog32", "split-green16", "green8", "green32", "side", "serial", "split-prio",
                "green16", "prio", "fullgrid")
TINY_VARIANTS = ("full-chunked", "full-gather", "spec-torch", "spec-select", "split", "side", "serial", "green16")  # correct/tiny-llama@v: graph == eager under the variant


def plan(tiny: bool) -> list[tuple[str, float]]:
    """(check, estimated seconds) in priority order."""
    compiled = [(t[0], 25) for t in TINY if t[5] == "layers"]  # a cold Inductor compile: after the 8B figures
    v = [("rates", 5)] + [(t[0], 8) for t in TINY if t[5] != "layers"]
    v += [(f"correct/tiny-llama@{x}", 8) for x in TINY_VARIANTS]
    if tiny:
        return v + compiled
    v += [(f"spec/bs{b}", 6) for b in BATCHES] + [(f"gather/bs{b}", 15) for b in BATCHES[1:]]
    v += [(f"gather-store/bs{b}", 20) for b in BATCHES[1:]] + [(f"profile/bs{b}", 30) for b in BATCHES[1:]]
    for b in BATCHES:
        v += [(f"8b/graph-fetch/bs{b}", 12 + 0.6 * b), (f"8b/graph-nofetch/bs{b}", 10 + 0.3 * b)]
    v += [(f"8b/graph-fetch-{x}/bs{b}", 12 + 0.6 * b) for x in NEW_VARIANTS for b in BATCHES]
    v += [(f"8b/graph-fetch-{x}/bs{b}", 12 + 0.6 * b) for x in OLD_VARIANTS for b in BATCHES[1:]]
    v.append(("8b/correct", 25))
    v += compiled
    v += [(f"8b/eager-fetch/bs{b}", 10 + 0.5 * b) for b in BATCHES]
    return v


def select_checks(checks: list[tuple[str, float]], wanted: str | None) -> list[tuple[str, float]]:
    """--checks a,b,...: the checks named or under a named group (8b/graph-fetch-split = its batches;
    correct = every tiny check), plus what their figures need (rates; at each batch the default
    graph-fetch and graph-nofetch, measured first), in plan order."""
    if not wanted:
        return checks
    groups = [w.strip().rstrip("/") for w in wanted.split(",") if w.strip()]
    names = {n for n, _ in checks}
    unknown = [g for g in groups if g not in names and not any(n.startswith(g + "/") or n.startswith(g + "@")
                                                               for n in names)]
    if unknown:
        raise SystemExit(f"--checks: no check named or under {', '.join(unknown)} (see --list)")
    picked = {n for n in names if any(n == g or n.startswith(g + "/") or n.startswith(g + "@") for g in groups)}
    for n in list(picked):
        if n.startswith("8b/graph-") and "/bs" in n:
            b = n.rsplit("/", 1)[1]
            picked |= {"rates", f"8b/graph-fetch/{b}", f"8b/graph-nofetch/{b}"}
    return [(n, est) for n, est in checks if n in picked]


class Ctx:
    def __init__(self, tiny: bool):
        import torch

        self.torch, self.tiny = torch, tiny
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = None
        self.pcie = None

    def model_8b(self):
        from frameworks import models

        if self.model is None:
            self.model = models.build("llama-3.1-8b", "random", self.device, "bfloat16", "sdpa", seed=0)
        return self.model

    def free(self):
        import gc

        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()


def spec(ctx, model, batch, prompt, gen, decode, kv_budget, prefill, policy=None, compile=None, dtype="bfloat16"):
    from frameworks.harness.spec import CellSpec

    return CellSpec.from_dict(dict(experiment="gpu_infinigen_graph", framework="infinigen", model=model,
                                   batch_size=batch, prompt_len=prompt, gen_len=gen, kv_budget=kv_budget,
                                   prefill=prefill, chunk_size=16 if prompt < 256 else 4096, decode=decode,
                                   device=ctx.device, dtype=dtype, policy=policy or {},
                                   compile=compile if decode == "graph" else None))


def engine_for(ctx, s, model, fetch=True):
    import torch

    from frameworks.hf.engine import Engine
    from frameworks.infinigen.policy import InfiniGenPolicy

    ctx.free()  # the previous variant's cache (reference cycles), graphs and pinned store
    policy = InfiniGenPolicy(s)
    policy.fetch = fetch
    model.set_attn_implementation(policy.attn_implementation(s.prefill))
    policy.prepare(model)
    if s.compile == "layers":
        torch._dynamo.reset()
    return policy, Engine(model, policy, s.device, s.prefill, s.chunk_size, max_len=s.prompt_len + s.gen_len,
                          compile=s.compile)


def release(ctx, model, policy) -> None:
    for m in model.modules():
        m._forward_pre_hooks.clear()
    if policy is not None and policy._store is not None:
        policy._store.close()  # unpins now (GBs of page-locked memory at batch 32)
    ctx.free()


def check_rates(ctx) -> dict:
    torch = ctx.torch
    if ctx.device != "cuda":
        return {"pcie_bytes_s": None, "note": "no CUDA"}
    h = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(h.shape, dtype=torch.uint8, device="cuda")
    d.copy_(h, non_blocking=True)
    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        d.copy_(h, non_blocking=True)
    e.record()
    torch.cuda.synchronize()
    rate = 5 * h.numel() / (a.elapsed_time(e) / 1e3)
    del h, d
    ctx.free()
    return {"pcie_bytes_s": rate, "pass": rate > 0}


def check_tiny(ctx, name) -> dict:
    from frameworks import models

    torch = ctx.torch
    base, _, variant = name.partition("@")  # correct/tiny-llama@split: the tiny check under an overlap variant
    _, model_name, prefill, kv, pol, compile = next(t for t in TINY if t[0] == base)
    import numpy as np

    ids = np.random.default_rng(7).integers(0, 1000, (3, 25))
    runs = {}
    for decode in ("eager", "graph"):
        s = spec(ctx, model_name, 3, 25, 9, decode, kv, prefill, pol, compile, dtype="float32")
        model = models.build(model_name, "random", ctx.device, "float32", "sdpa", seed=0)
        with torch.no_grad():  # sharpened attention: the selection depends on content
            for n, p in model.named_parameters():
                if n.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(4.0)
        policy, e = engine_for(ctx, s, model)
        try:
            setting = overlap.configure(ctx, policy, e, **overlap.VARIANTS[variant]) if variant else {}
            e.collect_logits = True
            e.generate(ids[::-1].copy(), 4)  # the warm-up: captures the step
            policy.reset_metrics()  # as decode_8b and the runner: the measured batch is replayed after it
            e.generate(ids, 9)
            runs[decode] = (torch.stack(e.step_logits), e.last_tokens.cpu(), policy.metrics(), e.graph_stats())
        finally:
            release(ctx, model, policy)
    (lr, tr, mr, _), (lg, tg, mg, gs) = runs["eager"], runs["graph"]
    diff = (lg - lr).abs().max().item()
    counters = {k: (mr[k], mg[k]) for k in COUNTERS}
    out = {"max_abs_logit_diff": diff, "logits_within_tol": bool(torch.allclose(lg, lr, rtol=TOL, atol=TOL)),
           "tokens_equal": bool(torch.equal(tg, tr)), "counters_eager_graph": counters,
           "counters_equal": all(a == b for a, b in counters.values()), "graph": gs,
           "graph_decode_steps": mg["graph_decode_steps"], "fallback": mg["infinigen_graph_fallback"],
           "variant": setting}
    captured = ctx.device != "cuda" or gs.get("decode_graphs", 0) >= 1
    out["captured"] = captured
    out["pass"] = (out["logits_within_tol"] and out["tokens_equal"] and out["counters_equal"] and captured
                   and mg["graph_decode_steps"] == mg["decode_steps"] and mg["infinigen_graph_fallback"] is None)
    return out


def decode_8b(ctx, batch, decode, gen, fetch=True, compile=None, **variant) -> dict:
    from frameworks.harness import workload

    model = ctx.model_8b()
    s = spec(ctx, "llama-3.1-8b", batch, 2048, gen, decode, 0.2, "flash", compile=compile)
    policy = None
    try:
        policy, e = engine_for(ctx, s, model, fetch)
        setting = overlap.configure(ctx, policy, e, **variant)
        prompts = workload.prompts(0, batch, 2048, model.config.vocab_size)
        t0 = time.perf_counter()
        e.generate(prompts, 4)  # the runner's warm-up: same shapes, captures the step
        warm = time.perf_counter() - t0
        policy.reset_metrics()
        import warnings

        with warnings.catch_warnings(record=True) as syncs:  # torch's check: implicit host syncs (prefill included)
            warnings.simplefilter("always")
            ctx.torch.cuda.set_sync_debug_mode("warn")
            try:
                times = e.generate(prompts, gen)
            finally:
                ctx.torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message)[:200] for w in syncs if "synchroniz" in str(w.message).lower()]
        steps = [b - a for a, b in zip(times, times[1:])]
        m = policy.metrics()
        return {"step_ms": statistics.median(steps) * 1e3, "step_ms_mean": (times[-1] - times[0]) / (gen - 1) * 1e3,
                "step_ms_p90": sorted(steps)[int(0.9 * len(steps))] * 1e3, "warmup_s": warm, "graph": e.graph_stats(),
                "fetched_bytes_per_step": m["fetched_bytes_per_step"], "decode_steps": m["decode_steps"],
                "graph_decode_steps": m["graph_decode_steps"], "fallback": m["infinigen_graph_fallback"],
                "fetched_tokens_per_seq_layer_speculated": m["fetched_tokens_per_seq_layer_speculated"],
                "peak_gpu_mem_gb": ctx.torch.cuda.max_memory_allocated() / 1e9, "spec": s.to_dict(),
                "host_syncs_in_measured_batch": len(syncs), "host_sync_examples": sorted(set(syncs))[:3],
                "variant": setting}
    finally:
        release(ctx, model, policy)
        ctx.torch.cuda.reset_peak_memory_stats()


def check_8b_correct(ctx) -> dict:
    from frameworks.harness import workload

    torch = ctx.torch
    model = ctx.model_8b()
    prompts = workload.prompts(1, 2, 2048, model.config.vocab_size)
    runs = {}
    for decode in ("eager", "graph"):
        s = spec(ctx, "llama-3.1-8b", 2, 2048, 16, decode, 0.2, "flash")
        policy = None
        try:
            policy, e = engine_for(ctx, s, model)
            e.collect_logits = True
            e.generate(prompts[::-1].copy(), 4)
            e.generate(prompts, 16)
            runs[decode] = (torch.stack(e.step_logits), e.last_tokens.cpu(), e.graph_stats())
        finally:
            release(ctx, model, policy)
    (lr, tr, _), (lg, tg, gs) = runs["eager"], runs["graph"]
    agree = (tg == tr).float().mean().item()
    first = int((tg != tr).any(0).nonzero()[0]) if agree < 1 else None
    # up to the first differing token both runs saw the same inputs: those steps' differences are the
    # modes' own (step 0: the prefill's logits); after it the sequences differ
    upto = (lg - lr).abs().amax(dim=(1, 2))[: (first + 1) if first is not None else None]
    margin = lr.topk(2, dim=-1).values
    return {"max_abs_logit_diff": (lg - lr).abs().max().item(), "logit_scale": lr.abs().max().item(),
            "max_abs_logit_diff_per_step_until_first_difference": [round(x, 4) for x in upto.tolist()],
            "eager_top2_margin_min_per_step": [round(x, 4) for x in (margin[..., 0] - margin[..., 1]).amin(1).tolist()],
            "token_agreement": agree, "first_differing_step": first, "graph": gs,
            "note": "bf16: a report (a near-tie can flip a greedy token once the summation order differs)"}


def check_spec(ctx, b: int) -> dict:
    """The fused speculation (fused.py) against the torch path (select.py) in bf16 at the 8B's
    shapes (8 kv heads of 4 queries, head 128, r 25, a 2304-token cache with 2100 filled, budget
    461, alpha 4 and inf), random inputs: the same k, the same selected tokens (also by the select
    kernel); and each one's time alone (alpha inf) on an idle GPU, 31 layers' speculations
    captured in one CUDA graph (no launch overhead)."""
    torch = ctx.torch
    if ctx.device != "cuda":
        return {"note": "no CUDA"}
    from frameworks.infinigen import fused, select

    hkv, g, d, r, length, n, cap, layers = 8, 4, 128, 25, 2304, 2100, 461, 31
    dev, dt = ctx.device, torch.bfloat16
    gen = torch.Generator().manual_seed(b)
    q = torch.randn(b, 1, hkv * g * d, generator=gen).to(dev, dt)
    table = torch.randn(b, 1, 1, 2 * d, generator=gen).to(dev, dt)
    qproj = (torch.randn(hkv, 2 * d, r, generator=gen) / 8).to(dev, dt)
    pk = torch.randn(b, hkv, length, r, generator=gen).to(dev, dt)
    n_t, limit = torch.tensor(n, device=dev), torch.tensor(cap, device=dev)
    invalid = torch.arange(length, device=dev) >= n
    keep_pos, zero, ninf = torch.arange(cap, device=dev), torch.zeros((), device=dev), torch.full((), float("-inf"), device=dev)
    bias, k_sum, kb_sum = torch.zeros(cap, device=dev), torch.zeros((), dtype=torch.long, device=dev), torch.zeros(
        (), dtype=torch.long, device=dev)

    def with_torch():  # cache.py's torch path and launch_sparse's bias and sums
        qq = q.view(b, hkv, g, d)
        pq = torch.matmul(torch.cat((qq, qq), dim=-1) * table, qproj)
        idx, k = select.select(select.scores(pq, pk).masked_fill_(invalid, float("-inf")), alpha, cap, 0, limit)
        torch.where(keep_pos < k, zero, ninf, out=bias)
        k_sum.add_(k)
        kb_sum.add_(k, alpha=b)
        return idx, k

    def with_fused(select_kernel=False):
        return fused.speculate(q, table, qproj, pk, n_t, g, alpha, cap, 0, bias, k_sum, kb_sum, limit=limit,
                               select_kernel=select_kernel)

    out = {}
    for alpha in (4.0, float("inf")):  # a few tokens within alpha of the max; every one (k = the budget), timed
        (ti, tk), (fi, fk), (si, sk) = with_torch(), with_fused(), with_fused(True)
        k = int(fk)
        same = [len(set(a.tolist()) & set(c.tolist())) / max(k, 1) for a, c in
                zip(ti.view(-1, cap)[:, :k].cpu(), fi.view(-1, cap)[:, :k].cpu())]
        out[f"alpha={alpha}"] = {
            "k_torch": int(tk), "k_fused": k, "k_equal": int(tk) == k, "selected_overlap_min": min(same),
            "selected_overlap_mean": sum(same) / len(same), "lanes_identical": sum(x == 1.0 for x in same) / len(same),
            "select_kernel_same_tokens": bool(int(sk) == k and torch.equal(si[..., :k].sort(-1).values,
                                                                           fi[..., :k].sort(-1).values))}
    for name, fn in (("torch", with_torch), ("fused", with_fused), ("fused_select", lambda: with_fused(True))):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(layers):
                fn()
        graph.replay()
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            graph.replay()
        e.record()
        torch.cuda.synchronize()
        out[f"{name}_us_per_layer"] = a.elapsed_time(e) * 1e3 / (20 * layers)
        del graph
    out["fused_vs_torch"] = out["fused_us_per_layer"] / out["torch_us_per_layer"]
    out["fused_select_vs_torch"] = out["fused_select_us_per_layer"] / out["torch_us_per_layer"]
    out["pass"] = all(v["k_equal"] and v["selected_overlap_min"] >= 0.99 and v["select_kernel_same_tokens"]
                      for key, v in out.items() if key.startswith("alpha="))
    ctx.free()
    return out


def check_gather(ctx, b: int) -> dict:
    """The Triton gather alone, the 8B's shapes at batch b (a 2304-token host store of b x 8 lanes,
    rows of 2 x 128 bf16, 460 of the 461 budget rows a lane selected at random): its rate in GB/s
    for each shape of GATHER_SHAPES on every SM (the default stream), on the gather's 8 SMs and on
    16 (green contexts), the GPU otherwise idle. `best`: the fastest shape on 8 SMs."""
    torch = ctx.torch
    if ctx.device != "cuda":
        return {"note": "no CUDA"}
    from frameworks.infinigen import green, kernels
    from frameworks.infinigen.store import device_view

    lanes, length, cap, k, w = b * 8, 2304, 461, 460, 256
    host = torch.empty((length * lanes, w), dtype=torch.bfloat16, pin_memory=True)
    src = device_view(host)
    gen = torch.Generator().manual_seed(b)
    idx = torch.stack([torch.randperm(length, generator=gen)[:cap] for _ in range(lanes)]).to(ctx.device)
    k_t = torch.tensor(k, device=ctx.device)
    out = torch.empty((lanes * cap, w), dtype=torch.bfloat16, device=ctx.device)
    nbytes = lanes * k * w * 2
    places = {"all": torch.cuda.current_stream()}
    for n in (8, 16):
        try:
            places[f"green{n}"] = green.partition(n).make_side()
        except green.Unavailable as e:
            places[f"green{n}"] = str(e)
    rates = {}
    for shape in GATHER_SHAPES:
        key = ",".join(f"{a}={v}" for a, v in shape.items()) or "default"
        kw = dict(shape)
        programs = kw.pop("programs", kernels.PROGRAMS)
        for place, stream in places.items():
            if isinstance(stream, str):
                rates[f"{key}@{place}"] = stream
                continue
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                kernels.gather_selected(src, idx, k_t, out, programs, **kw)  # compile, warm
                a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(10):
                    kernels.gather_selected(src, idx, k_t, out, programs, **kw)
                e.record()
            torch.cuda.synchronize()
            rates[f"{key}@{place}"] = nbytes * 10 / (a.elapsed_time(e) / 1e3) / 1e9
    on8 = {key: r for key, r in rates.items() if key.endswith("@green8") and isinstance(r, float)}
    best = max(on8, key=on8.get) if on8 else None
    best_shape = next((sh for sh in GATHER_SHAPES if (",".join(f"{a}={v}" for a, v in sh.items()) or "default")
                       == best.rsplit("@", 1)[0]), None) if best else None
    ok = bool(torch.equal(out.view(lanes, cap, w)[:, :k].cpu(),
                          host[(idx[:, :k].cpu() * lanes + torch.arange(lanes).view(lanes, 1)).reshape(-1)].view(
                              lanes, k, w)))
    del src, host
    ctx.free()
    return {"gb_s": rates, "best_on_8_sms": best, "best_shape": best_shape, "rows_equal": ok, "pass": ok}


def _host_store(torch, b: int, huge: bool):
    """The 8B's host store at batch b (32 layers x 2304 tokens x b x 8 heads x K|V x 128, bf16) as the
    policy makes it (store.HostStore: torch.empty, zeroed, cudaHostRegister'ed mapped), or with
    transparent huge pages asked for before it is first touched (madvise MADV_HUGEPAGE)."""
    import ctypes

    from frameworks.infinigen.store import HostStore, device_view

    if not huge:
        return HostStore(32, 2304, b, 8, 128, torch.bfloat16, pin=True, device="cuda", zero=True), None
    kv = torch.empty((32, 2304, b, 8, 2, 128), dtype=torch.bfloat16)
    libc = ctypes.CDLL(None, use_errno=True)
    start = (kv.data_ptr() + (1 << 21) - 1) & ~((1 << 21) - 1)
    end = (kv.data_ptr() + kv.numel() * 2) & ~((1 << 21) - 1)
    rc = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14)  # MADV_HUGEPAGE
    kv.zero_()
    err = torch.cuda.cudart().cudaHostRegister(kv.data_ptr(), kv.numel() * 2, 3)  # portable | mapped
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({int(err)})")
    return kv, {"madvise_rc": rc, "dev": device_view(kv)}


def _anon_huge_kb() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def check_gather_store(ctx, b: int) -> dict:
    """The Triton gather alone from a whole 32-layer host store (the policy's, cudaHostRegister'ed; and
    one with transparent huge pages) cycling through layers 1..31 as a step does, on the gather's 8
    SMs: does the store's 2.4-9.7 GB footprint (address translation over PCIe) slow it against
    gather/bsB's single 0.3 GB pinned buffer?"""
    torch = ctx.torch
    if ctx.device != "cuda":
        return {"note": "no CUDA"}
    from frameworks.infinigen import green, kernels

    lanes, length, cap, k, w = b * 8, 2304, 461, 460, 256
    gen = torch.Generator().manual_seed(b)
    idx = torch.stack([torch.randperm(length, generator=gen)[:cap] for _ in range(lanes)]).to(ctx.device)
    k_t = torch.tensor(k, device=ctx.device)
    out = torch.empty((lanes * cap, w), dtype=torch.bfloat16, device=ctx.device)
    stream = green.partition(8).make_side()
    res = {"thp_enabled": open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()}
    for huge in (False, True):
        before = _anon_huge_kb()
        t0 = time.perf_counter()
        store, extra = _host_store(torch, b, huge)
        res[f"alloc_register_s_{'thp' if huge else 'policy'}"] = time.perf_counter() - t0
        if huge:
            res["anon_huge_mb_added"] = ((_anon_huge_kb() or 0) - (before or 0)) / 1024
            res["madvise_rc"] = extra["madvise_rc"]
            srcs = [extra["dev"][i].view(-1, w) for i in range(1, 32)]
        else:
            srcs = [store.gather_source(i) for i in range(1, 32)]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for src in srcs[:2]:
                kernels.gather_selected(src, idx, k_t, out)
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for src in srcs:
                kernels.gather_selected(src, idx, k_t, out)
            e.record()
        torch.cuda.synchronize()
        res[f"gb_s_{'thp' if huge else 'policy'}"] = lanes * k * w * 2 * len(srcs) / (a.elapsed_time(e) / 1e3) / 1e9
        del srcs
        if huge:
            torch.cuda.cudart().cudaHostUnregister(store.data_ptr())
        else:
            store.close()
        del store, extra
    ctx.free()
    res["pass"] = True
    return res


def check_profile(ctx, b: int) -> dict:
    """The default captured step at batch b under torch.profiler (CUPTI traces the kernels of graph
    replays): each kernel's time per step, the gather's time and rate inside the step, and how
    busy its stream is between a step's first and last gather. The trace: DIR/trace-bsB.json.gz."""
    torch = ctx.torch
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    from frameworks.harness import workload

    model = ctx.model_8b()
    s = spec(ctx, "llama-3.1-8b", b, 2048, 24, "graph", 0.2, "flash")
    policy = None
    try:
        policy, e = engine_for(ctx, s, model)
        overlap.configure(ctx, policy, e)
        prompts = workload.prompts(0, b, 2048, model.config.vocab_size)
        e.generate(prompts, 4)
        policy.reset_metrics()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            e.generate(prompts, 24)
        fetched = policy.metrics()["fetched_bytes_per_step"]
        path = ctx.out / f"trace-bs{b}.json"
        prof.export_chrome_trace(str(path))
    finally:
        release(ctx, model, policy)
    trace = json.loads(path.read_text())
    with open(path, "rb") as f, gzip.open(str(path) + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    path.unlink()
    kern = [ev for ev in trace.get("traceEvents", []) if ev.get("cat") == "kernel" and "dur" in ev]
    gathers = sorted((ev for ev in kern if "_gather_selected" in ev["name"]), key=lambda ev: ev["ts"])
    if not gathers:
        return {"error": "no gather kernel in the trace", "kernels": len(kern)}
    # a decode step's gathers: one per speculated layer + each full layer's prefetch; the last 20 steps
    per_step = len(policy.skews) + policy.full_layers
    steps = 20
    window = gathers[-steps * per_step:]
    t0, t1 = window[0]["ts"], window[-1]["ts"] + window[-1]["dur"]
    busy = sum(ev["dur"] for ev in window)
    by_name: dict = {}
    for ev in kern:
        if t0 <= ev["ts"] <= t1:
            n = ev["name"][:90]
            st = by_name.setdefault(n, [0.0, 0, set()])
            st[0] += ev["dur"]
            st[1] += 1
            st[2].add(ev.get("args", {}).get("stream"))
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    gdur = [ev["dur"] for ev in window]
    return {"fetched_bytes_per_step": fetched, "gather_kernels": len(window), "window_us": t1 - t0,
            "gather_stream_busy": busy / (t1 - t0), "gather_us_per_step": busy / steps,
            "gather_gb_s_in_step": fetched * steps / (busy / 1e6) / 1e9 if busy else None,
            "gather_us_median": statistics.median(gdur), "gather_us_max": max(gdur), "gather_us_min": min(gdur),
            "gaps_us_median": statistics.median([b2["ts"] - (a2["ts"] + a2["dur"]) for a2, b2 in zip(window, window[1:])]),
            "top_kernels_us_per_step": [(n, round(v[0] / steps, 1), v[1] // steps, sorted(map(str, v[2])))
                                        for n, v in top], "pass": True}


def run_check(ctx, name, results) -> dict:
    if name == "rates":
        return check_rates(ctx)
    if name.startswith("spec/"):
        return check_spec(ctx, int(name.rsplit("bs", 1)[1]))
    if name.startswith("gather/"):
        return check_gather(ctx, int(name.rsplit("bs", 1)[1]))
    if name.startswith("gather-store/"):
        return check_gather_store(ctx, int(name.rsplit("bs", 1)[1]))
    if name.startswith("profile/"):
        return check_profile(ctx, int(name.rsplit("bs", 1)[1]))
    if name.startswith("correct/"):
        return check_tiny(ctx, name)  # may raise overlap.Unsupported (recorded as unsupported)
    if name == "8b/correct":
        return check_8b_correct(ctx)
    kind, b = name.split("/")[1], int(name.rsplit("bs", 1)[1])
    if kind == "graph-fetch":
        return decode_8b(ctx, b, "graph", 256)
    if kind.startswith("graph-fetch-"):  # the default graph step with one setting changed, beside it
        variant = dict(overlap.VARIANTS[kind[len("graph-fetch-"):]])
        if variant.get("gather_shape") == "best":
            best = results.get("gather/bs32", {}).get("best_shape")
            if best is None:
                raise overlap.Unsupported("gather-best: no gather/bs32 result to take the shape from")
            best = dict(best)
            if "programs" in best:
                variant["programs"] = best.pop("programs")
            variant["gather_shape"] = best
        r = decode_8b(ctx, b, "graph", 256, **variant)
        base = results.get(f"8b/graph-fetch/bs{b}", {})
        if "step_ms" in base:
            r["step_vs_default"] = r["step_ms"] / base["step_ms"]
        _target(r, results, b)
        return r
    if kind == "graph-nofetch":
        # every kernel on every SM (no partition for a gather that does not run): the stricter bound
        r = decode_8b(ctx, b, "graph", 128, fetch=False, **overlap.VARIANTS["split"])
        fetch = results.get(f"8b/graph-fetch/bs{b}", {})
        t = _bound(results, b, fetch.get("fetched_bytes_per_step"), r["step_ms"])
        if "step_ms" in fetch and t:
            r["target"] = {"step_ms": fetch["step_ms"], **t, "ratio": fetch["step_ms"] / t["bound_ms"], "limit": TARGET,
                           "met": fetch["step_ms"] <= TARGET * t["bound_ms"]}
        return r
    if kind == "eager-fetch":
        return decode_8b(ctx, b, "eager", 64)
    raise ValueError(f"unknown check {name}")


def _bound(results, b, fetched_bytes, nofetch_ms=None) -> dict | None:
    """The target's bound at batch b: max(step without fetch, fetched bytes / pinned PCIe rate)."""
    pcie = results.get("rates", {}).get("pcie_bytes_s")
    nofetch_ms = nofetch_ms or results.get(f"8b/graph-nofetch/bs{b}", {}).get("step_ms")
    if not (pcie and nofetch_ms and fetched_bytes):
        return None
    pcie_ms = fetched_bytes / pcie * 1e3
    return {"nofetch_step_ms": nofetch_ms, "pcie_ms": pcie_ms, "bound_ms": max(nofetch_ms, pcie_ms)}


def _target(r, results, b) -> None:
    """A variant's own figure against the target (the nofetch step of the default, measured before it)."""
    t = _bound(results, b, r.get("fetched_bytes_per_step"))
    if t:
        r["target"] = {"step_ms": r["step_ms"], **t, "ratio": r["step_ms"] / t["bound_ms"], "limit": TARGET,
                       "met": r["step_ms"] <= TARGET * t["bound_ms"]}


def worker(out: Path, tiny: bool, deadline: float, checks: str | None = None) -> int:
    ctx = Ctx(tiny)
    ctx.out = out
    log = out / "infinigen_graph.jsonl"
    results = _results(log)
    for name, r in list(results.items()):
        if r["status"] == "started":  # the worker before this one died in it (a crash, not an exception)
            results[name] = {"check": name, "status": "error", "error": "the worker process died during this check "
                             "(see the output above it)"}
            _append(log, results[name])
    for name, est in select_checks(plan(tiny), checks):
        if name in results:
            continue
        row = {"check": name}
        if time.time() + est <= deadline:
            _append(log, {"check": name, "status": "started"})
        if time.time() + est > deadline:
            row.update(status="skipped", reason=f"time budget (needs ~{est:.0f} s)")
        else:
            t0 = time.perf_counter()
            try:
                row.update({"status": "ok", **run_check(ctx, name, results)})
            except overlap.Unsupported as e:  # a variant this torch / driver cannot run: recorded, not a failure
                row.update(status="unsupported", reason=str(e))
            except Exception as e:  # noqa: BLE001 - recorded, printed, the next check runs
                row.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                print(f"[{name}] FAILED\n{row['traceback']}", flush=True)
            row["seconds"] = time.perf_counter() - t0
        _append(log, row)
        results[name] = row
        print(f"[{name}] {json.dumps({k: v for k, v in row.items() if k != 'traceback'}, default=str)}", flush=True)
        if row["status"] == "error" and ctx.device == "cuda" and not _cuda_usable(ctx):
            return 3  # a fresh worker continues with the checks not yet recorded
    return 0


def _cuda_usable(ctx) -> bool:
    """After a failed check: does this process's CUDA context still work (a failed capture or a
    device-side fault can leave it unusable)?"""
    torch = ctx.torch
    try:
        torch.cuda.synchronize()
        ok = torch.ones(4, device="cuda").add_(1).sum().item() == 8
        return ok and not torch.cuda.is_current_stream_capturing()
    except Exception as e:  # noqa: BLE001 - the answer is no
        print(f"CUDA context unusable after the failure ({type(e).__name__}: {e}): a fresh worker goes on", flush=True)
        return False


def _results(log: Path) -> dict:
    if not log.exists():
        return {}
    return {r["check"]: r for r in map(json.loads, log.read_text().splitlines()) if r}


def _append(log: Path, row: dict) -> None:
    with open(log, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def summary(out: Path) -> int:
    results = _results(out / "infinigen_graph.jsonl")
    print("\n== InfiniGen graph decode: checks ==")
    bad = 0
    for name, r in results.items():
        status = r["status"]
        if status == "unsupported":
            print(f"{name:38s} unsupported {r.get('reason', '')[:300]}")
            continue
        if status == "ok" and r.get("pass") is False:
            status = "FAIL"
        if status in ("FAIL", "error"):
            bad += 1
        line = f"{name:38s} {status:7s}"
        if "step_ms" in r:
            line += f" step {r['step_ms']:.2f} ms (p90 {r['step_ms_p90']:.2f}), fetched {r['fetched_bytes_per_step'] / 1e6:.1f} MB/step," \
                    f" graphs {r['graph'].get('decode_graphs')}, graph steps {r['graph_decode_steps']}/{r['decode_steps']}," \
                    f" host syncs {r['host_syncs_in_measured_batch']} (prefill + {r['decode_steps']} steps)"
        if "max_abs_logit_diff" in r:
            line += f" max|dlogit| {r['max_abs_logit_diff']:.2e}"
            line += f" tokens {'equal' if r.get('tokens_equal') else r.get('token_agreement')}"
        if "pcie_bytes_s" in r and r["pcie_bytes_s"]:
            line += f" pinned H2D {r['pcie_bytes_s'] / 1e9:.1f} GB/s"
        if "error" in r:
            line += f" {r['error'][:200]}"
        print(line)
    print("\n== target: step <= 1.2 x max(step without fetch, fetched bytes / pinned PCIe rate) ==")
    for b in BATCHES:
        t = results.get(f"8b/graph-nofetch/bs{b}", {}).get("target")
        if t is None:
            print(f"bs{b:<3d} no figure (see the checks above)")
            continue
        print(f"bs{b:<3d} step {t['step_ms']:.2f} ms vs bound {t['bound_ms']:.2f} ms (no fetch {t['nofetch_step_ms']:.2f}, "
              f"PCIe {t['pcie_ms']:.2f}): {t['ratio']:.2f}x -> {'met' if t['met'] else 'MISSED'}")
        bad += not t["met"]
    print("\n== overlap variants (the default step with one setting changed, same run) ==")
    for name, r in results.items():
        if not name.startswith("8b/graph-fetch-"):
            continue
        if "step_ms" not in r:
            print(f"{name:38s} {r['status']}: {r.get('reason') or r.get('error', '')[:200]}")
            continue
        t = r.get("target")
        vs = f"{r['step_vs_default']:.2f}x the default" if "step_vs_default" in r else "no default figure"
        fig = (f", {t['ratio']:.2f}x the bound {t['bound_ms']:.2f} ms -> {'met' if t['met'] else 'MISSED'}"
               if t else ", no bound (needs rates and graph-nofetch)")
        print(f"{name:38s} step {r['step_ms']:.2f} ms, {vs}{fig}")
    for b in BATCHES:
        g, e = results.get(f"8b/graph-fetch/bs{b}", {}), results.get(f"8b/eager-fetch/bs{b}", {})
        if "step_ms" in g and "step_ms" in e:
            print(f"bs{b:<3d} eager step {e['step_ms']:.2f} ms -> graph {g['step_ms']:.2f} ms ({e['step_ms'] / g['step_ms']:.1f}x)")
    (out / "infinigen_graph_summary.json").write_text(json.dumps(results, indent=1, default=str))
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=210.0,
                    help="seconds for the checks (what would not fit is skipped and recorded)")
    ap.add_argument("--tiny", action="store_true", help="the tiny checks only (also on a CPU)")
    ap.add_argument("--checks", help="comma-separated checks or groups to run (e.g. 8b/graph-fetch-split,"
                    "8b/graph-fetch-green16/bs32); what their figures need is added")
    ap.add_argument("--list", action="store_true", help="print the plan (check, estimated s) and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list:
        chosen = select_checks(plan(args.tiny), args.checks)
        for name, est in chosen:
            print(f"{name:40s} ~{est:.0f} s")
        print(f"{'total':40s} ~{sum(e for _, e in chosen):.0f} s")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(out, args.tiny, args.deadline, args.checks)
    deadline = time.time() + args.budget_s
    for attempt in range(4):  # a worker that hit a CUDA error exits 3: a fresh one goes on
        cmd = [sys.executable, __file__, "--out", str(out), "--worker", "--deadline", str(deadline)]
        cmd += ["--checks", args.checks] if args.checks else []
        rc = subprocess.call(cmd + (["--tiny"] if args.tiny else []))
        if rc == 0:
            break
        print(f"worker exited {rc} (attempt {attempt + 1}); continuing with the checks not yet recorded", flush=True)
        if time.time() > deadline:
            break
    return summary(out)


if __name__ == "__main__":
    sys.exit(main())
