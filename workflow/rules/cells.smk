# One job per experiment cell: run it, write its result JSON (ok / oom / timeout / unsupported).
rule run_cell:
    input:
        code=get_framework_code,
        image=get_cell_image,
    output:
        result="results/cells/{experiment}/{framework}/{model}/{cell}.json",
    log:
        "logs/cells/{experiment}/{framework}/{model}/{cell}.log",
    benchmark:
        "logs/benchmarks/cells/{experiment}/{framework}/{model}/{cell}.tsv"
    threads: get_cell_threads
    resources:
        gpu=get_cell_gpus,
        cpu_exclusive=get_cell_cpu_exclusive,  # timed CPU cells one at a time (profile: cpu_exclusive=1)
    params:
        spec=get_cell_spec,
        launch=get_launch_options,
    shell:
        # workflow/lib/launch.py runs the same run-cell arguments locally, in docker or apptainer,
        # on a GPU of its own
        '"$KVSTUDY_PYTHON" -m workflow.lib.launch {params.launch} --gpus {resources.gpu} -- '
        "--spec {params.spec:q} --out {output.result:q} --threads {threads} > {log:q} 2>&1"
