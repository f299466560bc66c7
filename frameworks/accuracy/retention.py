"""The fact-retention test: a fact at the start, turns of other conversation, then the question;
exact-match recall of the answer.

The conversation before the question is prefilled (the policy compresses it, as a server holding
a long chat would), the question is fed through the decode path, then the answer is generated
greedily and compared with the planted value. `facts-tokens`: the trained model's corpus
(facts.py), context = prompt_len tokens including the question, one-token answers, chance =
1 / number of values. `facts-chat`: natural language through the model's own tokenizer and chat
template (chat.py), answers of a few tokens, exact match after stripping.
"""

from __future__ import annotations

import numpy as np
import torch

from frameworks.accuracy import facts


def _stderr(hits: np.ndarray) -> float:
    from frameworks.accuracy.cell import binomial_stderr

    return binomial_stderr(float(hits.mean()), len(hits))


def run_tokens(engine, spec) -> dict:
    vocab = facts.Vocab(engine.model.config.vocab_size)
    n = spec.num_examples or spec.batch_size
    ctx, query, answer = facts.trials(spec.seed, vocab, n, spec.prompt_len)
    hits = []
    for s in range(0, n, spec.batch_size):
        _, gen = engine.teacher_forced(ctx[s:s + spec.batch_size], query[s:s + spec.batch_size], gen_len=1)
        hits.append(gen[:, 0].numpy() == answer[s:s + spec.batch_size])
    hits = np.concatenate(hits)
    return {"task": "facts-tokens", "metric": "exact_match", "value": float(hits.mean()), "stderr": _stderr(hits),
            "n": int(n), "chance": 1 / vocab.n_values, "context_len": spec.prompt_len}


def run_chat(engine, tok, spec) -> dict:
    from frameworks.accuracy import chat

    n = spec.num_examples or 1
    hits, lengths = [], []
    for i in range(n):
        history, question, answer = chat.conversation(tok, spec.seed, i, spec.prompt_len)
        _, gen = engine.teacher_forced(torch.tensor([history]), torch.tensor([question]), gen_len=spec.gen_len)
        text = tok.decode(gen[0].tolist(), skip_special_tokens=True)
        hits.append(chat.matches(text, answer))
        lengths.append(len(history) + len(question))
    hits = np.asarray(hits)
    return {"task": "facts-chat", "metric": "exact_match", "value": float(hits.mean()), "stderr": _stderr(hits),
            "n": int(n), "chance": 1 / chat.N_ANSWERS, "context_len": float(np.mean(lengths))}


def run(engine, tok, spec) -> dict:
    if spec.task == "facts-tokens":
        return run_tokens(engine, spec)
    if spec.task == "facts-chat":
        return run_chat(engine, tok, spec)
    raise ValueError(f"fact_retention: task must be facts-tokens or facts-chat, got {spec.task!r}")
