"""InfiniGen's GPU checks that no pipeline cell expresses (issue 4): kernel probes, host syncs and
the overlap ablation, on one GPU in about 5 minutes (--time-budget-s 400).

    python benchmarks/gpu_infinigen.py --out DIR            # GPU: Llama-3.1-8B architecture, random bf16
    python benchmarks/gpu_infinigen.py --out DIR --tiny     # CPU, tiny model, < 1 min (checks the script)

Sections:
  pcie     probes: host<->device bandwidth from page-locked memory (as the KV store), the
           zero-copy UVA gather of InfiniGen rows (index_select on the store's device alias,
           checked against the CPU gather) and the CPU gather speed
  checks   tiny model: full budget + alpha=inf equals the hf full cache (fp32 logits, tokens),
           and decode steps under torch.cuda.set_sync_debug_mode("warn"): host syncs by file
  overlap  ablation at batch 1/8/32 (prompt 2048, budget 0.2): decode step with fetch (the Triton
           UVA gather on the side stream) vs without (the same model and policy, nothing moved)
           and vs the copy-bound time fetched_bytes / bandwidth: pass if step <= 1.2 x
           max(no-fetch, copy). The variants alternate over rounds on one model
           (gpu_infinigen_ablation.interleaved): the step is host-bound and the host's speed
           drifts, so separate back-to-back cells compared spells of the host. Timed alongside:
           index_select (every row of the budget, padding included) and the Triton gather with a
           program per block of rows instead of a small persistent grid.
What it no longer measures, because the pipeline's cells do (`--config preset=paper` or `h200`;
results/reference/h200-*/pipeline): InfiniGen vs hf throughput, TPOT, peak memory and bytes
fetched vs batch (`batch`; fetched tokens and bytes are in each cell's `extra`), how far eager
and flash prefill go before running out of memory (`ttft_prompt`). The H100 reference run of the
former version is results/reference/h100-2026-11-28/infinigen-triton (at 724bc90).
Writes DIR/pcie.json, DIR/checks.json, DIR/summary.json (+ provenance) and prints a summary
table last. A time guard skips (and records) what would not fit the budget.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from frameworks import models  # noqa: E402
from frameworks.harness import provenance  # noqa: E402
from frameworks.harness.spec import CellSpec  # noqa: E402
from frameworks.hf.policy import KVPolicy  # noqa: E402
from frameworks.infinigen.policy import InfiniGenPolicy  # noqa: E402
from frameworks.infinigen.store import device_view  # noqa: E402
from gpu_infinigen_ablation import interleaved  # noqa: E402


def plan(tiny: bool) -> dict:
    if tiny:
        return dict(model="tiny-llama-3.1", device="cpu", dtype="float32", prompt=256,
                    overlap_batches=[1], overlap_gen=8, overlap_rounds=2)
    return dict(model="llama-3.1-8b", device="cuda", dtype="bfloat16", prompt=2048,
                overlap_batches=[1, 8, 32], overlap_gen=32, overlap_rounds=4)


class Bench:
    """The time budget and the summary rows of one run."""

    def __init__(self, out: Path, budget_s: float, tiny: bool):
        self.out, self.budget_s, self.tiny = out, budget_s, tiny
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self.prov = provenance.collect(0)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)


def pcie(cuda: bool) -> dict:
    """Page-locked (cudaHostRegister, as the KV store) <-> device bandwidth, the zero-copy UVA
    gather of InfiniGen rows, and CPU gather speed."""
    out = {}
    if cuda:
        n = 256 << 20
        host = torch.empty(n, dtype=torch.uint8)
        torch.cuda.cudart().cudaHostRegister(host.data_ptr(), n, 0)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        for name, (dst, src) in {"h2d_gbps": (dev, host), "d2h_gbps": (host, dev)}.items():
            for _ in range(2):
                dst.copy_(src, non_blocking=True)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                dst.copy_(src, non_blocking=True)
            e.record()
            e.synchronize()
            out[name] = 10 * n / (s.elapsed_time(e) * 1e-3) / 1e9
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
        del host, dev
    # CPU gather of InfiniGen's rows (256 B for d=128 bf16) at batch 8, 2176 tokens, 409 selected
    length, b, h, d, k = 2176, 8, 8, 128, 409
    store = torch.randn(length * b * h, 2 * d).to(torch.bfloat16)  # key | value rows, as the store
    idx = torch.randint(0, length, (b, h, k))
    rows = (idx * (b * h) + torch.arange(b * h).view(b, h, 1)).reshape(-1)
    buf = torch.empty(rows.numel(), 2 * d, dtype=torch.bfloat16, pin_memory=cuda)
    torch.index_select(store, 0, rows, out=buf)
    t = time.perf_counter()
    for _ in range(20):
        torch.index_select(store, 0, rows, out=buf)
    out["cpu_gather_gbps"] = 20 * buf.numel() * 2 / (time.perf_counter() - t) / 1e9
    out["cpu_threads"] = torch.get_num_threads()
    if cuda:  # the same rows gathered by a GPU kernel through the registered store's device alias
        nbytes = store.numel() * store.element_size()
        err = torch.cuda.cudart().cudaHostRegister(store.data_ptr(), nbytes, 3)  # portable | mapped, as HostStore
        if int(err) == 0:
            try:
                view, drows = device_view(store), rows.cuda()
                got = torch.empty(rows.numel(), 2 * d, dtype=torch.bfloat16, device="cuda")
                torch.index_select(view, 0, drows, out=got)
                out["uva_gather_correct"] = bool(torch.equal(got.cpu(), buf.cpu()))
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(20):
                    torch.index_select(view, 0, drows, out=got)
                e.record()
                e.synchronize()
                out["uva_gather_gbps"] = 20 * got.numel() * 2 / (s.elapsed_time(e) * 1e-3) / 1e9
                del view, got
            except Exception as ex:  # noqa: BLE001 - recorded: the policy would fail the same way
                out["uva_gather_error"] = f"{type(ex).__name__}: {ex}"
            finally:
                torch.cuda.cudart().cudaHostUnregister(store.data_ptr())
        else:
            out["uva_gather_error"] = f"cudaHostRegister error {int(err)}"
    return out


def checks(cuda: bool) -> dict:
    """Tiny Llama: (1) kv_budget 1 + alpha=inf (every row fetched, through the UVA gather on
    CUDA) gives the hf full-cache logits, float32; (2) decode steps under
    torch.cuda.set_sync_debug_mode("warn"): every host synchronisation, counted by source file
    (InfiniGen's own files should show none; the engine syncs once per step by design)."""
    from frameworks.hf.engine import Engine

    import numpy as np

    out = {}
    device = "cuda" if cuda else "cpu"

    def engine(policy_cls, dtype, prefill, **kw):
        framework = "hf" if policy_cls is KVPolicy else "infinigen"
        spec = CellSpec(experiment="gpu-checks", framework=framework, model="tiny-llama-3.1", device=device,
                        dtype=dtype, prefill=prefill, batch_size=2, prompt_len=96, gen_len=8, **kw)
        policy = policy_cls(spec)
        model = models.build(spec.model, "random", device, dtype, policy.attn_implementation(prefill), 0)
        policy.prepare(model)
        return Engine(model, policy, device, prefill, spec.chunk_size), model

    try:
        logits = {}
        for name, cls, kw in (("hf", KVPolicy, {}), ("infinigen", InfiniGenPolicy, {"policy": {"alpha": float("inf")}})):
            eng, model = engine(cls, "float32", "sdpa", **kw)
            eng.collect_logits = True
            prompts = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 96))
            eng.generate(prompts, 8)
            logits[name] = (torch.stack(eng.step_logits), eng.last_tokens.cpu())
        diff = float((logits["hf"][0] - logits["infinigen"][0]).abs().max())
        out["full_budget"] = {"max_abs_logit_diff": diff, "tokens_equal": bool(torch.equal(logits["hf"][1],
                                                                                            logits["infinigen"][1])),
                              "pass": diff < 1e-3}
    except Exception as ex:  # noqa: BLE001
        traceback.print_exc()
        out["full_budget"] = {"error": f"{type(ex).__name__}: {ex}", "pass": False}
    if not cuda:
        out["sync_debug"] = {"status": "skipped (CPU): tests/unit/test_infinigen.py guards the decode path instead"}
        return out
    try:
        eng, model = engine(InfiniGenPolicy, "bfloat16", "flash", kv_budget=0.2)
        orig = eng._forward

        def forward(ids, start, cache):  # decode steps only: prefill and setup may sync
            if ids.shape[1] != 1:
                return orig(ids, start, cache)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return orig(ids, start, cache)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        eng._forward = forward
        prompts = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 96))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng.generate(prompts, 8)
        root = str(Path(__file__).resolve().parents[1])
        by_file = collections.Counter(f"{w.filename.replace(root, '.')}:{w.lineno}" for w in caught
                                      if "synchroniz" in str(w.message).lower())
        ours = {k: v for k, v in by_file.items() if "frameworks/infinigen/" in k}
        out["sync_debug"] = {"decode_steps": 7, "syncs_by_location": dict(by_file), "infinigen_syncs": sum(ours.values()),
                             "pass": not ours}
    except Exception as ex:  # noqa: BLE001
        traceback.print_exc()
        out["sync_debug"] = {"error": f"{type(ex).__name__}: {ex}", "pass": False}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out


