"""The whole sparse MLP block in one launch: up gather, activation, down gather, bias and residual.

At batch 1 the two sparse MLP projections of a decode step are each a few microseconds of weight reads (OPT-13B
at density 0.1: 21 MB each, ~5 us at 4.2 TB/s), so each launch's ramp and tail weigh about as much as its reads.
Here one program owns ``BLOCK_N`` selected neurons end to end:

1. the up rows of its neurons against the whole x (the row-gather body of :mod:`.gather_mlp`, norm folded in when
   given), bias and activation (ReLU, or SwiGLU with the gate and up rows) -> ``h`` ``[B, BLOCK_N]``, rounded to
   the activations' dtype as the unfused pair stores it;
2. its neurons' rows of the transposed down weight, ``h @ w2t[rows]`` ``[B, d]``, added into an fp32 workspace
   with atomics (column slabs visited from a per-program offset, so programs do not queue on the same lines);
3. one arrival per program on a counter; the program that arrives last adds the bias and the residual to the
   workspace, stores the output in the activations' dtype, and zeroes the workspace and the counter for the next
   launch.

The intermediate ``h`` never leaves the program, the down projection needs no split-k partials, and there is one
launch instead of two. On the CUDA-core (FMA) path, phases 1 and 2 run either as two software-pipelined loops, each
filling its pipeline from empty, or as one loop over both phases' same-shape tiles, so that the first down slabs
stream while the last up chunks are multiplied; :func:`one_loop` picks (measured, bench/NOTES.md v23).

The fp32 sum's order depends on the programs' timing, so low bits may differ between runs (fp16/bf16 outputs usually
not at all); the unfused pair is deterministic. With ``finish=False`` step 3 is skipped:
the fp32 sums stay in the workspace and the next layer's q/k/v gather finishes them as it loads x
(:class:`~dejavu.kernels.gather_mlp.XSum`), off the critical path. Likewise the block can take its x as the
unfinished sums of the o_proj before it (``x_sum``, ``head_gather_down(finish=False)``): every program makes x from
them as it streams it, and program 0 writes it.
"""

from __future__ import annotations

import torch

from . import _checks
from ._checks import (
    MAX_BATCH,
    check_batch,
    check_index,
    check_launch_device,
    check_out,
    check_tensor,
    check_zero,
    cdiv,
    fence_gpu,
    is_interpreted,
    jit,
    next_pow2,
    num_sms,
    pdl_sync,
    pdl_trigger,
    require_triton,
    row_of,
    rows_of,
    sum_rows,
    tl,
    use_pdl,
    zero_slice,
)
from .gather_mlp import (
    ACT_RELU,
    ACT_SWIGLU,
    NORM_CODES,
    _check_down_epilogue,
    _check_norm,
    _check_x_sum,
    _rows_tile,
    gather_down_ref,
    gather_swiglu_ref,
    gather_up_ref,
    norm_ref,
)


