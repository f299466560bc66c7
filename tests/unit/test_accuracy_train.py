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


def first_question_share(length: int = 256, n: int = 50) -> float:
    """Of the distractor questions asked while some stated distractor fact was not asked yet, the
    share that ask such a fact."""
    first = total = 0
    for seed in range(n):
        toks, _ = facts.sequence(np.random.default_rng(seed), V, length)
        early = {int(t - V.fact(0, 0)) // facts.N_VALUES for t in toks[1:1 + facts.EARLY_FACTS]}
        stated, asked = set(), set()
        for i, t in enumerate(toks[:-3]):
            if t >= V.fact(0, 0):
                stated.add(int(t - V.fact(0, 0)) // facts.N_VALUES)
            if t == facts.ASK:
                k = int(toks[i + 1] - V.key(0))
                if stated - asked - early:
                    total += 1
                    first += k not in asked
                asked.add(k)
    return first / total


def test_about_half_of_the_questions_ask_a_fact_first(monkeypatch):
    # FRESH_P of them by choice, more by chance; a uniform choice among stated facts gives far fewer
    assert first_question_share() > 0.6
    monkeypatch.setattr(facts, "FRESH_P", 0.0)
    assert first_question_share() < 0.4


def test_eval_trials_are_not_training_batches():
    toks, _ = facts.batch(0, 0, V, 4, 64)
    ctx, _, _ = facts.trials(0, V, 4, 64)
    assert not np.array_equal(toks[:, :-3], ctx)


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        _ = facts.Vocab(60).n_keys


def small(seq_len=48, steps=3, batch_size=2, **kw):
    return {"phases": [{"seq_len": seq_len, "steps": steps, "batch_size": batch_size}], "warmup_steps": 1, "threads": 1, **kw}


def test_trainer_is_deterministic(tmp_path):
    a = train.train("retriever-tiny", tmp_path / "a", small(), log=lambda _: None)
    b = train.train("retriever-tiny", tmp_path / "b", small(), log=lambda _: None)
    assert a["checkpoint_sha256"] == b["checkpoint_sha256"] == train.sha256(tmp_path / "a" / train.CHECKPOINT)
    c = train.train("retriever-tiny", tmp_path / "c", small(seed=1), log=lambda _: None)
    assert c["checkpoint_sha256"] != a["checkpoint_sha256"]
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["settings"]["phases"][0]["steps"] == 3 and log["steps_done"] == 3 and len(log["losses"]) == 3
    assert log["provenance"]["git"].keys() == {"commit", "dirty"} and log["provenance"]["command"]
    assert (tmp_path / "a" / "tokenizer.json").exists()


def test_curriculum_runs_its_phases_in_order(tmp_path):
    phases = [{"seq_len": 24, "steps": 2, "batch_size": 3}, {"seq_len": 40, "steps": 1, "batch_size": 2}]
    seen = []
    rec = train.train("retriever-tiny", tmp_path / "a", {**small(), "phases": phases}, log=seen.append)
    assert rec["steps_done"] == 3
    assert [int(m.split()[3]) for m in seen if m.startswith("step")] == [24, 40]  # steps 0 and 2 are logged


def test_bf16_autocast_and_the_time_guard(tmp_path):
    # the GPU settings' code path (amp, max_train_s) on the CPU: a guard of 0 s stops after one step
    rec = train.train("retriever-tiny", tmp_path / "a", small(amp="bf16", max_train_s=0), log=lambda _: None)
    assert rec["steps_done"] == 1 and rec["stopped_early_at"] == 1
    assert (tmp_path / "a" / train.CHECKPOINT).exists()


def test_trainer_refuses_a_model_without_settings(tmp_path):
    with pytest.raises(ValueError, match="train settings"):
        train.train("tiny-llama-3.1", tmp_path / "x")


@pytest.mark.parametrize("phases,match", [([], "non-empty list"), ([{"seq_len": 48, "steps": 0, "batch_size": 2}], "positive"),
                                          ([{"seq_len": 48, "steps": 2}], "seq_len, steps, batch_size"),
                                          ([{"seq_len": 4096, "steps": 2, "batch_size": 2}], "exceeds its context")])
def test_bad_phases_are_clear_errors(tmp_path, phases, match):
    with pytest.raises(ValueError, match=match):
        train.train("retriever-tiny", tmp_path / "x", {**small(), "phases": phases})


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert train.main(["--model", "retriever-tiny", "--out", str(tmp_path), "--set", "amp=fp8"]) == 2
    assert "amp must be bf16" in capsys.readouterr().err
    assert train.main(["--model", "retriever-tiny", "--out", str(tmp_path), "--set", "phases"]) == 2


def test_gpu_retriever_script_runs_its_code_path_on_a_cpu(tmp_path):
    """benchmarks/gpu_retriever.sh with retriever-small's real settings (bf16 autocast, the time
    guard), moved to the CPU and cut to two steps: what it writes, and its verdict (a two-step model
    is below the 0.95 target: exit 1, said so)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "EVAL_LENGTHS": "64,96", "EVAL_N": "4",
           "KVSTUDY_GIT_COMMIT": "0123abc"}
    phases = json.dumps([{"seq_len": 64, "steps": 1, "batch_size": 2}, {"seq_len": 96, "steps": 1, "batch_size": 1}])
    p = subprocess.run(["bash", "benchmarks/gpu_retriever.sh", "--set", "device=cpu", "--set", "threads=1",
                        "--set", f"phases={phases}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "BELOW the 0.95 target" in p.stdout
    out = tmp_path / "retriever-small"
    files = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_log.json", "train.log"} <= files
    assert len(files) <= 8  # the device tool brings back at most 8 files
    assert (out / "model.safetensors").stat().st_size < 16 * 2**20  # and at most 16 MiB each
    log = json.loads((out / "train_log.json").read_text())
    assert log["settings"]["amp"] == "bf16" and log["settings"]["max_train_s"] > 0 and log["steps_done"] == 2
    assert set(log["recall_full_cache"]) == {"64", "96"} and log["provenance"]["git"]["commit"] == "0123abc"
    assert "gpu_retriever: 2 steps" in (out / "train.log").read_text()
