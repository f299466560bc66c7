# Retrieval models trained by the pipeline (registry entries with `train:`): the checkpoints the
# accuracy and fact-retention cells load (weights: results/models/<name>). Deterministic: the same
# seed gives the same checkpoint bytes on a CPU (train_log.json records its SHA-256).
rule train_model:
    input:
        code=get_trainer_code,
    output:
        checkpoint="results/models/{trained}/model.safetensors",
        train_log="results/models/{trained}/train_log.json",
    log:
        "logs/models/{trained}.log",
    benchmark:
        "logs/benchmarks/models/{trained}.tsv"
    wildcard_constraints:
        trained="|".join(TRAINED_MODELS) or "no-trained-model",
    threads: get_trainer_threads
    resources:
        gpu=get_trainer_gpus,
    params:
        out=lambda wildcards: f"results/models/{wildcards.trained}",
        lengths=get_trainer_eval_lengths,
    shell:
        # on a CPU, pinned to {threads} cores of its own (workflow/lib/cores.py), as every CPU cell
        '"$KVSTUDY_PYTHON" -m workflow.lib.cores --cpus {threads} --gpus {resources.gpu} -- '
        '"$KVSTUDY_PYTHON" -m frameworks.accuracy.train --model {wildcards.trained} --out {params.out:q} '
        "--eval-lengths={params.lengths:q} > {log:q} 2>&1"
