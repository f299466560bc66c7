"""The report page from small hand-made inputs: every section, inlined figures, verdict classes."""

from pathlib import Path

import pandas as pd

from workflow.lib import claims, compare, report

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cfc0f00f0004"
                    "850180848a8c210000000049454e44ae426082")


def cells():
    return pd.DataFrame([
        {"experiment": "batch", "framework": "hf", "model": "m", "cell_id": "a", "status": "ok", "message": "",
         "device": "cpu", "repetitions": 4, "output_tok_s": 100.0, "output_tok_s_std": 5.0},
        {"experiment": "batch", "framework": "h2o", "model": "m", "cell_id": "b", "status": "oom",
         "message": "OutOfMemoryError: 2 GiB", "device": "cpu", "repetitions": 4, "output_tok_s": None,
         "output_tok_s_std": None}])


def test_page_has_every_section_and_inlines_figures(tmp_path: Path):
    png = tmp_path / "f.png"
    png.write_bytes(PNG)
    cmp = compare.compare(cells().assign(peak_mem_gb=1.0, kv_cache_bytes=1),
                          cells().assign(output_tok_s=[50.0, None], peak_mem_gb=1.0, kv_cache_bytes=1))
    page = report.build(preset="smoke", cells=cells(), provenance=[{"host": "h", "versions": {"torch": "2.13.0"}}],
                        claims=claims.judge({}).fillna(""), guide=pd.DataFrame(columns=["framework"]), guide_png=png,
                        figures=[("fig_a", png, "what it shows")], compare=cmp, reference="results/reference/x",
                        report_commit="abc", links={"claims": "../claims.csv", "guide": "g.csv", "compare": "c.csv"})
    for anchor, _ in report.SECTIONS:
        assert f'id="{anchor}"' in page
    assert page.count("data:image/png;base64,") == 2 and "what it shows" in page
    assert "A CPU run" in page and 'class="not-measured"' in page
    assert "OutOfMemoryError: 2 GiB" in page  # the failed cell, with why
    assert "median 5.0%" in page  # CV of the one measured cell
    assert 'class="outside"' in page and "results/reference/x" in page  # 100 vs 50 tok/s flagged
    assert "http:" not in page and "https:" not in page and "<script" not in page  # offline: nothing fetched


def test_repeatability_flags_every_cell_above_the_limit():
    c = pd.concat([cells(), pd.DataFrame([
        {"experiment": "batch", "framework": "vllm", "model": "m", "cell_id": f"v{i}", "status": "ok", "message": "",
         "device": "cpu", "repetitions": 4, "output_tok_s": 100.0, "output_tok_s_std": 11.0 + i} for i in range(12)])])
    c["output_tok_s_cv"] = c["output_tok_s_std"] / c["output_tok_s"]
    text, over = report.repeatability(c)
    assert "1 of 13 at ≤ 10%, 12 above (flagged)" in text
    assert list(over["cell_id"]) == [f"v{i}" for i in reversed(range(12))]  # all of them, worst first