@jit
def _sparse_mlp_kernel(
    # pointers
    x_ptr,  # [B, D] activations (the raw residual stream when a norm is folded in)
    w1_ptr,  # [N, D] up weight (SwiGLU: gate)
    w3_ptr,  # [N, D] SwiGLU up weight, else == w1_ptr
    w2t_ptr,  # [N, D] transposed down weight, rows contiguous
    idx_ptr,  # [K] selected neurons
    b1_ptr,  # [N] up bias (fp32 b + W beta with a folded layernorm) or dummy
    b2_ptr,  # [D] down bias or dummy
    res_ptr,  # [B, D] residual or dummy
    out_ptr,  # [B, D]
    acc_ptr,  # [>= B * D] fp32 workspace, zero between launches
    cnt_ptr,  # [1] int32 arrival counter, zero between launches
    g_ptr,  # [D] folded norm gain or dummy
    rg_ptr,  # [N] fp32 W g (folded layernorm) or dummy
    zero_ptr,  # ZERO: [n_zero] fp32 to zero, else dummy
    xs_ptr,  # X_SUM: [B, D] fp32 sums the o_proj before left unfinished, else dummy
    xb_ptr,  # X_SUM: [D] its output bias, or dummy
    xr_ptr,  # X_SUM: [B, D] its residual, else dummy
    # sizes
    B,
    K,
    D,
    eps,
    n_zero,
    # strides
    stride_xb,
    stride_xd,
    stride_w1n,
    stride_w3n,
    stride_w2n,
    stride_rb,
    stride_ob,
    stride_xr,
    # meta-parameters
    ACT: tl.constexpr,  # 1 relu, 2 swiglu
    NORM: tl.constexpr,  # 0 none, 1 layernorm, 2 rmsnorm (see gather_mlp.NormFold)
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,  # neurons per program
    BLOCK_D: tl.constexpr,  # reduction chunk of the up phase
    BLOCK_O: tl.constexpr,  # output columns per step of the down phase
    BLOCK_F: tl.constexpr,  # output columns per step of the last program's epilogue
    USE_DOT: tl.constexpr,  # tensor cores (the batch padded to 16) vs. CUDA-core FMA (B <= FMA_MAX_BATCH)
    DOT_FP32: tl.constexpr,  # fp32 operands for tl.dot (fp32 inputs, or the interpreter)
    NUM_STAGES: tl.constexpr,
    FENCE: tl.constexpr,  # per-thread GPU fence before the arrival (off in the interpreter)
    FINISH: tl.constexpr,  # False: leave the fp32 sums in acc (no arrival, no epilogue; the consumer finishes)
    ZERO: tl.constexpr,  # zero n_zero fp32 at zero_ptr, BLOCK_Z a program (an earlier launch's consumed sums)
    BLOCK_Z: tl.constexpr,
    X_SUM: tl.constexpr,  # x = round(xs + xb + xr), written to x_ptr by program 0 (FMA path; see XSum)
    HAS_XB: tl.constexpr,
    PREWAIT: tl.constexpr,  # FMA path with PDL: the selection and the first up chunk read before the wait
    ONE_LOOP: tl.constexpr,  # FMA path: both phases' [BLOCK_N, BLOCK_D] tiles in one software pipeline
    PDL: tl.constexpr,
):
    """out = act(norm(x) W1[idx]^T + b1[idx]) @ w2t[idx] + b2 + residual. Grid: (cdiv(K, BLOCK_N),)."""
    if not PREWAIT:
        pdl_sync(PDL)
    _mlp_program(tl.program_id(0), tl.num_programs(0),
                 x_ptr, w1_ptr, w3_ptr, w2t_ptr, idx_ptr, b1_ptr, b2_ptr, res_ptr, out_ptr, acc_ptr, cnt_ptr, g_ptr,
                 rg_ptr, zero_ptr, xs_ptr, xb_ptr, xr_ptr, B, K, D, eps, n_zero, stride_xb, stride_xd, stride_w1n,
                 stride_w3n, stride_w2n, stride_rb, stride_ob, stride_xr, ACT, NORM, HAS_B1, HAS_B2, HAS_RES,
                 BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_O, BLOCK_F, USE_DOT, DOT_FP32, NUM_STAGES, FENCE, FINISH, ZERO,
                 BLOCK_Z, X_SUM, HAS_XB, PREWAIT, ONE_LOOP, PDL)  # fmt: skip


