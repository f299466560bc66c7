"""H2O's Triton kernels in the engine benchmark (benchmarks/gpu_engine.py, group `h2o`).

kernel_check: the compiled kernels against the torch path on the device:
  - column_scores (chunked prefill) with the LSE of flash_with_lse (torch's flash kernel on CUDA)
    against blockwise_scores in float32 of the same inputs: GQA and MHA, a first chunk and later
    ones, ragged last blocks; pass = max |error| <= 1e-3 x the largest column sum, and every
    query row's probabilities summing to 1 within 1e-3; the attention output against SDPA too;
  - decode_step against the torch step (H2OLayer + decode_with_scores + add_step_scores) over a
    few steps of a layer compacted from a prompt: float32 must choose the same slots (pass),
    bfloat16 is reported (the torch path rounds its logits to bf16 before the softmax).
kernel_timing (CUDA only): one prefill chunk of a 32K prompt (4096 queries, 32K keys, Llama-3.1-8B
  heads): flash attention with LSE vs column_scores for a few tiles; one decode step over all 32
  layers (32 separate layer states, captured in a CUDA graph) at batch 1/16/64 with the slots of
  budget 0.2 at 2048 tokens: the fused step vs the torch step vs plain SDPA over the slots.
fused_bookkeeping_ms: H2O's cost on top of attention in the fused step of a real cache: the 32
  fused steps minus 32 SDPA calls over the same slots, both captured.
"""

from __future__ import annotations

from types import SimpleNamespace


def _tensors(torch, dev, dtype, *shapes, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(s, generator=g, device=dev, dtype=torch.float32).to(dtype) for s in shapes]


def _check_columns(torch, dev, dtype, b, hq, hkv, lq, lk, d) -> dict:
    from frameworks.h2o import attention, kernels

    q, k, v = _tensors(torch, dev, dtype, (b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d), seed=lq + lk)
    s = 2.0 * d ** -0.5  # sharper than a random model's attention: columns far from uniform
    out, lse, which = attention.flash_with_lse(q, k, v, s)
    col = kernels.column_scores(q, k, lse, s)
    ref = attention.blockwise_scores(q.float(), k.float(), s)
    ref_out = attention.sdpa_causal(q.float(), k.float(), v.float(), s)
    err = (col - ref).abs().max().item() / ref.abs().max().item()
    rows = abs(col.sum().item() / (b * hq * lq) - 1)
    out_err = (out.float() - ref_out).abs().max().item()
    return {"shape": [b, hq, hkv, lq, lk, d], "dtype": str(dtype).replace("torch.", ""), "attention": which,
            "col_rel_err": err, "row_sum_err": rows, "out_max_abs_err": out_err,
            "pass": err <= 1e-3 and rows <= 1e-3 and out_err <= (1e-4 if dtype == torch.float32 else 3e-2)}


def _layer_pair(torch, dev, dtype, b, hkv, d, prompt_len, heavy, recent):
    from frameworks.h2o.cache import H2OLayer

    k, v = _tensors(torch, dev, dtype, (b, hkv, prompt_len, d), (b, hkv, prompt_len, d), seed=1)
    col = torch.rand(b, hkv, prompt_len, generator=torch.Generator(device=dev).manual_seed(2), device=dev) * 4
    pair = []
    for kernel in ("torch", "triton"):
        layer = H2OLayer(lambda n: (heavy, recent), prompt_len, step_kernel=kernel)
        layer.update(k.clone(), v.clone())
        layer.add_prompt_scores(col.clone())
        pair.append(layer)
    return pair


def _attend(layer, q, k, v, s):
    from frameworks.h2o import attention

    module = SimpleNamespace(layer_idx=0, h2o_policy=SimpleNamespace(cache=SimpleNamespace(layers=[layer])))
    keys, values = layer.update(k, v)
    return attention.h2o_chunked(module, q, keys, values, scaling=s)[0]


