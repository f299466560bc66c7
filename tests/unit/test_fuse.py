"""Fused q/k/v and gate/up projections of the graph-mode decode step (frameworks/hf/fuse.py).

Graph == eager with the fusion on is tests/unit/test_graph_decode.py (the default); here: the
fused and unfused graph steps agree (float32, rtol/atol 1e-5: the same dot products, one GEMM
instead of several), the fused GEMMs really replace the separate ones in decode steps and only
there, no weight is copied, and a weight replaced after the fusion is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frameworks import models
from frameworks.h2o.policy import H2OPolicy
from frameworks.hf.engine import Engine
from frameworks.hf.fuse import FusedProjections
from frameworks.hf.policy import KVPolicy
from tests.unit.test_graph_decode import spec


def _engine(s, policy_cls, fuse, model=None):
    policy = policy_cls(s)
    model = model or models.build(s.model, "random", "cpu", "float32", policy.attn_implementation(s.prefill), seed=0)
    policy.prepare(model)
    e = Engine(model, policy, "cpu", s.prefill, s.chunk_size, max_len=s.prompt_len + s.gen_len, fuse=fuse)
    e.collect_logits = True
    return model, e


def _linear_calls(monkeypatch):
    calls = []
    plain = torch.nn.Linear.forward

    def counted(self, x):
        calls.append(self)
        return plain(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    return calls


@pytest.mark.parametrize("framework,prefill", [("hf", "sdpa"), ("h2o", "chunked")])
def test_fused_step_equals_unfused_and_runs_one_gemm_per_projection_group(framework, prefill, monkeypatch):
    kw = {"kv_budget": 0.4} if framework == "h2o" else {}
    policy_cls = H2OPolicy if framework == "h2o" else KVPolicy
    s = spec(framework, "graph", prefill, **kw)
    ids = np.random.default_rng(3).integers(0, 1000, (3, s.prompt_len))
    out = {}
    for fuse in ("off", "on"):
        model, e = _engine(s, policy_cls, fuse)
        calls = _linear_calls(monkeypatch)
        e.generate(ids, 1)  # the prefill alone
        prefill_calls = len(calls)
        e.generate(ids, s.gen_len)
        monkeypatch.undo()
        out[fuse] = (torch.stack(e.step_logits), e.last_tokens, (prefill_calls, len(calls) - 2 * prefill_calls),
                     e.graph_stats())
    layers = model.config.num_hidden_layers
    torch.testing.assert_close(out["on"][0], out["off"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["on"][1], out["off"][1])
    steps = s.gen_len - 1
    # Linear calls of the decode steps: unfused q, k, v, o, gate, up, down per layer + lm_head;
    # fused o and down + lm_head (the fused GEMMs call F.linear, not a Linear module)
    assert out["off"][2][1] == steps * (7 * layers + 1)
    assert out["on"][2][1] == steps * (2 * layers + 1)
    assert out["on"][2][0] == out["off"][2][0]  # the prefill as before
    assert out["on"][3]["decode_fused_projections"] == ["gate_up", "qkv"]
    assert out["off"][3]["decode_fused_projections"] == []


def test_fusion_copies_no_weight_and_keeps_eager_decode_as_is():
    s = spec("hf", "graph")
    model, e = _engine(s, KVPolicy, "on")
    params = sum(p.numel() for p in model.parameters())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    base = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == base == attn.v_proj.weight.untyped_storage().data_ptr()
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    assert FusedProjections(model).state is model._kvstudy_fused  # a second engine: fused once
    assert sum(p.numel() for p in model.parameters()) == params
    # an eager engine on the same (fused) model runs transformers' modules as they are
    _, eager = _engine(spec("hf", "eager"), KVPolicy, "on", model)
    assert eager.fuse == "off" and eager.graph_stats() == {}


def test_replaced_weight_is_refused_and_opt_fuses_qkv_only():
    s = spec("hf", "graph")
    model, e = _engine(s, KVPolicy, "on")
    attn = model.model.layers[1].self_attn
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone())
    with pytest.raises(RuntimeError, match="stale"):
        e.generate(np.zeros((3, s.prompt_len), dtype=np.int64), 3)
    _, opt = _engine(spec("hf", "graph", model="tiny-opt"), KVPolicy, "on")
    assert opt.graph_stats()["decode_fused_projections"] == ["qkv"]  # its MLP is fc1 / fc2: not gated
    with pytest.raises(ValueError, match="fuse must be one of"):
        _engine(s, KVPolicy, "yes")
