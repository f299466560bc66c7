# Config -> cell table, and the input functions every rule uses.
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

# frameworks/ and workflow/ importable without installing
REPO = workflow.basedir
sys.path.insert(0, REPO)
# Every job runs this interpreter with this checkout first on its path. Set through the shell
# prefix, not params: interpreter and checkout paths differ between machines and invocations
# (`snakemake` vs `python -m snakemake`), and a param change would rerun every cell.
# CPU cells' timing mode, pause (stop the other cells while one times) | lock, likewise: a change
# of it reruns nothing (frameworks/harness/pause.py; rule run_cell passes it to launch)
CPU_TIMING = config.get("cpu_timing") or "pause"
shell.prefix(
    "set -euo pipefail; "
    f"export KVSTUDY_PYTHON={shlex.quote(sys.executable)}; "
    # (Snakemake formats the prefix too: doubled braces reach the shell single)
    f"export PYTHONPATH={shlex.quote(REPO)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    f"export KVSTUDY_CPU_TIMING={shlex.quote(str(CPU_TIMING))}; "
)

from snakemake.exceptions import WorkflowError

from frameworks import models, registry
from frameworks.harness.spec import CellSpec
from workflow.lib import celltable, images, launch, preflight

try:
    PRESET = celltable.load_preset(config.get("preset", ""))
    CELLS = celltable.build_cells(config, PRESET)
except celltable.ConfigError as e:
    raise WorkflowError(f"kvstudy: {e}") from None

EXPERIMENTS = sorted({c.experiment for c in CELLS.values()})
RUNNER = config["runner"]
# runner local: vLLM cells run in their own venv (vLLM brings its own torch), made by rule vllm_venv;
# "none": in the workflow's own Python (a host with vLLM installed there runs them; one without,
# such as a GPU machine with only torch, records them `unsupported`, naming what is missing)
VLLM_VENV = config.get("vllm_venv") or ".venv-vllm"
VLLM_OWN_VENV = VLLM_VENV != "none"
IMAGE_CONFIG = config.get("images") or {}

# figure -> the experiment whose table it plots (one script per figure: workflow/scripts/<figure>.py)
FIGURES = {
    "ttft_vs_prompt": "ttft_prompt",
    "throughput_vs_batch": "batch",
    "memory_vs_batch": "batch",
    "tok_s_per_gb_vs_batch": "batch",
    "engine_decode": "batch",
    "model_size": "model_size",
    "latency_vs_rate": "request_rate",
    "metrics_vs_kv_budget": "kv_budget",
    "metrics_vs_alpha": "alpha",
    "accuracy_vs_kv_budget": "accuracy",
    "fact_retention_vs_context": "fact_retention",
}

# models the pipeline trains (frameworks/accuracy/train.py; rule train_model)
TRAINED_MODELS = [m for m in models.names() if "train" in models.entry(m)]
TRAINED_PREFIX = "results/models/"
SHIPPED_PREFIX = "results/reference/"


wildcard_constraints:
    experiment="|".join(EXPERIMENTS),
    framework="|".join(sorted({c.framework for c in CELLS.values()})),
    model="|".join(sorted({c.model for c in CELLS.values()})),
    cell=r"[A-Za-z0-9_.\-]+",


def get_cell(wildcards) -> CellSpec:
    path = f"results/cells/{wildcards.experiment}/{wildcards.framework}/{wildcards.model}/{wildcards.cell}.json"
    try:
        return CELLS[path]
    except KeyError:
        raise WorkflowError(
            f"kvstudy: {celltable.explain_unknown_cell(path, config)}"
        ) from None


def get_unknown_cell(wildcards):
    # input of the unknown_cell rule: a cell path this run does not have, explained
    path = f"results/cells/{wildcards.path}.json"
    if path in CELLS:  # a cell of this run: the run_cell rule makes it (ruleorder)
        # unless its checkpoint is missing: then the same clear error here, not an `exit 1` job
        cell_weights(CELLS[path])
        return []
    raise WorkflowError(f"kvstudy: {celltable.explain_unknown_cell(path, config)}")


def get_cell_spec(wildcards) -> str:
    return get_cell(wildcards).to_json()


def _cores() -> int | None:
    # an executor plugin's run (SLURM) has no --cores: None
    try:
        return workflow.cores
    except WorkflowError:
        return None


def get_cell_torch_threads(wildcards) -> int:
    # the threads a cell computes on (torch.set_num_threads, OMP_NUM_THREADS)
    threads = PRESET["cell_threads"]
    cores = _cores()
    if cores is None:
        if threads == "all":
            raise WorkflowError(
                f"kvstudy: preset {config['preset']!r} has cell_threads: all (every core of this "
                "machine), which a cluster cannot give; run it with --cores N, or set a number"
            )
        return threads
    return cores if threads == "all" else min(threads, cores)


