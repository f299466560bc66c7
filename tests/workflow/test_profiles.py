"""The SLURM profile: a dry-run through the SLURM executor plugin plans every cell as a 1-GPU job."""

import importlib.util
import re

import pytest

from tests.conftest import snakemake


@pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                    reason="snakemake-executor-plugin-slurm not installed (pip install -e '.[dev]')")
def test_slurm_profile_dry_run(repo_copy):
    p = snakemake(repo_copy, "-n", "--workflow-profile", "profiles/slurm", "--config", "preset=paper",
                  "runner=apptainer")
    assert p.returncode == 0, p.stderr[-3000:]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", p.stdout, re.M)}
    assert counts["image"] == 5 and counts["image_sif"] == 4 and counts["run_cell"] > 100
    assert "slurm_partition=gpu" in p.stdout and "gpu=1" in p.stdout
    assert "runtime=65" in p.stdout  # the cells' own limit: timeout_s 3600 + the launcher's 300 s
    # what needs no GPU asks for the cpu partition: every job of these rules, by its resources line
    for rule in ("table", "figure", "claims", "decision_guide", "report"):
        blocks = re.findall(rf"^(?:local)?rule {rule}:\n((?:    .*\n)+)", p.stdout, re.M)
        assert blocks and all("slurm_partition=cpu" in b for b in blocks), (rule, blocks[:1])
