# One job per experiment cell: run it, write its result JSON (ok / oom / timeout / unsupported).
rule run_cell:
    input:
        code=get_framework_code,
    output:
        result="results/cells/{experiment}/{framework}/{model}/{cell}.json",
    log:
        "logs/cells/{experiment}/{framework}/{model}/{cell}.log",
    benchmark:
        "logs/benchmarks/cells/{experiment}/{framework}/{model}/{cell}.tsv"
    threads: get_cell_threads
    resources:
        gpu=get_cell_gpus,
    params:
        spec=get_cell_spec,
        launcher=get_launcher,
        # relative to the working directory: moving the checkout must not rerun every cell
        repo=os.path.relpath(REPO),
        python=PYTHON,
    shell:
        "PYTHONPATH={params.repo:q}${{PYTHONPATH:+:$PYTHONPATH}} "
        "{params.launcher} {params.python:q} -m frameworks.harness.run_cell "
        "--spec {params.spec:q} --out {output.result:q} --threads {threads} > {log:q} 2>&1"
