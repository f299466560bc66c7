"""Did the GPU-memory cap hold? Reads a run's cells and reports, per framework and prefill mode, the
prompt lengths that ran and those that ran out of memory (batch 1, ttft_prompt), and checks that no
measured cell's PyTorch allocator peak exceeded its cap (the transformers engines; vLLM's allocator
lives in its own process and is not seen there).

    python benchmarks/check_cap.py results/cells        # exit 1 if a peak exceeded its cap
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def check(cells_root: Path) -> tuple[list[str], list[str]]:
    lines, over = [], []
    boundary: dict[tuple, dict] = defaultdict(dict)
    for path in sorted(cells_root.rglob("*.json")):
        r = json.loads(path.read_text())
        sp, s = r["spec"], r.get("summary") or {}
        cap = sp.get("gpu_memory_gb")
        peak = s.get("peak_gpu_mem_gb")
        if r["status"] == "ok" and cap is not None and peak is not None and peak > cap:
            over.append(f"{path}: allocator peak {peak:.2f} GB > cap {cap:g} GB")
        if sp["experiment"] == "ttft_prompt" and sp["batch_size"] == 1:
            boundary[(sp["framework"], sp["model"], sp["prefill"], cap)][sp["prompt_len"]] = (r["status"], peak)
    for (fw, model, prefill, cap), pts in sorted(boundary.items(), key=lambda kv: tuple(map(str, kv[0]))):
        cells = ", ".join(f"{n}: {st}" + (f" ({peak:.1f} GB)" if peak is not None else "")
                          for n, (st, peak) in sorted(pts.items()))
        lines.append(f"{fw:9} {model:14} {prefill:8} cap {cap if cap is not None else 'none'} GB: {cells}")
    return lines, over


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "results/cells")
    if not root.is_dir():
        print(f"check_cap: {root} is not a folder of cell results", file=sys.stderr)
        return 2
    lines, over = check(root)
    print("prompt lengths at batch 1 (status, allocator peak):")
    print("\n".join(f"  {line}" for line in lines) or "  (no ttft_prompt cells)")
    print("\n".join(over) if over else "every measured cell stayed under its cap")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
