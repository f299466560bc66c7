import os
import shutil
import subprocess
import sys
from pathlib import Path

# Without a GPU, Triton kernels (frameworks/infinigen/kernels.py) run in Triton's interpreter; the
# variable is read when a kernel is defined, so it is set before any test module imports one.
if not Path("/dev/nvidia0").exists() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

REPO = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path) -> Path:
    """The working tree as git sees it (tracked + untracked, not ignored): a fresh checkout."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def snakemake(repo: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    return copy_repo(tmp_path / "repo")
