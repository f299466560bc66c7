"""A cell's processes die with their supervisor, whatever kills it (SIGKILL included).

A supervisor (run_cell, workflow.lib.launch) starts its child in a process group of its own, so
that it can kill the child and everything the child started (vLLM's engine processes, the docker
client). That group survives a SIGKILL of the supervisor: nothing forwards it. So next to the
group the supervisor starts a watchdog (`guard`): a tiny process in a session of its own, which
blocks on a pipe whose only write end the supervisor holds. When the supervisor dies, however it
dies, the kernel closes that end; the watchdog reads end-of-file, kills the group, runs a cleanup
command (`docker rm --force <name>`: a container does not die with its client) and removes the
supervisor's temp dir. A supervisor that finishes normally says "done" first and the watchdog
leaves quietly. Pure Python and idle, the watchdog reacts even when the cell hangs in a kernel.

The watchdog can be started before the child (`guard()` with no group, then `watch(pid)`), so
that no moment exists in which the temp dir or the container has a child but no watchdog: a kill
before `watch` leaves the child to PR_SET_PDEATHSIG (`die_with_parent`) and the watchdog still
removes the dir and runs the cleanup. The supervisor releases only after it has removed its dir.

Temp dirs of supervisors killed so hard that their watchdog died too (`kill -9 -1`, a lost
node) are removed by the next cell (`sweep_stale`): each supervisor holds a lock on a file in
its dir while it lives; a dir whose lock can be taken has no owner left.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

DONE = b"done"
LOCK_NAME = ".owner.lock"
TEMP_PREFIX = "kvstudy-cell-"


class Lifeline:
    def __init__(self, fd: int, watchdog: subprocess.Popen):
        self.fd, self.watchdog = fd, watchdog

    def watch(self, pgid: int) -> None:
        """Add process group `pgid` to what the watchdog kills when this process dies."""
        os.write(self.fd, f"{pgid}\n".encode())

    def release(self) -> None:
        """The supervisor has finished its group itself: the watchdog leaves without killing."""
        if self.fd < 0:
            return
        try:
            os.write(self.fd, DONE)
        finally:
            os.close(self.fd)
            self.fd = -1
        self.watchdog.wait()


def guard(pgid: int | None = None, cleanup: list[str] | None = None, remove: str | Path | None = None) -> Lifeline:
    """Kill process group `pgid` (and those given to `watch`), then run `cleanup` and remove
    `remove`, when this process dies."""
    r, w = os.pipe()  # not inheritable: only this process holds the write end
    argv = [sys.executable, "-m", "frameworks.harness.lifeline"] + ([str(pgid)] if pgid is not None else [])
    if remove:
        argv += ["--remove", str(remove)]
    if cleanup:
        argv += ["--", *cleanup]
    # a session of its own: a kill of the supervisor's process group does not reach it
    watchdog = subprocess.Popen(argv, stdin=r, stdout=subprocess.DEVNULL, start_new_session=True)
    os.close(r)
    return Lifeline(w, watchdog)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def die_with_parent() -> None:
    """preexec_fn of a supervised child: the kernel sends it SIGKILL the moment its supervisor dies
    (Linux PR_SET_PDEATHSIG), before the watchdog below has even started; elsewhere a no-op and the
    watchdog alone does it."""
    try:
        import ctypes
        import signal as _signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(_signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def make_temp_dir() -> tempfile.TemporaryDirectory:
    """A temp dir for one cell, locked by this process for its life; removes stale ones first."""
    sweep_stale()
    td = tempfile.TemporaryDirectory(prefix=TEMP_PREFIX)
    lock = os.open(Path(td.name) / LOCK_NAME, os.O_CREAT | os.O_WRONLY, 0o600)  # held until exit
    fcntl.flock(lock, fcntl.LOCK_EX)
    td._kvstudy_lock_fd = lock  # noqa: SLF001 - keeps the lock's fd alive with the dir
    return td


def sweep_stale(tmp: str | Path | None = None) -> list[Path]:
    """Remove this user's cell temp dirs whose supervisor is gone; returns what was removed."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        try:
            if not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            fd = os.open(d / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:  # no lock file: made before locks, or being made right now
            if _age_s(d) > 3600:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its supervisor is alive
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _age_s(p: Path) -> float:
    import time

    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)  # after `--`: the cleanup command
    ap = argparse.ArgumentParser(prog="lifeline", description="watchdog of a cell's process group (see guard())")
    ap.add_argument("pgid", type=int, nargs="?", help="a group to kill (more arrive on stdin, one per line)")
    ap.add_argument("--remove", help="directory to remove once the group is dead")
    args = ap.parse_args(argv[:cut])
    args.cleanup = argv[cut + 1:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    said = sys.stdin.buffer.read().split()  # blocks until the supervisor closes its end
    if said[-1:] == [DONE]:
        return 0
    for pgid in ([args.pgid] if args.pgid is not None else []) + [int(t) for t in said if t.isdigit()]:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if args.cleanup:
        try:
            subprocess.run(args.cleanup, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            pass
    if args.remove:
        shutil.rmtree(args.remove, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
