"""Figure: peak memory vs batch size per framework (paper C2)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
P.lines_per_model(df, "batch_size", "mem_gb", "batch size (sequences)", P.mem_label(df), snakemake)  # noqa: F821
