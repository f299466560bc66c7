"""GPU benchmark of the transformers engine (issue 12): decode against the HBM floor, on one H200.

    python benchmarks/gpu_engine.py --out DIR [--tiny] [--time-budget-s S] [--groups engine,overhead,...]
        [--skip hf/eager,hf/graph-matmul,...]  (variant-name prefixes left out of the plan)
    (or benchmarks/gpu_engine.sh; a second call with the same DIR runs only what is not recorded yet)

Llama-3.1-8B architecture, random bf16, prompt 2048 + 256 generated. Measured in the same run:
the HBM copy rate (device-to-device copy, bytes read + written / time) and the pinned PCIe rate
(host-to-device copy from page-locked memory). floor = (weights read per step + KV bytes read per
step) / HBM rate; weights read per step = every parameter except the input embedding (a lookup
reads b rows). KV read per step: hf the mean cached length (prompt + gen/2) x batch; h2o its slots.
Sections, in priority order, each in a worker process (a crash loses that group's remaining
variants only, recorded as errors); every variant's result is appended to DIR/variants.jsonl as
soon as it is measured, and a variant's exception is recorded and the next one runs:
  engine     correctness on a tiny fp32 model on the GPU (graph == eager: logits within rtol/atol
             1e-4, same greedy tokens; hf and h2o, batch 3, the capture really on), then the 8B model:
             hf graph at batch 1/16/64 (3 repetitions: CV; the engine's default compile, `layers`
             on CUDA: regional torch.compile, frameworks/hf/compile.py), the same with compile none,
             h2o graph at budget 0.2 (chunked
             prefill) at 1/16/64 with its bookkeeping (score update + eviction choice of every layer,
             captured alone and timed), graph vs eager on the 8B model (bf16: report), hf eager,
             hf graph with the matmul decode kernel instead of SDPA (h2o's bookkeeping with its
             fused step on CUDA: the fused steps minus SDPA over the same slots); the old paths
             side by side: graph-nofuse (separate q/k/v and gate/up GEMMs, frameworks/hf/fuse.py)
             and h2o graph-onepass (the one-program-per-head fused step, kernels.DECODE_MODE)
  h2o        H2O's Triton kernels (benchmarks/gpu_engine_h2o.py): checked against the torch path on
             the GPU (a few shapes: GQA, MHA, later chunks, ragged blocks), and timed (a 32K prompt's
             prefill chunk: score kernel tiles vs flash; a 32-layer decode step: fused vs torch path)
  ttft       h2o chunked prefill (its Triton score kernel on CUDA) vs hf flash prefill at 32K
  ttft128k   the same at 131 064 tokens
  infinigen  budget 0.2 at batch 1/8/32, with and without fetch: graph decode (captured), then eager
             (benchmarks/gpu_infinigen_graph.py checks graph == eager on the GPU first)
  overhead   a fresh process: imports + 8B build + warm-up batch with the capture (bs 16), with
             compile layers on an empty Inductor cache (cold: the first cell of a run), again on
             that cache (warm: every later cell of the model and batch), the warm one again without
             Inductor's compile-worker pool (TORCH_WARM_POOL=0), and with compile none; in the
             environment a local cell gets from the launcher (a bytecode cache where this Python
             has none and may not write it, workflow/lib/launch.py needs_pycache: emptied with
             the Inductor cache for the cold one)
  h2otorch   h2o graph at budget 0.2 with the torch path instead of the Triton kernels, batch 1/16/64
  compile    hf with torch.compile(mode="reduce-overhead") instead of one CUDA graph, batch 1/16/64
The default 490 s usually ends before h2otorch / compile: `--only h2otorch,compile` runs them in a call of their own.
Prints every target against its value; writes DIR/summary.json (targets, variants, rates,
provenance). A time guard skips (and records) what would not fit. --tiny: tiny model on the CPU.
A CUDA error can leave the worker's context unusable: after a failed variant on CUDA the worker
exits and a fresh one continues the group (variants already recorded are not rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_engine_h2o  # noqa: E402  (H2O's kernels: check, timing, fused bookkeeping)
from gpu_engine_report import print_report, summarize  # noqa: E402  (the targets: a file of their own)

GROUPS = ("engine", "h2o", "ttft", "ttft128k", "infinigen", "overhead", "h2otorch", "compile")
CV_MAX = 0.05


def settings(tiny: bool) -> dict:
    if tiny:
        return dict(model="tiny-llama-3.1", device="cpu", dtype="float32", prompt=32, gen=8, reps=2,
                    hf_batches=(1, 4), ig_batches=(1, 4), ttft=128, ttft_long=256, chunk=64)
    return dict(model="llama-3.1-8b", device="cuda", dtype="bfloat16", prompt=2048, gen=256, reps=3,
                hf_batches=(1, 16, 64), ig_batches=(1, 8, 32), ttft=32768, ttft_long=131064, chunk=4096)


def plan(tiny: bool) -> list[dict]:
    """(group, name, kind, params, est_s): what each worker runs, in order."""
    S = settings(tiny)
    v = []

    def add(group, name, kind, est_s, **params):
        v.append({"group": group, "name": name, "kind": kind, "est_s": 1.0 if tiny else est_s, "params": params})

    add("engine", "rates", "rates", 5)
    add("engine", "correct/tiny", "correct_tiny", 20)
    # the other compile mode than the device's default (CUDA: layers, CPU: none)
    add("engine", "correct/tiny-layers" if tiny else "correct/tiny-nocompile", "correct_tiny", 30,
        compile="layers" if tiny else "none")
    for i, b in enumerate(S["hf_batches"]):  # the first one compiles (cold cache: ~10 s more)
        add("engine", f"hf/graph/bs{b}", "decode", (20 if i == 0 else 10) + 0.3 * b, framework="hf", batch=b,
            decode="graph", reps=S["reps"])
    for b in S["hf_batches"]:  # the engine before regional compilation (the default on the CPU)
        add("engine", f"hf/graph-nocompile/bs{b}", "decode", 8 + 0.3 * b, framework="hf", batch=b, decode="graph",
            reps=S["reps"], compile="none")
    for b in S["hf_batches"][1:]:  # the step before the fused projections (frameworks/hf/fuse.py); bs 1 met already
        add("engine", f"hf/graph-nofuse/bs{b}", "decode", 10 + 0.3 * b, framework="hf", batch=b, decode="graph",
            reps=1, fuse="off")
    if tiny:  # on the CPU the default is none: run the compiled path too (Inductor's C++ backend)
        add("engine", "hf/graph-layers/bs1", "decode", 1.0, framework="hf", batch=1, decode="graph", reps=S["reps"],
            compile="layers")
    for b in S["hf_batches"]:
        add("engine", f"h2o/graph/bs{b}", "decode", 8 + 0.3 * b, framework="h2o", batch=b, decode="graph",
            reps=S["reps"], kv_budget=0.2)
    for b in S["hf_batches"][::2]:  # the first form of the fused step (one program per sequence and head): bs 1, 64
        add("engine", f"h2o/graph-onepass/bs{b}", "decode", 8 + 0.3 * b, framework="h2o", batch=b, decode="graph",
            reps=1, kv_budget=0.2, h2o_decode="onepass")
    add("engine", f"h2o/graph-nofuse/bs{S['hf_batches'][0]}", "decode", 8, framework="h2o", batch=S["hf_batches"][0],
        decode="graph", reps=1, kv_budget=0.2, fuse="off")
    add("engine", "correct/8b", "correct_model", 15)
    for b in S["hf_batches"]:
        add("engine", f"hf/eager/bs{b}", "decode", 8 + 0.05 * b, framework="hf", batch=b, decode="eager", reps=1, gen=S["gen"] // 4)
    for b in S["hf_batches"][1:]:
        add("engine", f"hf/graph-matmul/bs{b}", "decode", 8 + 0.2 * b, framework="hf", batch=b, decode="graph",
            reps=2, kernel="matmul")
    add("engine", f"h2o/eager/bs{S['hf_batches'][1]}", "decode", 10, framework="h2o", batch=S["hf_batches"][1],
        decode="eager", reps=1, gen=S["gen"] // 4, kv_budget=0.2)
    for b in S["ig_batches"]:  # graph decode first (the captured step: frameworks/infinigen/cache.py)
        for fetch in (True, False):
            add("infinigen", f"infinigen/graph-{'fetch' if fetch else 'nofetch'}/bs{b}", "decode", 15 + 0.5 * b,
                framework="infinigen", batch=b, decode="graph", reps=2 if fetch else 1, kv_budget=0.2, fetch=fetch)
    for b in S["ig_batches"]:
        for fetch in (True, False):
            add("infinigen", f"infinigen/{'fetch' if fetch else 'nofetch'}/bs{b}", "decode", 12 + 0.3 * b,
                framework="infinigen", batch=b, decode="eager", reps=1, gen=S["gen"] // 4, kv_budget=0.2, fetch=fetch)
    ob = 4 if tiny else 16
    # compile layers (the CUDA default) explicitly: the tiny CPU run exercises it too
    # cold cache (no verdict: the target is the warm cell), with the import-time profile of the process
    add("overhead", f"overhead/hf-graph/bs{ob}", "overhead", 45, batch=ob, cache="fresh", compile="layers",
        env={"PYTHONPROFILEIMPORTTIME": "1"})
    add("overhead", f"overhead/hf-graph-warm/bs{ob}", "overhead", 35, batch=ob, cache="reuse", compile="layers")
    # Inductor's compile-worker pool, started when Inductor is imported (16 processes importing torch
    # on a 16-core machine), has nothing to compile on a warm cache: the same cell without it
    add("overhead", f"overhead/hf-graph-warm-nopool/bs{ob}", "overhead", 35, batch=ob, cache="reuse", compile="layers",
        env={"TORCH_WARM_POOL": "0"})
    add("overhead", f"overhead/hf-graph-nocompile/bs{ob}", "overhead", 35, batch=ob, compile="none")
    add("h2o", "h2o/kernel-check", "h2o_kernel_check", 30)
    if not tiny:
        add("h2o", "h2o/kernel-timing", "h2o_kernel_timing", 45)
    for b in S["hf_batches"]:
        add("h2otorch", f"h2o/graph-torch/bs{b}", "decode", 8 + 0.3 * b, framework="h2o", batch=b, decode="graph",
            reps=2, kv_budget=0.2, h2o_kernel="torch")
    add("ttft", "ttft/hf-flash", "ttft", 10, framework="hf", prompt=S["ttft"])
    add("ttft", "ttft/h2o-chunked", "ttft", 25, framework="h2o", prompt=S["ttft"])
    if not tiny:  # torch.compile needs CUDA here (the CPU path has no capture)
        for b in S["hf_batches"]:
            add("compile", f"hf/compile/bs{b}", "decode", 70, framework="hf", batch=b, decode="graph", reps=2,
                capture="compile")
    add("ttft128k", "ttft128k/hf-flash", "ttft", 20, framework="hf", prompt=S["ttft_long"])
    add("ttft128k", "ttft128k/h2o-chunked", "ttft", 60, framework="h2o", prompt=S["ttft_long"])
    skip = tuple(x for x in os.environ.get("GPU_ENGINE_SKIP", "").split(",") if x)  # --skip, inherited by the workers
    return [x for x in v if not x["name"].startswith(skip)] if skip else v


# -- measurements (worker side) -----------------------------------------------------------------------
class Ctx:
    def __init__(self, out: Path, tiny: bool):
        import torch

        self.torch, self.out, self.tiny, self.S = torch, out, tiny, settings(tiny)
        self.dev = torch.device(self.S["device"])
        self.model = None

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def get_model(self):
        if self.model is None:
            from frameworks import models

            t0 = time.perf_counter()
            self.model = models.build(self.S["model"], "random", self.S["device"], self.S["dtype"], "sdpa", seed=0)
            self.build_s = time.perf_counter() - t0
        return self.model

    def free(self):
        import gc

        gc.collect()
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()


def spec_of(ctx: Ctx, framework: str, batch: int, prompt: int, gen: int, decode: str, kv_budget: float = 1.0,
            prefill: str | None = None, compile: str | None = None):
    from frameworks.harness.spec import CellSpec

    S = ctx.S
    prefill = prefill or {"hf": "sdpa", "h2o": "chunked", "infinigen": "flash"}[framework]
    if prefill == "flash" and S["device"] == "cpu":
        prefill = "sdpa" if framework == "hf" else "chunked"
    return CellSpec.from_dict(dict(experiment="gpu_engine", framework=framework, model=S["model"], batch_size=batch,
                                   prompt_len=prompt, gen_len=gen, kv_budget=kv_budget, prefill=prefill,
                                   chunk_size=S["chunk"], decode=decode, device=S["device"], dtype=S["dtype"],
                                   compile=compile))


def policy_cls(framework: str):
    if framework == "h2o":
        from frameworks.h2o.policy import H2OPolicy

        return H2OPolicy
    if framework == "infinigen":
        from frameworks.infinigen.policy import InfiniGenPolicy

        return InfiniGenPolicy
    from frameworks.hf.policy import KVPolicy

    return KVPolicy


def make_engine(ctx: Ctx, spec, model, capture="cuda_graph", fetch=True, fuse="on"):
    from frameworks.hf.engine import Engine

    policy = policy_cls(spec.framework)(spec)
    if spec.framework == "infinigen":
        policy.fetch = fetch
    model.set_attn_implementation(policy.attn_implementation(spec.prefill))
    policy.prepare(model)
    if spec.compile == "layers":  # a fresh Dynamo cache per variant, as in a cell's own process
        __import__("torch")._dynamo.reset()
    return policy, Engine(model, policy, spec.device, spec.prefill, spec.chunk_size,
                          max_len=spec.prompt_len + spec.gen_len, capture=capture,
                          compile=spec.compile if capture == "cuda_graph" else "none", fuse=fuse)


def unhook(model) -> None:
    """InfiniGen's prepare() hooks every decoder layer, H2O's hangs itself on the attention modules:
    drop both before the next policy (and free its caches)."""
    for m in model.modules():
        m._forward_pre_hooks.clear()
        m.__dict__.pop("h2o_policy", None)


def run_decode(ctx: Ctx, framework, batch, decode, reps, gen=None, kv_budget=1.0, kernel="sdpa", capture="cuda_graph",
               fetch=True, h2o_kernel=None, compile=None, h2o_decode=None, fuse=None) -> dict:
    from frameworks.harness import workload
    from frameworks.hf import attention

    S, torch = ctx.S, ctx.torch
    gen = gen or S["gen"]
    model = ctx.get_model()
    spec = spec_of(ctx, framework, batch, S["prompt"], gen, decode, kv_budget, compile=compile)
    attention.decode_kernel = kernel
    h2o_mode = _h2o_decode_mode(h2o_decode)
    try:
        policy, engine = make_engine(ctx, spec, model, capture, fetch, fuse or "on")
        if h2o_kernel:  # before the first cache: its layers take the policy's choice
            policy.score_kernel = policy.step_kernel = h2o_kernel
        prompts = workload.prompts(0, batch, S["prompt"], model.config.vocab_size)
        t0 = time.perf_counter()
        engine.generate(prompts, min(gen, 4))  # the runner's warm-up: same shapes, captures the step
        warm_s = time.perf_counter() - t0
        if hasattr(policy, "reset_metrics"):
            policy.reset_metrics()
        rows = []
        for _ in range(reps):
            t0 = time.perf_counter()
            times = engine.generate(prompts, gen)
            steps = [b - a for a, b in zip(times, times[1:])]
            rows.append({"ttft_s": times[0] - t0, "wall_s": times[-1] - t0, "step_ms_p50": statistics.median(steps) * 1e3,
                         "step_ms_mean": (times[-1] - times[0]) / (gen - 1) * 1e3,
                         "output_tok_s": batch * gen / (times[-1] - t0),
                         "decode_tok_s": batch * (gen - 1) / (times[-1] - times[0])})
        emb = model.get_input_embeddings().weight
        tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        res = {"spec": spec.to_dict(), "warmup_s": warm_s,
               "weights_read_bytes": weights - (0 if tied else emb.numel() * emb.element_size()), "reps": rows, "graph": engine.graph_stats(),
               "step_ms": statistics.median(r["step_ms_p50"] for r in rows), "fuse": engine.fuse,
               "kv_cache_bytes": engine.kv_bytes_peak,
               "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if ctx.dev.type == "cuda" else None}
        for key in ("output_tok_s", "decode_tok_s"):
            xs = [r[key] for r in rows]
            res[f"cv_{key}"] = statistics.pstdev(xs) / statistics.mean(xs) if len(xs) > 1 else None
        if framework == "h2o":
            res["h2o_slots"] = policy.heavy + policy.recent + 1
            res["h2o"] = {k: v for k, v in policy.metrics().items() if k.endswith(("_kernel", "_attention"))}
            if policy.step_kernel == "triton" and ctx.dev.type == "cuda":
                res["bookkeeping_ms"] = gpu_engine_h2o.fused_bookkeeping_ms(ctx, policy.cache)
                res["bookkeeping_kind"] = "fused step - SDPA over the same slots, all layers"
            else:
                res["bookkeeping_ms"] = h2o_bookkeeping_ms(ctx, policy.cache)
        if framework == "infinigen":
            m = policy.metrics()
            res["fetched_bytes_per_step"] = m.get("fetched_bytes_per_step")
            res["infinigen"] = {k: m.get(k) for k in ("fetched_tokens_per_step", "gather_bandwidth_gbps", "decode_steps",
                                                      "graph_decode_steps", "infinigen_graph_fallback")}
        return res
    finally:
        attention.decode_kernel = "sdpa"
        _h2o_decode_mode(h2o_mode)
        unhook(model)
        if ctx.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()


def _h2o_decode_mode(mode):
    """Set H2O's fused decode form (kernels.DECODE_MODE) for a variant; returns the one before."""
    if mode is None:
        return None
    from frameworks.h2o import kernels

    before, kernels.DECODE_MODE = kernels.DECODE_MODE, mode
    return before


