"""The speculated layers' gather as one Triton kernel: only the k selected rows cross PCIe.

The store's device alias (store.device_view, unified virtual addressing) is the kernel's
source: each program copies a block of rows of one (sequence, kv head) lane straight from page-
locked host memory into the layer's device buffer with 16-byte loads. The selection has a fixed
number `cap` of rows per lane (static shapes, select.py) of which the first k (a device scalar)
count: rows >= k are masked, so they issue no PCIe read and are written as zeros (their
attention weight is exactly 0 through the -inf bias). A gather with index_select instead reads
all `cap` rows, padding included: with real weights the alpha rule selects far fewer tokens
than the budget, so this moves far fewer bytes.

The row of (sequence b, kv head g, position t) in the token-major store viewed as
[max_len * lanes, W] is idx * lanes + lane (select.flat_rows), computed in the kernel.

Runs on CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported) for the tests. `available()` says whether Triton can be imported at all.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: the gather falls back to index_select
    triton = None

BLOCK_ROWS = 16


def available() -> bool:
    return triton is not None


PROGRAMS = 64  # the smallest grid (when there are that many blocks): 64 x 8 KB in flight for PCIe
ITERS = 32  # blocks per program: the grid grows past PROGRAMS only for gathers of > 2048 blocks


if triton is not None:

    @triton.jit
    def _gather_selected(src, idx, count, out, cap, lanes, n_blocks, blocks_per_lane, n_programs,
                         ITERS: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr,
                         STAGES: tl.constexpr):
        k = tl.load(count)
        cols = tl.arange(0, BLOCK_W)
        col_ok = cols < W
        pid = tl.program_id(0)
        for it in tl.range(0, ITERS, num_stages=STAGES):  # persistent: blocks pid, pid + n_programs, ... of BLOCK_R rows
            blk = pid + it * n_programs
            lane = blk // blocks_per_lane
            pos = (blk % blocks_per_lane) * BLOCK_R + tl.arange(0, BLOCK_R)
            in_cap = (pos < cap) & (blk < n_blocks)
            sel = in_cap & (pos < k)
            tok = tl.load(idx + lane * cap + pos, mask=sel, other=0).to(tl.int64)
            row = tok * lanes + lane
            vals = tl.load(src + row[:, None] * W + cols[None, :], mask=sel[:, None] & col_ok[None, :], other=0)
            dst = (lane * cap + pos).to(tl.int64)
            tl.store(out + dst[:, None] * W + cols[None, :], vals, mask=in_cap[:, None] & col_ok[None, :])


def gather_selected(src_rows: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, out: torch.Tensor,
                    programs: int | None = PROGRAMS, block_rows: int = BLOCK_ROWS, num_warps: int = 4,
                    stages: int = 1) -> torch.Tensor:
    """out[l * cap + t] = src_rows[idx[l, t] * lanes + l] for t < k, zeros for k <= t < cap.

    src_rows [max_len * lanes, W]: the store's rows (device alias on CUDA); idx [B, Hkv, cap]
    (or [lanes, cap]) token positions, contiguous; k: 0-d integer tensor on idx's device
    (1 <= k <= cap, as select.select returns it); out: contiguous, at least lanes * cap rows of W.
    programs: the smallest grid (a persistent kernel: each program loops over up to ITERS blocks
    of BLOCK_ROWS rows), so that a gather waiting on PCIe holds few of the SM slots the compute
    stream needs; None: one program per block. block_rows, num_warps, stages (software pipelining of
    the persistent loop): the kernel's shape, for benchmarks. Nothing is read back on the host."""
    if triton is None:
        raise RuntimeError("the Triton gather needs the `triton` package (it comes with CUDA builds of torch)")
    cap = idx.shape[-1]
    lanes = idx.numel() // cap
    w = src_rows.shape[-1]
    if src_rows.dim() != 2 or out.shape[-1] != w or out.shape[0] < lanes * cap:
        raise ValueError(f"gather_selected: src {tuple(src_rows.shape)}, out {tuple(out.shape)}, idx {tuple(idx.shape)}")
    if not (idx.is_contiguous() and out.is_contiguous() and src_rows.is_contiguous()):
        raise ValueError("gather_selected needs contiguous tensors")
    per_lane = triton.cdiv(cap, block_rows)
    n_blocks = lanes * per_lane
    if programs is None:
        n_programs, iters = n_blocks, 1
    else:  # at least `programs` (when there are that many blocks), each looping over at most ITERS blocks
        n_programs = max(min(programs, n_blocks), triton.cdiv(n_blocks, ITERS))
        iters = ITERS
    # the trip count is a compile-time constant (blocks past n_blocks are masked): one kernel for
    # every budget, and Triton's interpreter (the CPU tests) runs it — it cannot loop to a
    # run-time bound with numpy 2
    _gather_selected[(n_programs,)](src_rows, idx, k, out, cap, lanes, n_blocks, per_lane, n_programs, ITERS=iters,
                                    W=w, BLOCK_W=triton.next_power_of_2(w), BLOCK_R=block_rows, STAGES=stages,
                                    num_warps=num_warps)
    return out


def self_check(device) -> None:
    """Compile and run the gather once on a few rows, checked against indexing: the first CUDA
    use builds Triton's launcher with the system C compiler, so a missing compiler or Python
    header fails here, at model load, with the cause, not in the middle of a measured step."""
    g = torch.Generator().manual_seed(0)
    lanes, cap, w, length = 2, 3, 8, 5
    src = torch.randn(length * lanes, w, generator=g).to(device)
    idx = torch.tensor([[4, 0, 2], [1, 3, 0]], device=device)
    out = torch.full((lanes * cap, w), float("nan"), device=device)
    try:
        gather_selected(src, idx, torch.tensor(2, device=device), out)
        want = src[(idx * lanes + torch.arange(lanes, device=device).view(lanes, 1)).reshape(-1)].view(lanes, cap, w)
        ok = torch.equal(out.view(lanes, cap, w)[:, :2], want[:, :2]) and not out.view(lanes, cap, w)[:, 2].any()
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise RuntimeError(f"InfiniGen's Triton gather does not build or run here ({type(e).__name__}: {e}). Triton "
                           "compiles a launcher at first use with the system C compiler (gcc or clang, or $CC) "
                           "against the Python headers: install both (the infinigen image has them)") from e
    if not ok:
        raise RuntimeError("InfiniGen's Triton gather returned wrong rows in its self-check")
