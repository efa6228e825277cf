"""The predictor step of Deja Vu decoding: low-rank scores, then a fixed-size batch top-k.

Per layer, a small low-rank predictor scores every neuron (or head) from the current hidden
state, ``scores = rmsnorm(x) @ a @ b + bias`` with ``a: [d, r]``, ``b: [r, N]`` and ``r << d``.
The union over the batch of the highest-scoring entries becomes the index vector the sparse
kernels consume.

For the graph-captured decode step: :func:`lowrank_gemv` (Triton: one GEMV over a row-major
factor, optional fused RMS normalization of ``x``, optional max over the batch in the epilogue,
fp32 accumulation, fp32 or 16-bit out) and :func:`select_topk` (the one-program
:func:`topk_select` for short score vectors such as heads, an unsorted ``torch.topk`` written in
place for neurons). References: :func:`lowrank_gemv_ref`, :func:`topk_select_ref`. (The reference
runtime scores with ``LowRank`` itself and selects with ``runtime.selection``.)

Why (measured, OPT-13B shape, batch 1, inside the CUDA graph; ``bench/profile_step.py`` and
``bench/select_micro.py``, numbers in bench/NOTES.md): cuBLAS runs ``[1, 320] x [320, 20480]`` as
split-K plus a reduce kernel (~27 us for 13 MB on an H100, ~5x its bandwidth floor), and the old
``topk`` + ``sort`` took ~5 launches and ~45 us, the sort alone ~30 us. That chain (~80-100 us per
layer) was longer than the sparse layer it was meant to overlap. The GEMVs here stream their
weights once at batch <= 16; the gather kernels accept indices in any order, so the sort goes; the
scores are stored in the model's dtype (as ``LowRank`` computes them), so ``torch.topk`` needs 2
radix passes instead of 4 (OPT-13B step on an H200: 5.68 -> 4.00 -> 3.51 ms over these changes).
:func:`topk_select` is a bisection for the k-th largest score on order-preserving integer keys
(<= 32 block-wide counts) and a stream compaction (two cumsums): exact, ascending, ties at the
threshold to the lowest indices (:func:`topk_select_ref`, a stable sort, defines the same set),
and one launch -- but on one SM, so it only wins for short vectors.
"""

from __future__ import annotations

import torch

from ._checks import (
    check_batch,
    check_launch_device,
    check_out,
    check_tensor,
    cdiv,
    jit,
    next_pow2,
    require_triton,
    tl,
)


def predictor_bytes(d, r, N, dtype=torch.float16, bias=True):
    """Bytes one predictor reads per decode step: ``a`` (d x r), ``b`` (r x N), ``bias`` (N)."""
    if isinstance(dtype, str):
        dtype = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[dtype]  # fmt: skip
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (d * r + r * N + (N if bias else 0)) * itemsize



# ============================================================================================
# Triton: GEMV over a row-major factor (optional fused RMS norm, optional batch max)
# ============================================================================================


