"""Natural-language fact retention for real weights: the model's own tokenizer and chat template.

The first user turn plants a fact (the code of a place); every later turn states another
place's code and asks for it, and the assistant answers (the conversation really moves on);
the final user turn asks for the first code. Turns are added until the conversation reaches
the target length in the model's tokens.
"""

from __future__ import annotations

import re

import numpy as np

PLACES = ("harbour", "library", "observatory", "bakery", "museum", "garden", "station", "lighthouse", "castle",
          "market", "stadium", "theatre", "workshop", "clinic", "bridge", "tower", "school", "orchard", "mill", "vault")
ADJECTIVES = ("north", "south", "east", "west", "old", "new", "upper", "lower", "red", "blue", "green", "quiet")
N_ANSWERS = 9000  # four-digit codes 1000..9999


def _code(rng) -> str:
    return str(int(rng.integers(1000, 10000)))


def _place(rng) -> str:
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]} {PLACES[rng.integers(len(PLACES))]}"


def _ids(tok, messages, generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    return list(out)


def conversation(tok, seed: int, index: int, target_tokens: int) -> tuple[list[int], list[int], str]:
    """(history ids, question ids incl. the generation prompt, expected answer) of about
    `target_tokens` tokens in total (never fewer)."""
    rng = np.random.default_rng([seed, 2, index])
    place, code = _place(rng), _code(rng)
    first = [{"role": "user", "content": f"Please remember this: the code of the {place} is {code}."},
             {"role": "assistant", "content": "Noted, I will remember it."}]
    question = {"role": "user", "content": f"What was the code of the {place} I told you at the start? Answer with the code only."}

    def turn() -> list[dict]:
        other, c = _place(rng), _code(rng)
        return [{"role": "user", "content": f"The code of the {other} is {c}. What is the code of the {other}?"},
                {"role": "assistant", "content": f"The code of the {other} is {c}."}]

    messages = list(first)
    base = len(_ids(tok, messages + [question], True))
    per_turn = max(1, len(_ids(tok, first + turn(), False)) - len(_ids(tok, first, False)))
    for _ in range(max(0, (target_tokens - base) // per_turn)):
        messages += turn()
    while len(_ids(tok, messages + [question], True)) < target_tokens:
        messages += turn()
    history = _ids(tok, messages, False)
    full = _ids(tok, messages + [question], True)
    if full[: len(history)] != history:
        raise ValueError("the chat template does not render the history as a prefix of the conversation; "
                         "fact retention needs a prefix-stable template")
    return history, full[len(history):], code


def matches(text: str, answer: str) -> bool:
    """Exact match: the first number in the reply is the code."""
    m = re.search(r"\d+", text)
    return bool(m) and m.group(0) == answer