def h2o_bookkeeping_ms(ctx: Ctx, cache) -> float:
    with ctx.torch.inference_mode():  # the cache's tensors are inference tensors
        return _h2o_bookkeeping_ms(ctx, cache)


def _h2o_bookkeeping_ms(ctx: Ctx, cache) -> float:
    """Per decode step, all layers: score update + eviction choice (add_step_scores) and the slot's
    position/score reset, on the cache's real state. Captured alone on CUDA (as in the step)."""
    torch = ctx.torch
    layers = cache.layers
    probs = [torch.rand(layer.scores.shape, dtype=layer.scores.dtype, device=layer.scores.device) * 1e-3 for layer in layers]

    def book():
        for layer, p in zip(layers, probs):
            b, h = layer.pos.shape[:2]
            layer.pos.scatter_(2, layer.free[..., None], layer.seen_t.expand(b, h, 1))
            layer.scores.scatter_(2, layer.free[..., None], 0.0)
            layer.add_step_scores(p)

    n = 50 if ctx.dev.type == "cuda" else 5
    if ctx.dev.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            book()
        return (time.perf_counter() - t0) / n * 1e3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        book()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        book()
    g.replay()
    torch.cuda.synchronize()
    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    return a.elapsed_time(e) / n


def run_rates(ctx: Ctx) -> dict:
    torch = ctx.torch
    if ctx.dev.type != "cuda":
        x = torch.empty(2**27, dtype=torch.uint8)
        y = torch.empty_like(x)
        t0 = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        return {"hbm_bytes_s": 2 * x.numel() * 5 / (time.perf_counter() - t0), "pcie_bytes_s": None,
                "note": "CPU: memcpy rate stands in for HBM; no PCIe"}
    x = torch.empty(2**31, dtype=torch.uint8, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    h = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(h.shape, dtype=torch.uint8, device="cuda")

    def timed(fn, n):  # seconds per call (CUDA events, one warm-up call)
        return gpu_engine_h2o._cuda_ms(torch, fn, n) / 1e3

    hbm = 2 * x.numel() / timed(lambda: y.copy_(x), 20)  # read + write
    pcie = h.numel() / timed(lambda: d.copy_(h, non_blocking=True), 10)
    del x, y, h, d
    ctx.free()
    return {"hbm_bytes_s": hbm, "pcie_bytes_s": pcie}


def _compare(a, b) -> dict:
    torch = __import__("torch")
    la, lb = torch.stack(a.step_logits), torch.stack(b.step_logits)
    tok = (a.last_tokens == b.last_tokens).float().mean().item()
    ok = torch.allclose(la, lb, rtol=1e-4, atol=1e-4)
    return {"max_abs_logit_diff": (la - lb).abs().max().item(), "logit_scale": lb.abs().max().item(),
            "token_agreement": tok, "within_tol_1e-4": bool(ok), "pass": bool(ok) and tok == 1.0}


def run_correct(ctx: Ctx, model_name: str, dtype: str, batch: int, prompt: int, gen: int, compile: str | None = None) -> dict:
    """graph == eager on this device (the capture is on where there is CUDA), hf and h2o."""
    from frameworks import models
    from frameworks.harness import workload
    from frameworks.harness.spec import CellSpec

    model = ctx.get_model() if model_name == ctx.S["model"] else models.build(model_name, "random", ctx.S["device"],
                                                                               dtype, "sdpa", seed=0)
    out = {}
    for fw, kw in (("hf", {}), ("h2o", {"kv_budget": 0.4})):
        engines = {}
        for decode in ("eager", "graph"):
            spec = CellSpec.from_dict(dict(experiment="gpu_engine", framework=fw, model=model_name, batch_size=batch,
                                           prompt_len=prompt, gen_len=gen, prefill="sdpa" if fw == "hf" else "chunked",
                                           chunk_size=ctx.S["chunk"], decode=decode, device=ctx.S["device"], dtype=dtype,
                                           compile=compile if decode == "graph" else None, **kw))
            _, e = make_engine(ctx, spec, model)
            e.collect_logits = True
            prompts = workload.prompts(1, batch, prompt, model.config.vocab_size)
            e.generate(prompts[::-1].copy(), min(gen, 4))  # the warm-up: captures
            e.generate(prompts, gen)
            engines[decode] = e
        stats = engines["graph"].graph_stats()
        out[fw] = {**_compare(engines["graph"], engines["eager"]), "graph": stats}
        if stats.get("decode_compile") == "layers":  # the compiled regions really ran
            out[fw]["pass"] = out[fw]["pass"] and stats["compiled_graphs"] >= 1
        # on CUDA the graph path must really have been captured and replayed
        out[fw]["pass"] = out[fw]["pass"] and (ctx.dev.type != "cuda" or stats["decode_graphs"] >= 1)
        unhook(model)
    return out


def run_ttft(ctx: Ctx, framework: str, prompt: int) -> dict:
    from frameworks.harness import workload

    model = ctx.get_model()
    spec = spec_of(ctx, framework, 1, prompt, 2, "graph", prefill="flash" if framework == "hf" else "chunked")
    try:
        policy, engine = make_engine(ctx, spec, model)
        vocab = model.config.vocab_size
        engine.generate(workload.prompts(0, 1, min(prompt, 4096), vocab), 2)  # kernels warm, not the cell's shape
        ids = workload.prompts(0, 1, prompt, vocab)
        t0 = time.perf_counter()
        times = engine.generate(ids, 2)
        res = {"spec": spec.to_dict(), "ttft_s": times[0] - t0}
        if framework == "h2o":
            res["h2o"] = {k: v for k, v in policy.metrics().items() if k.endswith(("_kernel", "_attention"))}
        return res
    finally:
        ctx.free()


def run_overhead(ctx: Ctx, batch: int, cache: str = "fresh", compile: str | None = None, env: dict | None = None) -> dict:
    """A fresh process, as a cell: interpreter start, imports, model build, warm-up batch (compile
    and capture). cache: "fresh" an empty Inductor cache (the first cell of a run), "reuse" the
    cache the last "fresh" one filled (a later cell of the same model and batch)."""
    t0 = time.time()
    cache_dir = ctx.out / "inductor-cache"
    pycache_dir = ctx.out / "pycache"  # where the launcher would cache bytecode (launch.needs_pycache)
    if cache == "fresh":
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)
        shutil.rmtree(pycache_dir, ignore_errors=True)
    cmd = [sys.executable, __file__, "--overhead-child", "--batch", str(batch), "--t0", repr(t0)] + (["--tiny"] if ctx.tiny else [])
    cmd += ["--compile", compile] if compile else []
    # the cell's environment: the launcher's Inductor cache variable, and not the benchmark workers'
    # allocator setting (expandable segments map a model's 16 GB in small pieces: slower to build)
    # and its bytecode cache where the launcher gives a local cell one
    from workflow.lib import launch

    extra_env = env or {}
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir.resolve()), **extra_env)
    pycache = launch.needs_pycache(env)
    if pycache:
        env.update(launch.bytecode_env(pycache_dir))
    cell_alloc = os.environ.get("KVSTUDY_CELL_ALLOC_CONF")
    if cell_alloc is not None:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if cell_alloc:
            env["PYTORCH_CUDA_ALLOC_CONF"] = cell_alloc
    # the parent holds the model: give the child the GPU memory it needs
    ctx.model = None
    ctx.free()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if p.returncode:
        raise RuntimeError(f"overhead child exited {p.returncode}: {p.stderr[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.update(inductor_cache=cache, inductor_cache_dir=str(cache_dir), alloc_conf=env.get("PYTORCH_CUDA_ALLOC_CONF"),
               env=extra_env, pycache=str(pycache_dir) if pycache else None)
    if env.get("PYTHONPROFILEIMPORTTIME"):
        res["slowest_imports"] = slowest_imports(p.stderr)
    return res


