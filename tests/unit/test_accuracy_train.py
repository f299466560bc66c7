"""The fact corpus and the trainer: exact lengths, answers only where asked, deterministic training."""

import json

import numpy as np
import pytest

from frameworks.accuracy import facts, train

V = facts.Vocab(158)


def test_sequences_have_exact_length_and_one_answer_per_question():
    for length in (11, 64, 257, 512):
        toks, mask = facts.sequence(np.random.default_rng(length), V, length)
        assert toks.shape == (length,) and toks[0] == facts.BOS
        asks = np.flatnonzero(toks == facts.ASK)
        assert set(np.flatnonzero(mask)) == set(asks + 2)
        assert toks[-3] == facts.ASK and mask[-1]


def test_final_question_asks_an_early_fact_stated_only_at_the_start():
    ctx, query, answer = facts.trials(0, V, 50, 300)
    for c, q, a in zip(ctx, query, answer):
        k = q[1] - V.key(0)
        v = a - V.value(0)
        planted = np.flatnonzero(c == V.fact(k, v))
        assert len(planted) == 1 and 1 <= planted[0] <= facts.EARLY_FACTS
        assert not np.any((c[:-1] == facts.ASK) & (c[1:] == q[1]))  # never asked before


def test_eval_trials_are_not_training_batches():
    toks, _ = facts.batch(0, 0, V, 4, 64)
    ctx, _, _ = facts.trials(0, V, 4, 64)
    assert not np.array_equal(toks[:, :-3], ctx)


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        _ = facts.Vocab(60).n_keys


def test_trainer_is_deterministic(tmp_path):
    small = {"steps": 3, "batch_size": 2, "seq_len": 48, "warmup_steps": 1, "threads": 1}
    a = train.train("retriever-tiny", tmp_path / "a", small, log=lambda _: None)
    b = train.train("retriever-tiny", tmp_path / "b", small, log=lambda _: None)
    assert a["checkpoint_sha256"] == b["checkpoint_sha256"] == train.sha256(tmp_path / "a" / train.CHECKPOINT)
    c = train.train("retriever-tiny", tmp_path / "c", {**small, "seed": 1}, log=lambda _: None)
    assert c["checkpoint_sha256"] != a["checkpoint_sha256"]
    assert json.loads((tmp_path / "a" / "train_log.json").read_text())["settings"]["steps"] == 3
    assert (tmp_path / "a" / "tokenizer.json").exists()


def test_trainer_refuses_a_model_without_settings(tmp_path):
    with pytest.raises(ValueError, match="train settings"):
        train.train("tiny-llama-3.1", tmp_path / "x")
