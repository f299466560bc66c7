# Config -> cell table, and the input functions every rule uses.
import shlex
import sys
from pathlib import Path

# frameworks/ and workflow/ importable without installing
REPO = workflow.basedir
sys.path.insert(0, REPO)
# Every job runs this interpreter with this checkout first on its path. Set through the shell
# prefix, not params: interpreter and checkout paths differ between machines and invocations
# (`snakemake` vs `python -m snakemake`), and a param change would rerun every cell.
shell.prefix(
    "set -euo pipefail; "
    f"export KVSTUDY_PYTHON={shlex.quote(sys.executable)}; "
    # (Snakemake formats the prefix too: doubled braces reach the shell single)
    f"export PYTHONPATH={shlex.quote(REPO)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)

from snakemake.exceptions import WorkflowError

from frameworks.harness.spec import CellSpec
from workflow.lib import celltable, images, preflight

try:
    PRESET = celltable.load_preset(config.get("preset", ""))
    CELLS = celltable.build_cells(config, PRESET)
except celltable.ConfigError as e:
    raise WorkflowError(f"kvstudy: {e}") from None

EXPERIMENTS = sorted({c.experiment for c in CELLS.values()})
RUNNER = config["runner"]
IMAGE_CONFIG = config.get("images") or {}

# figure -> the experiment whose table it plots (one script per figure: workflow/scripts/<figure>.py)
FIGURES = {
    "ttft_vs_prompt": "ttft_prompt",
    "throughput_vs_batch": "batch",
    "memory_vs_batch": "batch",
    "tok_s_per_gb_vs_batch": "batch",
    "model_size": "model_size",
    "latency_vs_rate": "request_rate",
    "metrics_vs_kv_budget": "kv_budget",
    "metrics_vs_alpha": "alpha",
}


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
            f"kvstudy: {path} is not a cell of preset {config['preset']!r} with this config; "
            "list the cells with `snakemake -n`, or pick the preset with --config preset=<name>"
        ) from None


def get_cell_spec(wildcards) -> str:
    return get_cell(wildcards).to_json()


def get_cell_threads(wildcards) -> int:
    threads = PRESET["cell_threads"]
    return workflow.cores if threads == "all" else min(threads, workflow.cores)


def get_cell_gpus(wildcards) -> int:
    return 1 if PRESET["device"] == "cuda" else 0


def get_cell_cpu_exclusive(wildcards) -> int:
    # a CPU cell times the cores it runs on: two at once would time each other
    return 1 if PRESET["device"] == "cpu" else 0


def get_framework_code(wildcards) -> list[str]:
    # a cell depends on the code that runs it: what its framework's image copies (images.COPIES)
    image = images.image_of(wildcards.framework)
    base = images.code_files("engine") if image in images.ENGINE_IMAGES else []
    return sorted({*base, *images.code_files(image)})


def get_cell_image(wildcards) -> list[str]:
    # every cell depends on its framework's image (docker: its id; apptainer: the .sif)
    ext = {"local": None, "docker": "iid", "apptainer": "sif"}[RUNNER]
    return (
        [f"results/images/{images.image_of(wildcards.framework)}.{ext}"] if ext else []
    )


def get_launch_options(wildcards) -> str:
    # runner and image only: relative, machine-independent (GPU, uid, paths: decided at run time)
    image = get_cell_image(wildcards)
    return f"--runner {RUNNER}" + (f" --image {image[0]}" if image else "")


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
    # onstart: real runs only (never `snakemake -n`), and only if cells or images are to be made
    pending = {job.rule.name for job in workflow.dag.needrun_jobs()}
    if not pending & {"run_cell", "image", "image_sif"}:
        return
    needs_gpu = PRESET["device"] == "cuda" and "run_cell" in pending
    found = preflight.problems(RUNNER, needs_gpu, local_host=workflow.local_exec)
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


def get_figures() -> list[str]:
    return [fig for fig, exp in FIGURES.items() if exp in EXPERIMENTS]


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
    targets = get_all_tables()
    for fig in get_figures():
        targets += [f"results/figures/{fig}.{ext}" for ext in ("pdf", "png")]
    return targets + ["results/claims.csv", "results/report/index.html"]
