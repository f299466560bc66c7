# kvstudy: KV cache management strategies for LLM inference (arXiv 2604.05012).
# config -> cell table -> framework images -> one job per cell -> results/cells/**.json -> tables -> figures
# -> claims, decision guide, comparison with a reference run -> results/report/index.html.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/images.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/cells.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


# Before any image build or cell (not in a dry-run): Docker, NVIDIA runtime, GPUs present.
onstart:
    run_preflight()


# Default target: every table and figure of the selected preset, the claims and the HTML report.
rule all:
    default_target: True
    input:
        get_all_targets(),
