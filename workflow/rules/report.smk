# The reviewer's page: claims C1-C7, the decision guide, the comparison with a reference run, and
# one self-contained HTML report of it all (results/report/index.html, part of `all`).


# C1-C7 judged on this run's tables (workflow/lib/claims.py).
rule claims:
    input:
        tables=get_all_tables,
        lib="workflow/lib/claims.py",
    output:
        csv="results/claims.csv",
    log:
        "logs/report/claims.log",
    script:
        "../scripts/claims.py"


# Which configuration meets a memory limit and latency SLOs with the most throughput (workflow/lib/guide.py).
rule decision_guide:
    input:
        tables=get_all_tables,
        lib=["workflow/lib/guide.py", "workflow/lib/plotting.py"],
    output:
        csv="results/guide/decision_guide.csv",
        pdf="results/figures/decision_guide.pdf",
        png=report(
            "results/figures/decision_guide.png",
            caption="../report/figure.rst",
            category="Decision guide",
        ),
    log:
        "logs/report/decision_guide.log",
    params:
        caption=lambda wildcards: get_caption("decision_guide"),
    script:
        "../scripts/decision_guide.py"


# This run vs the reference run (config `reference`): `make compare REF=...` does the same by hand.
rule compare_reference:
    input:
        cells=lambda wildcards: sorted(CELLS),
        reference=get_reference_cells,
        lib="workflow/lib/compare.py",
    output:
        csv="results/compare/reference.csv",
    log:
        "logs/report/compare_reference.log",
    params:
        reference=get_reference,
    shell:
        '"$KVSTUDY_PYTHON" -m workflow.lib.compare --ref {params.reference:q} --run results/cells '
        "--out {output.csv:q} > {log:q} 2>&1"


# The HTML report (`snakemake --cores all report` makes just it): setup, repeatability, claims, guide, figures with captions, comparison, failed cells.
rule report:
    input:
        unpack(get_report_inputs),
    output:
        html="results/report/index.html",
    log:
        "logs/report/report.log",
    params:
        reference=get_reference,
    script:
        "../scripts/report.py"
