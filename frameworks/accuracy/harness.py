"""The `accuracy` experiment through lm-evaluation-harness: a task of lm-eval's registry (piqa,
boolq, winogrande, openbookqa, copa, rte: their datasets come from the hub) or `kvstudy_recall`,
the fact corpus written here as a task in lm-eval's own format (a YAML config over a local JSONL
file: no download, runs with HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import yaml

from frameworks.accuracy import facts, tokenizer
from frameworks.accuracy.lm import EngineLM

LOCAL_TASK = "kvstudy_recall"
CHOICES = 4  # kvstudy_recall: the right value and three other values of the same conversation


def recall_docs(vocab: facts.Vocab, seed: int, n: int, length: int) -> list[dict]:
    """Multiple-choice documents: a conversation of `length` tokens ending `ask k`, choices =
    the planted value and three values stated elsewhere in it (so copying any value is wrong)."""
    ctx, query, answer = facts.trials(seed, vocab, n, length)
    rng = np.random.default_rng([seed, 3, length])
    docs = []
    for c, q, a in zip(ctx, query, answer):
        values = range(int(vocab.value(0)), int(vocab.value(vocab.n_values)))
        pool = sorted({int(t) for t in c if int(t) in values} - {int(a)})
        if len(pool) < CHOICES - 1:  # a very short conversation: other values of the vocabulary
            pool = sorted(set(values) - {int(a)})
        others = rng.choice(pool, CHOICES - 1, replace=False)
        choices = [int(a), *map(int, others)]
        order = rng.permutation(CHOICES)
        docs.append({"context": tokenizer.text(vocab, np.concatenate([c[1:], q])),  # BOS comes from the LM
                     "choices": [tokenizer.text(vocab, [choices[j]]) for j in order],
                     "label": int(np.argmax(order == 0))})
    return docs


def write_recall_task(folder: Path, docs: list[dict]) -> Path:
    """The task config and its data, in lm-eval's format, under `folder` (pass it as include_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{LOCAL_TASK}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {
        "task": LOCAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (folder / f"{LOCAL_TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def evaluate(lm: EngineLM, task: str, limit: int | None, include_path: Path | None = None, seed: int = 0) -> dict:
    """lm_eval.simple_evaluate on one task; the accuracy block (acc; acc_norm kept when present)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path) if include_path else None)
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=False,
                                  bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    if res is None or task not in res["results"]:
        raise RuntimeError(f"lm-eval returned no result for task {task!r}")
    r = res["results"][task]
    metrics = {k.split(",")[0]: v for k, v in r.items() if "," in k and isinstance(v, (int, float))}
    n = res.get("n-samples", {}).get(task, {}).get("effective")
    stderr = metrics.get("acc_stderr")
    return {"task": task, "metric": "acc", "value": metrics["acc"],
            "stderr": stderr if isinstance(stderr, (int, float)) else None, "n": int(n) if n is not None else None,
            "metrics": metrics, "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}


def run(engine, tok, spec) -> dict:
    lm = EngineLM(engine, tok)
    if spec.task == LOCAL_TASK:
        vocab = facts.Vocab(engine.model.config.vocab_size)
        n = spec.num_examples or 64
        with tempfile.TemporaryDirectory(prefix="kvstudy-task-") as td:
            folder = write_recall_task(Path(td), recall_docs(vocab, spec.seed, n, spec.prompt_len))
            acc = evaluate(lm, LOCAL_TASK, None, folder, spec.seed)
        acc["chance"] = 1 / CHOICES
    else:
        acc = evaluate(lm, spec.task, spec.num_examples, None, spec.seed)
        acc["chance"] = None
    acc["context_len"] = float(np.mean(lm.context_tokens)) if lm.context_tokens else None
    return acc