OVERLAP_VARIANTS = [("infinigen", "triton", "side"), ("infinigen-nofetch", "none", "side"),
                    ("infinigen-index_select", "index_select", "side"), ("infinigen-triton-grid", "triton-grid", "side")]


def overlap(p: dict, bench: Bench) -> list[dict]:
    """(b): one model, the variants alternating over rounds per batch size; rows in the summary's
    row format (section "overlap") plus the per-variant details (rounds, percentiles)."""
    from frameworks.hf.engine import Engine

    import numpy as np

    spec = CellSpec(experiment="gpu-overlap", framework="infinigen", model=p["model"], device=p["device"],
                    dtype=p["dtype"], prefill="flash" if p["device"] == "cuda" else "sdpa",
                    batch_size=max(p["overlap_batches"]), prompt_len=p["prompt"], gen_len=p["overlap_gen"], kv_budget=0.2)
    est = 20 + sum(p["overlap_rounds"] * len(OVERLAP_VARIANTS) * (2 + 0.3 * b) for b in p["overlap_batches"])
    if est > bench.left():
        bench.rows.append({"section": "overlap", "name": "all", "policy": "infinigen", "batch": spec.batch_size,
                           "prompt": spec.prompt_len, "prefill": spec.prefill, "status": "skipped",  # the table's columns
                           "message": f"time guard: needs ~{est:.0f} s, {bench.left():.0f} s left"})
        return []
    torch.manual_seed(spec.seed)
    policy = InfiniGenPolicy(spec)
    model = models.build(spec.model, "random", spec.device, spec.dtype, policy.attn_implementation(spec.prefill), spec.seed)
    policy.prepare(model)
    eng = Engine(model, policy, spec.device, spec.prefill, spec.chunk_size)
    variants = OVERLAP_VARIANTS if p["device"] == "cuda" else [("infinigen", "index_select", "side"),
                                                                  ("infinigen-nofetch", "none", "side")]
    details = []
    for b in p["overlap_batches"]:
        prompts = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, p["prompt"]))
        for d in interleaved(eng, policy, prompts, variants, p["overlap_gen"], p["overlap_rounds"]):
            details.append(d)
            bench.rows.append({"section": "overlap", "name": f"{d['variant']}_bs{b}", "policy": d["variant"], "batch": b,
                               "prompt": p["prompt"], "gen": p["overlap_gen"], "prefill": spec.prefill, "kv_budget": 0.2,
                               "status": "ok", "message": "", "tpot_ms": d["step_ms"],
                               "out_tok_s": b * 1e3 / d["step_ms"],
                               "fetched_bytes_per_step": d["fetched_bytes_per_step"],
                               "fetched_tokens_per_seq_layer": d["fetched_tokens_per_seq_layer"],
                               "gather_ms_per_step": d["gather_ms_per_step"], "gather_gbps": d["gather_gbps"],
                               "h2d_gbps": d["gather_gbps"]})
            print(f"[{time.perf_counter() - bench.t0:6.0f}s] overlap/{d['variant']}_bs{b}: {d['step_ms']:.2f} ms", flush=True)
    del eng, model, policy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return details


