"""Result schema, atomic writes, corrupt files."""

import json

import pytest

from frameworks.harness import result
from frameworks.harness.metrics import RequestTiming


def _ok_result():
    m = result.Measurement([RequestTiming(0.0, [0.1, 0.2], 16, 0, 0)], [0.2],
                           {"peak_gpu_mem_gb": None, "peak_device_mem_gb": None, "peak_rss_gb": 0.3}, 4096, {"x": 1})
    spec = {"experiment": "batch", "framework": "hf", "model": "m", "batch_size": 1, "prompt_len": 16, "gen_len": 2,
            "kv_budget": 1.0, "prefill": "sdpa"}
    prov = {"versions": {}, "git": {"commit": None, "dirty": None}, "host": "h", "seed": 0, "command": ["x"]}
    return result.build(spec, "id", "ok", "", prov, "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:01+00:00", m)


def test_build_validates_and_summarizes():
    r = _ok_result()
    assert r["summary"]["output_tok_s"] == pytest.approx(10.0)
    assert r["samples"][0]["itl_ms"] == pytest.approx([100.0])


def test_schema_rejects_bad_status_and_missing_fields():
    r = _ok_result()
    with pytest.raises(result.ResultError, match="status"):
        result.validate({**r, "status": "crashed"})
    bad = dict(r)
    del bad["provenance"]
    with pytest.raises(result.ResultError, match="provenance"):
        result.validate(bad)
    with pytest.raises(result.ResultError, match="summary"):
        result.validate({**r, "summary": None})


def test_atomic_write_and_load(tmp_path):
    path = tmp_path / "a" / "cell.json"
    result.write_atomic(path, _ok_result())
    assert result.load(path)["status"] == "ok"
    assert [p.name for p in path.parent.iterdir()] == ["cell.json"]  # no temp file left


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "cell.json"
    with pytest.raises(ValueError):
        result.write_atomic(path, {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_corrupt_file_named_in_error(tmp_path):
    path = tmp_path / "cell.json"
    path.write_text('{"status": "ok", ')
    with pytest.raises(result.ResultError, match="cell.json: not a readable result JSON"):
        result.load(path)
    path.write_text(json.dumps({"status": "ok"}))
    with pytest.raises(result.ResultError, match="cell.json: invalid"):
        result.load(path)
