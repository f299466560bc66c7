"""Report rule: tables, claims, guide, figures and the comparison -> results/report/index.html."""

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1]))  # noqa: F821 - Snakemake's script object

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from workflow.lib import report  # noqa: E402
from workflow.lib.tables import frame, row  # noqa: E402

smk = snakemake  # noqa: F821
out = Path(smk.output.html)
cells, provenance = [], []
for p in smk.input.cells:
    r = json.loads(Path(p).read_text())
    provenance.append({**r["provenance"], "_started": r["started_at"], "_ended": r["ended_at"]})
    cells.append(row(p))
cells = frame(cells)
captions = yaml.safe_load(Path(smk.input.captions).read_text())
figures = [(Path(p).stem, Path(p), captions.get(Path(p).stem, "")) for p in [*smk.input.figures, smk.input.guide_png]]
compare = pd.read_csv(smk.input.compare) if smk.input.get("compare") else None
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def rel(p: str) -> str:  # links from the report to the CSVs next to it
    return os.path.relpath(p, out.parent)


links = {"claims": rel(smk.input.claims), "guide": rel(smk.input.guide)}
if compare is not None:
    links["compare"] = rel(smk.input.compare)
page = report.build(preset=smk.config["preset"], cells=cells, provenance=provenance,
                    claims=pd.read_csv(smk.input.claims).fillna(""), guide=pd.read_csv(smk.input.guide),
                    guide_png=Path(smk.input.guide_png), figures=figures, compare=compare,
                    reference=smk.params.reference or None, report_commit=commit, links=links)
out.write_text(page)
with open(smk.log[0], "w") as log:
    print(f"{out}: {len(cells)} cells, {len(figures)} figures, reference {smk.params.reference or 'none'}, "
          f"{len(page) // 1024} KiB", file=log)
