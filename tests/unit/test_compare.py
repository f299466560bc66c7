"""Comparison with a reference run: ratios, tolerance flags, status changes and one-sided cells."""

import pandas as pd
import pytest

from workflow.lib import compare


def cells(rows):
    return pd.DataFrame(rows, columns=["experiment", "framework", "model", "cell_id", "status", "output_tok_s",
                                       "ttft_ms_mean", "peak_mem_gb", "kv_cache_bytes"])


def test_flags_outside_tolerance_status_and_missing_cells():
    this = cells([("batch", "hf", "m", "a", "ok", 100.0, 10.0, 1.0, 1000), ("batch", "hf", "m", "b", "oom", None, None, None, None),
                  ("batch", "hf", "m", "new", "ok", 1.0, 1.0, 1.0, 1)])
    ref = cells([("batch", "hf", "m", "a", "ok", 50.0, 10.5, 1.0, 1000), ("batch", "hf", "m", "b", "ok", 1.0, 1.0, 1.0, 1),
                 ("batch", "hf", "m", "old", "ok", 1.0, 1.0, 1.0, 1)])
    df = compare.compare(this, ref).set_index(["cell_id", "metric"])
    assert df.loc[("a", "output_tok_s"), "flag"] == "outside" and df.loc[("a", "output_tok_s"), "ratio"] == 2.0
    assert df.loc[("a", "ttft_ms_mean"), "flag"] == "within"
    assert df.loc[("a", "kv_cache_bytes"), "flag"] == "within"
    assert df.loc[("b", "status"), "flag"] == "status differs"
    assert df.loc[("new", ""), "flag"] == "missing in reference" and df.loc[("old", ""), "flag"] == "missing in this run"


def test_cli_errors_on_a_missing_reference(tmp_path, capsys):
    assert compare.main(["--ref", str(tmp_path / "nope"), "--run", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert compare.main(["--ref", str(tmp_path), "--run", str(tmp_path)]) == 2
    assert "no cell results" in capsys.readouterr().err


@pytest.mark.parametrize("ref", ["results/reference/h100-2026-11-28/infinigen-triton"])
def test_reads_a_shipped_reference_run(ref):
    df = compare.read_cells(compare.Path(ref))
    assert len(df) > 0 and {"peak_mem_gb", "output_tok_s"} <= set(df.columns)


def test_a_reference_cell_is_keyed_by_the_id_todays_code_gives_its_spec():
    # InfiniGen's default decode became graph: a reference cell that ran its eager step under the
    # old default's id (no suffix) must not meet this run's graph cell of the same name
    spec = dict(experiment="batch", framework="infinigen", model="tiny-llama-3.1", batch_size=2, prompt_len=16,
                gen_len=4, kv_budget=0.2, prefill="flash", device="cpu")
    eager = {"cell_id": "bs2_in16_out4_kv0.2_flash", "spec": {**spec, "decode": "eager"}}
    graph = {"cell_id": "bs2_in16_out4_kv0.2_flash", "spec": {**spec, "decode": "graph"}}
    before_the_key = {"cell_id": "bs2_in16_out4_kv0.2_flash", "spec": spec}  # ran transformers as-is
    assert compare.canonical_id(eager) == "bs2_in16_out4_kv0.2_flash_deceager" == compare.canonical_id(before_the_key)
    assert compare.canonical_id(graph) == "bs2_in16_out4_kv0.2_flash"
    foreign = {"cell_id": "x", "spec": {**spec, "framework": "nope"}}
    assert compare.canonical_id(foreign) == "x"