def overlap_verdicts(details: list[dict], bw_gbps: float | None) -> list[dict]:
    by = {(d["variant"], d["batch"]): d for d in details}
    verdicts = []
    for (name, b), d in by.items():
        if name != "infinigen" or ("infinigen-nofetch", b) not in by:
            continue
        base = by[("infinigen-nofetch", b)]
        copy_ms = d["fetched_bytes_per_step"] / (bw_gbps * 1e9) * 1e3 if bw_gbps and d["fetched_bytes_per_step"] else 0.0
        bound = max(base["step_ms"], copy_ms)
        alt = by.get(("infinigen-index_select", b))
        verdicts.append({"batch": b, "step_ms": d["step_ms"], "no_fetch_step_ms": base["step_ms"], "copy_bound_ms": copy_ms,
                         "ratio": d["step_ms"] / bound, "pass": d["step_ms"] <= 1.2 * bound,
                         "round_medians_ms": d["round_median_ms"], "no_fetch_round_medians_ms": base["round_median_ms"],
                         "host_ms": d["host_ms"], "device_wait_ms": d["device_wait_ms"],
                         "gather": "triton (selected rows, persistent grid) on the side stream, decode appends on their own stream",
                         "bandwidth_gbps_used": bw_gbps, "gather_gbps_in_run": d["gather_gbps"],
                         "gather_ms_per_step": d["gather_ms_per_step"], "fetched_bytes_per_step": d["fetched_bytes_per_step"],
                         "logits_equal_index_select": alt.get("max_abs_logit_diff") if alt else None,
                         "index_select_step_ms": alt["step_ms"] if alt else None})
    return verdicts


