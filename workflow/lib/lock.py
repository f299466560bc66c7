"""Remove Snakemake's lock when the run that took it is dead (a hard kill, a lost machine).

    python -m workflow.lib.lock        (make smoke / paper / status run it first)

Snakemake locks the working directory's outputs while it runs and removes the lock when it
ends; a SIGKILL leaves the lock behind, and the next run stops with a LockException until
someone runs `snakemake --unlock`. The lock is stale when no Snakemake process has this folder
as its working directory: then this removes it (what `--unlock` does) and says so. While a
Snakemake runs here the lock is left alone, and its pid is named.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def lock_files(workdir: Path) -> list[Path]:
    d = workdir / ".snakemake" / "locks"
    return sorted(p for p in d.glob("*.lock") if p.is_file()) if d.is_dir() else []


def is_snakemake(cmdline: list[str]) -> bool:
    # `.venv/bin/snakemake …`, `python .venv/bin/snakemake …`, `python -m snakemake …`
    head = cmdline[:3]
    return any(Path(a).name == "snakemake" for a in head) or "-m" in head and "snakemake" in head


def live_snakemakes(workdir: Path) -> list[int]:
    """Pids of the Snakemake processes whose working directory is `workdir` (not this one)."""
    workdir = workdir.resolve()
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and is_snakemake(p.info["cmdline"] or []) and Path(p.cwd()).resolve() == workdir:
                pids.append(p.pid)
        except (psutil.Error, OSError):  # gone meanwhile, or another user's process
            continue
    return pids


def clear_stale(workdir: Path = REPO) -> str | None:
    """Remove a stale lock; returns what was done (None: no lock)."""
    locks = lock_files(workdir)
    if not locks:
        return None
    live = live_snakemakes(workdir)
    if live:
        return (f"kvstudy: Snakemake (pid {', '.join(map(str, live))}) is running in {workdir}; its lock is kept: "
                "wait for it to finish, or stop it")
    for p in locks:
        p.unlink(missing_ok=True)
    return (f"kvstudy: removed Snakemake's lock left by a run that was killed ({len(locks)} file(s) in "
            f"{locks[0].parent.relative_to(workdir)}; no Snakemake runs in this folder)")


def main() -> int:
    msg = clear_stale(Path.cwd())
    if msg:
        print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
