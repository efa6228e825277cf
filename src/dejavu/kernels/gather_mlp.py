"""Sparse MLP projections for decoding: read only the selected neurons' weight rows.

Deja Vu's MLP sparsity picks, per token, a small set of active neurons (the predictor's
top-k, unioned over the batch into one index vector ``idx`` of length ``k``). An MLP block
``y = W2 act(W1 x + b1) + b2`` then only needs rows ``idx`` of ``W1`` and columns ``idx`` of
``W2``. At decode batch sizes (B <= 16) both projections are GEMVs: the time is the time to
stream the selected weights from HBM once, so the kernels are built around that read:

* every selected weight row is read exactly once per call, for the whole batch (the batch
  lives inside the program, padded to a tile);
* rows are contiguous along ``d``, so tiles are ``[rows, d-chunk]`` with 16-byte vector loads;
* accumulation is fp32, the output is cast back to the input dtype.

``W2`` is stored *transposed*, ``w2t = W2.T.contiguous()`` of shape ``[N, d]``: column ``j`` of
``W2`` (neuron ``j``'s output weights) becomes a contiguous row, so the down projection is a
gather of rows too, and neither projection ever strides across a matrix.

Three ops, each with its torch reference next to it:

* :func:`gather_up`      ``[B, d] x W1[idx]^T  -> [B, k]`` with fused bias + ReLU (OPT fc1);
* :func:`gather_swiglu`  ``silu(x Wg[idx]^T) * (x Wu[idx]^T) -> [B, k]`` (LLaMA gate/up);
* :func:`gather_down`    ``h [B, k] x w2t[idx] -> [B, d]`` with fused bias + residual.

The two kernels also take ``ROWS_PER_IDX``: each index then selects a *block* of consecutive
rows (``idx[j] * R + r``). With ``R = head_dim`` this is exactly the head-sparse attention
projection, see :mod:`dejavu.kernels.head_sparse`.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _checks
from ._checks import (
    check_batch,
    check_index,
    check_zero,
    check_launch_device,
    check_out,
    check_tensor,
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
    sum_rows,
    tl,
    use_pdl,
    zero_slice,
)

ACT_NONE, ACT_RELU, ACT_SWIGLU = 0, 1, 2
_ACTS = {"none": ACT_NONE, "relu": ACT_RELU}


# ============================================================================================
# kernel 1: gather rows, GEMV against the whole batch, fused epilogue
# ============================================================================================


@jit
def _gather_rows_kernel(
    # pointers
    x_ptr,  # [B, D] activations
    w_ptr,  # [N * R, D] weight, row-major (rows contiguous)
    w2_ptr,  # [N * R, D] second weight (SwiGLU up-projection), else == w_ptr
    idx_ptr,  # [K] selected indices (int32/int64)
    bias_ptr,  # [N * R] or dummy (fp32 when a layernorm is folded in: b + W @ beta)
    out_ptr,  # [B, K * R]
    g_ptr,  # [D] gain of the folded norm, or dummy
    rg_ptr,  # [N * R] fp32 W @ g (folded layernorm), or dummy
    xs_ptr,  # X_SUM: [B, D] fp32 sums the MLP block left unfinished, else dummy
    xb_ptr,  # X_SUM: [D] the block's output bias, or dummy
    xr_ptr,  # X_SUM: [B, D] the block's residual, else dummy
    xo_ptr,  # X_OUT2: [B, D] contiguous second output of the made x, x + xob, else dummy
    xob_ptr,  # X_OUT2: [D] its bias, or dummy
    # sizes
    B,
    n_out,  # K * R, number of output columns
    D,
    eps,  # folded norm's epsilon
    # strides (weights: last stride is 1 by contract)
    stride_xb,
    stride_xd,
    stride_wn,
    stride_w2n,
    stride_ob,
    stride_xr,
    # meta-parameters
    ROWS_PER_IDX: tl.constexpr,  # R: 1 for neurons, head_dim for heads
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 swiglu
    NORM: tl.constexpr,  # 0 none, 1 layernorm, 2 rmsnorm folded in (see NormFold)
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,  # batch tile (B padded); 16 on the tensor-core path
    BLOCK_K: tl.constexpr,  # output columns (weight rows) per program
    BLOCK_D: tl.constexpr,  # reduction chunk along d
    USE_DOT: tl.constexpr,  # tensor-core tl.dot vs. CUDA-core FMA (B <= FMA_MAX_BATCH)
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (fp32 inputs, or the interpreter)
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the d loop
    X_SUM: tl.constexpr,  # x = round(xs + xb + xr), written to x_ptr by program 0 (FMA path; see XSum)
    HAS_XB: tl.constexpr,
    X_OUT2: tl.constexpr,  # X_SUM: program 0 also writes xo = x + xob (the dense step's next residual)
    HAS_XOB: tl.constexpr,
    PREWAIT: tl.constexpr,  # FMA path with PDL: the selection and the first weight chunk read before the wait
    PDL: tl.constexpr,  # programmatic dependent launch (see _checks.use_pdl)
):
    """out[b, c] = act(norm(x[b]) . w[row(c)] + bias[row(c)]), row(c) = idx[c // R] * R + c % R.

    One program owns BLOCK_K output columns, i.e. BLOCK_K weight rows, and walks the full
    reduction dimension d; the batch is a tile inside the program, so each weight element is
    loaded once. Grid: (cdiv(n_out, BLOCK_K),).

    A folded norm (NORM > 0) costs no pass of its own: every program streams all of x anyway, so it
    accumulates sum(x) and sum(x^2) next to the dot product of w with g * x, and the epilogue applies
    the per-row scalars: rmsnorm r * acc; layernorm r * (acc - mean * (w . g)) + (b + w . beta), the
    two row constants precomputed by fold_norm.
    """
    if not PREWAIT:
        pdl_sync(PDL)
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K] output columns
    c_mask = offs_c < n_out
    sel = tl.load(idx_ptr + offs_c // ROWS_PER_IDX, mask=c_mask, other=0)
    rows = sel.to(tl.int64) * ROWS_PER_IDX + offs_c % ROWS_PER_IDX  # [BLOCK_K] weight rows
    acc = _rows_tile(x_ptr, w_ptr, w2_ptr, bias_ptr, g_ptr, rg_ptr, rows, c_mask, B, D, eps, stride_xb, stride_xd,
                     stride_wn, stride_w2n, ACT, NORM, HAS_BIAS, BLOCK_B, BLOCK_K, BLOCK_D, USE_DOT, DOT_FP32,
                     NUM_STAGES, xs_ptr, xb_ptr, xr_ptr, stride_xr, tl.where(pid == 0, D, 0), X_SUM,
                     HAS_XB, PREWAIT, PDL, xo_ptr, xob_ptr, X_OUT2, HAS_XOB)  # fmt: skip
    offs_b = tl.arange(0, BLOCK_B)
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_b < B)[:, None] & c_mask[None, :])


@jit
def _w_chunk(w_rows, offs_d, c_mask, D):
    """The FMA path's [BLOCK_K, BLOCK_D] weight chunk at columns offs_d, in fp32."""
    return tl.load(w_rows + offs_d[None, :], mask=c_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)


@jit
def _fma_chunk(offs_d, w_in, w2_in, a0, a1, c0, c1, s1, s2, w_rows, w2_rows, c_mask, x_ptr, x_rows, g_ptr, offs_b,
               b_mask, D, stride_xd, xs_ptr, xb_ptr, xr_ptr, stride_xr, x_write_lim, HAS_W: tl.constexpr,
               ACT: tl.constexpr, NORM: tl.constexpr, BLOCK_B: tl.constexpr, X_SUM: tl.constexpr,
               HAS_XB: tl.constexpr, xo_ptr, xob_ptr, X_OUT2: tl.constexpr, HAS_XOB: tl.constexpr):  # fmt: skip
    """One d-chunk of the FMA path: x's columns offs_d (read, or made: X_SUM; X_OUT2: x + xob also stored into
    xo), the folded norm's sums, and the per-sequence products with the chunk's weights added into a0/a1 (c0/c1:
    SwiGLU's up rows). The weights are w_in/w2_in when HAS_W (loaded earlier), else loaded here, each where its
    products need it."""
    d_mask = offs_d < D
    if X_SUM:  # the MLP block's finish, done here: (sums + bias) + residual, rounded as the block stores it
        xm = b_mask[:, None] & d_mask[None, :]
        xs = tl.load(xs_ptr + offs_b[:, None] * D + offs_d[None, :], mask=xm, other=0.0, cache_modifier=".cg")
        if HAS_XB:
            xs += tl.load(xb_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        xs += tl.load(xr_ptr + offs_b[:, None] * stride_xr + offs_d[None, :], mask=xm, other=0.0).to(tl.float32)
        x = xs.to(x_ptr.dtype.element_ty)
        x_wmask = b_mask[:, None] & (offs_d < x_write_lim)[None, :]
        tl.store(x_rows + offs_d[None, :] * stride_xd, x, mask=x_wmask)
        if X_OUT2:
            _store_out2(x, xo_ptr + offs_b[:, None] * D + offs_d[None, :], xob_ptr, offs_d, d_mask, x_wmask, HAS_XOB)
    else:
        x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=b_mask[:, None] & d_mask[None, :], other=0.0)
    if HAS_W:
        w = w_in
    else:
        w = _w_chunk(w_rows, offs_d, c_mask, D)
    xf = x.to(tl.float32)
    if NORM != 0:
        s2 += xf * xf
        s1 += xf
        xf = xf * tl.load(g_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    x0 = row_of(xf, offs_b, 0)  # [BLOCK_D]: sequence 0's row
    a0 += x0[None, :] * w
    if BLOCK_B == 2:
        x1 = row_of(xf, offs_b, 1)
        a1 += x1[None, :] * w
    if ACT == 2:
        if HAS_W:
            w2 = w2_in
        else:
            w2 = _w_chunk(w2_rows, offs_d, c_mask, D)
        c0 += x0[None, :] * w2
        if BLOCK_B == 2:
            c1 += x1[None, :] * w2
    return a0, a1, c0, c1, s1, s2


@jit
def _rows_tile(x_ptr, w_ptr, w2_ptr, bias_ptr, g_ptr, rg_ptr, rows, c_mask, B, D, eps, stride_xb, stride_xd,
               stride_wn, stride_w2n, ACT: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr,
               DOT_FP32: tl.constexpr, NUM_STAGES: tl.constexpr, xs_ptr, xb_ptr, xr_ptr, stride_xr, x_write_lim,
               X_SUM: tl.constexpr, HAS_XB: tl.constexpr, PREWAIT: tl.constexpr, PDL: tl.constexpr, xo_ptr, xob_ptr,
               X_OUT2: tl.constexpr, HAS_XOB: tl.constexpr):  # fmt: skip
    """act(norm(x[b]) . w[rows] + bias[rows]) -> fp32 [BLOCK_B, BLOCK_K] (masked rows read as zero weights): the
    body of the row gather, shared with the fused MLP block (mlp_block.py). X_SUM (FMA path): x is not read but
    made, x = round(xs + xb + xr) in x's dtype, and its columns below x_write_lim stored into x (X_OUT2: and
    round(x + xob) into the contiguous [B, D] xo). PREWAIT (FMA path):
    the caller has not waited for its PDL predecessor; the first weight chunk is loaded, then the wait."""
    w_rows = w_ptr + rows[:, None] * stride_wn  # [BLOCK_K, 1]
    w2_rows = w2_ptr + rows[:, None] * stride_w2n
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_d0 = tl.arange(0, BLOCK_D)
    s1 = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)  # folded norm: sum(x), sum(x^2) per sequence
    s2 = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    x_rows = x_ptr + offs_b[:, None] * stride_xb  # [BLOCK_B, 1]

    if USE_DOT:
        tl.static_assert(not X_SUM, "X_SUM is on the FMA path only")
        tl.static_assert(not PREWAIT, "PREWAIT is on the FMA path only")
        # [BLOCK_B, BLOCK_D] @ [BLOCK_D, BLOCK_K] on tensor cores; padding rows of x are zero.
        acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
            offs_d = d0 + offs_d0
            d_mask = offs_d < D
            x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=b_mask[:, None] & d_mask[None, :], other=0.0)
            w = tl.load(w_rows + offs_d[None, :], mask=c_mask[:, None] & d_mask[None, :], other=0.0)
            if NORM != 0:  # g * x, rounded back to the operand dtype for the tensor cores (as the unfused norm is)
                xf = x.to(tl.float32)
                s2 += xf * xf
                s1 += xf
                x = (xf * tl.load(g_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
            if ACT == 2:
                w2 = tl.load(w2_rows + offs_d[None, :], mask=c_mask[:, None] & d_mask[None, :], other=0.0)
                if DOT_FP32:
                    acc2 = tl.dot(x, tl.trans(w2.to(tl.float32)), acc2, input_precision="ieee")
                else:
                    acc2 = tl.dot(x, tl.trans(w2), acc2)
    else:
        # FMA path: one [BLOCK_K, BLOCK_D] fp32 accumulator per sequence (two at B = 2), multiplied elementwise and
        # reduced over d once after the loop; 2-D for the weight load's layout (_checks.sum_rows says why). PREWAIT:
        # the caller has not waited for its PDL predecessor; the first chunk is peeled.
        a0 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        a1 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        c0 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        c1 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        d_start = BLOCK_D if PREWAIT else 0
        if PREWAIT:  # the first chunk's weights before the PDL wait, its products after
            w = _w_chunk(w_rows, offs_d0, c_mask, D)
            w2 = w
            if ACT == 2:
                w2 = _w_chunk(w2_rows, offs_d0, c_mask, D)
            pdl_sync(PDL)
            a0, a1, c0, c1, s1, s2 = _fma_chunk(offs_d0, w, w2, a0, a1, c0, c1, s1, s2, w_rows, w2_rows, c_mask, x_ptr,
                                                x_rows, g_ptr, offs_b, b_mask, D, stride_xd, xs_ptr, xb_ptr, xr_ptr,
                                                stride_xr, x_write_lim, True, ACT, NORM, BLOCK_B, X_SUM,
                                                HAS_XB, xo_ptr, xob_ptr, X_OUT2, HAS_XOB)  # fmt: skip
        for d0 in tl.range(d_start, D, BLOCK_D, num_stages=NUM_STAGES):
            a0, a1, c0, c1, s1, s2 = _fma_chunk(d0 + offs_d0, None, None, a0, a1, c0, c1, s1, s2, w_rows, w2_rows,
                                                c_mask, x_ptr, x_rows, g_ptr, offs_b, b_mask, D, stride_xd, xs_ptr,
                                                xb_ptr, xr_ptr, stride_xr, x_write_lim, False, ACT, NORM, BLOCK_B,
                                                X_SUM, HAS_XB, xo_ptr, xob_ptr, X_OUT2, HAS_XOB)  # fmt: skip
        acc = sum_rows(a0, a1, offs_b, 1, BLOCK_B)
        acc2 = acc
        if ACT == 2:
            acc2 = sum_rows(c0, c1, offs_b, 1, BLOCK_B)

    # -- epilogue: folded norm, bias, activation, cast ----------------------------------------------
    if NORM != 0:
        ms = tl.sum(s2, axis=1) / D  # [BLOCK_B] mean of x^2
        if NORM == 1:
            mean = tl.sum(s1, axis=1) / D
            r = 1.0 / tl.sqrt(tl.maximum(ms - mean * mean, 0.0) + eps)
            rg = tl.load(rg_ptr + rows, mask=c_mask, other=0.0).to(tl.float32)
            acc = r[:, None] * (acc - mean[:, None] * rg[None, :])
        else:
            r = 1.0 / tl.sqrt(ms + eps)
            acc = acc * r[:, None]
            acc2 = acc2 * r[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    if ACT == 2:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2  # silu(gate) * up
    return acc


ROWS_FMA_TILE = None
"""(BLOCK_K, BLOCK_D) of :func:`_gather_rows_kernel`'s FMA path instead of the heuristic's (A/B knob, read at
launch time; ``bench/profile_step.py``'s ``rows_tile_<k>_<d>``)."""
ROWS_WIDE = True
"""At B = 1, 16-row programs (16 x 512 tiles) where that makes at least 2 programs per SM (up to ``ROWS_WIDE_MAX``): the
q/k/v gathers of OPT-13B at head density 0.5, OPT-6.7B, LLaMA-2-7B, and the dense step's gathers over every row;
False: the 8- / 4-row rule of v1-v8 everywhere (A/B knob, read at launch time; ``bench/profile_step.py``'s
``rows_narrow``; bench/NOTES.md v9, v19)."""
ROWS_WIDE_MAX = 16
"""Most programs per SM for which a one-matrix gather still takes ROWS_WIDE's 16-row tiles (None: no bound). 16 admits
the dense step's gathers over every row (v19, H200: the up gather that makes its input from the o_proj's sums
then has half as many programs reading them, 1280 on OPT-13B, and the q/k/v gathers ran 1-2 us faster) but not
the LM head over OPT's 50272-row vocabulary (24 programs an SM; 1-6 us slower at 16 rows); 4 is v9-v18's window
(one wave at 4 programs an SM; A/B knob read at launch time, ``bench/profile_step.py``'s ``rows_wide_window``).
SwiGLU gathers (two matrices, 16 x 256 tiles) keep that window: wider, v19's LLaMA-2-7B step was slower
(bench/NOTES.md v19)."""


def _rows_config(batch: int, n_out: int, d: int, two_mats: bool, device: torch.device) -> dict:
    """Tile sizes for :func:`_gather_rows_kernel` (a heuristic, no autotuning).

    B <= FMA_MAX_BATCH: FMA path, 4 or 8 rows per program so that even k ~ 1000 gives about one program
    per SM or more, 16 at B = 1 where that gives 2 to ROWS_WIDE_MAX programs per SM (ROWS_WIDE; at 128
    registers a thread 4 fit on an SM; H100 and H200: 1-5% off the sparse step where one wave of them does it,
    bench/NOTES.md v8-v9; the dense step's gathers over every row, several waves: 0-3% off with the o_proj's sums
    deferred into the up gather, v19); SwiGLU's two matrices only where that is 2-4 (one wave);
    d-chunks up to 512 (1 KiB of fp16 per row and stage) with the fp32 accumulator held to <= 64
    registers/thread. Above the FMA batch: tensor-core path, the batch padded to 16 (tl.dot's minimum), 16 or 32
    rows per program, 128-wide d chunks, 4 pipeline stages.
    """
    sms = num_sms(device)
    if batch <= _checks.FMA_MAX_BATCH:
        block_b = next_pow2(batch)
        block_k = 8 if cdiv(n_out, 8) >= sms else 4
        most = 4 if two_mats else ROWS_WIDE_MAX  # programs per SM
        if ROWS_WIDE and batch == 1 and 2 * sms <= cdiv(n_out, 16) and (most is None or cdiv(n_out, 16) <= most * sms):
            block_k = 16
        budget = 64 * 128 // (block_b * block_k * (2 if two_mats else 1))
        block_d = max(16, min(512, next_pow2(d), budget))
        if ROWS_FMA_TILE is not None:
            block_k, block_d = ROWS_FMA_TILE
        # the 16-row tile's one wave needs 4 programs an SM, i.e. <= 128 registers a thread: the runtime's q/k/v
        # gather took 128 on the GPU (Triton 3.6, ncu), but offline sm_90 compiles of bench/kernel_resources.py's
        # case take 154 on Triton 3.6 and 3.9 (capped: 128, no spills; bench/NOTES.md v11)
        cap = {"maxnreg": 128} if block_k == 16 else {}
        return dict(BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, USE_DOT=False, NUM_STAGES=3, num_warps=4,
                    **cap)  # fmt: skip
    block_k = 32 if cdiv(n_out, 32) >= 2 * sms else 16
    block_d = max(16, min(128, next_pow2(d)))
    return dict(BLOCK_B=16, BLOCK_K=block_k, BLOCK_D=block_d, USE_DOT=True, NUM_STAGES=4, num_warps=4)


def _launch_gather_rows(x, w, w2, idx, bias, act: int, rows_per_idx: int, out, norm=None, x_sum=None,
                        prewait=False):  # fmt: skip
    """Shared launch for gather_up / gather_swiglu / head_gather_gemv (inputs already checked; with ``norm`` a
    checked NormFold, whose bias replaces ``bias``; with ``x_sum`` a checked XSum, x then being written;
    ``prewait``: see head_gather_gemv; only on the FMA path)."""
    B, D = x.shape
    n_out = out.shape[1]
    cfg = _rows_config(B, n_out, D, act == ACT_SWIGLU, x.device)
    num_warps = cfg.pop("num_warps")
    opts = {"maxnreg": cfg.pop("maxnreg")} if "maxnreg" in cfg else {}  # a launch option, not a kernel argument
    grid = (cdiv(n_out, cfg["BLOCK_K"]),)
    pdl = use_pdl(_gather_rows_kernel, x.device)
    if norm is not None:
        bias = norm.bias
    _gather_rows_kernel[grid](
        x, w, w2, idx, bias if bias is not None else w, out,
        norm.weight if norm is not None else w, norm.rowsum if norm is not None and norm.rowsum is not None else w,
        *((x_sum.sums, x_sum.bias if x_sum.bias is not None else w, x_sum.residual) if x_sum is not None else (w,) * 3),
        *((x_sum.out2, x_sum.bias2 if x_sum.bias2 is not None else w) if x_sum is not None and x_sum.out2 is not None
          else (w, w)),
        B, n_out, D, norm.eps if norm is not None else 0.0,
        x.stride(0), x.stride(1), w.stride(0), w2.stride(0), out.stride(0),
        x_sum.residual.stride(0) if x_sum is not None else 0,
        ROWS_PER_IDX=rows_per_idx, ACT=act, NORM=0 if norm is None else NORM_CODES[norm.kind],
        HAS_BIAS=bias is not None, X_SUM=x_sum is not None, HAS_XB=x_sum is not None and x_sum.bias is not None,
        X_OUT2=x_sum is not None and x_sum.out2 is not None, HAS_XOB=x_sum is not None and x_sum.bias2 is not None,
        PREWAIT=pdl and prewait and not cfg["USE_DOT"],
        DOT_FP32=x.dtype == torch.float32 or is_interpreted(_gather_rows_kernel), PDL=pdl, launch_pdl=pdl > 0,
        num_warps=num_warps, num_stages=cfg["NUM_STAGES"], **cfg, **opts,
    )  # fmt: skip
    return out


NORM_CODES = {"layernorm": 1, "rmsnorm": 2}


@dataclass(frozen=True, eq=False)  # holds tensors: identity, not elementwise ==
class XSum:
    """A row gather's input given as the unfinished output of the projection before it: the MLP block
    (``sparse_mlp(..., finish=False)``) before a q/k/v gather, or the o_proj (``head_gather_down(...,
    finish=False)``) before the MLP block or the dense step's up gather. x = (sums + bias) + residual, rounded to
    x's dtype, which is what the producer would have stored. The consumer computes x as it streams it and writes it
    into its x argument (which the rest of the layer then reads), so the producer's finishing pass is off the critical
    path. ``sums``: the producer's fp32 sums as [B, d]; ``bias``: its [d] output bias or None; ``residual``: its [B, d]
    residual.
    ``out2`` (row gathers only, not the MLP block): a contiguous [B, d] buffer the consumer also writes,
    x + ``bias2`` (optional [d]) rounded as ``torch.add(x, bias2)`` rounds it: the dense step's next residual, into
    which cuBLAS adds the MLP's down projection (what ``head_gather_down``'s ``out2`` is when it finishes)."""

    sums: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor
    out2: torch.Tensor | None = None
    bias2: torch.Tensor | None = None


def _check_x_sum(op, x_sum, x):
    """An XSum for the FMA path (B <= FMA_MAX_BATCH): fp32 contiguous sums, bias and residual in x's dtype and shape."""
    if x_sum is None:
        return
    if not isinstance(x_sum, XSum):
        raise ValueError(f"{op}: x_sum must be an XSum (the unfinished projection before this one), got "
                         f"{type(x_sum).__name__}.")  # fmt: skip
    B, D = x.shape
    if B > _checks.FMA_MAX_BATCH:
        raise ValueError(f"{op}: x_sum is supported at batch <= {_checks.FMA_MAX_BATCH} (the FMA path), got batch "
                         f"{B}; finish the projection before (finish=True) instead.")  # fmt: skip
    check_tensor(op, "x_sum.sums", x_sum.sums, ndim=2, dtype=torch.float32, device=x.device, shape=(B, D),
                 contiguous=True)  # fmt: skip
    if x_sum.bias is not None:
        check_tensor(op, "x_sum.bias", x_sum.bias, ndim=1, dtype=x.dtype, device=x.device, shape=(D,), contiguous=True)
    check_tensor(op, "x_sum.residual", x_sum.residual, ndim=2, dtype=x.dtype, device=x.device, shape=(B, D),
                 last_dim_contiguous=True)  # fmt: skip
    if x.data_ptr() == x_sum.residual.data_ptr():
        raise ValueError(f"{op}: x is written from x_sum while its residual is read: pass another buffer as x.")
    if x_sum.out2 is None:
        if x_sum.bias2 is not None:
            raise ValueError(f"{op}: x_sum.bias2 is added into x_sum.out2; pass out2 too (or neither).")
        return
    check_tensor(op, "x_sum.out2", x_sum.out2, ndim=2, dtype=x.dtype, device=x.device, shape=(B, D), contiguous=True)
    if x_sum.out2.data_ptr() in (x.data_ptr(), x_sum.residual.data_ptr()):
        raise ValueError(f"{op}: x_sum.out2 must be a buffer of its own, not x or the residual.")
    if x_sum.bias2 is not None:
        check_tensor(op, "x_sum.bias2", x_sum.bias2, ndim=1, dtype=x.dtype, device=x.device, shape=(D,),
                     contiguous=True)  # fmt: skip


def x_sum_ref(x_sum: XSum, dtype) -> torch.Tensor:
    """Reference of the x an XSum stands for: (sums + bias) + residual in fp32, rounded to ``dtype``."""
    t = x_sum.sums.float()
    if x_sum.bias is not None:
        t = t + x_sum.bias.float()
    return (t + x_sum.residual.float()).to(dtype)


def x_sum_write_ref(x_sum: XSum, x: torch.Tensor) -> None:
    """What a consumer of ``x_sum`` writes, in plain torch: x (:func:`x_sum_ref`) and, with ``out2``, x + bias2."""
    x.copy_(x_sum_ref(x_sum, x.dtype))
    if x_sum.out2 is not None:
        x_sum.out2.copy_(x if x_sum.bias2 is None else x + x_sum.bias2)


@dataclass(frozen=True, eq=False)  # holds tensors: identity, not elementwise ==
class NormFold:
    """A layernorm / rmsnorm folded into the row gather that consumes its output (built by :func:`fold_norm`).

    ``weight`` (g) and ``norm_bias`` (beta) are the norm's own [d] parameters, ``linear_bias`` the projection's
    original bias (what the references use); ``rowsum`` (layernorm: ``W @ g``, fp32) and ``bias`` (layernorm:
    ``b + W @ beta``, fp32; rmsnorm: ``b`` as given) are what the kernel reads, per weight row. A fold belongs to
    the weights it was built from: rebuild it if they or the norm change.
    """

    kind: str
    weight: torch.Tensor
    norm_bias: torch.Tensor | None
    eps: float
    linear_bias: torch.Tensor | None
    rowsum: torch.Tensor | None
    bias: torch.Tensor | None


@torch.no_grad()
def fold_norm(w, kind, weight, norm_bias=None, eps=1e-5, bias=None, *, chunk=4096) -> NormFold:
    """Precompute what folding ``kind`` norm (gain ``weight``, shift ``norm_bias``) into ``x -> norm(x) @ w.T + bias``
    needs: for a layernorm the per-row constants ``W @ g`` and ``b + W @ beta`` (fp32, computed in fp32 chunks of
    ``chunk`` rows: one pass over w, once per model); an rmsnorm needs none (and has no shift). The gather then
    reads x raw and normalizes in its epilogue, so the norm costs no launch and no round trip of its output."""
    if kind not in NORM_CODES:
        raise ValueError(f"fold_norm: kind must be one of {sorted(NORM_CODES)}, got {kind!r}.")
    check_tensor("fold_norm", "w", w, ndim=2)
    n, d = w.shape
    check_tensor("fold_norm", "weight", weight, ndim=1, device=w.device, shape=(d,), contiguous=True)
    if kind == "rmsnorm" and norm_bias is not None:
        raise ValueError("fold_norm: an rmsnorm has no shift; pass norm_bias=None.")
    for name, t, size in (("norm_bias", norm_bias, d), ("bias", bias, n)):
        if t is not None:
            check_tensor("fold_norm", name, t, ndim=1, device=w.device, shape=(size,), contiguous=True)
    if kind == "rmsnorm":
        return NormFold(kind, weight, None, float(eps), bias, None, bias)
    g = weight.float()
    beta = norm_bias.float() if norm_bias is not None else None
    rowsum = torch.empty(n, dtype=torch.float32, device=w.device)
    folded = bias.float().clone() if bias is not None else torch.zeros(n, dtype=torch.float32, device=w.device)
    for i in range(0, n, chunk):
        wc = w[i:i + chunk].float()
        rowsum[i:i + chunk] = wc @ g
        if beta is not None:
            folded[i:i + chunk] += wc @ beta
    return NormFold(kind, weight, norm_bias, float(eps), bias, rowsum, folded)


def norm_ref(x, norm: NormFold):
    """The folded norm applied on its own, in x's dtype (the unfused computation the kernels are tested against)."""
    if norm.kind == "layernorm":
        return F.layer_norm(x, x.shape[-1:], norm.weight.to(x.dtype),
                            norm.norm_bias.to(x.dtype) if norm.norm_bias is not None else None, norm.eps)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype) * norm.weight.to(x.dtype)


def _check_norm(op, norm, w, x, bias):
    """A NormFold must match the weight it was folded for; the linear bias then lives in it."""
    if norm is None:
        return
    if not isinstance(norm, NormFold):
        raise ValueError(f"{op}: norm must be a NormFold from fold_norm(w, kind, ...), got {type(norm).__name__}.")
    if bias is not None:
        raise ValueError(f"{op}: with norm=, pass the projection's bias to fold_norm(..., bias=b) (a layernorm's "
                         "shift is folded into it), not here.")
    check_tensor(op, "norm.weight", norm.weight, ndim=1, device=w.device, shape=(x.shape[1],), contiguous=True)
    for name, t in (("norm.rowsum", norm.rowsum), ("norm.bias", norm.bias)):
        if t is not None:
            check_tensor(op, name, t, ndim=1, device=w.device, shape=(w.shape[0],), contiguous=True)
    if norm.kind == "layernorm" and norm.rowsum is None:
        raise ValueError(f"{op}: a layernorm NormFold needs its rowsum; build it with fold_norm.")


def _check_rows_inputs(op, x, w, idx, *, rows_per_idx, validate, what):
    """Checks shared by the row-gather launchers; returns (B, N_items)."""
    require_triton(op)
    check_tensor(op, "w", w, ndim=2, contiguous=True)
    check_tensor(op, "x", x, ndim=2, dtype=w.dtype, device=w.device, shape=(None, w.shape[1]))
    check_launch_device(op, _gather_rows_kernel, w)
    check_batch(op, x.shape[0])
    if w.shape[0] % rows_per_idx:
        raise ValueError(f"{op}: w has {w.shape[0]} rows, not a multiple of head_dim={rows_per_idx}.")
    n_items = w.shape[0] // rows_per_idx
    name = "idx" if rows_per_idx == 1 else "head_idx"
    check_index(op, name, idx, n=n_items, device=w.device, validate=validate, what=what)
    return x.shape[0], n_items


def _check_bias(op, name, bias, w, n_rows):
    if bias is not None:
        check_tensor(op, name, bias, ndim=1, dtype=w.dtype, device=w.device, shape=(n_rows,), contiguous=True)


# ---------------------------------------------------------------------------------------------
# gather_up
# ---------------------------------------------------------------------------------------------


def gather_up(x, w, idx, bias=None, act="relu", *, norm=None, validate=True, out=None, x_sum=None):
    """Sparse up-projection ``act(x @ w[idx].T + bias[idx])`` -> ``[B, k]``; with ``norm``, of ``norm(x)``.

    Args:
        x: ``[B, d]`` activations, 1 <= B <= 16, same dtype as ``w`` (fp16/bf16/fp32).
        w: ``[N, d]`` contiguous weight in ``nn.Linear`` layout (OPT ``fc1.weight``).
        idx: ``[k]`` int32/int64, the union of active neurons for the batch, no duplicates.
        bias: optional ``[N]`` (the *full* bias; it is gathered with ``idx``).
        act: ``"relu"`` (OPT fc1) or ``"none"`` (plain row gather).
        norm: optional :class:`NormFold` (``fold_norm(w, ...)``): x is the raw residual stream and the norm
            before this projection runs inside the kernel; the projection's bias then comes from the fold.
        validate: check index range/duplicates (one host sync; skipped under graph capture).
        out: optional preallocated ``[B, k]`` output.
        x_sum: optional :class:`XSum` (B <= FMA_MAX_BATCH): x is not read but made from the unfinished projection
            before (e.g. ``head_gather_down(..., finish=False)``) and written into ``x`` (and ``x_sum.out2``).
    """
    op = "gather_up"
    if act not in _ACTS:
        raise ValueError(f"{op}: act must be one of {sorted(_ACTS)}, got {act!r}.")
    B, N = _check_rows_inputs(op, x, w, idx, rows_per_idx=1, validate=validate, what="rows")
    _check_bias(op, "bias", bias, w, N)
    _check_norm(op, norm, w, x, bias)
    _check_x_sum(op, x_sum, x)
    k = idx.shape[0]
    if out is None:
        out = torch.empty((B, k), dtype=x.dtype, device=x.device)
    else:
        check_out(op, out, shape=(B, k), dtype=x.dtype, device=x.device)
    return _launch_gather_rows(x, w, w, idx, bias, _ACTS[act], 1, out, norm, x_sum)


def gather_up_ref(x, w, idx, bias=None, act="relu"):
    """Reference for :func:`gather_up` in plain torch, computed in the inputs' dtype."""
    idx = idx.long()
    y = x @ w[idx].T
    if bias is not None:
        y = y + bias[idx]
    return torch.relu(y) if act == "relu" else y


# ---------------------------------------------------------------------------------------------
# gather_swiglu
# ---------------------------------------------------------------------------------------------


def gather_swiglu(x, w_gate, w_up, idx, *, norm=None, validate=True, out=None, x_sum=None):
    """Sparse SwiGLU ``silu(x @ w_gate[idx].T) * (x @ w_up[idx].T)`` -> ``[B, k]``.

    Both weights are ``[N, d]`` contiguous (LLaMA ``gate_proj.weight`` / ``up_proj.weight``);
    one kernel reads the two selected rows of each neuron and never writes the intermediate.
    ``norm``: an rmsnorm :class:`NormFold` applied to x inside the kernel (a layernorm's row constants would
    differ between the two weights, so only rmsnorm is folded here). ``x_sum``: as in :func:`gather_up`.
    """
    op = "gather_swiglu"
    B, N = _check_rows_inputs(op, x, w_gate, idx, rows_per_idx=1, validate=validate, what="rows")
    check_tensor(op, "w_up", w_up, ndim=2, dtype=w_gate.dtype, dtype_of="w_gate", device=w_gate.device,
                 device_of="w_gate", shape=tuple(w_gate.shape), contiguous=True)  # fmt: skip
    _check_norm(op, norm, w_gate, x, None)
    if norm is not None and norm.kind != "rmsnorm":
        raise ValueError(f"{op}: only an rmsnorm can be folded into the SwiGLU gather (got {norm.kind}); run the "
                         "norm first (fused_ops.norm_fused) and pass norm=None.")
    _check_x_sum(op, x_sum, x)
    k = idx.shape[0]
    if out is None:
        out = torch.empty((B, k), dtype=x.dtype, device=x.device)
    else:
        check_out(op, out, shape=(B, k), dtype=x.dtype, device=x.device)
    return _launch_gather_rows(x, w_gate, w_up, idx, None, ACT_SWIGLU, 1, out, norm, x_sum)


def gather_swiglu_ref(x, w_gate, w_up, idx):
    """Reference for :func:`gather_swiglu`."""
    idx = idx.long()
    return F.silu(x @ w_gate[idx].T) * (x @ w_up[idx].T)


# ============================================================================================
# kernel 2: down projection, weighted sum of gathered rows
# ============================================================================================


@jit
def _gather_down_kernel(
    # pointers
    h_ptr,  # [B, K * R] compact activations (viewed as [B, K, R])
    w_ptr,  # [N * R, D] transposed down weight, rows contiguous
    idx_ptr,  # [K]
    bias_ptr,  # [D] or dummy
    res_ptr,  # [B, D] residual or dummy
    out_ptr,  # [B, D]
    out2_ptr,  # OUT2: [B, D] second output, out (rounded) + bias2, else dummy
    bias2_ptr,  # OUT2: [D] its bias, or dummy
    part_ptr,  # [SPLITS, B, D] fp32 partial sums (only when WRITE_PARTIAL)
    cnt_ptr,  # [cdiv(D, BLOCK_D)] int32 arrival counters, zero between launches (FUSED_REDUCE)
    zero_ptr,  # ZERO: [n_zero] fp32 to zero, else dummy
    # sizes
    B,
    n_in,  # K * R, the reduction length
    D,
    rows_per_split,
    n_splits,
    n_zero,
    # strides
    stride_hb,
    stride_hg,  # between index groups (h.stride(1) for [B, K], a.stride(1) for [B, K, R])
    stride_hr,  # inside a group (0 when R == 1)
    stride_wn,
    stride_rb,
    stride_ob,
    stride_o2b,
    # meta-parameters
    ROWS_PER_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT2: tl.constexpr,  # also store out + bias2 into out2 (the next residual for a cuBLAS GEMV to add into)
    HAS_BIAS2: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,  # split-k: store fp32 partials, a second kernel finishes
    FUSED_REDUCE: tl.constexpr,  # split-k in one launch: the last program of a column slab sums the partials
    FENCE: tl.constexpr,  # per-thread GPU fence before the arrival (FUSED_REDUCE; off in the interpreter)
    ACCUMULATE: tl.constexpr,  # unfinished: out is fp32 sums, every program adds its part with atomics (no epilogue)
    ZERO: tl.constexpr,  # zero n_zero fp32 at zero_ptr, BLOCK_Z a program (an earlier launch's consumed sums)
    BLOCK_Z: tl.constexpr,
    PREWAIT: tl.constexpr,  # with PDL: the first step's selection and weights read before the wait
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,  # gathered rows per loop step
    BLOCK_D: tl.constexpr,  # output columns per program
    BLOCK_S: tl.constexpr,  # FUSED_REDUCE: split partials the last program loads at once
    BLOCK_R: tl.constexpr,  # FUSED_REDUCE: batch rows the last program sums and finishes (<= BLOCK_B; >= B)
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[b, :] = sum_j h[b, j] * w[row(j), :] (+ bias) (+ residual).

    Grid: (cdiv(D, BLOCK_D), SPLITS). Program (i, s) owns output columns
    [i*BLOCK_D, (i+1)*BLOCK_D) and reduction rows [s*rows_per_split, (s+1)*rows_per_split).
    With one split (the default for d >= 32 * #SMs) it owns the whole sum and writes the
    final result, epilogue fused; no atomics, no workspace, deterministic. ACCUMULATE: every program adds its
    fp32 part into out with atomics and the consumer finishes the sums (head_gather_down(finish=False)).
    """
    if not PREWAIT:
        pdl_sync(PDL)
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_mask = offs_d < D
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    j_lo = pid_s * rows_per_split
    j_hi = tl.minimum(j_lo + rows_per_split, n_in)
    # the first step's selection and weights (PREWAIT: before the PDL wait)
    w, grp, within, j_mask = _down_w_step(w_ptr, idx_ptr, j_lo, j_hi, offs_d, d_mask, stride_wn, ROWS_PER_IDX, BLOCK_J)
    if PREWAIT:
        pdl_sync(PDL)
    if ZERO:
        zero_slice(zero_ptr, n_zero, pid_s * tl.num_programs(0) + pid_d, BLOCK_Z)

    if USE_DOT:
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    else:  # FMA path: one 3-D [BLOCK_B, BLOCK_J, BLOCK_D] product (bench/NOTES.md v11-v12: the 2-D forms were slower)
        acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_D], dtype=tl.float32)
    acc = _down_h_step(acc, w, h_ptr, grp, within, j_mask, offs_b, b_mask, stride_hb, stride_hg, stride_hr, USE_DOT,
                       DOT_FP32)  # fmt: skip
    for j0 in tl.range(j_lo + BLOCK_J, j_hi, BLOCK_J, num_stages=NUM_STAGES):
        w, grp, within, j_mask = _down_w_step(w_ptr, idx_ptr, j0, j_hi, offs_d, d_mask, stride_wn, ROWS_PER_IDX,
                                              BLOCK_J)  # fmt: skip
        acc = _down_h_step(acc, w, h_ptr, grp, within, j_mask, offs_b, b_mask, stride_hb, stride_hg, stride_hr,
                           USE_DOT, DOT_FP32)  # fmt: skip
    pdl_trigger(PDL)  # PDL mode 3: the next kernel may launch once every program has read its rows
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)  # [BLOCK_B, BLOCK_D]

    bd_mask = b_mask[:, None] & d_mask[None, :]
    if ACCUMULATE:
        tl.atomic_add(out_ptr + offs_b[:, None] * stride_ob + offs_d[None, :], acc, mask=bd_mask, sem="relaxed",
                      scope="gpu")  # fmt: skip
    elif WRITE_PARTIAL:
        part_ptrs = part_ptr + (pid_s * B + offs_b[:, None]) * D + offs_d[None, :]
        tl.store(part_ptrs, acc, mask=bd_mask)
        if FUSED_REDUCE:
            # threadfence-reduction pattern: every thread's partial is stored and fenced (barrier), one gpu-scope
            # acq_rel arrival per program; the program that arrives last sums all partials of its slab in a fixed
            # order (deterministic: the same whoever is last) and resets the counter for the next launch/replay.
            fence_gpu(FENCE)
            tl.debug_barrier()
            old = tl.atomic_add(cnt_ptr + pid_d, 1, sem="acq_rel", scope="gpu")
            if old == n_splits - 1:  # over the batch's BLOCK_R rows (the tensor-core path pads BLOCK_B to 16)
                offs_r = tl.arange(0, BLOCK_R)
                rd_mask = (offs_r < B)[:, None] & d_mask[None, :]
                tot = _sum_partials(part_ptr, n_splits, B, D, offs_r, offs_d, rd_mask, BLOCK_R, BLOCK_D, BLOCK_S)
                _down_epilogue(tot, bias_ptr, res_ptr, out_ptr, out2_ptr, bias2_ptr, offs_r, offs_d, d_mask, rd_mask,
                               stride_rb, stride_ob, stride_o2b, HAS_BIAS, HAS_RES, OUT2, HAS_BIAS2)  # fmt: skip
                tl.atomic_xchg(cnt_ptr + pid_d, 0, sem="relaxed", scope="gpu")
    else:
        _down_epilogue(acc, bias_ptr, res_ptr, out_ptr, out2_ptr, bias2_ptr, offs_b, offs_d, d_mask, bd_mask, stride_rb,
                       stride_ob, stride_o2b, HAS_BIAS, HAS_RES, OUT2, HAS_BIAS2)  # fmt: skip


@jit
def _sum_partials(part_ptr, n_splits, B, D, offs_r, offs_d, rd_mask, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr):  # fmt: skip
    """The fp32 split-k partials ``[n_splits, B, D]`` of one column slab, summed in a fixed order -> [BLOCK_R, BLOCK_D]
    (rows offs_r, columns offs_d): BLOCK_S splits are loaded as one tile and added as a tree, so the last program waits
    for one memory round trip per BLOCK_S splits, not one per split (a loop over single splits issues each load only
    after the previous add)."""
    offs_s = tl.arange(0, BLOCK_S)
    tot = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s = s0 + offs_s  # [BLOCK_S]
        ptrs = part_ptr + (s[:, None, None] * B + offs_r[None, :, None]) * D + offs_d[None, None, :]
        mask = (s < n_splits)[:, None, None] & rd_mask[None, :, :]
        tot += tl.sum(tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    return tot


@jit
def _down_w_step(w_ptr, idx_ptr, j0, j_hi, offs_d, d_mask, stride_wn, ROWS_PER_IDX: tl.constexpr,
                 BLOCK_J: tl.constexpr):  # fmt: skip
    """Gathered rows j0..j0+BLOCK_J (below j_hi) of one column slab: the weights [BLOCK_J, BLOCK_D] and where each row's
    activation sits (its index group and the offset inside it)."""
    offs_j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J] positions in h
    j_mask = offs_j < j_hi
    uj = offs_j.to(tl.uint32)  # (non-negative: unsigned // and % by the constexpr R are a shift and a mask)
    grp = (uj // ROWS_PER_IDX).to(tl.int32)
    within = (uj % ROWS_PER_IDX).to(tl.int32)
    sel = tl.load(idx_ptr + grp, mask=j_mask, other=0)
    rows = sel.to(tl.int64) * ROWS_PER_IDX + within
    w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_d[None, :], mask=j_mask[:, None] & d_mask[None, :],
                other=0.0)  # fmt: skip
    return w, grp, within, j_mask


@jit
def _down_h_step(acc, w, h_ptr, grp, within, j_mask, offs_b, b_mask, stride_hb, stride_hg, stride_hr,
                 USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):  # fmt: skip
    """One step's activations [BLOCK_B, BLOCK_J] times its weights, added into acc: [BLOCK_B, BLOCK_D] on tensor
    cores, the 3-D [BLOCK_B, BLOCK_J, BLOCK_D] product on the FMA path."""
    h = tl.load(h_ptr + offs_b[:, None] * stride_hb + grp[None, :] * stride_hg + within[None, :] * stride_hr,
                mask=b_mask[:, None] & j_mask[None, :], other=0.0)  # fmt: skip
    if USE_DOT:
        if DOT_FP32:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    else:
        acc += h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    return acc


@jit
def _down_epilogue(acc, bias_ptr, res_ptr, out_ptr, out2_ptr, bias2_ptr, offs_b, offs_d, d_mask, bd_mask, stride_rb,
                   stride_ob, stride_o2b, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT2: tl.constexpr,
                   HAS_BIAS2: tl.constexpr):  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + offs_b[:, None] * stride_rb + offs_d[None, :], mask=bd_mask, other=0.0)
        acc += res.to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_d[None, :], y, mask=bd_mask)
    if OUT2:
        _store_out2(y, out2_ptr + offs_b[:, None] * stride_o2b + offs_d[None, :], bias2_ptr, offs_d, d_mask, bd_mask,
                    HAS_BIAS2)  # fmt: skip


@jit
def _store_out2(y, out2_ptrs, bias2_ptr, offs_d, d_mask, mask, HAS_BIAS2: tl.constexpr):
    """out2 = y + bias2 from the stored (rounded) output y (its last axis the columns offs_d), rounded again: what
    ``torch.add(out, bias2)`` gives."""
    y2 = y.to(tl.float32)
    if HAS_BIAS2:
        y2 += tl.load(bias2_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(out2_ptrs, y2.to(out2_ptrs.dtype.element_ty), mask=mask)


@jit
def _reduce_splits_kernel(
    # pointers
    part_ptr,  # [SPLITS, B, D] fp32
    bias_ptr,
    res_ptr,
    out_ptr,
    out2_ptr,
    bias2_ptr,
    # sizes
    B,
    D,
    splits,
    # strides
    stride_rb,
    stride_ob,
    stride_o2b,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT2: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    """Second stage of split-k: sum the partials in a fixed order (deterministic), epilogue."""
    pdl_sync(PDL)
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + (s * B + pid_b) * D + offs_d, mask=d_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + pid_b * stride_rb + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + pid_b * stride_ob + offs_d, y, mask=d_mask)
    if OUT2:
        _store_out2(y, out2_ptr + pid_b * stride_o2b + offs_d, bias2_ptr, offs_d, d_mask, d_mask, HAS_BIAS2)


DOWN_SCHEDULE = os.environ.get("DEJAVU_DOWN_SCHEDULE", "split")  # "split" (v2) or "slab" (v1); for A/B sweeps


def _down_config_v1(batch: int, n_in: int, d: int, device: torch.device, split_k: int | None) -> dict:
    """v1: 32-column slabs owning the whole reduction (split-k only for narrow d, with a second reduce kernel).

    Measured on H200 (OPT-30B): ~2x roofline at density 1, 2.3x at 0.1: 64-byte row segments and only
    d/32 programs do not stream HBM well. Kept for A/B (``DEJAVU_DOWN_SCHEDULE=slab``).
    """
    if batch <= _checks.FMA_MAX_BATCH:  # fp32 accumulator [B, 128, 32]: 32 (B=1) or 64 (B=2) registers/thread
        block_b, block_j, use_dot, stages = next_pow2(batch), 128, False, 4
    else:
        block_b, block_j, use_dot, stages = 16, 128, True, 4
    block_d = 32
    n_d = cdiv(d, block_d)
    if split_k is None:
        sms = num_sms(device)
        split_k = 1 if n_d >= sms else max(1, min(cdiv(2 * sms, n_d), cdiv(n_in, 2 * block_j)))
    rows_per_split = cdiv(n_in, max(1, min(int(split_k), n_in)))
    if rows_per_split > block_j:  # whole tiles per split; the split count may shrink
        rows_per_split = cdiv(rows_per_split, block_j) * block_j
    split_k = cdiv(n_in, rows_per_split)
    return dict(BLOCK_B=block_b, BLOCK_J=block_j, BLOCK_D=block_d, USE_DOT=use_dot, NUM_STAGES=stages,
                num_warps=4, splits=split_k, rows_per_split=rows_per_split, fused=False)  # fmt: skip


DOWN_PROGRAMS_PER_SM = 2
"""Programs per SM the v2 down schedule aims for when it picks the split count (A/B knob, read at launch time)."""


def _down_config(batch: int, n_in: int, d: int, device: torch.device, split_k: int | None) -> dict:
    """Tile sizes and split count for :func:`_gather_down_kernel` (v2, "split").

    Wide column slabs (256 columns = 512-byte contiguous runs per row on the FMA path; 128 on the tensor-core path) so
    each row read is several full 128-byte lines, and the *rows* split over ~2 programs per SM to fill the GPU.
    The partial sums are combined inside the same launch (``FUSED_REDUCE``: the last-arriving program of a slab
    adds the fp32 partials in a fixed order, then the fused bias/residual epilogue), so split-k costs no second
    launch, no memset, and stays deterministic. ``split_k`` forces a split count.
    """
    if DOWN_SCHEDULE == "slab":
        return _down_config_v1(batch, n_in, d, device, split_k)
    # FMA path: fp32 accumulator [B, 16, 256] = 32 registers/thread (4 warps at B=1, 8 at B=2).
    if batch <= _checks.FMA_MAX_BATCH:
        # 16 rows per step (was 32): bench/tune_tiles.py, H200, graph replay: OPT-13B o_proj 12.6 -> 11.0 us, fc2
        # 10.4 -> 9.9 us, OPT-30B o_proj 18.9 -> 16.9 us (fc2 within run-to-run noise)
        block_b, block_j, block_d, use_dot, warps = next_pow2(batch), 16, 256, False, 4 if batch == 1 else 8
    else:
        block_b, block_j, block_d, use_dot, warps = 16, 64, 128, True, 4
    block_d = max(16, min(block_d, next_pow2(d)))
    n_d = cdiv(d, block_d)
    if split_k is None:
        split_k = max(1, min(cdiv(DOWN_PROGRAMS_PER_SM * num_sms(device), n_d), cdiv(n_in, 2 * block_j)))
    rows_per_split = cdiv(n_in, max(1, min(int(split_k), n_in)))
    rows_per_split = cdiv(rows_per_split, block_j) * block_j  # whole tiles per split; the count may shrink
    split_k = cdiv(n_in, rows_per_split)
    return dict(BLOCK_B=block_b, BLOCK_J=block_j, BLOCK_D=block_d, USE_DOT=use_dot, NUM_STAGES=4,
                num_warps=warps, splits=split_k, rows_per_split=rows_per_split, fused=True)  # fmt: skip


REDUCE_BLOCK_S = None
"""Split partials the fused split-k reduction loads at once, instead of the launcher's choice (A/B knob read at launch
time; 1 loads one split per memory round trip, as v1-v17's loop did; ``bench/profile_step.py``'s ``reduce_serial``)."""

REDUCE_BATCH_ROWS = True
"""The fused split-k reduction's last program sums and finishes the batch's next power of two rows instead of the batch
tile's (16 on the tensor-core path, 12 of them padding at B = 4): OPT-13B (0.1, 0.5) on an H200, same process, B = 2
3.904 against 4.009 ms, B = 4 4.096 against 4.198, B = 16 4.852 against 4.857 (bench/NOTES.md v19). A/B knob read at
launch time; ``bench/profile_step.py``'s ``reduce_padded_rows`` is the padded form (v18's)."""

_COUNTERS: dict = {}  # device -> (int32 zeros, next offset): arrival counters of the fused split-k reduction
_N_COUNTERS = 1 << 16


def _counters(device, n: int) -> torch.Tensor:
    """A slice of ``n`` zeroed counters. The kernel resets what it uses, so a slice is zero again once its launch
    ends; slices rotate through 64 K entries so launches in flight together (other streams) never share one.
    A CUDA graph bakes the slice into each captured launch, which is fine: replays of one launch are ordered."""
    key = str(device)
    buf, off = _COUNTERS.get(key, (None, 0))
    if buf is None:
        buf = torch.zeros(_N_COUNTERS, dtype=torch.int32, device=device)
    if off + n > _N_COUNTERS:
        off = 0
    _COUNTERS[key] = (buf, off + n)
    return buf[off:off + n]


def _launch_gather_down(h, h_strides, w, idx, bias, residual, rows_per_idx, out, split_k, finish=True, zero=None,
                        op="gather_down", prewait=False, out2=None, bias2=None):  # fmt: skip
    """Shared launch for gather_down / head_gather_down (inputs already checked). ``finish=False``: out holds fp32
    sums the programs add into (the split-k partials summed by atomics instead, no bias or residual); ``zero``: an
    fp32 tensor set to 0 after the PDL wait (checked here); ``out2``: a second output, out + ``bias2`` (checked)."""
    B, D = out.shape
    n_in = idx.shape[0] * rows_per_idx
    cfg = _down_config(B, n_in, D, w.device, split_k)
    num_warps, splits, rows_per_split = cfg.pop("num_warps"), cfg.pop("splits"), cfg.pop("rows_per_split")
    partial = finish and splits > 1
    fused = cfg.pop("fused") and partial
    part = torch.empty((splits, B, D), dtype=torch.float32, device=w.device) if partial else out
    n_d = cdiv(D, cfg["BLOCK_D"])
    cnt = _counters(w.device, n_d) if fused else part
    res = residual if residual is not None else out
    # the fused reduction's tile of partials on the FMA path: up to 64 fp32 a thread; one split a step on the
    # tensor-core path, where any tile slowed the whole kernel (H200, OPT-13B o_proj at B = 4: 13.0 us with one split a
    # step, 14.9-17.4 with 2-8; bench/NOTES.md v18)
    block_s = 1 if cfg["USE_DOT"] else min(next_pow2(splits), 64 * 32 * num_warps // (next_pow2(B) * cfg["BLOCK_D"]))
    block_s = max(1, block_s) if REDUCE_BLOCK_S is None else REDUCE_BLOCK_S
    grid = (n_d, splits)
    n_zero, block_z = check_zero(op, zero, out, "output", n_d * splits)
    pdl = use_pdl(_gather_down_kernel, w.device)
    o2 = out2 if out2 is not None else out
    b2 = bias2 if bias2 is not None else w
    _gather_down_kernel[grid](
        h, w, idx, bias if bias is not None else w, res, out, o2, b2, part, cnt, zero if zero is not None else part,
        B, n_in, D, rows_per_split, splits, n_zero,
        *h_strides, w.stride(0), res.stride(0), out.stride(0), o2.stride(0),
        ROWS_PER_IDX=rows_per_idx, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        OUT2=out2 is not None, HAS_BIAS2=bias2 is not None,
        WRITE_PARTIAL=partial, FUSED_REDUCE=fused, FENCE=fused and not is_interpreted(_gather_down_kernel),
        ACCUMULATE=not finish, ZERO=n_zero > 0, BLOCK_Z=block_z, PREWAIT=pdl and prewait, BLOCK_S=block_s,
        BLOCK_R=next_pow2(B) if REDUCE_BATCH_ROWS else cfg["BLOCK_B"],
        DOT_FP32=w.dtype == torch.float32 or is_interpreted(_gather_down_kernel), PDL=pdl, launch_pdl=pdl > 0,
        num_warps=num_warps, num_stages=cfg["NUM_STAGES"], **cfg,
    )  # fmt: skip
    if partial and not fused:
        block = 256
        pdl_r = use_pdl(_reduce_splits_kernel, w.device)  # its own: PDL_EXCLUDE / PDL_LATE name it apart
        _reduce_splits_kernel[(B, cdiv(D, block))](
            part, bias if bias is not None else w, res, out, o2, b2, B, D, splits, res.stride(0), out.stride(0),
            o2.stride(0), HAS_BIAS=bias is not None, HAS_RES=residual is not None, OUT2=out2 is not None,
            HAS_BIAS2=bias2 is not None, BLOCK_D=block, PDL=pdl_r, launch_pdl=pdl_r > 0,
            num_warps=2,
        )  # fmt: skip
    return out


def _check_out2(op, out2, bias2, out, w, B, D):
    """``out2`` / ``bias2`` of a down projection (``out`` already made): the second output must be its own [B, d]
    buffer of the weights' dtype and device; ``bias2`` only with it."""
    if out2 is None:
        if bias2 is not None:
            raise ValueError(f"{op}: bias2 is added into out2; pass out2 too (or neither).")
        return
    check_tensor(op, "out2", out2, ndim=2, dtype=w.dtype, device=w.device, shape=(B, D), contiguous=True)
    if out2.data_ptr() == out.data_ptr():
        raise ValueError(f"{op}: out2 must be another buffer than out.")
    if bias2 is not None:
        check_tensor(op, "bias2", bias2, ndim=1, dtype=w.dtype, device=w.device, shape=(D,), contiguous=True)


def _check_down_epilogue(op, bias, residual, w, B, D):
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtype=w.dtype, device=w.device, shape=(D,), contiguous=True)
    if residual is not None:
        check_tensor(op, "residual", residual, ndim=2, dtype=w.dtype, device=w.device, shape=(B, D),
                     last_dim_contiguous=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# gather_down
# ---------------------------------------------------------------------------------------------


def gather_down(h, w2t, idx, bias=None, residual=None, *, validate=True, out=None, split_k=None):
    """Sparse down-projection ``h @ w2t[idx] (+ bias) (+ residual)`` -> ``[B, d]``.

    Args:
        h: ``[B, k]`` compact activations (column j belongs to neuron ``idx[j]``).
        w2t: ``[N, d]`` contiguous, the *transposed* down weight (``fc2.weight.T`` /
            ``down_proj.weight.T``, stored once at load time instead of the original).
        idx: ``[k]`` int32/int64 selected neurons, no duplicates.
        bias: optional ``[d]`` output bias; residual: optional ``[B, d]`` added in fp32.
        split_k: number of reduction splits (None: heuristic, 1 for d >= 32 * #SMs).
    """
    op = "gather_down"
    require_triton(op)
    check_tensor(op, "w2t", w2t, ndim=2, contiguous=True)
    check_launch_device(op, _gather_down_kernel, w2t)
    check_tensor(op, "h", h, ndim=2, dtype=w2t.dtype, device=w2t.device)
    check_batch(op, h.shape[0])
    check_index(op, "idx", idx, n=w2t.shape[0], device=w2t.device, validate=validate)
    B, D = h.shape[0], w2t.shape[1]
    if h.shape[1] != idx.shape[0]:
        raise ValueError(f"{op}: h has {h.shape[1]} columns but idx selects {idx.shape[0]} rows; "
                         f"h must be the compact activations of exactly the selected neurons.")  # fmt: skip
    _check_down_epilogue(op, bias, residual, w2t, B, D)
    if out is None:
        out = torch.empty((B, D), dtype=h.dtype, device=h.device)
    else:
        check_out(op, out, shape=(B, D), dtype=h.dtype, device=h.device)
    return _launch_gather_down(h, (h.stride(0), h.stride(1), 0), w2t, idx, bias, residual, 1, out, split_k)


def gather_down_ref(h, w2t, idx, bias=None, residual=None):
    """Reference for :func:`gather_down`."""
    y = h @ w2t[idx.long()]
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    return y
