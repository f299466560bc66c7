"""Train a retrieval model of the registry (its `train:` settings) on the fact corpus.

    python -m frameworks.accuracy.train --model retriever-tiny --out results/models/retriever-tiny

Settings (registry `train:`, each overridable with --set KEY=JSON): seed, lr, warmup_steps,
threads, device (cpu | cuda), `phases` — a length curriculum, shortest first: a list of
{seq_len, steps, batch_size}; optional `amp: bf16` (bfloat16 autocast, float32 weights)
and `max_train_s` (a wall-clock guard: training stops there and the log says so).

Why a curriculum: the model first has to find the retrieval circuit (the question's key attends
to the one fact token of that key, whose embedding carries the value). Until it has, the loss
sits on a plateau near ln(8) and then drops within a few dozen steps. Short conversations make
that search cheap (a step costs about its tokens) and the right fact one of few candidates;
the later, longer phases only teach the circuit to hold over more distance and more distractors
(a model trained at 128 tokens recalls ~0.6 at 256 before it has seen 256). The learning rate
warms up, then follows one cosine over all phases.

Deterministic on a CPU: the seed fixes the initial weights (models.build) and every batch
(facts.batch(seed, step)); torch runs with deterministic algorithms and a fixed thread count,
so the same seed gives the same checkpoint bytes (train_log.json records its SHA-256). The loss
is on the answers of `ask` turns only (the rest of a sequence is random by construction). The
log also holds the full-cache recall on held-out trials at the lengths it was evaluated on, the
training time and where it ran (provenance: versions, GPU and driver, git commit, command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from frameworks import models
from frameworks.accuracy import facts, tokenizer

CHECKPOINT = "model.safetensors"
REQUIRED = ("seed", "phases", "lr", "warmup_steps", "threads")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recall(model, vocab: facts.Vocab, seed: int, length: int, n: int, batch: int = 16) -> float:
    """Full-cache exact-match recall of the final question, one forward (the hf baseline); the
    same held-out trials as the fact_retention cells (facts.trials)."""
    import torch

    ctx, query, answer = facts.trials(seed, vocab, n, length)
    ids = torch.as_tensor(np.concatenate([ctx, query], 1), device=next(model.parameters()).device)
    with torch.inference_mode():
        pred = torch.cat([model(input_ids=ids[s:s + batch], logits_to_keep=1).logits[:, -1].argmax(-1).cpu()
                          for s in range(0, n, batch)]).numpy()
    return float((pred == answer).mean())


def check_settings(name: str, settings: dict) -> list[dict]:
    """The phases of `settings`, validated; a ValueError names what is wrong."""
    missing = set(REQUIRED) - set(settings)
    if missing:
        raise ValueError(f"model {name}: registry entry has no train settings {sorted(missing)}")
    phases = settings["phases"]
    if not isinstance(phases, list) or not phases:
        raise ValueError(f"model {name}: train phases must be a non-empty list of {{seq_len, steps, batch_size}}")
    for p in phases:
        if not isinstance(p, dict) or set(p) != {"seq_len", "steps", "batch_size"} or \
                not all(isinstance(v, int) and v > 0 for v in p.values()):
            raise ValueError(f"model {name}: train phase {p!r} must be {{seq_len, steps, batch_size}}, positive integers")
        if p["seq_len"] > models.max_context(name):
            raise ValueError(f"model {name}: seq_len {p['seq_len']} exceeds its context of {models.max_context(name)}")
    if settings.get("amp") not in (None, "bf16"):
        raise ValueError(f"model {name}: train amp must be bf16 or absent, got {settings['amp']!r}")
    return phases


def train(name: str, out: Path, overrides: dict | None = None, eval_lengths=(), eval_n: int = 64, log=None) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F

    from frameworks.harness import provenance

    log = log or (lambda msg: print(msg, flush=True))
    t_start = time.perf_counter()
    settings = {**models.entry(name).get("train", {}), **(overrides or {})}
    phases = check_settings(name, settings)
    seed, device = settings["seed"], settings.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model {name}: trains on cuda (registry train.device) and no CUDA GPU is visible")
    plan = [(p["seq_len"], p["batch_size"]) for p in phases for _ in range(p["steps"])]
    steps = len(plan)
    torch.set_num_threads(settings["threads"])
    torch.use_deterministic_algorithms(device == "cpu")  # the CPU promise; CUDA would need cuBLAS settings
    torch.manual_seed(seed)
    vocab = facts.Vocab(models.config_dict(name)["vocab_size"])
    model = models.build(name, "random", device, "float32", "sdpa", seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    warm = settings["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    def amp():  # bf16 autocast where asked (the GPU model; on a CPU too, where its test runs)
        return torch.autocast(device, dtype=torch.bfloat16) if settings.get("amp") == "bf16" else contextlib.nullcontext()

    max_s = settings.get("max_train_s")
    losses, t0, stopped = [], time.perf_counter(), None
    for step, (seq_len, bs) in enumerate(plan):
        toks, mask = facts.batch(seed, step, vocab, bs, seq_len)
        ids = torch.as_tensor(toks, device=device)
        target = torch.as_tensor(mask, device=device)[:, 1:]
        with amp():
            logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits[target].float(), ids[:, 1:][target])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(round(float(loss.detach()), 5))
        elapsed = time.perf_counter() - t0
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step:5d}  len {seq_len:5d}  loss {losses[-1]:.4f}  {elapsed:.1f} s")
        if max_s is not None and elapsed > max_s and step < steps - 1:
            stopped = step + 1
            log(f"train: stopped after {stopped} of {steps} steps: max_train_s {max_s} reached")
            break
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.build(vocab).save_pretrained(out)
    recalls, t1 = {}, time.perf_counter()
    for length in eval_lengths:
        with amp():  # as the model was trained (and as the bf16 cells run it)
            recalls[str(length)] = recall(model, vocab, seed, length, eval_n)
        log(f"full-cache recall at {length} tokens: {recalls[str(length)]}")
    record = {"model": name, "settings": settings, "steps_done": len(losses), "stopped_early_at": stopped,
              "train_s": round(train_s, 2), "eval_s": round(time.perf_counter() - t1, 2),
              "wall_s": round(time.perf_counter() - t_start, 2),
              "loss_first": losses[0], "loss_last": losses[-1], "losses": losses, "recall_full_cache": recalls,
              "eval_n": eval_n, "checkpoint_sha256": sha256(out / CHECKPOINT),
              "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
              "provenance": provenance.collect(seed, with_gpu=device == "cuda")}
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    return record


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="registry name with `train:` settings (e.g. retriever-tiny)")
    ap.add_argument("--out", required=True, type=Path, help="checkpoint folder (save_pretrained + tokenizer + train_log.json)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a train setting (JSON value)")
    ap.add_argument("--eval-lengths", default="", help="comma-separated context lengths for the full-cache recall")
    ap.add_argument("--eval-n", type=int, default=64, help="held-out trials per evaluated length")
    return ap.parse_args(argv)


def eval_lengths(args: argparse.Namespace) -> list[int]:
    return [int(x) for x in args.eval_lengths.split(",") if x]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        over = {}
        for s in args.set:
            k, sep, v = s.partition("=")
            if not sep:
                raise ValueError(f"--set {s!r}: expected KEY=VALUE")
            try:
                over[k] = json.loads(v)
            except json.JSONDecodeError:
                over[k] = v
        rec = train(args.model, args.out, over, eval_lengths(args), args.eval_n)
    except ValueError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    print(f"train: {args.model}: loss {rec['loss_first']} -> {rec['loss_last']} in {rec['train_s']} s "
          f"({rec['steps_done']} steps); sha256 {rec['checkpoint_sha256'][:12]}; recall {rec['recall_full_cache']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
