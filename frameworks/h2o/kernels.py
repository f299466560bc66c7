"""H2O's two Triton kernels (CUDA; on the CPU under Triton's interpreter in the tests).

column_scores (chunked prefill): the accumulated attention each key of a chunk's attention
  receives, col[b, j, t] = sum over the query heads h of KV head j's group and over the chunk's
  query rows i that see t (causal) of exp(scale * q[b, h, i] . k[b, j, t] - lse[b, h, i]), in
  float32. lse is each query row's log-sum-exp of its scaled causal logits, from the attention
  pass itself (flash attention returns it). One program holds a block of keys and streams the
  query rows past it (the key-stationary loop of flash attention's backward pass): no [q, k]
  matrix exists, no atomics are needed, and the cost is one Q.K^T pass over the causal triangle.
  Only the blocks on the diagonal build the causal mask (PREFILL_TILE's DIAG_MASK).

decode_step (graph decode, slots full): one fused kernel per layer and step for one query per
  sequence: it writes the incoming token into the slot freed at the previous step (keys, values,
  position), attends over all slots (softmax in float32, GQA without copying a KV head), adds
  the step's probabilities summed over the group's query heads to the slots' scores (the new
  token's score starts at 0), and chooses the slot the next token overwrites: the lowest score
  outside the recent window, the first one on ties (torch.argmin's rule). Per (sequence, KV
  head) one program: pass 1 the row maxima and sums, pass 2 the probabilities, the output and
  the scores (the keys are read twice, the second time mostly from L2). The token position is a
  per-(sequence, head) device counter the program advances itself, so the step needs no other
  kernel. The default form ("split", DECODE_MODE) splits the slots over several programs per
  (sequence, head), each reading its keys and values once, and a second, small kernel merges
  their softmax statistics and does the scores and the eviction choice from the stored logits.
  Replaces ~17 small kernels of the torch path (frameworks/h2o/attention.py,
  decode_with_scores + cache.py's scatters and eviction choice).

Loop trip counts are compile-time constants (blocks past the end are masked): Triton 3.6's
interpreter cannot loop to a run-time bound under numpy 2.4 (triton-lang/triton#9171). Run-time
lengths that change from chunk to chunk are not specialised on, so a prompt's last, shorter
chunk does not compile a new kernel inside a measured prefill.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: H2O runs its torch path
    triton = None

LOG2E = math.log2(math.e)
# column_scores tile: BLOCK_N keys per program, BLOCK_M query rows per step (the GPU benchmark
# times a few other tiles next to this one: benchmarks/gpu_engine.py, group h2o)
# DIAG_MASK: build the causal mask on the diagonal blocks only (at 128K nearly every block is
# below it); False: on every block, the first form
PREFILL_TILE = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "DIAG_MASK": True}
DECODE_BLOCK_S = 64
# decode_step's two forms: "split" (the default) spreads each (sequence, KV head) over up to
# DECODE_TARGET_PROGRAMS / (batch x KV heads) programs, each reading its part of the keys and
# values once (online softmax, flash-decoding's split), then a small merge kernel combines them
# and does the scores and the eviction choice from the stored logits; "onepass" is the first
# form, one program per (sequence, KV head) reading the keys twice: 8 programs at batch 1 leave
# the H200's 132 SMs idle (benchmarks/gpu_engine.py times both: h2o/graph-onepass)
DECODE_MODES = ("split", "onepass")
DECODE_MODE = "split"
DECODE_TARGET_PROGRAMS = 1024
# decode_step runs one program per (sequence, KV head) over all slots: with few programs and many
# slots (batch 1, a long prompt's budget) it leaves most of the GPU idle, and the torch path's
# batched matmuls are faster; the layer takes the fused step only where it fits (fused_fits)
FUSED_MAX_SLOTS = 4096
FUSED_MIN_PROGRAMS = 256


def available() -> bool:
    return triton is not None


def supports(dtype: torch.dtype) -> bool:
    """Dtypes the kernels take (tl.dot has no float64 here: float64 models use the torch path)."""
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot's smallest side


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 models: no TF32 rounding


if triton is not None:

    @triton.jit(do_not_specialize=["lq", "lk", "sl_b", "sl_h", "sc_b", "sc_h"])
    def _column_scores(q_ptr, k_ptr, lse_ptr, col_ptr, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sl_b, sl_h, sc_b, sc_h,
                       lq, lk, hkv, qk_scale, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCKS: tl.constexpr, PREC: tl.constexpr,
                       DIAG_MASK: tl.constexpr):
        kb = tl.program_id(0)
        b = (tl.program_id(1) // hkv).to(tl.int64)  # batch offsets of a long prompt pass 2**31 elements
        j = tl.program_id(1) % hkv
        first = lk - lq  # position of the chunk's first query
        n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < lk
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        k = tl.load(k_ptr + b * sk_b + j * sk_h + n[:, None] * sk_l + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        kt = tl.trans(k)
        # the first query row that sees any of these keys: rows before it are skipped
        q0 = (tl.maximum(kb * BLOCK_N - first, 0) // BLOCK_M) * BLOCK_M
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g in range(G):
            h = j * G + g
            q_base = q_ptr + b * sq_b + h * sq_h
            l_base = lse_ptr + b * sl_b + h * sl_h
            for it in range(Q_BLOCKS):  # past the last row: masked (no loads), a few wasted dots
                m = q0 + it * BLOCK_M + tl.arange(0, BLOCK_M)
                m_ok = m < lq
                q = tl.load(q_base + m[:, None] * sq_l + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                # rows past the end: lse +inf, so their exp2(x) is 0 without a mask
                lse2 = tl.load(l_base + m, mask=m_ok, other=float("inf")) * 1.4426950408889634  # log2 e
                e = tl.exp2(tl.dot(q, kt, input_precision=PREC) * qk_scale - lse2[:, None])
                if DIAG_MASK:  # the causal mask only where a row sees part of the block (the diagonal)
                    if first + q0 + it * BLOCK_M < kb * BLOCK_N + BLOCK_N - 1:
                        e = tl.where(n[None, :] <= first + m[:, None], e, 0.0)
                else:
                    e = tl.where((n[None, :] <= first + m[:, None]) & m_ok[:, None], e, 0.0)
                acc += tl.sum(e, 0)
        tl.store(col_ptr + b * sc_b + j * sc_h + n, acc, mask=n_ok)

    @triton.jit
    def _decode_step(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, sc_ptr, pos_ptr, free_ptr, seen_ptr, out_ptr,
                     sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                     ss_b, ss_h, sp_b, sp_h, sf_b, sn_b, so_b, so_h, slots, recent, qk_scale,
                     G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, S_BLOCKS: tl.constexpr,
                     PREC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        g_ok = g < G
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        dv = tl.arange(0, BLOCK_DV)
        dv_ok = dv < DV
        q = tl.load(q_ptr + b * sq_b + (j * G + g)[:, None] * sq_h + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0)
        kn = tl.load(kn_ptr + b * skn_b + j * skn_h + d, mask=d_ok, other=0.0)
        vn = tl.load(vn_ptr + b * svn_b + j * svn_h + dv, mask=dv_ok, other=0.0)
        free = tl.load(free_ptr + b * sf_b + j)
        seen = tl.load(seen_ptr + b * sn_b + j)  # position of the incoming token
        k_base = k_ptr + b * sk_b + j * sk_h
        v_base = v_ptr + b * sv_b + j * sv_h
        sc_base = sc_ptr + b * ss_b + j * ss_h
        pos_base = pos_ptr + b * sp_b + j * sp_h
        # the incoming token into the freed slot; the loops below substitute it from registers
        # (a program's own stores need not be visible to its other threads' loads)
        tl.store(k_base + free * sk_s + d, kn, mask=d_ok)
        tl.store(v_base + free * sv_s + dv, vn, mask=dv_ok)
        tl.store(pos_base + free, seen)
        tl.store(seen_ptr + b * sn_b + j, seen + 1)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        for blk in range(S_BLOCKS):  # pass 1: row maxima and sums (log2 domain)
            s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
            s_ok = s < slots
            k = tl.load(k_base + s[:, None] * sk_s + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.where((s == free)[:, None], kn[None, :], k)
            x = tl.where(s_ok[None, :], tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
            m_i = m_new
        inv_l = 1.0 / l_i
        acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
        best = tl.full([], float("inf"), dtype=tl.float32)
        best_slot = tl.zeros([], dtype=tl.int32)
        for blk in range(S_BLOCKS):  # pass 2: probabilities, output, scores, eviction choice
            s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
            s_ok = s < slots
            k = tl.load(k_base + s[:, None] * sk_s + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.where((s == free)[:, None], kn[None, :], k)
            x = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            p = tl.where(g_ok[:, None] & s_ok[None, :], tl.exp2(x - m_i[:, None]) * inv_l[:, None], 0.0)
            v = tl.load(v_base + s[:, None] * sv_s + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
            v = tl.where((s == free)[:, None], vn[None, :], v)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
            score = tl.where(s == free, 0.0, tl.load(sc_base + s, mask=s_ok, other=0.0)) + tl.sum(p, 0)
            tl.store(sc_base + s, score, mask=s_ok)
            pos = tl.where(s == free, seen, tl.load(pos_base + s, mask=s_ok, other=0))
            cand = tl.where(s_ok & (pos < seen + 1 - recent), score, float("inf"))  # the recent window stays
            low = tl.min(cand, 0)
            take = low < best  # strictly: an earlier block wins a tie
            best_slot = tl.where(take, tl.argmin(cand, 0) + blk * BLOCK_S, best_slot)
            best = tl.where(take, low, best)
        tl.store(out_ptr + b * so_b + (j * G + g)[:, None] * so_h + dv[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & dv_ok[None, :])
        tl.store(free_ptr + b * sf_b + j, best_slot)

    @triton.jit
    def _decode_split(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, free_ptr, x_ptr, m_ptr, l_ptr, acc_ptr,
                      sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sf_b,
                      sx_b, sx_h, sx_g, sm_b, sm_h, sm_p, sa_b, sa_h, sa_p, sa_g, slots, qk_scale,
                      G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
                      SPLIT_BLOCKS: tl.constexpr, PREC: tl.constexpr):
        """Pass 1 of the split step: one program per (sequence, KV head, split of the slots). It
        writes the incoming token into the freed slot if that slot is in its split, and leaves the
        split's logits (log2 domain), row maxima, sums and unnormalised output for _decode_merge."""
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        p_id = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        g_ok = g < G
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        dv = tl.arange(0, BLOCK_DV)
        dv_ok = dv < DV
        q = tl.load(q_ptr + b * sq_b + (j * G + g)[:, None] * sq_h + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0)
        kn = tl.load(kn_ptr + b * skn_b + j * skn_h + d, mask=d_ok, other=0.0)
        vn = tl.load(vn_ptr + b * svn_b + j * svn_h + dv, mask=dv_ok, other=0.0)
        free = tl.load(free_ptr + b * sf_b + j)
        k_base = k_ptr + b * sk_b + j * sk_h
        v_base = v_ptr + b * sv_b + j * sv_h
        lo = p_id * (SPLIT_BLOCKS * BLOCK_S)
        mine = (free >= lo) & (free < lo + SPLIT_BLOCKS * BLOCK_S)  # no other program reads that slot
        tl.store(k_base + free * sk_s + d, kn, mask=d_ok & mine)
        tl.store(v_base + free * sv_s + dv, vn, mask=dv_ok & mine)
        x_base = x_ptr + b * sx_b + j * sx_h + g[:, None] * sx_g
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
        for blk in range(SPLIT_BLOCKS):  # online softmax over the split's slots: keys and values read once
            s = lo + blk * BLOCK_S + tl.arange(0, BLOCK_S)
            s_ok = s < slots
            k = tl.load(k_base + s[:, None] * sk_s + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.where((s == free)[:, None], kn[None, :], k)
            x = tl.where(s_ok[None, :], tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale, float("-inf"))
            tl.store(x_base + s[None, :], x, mask=g_ok[:, None] & s_ok[None, :])
            m_new = tl.maximum(m_i, tl.max(x, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(x - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + s[:, None] * sv_s + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
            v = tl.where((s == free)[:, None], vn[None, :], v)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        tl.store(m_ptr + b * sm_b + j * sm_h + p_id * sm_p + g, m_i, mask=g_ok)
        tl.store(l_ptr + b * sm_b + j * sm_h + p_id * sm_p + g, l_i, mask=g_ok)
        tl.store(acc_ptr + b * sa_b + j * sa_h + p_id * sa_p + g[:, None] * sa_g + dv[None, :], acc,
                 mask=g_ok[:, None] & dv_ok[None, :])

    @triton.jit
    def _decode_merge(x_ptr, m_ptr, l_ptr, acc_ptr, sc_ptr, pos_ptr, free_ptr, seen_ptr, out_ptr,
                      sx_b, sx_h, sx_g, sm_b, sm_h, sm_p, sa_b, sa_h, sa_p, sa_g, ss_b, ss_h, sp_b, sp_h, sf_b, sn_b,
                      so_b, so_h, slots, splits, recent,
                      G: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, S_BLOCKS: tl.constexpr):
        """Pass 2 of the split step, one program per (sequence, KV head): the splits' softmax
        statistics and outputs combined, then the scores, the token's position and the eviction
        choice over all slots from the stored logits (no key is read again)."""
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        g_ok = g < G
        dv = tl.arange(0, BLOCK_DV)
        dv_ok = dv < DV
        pp = tl.arange(0, BLOCK_P)
        p_ok = pp < splits
        st = b * sm_b + j * sm_h + pp[:, None] * sm_p + g[None, :]
        mp = tl.load(m_ptr + st, mask=p_ok[:, None] & g_ok[None, :], other=float("-inf"))  # [P, G]
        lp = tl.load(l_ptr + st, mask=p_ok[:, None] & g_ok[None, :], other=0.0)
        m = tl.max(mp, 0)  # [G]
        m = tl.where(g_ok, m, 0.0)  # padded heads: no NaN from -inf - -inf
        w = tl.where(p_ok[:, None] & g_ok[None, :], tl.exp2(mp - m[None, :]), 0.0)
        l_tot = tl.sum(lp * w, 0)
        inv_l = 1.0 / tl.where(g_ok, l_tot, 1.0)
        out = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
        for p_id in range(BLOCK_P):  # the splits' outputs, rescaled to the common maximum
            wp = tl.sum(tl.where(pp[:, None] == p_id, w, 0.0), 0)  # [G]: split p_id's weight (0 past the end)
            a = tl.load(acc_ptr + b * sa_b + j * sa_h + p_id * sa_p + g[:, None] * sa_g + dv[None, :],
                        mask=(p_id < splits) & g_ok[:, None] & dv_ok[None, :], other=0.0)
            out += a * wp[:, None]
        out = out * inv_l[:, None]
        tl.store(out_ptr + b * so_b + (j * G + g)[:, None] * so_h + dv[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & dv_ok[None, :])
        free = tl.load(free_ptr + b * sf_b + j)
        seen = tl.load(seen_ptr + b * sn_b + j)
        sc_base = sc_ptr + b * ss_b + j * ss_h
        pos_base = pos_ptr + b * sp_b + j * sp_h
        tl.store(pos_base + free, seen)
        tl.store(seen_ptr + b * sn_b + j, seen + 1)
        x_base = x_ptr + b * sx_b + j * sx_h + g[:, None] * sx_g
        best = tl.full([], float("inf"), dtype=tl.float32)
        best_slot = tl.zeros([], dtype=tl.int32)
        for blk in range(S_BLOCKS):
            s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
            s_ok = s < slots
            x = tl.load(x_base + s[None, :], mask=g_ok[:, None] & s_ok[None, :], other=float("-inf"))
            p = tl.where(g_ok[:, None] & s_ok[None, :], tl.exp2(x - m[:, None]) * inv_l[:, None], 0.0)
            score = tl.where(s == free, 0.0, tl.load(sc_base + s, mask=s_ok, other=0.0)) + tl.sum(p, 0)
            tl.store(sc_base + s, score, mask=s_ok)
            pos = tl.where(s == free, seen, tl.load(pos_base + s, mask=s_ok, other=0))
            cand = tl.where(s_ok & (pos < seen + 1 - recent), score, float("inf"))  # the recent window stays
            low = tl.min(cand, 0)
            take = low < best  # strictly: an earlier block wins a tie
            best_slot = tl.where(take, tl.argmin(cand, 0) + blk * BLOCK_S, best_slot)
            best = tl.where(take, low, best)
        tl.store(free_ptr + b * sf_b + j, best_slot)


def fused_fits(batch: int, kv_heads: int, slots: int) -> bool:
    if DECODE_MODE == "split":  # programs scale with the slots: no idle GPU at small batches
        return True
    return slots <= FUSED_MAX_SLOTS or batch * kv_heads >= FUSED_MIN_PROGRAMS


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"h2o kernels: {what}")


def column_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scaling: float, tile: dict | None = None) -> torch.Tensor:
    """q [B, Hq, Lq, D] (the last Lq positions), k [B, Hkv, Lk, D], lse [B, Hq, >= Lq] float32 (natural
    log, scaled logits) -> col [B, Hkv, Lk] float32: the causal probabilities each key received,
    summed over the query rows and over the query heads of its KV head's group."""
    if triton is None:
        raise RuntimeError("h2o's score kernel needs the `triton` package (it comes with CUDA builds of torch)")
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    _need(hq % hkv == 0 and lk >= lq and k.shape[0] == b and k.shape[3] == d, f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    _need(lse.shape[:2] == (b, hq) and lse.shape[2] >= lq and lse.dtype == torch.float32, f"lse {tuple(lse.shape)} {lse.dtype}")
    _need(q.stride(-1) == 1 and k.stride(-1) == 1 and lse.stride(-1) == 1 and supports(q.dtype), "unit last strides, fp16/bf16/fp32")
    t = {**PREFILL_TILE, **(tile or {})}
    col = torch.empty((b, hkv, lk), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(lk, t["BLOCK_N"]), b * hkv)
    _column_scores[grid](q, k, lse, col, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                         lse.stride(0), lse.stride(1), col.stride(0), col.stride(1), lq, lk, hkv, scaling * LOG2E,
                         G=hq // hkv, D=d, BLOCK_D=_block(d), BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"],
                         Q_BLOCKS=triton.cdiv(lq, t["BLOCK_M"]), PREC=_precision(q.dtype), DIAG_MASK=t["DIAG_MASK"],
                         num_warps=t["num_warps"],
                         num_stages=t["num_stages"])
    return col


def decode_step(q, k_new, v_new, keys, values, scores, pos, free, seen, recent: int, scaling: float) -> torch.Tensor:
    """One decode step of a full H2O layer, in place (see the module doc). q [B, Hq, 1, D];
    k_new/v_new [B, Hkv, 1, D(v)] the incoming token; keys/values [B, Hkv, S, D(v)] the slots;
    scores [B, Hkv, S] float32; pos [B, Hkv, S] and free [B, Hkv] int64; seen [B, Hkv, 1] int64 the
    incoming token's position (advanced by one). Returns the attention output [B, 1, Hq, Dv]."""
    if triton is None:
        raise RuntimeError("h2o's decode kernel needs the `triton` package (it comes with CUDA builds of torch)")
    b, hq, one, d = q.shape
    hkv, slots, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    _need(one == 1 and hq % hkv == 0 and k_new.shape == (b, hkv, 1, d) and v_new.shape == (b, hkv, 1, dv),
          f"q {tuple(q.shape)}, k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}")
    _need(scores.dtype == torch.float32 and pos.dtype == free.dtype == seen.dtype == torch.int64, "scores fp32, pos/free/seen int64")
    for t in (q, k_new, v_new, keys, values, scores, pos):
        _need(t.stride(-1) == 1, "unit last strides")
    _need(free.stride(-1) == 1 and seen.stride(1) == 1 and supports(q.dtype), "free/seen [B, Hkv] rows, fp16/bf16/fp32")
    out = torch.empty((b, 1, hq, dv), dtype=q.dtype, device=q.device)
    if DECODE_MODE == "split":
        _split_step(q, k_new, v_new, keys, values, scores, pos, free, seen, out, recent, scaling)
        return out
    _decode_step[(b, hkv)](q, k_new, v_new, keys, values, scores, pos, free, seen, out,
                           q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                           keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
                           values.stride(2), scores.stride(0), scores.stride(1), pos.stride(0), pos.stride(1),
                           free.stride(0), seen.stride(0), out.stride(0), out.stride(2), slots, recent, scaling * LOG2E,
                           G=hq // hkv, D=d, DV=dv, BLOCK_G=_block(hq // hkv), BLOCK_D=_block(d), BLOCK_DV=_block(dv),
                           BLOCK_S=DECODE_BLOCK_S, S_BLOCKS=triton.cdiv(slots, DECODE_BLOCK_S), PREC=_precision(q.dtype),
                           num_warps=4, num_stages=2)
    return out


def split_blocks(batch: int, kv_heads: int, slots: int) -> tuple[int, int]:
    """(splits, BLOCK_S blocks per split) of the split step: enough programs to fill the GPU
    (DECODE_TARGET_PROGRAMS), at most one split per block of slots."""
    blocks = triton.cdiv(slots, DECODE_BLOCK_S)
    splits = max(1, min(blocks, triton.cdiv(DECODE_TARGET_PROGRAMS, batch * kv_heads)))
    per = triton.cdiv(blocks, splits)
    return triton.cdiv(blocks, per), per


def _split_step(q, k_new, v_new, keys, values, scores, pos, free, seen, out, recent: int, scaling: float) -> None:
    b, hq, _, d = q.shape
    hkv, slots, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    g = hq // hkv
    splits, per = split_blocks(b, hkv, slots)
    dev = q.device
    x = torch.empty((b, hkv, g, slots), dtype=torch.float32, device=dev)  # the step's logits, log2 domain
    m = torch.empty((b, hkv, splits, g), dtype=torch.float32, device=dev)
    l_ = torch.empty_like(m)
    acc = torch.empty((b, hkv, splits, g, dv), dtype=torch.float32, device=dev)
    consts = dict(G=g, BLOCK_G=_block(g), BLOCK_DV=_block(dv), BLOCK_S=DECODE_BLOCK_S)
    _decode_split[(b, hkv, splits)](q, k_new, v_new, keys, values, free, x, m, l_, acc,
                                    q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0),
                                    v_new.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
                                    values.stride(1), values.stride(2), free.stride(0), x.stride(0), x.stride(1),
                                    x.stride(2), m.stride(0), m.stride(1), m.stride(2), acc.stride(0), acc.stride(1),
                                    acc.stride(2), acc.stride(3), slots, scaling * LOG2E, D=d, DV=dv, BLOCK_D=_block(d),
                                    SPLIT_BLOCKS=per, PREC=_precision(q.dtype), num_warps=4, num_stages=2, **consts)
    _decode_merge[(b, hkv)](x, m, l_, acc, scores, pos, free, seen, out, x.stride(0), x.stride(1), x.stride(2),
                            m.stride(0), m.stride(1), m.stride(2), acc.stride(0), acc.stride(1), acc.stride(2),
                            acc.stride(3), scores.stride(0), scores.stride(1), pos.stride(0), pos.stride(1), free.stride(0),
                            seen.stride(0), out.stride(0), out.stride(2), slots, splits, recent, DV=dv,
                            BLOCK_P=max(2, triton.next_power_of_2(splits)), S_BLOCKS=triton.cdiv(slots, DECODE_BLOCK_S),
                            num_warps=4, num_stages=1, **{**consts, "BLOCK_G": triton.next_power_of_2(g)})  # no tl.dot: no 16-row minimum
