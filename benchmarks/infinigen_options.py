"""Benchmark (not a test): what each InfiniGen option that departs from upstream changes.

    PYTHONPATH=. .venv/bin/python benchmarks/infinigen_options.py [--out benchmarks/out/infinigen_options.json]

For each model (tiny Llama with GQA, tiny OPT; random weights with sharpened Q/K so attention
depends on content, and norm weights drawn in [0.3, 1.7] as trained models have), the default
policy (upstream's behaviour) and each named alternative run the same batch; reported: the
overlap of the tokens selected at the first decode step (|ours ∩ upstream| / |upstream|, over
speculated layers, sequences and kv heads), the largest logit difference of that step and
whether greedy tokens agree. CPU, float32, about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from frameworks import models  # noqa: E402
from frameworks.harness.spec import CellSpec  # noqa: E402
from frameworks.hf.engine import Engine  # noqa: E402
from frameworks.infinigen.policy import InfiniGenPolicy  # noqa: E402
from frameworks.infinigen.transfer import Transfer  # noqa: E402

ALTERNATIVES = {"speculation_input": "next_norm", "partial_columns": "warmup", "min_fetch": 1, "budget_rule": "current"}


def build(name: str, attn: str, seed: int = 0):
    model = models.build(name, "random", "cpu", "float32", attn, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)  # content-dependent attention (N(0, 0.02) weights make it uniform)
            elif "norm" in n and n.endswith("weight"):
                p.copy_(0.3 + 1.4 * torch.rand(p.shape, generator=g))
    return model


def run(name: str, policy: dict, prompts: np.ndarray, gen: int, kv_budget: float):
    spec = CellSpec(experiment="bench", framework="infinigen", model=name, device="cpu", dtype="float32",
                    prefill="eager", kv_budget=kv_budget, policy=policy, batch_size=prompts.shape[0],
                    prompt_len=prompts.shape[1], gen_len=gen)
    pol = InfiniGenPolicy(spec)
    model = build(name, pol.attn_implementation("eager"))
    pol.prepare(model)
    eng = Engine(model, pol, "cpu", "eager", spec.chunk_size)
    eng.collect_logits = True
    picked, orig = [], Transfer.launch_sparse

    def launch(self, store, layer, *a, **kw):
        got = orig(self, store, layer, *a, **kw)
        picked.append((layer, got.idx[..., : int(got.k)].clone()))
        return got

    Transfer.launch_sparse = launch
    try:
        eng.generate(prompts, gen)
    finally:
        Transfer.launch_sparse = orig
    first = {layer: idx for layer, idx in picked[: len(pol.skews)]}  # the first decode step
    return first, torch.stack(eng.step_logits), eng.last_tokens


def overlap(ours: dict, ref: dict) -> float | None:
    hits = total = 0
    for layer, r in ref.items():
        o = ours[layer]
        for b in range(r.shape[0]):
            for h in range(r.shape[1]):
                want = set(r[b, h].tolist())
                hits += len(want & set(o[b, h].tolist()))
                total += len(want)
    return hits / total if total else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out/infinigen_options.json")
    args = ap.parse_args()
    out = {}
    for name in ("tiny-llama-3.1", "tiny-opt"):
        vocab = models.build(name, "random", "cpu", "float32", "sdpa").config.vocab_size
        prompts = np.random.default_rng(7).integers(0, vocab, (3, 96))
        for budget, alpha in ((0.25, 4.0), (0.25, 0.0)):
            base = {"alpha": alpha}
            ref, ref_logits, ref_tokens = run(name, base, prompts, 8, budget)
            for key, value in ALTERNATIVES.items():
                sel, logits, tokens = run(name, {**base, key: value}, prompts, 8, budget)
                row = {"selected_overlap_step1": overlap(sel, ref),
                       "max_logit_diff_step1": float((logits[1] - ref_logits[1]).abs().max()),  # [0]: prefill
                       "greedy_tokens_equal": bool(torch.equal(tokens, ref_tokens))}
                out[f"{name} kv_budget={budget} alpha={alpha} {key}={value}"] = row
                print(f"{name:15} kv {budget} alpha {alpha} {key}={value}: {row}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