@jit
def _lowrank_gemv_kernel(
    x_ptr,  # [B, D] input (any float dtype; a strided view is fine)
    w_ptr,  # [N, D] weight, row-major: one row per output
    bias_ptr,  # [N] or dummy
    out_ptr,  # [B, N] (or [1, N] with BATCH_MAX), fp32 or the weights' dtype
    B,
    N,
    D,
    stride_xb,
    stride_wn,
    stride_ob,
    eps,
    NORM: tl.constexpr,  # scale row b by rsqrt(mean(x[b]^2) + eps) (LowRank's normalization)
    HAS_BIAS: tl.constexpr,
    BATCH_MAX: tl.constexpr,  # write max over the batch (one row) instead of B rows
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """out[b, n] = (x[b] . w[n]) * (rms^-1 of x[b] if NORM) + bias[n], fp32 accumulation.

    One program owns BLOCK_N weight rows and walks all of d; the batch is a tile inside the program, so each
    weight element is loaded once. Every program streams the whole x row anyway, so the RMS statistic costs
    nothing extra: the normalization commutes with the dot product (a per-row scalar). Grid: (cdiv(N, BLOCK_N),).
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_d0 = tl.arange(0, BLOCK_D)
    acc3 = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_D], dtype=tl.float32)
    ss = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
        offs_d = d0 + offs_d0
        d_mask = offs_d < D
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :], mask=b_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        acc3 += x[:, None, :] * w[None, :, :]
        if NORM:
            ss += x * x
    acc = tl.sum(acc3, axis=2)  # [BLOCK_B, BLOCK_N]
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / D + eps)
        acc = acc * inv[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if BATCH_MAX:
        best = tl.max(tl.where(b_mask[:, None], acc, float("-inf")), axis=0)  # [BLOCK_N]
        tl.store(out_ptr + offs_n, best.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=b_mask[:, None] & n_mask[None, :])  # fmt: skip


def _gemv_config(batch: int, n: int, d: int) -> dict:
    """4 rows per program for short outputs (the first factor: r rows of length d), 16 for long ones (the second:
    N rows of length r); the fp32 product tile [B, rows, d-chunk] held to 64 registers/thread at 4 warps."""
    block_b = next_pow2(batch)
    block_n = 16 if n >= 4096 else 4
    block_d = max(16, min(512, next_pow2(d), 8192 // (block_b * block_n)))
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, NUM_STAGES=3, num_warps=4)


def lowrank_gemv(x, w, bias=None, *, norm=False, eps=1e-6, batch_max=False, out_dtype=torch.float32, out=None):
    """One predictor factor: ``rmsnorm(x) @ w.T + bias`` (``norm=True``) or ``x @ w.T + bias`` -> ``[B, N]``.

    Accumulation is fp32; the result is stored as ``out_dtype`` (fp32 by default). The decode step stores the final
    scores in the model's dtype, as the reference ``LowRank`` computes them, which also halves the radix passes of
    the ``torch.topk`` that ranks them (16-bit keys).

    ``batch_max=True`` returns ``[1, N]``, the max over the batch (what a batch top-k ranks: a neuron is kept if any
    sequence wants it), computed in the epilogue, so no separate reduction launch and no [B, N] round trip.

    Args:
        x: ``[B, d]``, B <= 16, float16/bfloat16/float32; its last dimension must be contiguous (a column slice
            of a wider buffer is fine: the first factor's output is sliced per predictor).
        w: ``[N, d]`` contiguous, row per output: ``LowRank.a.weight`` ([r, d]) or ``LowRank.b.weight`` ([N, r]).
        bias: optional ``[N]``, same dtype as ``w``.
        norm: scale each row of x by ``rsqrt(mean(x^2) + eps)`` first (``LowRank``'s RMS normalization, no gain).
        out_dtype: float32, float16 or bfloat16.
        out: optional preallocated ``out_dtype`` ``[B, N]`` (``[1, N]`` with ``batch_max``).
    """
    op = "lowrank_gemv"
    require_triton(op)
    check_tensor(op, "w", w, ndim=2, contiguous=True)
    check_launch_device(op, _lowrank_gemv_kernel, w)
    check_tensor(op, "x", x, ndim=2, device=w.device, shape=(None, w.shape[1]), last_dim_contiguous=True)
    check_batch(op, x.shape[0])
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtype=w.dtype, device=w.device, shape=(w.shape[0],), contiguous=True)
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}.")
    B, (N, D) = x.shape[0], w.shape
    rows = 1 if batch_max else B
    if out is None:
        out = torch.empty((rows, N), dtype=out_dtype, device=w.device)
    else:
        check_out(op, out, shape=(rows, N), dtype=out_dtype, device=w.device)
    cfg = _gemv_config(B, N, D)
    nw = cfg.pop("num_warps")
    _lowrank_gemv_kernel[(cdiv(N, cfg["BLOCK_N"]),)](
        x, w, bias if bias is not None else w, out, B, N, D, x.stride(0), w.stride(0), out.stride(0), float(eps),
        NORM=bool(norm), HAS_BIAS=bias is not None, BATCH_MAX=bool(batch_max), num_warps=nw,
        num_stages=cfg["NUM_STAGES"], **cfg,
    )  # fmt: skip
    return out


def lowrank_gemv_ref(x, w, bias=None, *, norm=False, eps=1e-6, batch_max=False, out_dtype=None):
    """Reference for :func:`lowrank_gemv`: in fp32 from the stored values (float64 inputs stay float64), then cast to
    ``out_dtype`` if given."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    if norm:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf @ w.to(ct).T
    y = y + bias.to(ct) if bias is not None else y
    y = y.amax(0, keepdim=True) if batch_max else y
    return y.to(out_dtype) if out_dtype is not None else y


# ============================================================================================
# Triton: fixed-size top-k of the batch max, indices ascending, in one program
# ============================================================================================


@jit
def _order_key(s):
    """fp32 -> int32 whose signed order is the float order (-0.0 == +0.0, as torch compares; NaN above +inf)."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@jit
def _kth_largest_key(key, valid, k):
    """The k-th largest of the valid keys: bisection on [min, max] keeping count(key >= lo) >= k (<= 32 steps)."""
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64)
    hi = tl.max(tl.where(valid, key, -2147483648), axis=0).to(tl.int64)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.sum(tl.where(valid & (key >= mid.to(tl.int32)), 1, 0), axis=0)
        ok = cnt >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo.to(tl.int32)


@jit
def _topk_select_kernel(
    s_ptr,  # [B, N] scores
    out_ptr,  # [COPIES * k] int64
    B,
    N,
    k,
    stride_sb,
    copy_off,  # copy c holds idx + c * copy_off
    COPIES: tl.constexpr,
    BLOCK: tl.constexpr,  # next_pow2(N): the whole score vector lives in registers
):
    """Indices of the k largest entries of max_b s[b, :], ascending; ties at the threshold -> lowest indices.

    1. per-column max over the batch; float -> order-preserving int32 key (flip the magnitude bits of negatives);
    2. T = the k-th largest key: bisection on [min key, max key] with the invariant count(key >= lo) >= k
       (<= 32 steps, one block-wide count each);
    3. keep key > T, plus the first (k - count(key > T)) entries equal to T; write each kept index at its rank
       among the kept (a cumsum), so the output is ascending without a sort.
    """
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    for b in range(1, B):
        s = tl.maximum(s, tl.load(s_ptr + b * stride_sb + offs, mask=valid, other=0.0).to(tl.float32))
    key = _order_key(s)
    t = _kth_largest_key(key, valid, k)
    gt = valid & (key > t)
    eq = valid & (key == t)
    need = k - tl.sum(gt.to(tl.int32), axis=0)
    take = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    for c in tl.static_range(COPIES):
        tl.store(out_ptr + c * k + pos, offs.to(tl.int64) + c * copy_off, mask=take)


def topk_select(scores, k, *, out=None, copies=1, copy_offset=0):
    """Fixed-size top-k of the per-column max over the batch, indices ascending, in one launch.

    ``k`` a Python int (fixed output size), no host sync, graph-safe, valid indices by construction (pass them
    on with ``validate=False``); plus ``copies``: the result is written ``copies`` times back to back, copy ``c`` shifted by
    ``c * copy_offset`` -- e.g. 3 copies with offset ``H`` give the rows of q, k and v of the selected heads in a
    fused ``[q; k; v]`` weight (multi-head attention).

    Args:
        scores: ``[B, N]`` (or ``[N]``) float scores, last dimension contiguous; B <= 16.
        k: ``1 <= k <= N``.
        out: optional int64 ``[copies * k]`` (contiguous) to write into, e.g. a slice of a static index buffer.
    Returns ``out`` (int64 ``[copies * k]``).
    """
    op = "topk_select"
    require_triton(op)
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2) or not scores.is_floating_point():
        raise ValueError(f"{op}: scores must be a floating tensor of shape [B, N] or [N].")
    s2 = scores[None] if scores.dim() == 1 else scores
    check_launch_device(op, _topk_select_kernel, s2)
    check_tensor(op, "scores", s2, ndim=2, last_dim_contiguous=True)
    check_batch(op, s2.shape[0])
    n = s2.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{op}: k must be a Python int in [1, {n}] (fixed output size), got {k!r}.")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"{op}: copies must be a positive int, got {copies!r}.")
    if n > (1 << 20):
        raise ValueError(f"{op}: N={n} scores exceed one program's limit of 2^20; use select_topk, which ranks "
                         "long vectors with torch.topk.")
    if out is None:
        out = torch.empty(copies * k, dtype=torch.int64, device=s2.device)
    else:
        check_out(op, out, shape=(copies * k,), dtype=torch.int64, device=s2.device)
    block = max(16, next_pow2(n))
    nw = 1 if block <= 1024 else 4 if block <= 4096 else 8
    _topk_select_kernel[(1,)](s2, out, s2.shape[0], n, k, s2.stride(0), int(copy_offset), COPIES=copies,
                              BLOCK=block, num_warps=nw)  # fmt: skip
    return out


def topk_select_ref(scores, k, *, copies=1, copy_offset=0):
    """Reference for :func:`topk_select`: stable descending sort (ties -> lowest index), first k, ascending."""
    per_item = (scores.amax(dim=0) if scores.dim() == 2 else scores).float()
    top = torch.sort(per_item, descending=True, stable=True).indices[:k].sort().values
    return torch.cat([top + c * copy_offset for c in range(copies)])


SMALL_N = 1024
"""Up to this many scores :func:`select_topk` uses the one-program :func:`topk_select` (one warp)."""


def select_topk(scores, k, *, out, copies=1, copy_offset=0):
    """The decode step's selection: fixed-size top-k of ``scores`` written into ``out``, graph-safe, no host sync.

    ``N <= SMALL_N`` (heads): :func:`topk_select`, one launch, indices ascending, offset copies included. Larger N
    (neurons): ``torch.topk(sorted=False)`` written straight into ``out`` (then the offset copies), indices in no
    particular order -- the gather kernels take any order, and skipping the sort is the point: measured at N=20480,
    k=2048 on an H200 (graph replay), topk+sort 74 us, topk alone 41 us, and the one-program kernel 73 us (a
    single SM: 31 block-wide counts ~33 us, the compaction ~20 us), so one program only pays off for short vectors
    (N=40: 3.3 us vs 11.8 us for topk+sort).

    Args:
        scores: ``[1, N]``, ``[B, N]`` or ``[N]`` float scores (a batch is reduced by its max first).
        out: int64 ``[copies * k]`` contiguous.
    """
    n = scores.shape[-1]
    if n <= SMALL_N:
        return topk_select(scores, k, out=out, copies=copies, copy_offset=copy_offset)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"select_topk: k must be a Python int in [1, {n}] (fixed output size), got {k!r}.")
    check_out("select_topk", out, shape=(copies * k,), dtype=torch.int64, device=scores.device)
    s1 = scores if scores.dim() == 1 else scores[0] if scores.shape[0] == 1 else scores.amax(0)
    first = out[:k]
    torch.topk(s1, k, sorted=False, out=(torch.empty(k, dtype=s1.dtype, device=s1.device), first))
    for c in range(1, copies):
        torch.add(first, c * copy_offset, out=out[c * k:(c + 1) * k])
    return out