def _check_decode(torch, dev, dtype, b, hq, hkv, d, prompt_len, steps=6) -> dict:
    heavy = recent = prompt_len // 10
    ref, fused = _layer_pair(torch, dev, dtype, b, hkv, d, prompt_len, heavy, recent)
    s = 2.0 * d ** -0.5
    out_err = score_err = 0.0
    agree = []
    for i in range(steps):
        q, k, v = _tensors(torch, dev, dtype, (b, hq, 1, d), (b, hkv, 1, d), (b, hkv, 1, d), seed=10 + i)
        want, got = _attend(ref, q, k, v, s), _attend(fused, q, k, v, s)
        out_err = max(out_err, (got.float() - want.float()).abs().max().item())
        score_err = max(score_err, ((fused.scores - ref.scores).abs().max() / ref.scores.abs().max()).item())
        if ref.free is not None and fused.free is not None:
            agree.append((fused.free == ref.free).float().mean().item())
            for name in ("free", "pos", "scores", "keys", "values", "seen_t"):  # continue from the same state:
                getattr(fused, name).copy_(getattr(ref, name))  # one flip must not count twice
    res = {"shape": [b, hq, hkv, d, heavy + recent + 1], "dtype": str(dtype).replace("torch.", ""), "out_max_abs_err": out_err,
           "score_rel_err": score_err, "evicted_slot_agreement": min(agree) if agree else None}
    res["pass"] = (res["evicted_slot_agreement"] == 1.0 and out_err <= 1e-4 and score_err <= 1e-5) if dtype == torch.float32 else None
    return res


def kernel_check(ctx) -> dict:
    torch, dev = ctx.torch, ctx.dev
    from frameworks.h2o import kernels

    if not kernels.available():
        raise RuntimeError("triton is not installed: the h2o kernels cannot run")
    with torch.inference_mode():
        if dev.type == "cuda":
            bf, fp32 = torch.bfloat16, torch.float32
            cols = [(bf, 1, 32, 8, 100, 100, 128), (bf, 2, 32, 8, 300, 1000, 128), (torch.float16, 1, 8, 8, 65, 130, 128),
                    (fp32, 1, 4, 1, 77, 200, 64), (bf, 1, 32, 8, 4096, 8192, 128)]
            decs = [(fp32, 4, 32, 8, 128, 2048), (bf, 4, 32, 8, 128, 2048), (bf, 1, 8, 8, 128, 700)]
        else:  # --tiny: the interpreter (TRITON_INTERPRET=1, set for this group), small shapes
            cols = [(torch.float32, 1, 8, 2, 37, 37, 32), (torch.float32, 2, 4, 1, 21, 100, 16)]
            decs = [(torch.float32, 2, 8, 2, 32, 100)]
        columns = [_check_columns(torch, dev, *c) for c in cols]
        decode = [_check_decode(torch, dev, *c) for c in decs]
    ok = all(c["pass"] for c in columns) and all(x["pass"] is not False for x in decode)
    return {"columns": columns, "decode": decode, "pass": ok}


def _cuda_ms(torch, fn, reps=5) -> float:
    fn()
    torch.cuda.synchronize()
    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return a.elapsed_time(e) / reps


