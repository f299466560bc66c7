"""Figure: output throughput vs batch size per framework (paper C1, C3, C4)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
P.lines_per_model(df, "batch_size", "output_tok_s", "batch size (sequences)", "output throughput (tok/s)", snakemake, logy=True)  # noqa: F821
