"""H2O policy (frameworks/h2o) against a naive reference, on tiny CPU models.

The reference below is written separately from the policy: the model keeps its FULL cache and
evicted tokens are masked out per (layer, sequence, KV head) — H2O's "simulation" form — with
scores kept as Python-side tensors and the selection done by sorting lists. The policy instead
really drops tokens into fixed slots. Both must keep the same positions and give the same logits.

Tolerances: reference comparisons run in float64 so that near-ties cannot flip a selection;
the engine hands logits back as float32, hence rtol 1e-5 / atol 1e-6 there. Full-cache
equality (budget >= sequence) runs in float32: rtol 1e-4 / atol 1e-5 (kernel summation order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from frameworks import models
from frameworks.h2o import attention
from frameworks.h2o.budget import Budget
from frameworks.h2o.policy import H2OPolicy
from frameworks.harness import workload
from frameworks.harness.result import Unsupported
from frameworks.harness.spec import CellSpec
from frameworks.hf.engine import Engine
from frameworks.hf.policy import KVPolicy

GQA, MHA = "tiny-llama-3.1", "tiny-opt"  # 8 query / 2 KV heads with RoPE; 4 heads, learned positions


def spec(model="tiny-llama-3.1", prompt_len=40, gen_len=12, batch_size=2, prefill="eager", chunk_size=16,
         kv_budget=1.0, **policy) -> CellSpec:
    return CellSpec.from_dict(dict(experiment="test", framework="h2o", model=model, batch_size=batch_size,
                                   prompt_len=prompt_len, gen_len=gen_len, kv_budget=kv_budget, prefill=prefill,
                                   chunk_size=chunk_size, policy=policy, device="cpu", dtype="float32"))


def build(name: str, attn: str, dtype=torch.float64):
    """A tiny model with sharpened attention: with N(0, 0.02) weights attention is nearly
    uniform and the heavy hitters would just be the first tokens; scaled Q/K projections make
    the selection depend on content (and differ between sequences)."""
    model = models.build(name, "random", "cpu", "float32", attn, seed=0).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def run_policy(s: CellSpec, prompts: np.ndarray, policy_cls=H2OPolicy, dtype=torch.float64, hook=None):
    policy = policy_cls(s)
    model = build(s.model, policy.attn_implementation(s.prefill), dtype)
    policy.prepare(model)
    if hook is not None:
        model.register_forward_hook(lambda *_: hook(policy))
    engine = Engine(model, policy, "cpu", s.prefill, s.chunk_size)
    engine.collect_logits = True
    engine.generate(prompts, s.gen_len)
    return policy, engine


def prompts_for(s: CellSpec) -> np.ndarray:
    return workload.prompts(s.seed, s.batch_size, s.prompt_len, 1000)


# -- the naive reference ---------------------------------------------------------------------
class Reference:
    """H2O as a plain per-step loop over a full cache with per-head masks."""

    active: Reference | None = None

    def __init__(self, heavy: int, recent: int):
        self.heavy, self.recent = heavy, recent
        self.kept: dict[int, list[list[set[int]]]] = {}  # layer -> [seq][kv head] -> kept positions
        self.score: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, T] accumulated attention

    @staticmethod
    def attention(module, q, k, v, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        return Reference.active._attend(module.layer_idx, q, k, v, scaling)

    def _attend(self, layer, q, k, v, scaling):
        b_, hq, lq, d = q.shape
        hkv, t = k.shape[1], k.shape[2]
        first = t - lq
        kept = self.kept.setdefault(layer, [[set() for _ in range(hkv)] for _ in range(b_)])
        score = torch.cat([self.score.get(layer, torch.zeros(b_, hkv, 0, dtype=torch.float64)),
                           torch.zeros(b_, hkv, lq, dtype=torch.float64)], dim=-1)
        out = torch.zeros(b_, lq, hq, v.shape[-1], dtype=q.dtype)
        for b in range(b_):
            for h in range(hkv):
                kept[b][h].update(range(first, t))
            for qh in range(hq):
                h = qh * hkv // hq  # the KV head of query head qh: consecutive query heads share one
                visible = torch.zeros(lq, t, dtype=torch.bool)
                for i in range(lq):
                    for j in kept[b][h]:
                        visible[i, j] = j <= first + i
                logits = (q[b, qh].double() @ k[b, h].double().T) * scaling
                probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
                out[b, :, qh] = (probs @ v[b, h].double()).to(q.dtype)
                score[b, h] += probs.sum(0)  # every query head of the group adds its probabilities
        self.score[layer] = score
        for b in range(b_):
            for h in range(hkv):
                self._evict(kept[b][h], score[b, h].tolist(), t, prefill=lq > 1)
        return out, None

    def _evict(self, kept: set[int], score: list[float], t: int, prefill: bool) -> None:
        window = set(range(max(0, t - self.recent), t))
        if prefill:
            if t > self.heavy + self.recent:
                others = sorted((j for j in range(t) if j not in window), key=lambda j: -score[j])
                kept.intersection_update(window | set(others[: self.heavy]))
        elif len(kept) > self.heavy + self.recent:
            kept.remove(min((j for j in kept if j not in window), key=lambda j: score[j]))


def reference_generate(name: str, prompts: np.ndarray, gen_len: int, heavy: int, recent: int):
    AttentionInterface.register("h2o_reference", Reference.attention)
    Reference.active = ref = Reference(heavy, recent)
    model = build(name, "h2o_reference")
    ids = torch.as_tensor(prompts)
    b, length = ids.shape
    cache = DynamicCache()
    logits, out = [], None
    with torch.no_grad():
        for step in range(gen_len):
            if step == 0:
                x, pos = ids, torch.arange(length).expand(b, length)
            else:
                x, pos = out, torch.full((b, 1), length + step - 1)
            last = model(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
            logits.append(last.float())
            out = last.argmax(-1, keepdim=True)
    return ref, logits


# -- tests -----------------------------------------------------------------------------------
# (prompt, generated, heavy, recent): evictions decided mostly by prefill scores / by decode scores
SHAPES = [(40, 12, 6, 5), (12, 30, 4, 3)]


@pytest.mark.parametrize("model", [GQA, MHA])
@pytest.mark.parametrize("prefill", ["eager", "chunked"])
@pytest.mark.parametrize("shape", SHAPES, ids=["long-prompt", "long-generation"])
def test_matches_naive_reference(model, prefill, shape):
    prompt_len, gen_len, heavy, recent = shape
    s = spec(model, prompt_len=prompt_len, gen_len=gen_len, prefill=prefill, chunk_size=5,
             heavy_size=heavy, recent_size=recent)
    prompts = prompts_for(s)
    assert not np.array_equal(prompts[0], prompts[1])
    policy, engine = run_policy(s, prompts)
    ref, ref_logits = reference_generate(model, prompts, s.gen_len, heavy, recent)
    torch.testing.assert_close(torch.stack(engine.step_logits), torch.stack(ref_logits), rtol=1e-5, atol=1e-6)
    for i, layer in enumerate(policy.cache.layers):
        ours = layer.kept_positions()
        for b in range(s.batch_size):
            for h in range(ours.shape[1]):
                assert ours[b, h].tolist() == sorted(ref.kept[i][b][h]), (i, b, h)
    kept = policy.cache.layers[0].kept_positions()
    assert not torch.equal(kept[0], kept[1])  # each sequence chose its own tokens
    assert (kept[..., 1:heavy] - kept[..., : heavy - 1] > 1).any()  # not just the first tokens: chosen by score


@pytest.mark.parametrize("model", [GQA, MHA])
@pytest.mark.parametrize("prefill", ["eager", "chunked"])
def test_budget_covering_the_sequence_equals_full_cache(model, prefill):
    s = spec(model, prefill=prefill, heavy_size=30, recent_size=22)  # 52 = prompt 40 + 12 generated
    prompts = prompts_for(s)
    _, h2o = run_policy(s, prompts, dtype=torch.float32)
    full_spec = CellSpec.from_dict({**s.to_dict(), "framework": "hf", "policy": {},
                                    "prefill": "eager" if prefill == "eager" else "chunked"})
    _, full = run_policy(full_spec, prompts, policy_cls=KVPolicy, dtype=torch.float32)
    torch.testing.assert_close(torch.stack(h2o.step_logits), torch.stack(full.step_logits), rtol=1e-4, atol=1e-5)
    assert torch.equal(h2o.last_tokens, full.last_tokens)


@pytest.mark.parametrize("prefill", ["eager", "chunked"])
@pytest.mark.parametrize("prompt_len", [30, 33])  # a whole number of chunks, a partial last chunk
def test_prompt_shorter_than_the_cells(prefill, prompt_len):
    s = spec(GQA, prompt_len=40, gen_len=10, prefill=prefill, chunk_size=10, heavy_size=5, recent_size=4)
    prompts = workload.prompts(3, 2, prompt_len, 1000)
    policy, engine = run_policy(s, prompts)
    ref, ref_logits = reference_generate(GQA, prompts, s.gen_len, 5, 4)
    torch.testing.assert_close(torch.stack(engine.step_logits), torch.stack(ref_logits), rtol=1e-5, atol=1e-6)
    for i, layer in enumerate(policy.cache.layers):
        assert layer.kept_positions().tolist() == [[sorted(h) for h in seq] for seq in ref.kept[i]]


def test_eager_and_chunked_prefill_agree():
    s = spec(GQA, prompt_len=65, heavy_size=10, recent_size=7)  # chunks of 32: the last one is a single token
    prompts = prompts_for(s)
    eager, e1 = run_policy(s, prompts)
    chunked, e2 = run_policy(CellSpec.from_dict({**s.to_dict(), "prefill": "chunked", "chunk_size": 32}), prompts)
    torch.testing.assert_close(torch.stack(e1.step_logits), torch.stack(e2.step_logits), rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.cache.layers, chunked.cache.layers):
        assert torch.equal(a.kept_positions(), b.kept_positions())


@pytest.mark.parametrize("prefill", ["eager", "chunked"])
@pytest.mark.parametrize("model", [GQA, MHA])
def test_recent_window_kept_and_budget_never_exceeded(model, prefill):
    s = spec(model, prompt_len=48, gen_len=20, prefill=prefill, kv_budget=0.25)  # heavy 6, recent 6
    checked = []

    def check(policy):
        for layer in policy.cache.layers:
            if not layer.decoding:
                continue
            assert layer.keys.shape[2] == layer.heavy + layer.recent + 1  # the slots never grow
            kept = layer.kept_positions()
            assert kept.shape[-1] <= layer.heavy + layer.recent
            window = torch.arange(layer.seen - layer.recent, layer.seen)
            assert torch.isin(window, kept).all()  # every sequence, every head holds its recent window
            checked.append(layer.seen)

    run_policy(s, prompts_for(s), hook=check)
    assert len(checked) == 2 * s.gen_len  # two layers, checked after prefill and every decode step


@pytest.mark.parametrize("model", [GQA, MHA])
def test_kv_bytes_scale_with_the_budget(model):
    cfg = models.config_dict(model)
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_slot = 2 * cfg["num_hidden_layers"] * heads * head_dim * 8  # K and V, float64
    for budget in (0.1, 0.2, 0.5, 1.0):
        s = spec(model, prompt_len=100, gen_len=4, kv_budget=budget)
        policy, engine = run_policy(s, prompts_for(s))
        slots = round(budget * 100) + 1
        assert engine.kv_bytes_peak == s.batch_size * slots * per_slot
        assert policy.kv_bytes(policy.cache) == s.batch_size * slots * per_slot


def test_gqa_scores_sum_the_query_heads_of_a_group():
    torch.manual_seed(0)
    b, hkv, g, lq, d = 2, 2, 4, 9, 8
    q, k, v = torch.randn(b, hkv * g, lq, d, dtype=torch.float64), torch.randn(b, hkv, lq, d, dtype=torch.float64), \
        torch.randn(b, hkv, lq, d, dtype=torch.float64)
    _, col = attention.eager_with_scores(q, k, v, 0.5)
    causal = torch.ones(lq, lq, dtype=torch.bool).tril()
    for h in range(hkv):
        expected = 0
        for qh in range(h * g, (h + 1) * g):  # the group of KV head h
            logits = (q[:, qh] @ k[:, h].transpose(-1, -2) * 0.5).masked_fill(~causal, float("-inf"))
            expected = expected + torch.softmax(logits, -1).sum(1)
        torch.testing.assert_close(col[:, h], expected)


@pytest.mark.parametrize("offset", [0, 13])
def test_blockwise_scores_equal_the_full_matrix(offset):
    torch.manual_seed(1)
    b, hkv, g, lq, d = 2, 2, 4, 11, 8
    lk = lq + offset  # a later prefill chunk: queries are the last lq positions
    q, k = torch.randn(b, hkv * g, lq, d, dtype=torch.float64), torch.randn(b, hkv, lk, d, dtype=torch.float64)
    logits = (q @ attention.repeat_kv(k, g).transpose(-1, -2)) * 0.3
    full = torch.softmax(logits.masked_fill(~attention._causal(lq, lk, "cpu"), float("-inf")), -1)
    expected = full.sum(2).view(b, hkv, g, lk).sum(2)
    for block in (1, 200, 10**9):  # one row per block, a few rows, everything at once
        torch.testing.assert_close(attention.blockwise_scores(q, k, 0.3, block_elems=block), expected)


def test_budget_resolution():
    assert Budget.from_spec(0.2, {}).sizes(2048) == (204, 204)  # the paper's 0.2 = 0.1 + 0.1, int() as upstream
    assert Budget.from_spec(0.2, {"heavy_ratio": 0.15}).sizes(1000) == (150, 50)
    assert Budget.from_spec(1.0, {"heavy_size": 7, "recent_size": 3}).sizes(1000) == (7, 3)
    assert Budget.from_spec(0.1, {}).sizes(2050) == (102, 102)
    with pytest.raises(ValueError, match="must equal kv_budget"):
        Budget.from_spec(0.2, {"heavy_ratio": 0.2, "recent_ratio": 0.2})
    with pytest.raises(ValueError, match="not both"):
        Budget.from_spec(0.2, {"heavy_ratio": 0.1, "heavy_size": 3})
    with pytest.raises(ValueError, match="keeps no token"):
        Budget.from_spec(0.1, {}).sizes(9)


def test_unsupported_architecture_is_named():
    s = spec()
    model = models.build("tiny-gpt-oss", "random", "cpu", "float32", "eager")
    with pytest.raises(Unsupported, match="GptOssForCausalLM.*gpt_oss"):
        H2OPolicy(s).prepare(model)


def test_prefill_mode_must_score():
    with pytest.raises(ValueError, match="prefill"):
        H2OPolicy(CellSpec(experiment="t", framework="h2o", model=GQA, prefill="sdpa", device="cpu"))


def test_run_engine_cell_reports_h2o_metrics():
    from frameworks.h2o import adapter

    s = CellSpec.from_dict(dict(experiment="t", framework="h2o", model=GQA, prompt_len=64, gen_len=5, kv_budget=0.2,
                                prefill="chunked", chunk_size=32, device="cpu", dtype="float32", batch_size=2))
    m = adapter.run(s)
    assert m.extra["h2o_heavy"] == 6 and m.extra["h2o_recent"] == 6
    assert m.kv_cache_bytes == 2 * 13 * 2 * 2 * 2 * 16 * 4  # batch x slots x layers x (K, V) x heads x dim x fp32
    assert len(m.timings) == 2 and m.timings[0].out_tokens == 5


@pytest.mark.parametrize("model", [GQA, MHA])
@pytest.mark.parametrize("cell_len,prompt_len,chunk", [
    (32, 25, 8),  # a prompt shorter than the cell's, last chunk 1 token
    (40, 33, 8),  # the same, a later chunk
    (33, 33, 8),  # the cell's own length, last chunk 1 token
    (32, 17, 4),  # shorter, several whole chunks then 1 token
    (32, 24, 8),  # shorter, a whole number of chunks
    (32, 26, 8),  # shorter, a 2-token last chunk
])
def test_chunked_prefill_equals_eager_for_every_length(model, cell_len, prompt_len, chunk):
    """Issue #10 item 1: the prompt's last token attends to the whole prompt whatever the chunking;
    a one-token last chunk is prefill, not the first decode step."""
    s = spec(model, prompt_len=cell_len, gen_len=6, batch_size=3, heavy_size=4, recent_size=3)
    prompts = workload.prompts(5, 3, prompt_len, 1000)
    eager, e1 = run_policy(s, prompts)
    chunked, e2 = run_policy(CellSpec.from_dict({**s.to_dict(), "prefill": "chunked", "chunk_size": chunk}), prompts)
    torch.testing.assert_close(torch.stack(e2.step_logits), torch.stack(e1.step_logits), rtol=1e-5, atol=1e-6)
    assert torch.equal(e1.last_tokens, e2.last_tokens)
    for a, b in zip(eager.cache.layers, chunked.cache.layers):
        assert torch.equal(a.kept_positions(), b.kept_positions())
    ref, ref_logits = reference_generate(model, prompts, s.gen_len, 4, 3)
    torch.testing.assert_close(torch.stack(e2.step_logits), torch.stack(ref_logits), rtol=1e-5, atol=1e-6)
