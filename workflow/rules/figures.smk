# Figures (PDF + PNG), one script per figure: workflow/scripts/<figure>.py.
rule figure:
    input:
        table=get_figure_table,
        lib="workflow/lib/plotting.py",  # shared by every figure script: a change redraws them
    output:
        pdf="results/figures/{figure}.pdf",
        png=report(
            "results/figures/{figure}.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
    log:
        "logs/figures/{figure}.log",
    wildcard_constraints:
        figure="|".join(FIGURES),
    params:
        caption=lambda wildcards: get_caption(wildcards.figure),  # workflow/report/captions.yaml
    script:
        "../scripts/{wildcards.figure}.py"


# A target rule per figure: `snakemake --cores all fig_<figure>` makes just that figure.
for _fig, _exp in FIGURES.items():

    rule:
        name:
            f"fig_{_fig}"
        input:
            expand("results/figures/{figure}.{ext}", figure=_fig, ext=("pdf", "png")),