@jit
def _mlp_program(pid, n_prog, x_ptr, w1_ptr, w3_ptr, w2t_ptr, idx_ptr, b1_ptr, b2_ptr, res_ptr, out_ptr, acc_ptr,
                 cnt_ptr, g_ptr, rg_ptr, zero_ptr, xs_ptr, xb_ptr, xr_ptr, B, K, D, eps, n_zero, stride_xb, stride_xd,
                 stride_w1n, stride_w3n, stride_w2n, stride_rb, stride_ob, stride_xr, ACT: tl.constexpr,
                 NORM: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_RES: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
                 BLOCK_F: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, NUM_STAGES: tl.constexpr,
                 FENCE: tl.constexpr, FINISH: tl.constexpr, ZERO: tl.constexpr, BLOCK_Z: tl.constexpr,
                 X_SUM: tl.constexpr, HAS_XB: tl.constexpr, PREWAIT: tl.constexpr, ONE_LOOP: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    """Program ``pid`` of the ``n_prog`` sharing the block (the last to arrive finishes), with
    :func:`_sparse_mlp_kernel`'s arguments: that kernel's programs, or the MLP items of
    :func:`~dejavu.kernels.oproj_block._oproj_mlp_kernel`; past its PDL wait unless PREWAIT."""
    if ZERO and not PREWAIT:  # (here without PREWAIT, where the benched kernel zeroes; with it after the wait below)
        zero_slice(zero_ptr, n_zero, pid, BLOCK_Z)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < K
    rows = tl.load(idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)  # [BLOCK_N]
    if ONE_LOOP:
        tl.static_assert(not USE_DOT and not PREWAIT and BLOCK_O == BLOCK_D, "ONE_LOOP: FMA path, no PREWAIT")
        _one_loop(x_ptr, w1_ptr, w3_ptr, w2t_ptr, b1_ptr, g_ptr, rg_ptr, acc_ptr, xs_ptr, xb_ptr, xr_ptr, out_ptr,
                  rows, n_mask, pid, B, D, eps, stride_xb, stride_xd, stride_w1n, stride_w3n, stride_w2n, stride_xr,
                  ACT, NORM, HAS_B1, BLOCK_B, BLOCK_N, BLOCK_D, NUM_STAGES, X_SUM, HAS_XB, PDL)  # fmt: skip
    else:
        _two_loops(x_ptr, w1_ptr, w3_ptr, w2t_ptr, b1_ptr, g_ptr, rg_ptr, acc_ptr, xs_ptr, xb_ptr, xr_ptr, out_ptr,
                   zero_ptr, rows, n_mask, pid, B, D, eps, n_zero, stride_xb, stride_xd, stride_w1n, stride_w3n,
                   stride_w2n, stride_xr, ACT, NORM, HAS_B1, BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_O, USE_DOT, DOT_FP32,
                   NUM_STAGES, ZERO, BLOCK_Z, X_SUM, HAS_XB, PREWAIT, PDL)  # fmt: skip

    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    # -- the last program to arrive finishes: + b2 + residual, cast, store; leave the workspace zeroed -------------
    # (threadfence-reduction pattern: every thread fences its atomics, barrier, one acq_rel arrival)
    if FINISH:
        _mlp_finish(acc_ptr, cnt_ptr, b2_ptr, res_ptr, out_ptr, offs_b, b_mask, D, stride_rb, stride_ob, n_prog,
                    HAS_B2, HAS_RES, BLOCK_B, BLOCK_F, FENCE)  # fmt: skip


@jit
def _two_loops(x_ptr, w1_ptr, w3_ptr, w2t_ptr, b1_ptr, g_ptr, rg_ptr, acc_ptr, xs_ptr, xb_ptr, xr_ptr, out_ptr,
               zero_ptr, rows, n_mask, pid, B, D, eps, n_zero, stride_xb, stride_xd, stride_w1n, stride_w3n,
               stride_w2n, stride_xr, ACT: tl.constexpr, NORM: tl.constexpr, HAS_B1: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
               USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, NUM_STAGES: tl.constexpr, ZERO: tl.constexpr,
               BLOCK_Z: tl.constexpr, X_SUM: tl.constexpr, HAS_XB: tl.constexpr, PREWAIT: tl.constexpr,
               PDL: tl.constexpr):  # fmt: skip
    """The block's two phases, each its own pipelined loop (the shipped schedule)."""
    # -- up: h = act(norm(x) . w1[rows] + b1[rows]), [BLOCK_B, BLOCK_N] --------------------------------------------
    h = _rows_tile(x_ptr, w1_ptr, w3_ptr, b1_ptr, g_ptr, rg_ptr, rows, n_mask, B, D, eps, stride_xb, stride_xd,
                   stride_w1n, stride_w3n, ACT, NORM, HAS_B1, BLOCK_B, BLOCK_N, BLOCK_D, USE_DOT, DOT_FP32,
                   NUM_STAGES, xs_ptr, xb_ptr, xr_ptr, stride_xr, tl.where(pid == 0, D, 0), X_SUM,
                   HAS_XB, PREWAIT, PDL, xs_ptr, xs_ptr, False, False)  # fmt: skip
    if PREWAIT and ZERO:  # after the PDL wait, which _rows_tile has passed
        zero_slice(zero_ptr, n_zero, pid, BLOCK_Z)
    h = h.to(out_ptr.dtype.element_ty)  # rounded to the stored dtype, as unfused (masked neurons' rows read as 0)
    pdl_trigger(PDL)  # PDL mode 3 (SIGNAL_AFTER_UP): the next kernel may launch once every program is past here

    # -- down: acc[b, :] += h[b] @ w2t[rows], slab by slab from a per-program offset ----------------------------------
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    n_slabs = tl.cdiv(D, BLOCK_O)
    w2_rows = w2t_ptr + rows[:, None] * stride_w2n  # [BLOCK_N, 1]
    hf = h.to(tl.float32)  # FMA path: the activations of sequence 0 (and 1), [BLOCK_N] each
    h0 = row_of(hf, offs_b, 0)
    h1 = h0
    if BLOCK_B == 2:
        h1 = row_of(hf, offs_b, 1)
    for i in tl.range(0, n_slabs, num_stages=NUM_STAGES):
        s = (pid + i) % n_slabs
        offs_o = s * BLOCK_O + tl.arange(0, BLOCK_O)
        o_mask = offs_o < D
        w = tl.load(w2_rows + offs_o[None, :], mask=n_mask[:, None] & o_mask[None, :], other=0.0)
        if USE_DOT:  # [BLOCK_B, BLOCK_N] @ [BLOCK_N, BLOCK_O]
            if DOT_FP32:
                part = tl.dot(h.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(h, w)
        else:
            part = _down_part(h0, h1, w.to(tl.float32), offs_b, BLOCK_B)
        tl.atomic_add(acc_ptr + offs_b[:, None] * D + offs_o[None, :], part, mask=b_mask[:, None] & o_mask[None, :],
                      sem="relaxed", scope="gpu")  # fmt: skip


@jit
def _down_part(h0, h1, wf, offs_b, BLOCK_B: tl.constexpr):
    """The FMA path's down product of one slab: h[b] @ w for the fp32 [BLOCK_N, BLOCK_O] slab wf, per sequence in
    the slab's layout (_checks.sum_rows says why) -> [BLOCK_B, BLOCK_O]."""
    p0 = tl.sum(h0[:, None] * wf, axis=0)
    p1 = p0
    if BLOCK_B == 2:
        p1 = tl.sum(h1[:, None] * wf, axis=0)
    return rows_of(p0, p1, offs_b)


@jit
def _one_loop(x_ptr, w1_ptr, w3_ptr, w2t_ptr, b1_ptr, g_ptr, rg_ptr, acc_ptr, xs_ptr, xb_ptr, xr_ptr, out_ptr,
              rows, n_mask, pid, B, D, eps, stride_xb, stride_xd, stride_w1n, stride_w3n, stride_w2n, stride_xr,
              ACT: tl.constexpr, NORM: tl.constexpr, HAS_B1: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr, X_SUM: tl.constexpr,
              HAS_XB: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Both phases in one pipelined loop over n_up + n_slabs same-shape [BLOCK_N, BLOCK_D] tiles: up chunks of
    w1 (and w3), then down slabs of w2t from the program's offset. Every load is at the loop's top level, masked
    to its phase, so the pipeline streams the first down slabs while the last up chunks are multiplied."""
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs0 = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    w3_rows = w3_ptr + rows[:, None] * stride_w3n
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_B1:
        bias = tl.load(b1_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
    rg = tl.zeros([BLOCK_N], dtype=tl.float32)
    if NORM == 1:
        rg = tl.load(rg_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
    a0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    a1 = a0
    c0 = a0
    c1 = a0
    s1 = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    s2 = s1
    h0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    h1 = h0
    n_up = tl.cdiv(D, BLOCK_D)
    x_lim = tl.where(pid == 0, D, 0)
    for t in tl.range(0, 2 * n_up, num_stages=NUM_STAGES):
        up = t < n_up
        s = (pid + tl.maximum(t - n_up, 0)) % n_up
        offs = tl.where(up, t, s) * BLOCK_D + offs0
        d_mask = offs < D
        up_d = d_mask & ((offs0 * 0 + t) < n_up)  # (a vector: the interpreter rejects a scalar mask broadcast)
        wm = n_mask[:, None] & d_mask[None, :]
        base = tl.where(up, w1_ptr, w2t_ptr)  # a scalar select, so that the tile's contiguity stays known
        w = tl.load(base + rows[:, None] * tl.where(up, stride_w1n, stride_w2n) + offs[None, :], mask=wm, other=0.0)
        w3 = w
        if ACT == 2:
            w3 = tl.load(w3_rows + offs[None, :], mask=n_mask[:, None] & up_d[None, :], other=0.0)
        xm = b_mask[:, None] & up_d[None, :]
        if X_SUM:
            xs = tl.load(xs_ptr + offs_b[:, None] * D + offs[None, :], mask=xm, other=0.0, cache_modifier=".cg")
            if HAS_XB:
                xs += tl.load(xb_ptr + offs, mask=up_d, other=0.0).to(tl.float32)[None, :]
            xs += tl.load(xr_ptr + offs_b[:, None] * stride_xr + offs[None, :], mask=xm, other=0.0).to(tl.float32)
            x = xs.to(x_ptr.dtype.element_ty)
            tl.store(x_rows + offs[None, :] * stride_xd, x, mask=xm & (offs < x_lim)[None, :])
        else:
            x = tl.load(x_rows + offs[None, :] * stride_xd, mask=xm, other=0.0)
        gn = tl.zeros([BLOCK_D], dtype=tl.float32)
        if NORM != 0:
            gn = tl.load(g_ptr + offs, mask=up_d, other=0.0).to(tl.float32)
        wf = w.to(tl.float32)
        if up:
            xf = x.to(tl.float32)
            if NORM != 0:
                s2 += xf * xf
                s1 += xf
                xf = xf * gn[None, :]
            x0 = row_of(xf, offs_b, 0)
            a0 += x0[None, :] * wf
            if BLOCK_B == 2:
                x1 = row_of(xf, offs_b, 1)
                a1 += x1[None, :] * wf
            if ACT == 2:
                w3f = w3.to(tl.float32)
                c0 += x0[None, :] * w3f
                if BLOCK_B == 2:
                    c1 += x1[None, :] * w3f
        if t == n_up - 1:  # the up phase's last chunk: h = act(norm(x) W1[rows]^T + b1), rounded as stored
            acc = sum_rows(a0, a1, offs_b, 1, BLOCK_B)
            acc2 = acc
            if ACT == 2:
                acc2 = sum_rows(c0, c1, offs_b, 1, BLOCK_B)
            # gather_mlp._rows_tile's epilogue, written out: its rg and bias loads, moved into this branch of the
            # loop, made the block ~1 us a layer slower (H200, bench/NOTES.md v23), so they are loaded before the loop
            if NORM != 0:
                ms = tl.sum(s2, axis=1) / D
                if NORM == 1:
                    mean = tl.sum(s1, axis=1) / D
                    r = 1.0 / tl.sqrt(tl.maximum(ms - mean * mean, 0.0) + eps)
                    acc = r[:, None] * (acc - mean[:, None] * rg[None, :])
                else:
                    r = 1.0 / tl.sqrt(ms + eps)
                    acc = acc * r[:, None]
                    acc2 = acc2 * r[:, None]
            acc += bias[None, :]
            if ACT == 1:
                acc = tl.maximum(acc, 0.0)
            if ACT == 2:
                acc = acc / (1.0 + tl.exp(-acc)) * acc2
            hf = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            h0 = row_of(hf, offs_b, 0)
            if BLOCK_B == 2:
                h1 = row_of(hf, offs_b, 1)
            pdl_trigger(PDL)
        if not up:
            part = _down_part(h0, h1, wf, offs_b, BLOCK_B)
            tl.atomic_add(acc_ptr + offs_b[:, None] * D + offs[None, :], part, mask=b_mask[:, None] & d_mask[None, :],
                          sem="relaxed", scope="gpu")  # fmt: skip


@jit
def _mlp_finish(acc_ptr, cnt_ptr, b2_ptr, res_ptr, out_ptr, offs_b, b_mask, D, stride_rb, stride_ob, n_prog,
                HAS_B2: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
                FENCE: tl.constexpr):  # fmt: skip
    """The block's last-arriving program: + b2 + residual, cast, store; the workspace and counter left zeroed."""
    fence_gpu(FENCE)
    tl.debug_barrier()
    old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if old == n_prog - 1:
        # one pass when BLOCK_F covers d; the sums, the bias and the residual are loaded together (one memory round
        # trip per chunk on this single program's path, which every launch waits for)
        for f0 in range(0, D, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            f_mask = offs_f < D
            bf_mask = b_mask[:, None] & f_mask[None, :]
            acc_ptrs = acc_ptr + offs_b[:, None] * D + offs_f[None, :]
            tot = tl.load(acc_ptrs, mask=bf_mask, other=0.0, cache_modifier=".cg")
            if HAS_B2:
                tot += tl.load(b2_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_RES:
                tot += tl.load(res_ptr + offs_b[:, None] * stride_rb + offs_f[None, :], mask=bf_mask,
                               other=0.0).to(tl.float32)  # fmt: skip
            tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_f[None, :], tot.to(out_ptr.dtype.element_ty),
                     mask=bf_mask)  # fmt: skip
            # every thread has read its sums before any thread zeroes: the zeros' tile may be laid out over the
            # threads differently from the loaded one (measured on the GPU: without this barrier, 2048-wide chunks
            # lost sums; the interpreter, one thread, cannot show it)
            tl.debug_barrier()
            tl.store(acc_ptrs, tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32), mask=bf_mask)
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


EPILOGUE_COLS = 8192  # columns x batch rows per step of the last program's epilogue (FMA path): one pass to d = 8192
DOWN_COLS = None
"""Output columns per down-phase step on the FMA path (BLOCK_O; None: 512). Each step ends in one vector atomic add per
thread (512 columns over 8 warps: two fp32 a thread); A/B knob, read at launch time (``bench/profile_step.py``'s
``mlp_cols_<n>``). Two loops only: in the one loop (:func:`one_loop`) the down slabs are as wide as the up chunks."""
ROWS = None
"""Neurons per program on the FMA path (BLOCK_N; None: 16). A/B knob, read at launch time (``bench/profile_step.py``'s
``mlp_rows_<n>``)."""
SIGNAL_AFTER_UP = True
"""With PDL, the block's programs signal the next kernel's launch once past their up phase (PDL mode 3,
``_checks.use_pdl``) instead of right after their wait: the next layer's q/k/v gather, whose programs the early
signal placed beside the up phase, is launched half-way through the block. H200, same process, (0.1, 0.5):
OPT-13B 2.555 -> 2.513 ms, Llama-2-7B 1.432 -> 1.419, OPT-6.7B 1.539 -> 1.529, OPT-30B 4.915 -> 4.880; no signal
at all (mode 2) was mixed by model (bench/NOTES.md v17). A/B knob, read at launch time (``bench/profile_step.py``'s
``mlp_signal_early``)."""
ONE_LOOP = None
"""FMA path: both phases in one software-pipelined loop over same-shape tiles (down slabs as wide as the up chunks),
so that the first down slabs stream while the last up chunks are multiplied, instead of each phase filling its own
pipeline from empty. None (default): the rule of :func:`one_loop`; True / False force it (A/B knob, read at launch
time: ``bench/profile_step.py``'s ``mlp_one_loop`` / ``mlp_two_loops``)."""
MAXNREG = None
"""Register cap per thread for the block's launch, whatever the schedule (None: :func:`launch_maxnreg`'s rule). A/B
knob, read at launch time (``bench/profile_step.py``'s ``mlp_maxnreg_128``)."""
ONE_LOOP_MAXNREG = 128
"""The one loop's register cap where its programs outnumber the SMs (:func:`launch_maxnreg`); None: no cap, and then
:func:`one_loop` keeps two loops there, v23's rule (A/B knob read at launch time: ``bench/profile_step.py``'s
``mlp_v23``)."""


def _pdl_mode(device: torch.device, kernel=None) -> int:
    """The block's PDL mode (``_checks.use_pdl`` of ``kernel``, by default the block's own): 3, the signal after the up
    phase, where PDL's plain mode 1 would apply and SIGNAL_AFTER_UP is on; else what use_pdl says (0 off, 2 named in
    PDL_LATE, 3 named in PDL_MID)."""
    pdl = use_pdl(_sparse_mlp_kernel if kernel is None else kernel, device)
    return 3 if pdl == 1 and SIGNAL_AFTER_UP else pdl


def one_loop(k: int, block_n: int, swiglu: bool, device: torch.device) -> bool:
    """Whether the FMA path runs both phases in one loop (:data:`ONE_LOOP`; None: this rule): for ReLU blocks, capped
    at :data:`ONE_LOOP_MAXNREG` registers where the 16-neuron programs outnumber the SMs (:func:`launch_maxnreg`; with
    no cap, only where they fit one to an SM, v23's rule). The one loop saves the down phase's pipeline fill, but
    holds more registers (offline sm_90, Triton 3.9: 158 a thread against 125 for ReLU, so one 8-warp program an SM
    instead of two; 217 against 178 for SwiGLU) and issues more instructions a down slab. H200, batch 1, step ms,
    two loops -> one loop (bench/NOTES.md v23, each against the two loops' repeat):

    * won: OPT-13B (0.1, 0.5), 128 programs, 2.517 -> 2.489; (0.05, 0.5) 2.412 -> 2.350; OPT-6.7B (0.1, 0.5), 103
      programs, 1.535 -> 1.496;
    * lost: OPT-30B (0.1, 0.5), 180 programs (a second wave at one an SM), 4.916 -> 5.309, which the cap at 128 (two
      an SM) takes back (v24); LLaMA-2-7B (SwiGLU) 1.427 -> 1.503, excluded;
    * lost, and not excluded: OPT-13B (0.1, 0.25) 2.057 -> 2.088 (OPT-6.7B there: 1.278 -> 1.281). There the
      faster block moves the side stream's neuron-scores GEMV beside the next q/k/v gather, which it slows.

    The capped one loop alone was mixed (v23: OPT-13B (0.25, 0.5) -5.5%, OPT-6.7B +9%, the same side-stream effect);
    with the side stream at a higher priority (``runtime.fast_decode.SIDE_PRIORITY``) it won on both (v24)."""
    if ONE_LOOP is not None:
        return bool(ONE_LOOP)
    return not swiglu and (ONE_LOOP_MAXNREG is not None or cdiv(k, block_n) <= num_sms(device))


def launch_maxnreg(one: bool, k: int, block_n: int, device: torch.device):
    """The block's register cap (a launch option; None: the compiler's choice): :data:`MAXNREG` when set; else
    :data:`ONE_LOOP_MAXNREG` for the one loop where its programs outnumber the SMs, so that two share an SM instead of
    the second wave one an SM would take (offline sm_90: 128 registers, no spills, with or without the finish)."""
    if MAXNREG:
        return MAXNREG
    if one and ONE_LOOP_MAXNREG and cdiv(k, block_n) > num_sms(device):
        return ONE_LOOP_MAXNREG
    return None


def register_cap(batch: int, k: int, d: int, swiglu: bool, device: torch.device):
    """The register cap :func:`sparse_mlp` will launch a block of ``k`` neurons with, as the knobs stand now (None:
    none); the decode runtime reads it to set its side stream's priority."""
    cfg = _mlp_config(batch, k, d, swiglu, device)
    return launch_maxnreg(cfg["ONE_LOOP"], k, cfg["BLOCK_N"], device)


def _mlp_config(batch: int, k: int, d: int, swiglu: bool, device: torch.device) -> dict:
    """Tiles for :func:`_sparse_mlp_kernel` (a heuristic). B <= FMA_MAX_BATCH: CUDA-core FMA, 16 neurons a program
    (every program adds a full [B, d] row of atomics, so not fewer), 512-column down slabs, 8 warps: the best of
    bench/mlp_micro.py's candidates at OPT-13B and Llama-2-7B shapes, density 0.1 (H100, bench/NOTES.md v5); 4
    pipeline stages and a one-pass epilogue (H200, v6: OPT-13B 18.00 -> 17.59 us, Llama-2-7B 15.33 -> 14.72 us,
    OPT-30B within noise; epilogue 2048 -> 8192 columns 18.52 -> 18.00 / 35.81 -> 34.71 us). The up
    phase's fp32 accumulator [B, 16, BLOCK_D] (twice for SwiGLU) stays <= 64 registers a thread; ONE_LOOP as
    :func:`one_loop` says (then the down slabs are as wide as the up chunks). Above: tensor
    cores, the batch padded to 16, 128-wide chunks in both phases (as the gathers' tensor-core path)."""
    if batch > _checks.FMA_MAX_BATCH:
        return dict(BLOCK_B=16, BLOCK_N=16, BLOCK_D=max(16, min(128, next_pow2(d))),
                    BLOCK_O=max(16, min(128, next_pow2(d))),
                    BLOCK_F=max(16, min(512, next_pow2(d))), USE_DOT=True, NUM_STAGES=3, ONE_LOOP=False,
                    num_warps=4)  # fmt: skip
    block_b, block_n, warps = next_pow2(batch), ROWS or 16, 8
    budget = 64 * 32 * warps // (block_b * block_n * (2 if swiglu else 1))
    block_d = max(16, min(512, next_pow2(d), budget))
    block_o = max(16, min(DOWN_COLS or 512, next_pow2(d)))
    block_f = max(16, min(EPILOGUE_COLS // block_b, next_pow2(d)))
    one = one_loop(k, block_n, swiglu, device)
    if one:
        block_o = block_d
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_O=block_o, BLOCK_F=block_f, USE_DOT=False,
                NUM_STAGES=4, ONE_LOOP=one, num_warps=warps)  # fmt: skip


def mlp_workspace(d: int, device, batch: int = MAX_BATCH) -> dict:
    """A zeroed workspace for :func:`sparse_mlp` (fp32 ``[batch * d]`` sums and an int32 arrival counter). The
    kernel leaves it zeroed, so launches that run one after another (one stream) can share one; launches that may
    run at the same time need one each."""
    device = torch.device(device)
    return {"acc": torch.zeros(batch * d, dtype=torch.float32, device=device),
            "cnt": torch.zeros(1, dtype=torch.int32, device=device)}


def sparse_mlp(x, w1, w2t, idx, b1=None, b2=None, residual=None, *, w3=None, norm=None, workspace=None,
               validate=True, out=None, finish=True, zero=None, x_sum=None, prewait=False):
    """The sparse MLP block ``act(x @ w1[idx].T + b1[idx]) @ w2t[idx] + b2 + residual`` -> ``[B, d]`` in one launch.

    ``act`` is ReLU (OPT: ``w1`` = fc1, ``b1`` its bias) or, with ``w3``, SwiGLU ``silu(x w1[idx]^T) * (x w3[idx]^T)``
    (LLaMA: ``w1`` = gate, ``w3`` = up, no biases). ``w2t`` is the transposed down weight ``[N, d]``.
    ``norm``: a :class:`~dejavu.kernels.gather_mlp.NormFold` of the norm before the block, folded for ``w1``
    (SwiGLU: rmsnorm only); x is then the raw residual stream and ``b1`` comes from the fold.
    ``workspace``: from :func:`mlp_workspace` (default: a fresh one per call, which costs a memset launch).
    ``finish=False`` (FMA path): no last-program pass; the fp32 sums ``act(..) @ w2t[idx]`` stay in the workspace and
    are returned as a [B, d] view (b2 and residual must be None: the consumer adds them, see
    :class:`~dejavu.kernels.gather_mlp.XSum`); the workspace is then not zero until ``zero`` clears it in a later
    launch. ``zero``: an fp32 contiguous tensor the launch sets to 0 (after waiting for its predecessor), e.g. the
    other workspace whose sums the kernel before this one consumed.
    ``x_sum``: a :class:`~dejavu.kernels.gather_mlp.XSum` (the FMA path): x is not read but made from the unfinished
    o_proj before the block (``head_gather_down(finish=False)``) and written into ``x``; ``residual`` may be that
    same ``x`` (the last program reads it after every program has arrived).
    ``prewait``: a promise that the kernel before this one in the stream writes neither ``idx`` nor the weights:
    with programmatic dependent launch (the FMA path), the selection and the first up chunk are then read before the PDL
    wait, while that kernel still runs (not where the block runs as one loop: :func:`one_loop`).
    """
    result, grid, args, meta = _mlp_launch("sparse_mlp", x, w1, w2t, idx, b1, b2, residual, w3, norm, workspace,
                                           validate, out, finish, zero, x_sum)  # fmt: skip
    pdl = _pdl_mode(x.device)
    cap = launch_maxnreg(meta["ONE_LOOP"], idx.shape[0], meta["BLOCK_N"], x.device)
    _sparse_mlp_kernel[(grid,)](
        *args, **meta, PREWAIT=pdl and prewait and not meta["USE_DOT"] and not meta["ONE_LOOP"], PDL=pdl,
        launch_pdl=pdl > 0, **({"maxnreg": cap} if cap else {}),
    )  # fmt: skip
    return result


def _mlp_launch(op, x, w1, w2t, idx, b1, b2, residual, w3, norm, workspace, validate, out, finish, zero, x_sum):
    """:func:`sparse_mlp`'s checks and launch arguments (also the MLP items' of :mod:`.oproj_block`) -> (what the call
    returns, programs, :func:`_sparse_mlp_kernel`'s arguments up to its meta-parameters, the meta-parameters and
    launch options but PREWAIT, PDL, launch_pdl and maxnreg)."""
    require_triton(op)
    check_tensor(op, "w1", w1, ndim=2, contiguous=True)
    check_launch_device(op, _sparse_mlp_kernel, w1)
    N, D = w1.shape
    check_tensor(op, "x", x, ndim=2, dtype=w1.dtype, device=w1.device, shape=(None, D))
    check_batch(op, x.shape[0])
    B = x.shape[0]
    check_tensor(op, "w2t", w2t, ndim=2, dtype=w1.dtype, dtype_of="w1", device=w1.device, device_of="w1",
                 shape=(N, None), contiguous=True)  # fmt: skip
    if w2t.shape[1] != D:
        raise ValueError(f"{op}: w2t is {tuple(w2t.shape)}, but the block's output must have x's width {D}: pass the "
                         "transposed down weight [N, d] (down_proj.weight.T.contiguous()).")  # fmt: skip
    if w3 is not None:
        check_tensor(op, "w3", w3, ndim=2, dtype=w1.dtype, dtype_of="w1", device=w1.device, device_of="w1",
                     shape=(N, D), contiguous=True)  # fmt: skip
        if b1 is not None:
            raise ValueError(f"{op}: the SwiGLU block has no up bias; pass b1=None with w3.")
    check_index(op, "idx", idx, n=N, device=w1.device, validate=validate)
    if b1 is not None:
        check_tensor(op, "b1", b1, ndim=1, dtype=w1.dtype, device=w1.device, shape=(N,), contiguous=True)
    _check_norm(op, norm, w1, x, b1)
    if norm is not None and w3 is not None and norm.kind != "rmsnorm":
        raise ValueError(f"{op}: only an rmsnorm can be folded into the SwiGLU block (got {norm.kind}); run the norm "
                         "first and pass norm=None.")  # fmt: skip
    _check_down_epilogue(op, b2, residual, w1, B, D)
    _check_x_sum(op, x_sum, x)
    if x_sum is not None and x_sum.out2 is not None:
        raise ValueError(f"{op}: x_sum.out2 is written by the row gathers only; pass an XSum without out2.")
    if x_sum is not None and out is not None and x.data_ptr() == out.data_ptr():
        raise ValueError(f"{op}: with x_sum the block writes x; out must be another buffer.")
    if out is None:
        out = torch.empty((B, D), dtype=x.dtype, device=x.device)
    else:
        check_out(op, out, shape=(B, D), dtype=x.dtype, device=x.device)
    if workspace is None:
        workspace = mlp_workspace(D, x.device, B)
    acc, cnt = workspace.get("acc"), workspace.get("cnt")
    if not (isinstance(acc, torch.Tensor) and acc.dtype == torch.float32 and acc.device == x.device
            and acc.is_contiguous() and acc.numel() >= B * D and isinstance(cnt, torch.Tensor)
            and cnt.dtype == torch.int32 and cnt.device == x.device and cnt.numel() >= 1):
        raise ValueError(f"{op}: workspace must come from mlp_workspace(d={D}, device, batch>={B}).")
    if not finish and (B > _checks.FMA_MAX_BATCH or b2 is not None or residual is not None):
        raise ValueError(f"{op}: finish=False leaves the sums for the next gather to finish (XSum): batch <= "
                         f"{_checks.FMA_MAX_BATCH}, and "
                         "pass b2=None, residual=None (the consumer adds them).")  # fmt: skip
    k = idx.shape[0]
    cfg = _mlp_config(B, k, D, w3 is not None, x.device)
    grid = cdiv(k, cfg["BLOCK_N"])
    n_zero, block_z = check_zero(op, zero, acc, "workspace", grid)
    bias1 = norm.bias if norm is not None else b1
    res = residual if residual is not None else out
    args = (
        x, w1, w3 if w3 is not None else w1, w2t, idx, bias1 if bias1 is not None else w1,
        b2 if b2 is not None else w1, res, out, acc, cnt,
        norm.weight if norm is not None else w1, norm.rowsum if norm is not None and norm.rowsum is not None else w1,
        zero if zero is not None else acc,
        *((x_sum.sums, x_sum.bias if x_sum.bias is not None else w1, x_sum.residual) if x_sum is not None
          else (w1,) * 3),
        B, k, D, norm.eps if norm is not None else 0.0, n_zero,
        x.stride(0), x.stride(1), w1.stride(0), (w3 if w3 is not None else w1).stride(0), w2t.stride(0),
        res.stride(0), out.stride(0), x_sum.residual.stride(0) if x_sum is not None else 0,
    )  # fmt: skip
    meta = dict(
        ACT=ACT_SWIGLU if w3 is not None else ACT_RELU, NORM=0 if norm is None else NORM_CODES[norm.kind],
        HAS_B1=bias1 is not None, HAS_B2=b2 is not None, HAS_RES=residual is not None,
        DOT_FP32=x.dtype == torch.float32 or is_interpreted(_sparse_mlp_kernel),
        FENCE=not is_interpreted(_sparse_mlp_kernel), FINISH=bool(finish), ZERO=n_zero > 0,
        BLOCK_Z=block_z, X_SUM=x_sum is not None,
        HAS_XB=x_sum is not None and x_sum.bias is not None,
        num_stages=cfg["NUM_STAGES"], **cfg,
    )  # fmt: skip
    return out if finish else acc[:B * D].view(B, D), grid, args, meta


def sparse_mlp_ref(x, w1, w2t, idx, b1=None, b2=None, residual=None, *, w3=None, norm=None):
    """Reference for :func:`sparse_mlp`: the unfused torch references, in the inputs' dtype."""
    if norm is not None:
        x, b1 = norm_ref(x, norm), norm.linear_bias
    h = gather_up_ref(x, w1, idx, b1, act="relu") if w3 is None else gather_swiglu_ref(x, w1, w3, idx)
    return gather_down_ref(h, w2t, idx, b2, residual)


__all__ = ["sparse_mlp", "sparse_mlp_ref", "mlp_workspace"]
