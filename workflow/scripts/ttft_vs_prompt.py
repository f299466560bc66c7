"""Figure: TTFT vs prompt length per framework and prefill mode; OOM points marked (paper C5)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib import plotting as P  # noqa: E402

df = P.load(snakemake.input.table)  # noqa: F821
P.lines_per_model(df, "prompt_len", "ttft_ms_mean", "prompt length (tokens)", "TTFT (ms, mean)", snakemake, logy=True)  # noqa: F821
