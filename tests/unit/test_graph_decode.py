"""Graph decode (static shapes, one captured step) equals eager decode, for every policy (hf, h2o,
infinigen), batch > 1.

CPU has no CUDA graphs: the static-shape step runs eagerly here (the capture itself is checked by
benchmarks/gpu_engine.py on a GPU). Tolerance: float32 logits within rtol 1e-4 / atol 1e-4 (the
graph path uses SDPA with a length mask and GQA over the whole cache, eager path transformers'
sdpa over the filled part: different kernels, different summation order); greedy tokens equal.
Each run generates two batches on one engine, so the second one reuses the cache and step of the
first (what keeps a captured graph valid).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frameworks import models
from frameworks.h2o.policy import H2OPolicy
from frameworks.harness.spec import CellSpec, SpecError
from frameworks.hf.engine import Engine
from frameworks.hf.policy import KVPolicy
from frameworks.infinigen import kernels
from frameworks.infinigen.policy import InfiniGenPolicy

TOL = dict(rtol=1e-4, atol=1e-4)


def spec(framework, decode, prefill="sdpa", model="tiny-llama-3.1", prompt_len=25, **kw) -> CellSpec:
    return CellSpec.from_dict(dict(experiment="t", framework=framework, model=model, batch_size=3, prompt_len=prompt_len,
                                   gen_len=9, prefill=prefill, chunk_size=8, device="cpu", dtype="float32",
                                   decode=decode, **kw))


def build(s: CellSpec, policy_cls, compile: str = "none") -> Engine:
    policy = policy_cls(s)
    model = models.build(s.model, "random", "cpu", "float32", policy.attn_implementation(s.prefill), seed=0)
    with torch.no_grad():  # sharpened attention: H2O's selection then depends on content
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    policy.prepare(model)
    engine = Engine(model, policy, "cpu", s.prefill, s.chunk_size, max_len=s.prompt_len + s.gen_len, compile=compile)
    engine.collect_logits = True
    return engine


def run(s: CellSpec, policy_cls, compile: str = "none"):
    engine = build(s, policy_cls, compile)
    ids = np.random.default_rng(7).integers(0, 1000, (3, s.prompt_len))
    engine.generate(ids[::-1].copy(), 4)  # the warm-up: shorter, other prompts, same shapes
    engine.generate(ids, s.gen_len)
    return engine, torch.stack(engine.step_logits), engine.last_tokens


@pytest.mark.parametrize("model,prefill", [("tiny-llama-3.1", "sdpa"), ("tiny-llama-3.1", "eager"),
                                           ("tiny-llama-3.1", "chunked"), ("tiny-opt", "sdpa")])
def test_hf_graph_equals_eager(model, prefill):
    # prompt 25, chunk 8: the last chunk is one token
    _, ref, ref_tok = run(spec("hf", "eager", prefill, model), KVPolicy)
    e, got, tok = run(spec("hf", "graph", prefill, model), KVPolicy)
    torch.testing.assert_close(got, ref, **TOL)
    assert torch.equal(tok, ref_tok)
    assert len(e._steps) == 1, "the warm-up and the measured batch must share one cache and one step"


@pytest.mark.parametrize("model,prefill", [("tiny-llama-3.1", "eager"), ("tiny-llama-3.1", "chunked"), ("tiny-opt", "eager")])
def test_h2o_graph_equals_eager(model, prefill):
    _, ref, ref_tok = run(spec("h2o", "eager", prefill, model, kv_budget=0.4), H2OPolicy)
    e, got, tok = run(spec("h2o", "graph", prefill, model, kv_budget=0.4), H2OPolicy)
    torch.testing.assert_close(got, ref, **TOL)
    assert torch.equal(tok, ref_tok)
    assert e.policy.graph_ready(e.policy.cache), "the slots must be full (static) by the end"
    assert len(e._steps) == 1


def test_h2o_graph_ready_only_once_slots_are_full():
    s = spec("h2o", "graph", "eager", kv_budget=0.4)
    e, _, _ = run(s, H2OPolicy)
    cache = e.policy.new_cache(e.model, 3, 34, 25)
    assert not e.policy.graph_ready(cache)  # a fresh batch: its first decode step appends, shapes change


def test_decode_key_defaults_and_ids():
    assert spec("hf", None).decode == "graph" and spec("hf", None).cell_id == "bs3_in25_out9_kv1_sdpa"
    assert spec("hf", "eager").cell_id.endswith("_deceager")
    ig = dict(experiment="t", framework="infinigen", model="tiny-llama-3.1", kv_budget=0.2, prefill="flash", device="cpu")
    assert CellSpec.from_dict(ig).decode == "graph"  # its default since graph == eager was verified on the H200
    assert CellSpec.from_dict({**ig, "decode": "eager"}).cell_id.endswith("_deceager")
    with pytest.raises(SpecError, match="supports decode"):
        spec("hf", "compiled")


IG_COUNTERS = ("decode_steps", "fetched_tokens_per_step", "fetched_tokens_per_step_speculated",
               "fetched_tokens_per_seq_layer_speculated", "selected_bytes_per_step", "fetched_bytes_per_step")


class _TritonGatherPolicy(InfiniGenPolicy):
    gather = "triton"  # the CUDA default gather, under Triton's interpreter here


class _FusedPolicy(_TritonGatherPolicy):
    speculation = "fused"  # the CUDA default speculation (fused.py) too


_needs_triton = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


@pytest.mark.parametrize("model,prefill,kw,cls", [
    ("tiny-llama-3.1", "eager", {"kv_budget": 0.4}, InfiniGenPolicy),
    ("tiny-llama-3.2-3b", "chunked", {"kv_budget": 0.4}, InfiniGenPolicy),  # 3 layers: slots alternate
    ("tiny-llama-3.2-3b", "eager", {"kv_budget": 0.3, "policy": {"full_layers": 2, "speculation_input": "next_norm",
                                                                  "min_fetch": 2}}, InfiniGenPolicy),
    ("tiny-llama-3.1", "chunked", {"kv_budget": 0.4, "policy": {"full_layers": 2}}, InfiniGenPolicy),  # last layer full
    ("tiny-opt", "chunked", {"kv_budget": 0.4, "policy": {"partial_columns": "warmup"}}, InfiniGenPolicy),
    # a budget above the prompt (30 > 25 tokens): it grows with the length until 30, on the device
    pytest.param("tiny-llama-3.1", "eager", {"policy": {"max_num_kv": 30, "alpha": float("inf")}}, _TritonGatherPolicy,
                 marks=_needs_triton),
    # CUDA's defaults: the fused speculation and the Triton gather, alpha selecting fewer than the budget
    # (OPT's fused path: tests/unit/test_infinigen_fused.py)
    pytest.param("tiny-llama-3.2-3b", "chunked", {"kv_budget": 0.4, "policy": {"alpha": 0.05, "min_fetch": 2}},
                 _FusedPolicy, marks=_needs_triton),
])
def test_infinigen_graph_equals_eager(model, prefill, kw, cls):
    """Graph decode (device-side positions, the step the engine captures on CUDA) = eager decode:
    logits, greedy tokens, and the counters (kept on the device in graph decode, read once)."""
    r, ref, ref_tok = run(spec("infinigen", "eager", prefill, model, **kw), cls)
    e, got, tok = run(spec("infinigen", "graph", prefill, model, **kw), cls)
    torch.testing.assert_close(got, ref, **TOL)
    assert torch.equal(tok, ref_tok)
    assert len(e._steps) == 1 and len(e.policy._static) == 1, "the warm-up and the measured batch share one cache"
    mr, mg = r.policy.metrics(), e.policy.metrics()
    assert mg["infinigen_graph_fallback"] is None
    assert mg["graph_decode_steps"] == mg["decode_steps"] == 3 + 8 and mr["graph_decode_steps"] == 0
    assert {k: mg[k] for k in IG_COUNTERS} == {k: mr[k] for k in IG_COUNTERS}
    assert mg["fetched_tokens_per_step_speculated"] > 0 or mg["speculated_layers"] == 0


def test_infinigen_graph_fallback_is_recorded():
    """budget_rule current: the fetch's size changes every step, so graph decode runs the eager
    step at every step, and the result says so."""
    kw = {"kv_budget": 0.4, "policy": {"budget_rule": "current"}}
    _, ref, ref_tok = run(spec("infinigen", "eager", "eager", **kw), InfiniGenPolicy)
    e, got, tok = run(spec("infinigen", "graph", "eager", **kw), InfiniGenPolicy)
    assert torch.equal(got, ref) and torch.equal(tok, ref_tok)
    m = e.policy.metrics()
    assert "budget_rule 'current'" in m["infinigen_graph_fallback"] and m["graph_decode_steps"] == 0
    assert not e.policy.graph_ready(e.policy.new_cache(e.model, 3, 34, 25))


def test_infinigen_graph_reset_counters_in_place():
    """reset_metrics after the warm-up: the device counters a captured step adds to are zeroed in
    place (a new tensor would leave the graph adding to the old one)."""
    e, _, _ = run(spec("infinigen", "graph", "eager", kv_budget=0.4), InfiniGenPolicy)
    t = e.policy.transfer
    counts, k_sum = t.counts, t._k_sum
    e.policy.reset_metrics()
    assert t.counts is counts and t._k_sum is k_sum and not counts.any() and int(k_sum) == 0
    ids = np.random.default_rng(3).integers(0, 1000, (3, 25))
    e.generate(ids, 5)
    m = e.policy.metrics()
    assert m["decode_steps"] == 4 and int(t._kb_sum) > 0
    fresh = build(spec("infinigen", "graph", "eager", kv_budget=0.4), InfiniGenPolicy)
    fresh.generate(ids, 5)
    assert {k: m[k] for k in IG_COUNTERS} == {k: fresh.policy.metrics()[k] for k in IG_COUNTERS}


PER_STEP = ("fetched_tokens_per_step", "fetched_tokens_per_step_speculated", "selected_bytes_per_step",
            "fetched_bytes_per_step")


@pytest.mark.parametrize("cls", [InfiniGenPolicy, pytest.param(_TritonGatherPolicy, marks=pytest.mark.skipif(
    not kernels.available(), reason="triton is not installed"))])
@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_infinigen_counters_count_each_fetch_with_its_own_batch(decode, cls):
    """Bytes and tokens come from what each fetch moved, not from sizes the last launch left on the
    host (a request-rate cell's batches differ in size; a measured batch replayed on CUDA after
    reset_metrics runs no launch at all, and its speculated bytes read 0 that way on the H200).
    Reference: each batch alone on a fresh engine, totals = per-step figures x steps."""
    s = spec("infinigen", decode, "eager", kv_budget=0.4)
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 1000, (b, 25)) for b in (3, 2)]

    def totals(engine):
        m = engine.policy.metrics()
        return m["decode_steps"], {k: m[k] * m["decode_steps"] for k in PER_STEP}

    want_steps, want = 0, dict.fromkeys(PER_STEP, 0.0)
    for ids in batches:
        alone = build(s, cls)
        alone.generate(ids, 6)
        n, got = totals(alone)
        want_steps += n
        want = {k: want[k] + got[k] for k in PER_STEP}
    both = build(s, cls)
    for ids in batches:
        both.generate(ids, 6)
    steps, got = totals(both)
    assert steps == want_steps == 2 * 5
    assert got == pytest.approx(want, rel=1e-12)
    assert want["fetched_tokens_per_step_speculated"] > 0


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_gqa_decode_matches_repeated_heads(kernel, monkeypatch):
    from frameworks.hf import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((3, 8, 1, 16), (3, 2, 10, 16), (3, 2, 10, 16)))
    mask = torch.arange(10).view(1, 1, 1, 10) <= torch.tensor([3, 6, 9]).view(3, 1, 1, 1)  # per-sequence lengths
    kr, vr = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)  # query head h reads KV head h // 4
    w = (q @ kr.transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    ref = (w.softmax(-1) @ vr).transpose(1, 2)
    monkeypatch.setattr(attention, "decode_kernel", kernel)
    torch.testing.assert_close(attention.gqa_decode(q, k, v, mask, 0.25), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework,model,prefill", [("hf", "tiny-llama-3.1", "sdpa"), ("h2o", "tiny-llama-3.1", "chunked"),
                                                     ("hf", "tiny-opt", "sdpa")])
def test_compiled_layers_equal_eager(framework, model, prefill, tmp_path, monkeypatch):
    """compile=layers: the decoder layers run Inductor's code (its CPU backend here), the policy's
    cache update and attention stay eager; one compilation serves every layer (no recompile for
    layer 1: its index is not a guard), and the second batch reuses it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch._dynamo
    from torch._dynamo.utils import counters

    policy_cls = H2OPolicy if framework == "h2o" else KVPolicy
    kw = {"kv_budget": 0.4} if framework == "h2o" else {}
    _, ref, ref_tok = run(spec(framework, "eager", prefill, model, **kw), policy_cls)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        e, got, tok = run(spec(framework, "graph", prefill, model, **kw), policy_cls, compile="layers")
    torch.testing.assert_close(got, ref, **TOL)
    assert torch.equal(tok, ref_tok)
    stats = e.graph_stats()
    assert stats["decode_compile"] == "layers" and stats["inductor_cache_dir"] == str(tmp_path / "inductor")
    if model == "tiny-opt":  # its blocks are torch modules only (Linear, LayerNorm): nothing to compile
        assert stats["compiled_regions"] == [] and stats["compiled_graphs"] == 0
        return
    assert stats["compiled_regions"] == ["LlamaMLP", "LlamaRMSNorm", "apply_rotary_pos_emb"]
    assert stats["compiled_graphs"] == 3, stats  # one per region, whatever the number of layers
    assert stats["fxgraph_cache_miss"] >= 1 and any((tmp_path / "inductor").rglob("*")), "Inductor's cache was not used"


def test_compile_key_defaults_ids_and_errors():
    assert spec("hf", "graph").compile == "none"  # CPU: off by default
    assert spec("hf", "graph", compile="layers").cell_id.endswith("_complayers")
    gpu = CellSpec.from_dict(dict(experiment="t", framework="hf", model="tiny-llama-3.1", device="cuda"))
    assert gpu.compile == "layers" and "comp" not in gpu.cell_id  # the GPU default: ids as before
    assert CellSpec.from_dict({**gpu.to_dict(), "compile": "none"}).cell_id.endswith("_compnone")
    assert CellSpec.from_dict(dict(experiment="t", framework="hf", model="tiny-llama-3.1", device="cuda",
                                   decode="eager")).compile == "none"
    with pytest.raises(SpecError, match="compile must be one of"):
        spec("hf", "graph", compile="full")
    with pytest.raises(SpecError, match="needs decode graph"):
        spec("hf", "eager", compile="layers")
    with pytest.raises(ValueError, match="compile"):
        Engine(None, KVPolicy(spec("hf", "eager")), "cpu", "sdpa", 8, compile="layers")
