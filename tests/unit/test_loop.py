"""The one measurement loop (frameworks/harness/loop.py) and the process-tree RSS."""

import json
import os
import subprocess
import sys
import time

import pytest

from frameworks.harness import loop
from frameworks.harness.memory import MemoryMonitor
from frameworks.harness.spec import CellSpec


def spec(**kw):
    d = dict(experiment="t", framework="hf", model="llama-tiny", batch_size=2, prompt_len=8, gen_len=6,
             warmup=2, repetitions=3, device="cpu")
    d.update(kw)
    return CellSpec(**d)


def test_measure_order_and_counts():
    calls = []
    s = spec()
    m = loop.measure(s, lambda w: calls.append(("warm", w)), lambda r: (calls.append(("rep", r)) or ([r], r + 1.0)),
                     MemoryMonitor("cpu"), before_measure=lambda: calls.append(("before",)))
    assert calls == [("warm", 0), ("warm", 1), ("before",), ("rep", 0), ("rep", 1), ("rep", 2)]
    assert m.timings == [0, 1, 2] and m.rep_durations_s == [1.0, 2.0, 3.0]
    assert m.memory["peak_rss_gb"] > 0 and m.memory["peak_gpu_mem_gb"] is None
    assert loop.warmup_gen_len(s) == 6  # CPU: the whole length
    assert loop.warmup_gen_len(spec(device="cuda")) == 4 and loop.warmup_gen_len(spec(device="cuda", gen_len=2)) == 2


def test_repetitions_run_without_the_cyclic_gc_and_collect_between():
    import gc

    class Cycle:
        def __init__(self):
            self.me = self

    seen = []

    def rep(r):
        Cycle()  # garbage only the cyclic collector frees
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0, sum(isinstance(o, Cycle) for o in gc.get_objects())))
        return [r], 1.0

    assert gc.isenabled()
    warm = []
    loop.measure(spec(repetitions=3), lambda w: warm.append(gc.get_freeze_count() > 0), rep, MemoryMonitor("cpu"))
    # disabled in every repetition, the heap before them frozen; each starts with the previous one's cycle collected
    assert seen == [(False, True, 1)] * 3 and gc.isenabled() and gc.get_freeze_count() == 0
    assert warm and all(warm)  # frozen before the warm-up: its full collection is not the first repetition's cold start
    with pytest.raises(RuntimeError):  # enabled again whatever ends a repetition
        loop.measure(spec(), lambda w: None, lambda r: (_ for _ in ()).throw(RuntimeError("x")), MemoryMonitor("cpu"))
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_requests_same_draw_for_every_framework():
    a, none = loop.requests(spec(), 100)
    b, _ = loop.requests(spec(framework="vllm"), 100)
    assert none is None and (a == b).all() and a.shape == (2, 8)
    p, arr = loop.requests(spec(request_rate=4.0, num_requests=5), 100)
    assert p.shape == (5, 8) and arr[0] == 0 and len(arr) == 5


def test_tree_rss_counts_children():
    # a child that holds ~200 MB: the tree sum sees it, the process alone does not
    code = "b = b\"x\" * 200_000_000; import time; time.sleep(3)"  # touched pages: resident
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.0)
        alone, tree = MemoryMonitor("cpu"), MemoryMonitor("cpu", tree=True)
        alone._sample(), tree._sample()
        assert tree.peak_rss - alone.peak_rss > 150_000_000
    finally:
        child.kill()
        child.wait()


LOCKED = """
import json, sys, time
from frameworks.harness import loop
from frameworks.harness.memory import MemoryMonitor
from frameworks.harness.spec import CellSpec
s = CellSpec(experiment="t", framework="hf", model="llama-tiny", batch_size=1, prompt_len=8, gen_len=2, warmup=1,
             repetitions=2, device=sys.argv[1])
spans = []
def rep(r):
    t0 = time.time(); time.sleep(0.4); spans.append((t0, time.time())); return [], 0.4
loop.measure(s, lambda w: time.sleep(0.2), rep, MemoryMonitor("cpu"))
print(json.dumps(spans))
"""


def test_timed_regions_of_cpu_cells_take_turns(tmp_path):
    # two CPU cells measuring at once: with the lock (launch sets KVSTUDY_CPU_LOCK) their
    # repetitions never overlap; GPU cells (each on its own GPU) are not serialised
    def run(device):
        env = {**os.environ, "KVSTUDY_CPU_LOCK": str(tmp_path / "d" / "cpu.lock")}
        procs = [subprocess.Popen([sys.executable, "-c", LOCKED, device], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        spans = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
        (a0, a1), (b0, b1) = [(s[0][0], s[-1][1]) for s in spans]
        return a1 <= b0 or b1 <= a0
    assert run("cpu")
    assert not run("cuda")


def test_tree_rss_sees_a_child_started_after_monitoring_began():
    # descendants are listed every RESCAN_S (listing scans the whole host), not at every sample
    from frameworks.harness import memory

    tree = MemoryMonitor("cpu", tree=True)
    tree._sample()
    before = tree.peak_rss
    child = subprocess.Popen([sys.executable, "-c", "b = b\"x\" * 200_000_000; import time; time.sleep(3)"])
    try:
        time.sleep(max(1.0, memory.RESCAN_S))
        tree._sample()
        assert tree.peak_rss - before > 150_000_000
    finally:
        child.kill()
        child.wait()
