"""The one measurement loop (frameworks/harness/loop.py) and the process-tree RSS."""

import subprocess
import sys
import time

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
    assert loop.warmup_gen_len(s) == 4 and loop.warmup_gen_len(spec(gen_len=2)) == 2


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
