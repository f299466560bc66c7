"""The synthetic fact-retention corpus (token level): what the retrieval model is trained on and
what the `fact_retention` and `kvstudy_recall` cells ask it.

A sequence is a conversation in a small vocabulary: a fact is one token `k:v` (key k has value
v), `ask k v` asks for key k and answers v. It opens with a few early facts, then turns of
distractor facts and questions about the distractor facts stated so far (so attention has to
reach back through the context during training), and ends with a question about one of the
early facts — the fact planted at the start of a long conversation, recalled at the end; an
early fact's value appears nowhere else, so only a cache that kept its token can answer. Keys
are distinct within a sequence, so every question has one answer. Half of the distractor
questions, while there are any, ask a fact not asked before: a repeated question can also be
answered by copying its last answer, a first one only from the fact's token — the circuit the
final question needs (600 steps of retriever-tiny's shape with 16 keys: recall 1.0 at 128 and
256 tokens for 4 of 4 seeds with them, for 2 of 4 without). A fact is one token so that a small model learns retrieval in minutes on a CPU: the
question's key matches the fact's key in one attention step (a two-token fact needs an
induction circuit, which takes a tiny model far longer to find). Token-level: no tokenizer is
needed to train; the word-level tokenizer (tokenizer.py) names the same ids for lm-eval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPECIALS = ("<pad>", "<s>", "</s>", "fact", "ask", ".")
PAD, BOS, EOS, FACT, ASK, FILL = range(len(SPECIALS))  # FACT: unused (a fact is one token)
N_VALUES = 8
EARLY_FACTS = 4  # facts planted at the start; the final question asks about one of them
ASK_P = 0.5  # probability that a distractor turn is a question rather than a new fact
FRESH_P = 0.5  # probability that a question asks a distractor fact not asked before (if any)


@dataclass(frozen=True)
class Vocab:
    """Ids: the specials, `n_keys` keys k0.., N_VALUES values v0.., then the facts k0:v0 .. (key-major);
    the largest n_keys that fits vocab_size, the rest unused."""

    vocab_size: int

    @property
    def n_keys(self) -> int:
        n = (self.vocab_size - len(SPECIALS) - N_VALUES) // (1 + N_VALUES)
        if n < 2 * EARLY_FACTS:
            raise ValueError(f"vocab_size {self.vocab_size} is too small for the fact corpus (needs >= "
                             f"{len(SPECIALS) + N_VALUES + 2 * EARLY_FACTS * (1 + N_VALUES)})")
        return n

    @property
    def n_values(self) -> int:
        return N_VALUES

    def key(self, i) -> np.ndarray:
        return len(SPECIALS) + np.asarray(i)

    def value(self, i) -> np.ndarray:
        return len(SPECIALS) + self.n_keys + np.asarray(i)

    def fact(self, k, v) -> np.ndarray:
        return len(SPECIALS) + self.n_keys + N_VALUES + np.asarray(k) * N_VALUES + np.asarray(v)

    def words(self) -> list[str]:
        """The word of every id, in id order (the tokenizer's vocabulary)."""
        used = len(SPECIALS) + self.n_keys * (1 + N_VALUES) + N_VALUES
        return [*SPECIALS, *(f"k{i}" for i in range(self.n_keys)), *(f"v{i}" for i in range(N_VALUES)),
                *(f"k{k}:v{v}" for k in range(self.n_keys) for v in range(N_VALUES)),
                *(f"<unused{i}>" for i in range(self.vocab_size - used))]


def sequence(rng: np.random.Generator, vocab: Vocab, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One conversation of exactly `length` tokens ending `ask k v` about an early fact.

    Returns (tokens [length], answer mask [length]: True at every answer of an `ask` turn).
    """
    if length < 1 + EARLY_FACTS + 3:
        raise ValueError(f"a fact-retention sequence needs >= {1 + EARLY_FACTS + 3} tokens, got {length}")
    keys = rng.permutation(vocab.n_keys)
    values = rng.integers(0, vocab.n_values, vocab.n_keys)
    toks, mask = [BOS], [False]
    stated: list[int] = []
    unasked: list[int] = []  # distractor facts stated and not asked yet

    def fact(i: int) -> None:
        toks.append(int(vocab.fact(keys[i], values[i])))
        mask.append(False)
        stated.append(i)
        if i >= EARLY_FACTS:
            unasked.append(i)

    def ask(i: int) -> None:
        toks.extend((ASK, int(vocab.key(keys[i])), int(vocab.value(values[i]))))
        mask.extend((False, False, True))

    for i in range(EARLY_FACTS):
        fact(i)
    while len(toks) < length - 3:
        room = length - 3 - len(toks)
        can_ask = len(stated) > EARLY_FACTS and room >= 3
        if len(stated) < vocab.n_keys and (not can_ask or rng.random() >= ASK_P):
            fact(len(stated))
        elif can_ask:  # distractor questions never name an early fact
            if unasked and rng.random() < FRESH_P:  # a first question: only the fact's token answers it
                j = int(rng.integers(len(unasked)))
                unasked[j], unasked[-1] = unasked[-1], unasked[j]
                ask(unasked.pop())
            else:  # any distractor stated so far (a repeat can also be answered from its last answer)
                i = stated[rng.integers(EARLY_FACTS, len(stated))]
                ask(i)
                if i in unasked:
                    unasked.remove(i)
        else:  # keys used up and no room for a question: filler
            toks.append(FILL)
            mask.append(False)
    ask(int(rng.integers(0, EARLY_FACTS)))
    assert len(toks) == length
    return np.asarray(toks, dtype=np.int64), np.asarray(mask)


def batch(seed: int, index: int, vocab: Vocab, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` sequences from stream `(seed, index)`: [n, length] tokens and answer masks."""
    rng = np.random.default_rng([seed, 0, index])
    seqs = [sequence(rng, vocab, length) for _ in range(n)]
    return np.stack([s for s, _ in seqs]), np.stack([m for _, m in seqs])


def trials(seed: int, vocab: Vocab, n: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluation trials of `length` tokens in total, disjoint from training (their own stream):
    (context [n, length - 3], query [n, 2] = `ask k`, answer [n] = v)."""
    rng = np.random.default_rng([seed, 1, length])  # stream 1: never trained on (training is stream 0)
    toks = np.stack([sequence(rng, vocab, length)[0] for _ in range(n)])
    return toks[:, :-3], toks[:, -3:-1], toks[:, -1]