def get_cell_threads(wildcards) -> int:
    # the cores a cell's job holds: its threads, times the busy processes of a request-rate cell
    # on the CPU (vLLM's engine core beside its driver). CPU cells with cores to spare run side by
    # side; their timed regions take turns (frameworks/harness/cputime.py)
    threads = get_cell_torch_threads(wildcards)
    cell = get_cell(wildcards)
    if PRESET["device"] == "cpu" and cell.is_rate_cell:
        threads *= registry.get(cell.framework).rate_cell_processes
    cores = _cores()
    return threads if cores is None else min(threads, cores)


def get_cell_gpus(wildcards) -> int:
    return 1 if PRESET["device"] == "cuda" else 0


def get_cell_runtime_min(wildcards) -> int:
    # a scheduler's time limit (SLURM: sbatch -t): the cell's own limit plus the launcher's grace,
    # so a slow cell ends as a `timeout` result, and only a hung job is killed by the scheduler
    return math.ceil((get_cell(wildcards).timeout_s + launch.GRACE_S) / 60)


def get_framework_code(wildcards) -> list[str]:
    # a cell depends on the code that runs it: what its framework's image copies (images.COPIES)
    image = images.image_of(wildcards.framework)
    base = images.code_files("engine") if image in images.ENGINE_IMAGES else []
    return sorted({*base, *images.code_files(image)})


def get_cell_weights(wildcards) -> list[str]:
    return cell_weights(get_cell(wildcards))


def cell_weights(spec: CellSpec) -> list[str]:
    # a cell on a model trained here depends on its checkpoint (rule train_model); one on a
    # checkpoint shipped under results/reference/ (the GPU-trained retriever) on that file
    weights = spec.weights.rstrip("/")
    if weights.startswith(SHIPPED_PREFIX):
        if not Path(weights, "model.safetensors").is_file():
            raise WorkflowError(
                f"kvstudy: weights {weights!r}: no checkpoint there (model.safetensors); it is made on "
                "a GPU by benchmarks/gpu_retriever.sh and shipped (README, accuracy section), or leave "
                f"the {spec.experiment} cells out with experiments=[...]"
            )
        return [f"{weights}/model.safetensors"]
    if not weights.startswith(TRAINED_PREFIX):
        return []
    name = weights.removeprefix(TRAINED_PREFIX)
    if name not in TRAINED_MODELS:
        raise WorkflowError(
            f"kvstudy: weights {weights!r}: no model {name!r} with `train:` settings in "
            f"frameworks/models/registry.yaml (trained models: {', '.join(TRAINED_MODELS)})"
        )
    return [f"{weights}/model.safetensors"]


def get_trainer_code(wildcards) -> list[str]:
    # the checkpoint depends on the trainer, the corpus and the registry (its config and settings)
    return sorted(
        str(p.relative_to(REPO))
        for p in Path(REPO, "frameworks").glob("accuracy/*.py")
        if p.name in ("train.py", "facts.py", "tokenizer.py")
    ) + ["frameworks/models/registry.yaml", "frameworks/models/__init__.py"]


def get_trainer_gpus(wildcards) -> int:
    # the registry's `train.device`: the GPU model trains on a GPU of its own, the CPU one on none
    return 1 if models.entry(wildcards.trained)["train"].get("device") == "cuda" else 0


def get_trainer_threads(wildcards) -> int:
    # the cores training computes on (the registry's `train.threads`): held, so no timed cell
    # shares them (CPU cells run beside other jobs)
    threads = int(models.entry(wildcards.trained)["train"].get("threads", 1))
    cores = _cores()
    return threads if cores is None else min(threads, cores)


def get_trainer_eval_lengths(wildcards) -> str:
    # the full-cache recall in the training log, at the context lengths the preset evaluates
    lengths = sorted(
        {
            c.prompt_len
            for c in CELLS.values()
            if c.task == "facts-tokens"
            and c.weights.rstrip("/") == TRAINED_PREFIX + wildcards.trained
        }
    )
    return ",".join(map(str, lengths))


def get_cell_image(wildcards) -> list[str]:
    # every cell depends on its framework's image (docker: its id; apptainer: the .sif)
    # (local: vLLM's venv, the local counterpart of its image)
    ext = launch.IMAGE_EXT[RUNNER]
    if not ext:
        own = wildcards.framework == "vllm" and VLLM_OWN_VENV
        return [f"{VLLM_VENV}/.installed"] if own else []
    return [f"results/images/{images.image_of(wildcards.framework)}.{ext}"]


def get_launch_options(wildcards) -> str:
    # runner and image only: relative, machine-independent (GPU, uid, paths: decided at run time)
    image = get_cell_image(wildcards)
    if RUNNER == "local":
        return f"--runner local" + (
            f" --python {VLLM_VENV}/bin/python" if image else ""
        )
    return f"--runner {RUNNER} --image {image[0]}"


