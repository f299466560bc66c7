"""The GPU allocator on fake GPU lists: one cell per GPU, queueing, crash safety."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from workflow.lib import gpus

HOLD = """
import json, sys, time
from pathlib import Path
from workflow.lib import gpus
c = gpus.claim(sys.argv[1].split(","), Path(sys.argv[2]), poll_s=0.05)
t0 = time.time(); time.sleep(float(sys.argv[3])); t1 = time.time()
print(json.dumps({"gpu": c.gpu, "start": t0, "end": t1}))
"""


def hold(gpu_list, lock_dir, seconds):
    return subprocess.Popen([sys.executable, "-c", HOLD, ",".join(gpu_list), str(lock_dir), str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def test_discover_prefers_explicit_lists():
    assert gpus.discover({"KVSTUDY_GPUS": "a,b", "CUDA_VISIBLE_DEVICES": "0"}) == ["a", "b"]
    assert gpus.discover({"CUDA_VISIBLE_DEVICES": "GPU-1, GPU-2"}) == ["GPU-1", "GPU-2"]
    assert gpus.discover({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpus.discover({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_each_claim_gets_a_distinct_gpu_until_none_is_left(tmp_path):
    a = gpus.try_claim(["0", "1"], tmp_path)
    b = gpus.try_claim(["0", "1"], tmp_path)
    assert {a.gpu, b.gpu} == {"0", "1"}
    assert gpus.try_claim(["0", "1"], tmp_path) is None
    a.release()
    c = gpus.try_claim(["0", "1"], tmp_path)
    assert c.gpu == a.gpu
    b.release(), c.release()


def test_no_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(gpus.NoGPU, match="preset=smoke"):
        gpus.claim([], tmp_path)


def test_more_cells_than_gpus_queue_and_never_share(tmp_path):
    procs = [hold(["g0", "g1"], tmp_path, 0.6) for _ in range(5)]
    runs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    for g in ("g0", "g1"):
        spans = sorted((r["start"], r["end"]) for r in runs if r["gpu"] == g)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:])), spans  # never two at once
    assert {r["gpu"] for r in runs} == {"g0", "g1"}
    # two GPUs: at some moment two cells ran at once
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for a in runs for b in runs if a is not b)


def test_a_killed_holder_frees_its_gpu(tmp_path):
    p = hold(["only"], tmp_path, 60)
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until the child holds it
        c = gpus.try_claim(["only"], tmp_path)
        if c is None:
            break
        c.release()
        time.sleep(0.05)
    assert gpus.try_claim(["only"], tmp_path) is None
    os.kill(p.pid, signal.SIGKILL)  # a crash: no cleanup code runs
    p.wait()
    c = gpus.claim(["only"], tmp_path, timeout_s=5, poll_s=0.05)
    assert c.gpu == "only"
    c.release()


def test_a_child_keeps_the_claim_of_a_dead_parent(tmp_path):
    c = gpus.try_claim(["x"], tmp_path)
    child = subprocess.Popen(["sleep", "30"], pass_fds=(c.fd,))
    c.release()  # the launcher is gone, its cell (the child) still runs on the GPU
    try:
        assert gpus.try_claim(["x"], tmp_path) is None
    finally:
        child.kill(), child.wait()
    assert gpus.try_claim(["x"], tmp_path) is not None