def slowest_imports(stderr: str, n: int = 25) -> dict:
    """`python -X importtime`'s report -> the n modules of largest own import time and the n
    imports of largest cumulative time that were asked for by the program itself (s), slowest first."""
    own, top = [], []
    for line in stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[0].split(":")[1].strip().isdigit():
            name = parts[2].strip()
            own.append((name, int(parts[0].split(":")[1]) / 1e6))
            if len(parts[2]) - len(parts[2].lstrip()) <= 1:  # not nested in another module's import
                top.append((name, int(parts[1]) / 1e6))
    return {"own_s": sorted(own, key=lambda r: -r[1])[:n], "top_level_cumulative_s": sorted(top, key=lambda r: -r[1])[:n]}


def overhead_child(tiny: bool, batch: int, t0: float, compile: str | None) -> None:
    t_imp = time.time()
    import torch

    from frameworks.harness.worker import skip_unused_transformers_extras

    skip_unused_transformers_extras()  # as a cell's worker does, before transformers' model code loads
    from frameworks import models
    from frameworks.harness import workload
    from frameworks.harness.spec import CellSpec
    from frameworks.hf.engine import Engine
    from frameworks.hf.policy import KVPolicy

    t_init0 = time.time()
    ctx_s = settings(tiny)
    if ctx_s["device"] == "cuda":  # the CUDA context on its own: the rest of "build" is the model's
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    t_code0 = time.time()
    import importlib

    family = models.config_dict(ctx_s["model"])["model_type"]  # transformers imports the model's code at build
    importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    t_built0 = time.time()
    spec = CellSpec.from_dict(dict(experiment="gpu_engine", framework="hf", model=ctx_s["model"], batch_size=batch,
                                   prompt_len=ctx_s["prompt"], gen_len=ctx_s["gen"], device=ctx_s["device"],
                                   dtype=ctx_s["dtype"], compile=compile))
    policy = KVPolicy(spec)
    model = models.build(ctx_s["model"], "random", ctx_s["device"], ctx_s["dtype"], policy.attn_implementation("sdpa"), 0)
    if ctx_s["device"] == "cuda":
        torch.cuda.synchronize()
    t_built = time.time()
    engine = Engine(model, policy, ctx_s["device"], "sdpa", ctx_s["chunk"], max_len=ctx_s["prompt"] + ctx_s["gen"],
                    compile=spec.compile)
    t_engine = time.time()  # with compile layers: Dynamo and Inductor imported, the regions wrapped
    engine.generate(workload.prompts(0, batch, ctx_s["prompt"], model.config.vocab_size), 4)
    t_ready = time.time()
    print(json.dumps({"start_to_main_s": t_imp - t0, "imports_s": t_init0 - t_imp, "cuda_init_s": t_code0 - t_init0,
                      "model_code_import_s": t_built0 - t_code0,
                      "build_s": t_built - t_built0, "warmup_with_capture_s": t_ready - t_built,
                      "of_which_engine_init_s": t_engine - t_built, "compile": spec.compile,
                      "graph": engine.graph_stats(), "total_s": t_ready - t0}))


