"""A stale Snakemake lock (its run was killed) is removed; a live run's lock is kept."""

import subprocess
import sys

from workflow.lib import lock


def locked(tmp_path):
    d = tmp_path / ".snakemake" / "locks"
    d.mkdir(parents=True)
    (d / "0.input.lock").write_text("results/cells/a.json\n")
    (d / "0.output.lock").write_text("results/cells/a.json\n")
    return d


def test_stale_lock_is_removed(tmp_path):
    d = locked(tmp_path)
    msg = lock.clear_stale(tmp_path)
    assert "removed Snakemake's lock left by a run that was killed (2 file(s)" in msg
    assert not list(d.iterdir())
    assert lock.clear_stale(tmp_path) is None  # nothing left to do


def test_lock_of_a_live_snakemake_in_the_folder_is_kept(tmp_path):
    d = locked(tmp_path)
    fake = tmp_path / "bin" / "snakemake"  # a process that looks like `python .venv/bin/snakemake`
    fake.parent.mkdir()
    fake.write_text("import sys, time\nprint(1, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, str(fake)], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        p.stdout.readline()
        msg = lock.clear_stale(tmp_path)
        assert f"Snakemake (pid {p.pid}) is running in {tmp_path}; its lock is kept" in msg
        assert len(list(d.iterdir())) == 2
    finally:
        p.kill()
        p.wait()


def test_snakemake_command_lines_are_recognised():
    assert lock.is_snakemake(["/x/.venv/bin/python", "/x/.venv/bin/snakemake", "--cores", "all"])
    assert lock.is_snakemake(["python", "-m", "snakemake", "-n"])
    assert lock.is_snakemake([".venv/bin/snakemake"])
    assert not lock.is_snakemake(["python", "-m", "workflow.lib.status", "--config", "snakemake"])
