"""Train a retrieval model of the registry (its `train:` settings) on the fact corpus.

    python -m frameworks.accuracy.train --model retriever-tiny --out results/models/retriever-tiny

Deterministic on a CPU: the seed fixes the initial weights (models.build) and every batch
(facts.batch(seed, step)); torch runs with deterministic algorithms and a fixed thread count,
so the same seed gives the same checkpoint bytes (train_log.json records its SHA-256). The loss
is on the answers of `ask` turns only (the rest of a sequence is random by construction). The
log also holds the full-cache recall on held-out trials at the lengths it was evaluated on.
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


def train(name: str, out: Path, overrides: dict | None = None, eval_lengths=(), eval_n: int = 64, log=None) -> dict:
    import torch
    import torch.nn.functional as F

    log = log or (lambda msg: print(msg, flush=True))
    settings = {**models.entry(name).get("train", {}), **(overrides or {})}
    missing = {"seed", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "threads"} - set(settings)
    if missing:
        raise ValueError(f"model {name}: registry entry has no train settings {sorted(missing)}")
    seed, steps, bs, seq_len = settings["seed"], settings["steps"], settings["batch_size"], settings["seq_len"]
    device = settings.get("device", "cpu")
    if seq_len > models.max_context(name):
        raise ValueError(f"model {name}: seq_len {seq_len} exceeds its context of {models.max_context(name)}")
    torch.set_num_threads(settings["threads"])
    torch.use_deterministic_algorithms(device == "cpu")  # the CPU promise; CUDA would need cuBLAS settings
    torch.manual_seed(seed)
    vocab = facts.Vocab(models.config_dict(name)["vocab_size"])
    model = models.build(name, "random", device, "float32", "sdpa", seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    warm = settings["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        toks, mask = facts.batch(seed, step, vocab, bs, seq_len)
        ids = torch.as_tensor(toks, device=device)
        target = torch.as_tensor(mask, device=device)[:, 1:]
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits[target], ids[:, 1:][target])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(round(float(loss.detach()), 5))
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss:.4f}  {time.perf_counter() - t0:.1f} s")
    train_s = time.perf_counter() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.build(vocab).save_pretrained(out)
    recalls = {}
    for length in eval_lengths:
        recalls[str(length)] = recall(model, vocab, seed, length, eval_n)
        log(f"full-cache recall at {length} tokens: {recalls[str(length)]}")
    record = {"model": name, "settings": settings, "train_s": round(train_s, 2), "loss_first": losses[0],
              "loss_last": losses[-1], "losses": losses, "recall_full_cache": recalls, "eval_n": eval_n,
              "checkpoint_sha256": sha256(out / CHECKPOINT), "torch": torch.__version__}
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="registry name with `train:` settings (e.g. retriever-tiny)")
    ap.add_argument("--out", required=True, type=Path, help="checkpoint folder (save_pretrained + tokenizer + train_log.json)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a train setting")
    ap.add_argument("--eval-lengths", default="", help="comma-separated context lengths for the full-cache recall")
    args = ap.parse_args(argv)
    try:
        over = {k: json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" else v
                for k, v in (s.split("=", 1) for s in args.set)}
        lengths = [int(x) for x in args.eval_lengths.split(",") if x]
        rec = train(args.model, args.out, over, lengths)
    except ValueError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    print(f"train: {args.model}: loss {rec['loss_first']} -> {rec['loss_last']} in {rec['train_s']} s; "
          f"sha256 {rec['checkpoint_sha256'][:12]}; recall {rec['recall_full_cache']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