MEASURE = {"rates": lambda c, p: run_rates(c), "decode": lambda c, p: run_decode(c, **p),
           "correct_tiny": lambda c, p: run_correct(c, "tiny-llama-3.1", "float32", 3, 40, 12 if c.dev.type == "cuda" else 6, **p),
           "correct_model": lambda c, p: run_correct(c, c.S["model"], c.S["dtype"], 2, c.S["prompt"], 16 if c.dev.type == "cuda" else 4),
           "ttft": lambda c, p: run_ttft(c, **p), "overhead": lambda c, p: run_overhead(c, **p),
           "h2o_kernel_check": lambda c, p: gpu_engine_h2o.kernel_check(c),
           "h2o_kernel_timing": lambda c, p: gpu_engine_h2o.kernel_timing(c)}


RESTART_RC = 75  # a worker's exit code: "my CUDA context may be broken, start a fresh worker for the rest"
CUDA_BROKEN = ("cuda", "capture", "accelerator", "illegal memory", "cublas", "triton")


def worker(out: Path, group: str, tiny: bool, deadline: float) -> int:
    ctx = Ctx(out, tiny)
    done = _done(out)
    for v in plan(tiny):
        if v["group"] != group or v["name"] in done:
            continue
        row = {"name": v["name"], "group": group, "kind": v["kind"], "params": v["params"]}
        left = deadline - time.time()
        if v["est_s"] > left:
            _append(out, {**row, "status": "skipped", "message": f"time guard: needs ~{v['est_s']:.0f} s, {left:.0f} s left"})
            continue
        (out / "inflight").write_text(v["name"])
        t0 = time.time()
        try:
            res = MEASURE[v["kind"]](ctx, v["params"])
            row.update(status="ok", message="", result=res)
        except BaseException as e:  # noqa: BLE001 - one variant's failure must not lose the rest
            oom = "out of memory" in str(e).lower()
            row.update(status="oom" if oom else "error", message=f"{type(e).__name__}: {str(e)[:1500]}",
                       traceback=traceback.format_exc()[-4000:])
            if isinstance(e, KeyboardInterrupt):
                raise
        row["wall_s"] = time.time() - t0
        _append(out, row)
        (out / "inflight").unlink(missing_ok=True)
        print(f"[gpu_engine] {v['name']}: {row['status']} {row['message'][:200]} ({row['wall_s']:.1f} s)", flush=True)
        if row["status"] == "error" and ctx.dev.type == "cuda" and any(w in row["message"].lower() for w in CUDA_BROKEN):
            return RESTART_RC  # the next variants get a fresh process (and CUDA context)
        ctx.free()
    return 0


