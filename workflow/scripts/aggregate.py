"""Table rule: every cell result of one experiment -> results/tables/<experiment>.csv."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

from workflow.lib.tables import frame, row  # noqa: E402

with open(snakemake.log[0], "w") as log:  # noqa: F821
    df = frame([row(p) for p in snakemake.input.cells])  # noqa: F821
    df.sort_values(["framework", "model", "cell_id"]).to_csv(snakemake.output.table, index=False)  # noqa: F821
    print(f"{len(df)} cells: {df['status'].value_counts().to_dict()}", file=log)
