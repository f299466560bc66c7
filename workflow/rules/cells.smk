# One job per experiment cell: run it, write its result JSON (ok / oom / timeout / unsupported).
rule run_cell:
    input:
        code=get_framework_code,
        image=get_cell_image,
        weights=get_cell_weights,
    output:
        result="results/cells/{experiment}/{framework}/{model}/{cell}.json",
    log:
        "logs/cells/{experiment}/{framework}/{model}/{cell}.log",
    benchmark:
        "logs/benchmarks/cells/{experiment}/{framework}/{model}/{cell}.tsv"
    threads: get_cell_threads
    resources:
        gpu=get_cell_gpus,
        runtime=get_cell_runtime_min,
        torch_threads=get_cell_torch_threads,  # not a param: a change of --cores reruns nothing
    params:
        spec=get_cell_spec,
        launch=get_launch_options,
    shell:
        # workflow/lib/launch.py runs the same run-cell arguments locally, in docker or apptainer,
        # on a GPU of its own (GPU cells) or pinned to {threads} cores of its own (CPU cells)
        '"$KVSTUDY_PYTHON" -m workflow.lib.launch {params.launch} --gpus {resources.gpu} --cpus {threads} --cpu-timing "$KVSTUDY_CPU_TIMING" -- '
        "--spec {params.spec:q} --out {output.result:q} --threads {resources.torch_threads} > {log:q} 2>&1"


# A cell path this run does not have (another preset's, filtered out, in no sweep): its input
# function stops the run naming the preset and filters chosen and how to include the cell,
# instead of Snakemake's "No rule to produce". Never runs.
rule unknown_cell:
    input:
        get_unknown_cell,
    output:
        "results/cells/{path}.json",
    log:
        "logs/cells/{path}.unknown.log",
    shell:
        "exit 1"


ruleorder: run_cell > unknown_cell