def _done(out: Path) -> set[str]:
    """Variants recorded by this or an earlier call on the same folder (a skipped one is not done)."""
    return {r["name"] for r in map(json.loads, _lines(out)) if r["status"] != "skipped"}


def _lines(out: Path) -> list[str]:
    p = out / "variants.jsonl"
    return [x for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def finite(x):
    """NaN / inf -> None, recursively: strict JSON, and a bad number never loses a row."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _append(out: Path, row: dict) -> None:
    with open(out / "variants.jsonl", "a") as f:
        f.write(json.dumps(finite(row), allow_nan=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def orchestrate(out: Path, tiny: bool, budget_s: float, groups: list[str]) -> int:
    t_start = time.time()
    deadline = t_start + budget_s
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan(tiny), indent=1))
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
               KVSTUDY_CELL_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))  # what a cell would get
    for group in dict.fromkeys(groups):  # in the order asked for: what matters most first, within the budget
        for _attempt in range(4):  # a worker that crashed or asked for a restart: a fresh one goes on
            if time.time() >= deadline:
                break
            cmd = [sys.executable, __file__, "--worker", group, "--out", str(out), "--deadline", str(deadline)]
            cmd += ["--tiny"] if tiny else []
            # --tiny runs H2O's Triton kernels on the CPU under Triton's interpreter (read at import)
            genv = dict(env, TRITON_INTERPRET="1") if tiny and group == "h2o" else env
            proc = subprocess.Popen(cmd, env=genv, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.time() + 5))
                why = f"worker exited {rc}" if rc else ""
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                rc, why = None, "killed at the time budget"
            inflight = out / "inflight"
            if inflight.exists():
                # killed at the budget: skipped (a later call on this folder retries it); a crash: an error
                _append(out, {"name": inflight.read_text(), "group": group, "status": "skipped" if rc is None else "error",
                              "message": why})
                inflight.unlink()
            done = _done(out)
            if rc in (0, None) or all(v["name"] in done for v in plan(tiny) if v["group"] == group):
                break
            print(f"[gpu_engine] {group}: {why}; a fresh worker continues the group", flush=True)
    done = _done(out)
    for v in plan(tiny):
        if v["name"] not in done and v["group"] in groups:
            _append(out, {"name": v["name"], "group": v["group"], "status": "skipped", "message": "not reached (time or crash)"})
    summary = summarize(out, tiny)
    summary["wall_s"] = time.time() - t_start
    summary["command"] = [sys.executable, *sys.argv]
    (out / "summary.json").write_text(json.dumps(finite(summary), indent=1, allow_nan=False, default=str))
    print_report(summary)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script (~3 min on 2 cores)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="stop starting work after this (default 490; tiny 400)")
    ap.add_argument("--groups", "--only", dest="only", default=",".join(GROUPS),
                    help=f"comma-separated groups to run, in this order (default all: {','.join(GROUPS)})")
    ap.add_argument("--skip", default="", help="comma-separated variant-name prefixes not to run (recorded as skipped)")
    ap.add_argument("--worker", choices=GROUPS, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--overhead-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--compile", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.overhead_child:
        overhead_child(args.tiny, args.batch, args.t0, args.compile)
        return 0
    if not args.out:
        ap.error("--out is required")
    if args.tiny:
        import torch

        torch.set_num_threads(2)
    if args.worker:
        return worker(Path(args.out), args.worker, args.tiny, args.deadline)
    if args.skip:
        os.environ["GPU_ENGINE_SKIP"] = args.skip
    groups = [g for g in args.only.split(",") if g]
    bad = sorted(set(groups) - set(GROUPS))
    if bad:
        ap.error(f"unknown group(s) {bad}; known: {', '.join(GROUPS)}")
    return orchestrate(Path(args.out), args.tiny, args.time_budget_s or (400.0 if args.tiny else 490.0), groups)

if __name__ == "__main__":
    sys.exit(main())
