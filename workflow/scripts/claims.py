"""Claims rule: C1-C7 judged on this run's tables -> results/claims.csv (workflow/lib/claims.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

import pandas as pd  # noqa: E402

from workflow.lib import claims  # noqa: E402

smk = snakemake  # noqa: F821
tables = {Path(p).stem: pd.read_csv(p) for p in smk.input.tables}
out = claims.judge(tables)
out.to_csv(smk.output.csv, index=False)
with open(smk.log[0], "w") as log:
    print(f"tables: {sorted(tables)}", file=log)
    for _, r in out.iterrows():
        print(f"{r['claim']}: {r['verdict']}: {r['evidence']} {('missing: ' + r['missing']) if r['missing'] else ''}", file=log)