def _graph_ms(torch, fn, reps=20) -> float:
    """fn captured once in a CUDA graph (after an eager warm-up on a side stream), replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return _cuda_ms(torch, g.replay, reps)


def _decode_layers(torch, dev, kernel, b, n_layers=32, hkv=8, d=128, prompt_len=2048):
    """n_layers H2O layers compacted from random prompts (budget 0.2) and stepped once (full)."""
    from frameworks.h2o.cache import H2OLayer

    heavy = recent = prompt_len // 10
    layers = []
    for i in range(n_layers):
        k, v = _tensors(torch, dev, torch.bfloat16, (b, hkv, prompt_len, d), (b, hkv, prompt_len, d), seed=i)
        layer = H2OLayer(lambda n: (heavy, recent), prompt_len, step_kernel=kernel)
        layer.update(k, v)
        layer.add_prompt_scores(torch.rand(b, hkv, prompt_len, device=dev))
        del k, v
        layers.append(layer)
    return layers


def kernel_timing(ctx) -> dict:
    torch, dev = ctx.torch, ctx.dev
    if dev.type != "cuda":
        return {"note": "CUDA only"}
    import torch.nn.functional as F

    from frameworks.h2o import attention, kernels

    res = {"prefill": {}, "decode": {}}
    with torch.inference_mode():
        b, hq, hkv, lq, lk, d = 1, 32, 8, 4096, 32768, 128
        q, k, v = _tensors(torch, dev, torch.bfloat16, (b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d))
        s = d ** -0.5
        _, lse, which = attention.flash_with_lse(q, k, v, s)
        flops = 2 * b * hq * d * (lq * (lk - lq) + lq * lq / 2)  # one Q.K^T over the causal part
        p = res["prefill"]
        p["shape"], p["attention"] = [b, hq, hkv, lq, lk, d], which
        p["flash_with_lse_ms"] = _cuda_ms(torch, lambda: attention.flash_with_lse(q, k, v, s))
        p["tiles"] = []
        for tile in (kernels.PREFILL_TILE, {**kernels.PREFILL_TILE, "DIAG_MASK": False},  # the first form: mask everywhere
                     {**kernels.PREFILL_TILE, "num_stages": 2}, {**kernels.PREFILL_TILE, "BLOCK_N": 256, "BLOCK_M": 32},
                     {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                     {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                     {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}):
            row = {"tile": dict(tile)}
            try:
                ms = _cuda_ms(torch, lambda: kernels.column_scores(q, k, lse, s, tile))
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as e:  # noqa: BLE001 - a tile that does not compile (registers, shared memory)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            p["tiles"].append(row)
        p["blockwise_scores_ms (torch path)"] = _cuda_ms(torch, lambda: attention.blockwise_scores(q, k, s), reps=2)
        del q, k, v, lse
        ctx.free()
        limit, mode = kernels.FUSED_MAX_SLOTS, kernels.DECODE_MODE
        for bs, prompt_len in ((1, 2048), (16, 2048), (64, 2048), (1, 32768)):  # the last: many slots, few programs
            row = {}
            kernels.FUSED_MAX_SLOTS = 10**9  # the fused step whatever kernels.fused_fits says: is its limit right?
            try:
                for kernel in ("triton", "onepass", "torch"):  # onepass: the first form of the fused step
                    kernels.DECODE_MODE = "onepass" if kernel == "onepass" else mode
                    layers = _decode_layers(torch, dev, "torch" if kernel == "torch" else "triton", bs, prompt_len=prompt_len)
                    qs = _tensors(torch, dev, torch.bfloat16, (bs, 32, 1, d), (bs, hkv, 1, d), (bs, hkv, 1, d), seed=99)
                    step = lambda: [_attend(layer, *qs, s) for layer in layers]  # noqa: E731
                    step()  # the first step appends; the slots are full from now on
                    row[f"{kernel}_step_ms"] = _graph_ms(torch, step)
                    if kernel == "torch":
                        row["sdpa_over_slots_ms"] = _graph_ms(torch, lambda: [F.scaled_dot_product_attention(
                            qs[0], layer.keys, layer.values, scale=s, enable_gqa=True) for layer in layers])
                    del layers
                    ctx.free()
            finally:
                kernels.FUSED_MAX_SLOTS, kernels.DECODE_MODE = limit, mode
            row["slots"] = 2 * (prompt_len // 10) + 1
            row["fused_fits"] = kernels.fused_fits(bs, hkv, row["slots"])
            res["decode"][f"bs{bs}/prompt{prompt_len}"] = row
    return res


def fused_bookkeeping_ms(ctx, cache) -> float:
    """Per decode step, all layers of a real cache whose steps are fused: the fused steps minus
    SDPA over the same slots (what H2O adds to attention: scores, eviction, the slot write)."""
    torch = ctx.torch
    import torch.nn.functional as F

    layers = cache.layers
    b, hkv, _, d = layers[0].keys.shape
    hq = ctx.get_model().config.num_attention_heads
    with torch.inference_mode():
        qs = _tensors(torch, ctx.dev, layers[0].keys.dtype, (b, hq, 1, d), (b, hkv, 1, d), (b, hkv, 1, d), seed=5)
        s = d ** -0.5
        fused = _graph_ms(torch, lambda: [_attend(layer, *qs, s) for layer in layers], reps=50)
        sdpa = _graph_ms(torch, lambda: [F.scaled_dot_product_attention(qs[0], layer.keys, layer.values, scale=s,
                                                                        enable_gqa=hq != hkv) for layer in layers], reps=50)
    return fused - sdpa


# -- report (torch-free: gpu_engine_report.summarize / print_report call these) ---------------------
def targets(res: dict, target, compare: dict, why) -> None:
    """The kernel check as pass/fail targets; the torch path's step against the fused one."""
    c = res.get("h2o/kernel-check")
    if not c:
        target("h2o kernels: Triton == torch reference", None, None, None, why("h2o/kernel-check"))
    for x in (c or {}).get("columns", []):
        target(f"h2o column_scores {x['dtype']} {x['shape']} == blockwise reference (rel 1e-3)", x["col_rel_err"], 1e-3,
               x["pass"], f"attention: {x['attention']}; row sums off by {x['row_sum_err']:.1e}; "
                          f"output max |err| {x['out_max_abs_err']:.1e}")
    for x in (c or {}).get("decode", []):
        target(f"h2o decode_step {x['dtype']} {x['shape']} == torch step (same evicted slots)", x["evicted_slot_agreement"],
               1.0, x["pass"], f"output max |err| {x['out_max_abs_err']:.1e}, scores rel err {x['score_rel_err']:.1e}"
                               + ("" if x["pass"] is not None else " (bf16: reported, not a pass/fail)"))
    for name, r in res.items():
        if name.startswith("h2o/graph-torch/") and isinstance(r, dict) and res.get(name.replace("graph-torch", "graph")):
            b = name.rsplit("/", 1)[-1]
            compare[f"h2o torch-path / fused graph {b}"] = r["step_ms"] / res[name.replace("graph-torch", "graph")]["step_ms"]


