"""cpu_timing: pause (frameworks/harness/pause.py): while a cell holds the CPU timing lock, the
other registered process trees are stopped and resumed after, even when the holder is killed."""

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from frameworks.harness import cputime, pause

if not Path("/proc/self/stat").exists():
    pytest.skip("needs Linux /proc", allow_module_level=True)

# a cell-like tree: a root that starts a child; both print their pid, then sleep
TREE = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)
""")


def state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def wait_state(pid: int, want: bool, timeout_s: float = 10.0) -> bool:
    """True once pid is (want=True) or is no longer (want=False) stopped."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if (state(pid) == "T") == want:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def tree():
    procs = []

    def start():
        p = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
        child = int(p.stdout.readline())
        procs.append((p, child))
        return p.pid, child

    yield start
    for p, child in procs:
        for pid in (child, p.pid):
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()


@pytest.fixture
def lock_env(tmp_path, monkeypatch):
    lock = tmp_path / cputime.FILE_NAME
    monkeypatch.setenv(cputime.ENV, str(lock))
    monkeypatch.setenv(cputime.MODE_ENV, "pause")
    # the holder's own root: not this test process, whose children are the trees under test
    # (a pid that has ended: an own tree of nothing but the holder, which is never stopped)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv(pause.ROOT_ENV, str(gone.pid))
    monkeypatch.setenv("KVSTUDY_CPU_LOCK_DIR", str(tmp_path / "cores"))
    return lock


def test_other_tree_is_stopped_while_timing_and_resumed_after(lock_env, tree):
    root, child = tree()
    pause.register(cputime.registry(str(lock_env)), root)
    with cputime.exclusive("cpu"):
        assert state(root) == "T" and state(child) == "T"
    assert wait_state(root, False) and wait_state(child, False)
    assert cputime.LAST["mode"] == "pause" and cputime.LAST["paused_processes"] == 2
    assert cputime.LAST["paused_cells"] == 1
    assert pause.stopped_s(cputime.registry(str(lock_env)), root) > 0  # the stopped cell's provenance


def test_lock_mode_and_gpu_cells_stop_nothing(lock_env, tree, monkeypatch):
    root, child = tree()
    pause.register(cputime.registry(str(lock_env)), root)
    with cputime.exclusive("cuda"):
        assert state(root) != "T"
    monkeypatch.setenv(cputime.MODE_ENV, "lock")
    with cputime.exclusive("cpu"):
        time.sleep(2 * pause.SCAN_S)
        assert state(root) != "T" and state(child) != "T"
    assert cputime.LAST == {"mode": "lock", "waited_s": cputime.LAST["waited_s"]}


def test_own_tree_is_never_stopped(lock_env, tree, monkeypatch):
    # the holder's root is registered as any cell's; a tree under it (its vLLM engine core) runs on
    root, child = tree()
    reg = cputime.registry(str(lock_env))
    pause.register(reg, os.getpid())
    pause.register(reg, root)
    monkeypatch.setenv(pause.ROOT_ENV, str(os.getpid()))
    with cputime.exclusive("cpu"):
        time.sleep(2 * pause.SCAN_S)
        assert state(root) != "T" and state(child) != "T"  # both are this test's own descendants
    assert cputime.LAST["paused_processes"] == 0


def test_killed_holder_still_resumes_the_others(lock_env, tree):
    root, child = tree()
    pause.register(cputime.registry(str(lock_env)), root)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from frameworks.harness import cputime
        with cputime.exclusive("cpu"):
            print("timing", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, pause.ROOT_ENV: ""})
    try:
        assert holder.stdout.readline().strip() == "timing"
        assert state(root) == "T" and state(child) == "T"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert wait_state(root, False) and wait_state(child, False), "a killed holder left a tree stopped"
    finally:
        holder.kill()
        holder.wait()
    # and the lock is free again once the sidecar resumed everyone
    fd = os.open(lock_env, os.O_RDWR)
    try:
        end = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < end, "the timing lock stayed taken after its holder died"
                time.sleep(0.05)
    finally:
        os.close(fd)


def test_stale_and_reused_registrations_are_ignored_and_removed(lock_env, tree):
    reg = cputime.registry(str(lock_env))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live, _ = tree()
    pause.register(reg, live)
    (reg / str(dead.pid)).write_text("123")  # a cell that ended without removing its entry
    root, child = tree()
    (reg / str(root)).write_text("1")  # its pid now belongs to another process (start time differs)
    assert pause.roots(reg) == [(live, pause._stat(live)[1])]
    assert not (reg / str(dead.pid)).exists() and not (reg / str(root)).exists()
    with cputime.exclusive("cpu"):
        assert state(live) == "T"
        assert state(root) != "T" and state(child) != "T"


def test_tree_holding_a_foreign_file_lock_is_not_stopped(lock_env, tree, tmp_path):
    # a stopped Inductor cache lock would hang the holder's own compile: such a tree runs on
    cache = tmp_path / "inductor" / "cache.lock"  # not in a folder of our own lock files
    cache.parent.mkdir()
    held = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(cache)!r}, os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    root, _ = tree()
    try:
        assert held.stdout.readline().strip() == "locked"
        reg = cputime.registry(str(lock_env))
        pause.register(reg, held.pid)
        pause.register(reg, root)
        with cputime.exclusive("cpu"):
            assert state(held.pid) != "T" and state(root) == "T"
    finally:
        held.kill()
        held.wait()


def test_killed_holder_resumes_the_others_even_if_its_child_keeps_the_release_pipe(lock_env, tree):
    # a process forked while timing (no exec) holds the release pipe open: the holder's death
    # itself (its pidfd) must end the pause
    root, child = tree()
    pause.register(cputime.registry(str(lock_env)), root)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, time
        from frameworks.harness import cputime
        with cputime.exclusive("cpu"):
            kid = os.fork()
            if kid == 0:
                time.sleep(120)
                os._exit(0)
            print(kid, flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, pause.ROOT_ENV: ""})
    kid = int(holder.stdout.readline())
    try:
        assert state(root) == "T"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert wait_state(root, False) and wait_state(child, False), "a killed holder left a tree stopped"
    finally:
        holder.kill()
        holder.wait()
        os.kill(kid, signal.SIGKILL)


def test_tree_holding_only_a_cell_owner_lock_is_stopped(lock_env, tree, tmp_path, monkeypatch):
    # every cell's supervisor holds its temp dir's owner lock (lifeline.py) for its whole life:
    # one of the pipeline's own locks, no reason to leave the cell running
    from frameworks.harness import lifeline

    tmp = tmp_path / "tmp"
    owner = tmp / f"{lifeline.TEMP_PREFIX}x" / lifeline.LOCK_NAME
    owner.parent.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(tmp))  # the sidecar's tempfile.gettempdir()
    held = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(owner)!r}, os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "locked"
        pause.register(cputime.registry(str(lock_env)), held.pid)
        with cputime.exclusive("cpu"):
            assert state(held.pid) == "T"
        assert wait_state(held.pid, False)
    finally:
        os.kill(held.pid, signal.SIGCONT)
        held.kill()
        held.wait()