def get_image_inputs(wildcards) -> dict:
    args = (IMAGE_CONFIG.get("build_args") or {}).get(wildcards.image) or {}
    inputs = {
        "dockerfile": f"containers/{wildcards.image}/Dockerfile",
        "code": images.code_files(wildcards.image),
    }
    lock = images.lock_file(wildcards.image, args)
    if lock:
        inputs["lock"] = lock
    if wildcards.image in images.ENGINE_IMAGES:
        inputs["engine"] = "results/images/engine.iid"
    return inputs


def get_image_build_options(wildcards) -> str:
    # the config's build args for this image (changing them rebuilds it) and the build network
    args = (IMAGE_CONFIG.get("build_args") or {}).get(wildcards.image) or {}
    opts = [f"--build-arg {shlex.quote(f'{k}={v}')}" for k, v in sorted(args.items())]
    if IMAGE_CONFIG.get("build_network"):
        opts.append(f"--network {shlex.quote(IMAGE_CONFIG['build_network'])}")
    return " ".join(opts)


def run_preflight() -> None:
    # onstart: real runs only (never `snakemake -n`), before any job
    jobs = list(workflow.dag.needrun_jobs())
    pending = {job.rule.name for job in jobs}
    rerun = {str(f) for j in jobs if j.rule.name == "run_cell" for f in j.output}
    found = []
    # cell files a pending table would read (not those about to be rewritten)
    tables = {j.wildcards.experiment for j in jobs if j.rule.name == "table"}
    found += preflight.unreadable_cells(
        p
        for p, c in CELLS.items()
        if c.experiment in tables and p not in rerun and Path(p).exists()
    )
    if pending & {"run_cell", "image", "image_sif"}:
        needs_gpu = PRESET["device"] == "cuda" and "run_cell" in pending
        found += preflight.problems(RUNNER, needs_gpu, local_host=workflow.local_exec)
    if rerun and workflow.local_exec:
        temp = Path(tempfile.gettempdir()) if RUNNER == "local" else None
        found += preflight.disk_problems(
            [CELLS[p] for p in rerun if p in CELLS], Path("results"), temp
        )
    if found:
        raise WorkflowError(
            "kvstudy preflight: cannot run this configuration:\n  - "
            + "\n  - ".join(found)
        )


def get_experiment_cells(wildcards) -> list[str]:
    return sorted(p for p, c in CELLS.items() if c.experiment == wildcards.experiment)


def get_figure_table(wildcards) -> str:
    return f"results/tables/{FIGURES[wildcards.figure]}.csv"


def get_all_tables(wildcards=None) -> list[str]:
    return [f"results/tables/{e}.csv" for e in EXPERIMENTS]


# figure -> the framework it is about: drawn only when this run has that framework's cells of its
# experiment (`frameworks=[infinigen]` has no hf engine-mode comparison to draw)
FIGURE_FRAMEWORK = {"engine_decode": "hf"}


def get_figures() -> list[str]:
    return [
        fig
        for fig, exp in FIGURES.items()
        if exp in EXPERIMENTS
        and (
            fig not in FIGURE_FRAMEWORK
            or any(
                c.experiment == exp and c.framework == FIGURE_FRAMEWORK[fig]
                for c in CELLS.values()
            )
        )
    ]


def get_caption(figure: str) -> str:
    # one caption per figure for the HTML report and `snakemake --report`: workflow/report/captions.yaml
    import yaml

    return yaml.safe_load(Path(REPO, "workflow/report/captions.yaml").read_text())[
        figure
    ]


def get_reference(wildcards=None) -> str:
    # config `reference`: a run folder, "none", or "" = the newest results/reference/<preset>-*/
    ref = config.get("reference", "")
    if ref == "none":
        return ""
    if ref:
        if not Path(ref).is_dir():
            raise WorkflowError(
                f"kvstudy: reference run {ref!r} is not a folder (config `reference`)"
            )
        return ref
    runs = sorted(Path("results/reference").glob(f"{config['preset']}-*/"))
    return str(runs[-1]) if runs else ""


def get_reference_cells(wildcards) -> list[str]:
    ref = get_reference()
    return sorted(str(p) for p in Path(ref).rglob("*.json")) if ref else []


def get_report_inputs(wildcards) -> dict:
    inputs = {
        "cells": sorted(CELLS),
        "tables": get_all_tables(),
        "figures": [f"results/figures/{fig}.png" for fig in get_figures()],
        "claims": "results/claims.csv",
        "guide": "results/guide/decision_guide.csv",
        "guide_png": "results/figures/decision_guide.png",
        "captions": "workflow/report/captions.yaml",
        "lib": "workflow/lib/report.py",
    }
    if get_reference():
        inputs["compare"] = "results/compare/reference.csv"
    return inputs


def get_all_targets() -> list[str]:
    # every cell is a target of its own: a deleted (or never written) result reruns even while
    # the table built from it exists
    targets = sorted(CELLS) + get_all_tables()
    for fig in get_figures():
        targets += [f"results/figures/{fig}.{ext}" for ext in ("pdf", "png")]
    return targets + ["results/claims.csv", "results/report/index.html"]