def table(rows: list[dict], verdicts: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = f"{'section':8} {'policy':22} {'bs':>3} {'prompt':>7} {'status':8} {'tok/s':>8} {'TPOT ms':>8} " \
           f"{'fetch tok/seq/layer':>19} {'fetch MB/step':>13} {'gather GB/s':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['section']:8} {r['policy']:22} {r['batch']:>3} {r['prompt']:>7} {r['status']:8} "
                     f"{f(r.get('out_tok_s'), '8.1f')} {f(r.get('tpot_ms'), '8.2f')} "
                     f"{f(r.get('fetched_tokens_per_seq_layer'), '19.1f')} "
                     f"{f(r['fetched_bytes_per_step'] / 1e6 if r.get('fetched_bytes_per_step') else None, '13.2f')} "
                     f"{f(r.get('gather_gbps'), '11.1f')}")
    for v in verdicts:
        lines.append(f"overlap bs={v['batch']}: step {v['step_ms']:.2f} ms vs 1.2 x max(no-fetch {v['no_fetch_step_ms']:.2f}, "
                     f"copy {v['copy_bound_ms']:.2f}) -> {'PASS' if v['pass'] else 'FAIL'} (ratio {v['ratio']:.2f}; "
                     f"gather {f(v['gather_ms_per_step'], '.2f')} ms/step at {f(v['gather_gbps_in_run'], '.1f')} GB/s; "
                     f"rounds {['%.1f' % x for x in v['round_medians_ms']]} vs {['%.1f' % x for x in v['no_fetch_round_medians_ms']]})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny model: checks the script, numbers mean nothing")
    ap.add_argument("--time-budget-s", type=float, default=None, help="default 400 (GPU), 55 (--tiny)")
    args = ap.parse_args(argv)
    p = plan(args.tiny)
    if p["device"] == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --tiny for the CPU check", file=sys.stderr)
        return 2
    bench = Bench(args.out, args.time_budget_s or (55.0 if args.tiny else 400.0), args.tiny)

    bw = pcie(p["device"] == "cuda")
    (args.out / "pcie.json").write_text(json.dumps(bw, indent=1))
    print(f"pcie/gather: {bw}", flush=True)
    chk = checks(p["device"] == "cuda")
    (args.out / "checks.json").write_text(json.dumps(chk, indent=1))
    print(f"checks: {chk}", flush=True)
    details = overlap(p, bench)

    verdicts = overlap_verdicts(details, bw.get("h2d_gbps"))
    summary = {"plan": p, "pcie": bw, "checks": chk, "rows": bench.rows, "overlap": verdicts, "overlap_details": details,
               "provenance": bench.prov,
               "elapsed_s": time.perf_counter() - bench.t0, "time_budget_s": bench.budget_s}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(table(bench.rows, verdicts))
    print(f"checks: full budget = hf {'PASS' if chk['full_budget'].get('pass') else 'FAIL'} "
          f"{chk['full_budget']}; sync debug {chk['sync_debug']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
