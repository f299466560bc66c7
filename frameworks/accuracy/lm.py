"""An lm-evaluation-harness `LM` over our engine: every continuation is scored *after* the KV
policy compressed the context.

A one-pass loglikelihood (lm-eval's HFLM) scores context and continuation in one forward, so
an eviction policy never acts. Here each request runs as in a real run: the context is
prefilled (H2O evicts, InfiniGen offloads to the host), then its last `decode_tail_tokens`
tokens and the continuation go through the decode path one token per step, teacher-forced
(Engine.teacher_forced), and each continuation token's log-probability comes from the step
that predicts it. The tail makes even one-token continuations (BoolQ's " yes") depend on what
the policy kept: with no tail, the first continuation token would come from the prefill, which
still sees the whole context. With the full cache every step equals the one-pass model
(tests/unit/test_accuracy_lm.py). The choices of one multiple-choice document share their
context: they run as one batch (continuations right-padded; causal, so padding never changes
the scored steps).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM

DECODE_TAIL_TOKENS = 8


class EngineLM(TemplateLM):
    backend = "causal"

    def __init__(self, engine, tokenizer, decode_tail_tokens: int = DECODE_TAIL_TOKENS, max_gen_toks: int = 32):
        super().__init__()
        self.engine, self.tokenizer = engine, tokenizer
        self.decode_tail_tokens, self.max_gen_toks = decode_tail_tokens, max_gen_toks
        self.context_tokens: list[int] = []  # per scored context: its length in tokens (the cell's table)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def _with_prefix(self, ctx: list[int]) -> list[int]:
        """The context as the model saw text in training: after BOS (when the tokenizer has one)."""
        return ctx if ctx[:1] == [self.prefix_token_id] else [self.prefix_token_id, *ctx]

    def _split(self, ctx: list[int]) -> tuple[list[int], list[int]]:
        """(prefilled head, tail fed through decode); the head keeps at least one token."""
        cut = max(1, len(ctx) - self.decode_tail_tokens)
        return ctx[:cut], ctx[cut:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        groups: dict[tuple, list[int]] = {}
        for i, (_, ctx, _) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        out: list = [None] * len(requests)
        for ctx, idx in groups.items():
            head, tail = self._split(self._with_prefix(list(ctx)))
            conts = [list(requests[i][2]) for i in idx]
            n = len(tail) + max(map(len, conts))
            feed = torch.full((len(idx), n), self.eot_token_id, dtype=torch.long)
            for row, cont in enumerate(conts):
                feed[row, : len(tail) + len(cont)] = torch.tensor(tail + cont)
            heads = torch.tensor([head] * len(idx))
            logits, _ = self.engine.teacher_forced(heads, feed)
            logp = torch.log_softmax(logits, -1)
            self.context_tokens.append(len(head) + len(tail))
            for row, (i, cont) in enumerate(zip(idx, conts)):
                steps = slice(len(tail), len(tail) + len(cont))
                target = feed[row, steps]
                lp = logp[row, steps].gather(-1, target[:, None]).sum().item()
                greedy = bool((logp[row, steps].argmax(-1) == target).all())
                out[i] = (lp, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # perplexity over a whole document: every token would have to be a decode step after a
        # one-token prefill, which leaves a KV policy nothing to compress; not one of the study's tasks
        raise NotImplementedError("kvstudy's EngineLM scores conditional loglikelihoods and generations; "
                                  "rolling-loglikelihood (perplexity) tasks are not supported")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kw = req.args
            until = kw.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            head, tail = self._split(self._with_prefix(self.tok_encode(context)))
            _, gen = self.engine.teacher_forced(torch.tensor([head]), torch.tensor([tail], dtype=torch.long),
                                                gen_len=int(kw.get("max_gen_toks", self.max_gen_toks)))
            self.context_tokens.append(len(head) + len(tail))
            text = self.tokenizer.decode(gen[0].tolist(), skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out
