"""EngineLM: at the full cache its loglikelihoods equal transformers' one-pass ones; lm-eval
runs the project's local task end to end (no download) through it."""

import os

import numpy as np
import pytest
import torch

from frameworks import models
from frameworks.accuracy import facts, harness, tokenizer
from frameworks.accuracy.lm import EngineLM
from frameworks.harness.spec import CellSpec
from frameworks.hf.engine import Engine
from frameworks.hf.policy import KVPolicy

MODEL = "tiny-llama-3.1"
TOL = 1e-4  # float32: the decode path vs one forward differ by reduction order only


@pytest.fixture(scope="module")
def setup():
    spec = CellSpec(experiment="accuracy", framework="hf", model=MODEL, device="cpu", dtype="float32",
                    task="kvstudy_recall", num_examples=4, prompt_len=64)
    model = models.build(MODEL, "random", "cpu", "float32", "sdpa", seed=0)
    engine = Engine(model, KVPolicy(spec), "cpu", "sdpa", 512)
    tok = tokenizer.build(facts.Vocab(model.config.vocab_size))
    return spec, model, engine, tok


class _Req:
    def __init__(self, *args):
        self.args = args


def reference(model, tok, ctx: str, cont: str) -> float:
    """transformers' one-pass loglikelihood (lm-eval's HFLM does the same), BOS first."""
    c = [tok.bos_token_id, *tok.encode(ctx, add_special_tokens=False)]
    whole = [tok.bos_token_id, *tok.encode(ctx + cont, add_special_tokens=False)]
    ids = torch.tensor([whole])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(c), len(whole)))


def test_full_cache_equals_transformers(setup):
    _, model, engine, tok = setup
    lm = EngineLM(engine, tok)
    rng = np.random.default_rng(0)
    words = facts.Vocab(model.config.vocab_size).words()[6:200]
    reqs = []
    for n_ctx in (3, 20, 40):  # shorter and longer than the decode tail
        ctx = " ".join(rng.choice(words, n_ctx))
        for n_cont in (1, 2, 5):
            reqs.append(_Req(ctx, " " + " ".join(rng.choice(words, n_cont))))
    got = lm.loglikelihood(reqs)
    want = [reference(model, tok, *r.args) for r in reqs]
    assert np.allclose([g for g, _ in got], want, atol=TOL, rtol=0), (got, want)


def test_generate_until_follows_greedy(setup):
    _, model, engine, tok = setup
    lm = EngineLM(engine, tok)
    ctx = "k1 v2 k3 v4 k5 v6 k7 v8 k9 v10 k11"
    [text] = lm.generate_until([_Req(ctx, {"until": ["</s>"], "max_gen_toks": 4})])
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(ctx, add_special_tokens=False)]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert text == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def test_lm_eval_runs_the_local_task_offline(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec, model, engine, tok = setup
    vocab = facts.Vocab(model.config.vocab_size)
    docs = harness.recall_docs(vocab, 0, 6, 64)
    folder = harness.write_recall_task(tmp_path / "task", docs)
    lm = EngineLM(engine, tok)
    acc = harness.evaluate(lm, harness.LOCAL_TASK, None, folder)
    assert acc["n"] == 6 and 0 <= acc["value"] <= 1 and acc["metric"] == "acc"
    # lm-eval's accuracy is the argmax over our loglikelihoods of the choices
    hits = []
    for d in docs:
        lls = [ll for ll, _ in lm.loglikelihood([_Req(d["context"], " " + c) for c in d["choices"]])]
        hits.append(int(np.argmax(lls)) == d["label"])
    assert acc["value"] == pytest.approx(np.mean(hits))
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