def print_timing(summary: dict) -> None:
    t = next((v.get("result") for v in summary.get("variants", []) if v["name"] == "h2o/kernel-timing" and v["status"] == "ok"), None)
    if not t or "prefill" not in t:
        return
    p = t["prefill"]
    print(f"\nh2o prefill chunk {p['shape']} (B, Hq, Hkv, Lq, Lk, D), bf16: flash + LSE ({p['attention']}) "
          f"{p['flash_with_lse_ms']:.2f} ms; torch block-wise scores {p['blockwise_scores_ms (torch path)']:.1f} ms")
    for row in p["tiles"]:
        print(f"  column_scores {row['tile']}: " + (f"{row['ms']:.2f} ms, {row['tflops']:.0f} TFLOP/s" if "ms" in row else row["error"][:150]))
    print("h2o decode step, 32 layers, captured (ms): batch/prompt  slots  fused (split)  fused one-pass  torch-path  "
          "SDPA-over-slots  fused_fits")
    for b, row in t["decode"].items():
        print(f"  {b:>14} {row['slots']:6d} {row['triton_step_ms']:13.3f} {row.get('onepass_step_ms', float('nan')):15.3f} "
              f"{row['torch_step_ms']:11.3f} {row['sdpa_over_slots_ms']:16.3f}  {row['fused_fits']}")
