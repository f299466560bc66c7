"""Graph decode (static shapes, one captured step) equals eager decode, for every policy, batch > 1.

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

TOL = dict(rtol=1e-4, atol=1e-4)


def spec(framework, decode, prefill="sdpa", model="tiny-llama-3.1", prompt_len=25, **kw) -> CellSpec:
    return CellSpec.from_dict(dict(experiment="t", framework=framework, model=model, batch_size=3, prompt_len=prompt_len,
                                   gen_len=9, prefill=prefill, chunk_size=8, device="cpu", dtype="float32",
                                   decode=decode, **kw))


def run(s: CellSpec, policy_cls, compile: str = "none"):
    policy = policy_cls(s)
    model = models.build(s.model, "random", "cpu", "float32", policy.attn_implementation(s.prefill), seed=0)
    with torch.no_grad():  # sharpened attention: H2O's selection then depends on content
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    policy.prepare(model)
    engine = Engine(model, policy, "cpu", s.prefill, s.chunk_size, max_len=s.prompt_len + s.gen_len, compile=compile)
    engine.collect_logits = True
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
    assert CellSpec.from_dict(dict(experiment="t", framework="infinigen", model="tiny-llama-3.1", kv_budget=0.2,
                                   prefill="flash", device="cpu")).decode == "eager"
    with pytest.raises(SpecError, match="supports decode"):
        spec("hf", "compiled")
    with pytest.raises(SpecError, match="infinigen supports decode"):  # not captured yet: said, not ignored
        CellSpec.from_dict(dict(experiment="t", framework="infinigen", model="tiny-llama-3.1", kv_budget=0.2,
                                prefill="flash", device="cpu", decode="graph"))


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
