"""The GPU-memory cap (preset / config key gpu_memory_gb): from config to cell spec, to the
share of the card each engine gets, to the table and the figure note. The allocator call itself
(torch.cuda.set_per_process_memory_fraction) needs a GPU: benchmarks/gpu_reference.sh's run shows it."""

import json

import pandas as pd
import pytest

from frameworks.harness.memory import cap_fraction
from frameworks.harness.spec import CellSpec, SpecError
from frameworks.vllm import engine_args as ea
from workflow.lib import celltable, plotting
from workflow.lib.tables import row

H200_BYTES = 150_109_880_320  # torch's total_memory of an H200 (143 156 MiB)


def cells(**config):
    return celltable.cells_from_config({"preset": "h200", "runner": "local", **config})


def test_preset_cap_reaches_every_cell_and_config_overrides_it():
    assert {c.gpu_memory_gb for c in cells().values()} == {85.0}
    assert {c.gpu_memory_gb for c in cells(gpu_memory_gb=40).values()} == {40.0}
    off = cells(gpu_memory_gb="off")
    assert {c.gpu_memory_gb for c in off.values()} == {None}
    # uncapped: the spec (so a cell's Snakemake params) is what it was before caps existed
    assert "gpu_memory_gb" not in next(iter(off.values())).to_dict()
    capped = next(iter(cells().values()))
    assert CellSpec.from_json(capped.to_json()) == capped


@pytest.mark.parametrize("value, message", [(-1, "gpu_memory_gb"), (0, "gpu_memory_gb"), ("80GB", "gpu_memory_gb")])
def test_bad_override_is_refused(value, message):
    with pytest.raises(celltable.ConfigError, match=message):
        cells(gpu_memory_gb=value)


def test_cap_on_a_cpu_preset_is_refused():
    with pytest.raises(celltable.ConfigError, match="applies to cuda presets only"):
        celltable.cells_from_config({"preset": "smoke", "runner": "local", "gpu_memory_gb": 80})
    with pytest.raises(SpecError, match="device cuda only"):
        CellSpec.from_dict({"experiment": "batch", "framework": "hf", "model": "tiny-llama-3.1", "device": "cpu",
                            "gpu_memory_gb": 80.0})


def test_share_of_the_card():
    assert cap_fraction(None, H200_BYTES) == 1.0
    assert cap_fraction(85.0, H200_BYTES) == pytest.approx(85e9 / H200_BYTES)
    assert cap_fraction(200.0, H200_BYTES) == 1.0  # a cap above the card: the card is the limit


def test_vllm_gets_the_same_share_of_its_default():
    capped = next(c for c in cells().values() if c.framework == "vllm")
    kw = ea.engine_kwargs(capped, "/m", device_total_bytes=H200_BYTES)
    assert kw["gpu_memory_utilization"] == pytest.approx(0.9 * 85e9 / H200_BYTES)
    uncapped = next(c for c in cells(gpu_memory_gb="off").values() if c.framework == "vllm")
    assert ea.engine_kwargs(uncapped, "/m")["gpu_memory_utilization"] == 0.9
    with pytest.raises(ValueError, match="total memory"):
        ea.engine_kwargs(capped, "/m")


def test_table_and_figure_say_which_cap_applied(tmp_path):
    ref = "results/reference/h100-2026-11-28/infinigen-triton/cells/prompt_eager_8192.json"
    cell = json.load(open(ref))
    cell["spec"]["gpu_memory_gb"] = 85.0
    cell["provenance"]["gpu_total_mem_gb"] = H200_BYTES / 1e9
    cell["provenance"]["gpu_name"] = "NVIDIA H200"
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(cell))
    r = row(str(path))
    assert r["gpu_memory_gb"] == 85.0 and r["gpu_total_mem_gb"] == pytest.approx(150.1, abs=0.01)
    df = pd.DataFrame([r])
    assert plotting.memory_note(df) == "GPU memory capped at 85 GB per cell (NVIDIA H200 of 150.1 GB)"
    assert plotting.memory_note(df.assign(gpu_memory_gb=None)) == "GPU memory: the whole card (NVIDIA H200 of 150.1 GB)"
    assert plotting.memory_note(df.assign(device="cpu")) is None
    mixed = pd.concat([df, df.assign(gpu_memory_gb=None)])
    assert plotting.memory_note(mixed).startswith("GPU memory capped at 85 GB per cell; some cells uncapped")


def test_h200_preset_has_every_experiment_and_framework_of_paper():
    paper = celltable.cells_from_config({"preset": "paper", "runner": "local"})
    h200 = cells()
    pairs = lambda cs: {(c.experiment, c.framework) for c in cs.values()}  # noqa: E731
    assert pairs(h200) == pairs(paper)
    assert len(h200) < len(paper) / 3


def test_vllm_cell_without_vllm_is_a_result_not_a_crash():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    from frameworks.harness.result import Unsupported
    from frameworks.vllm import adapter

    with pytest.raises(Unsupported, match="vLLM is not installed"):
        adapter.run(next(c for c in cells().values() if c.framework == "vllm"))


def test_cap_check_reports_the_boundary_and_a_peak_over_the_cap(tmp_path):
    import importlib.util

    from tests.conftest import REPO

    spec_ = importlib.util.spec_from_file_location("check_cap", REPO / "benchmarks" / "check_cap.py")
    cc = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(cc)
    ref = REPO / "results/reference/h100-2026-11-28/infinigen-triton/cells"
    for name, cap in [("prompt_eager_8192", 85.0), ("prompt_eager_16384", 85.0), ("prompt_eager_12288", 60.0)]:
        cell = json.loads((ref / f"{name}.json").read_text())
        cell["spec"].update(experiment="ttft_prompt", gpu_memory_gb=cap)
        (tmp_path / f"{name}.json").write_text(json.dumps(cell))
    lines, over = cc.check(tmp_path)
    assert any("cap 85.0 GB: 8192: ok (38.6 GB), 16384: oom" in line for line in lines), lines
    assert len(over) == 1 and "prompt_eager_12288" in over[0]  # 65.9 GB under a 60 GB cap
    assert cc.main([str(tmp_path)]) == 1
