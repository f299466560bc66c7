"""A supervised process group dies with its supervisor, even when the supervisor gets SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from frameworks.harness import lifeline
from tests.conftest import REPO

SUPERVISOR = """
import subprocess, sys, time
from frameworks.harness import lifeline
child = subprocess.Popen(["sleep", "600"], start_new_session=True)
line = lifeline.guard(child.pid, cleanup=["touch", sys.argv[1]], remove=sys.argv[2])
print(child.pid, flush=True)
if sys.argv[3] == "release":
    child.kill(); child.wait(); line.release(); print("released", flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose (its parent, the killed supervisor, never reaps it)
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def start(tmp_path, mode):
    marker, scratch = tmp_path / "cleaned", tmp_path / "scratch"
    scratch.mkdir()
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(marker), str(scratch), mode], cwd=REPO,
                           stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(sup.stdout.readline())
    return sup, child, marker, scratch


def test_sigkill_of_the_supervisor_kills_its_group_and_cleans_up(tmp_path):
    sup, child, marker, scratch = start(tmp_path, "hold")
    assert alive(child)
    sup.send_signal(signal.SIGKILL)
    sup.wait()
    deadline = time.time() + 5
    while time.time() < deadline and (alive(child) or not marker.exists() or scratch.exists()):
        time.sleep(0.05)
    assert not alive(child) and marker.exists() and not scratch.exists()


def test_released_lifeline_leaves_quietly(tmp_path):
    sup, child, marker, scratch = start(tmp_path, "release")
    assert sup.stdout.readline().strip() == "released"
    sup.kill()
    sup.wait()
    time.sleep(0.5)
    assert not marker.exists() and scratch.exists()  # no cleanup after a normal end


def test_sweep_removes_only_dirs_whose_owner_is_gone(tmp_path):
    live = tempfile_dir(tmp_path, "live")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print(1, flush=True); time.sleep(60)",
                               str(live / lifeline.LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        dead = tempfile_dir(tmp_path, "dead")  # its lock file is there, nobody holds it
        assert lifeline.sweep_stale(tmp_path) == [dead]
        assert live.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()


def tempfile_dir(tmp: Path, name: str) -> Path:
    d = tmp / f"{lifeline.TEMP_PREFIX}{name}"
    d.mkdir()
    (d / lifeline.LOCK_NAME).touch()
    (d / "record.json").write_text("{}")
    return d


EARLY = """
import subprocess, sys, time
from frameworks.harness import lifeline
line = lifeline.guard(cleanup=["touch", sys.argv[1]], remove=sys.argv[2])  # before any child
if sys.argv[3] == "watch":
    kids = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(2)]  # only `watch` kills these
    for k in kids:
        line.watch(k.pid)
    print(*[k.pid for k in kids], flush=True)
else:
    print(flush=True)
time.sleep(600)
"""


def test_a_watchdog_started_before_the_child_cleans_up_at_any_moment(tmp_path):
    """Killed before any child was started, the dir still goes and the cleanup runs; killed after
    `watch`, every watched group dies too (run_cell and the launcher start the watchdog first)."""
    for mode in ("none", "watch"):
        marker, scratch = tmp_path / f"cleaned-{mode}", tmp_path / f"scratch-{mode}"
        scratch.mkdir()
        sup = subprocess.Popen([sys.executable, "-c", EARLY, str(marker), str(scratch), mode], cwd=REPO,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        kids = [int(p) for p in sup.stdout.readline().split()]
        assert len(kids) == (2 if mode == "watch" else 0) and all(alive(k) for k in kids)
        sup.send_signal(signal.SIGKILL)
        sup.wait()
        deadline = time.time() + 5
        while time.time() < deadline and (any(alive(k) for k in kids) or not marker.exists() or scratch.exists()):
            time.sleep(0.05)
        assert not any(alive(k) for k in kids) and marker.exists() and not scratch.exists(), mode
