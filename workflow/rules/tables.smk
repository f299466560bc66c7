# One tidy CSV per experiment: a row per cell, with its status, spec and summary metrics.
rule table:
    input:
        cells=get_experiment_cells,
        lib="workflow/lib/tables.py",  # the row definition: a change rebuilds every table
    output:
        table="results/tables/{experiment}.csv",
    log:
        "logs/tables/{experiment}.log",
    script:
        "../scripts/aggregate.py"
