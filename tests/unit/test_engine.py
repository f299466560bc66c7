"""The transformers engine with the full cache, and the cell runner end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from frameworks import models
from frameworks.harness import driver, result, worker
from frameworks.harness.spec import CellSpec
from frameworks.hf.engine import Engine
from frameworks.hf.policy import KVPolicy

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    return models.build("tiny-llama-3.1", "random", "cpu", "float32", "sdpa", seed=0)


def _run(model, mode, ids, gen_len=6):
    model.set_attn_implementation("eager" if mode == "eager" else "sdpa")
    e = Engine(model, KVPolicy(None), "cpu", mode, chunk_size=8)
    e.collect_logits = True
    times = e.generate(ids, gen_len)
    return e, times, torch.stack(e.step_logits)


def test_exact_gen_len_and_monotonic_times(model):
    ids = np.random.default_rng(0).integers(0, 1000, (3, 21))
    e, times, _ = _run(model, "sdpa", ids, gen_len=9)
    assert e.last_tokens.shape == (3, 9) and len(times) == 9
    assert all(b >= a for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("mode", ["eager", "flash", "chunked"])
def test_prefill_modes_agree_with_sdpa(model, mode):
    ids = np.random.default_rng(1).integers(0, 1000, (2, 37))  # 37: chunks of 8 leave a remainder
    _, _, ref = _run(model, "sdpa", ids)
    _, _, got = _run(model, mode, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # float32, different kernels


def test_cache_equals_full_recompute(model):
    ids = np.random.default_rng(2).integers(0, 1000, (2, 19))
    e, _, logits = _run(model, "sdpa", ids)
    seq = torch.cat([torch.as_tensor(ids), e.last_tokens[:, :-1]], dim=1)
    with torch.no_grad():
        full = model(seq).logits[:, 18:]
    torch.testing.assert_close(logits.transpose(0, 1), full, rtol=1e-4, atol=1e-4)


def test_kv_bytes_is_the_preallocated_cache(model):
    ids = np.zeros((2, 10), dtype=np.int64) + 5
    e, _, _ = _run(model, "sdpa", ids, gen_len=4)
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # K+V, float32
    assert e.kv_bytes_peak == 2 * (10 + 4) * per_token


def test_open_loop_driver_batches_fcfs(model):
    e = Engine(model, KVPolicy(None), "cpu", "sdpa", 512)
    prompts = np.random.default_rng(0).integers(0, 1000, (5, 8))
    arrivals = np.array([0.0, 0.0, 0.0, 0.3, 0.3])
    timings, dur = driver.run_open_loop(e, prompts, arrivals, max_batch=2, gen_len=3, rep=0)
    assert [t.request for t in timings] == [0, 1, 2, 3, 4]
    assert timings[0].token_times_s == timings[1].token_times_s  # first batch: requests 0 and 1
    assert timings[2].token_times_s[0] > timings[1].token_times_s[-1]  # request 2 waits for the next batch
    assert timings[3].token_times_s[0] >= 0.3 and dur == max(t.token_times_s[-1] for t in timings)


def test_oom_classification():
    assert worker.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert worker.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not worker.is_oom(RuntimeError("shape mismatch"))


def _cell(**kw):
    base = dict(experiment="batch", framework="hf", model="tiny-llama-3.1", batch_size=2, prompt_len=16, gen_len=4,
                device="cpu", dtype="float32", repetitions=2, warmup=1, timeout_s=120)
    return CellSpec.from_dict({**base, **kw})


def _run_cell(spec, out):
    return subprocess.run([sys.executable, "-m", "frameworks.harness.run_cell", "--spec", spec.to_json(),
                           "--out", str(out), "--threads", "1"], cwd=REPO, capture_output=True, text=True)


def test_run_cell_writes_a_valid_result(tmp_path):
    out = tmp_path / "cell.json"
    p = _run_cell(_cell(), out)
    assert p.returncode == 0, p.stderr
    r = result.load(out)
    assert r["status"] == "ok" and len(r["samples"]) == 4  # 2 requests x 2 repetitions
    assert all(s["out_tokens"] == 4 and s["in_tokens"] == 16 for s in r["samples"])
    assert r["summary"]["kv_cache_bytes"] > 0 and r["summary"]["peak_rss_gb"] > 0
    assert r["provenance"]["versions"]["torch"] and r["provenance"]["command"][1:3] == ["-m", "frameworks.harness.run_cell"]


def test_run_cell_timeout_is_a_result(tmp_path):
    out = tmp_path / "cell.json"
    p = _run_cell(_cell(timeout_s=0.2), out)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["status"] == "timeout" and "0.2 s" in r["message"] and r["summary"] is None


def test_run_cell_bad_spec_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "frameworks.harness.run_cell", "--spec", '{"framework": "hf"}',
                        "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "bad spec" in p.stderr and not (tmp_path / "x.json").exists()


def test_cuda_cell_without_gpu_fails_clearly_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "cell.json"
    p = _run_cell(_cell(device="cuda"), out)
    assert p.returncode == 1 and "needs a CUDA GPU" in p.stderr and not out.exists()
