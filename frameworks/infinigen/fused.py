"""The speculation of a decode step as three Triton kernels (CUDA; the CPU tests run them under
Triton's interpreter). Same arithmetic as skew.partial_query + select.scores + select.select +
the fetch's bias, with the same bf16 roundings, in 3 launches and torch's topk instead of ~20
small kernels, which in graph decode run beside the step's GEMMs on the same SMs, each waiting
for SMs to free up, on the way from a layer's input to its gather. Measured on the H200 (8B,
results/reference/h200-2026-12-03/): a layer's speculation alone 49 / 56 / 102 us at batch
1 / 8 / 32 instead of 95 / 126 / 275, the captured step 0.90x / 0.88x / 1.00x.

  1. `_logits`, one program per (sequence, kv head, slice of positions): the partial query
     (RoPE: [q | q] * [cos | sin'] @ qproj, skew.py; OPT: given), its logits against the partial
     keys, positions >= n masked to -inf; writes the logits [lanes, G, L], their max over the
     group (the per-kv-head score topk reads) and each slice's row maxima.
  2. `_count`: each row's count of logits > row max - alpha, per slice (upstream's rule).
  3. `_finish`, one program: k = floor(sum of counts / rows), bounded as select.select; the
     fetch's bias (0 for the first k rows, -inf after) and the running k sums of the metrics.

Then idx = topk(max over the group, cap): the order of select.select. Nothing reads the device
on the host; every size is a host integer of the cache (static shapes)."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_L = 128  # positions per block
TARGET_PROGRAMS = 256  # programs of the logits and count kernels (slices per lane chosen for it)
BIAS_BLOCK = 1024


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _logits(q_ptr, t_ptr, p_ptr, pk_ptr, n_ptr, n_host, perkv_ptr, lg_ptr, pmax_ptr,
                sq_b, st_b, spk_b, spk_h, spk_l, L, hkv, splits,
                G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, ROPE: tl.constexpr, N_PTR: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
                BPS: tl.constexpr, PREC: tl.constexpr):
        lane = tl.program_id(0)
        split = tl.program_id(1)
        b = (lane // hkv).to(tl.int64)
        h = lane % hkv
        g = tl.arange(0, BLOCK_G)
        g_ok = g < G
        c = tl.arange(0, BLOCK_R)
        c_ok = c < R
        if N_PTR:
            n = tl.load(n_ptr)
        else:
            n = n_host
        if ROPE:  # q [B, Hq * D] (q_proj's output), table [B, 2D], qproj [Hkv, 2D, R]
            e = tl.arange(0, BLOCK_E)
            e_ok = e < 2 * D
            qv = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * D + (e % D)[None, :],
                         mask=g_ok[:, None] & e_ok[None, :], other=0.0)
            tv = tl.load(t_ptr + b * st_b + e, mask=e_ok, other=0.0)
            x = (qv.to(tl.float32) * tv.to(tl.float32)[None, :]).to(qv.dtype)  # torch: the product in bf16
            pw = tl.load(p_ptr + h * (2 * D * R) + e[:, None] * R + c[None, :], mask=e_ok[:, None] & c_ok[None, :],
                         other=0.0)
            pq = tl.dot(x, pw, input_precision=PREC).to(qv.dtype)
        else:  # the partial query itself, [B, Hkv, G, R] contiguous
            pq = tl.load(q_ptr + lane * (G * R) + g[:, None] * R + c[None, :], mask=g_ok[:, None] & c_ok[None, :],
                         other=0.0)
        top = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for it in range(BPS):
            pos = (split * BPS + it) * BLOCK_L + tl.arange(0, BLOCK_L)
            in_buf = pos < L
            valid = pos < n
            pk = tl.load(pk_ptr + b * spk_b + h * spk_h + pos[:, None] * spk_l + c[None, :],
                         mask=valid[:, None] & c_ok[None, :], other=0.0)
            # torch's matmul returns the model dtype: rounded before the float32 comparisons
            s = tl.dot(pq, tl.trans(pk), input_precision=PREC).to(pk.dtype).to(tl.float32)
            s = tl.where(g_ok[:, None] & valid[None, :], s, float("-inf"))
            top = tl.maximum(top, tl.max(s, 1))
            tl.store(perkv_ptr + lane * L + pos, tl.max(s, 0), mask=in_buf)
            tl.store(lg_ptr + (lane * G + g)[:, None] * L + pos[None, :], s, mask=g_ok[:, None] & in_buf[None, :])
        tl.store(pmax_ptr + (lane * splits + split) * BLOCK_G + g, top)

    @triton.jit
    def _count(lg_ptr, pmax_ptr, n_ptr, n_host, cnt_ptr, alpha, L, splits,
               G: tl.constexpr, N_PTR: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
               BLOCK_L: tl.constexpr, BPS: tl.constexpr):
        lane = tl.program_id(0)
        split = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        g_ok = g < G
        sl = tl.arange(0, BLOCK_S)
        if N_PTR:
            n = tl.load(n_ptr)
        else:
            n = n_host
        pm = tl.load(pmax_ptr + (lane * splits + sl)[:, None] * BLOCK_G + g[None, :], mask=(sl < splits)[:, None],
                     other=float("-inf"))
        thr = tl.max(pm, 0) - alpha  # each row's max over all slices, minus alpha
        cnt = tl.zeros([BLOCK_G], dtype=tl.int32)
        for it in range(BPS):
            pos = (split * BPS + it) * BLOCK_L + tl.arange(0, BLOCK_L)
            ok = g_ok[:, None] & (pos < n)[None, :]
            s = tl.load(lg_ptr + (lane * G + g)[:, None] * L + pos[None, :], mask=ok, other=float("-inf"))
            cnt += tl.sum(((s > thr[:, None]) & ok).to(tl.int32), 1)
        tl.store(cnt_ptr + lane * splits + split, tl.sum(cnt, 0))

    @triton.jit
    def _finish(cnt_ptr, n_cnt, lim_ptr, cap, min_fetch, rows, batch, k_ptr, bias_ptr, ksum_ptr, kbsum_ptr,
                HAS_LIMIT: tl.constexpr, BLOCK_C: tl.constexpr, BIAS_BLOCKS: tl.constexpr,
                BIAS_BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK_C)
        total = tl.sum(tl.load(cnt_ptr + i, mask=i < n_cnt, other=0).to(tl.int64), 0)
        k = total // rows  # counts are >= 0: floor
        if HAS_LIMIT:  # graph decode: the budget at this length, a device value (select.select's limit)
            lim = tl.load(lim_ptr)
            k = tl.minimum(tl.maximum(k, tl.minimum(lim, min_fetch)), lim)
        else:
            k = tl.minimum(tl.maximum(k, tl.minimum(cap, min_fetch)), cap)
        tl.store(k_ptr, k)
        for it in range(BIAS_BLOCKS):
            p = it * BIAS_BLOCK + tl.arange(0, BIAS_BLOCK)
            tl.store(bias_ptr + p, tl.where(p < k, 0.0, float("-inf")), mask=p < cap)
        tl.store(ksum_ptr, tl.load(ksum_ptr) + k)
        tl.store(kbsum_ptr, tl.load(kbsum_ptr) + k * batch)

    @triton.jit
    def _select(perkv_ptr, k_ptr, idx_ptr, L, cap, BLOCK: tl.constexpr, CAP_BLOCKS: tl.constexpr,
                CAP_BLOCK: tl.constexpr):
        """One lane's k best positions (k: the device count) as its first k indices, in position order
        (a set: the attention and the gather do not depend on the order), the rest 0 (masked rows).
        The k-th largest score by bisection on order-preserving integer keys, ties taken by position."""
        lane = tl.program_id(0).to(tl.int64)
        k = tl.load(k_ptr).to(tl.int32)
        pos = tl.arange(0, BLOCK)
        x = tl.load(perkv_ptr + lane * L + pos, mask=pos < L, other=float("-inf"))
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed integer order
        key = tl.where(pos < L, key, -2147483647 - 1)
        lo = tl.full([], -2147483647 - 1, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):  # the largest t with count(key >= t) >= k
            mid = (lo + hi + 1) // 2
            n = tl.sum((key.to(tl.int64) >= mid).to(tl.int32), 0)
            lo = tl.where(n >= k, mid, lo)
            hi = tl.where(n >= k, hi, mid - 1)
        t = lo
        gt = key.to(tl.int64) > t
        eq = key.to(tl.int64) == t
        need = k - tl.sum(gt.to(tl.int32), 0)  # ties at the threshold still to take
        sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
        sel = sel & (k > 0)
        slot = tl.cumsum(sel.to(tl.int32), 0) - 1
        for it in range(CAP_BLOCKS):  # the rows past k: token 0 (masked by the bias, not read by the gather)
            p = it * CAP_BLOCK + tl.arange(0, CAP_BLOCK)
            tl.store(idx_ptr + lane * cap + p, tl.zeros([CAP_BLOCK], tl.int64), mask=(p < cap) & (p >= k))
        tl.store(idx_ptr + lane * cap + slot, pos.to(tl.int64), mask=sel)


SELECT_MAX_L = 8192  # positions a lane the select kernel holds at once; longer caches take torch's topk


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def speculate(q: torch.Tensor, table: torch.Tensor | None, qproj: torch.Tensor | None, partial_k: torch.Tensor,
              n: int | torch.Tensor, groups: int, alpha: float, cap: int, min_fetch: int, bias: torch.Tensor,
              k_sum: torch.Tensor, kb_sum: torch.Tensor, limit: torch.Tensor | None = None,
              select_kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (idx [B, Hkv, cap] by decreasing score, k 0-d long), as select.select on select.scores of
    skew.partial_query, and bias[:cap] = 0 for the first k rows, -inf after; k_sum += k, kb_sum += k x B.

    q: RoPE models, q_proj's output [B, 1, Hq * d] (rows may be strided) with table [B, 1, 1, 2d] (skew.rope_table) and
    qproj [Hkv, 2d, r] (LayerSkew.qproj); OPT, the partial query [B, Hkv, G, r] itself (table,
    qproj None). partial_k [B, Hkv, L, r] (the whole buffer; positions >= n are masked and not
    read); n: the valid positions, a host int (eager) or a 0-d device tensor (graph decode).
    cap <= min(L, n) in eager; limit (graph decode): the budget at this length (<= cap).
    select_kernel: the first k indices from `_select` (a set in position order, the rest 0) instead
    of torch's topk (the cap best by decreasing score), for caches of <= SELECT_MAX_L positions."""
    if triton is None:
        raise RuntimeError("the fused speculation needs the `triton` package")
    b, hkv, length, r = partial_k.shape
    cap = max(1, min(cap, length if isinstance(n, torch.Tensor) else int(n)))  # as select.select
    if partial_k.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("fused.speculate: partial keys and queries need a unit last stride")
    rope = qproj is not None
    d = qproj.shape[1] // 2 if rope else 0
    lanes = b * hkv
    n_blocks = triton.cdiv(length, BLOCK_L)
    bps = max(1, triton.cdiv(n_blocks * lanes, TARGET_PROGRAMS))  # blocks per program
    splits = triton.cdiv(n_blocks, bps)
    dev = partial_k.device
    per_kv = torch.empty((b, hkv, length), dtype=torch.float32, device=dev)
    lg = torch.empty((lanes, groups, length), dtype=torch.float32, device=dev)
    bg = _pow2(groups)
    pmax = torch.empty((lanes * splits * bg,), dtype=torch.float32, device=dev)
    counts = torch.empty((lanes * splits,), dtype=torch.int32, device=dev)
    n_ptr = n if isinstance(n, torch.Tensor) else counts  # (unused when N_PTR is false)
    n_host = 0 if isinstance(n, torch.Tensor) else int(n)
    prec = "ieee" if partial_k.dtype == torch.float32 else "tf32"
    if rope:
        qv = q[:, 0] if q.dim() == 3 else q  # [B, Hq * d], rows possibly strided (a view of a fused projection)
        tv = table.reshape(b, 2 * d)
        if not tv.is_contiguous() or not qproj.is_contiguous():
            raise ValueError("fused.speculate: the RoPE table and qproj must be contiguous")
        args = (qv, tv, qproj)
        sq_b, st_b = qv.stride(0), tv.stride(0)
    else:
        q = q.contiguous()  # a view of F.linear's output: no copy
        args, sq_b, st_b = (q, q, q), 0, 0
    _logits[(lanes, splits)](*args, partial_k, n_ptr, n_host, per_kv, lg, pmax, sq_b, st_b, partial_k.stride(0),
                             partial_k.stride(1), partial_k.stride(2), length, hkv, splits, G=groups, D=d, R=r,
                             ROPE=rope, N_PTR=isinstance(n, torch.Tensor), BLOCK_G=bg,
                             BLOCK_E=_pow2(2 * d) if rope else 16, BLOCK_R=_pow2(r), BLOCK_L=BLOCK_L, BPS=bps,
                             PREC=prec, num_warps=4)
    _count[(lanes, splits)](lg, pmax, n_ptr, n_host, counts, float(alpha), length, splits, G=groups,
                            N_PTR=isinstance(n, torch.Tensor), BLOCK_G=bg, BLOCK_S=_pow2(splits, 2),
                            BLOCK_L=BLOCK_L, BPS=bps, num_warps=4)
    k = torch.empty((), dtype=torch.long, device=dev)
    _finish[(1,)](counts, lanes * splits, limit if limit is not None else k, cap, min_fetch, lanes * groups, b, k,
                  bias, k_sum, kb_sum, HAS_LIMIT=limit is not None, BLOCK_C=_pow2(lanes * splits),
                  BIAS_BLOCKS=triton.cdiv(cap, BIAS_BLOCK), BIAS_BLOCK=BIAS_BLOCK, num_warps=4)
    if select_kernel and length <= SELECT_MAX_L:
        idx = torch.empty((b, hkv, cap), dtype=torch.long, device=dev)
        _select[(lanes,)](per_kv, k, idx, length, cap, BLOCK=_pow2(length), CAP_BLOCKS=triton.cdiv(cap, BIAS_BLOCK),
                          CAP_BLOCK=BIAS_BLOCK, num_warps=8)
        return idx, k
    scores = per_kv if limit is not None else per_kv[..., : int(n)]
    idx = scores.topk(cap, dim=-1).indices
    return idx, k
