"""Accuracy and fact-retention cells end to end through run-cell, on a checkpoint trained here
(a few steps: the numbers are not the point, the path is), for hf, h2o and infinigen; chat
prompts with a tokenizer built locally with `tokenizers`; unsupported without weights."""

import json
import subprocess
import sys

import pytest

from frameworks.accuracy import chat, train
from frameworks.harness.spec import CellSpec, SpecError

SMALL = {"phases": [{"seq_len": 48, "steps": 2, "batch_size": 2}], "warmup_steps": 1, "threads": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "retriever-tiny"
    train.train("retriever-tiny", out, SMALL, log=lambda _: None)
    return str(out)


def run_cell(tmp_path, **kw) -> dict:
    spec = CellSpec.from_dict({"model": "retriever-tiny", "device": "cpu", "dtype": "float32", "repetitions": 1,
                               "warmup": 0, "timeout_s": 300, **kw})
    out = tmp_path / f"{spec.cell_id}.json"
    subprocess.run([sys.executable, "-m", "frameworks.harness.run_cell", "--spec", spec.to_json(), "--out", str(out),
                    "--threads", "1"], check=True, timeout=320)
    return json.loads(out.read_text())


@pytest.mark.parametrize("fw,budget,prefill", [("hf", 1.0, "sdpa"), ("h2o", 0.2, "eager"), ("infinigen", 0.2, "eager")])
def test_fact_retention_cell(tmp_path, checkpoint, fw, budget, prefill):
    res = run_cell(tmp_path, experiment="fact_retention", framework=fw, weights=checkpoint, task="facts-tokens",
                   num_examples=8, batch_size=4, prompt_len=96, gen_len=1, kv_budget=budget, prefill=prefill)
    acc = res["accuracy"]
    assert res["status"] == "ok" and res["summary"] is None
    assert acc["n"] == 8 and acc["metric"] == "exact_match" and acc["chance"] == 1 / 8
    if fw == "h2o":  # heavy + recent + 1 slots of a 94-token context (+ 2 fed tokens)
        assert acc["kv_kept_fraction"] < 0.35
    if fw == "infinigen":
        assert 0 < acc["kv_fetched_fraction"] <= 0.25


def test_accuracy_cell_runs_lm_eval(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    res = run_cell(tmp_path, experiment="accuracy", framework="h2o", weights=checkpoint, task="kvstudy_recall",
                   num_examples=4, batch_size=1, prompt_len=64, gen_len=1, kv_budget=0.5, prefill="eager")
    assert res["status"] == "ok" and res["accuracy"]["n"] == 4 and res["accuracy"]["chance"] == 0.25


def test_accuracy_without_weights_is_unsupported(tmp_path):
    res = run_cell(tmp_path, experiment="accuracy", framework="hf", model="tiny-llama-3.1", task="piqa",
                   prompt_len=64, gen_len=1)
    assert res["status"] == "unsupported" and "set weights=<path>" in res["message"]


def test_bad_accuracy_specs_are_refused():
    with pytest.raises(SpecError, match="needs a task"):
        CellSpec.from_dict({"experiment": "accuracy", "framework": "hf", "model": "retriever-tiny"})
    with pytest.raises(SpecError, match="fact_retention task"):
        CellSpec.from_dict({"experiment": "fact_retention", "framework": "hf", "model": "retriever-tiny", "task": "piqa"})
    with pytest.raises(SpecError, match="apply to the experiments"):
        CellSpec.from_dict({"experiment": "batch", "framework": "hf", "model": "tiny-llama-3.1", "task": "piqa"})
    assert "task" not in CellSpec.from_dict({"experiment": "batch", "framework": "hf", "model": "tiny-llama-3.1"}).to_dict()


def local_chat_tokenizer():
    """A BPE tokenizer trained here on the conversation's own words, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"the code of the {a} {p} is {n}." for a in chat.ADJECTIVES for p in chat.PLACES for n in (1234, 5678)]
    text += ["Please remember this: What was I told you at the start? Answer with the code only. Noted, I will it."]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


def test_chat_conversation_plants_the_fact_first_and_asks_last():
    tok = local_chat_tokenizer()
    for target in (200, 1000):
        history, question, code = chat.conversation(tok, 0, 1, target)
        assert len(history) + len(question) >= target
        assert len(history) + len(question) < target + 80  # about one turn over at most
        text = tok.decode(history)
        assert text.index(code) < 120 and text.count(code) == 1  # planted once, at the start
        assert tok.decode(question).endswith("<|assistant|>")
    assert chat.matches(" 1234.", "1234") and not chat.matches("12345", "1234")


def test_paper_fact_retention_runs_the_trained_model_and_a_real_one_per_model():
    # per_model: facts-tokens on the retriever trained here, facts-chat on Llama-3.1-8B (no weights: unsupported)
    import copy

    from workflow.lib import celltable

    preset = celltable.load_preset("paper")
    cells = celltable.build_cells({"preset": "paper", "runner": "local", "experiments": ["fact_retention"]}, preset)
    by_model = {}
    for c in cells.values():
        by_model.setdefault(c.model, set()).add((c.task, c.weights))
    assert by_model == {"retriever-small": {("facts-tokens", "results/models/retriever-small")},
                        "llama-3.1-8b": {("facts-chat", "random")}}
    assert {c.prompt_len for c in cells.values() if c.model == "llama-3.1-8b"} == {1024, 4096, 8192, 16384, 32768}
    assert {c.kv_budget for c in cells.values() if c.framework == "hf"} == {1.0}
    bad = copy.deepcopy(preset)
    bad["experiments"]["fact_retention"]["per_model"]["llama-3.2-1b"] = {"params": {"task": "facts-chat"}}
    with pytest.raises(celltable.ConfigError, match="per_model names 'llama-3.2-1b'"):
        celltable.build_cells({"preset": "paper", "runner": "local"}, bad)
