"""The predictor step of Deja Vu decoding: low-rank scores, then a fixed-size batch top-k.

Per layer, a small low-rank predictor scores every neuron (or head) from the current hidden
state, ``scores = rmsnorm(x) @ a @ b + bias`` with ``a: [d, r]``, ``b: [r, N]`` and ``r << d``.
The union over the batch of the highest-scoring entries becomes the index vector the sparse
kernels consume.

For the graph-captured decode step: :func:`lowrank_gemv` (Triton: one GEMV over a row-major
factor, 16-bit / fp32 or int8 rows with a per-row scale (half the bytes: ``predictors.quantize_rows``,
bench/NOTES.md v26), optional fused RMS normalization of ``x``, optional max over the batch in the epilogue,
fp32 accumulation, fp32 or 16-bit out, optionally counting its 16-bit outputs into a histogram) and
:func:`select_topk` (the one-program :func:`topk_select` for short score vectors such as heads; for
neurons the exact :func:`radix_select`, one launch given that histogram, or an unsorted
``torch.topk`` written in place). References: :func:`lowrank_gemv_ref`, :func:`topk_select_ref`,
:func:`radix_histogram_ref`. (The reference runtime scores with ``LowRank`` itself and selects with
``runtime.selection``.)

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
and one launch -- but on one SM, so it only wins for short vectors. :func:`radix_select` spreads the
work over N/1024 programs and takes its first level from the GEMV's histogram (3.57 -> 3.30 ms per
OPT-13B step at batch 1; slower than torch.topk inside the batch-4 graph, so the runtime uses it at
batch 1; bench/NOTES.md, v4).
"""

from __future__ import annotations

import torch

from ._checks import (
    HAS_TRITON,
    check_batch,
    check_launch_device,
    check_out,
    check_tensor,
    cdiv,
    is_interpreted,
    jit,
    next_pow2,
    pdl_sync,
    require_triton,
    tl,
    use_pdl,
)


def _itemsize(dtype) -> int:
    if isinstance(dtype, str):
        dtype = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[dtype]  # fmt: skip
    return torch.empty((), dtype=dtype).element_size()


def _factor_bytes(d, r, N, item, int8) -> int:
    """Weight bytes of a predictor's two factors: ``item``-byte elements, or int8 rows and an fp32 scale a row."""
    return (d * r + r * N) + 4 * (r + N) if int8 else (d * r + r * N) * item


def runs_as_product(d, r, N, dtype=torch.float16, int8=False) -> bool:
    """Does a predictor read fewer bytes as the product of its factors, ``b @ a`` ([N, d] at ``dtype``), than as the
    factors themselves (int8 rows with ``int8``)? True for a head predictor (N = n_heads, well below r = d/16 and
    more): OPT-13B's 40 x 5120 product is 0.4 MB in fp16 against 1.65 MB of int8 factors at r = 320. The map is the
    same (a linear low-rank predictor has rank at most min(r, N) either way); the decode runtime then scores it in
    one GEMV instead of two (``FastDecoder._prepare_predictors``)."""
    item = _itemsize(dtype)
    return N * d * item < _factor_bytes(d, r, N, item, int8)


def predictor_bytes(d, r, N, dtype=torch.float16, bias=True, int8=False, products=True):
    """Bytes one predictor reads per decode step: ``a`` (d x r), ``b`` (r x N), ``bias`` (N), at ``dtype``; with
    ``int8``, both factors as int8 rows plus an fp32 scale per row (r + N), the bias still at ``dtype``. Where the
    product ``b @ a`` reads fewer (:func:`runs_as_product`), that product at ``dtype`` instead of the factors, unless
    ``products=False`` (a decoder that keeps the factors)."""
    item = _itemsize(dtype)
    weights = N * d * item if products and runs_as_product(d, r, N, dtype, int8) else _factor_bytes(d, r, N, item, int8)
    return weights + (N * item if bias else 0)



# ============================================================================================
# 16-bit order keys (radix select)
# ============================================================================================

SUB_BITS = 4
HIST_BINS = 1 << (16 - SUB_BITS)
"""radix_select's first level: 4096 bins of a 16-bit score's order key (its top 12 bits)."""
HIST_LEN = HIST_BINS + (1 << 16)
"""A radix histogram buffer: the 4096 first-level bins, then one bin per 16-bit key (the second level)."""
_SUB_BITS = tl.constexpr(SUB_BITS) if HAS_TRITON else SUB_BITS  # the same, readable inside kernels
_HIST_BINS = tl.constexpr(HIST_BINS) if HAS_TRITON else HIST_BINS


@jit
def _key16(v):
    """fp16 / bf16 -> int32 in [0, 65535] whose order is the float order (-0.0 == +0.0; NaN above +inf)."""
    v = tl.where(v == 0.0, 0.0, v).to(v.dtype)
    u = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(u >= 0x8000, 0xFFFF - u, u + 0x8000)


# ============================================================================================
# Triton: GEMV over a row-major factor (optional fused RMS norm, optional batch max)
# ============================================================================================


@jit
def _lowrank_gemv_kernel(
    x_ptr,  # [B, D] input (any float dtype; a strided view is fine)
    w_ptr,  # [N, D] weight, row-major: one row per output (16-bit / fp32, or int8 with SCALE)
    scale_ptr,  # [N] fp32 per-row scale of an int8 weight (SCALE), or dummy
    bias_ptr,  # [N] or dummy
    out_ptr,  # [B, N] (or [1, N] with BATCH_MAX), fp32 or the weights' dtype
    hist_ptr,  # [HIST_LEN] int32 two-level histogram of the stored 16-bit scores' keys (HIST), or dummy
    B,
    N,
    D,
    stride_xb,
    stride_wn,
    stride_ob,
    eps,
    NORM: tl.constexpr,  # scale row b by rsqrt(mean(x[b]^2) + eps) (LowRank's normalization)
    SCALE: tl.constexpr,  # int8 weight: output n times scale[n]
    HAS_BIAS: tl.constexpr,
    BATCH_MAX: tl.constexpr,  # write max over the batch (one row) instead of B rows
    HIST: tl.constexpr,  # also count the stored (16-bit) scores into hist_ptr (top 12 bits of the key, and the key)
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    LOOP: tl.constexpr,  # fewer programs than row blocks (GEMV_MAX_PROGRAMS): each loops over its share
    PDL: tl.constexpr,
):
    """out[b, n] = (x[b] . w[n]) * (scale[n] if SCALE) * (rms^-1 of x[b] if NORM) + bias[n], fp32 accumulation.

    One program owns BLOCK_N weight rows and walks all of d; the batch is a tile inside the program, so each
    weight element is loaded once. Every program streams the whole x row anyway, so the RMS statistic costs
    nothing extra: the normalization commutes with the dot product (a per-row scalar). Grid: (cdiv(N, BLOCK_N),),
    or fewer programs (GEMV_MAX_PROGRAMS), each then taking row blocks pid, pid + grid, ...
    """
    pdl_sync(PDL)
    if not LOOP:
        _lowrank_rows(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, hist_ptr, tl.program_id(0), B, N, D, stride_xb,
                      stride_wn, stride_ob, eps, NORM, SCALE, HAS_BIAS, BATCH_MAX, HIST, BLOCK_B, BLOCK_N, BLOCK_D,
                      NUM_STAGES)
    else:
        for blk in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
            _lowrank_rows(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, hist_ptr, blk, B, N, D, stride_xb, stride_wn,
                          stride_ob, eps, NORM, SCALE, HAS_BIAS, BATCH_MAX, HIST, BLOCK_B, BLOCK_N, BLOCK_D,
                          NUM_STAGES)  # fmt: skip


@jit
def _lowrank_rows(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, hist_ptr, blk, B, N, D, stride_xb, stride_wn,
                  stride_ob, eps, NORM: tl.constexpr, SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BATCH_MAX: tl.constexpr, HIST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr):  # fmt: skip
    """Row block ``blk`` of :func:`_lowrank_gemv_kernel`: BLOCK_N outputs over all of d, epilogue included."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
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
    if SCALE:  # int8 rows: the row's scale factors out of its dot product
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / D + eps)
        acc = acc * inv[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if BATCH_MAX:
        best = tl.max(tl.where(b_mask[:, None], acc, float("-inf")), axis=0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n, best, mask=n_mask)
        if HIST:  # radix_select's two levels, from the values exactly as stored
            key = _key16(best)
            tl.atomic_add(hist_ptr + (key >> _SUB_BITS), 1, mask=n_mask, sem="relaxed")
            tl.atomic_add(hist_ptr + _HIST_BINS + key, 1, mask=n_mask, sem="relaxed")
    else:
        tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=b_mask[:, None] & n_mask[None, :])  # fmt: skip


GEMV_MAX_PROGRAMS = None
"""Cap on :func:`lowrank_gemv`'s grid (None: one program per row block). With a cap, fewer programs each loop over
several row blocks: the predictors then hold fewer SM slots next to the main stream's kernels, for longer (A/B knob,
read at launch: ``bench/profile_step.py``'s ``gemv_cap_<n>``, bench/NOTES.md v8)."""


GEMV_LONG_ROWS_TUNED = {(20480, 320): 32}
"""Rows a :func:`lowrank_gemv` program owns for long outputs (N >= 4096: the neuron scores), by (N, d) where not 16:
tuned in the decode step, where the GEMV runs on the side stream beside the main stream's kernels and what decides
is where its programs land, not the GEMV alone. H200, batch 1 (0.1, 0.5) with int8 rows, against 16 rows, baseline
first and again last (bench/NOTES.md v27): OPT-13B's (20480, 320) -1.5% to -2.6% over three calls at 32 rows (also
(0.1, 0.25) -0.6%, (0.25, 0.5) -0.9%, B=4 -4.8%, fp16 factors -2.3%), -0.6% at 64; OPT-30B's (28672, 448) +0.5% at 32,
+0.8% at 64; LLaMA-2-7B's (11008, 256) +3.6% / +6.5%; OPT-6.7B's (16384, 256) +0.1% at 32. (v24 had tried 32 rows
before the head predictors ran as their product: OPT-13B -0.6%, the others +0.6% to +2.2%.)"""
GEMV_LONG_ROWS = None
"""Force that row count for every long output (A/B knob, read at launch: ``bench/profile_step.py``'s
``gemv_rows_<n>``); None: ``GEMV_LONG_ROWS_TUNED``, else 16."""
GEMV_SHORT_ROWS = 4
"""The same for short outputs (the first factors, the head scores). A/B knob, read at launch: ``gemv_short_<n>``
(2 and 8 lost on OPT-13B and LLaMA-2-7B, v27)."""


def _gemv_config(batch: int, n: int, d: int) -> dict:
    """4 rows per program for short outputs (the first factor: r rows of length d), 16 for long ones (the second:
    N rows of length r; ``GEMV_LONG_ROWS_TUNED`` where tuned); the fp32 product tile [B, rows, d-chunk] held to 64
    registers/thread at 4 warps."""
    block_b = next_pow2(batch)
    if n >= 4096:
        block_n = GEMV_LONG_ROWS or GEMV_LONG_ROWS_TUNED.get((n, d), 16)
    else:
        block_n = GEMV_SHORT_ROWS
    block_d = max(16, min(512, next_pow2(d), 8192 // (block_b * block_n)))
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, NUM_STAGES=3, num_warps=4)


def lowrank_gemv(x, w, bias=None, *, scale=None, norm=False, eps=1e-6, batch_max=False, out_dtype=torch.float32,
                 out=None, hist=None):
    """One predictor factor: ``rmsnorm(x) @ w.T + bias`` (``norm=True``) or ``x @ w.T + bias`` -> ``[B, N]``.

    Accumulation is fp32; the result is stored as ``out_dtype`` (fp32 by default). The decode step stores the final
    scores in the model's dtype, as the reference ``LowRank`` computes them, which also halves the radix passes of
    the ``torch.topk`` that ranks them (16-bit keys).

    ``batch_max=True`` returns ``[1, N]``, the max over the batch (what a batch top-k ranks: a neuron is kept if any
    sequence wants it), computed in the epilogue, so no separate reduction launch and no [B, N] round trip.

    Args:
        x: ``[B, d]``, B <= 16, float16/bfloat16/float32; its last dimension must be contiguous (a column slice
            of a wider buffer is fine: the first factor's output is sliced per predictor).
        w: ``[N, d]`` contiguous, row per output: ``LowRank.a.weight`` ([r, d]) or ``LowRank.b.weight`` ([N, r]);
            or its int8 rows (``predictors.quantize_rows``), which halve the bytes read, with ``scale``.
        bias: optional ``[N]``, same dtype as ``w`` (a float dtype with int8 ``w``).
        scale: with int8 ``w`` (and only then): fp32 ``[N]``, row n's weight is ``w[n] * scale[n]``.
        norm: scale each row of x by ``rsqrt(mean(x^2) + eps)`` first (``LowRank``'s RMS normalization, no gain).
        out_dtype: float32, float16 or bfloat16.
        out: optional preallocated ``out_dtype`` ``[B, N]`` (``[1, N]`` with ``batch_max``).
        hist: optional int32 ``[HIST_LEN]`` (a :func:`radix_workspace`'s ``hist``, zero): the stored scores are
            also counted by key into it, both levels of :func:`radix_select` (``batch_max`` and a 16-bit
            ``out_dtype`` only).
    """
    op = "lowrank_gemv"
    require_triton(op)
    quant = w.dtype == torch.int8  # int8 rows (predictors.quantize_rows) with their scale
    check_tensor(op, "w", w, ndim=2, contiguous=True, dtype=torch.int8 if quant else None)
    check_launch_device(op, _lowrank_gemv_kernel, w)
    check_tensor(op, "x", x, ndim=2, device=w.device, shape=(None, w.shape[1]), last_dim_contiguous=True)
    check_batch(op, x.shape[0])
    if quant != (scale is not None):
        raise ValueError(f"{op}: an int8 w needs its per-row scale= (fp32 [N]) and a float w takes none (got w "
                         f"{w.dtype}, scale {'None' if scale is None else scale.dtype}); quantize with "
                         f"dejavu.predictors.quantize_rows.")
    if quant:
        check_tensor(op, "scale", scale, ndim=1, dtype=torch.float32, device=w.device, shape=(w.shape[0],),
                     contiguous=True)
    if bias is not None:
        if quant and bias.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{op}: bias must be float16, bfloat16 or float32 with an int8 w, got {bias.dtype}.")
        check_tensor(op, "bias", bias, ndim=1, dtype=bias.dtype if quant else w.dtype, device=w.device,
                     shape=(w.shape[0],), contiguous=True)
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}.")
    if hist is not None:
        if not batch_max or out_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{op}: hist= counts the batch-max scores by their 16-bit key; it needs batch_max=True "
                             f"and out_dtype float16/bfloat16 (got batch_max={batch_max}, {out_dtype}).")
        check_tensor(op, "hist", hist, ndim=1, dtype=torch.int32, dtype_of="histograms", device=w.device,
                     shape=(HIST_LEN,), contiguous=True)  # fmt: skip
    B, (N, D) = x.shape[0], w.shape
    rows = 1 if batch_max else B
    if out is None:
        out = torch.empty((rows, N), dtype=out_dtype, device=w.device)
    else:
        check_out(op, out, shape=(rows, N), dtype=out_dtype, device=w.device)
    cfg = _gemv_config(B, N, D)
    nw = cfg.pop("num_warps")
    pdl = use_pdl(_lowrank_gemv_kernel, w.device)
    blocks = cdiv(N, cfg["BLOCK_N"])
    grid = blocks if GEMV_MAX_PROGRAMS is None else max(1, min(blocks, int(GEMV_MAX_PROGRAMS)))
    _lowrank_gemv_kernel[(grid,)](
        x, w, scale if quant else out, bias if bias is not None else out, out, hist if hist is not None else out, B, N,
        D, x.stride(0), w.stride(0), out.stride(0), float(eps), NORM=bool(norm), SCALE=quant, HAS_BIAS=bias is not None,
        BATCH_MAX=bool(batch_max), HIST=hist is not None, LOOP=grid < blocks, PDL=pdl, launch_pdl=pdl > 0, num_warps=nw,
        num_stages=cfg["NUM_STAGES"], **cfg,
    )  # fmt: skip
    return out


def lowrank_gemv_ref(x, w, bias=None, *, scale=None, norm=False, eps=1e-6, batch_max=False, out_dtype=None):
    """Reference for :func:`lowrank_gemv`: in fp32 from the stored values (float64 inputs stay float64), then cast to
    ``out_dtype`` if given."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    if norm:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf @ w.to(ct).T
    y = y * scale.to(ct) if scale is not None else y
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
    PDL: tl.constexpr,
):
    """Indices of the k largest entries of max_b s[b, :], ascending; ties at the threshold -> lowest indices.

    1. per-column max over the batch; float -> order-preserving int32 key (flip the magnitude bits of negatives);
    2. T = the k-th largest key: bisection on [min key, max key] with the invariant count(key >= lo) >= k
       (<= 32 steps, one block-wide count each);
    3. keep key > T, plus the first (k - count(key > T)) entries equal to T; write each kept index at its rank
       among the kept (a cumsum), so the output is ascending without a sort.
    """
    pdl_sync(PDL)
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
    on with ``validate=False``); plus ``copies``: the result is written ``copies`` times back to back, copy ``c``
    shifted by ``c * copy_offset`` -- e.g. 3 copies with offset ``H`` give the rows of q, k and v of the selected
    heads in a fused ``[q; k; v]`` weight (multi-head attention).

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
    pdl = use_pdl(_topk_select_kernel, s2.device)
    _topk_select_kernel[(1,)](s2, out, s2.shape[0], n, k, s2.stride(0), int(copy_offset), COPIES=copies,
                              BLOCK=block, PDL=pdl, launch_pdl=pdl > 0, num_warps=nw)  # fmt: skip
    return out


def topk_select_ref(scores, k, *, copies=1, copy_offset=0):
    """Reference for :func:`topk_select`: stable descending sort (ties -> lowest index), first k, ascending."""
    per_item = (scores.amax(dim=0) if scores.dim() == 2 else scores).float()
    top = torch.sort(per_item, descending=True, stable=True).indices[:k].sort().values
    return torch.cat([top + c * copy_offset for c in range(copies)])


# ============================================================================================
# Triton: exact fixed-size top-k of 16-bit scores, from a histogram, in one multi-program launch
# ============================================================================================


@jit
def _radix_select_kernel(
    s_ptr,  # [N] 16-bit scores (fp16 / bf16)
    hist_ptr,  # [HIST_LEN] int32: counts per key >> SUB_BITS, then per key (lowrank_gemv(hist=)); zeroed here
    cnt_ptr,  # [4] int32 zeros: arrivals, > threshold slots, tie slots, departures; reset here after use
    out_ptr,  # [COPIES * k] int64
    N,
    k,
    copy_off,
    n_prog,
    COPIES: tl.constexpr,
    BINS: tl.constexpr,
    SUB: tl.constexpr,  # 1 << SUB_BITS
    CHUNK: tl.constexpr,  # scores compacted per program
    SHARE: tl.constexpr,  # next_pow2(cdiv(BINS, n_prog)): first-level bins whose second level a program zeroes
    PDL: tl.constexpr,
):
    """Indices of the k largest scores (no order); ties at the threshold key taken first-come.

    Every program finds the same exact threshold T (the k-th largest 16-bit key): the first-level bin where the
    count from the top reaches k, then that bin's members by their low SUB_BITS bits, read from the second level.
    Then each compacts its own CHUNK: keys > T get slots from one counter (there are exactly
    count(> T) of them), keys == T from a second one, kept while the slot is < k. Slots come from one atomic add
    per program, so the order of the indices depends on timing but the set does not, up to which of several
    equal scores at the threshold are kept (as torch.topk). Each program zeroes the second-level rows of its share
    of the non-empty first-level bins (bar the threshold bin's, which all read); the program that arrives last at
    the threshold zeroes the first level and that row; the one that leaves last resets the counters: the
    workspace is clean for the next call.
    """
    pdl_sync(PDL)
    pid = tl.program_id(0)
    bins = tl.arange(0, BINS)
    h = tl.load(hist_ptr + bins)
    ge = tl.cumsum(h, axis=0, reverse=True)  # count of keys in bins >= b
    bstar = tl.max(tl.where(ge >= k, bins, -1), axis=0)  # the bin holding the k-th largest key
    above = tl.sum(tl.where(bins > bstar, h, 0), axis=0)
    js = tl.arange(0, SUB)
    fine = hist_ptr + BINS  # second level: one bin per key, row b = keys b * SUB .. b * SUB + SUB - 1
    sub = tl.load(fine + bstar * SUB + js)  # the threshold bin's members by their low bits
    # second-level rows of this program's share of the non-empty first-level bins: read by nobody, zeroed now
    # (before arriving, while the first level still holds the counts)
    share = tl.cdiv(BINS, n_prog)
    rows = pid * share + tl.arange(0, SHARE)
    in_share = (rows < (pid + 1) * share) & (rows < BINS)
    used = tl.load(hist_ptr + rows, mask=in_share, other=0) > 0
    tl.store(fine + rows[:, None] * SUB + js[None, :], tl.zeros([SHARE, SUB], dtype=tl.int32),
             mask=(in_share & used & (rows != bstar))[:, None])  # fmt: skip
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n_prog - 1:  # all programs have read hist
        tl.store(hist_ptr + bins, tl.zeros([BINS], dtype=tl.int32))
        tl.store(fine + bstar * SUB + js, tl.zeros([SUB], dtype=tl.int32))
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
    ge_sub = above + tl.cumsum(sub, axis=0, reverse=True)
    jstar = tl.max(tl.where(ge_sub >= k, js, -1), axis=0)
    t = bstar * SUB + jstar  # the k-th largest key
    n_gt = above + tl.sum(tl.where(js > jstar, sub, 0), axis=0)  # keys > t: all kept
    need = k - n_gt  # keys == t to keep (>= 1)
    # compact this program's chunk
    o = pid * CHUNK + tl.arange(0, CHUNK)
    ok = o < N
    key = _key16(tl.load(s_ptr + o, mask=ok, other=0.0))
    gt = ok & (key > t)
    eq = ok & (key == t)
    base = tl.atomic_add(cnt_ptr + 1, tl.sum(gt.to(tl.int32), axis=0), sem="relaxed", scope="gpu")
    slot = base + tl.cumsum(gt.to(tl.int32), axis=0) - 1
    tie = tl.atomic_add(cnt_ptr + 2, tl.sum(eq.to(tl.int32), axis=0), sem="relaxed", scope="gpu") + \
        tl.cumsum(eq.to(tl.int32), axis=0) - 1
    keep_eq = eq & (tie < need)
    slot = tl.where(gt, slot, n_gt + tie)
    keep = (gt | keep_eq) & (slot >= 0) & (slot < k)  # in range by construction; never write outside on misuse
    for c in tl.static_range(COPIES):
        tl.store(out_ptr + c * k + slot, o.to(tl.int64) + c * copy_off, mask=keep)
    if tl.atomic_add(cnt_ptr + 3, 1, sem="acq_rel", scope="gpu") == n_prog - 1:  # every slot is taken
        tl.atomic_xchg(cnt_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(cnt_ptr + 2, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(cnt_ptr + 3, 0, sem="relaxed", scope="gpu")


def radix_workspace(device) -> dict:
    """Zeroed state for :func:`radix_select`: ``hist`` (int32 [HIST_LEN], 272 KB) and ``counters`` (int32 [4]).
    Each call leaves it zeroed again, so one workspace serves any number of calls in stream order (not concurrent
    ones)."""
    buf = torch.zeros(HIST_LEN + 4, dtype=torch.int32, device=device)
    return {"hist": buf[:HIST_LEN], "counters": buf[HIST_LEN:]}


def radix_histogram_ref(scores):
    """The two-level histogram of 16-bit scores (what ``lowrank_gemv(hist=)`` accumulates), in torch: int32
    [HIST_LEN], counts of ``key16 >> SUB_BITS`` then of ``key16``. Graph-safe (scatter_add, no host sync)."""
    u = scores.reshape(-1).masked_fill(scores.reshape(-1) == 0, 0).view(torch.int16).to(torch.int32) & 0xFFFF
    key = torch.where(u >= 0x8000, 0xFFFF - u, u + 0x8000)
    hist = torch.zeros(HIST_LEN, dtype=torch.int32, device=scores.device)
    one = torch.ones_like(key)
    hist.scatter_add_(0, (key >> SUB_BITS).long(), one)
    return hist.scatter_add_(0, (key + HIST_BINS).long(), one)


def radix_select(scores, k, *, out, workspace, copies=1, copy_offset=0):
    """Exact top-k of 16-bit scores in one launch, given their two-level histogram in ``workspace["hist"]``.

    The decode step fills the histogram for free in the epilogue of the GEMV that computes the scores
    (``lowrank_gemv(..., batch_max=True, hist=ws["hist"])``), so the selection is two launches in all, against
    ~13 for ``torch.topk`` at N = 20480 (profiled on an H200: radix passes, scans, gather). Indices come in no
    particular order (the gathers take any order); ties at the threshold are taken first-come, like torch.topk.

    Args:
        scores: ``[N]`` or ``[1, N]`` float16 / bfloat16, contiguous.
        k: Python int, ``1 <= k <= N``.
        out: int64 ``[copies * k]`` contiguous; copy ``c`` is shifted by ``c * copy_offset``.
        workspace: :func:`radix_workspace` whose ``hist`` holds these scores' histogram (left zeroed).
    """
    op = "radix_select"
    require_triton(op)
    s1 = scores.reshape(-1) if scores.dim() == 2 and scores.shape[0] == 1 else scores
    if not isinstance(s1, torch.Tensor) or s1.dim() != 1 or s1.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: scores must be a float16/bfloat16 vector [N] or [1, N] (reduce a batch first); "
                         f"got {getattr(scores, 'dtype', type(scores))} {tuple(getattr(scores, 'shape', ()))}.")
    check_launch_device(op, _radix_select_kernel, s1)
    check_tensor(op, "scores", s1, ndim=1, contiguous=True)
    n = s1.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{op}: k must be a Python int in [1, {n}] (fixed output size), got {k!r}.")
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
        raise ValueError(f"{op}: copies must be a positive int, got {copies!r}.")
    check_out(op, out, shape=(copies * k,), dtype=torch.int64, device=s1.device)
    if not isinstance(workspace, dict) or set(workspace) != {"hist", "counters"}:
        raise ValueError(f"{op}: workspace must come from radix_workspace(device).")
    hist, cnt = workspace["hist"], workspace["counters"]
    check_tensor(op, "workspace['hist']", hist, ndim=1, dtype=torch.int32, dtype_of="histograms", device=s1.device,
                 shape=(HIST_LEN,), contiguous=True)  # fmt: skip
    check_tensor(op, "workspace['counters']", cnt, ndim=1, dtype=torch.int32, dtype_of="histograms",
                 device=s1.device, shape=(4,), contiguous=True)  # fmt: skip
    chunk = 1024
    n_prog = cdiv(n, chunk)
    pdl = use_pdl(_radix_select_kernel, s1.device)
    _radix_select_kernel[(n_prog,)](s1, hist, cnt, out, n, k, int(copy_offset), n_prog, COPIES=copies,
                                    BINS=HIST_BINS, SUB=1 << SUB_BITS, CHUNK=chunk,
                                    SHARE=next_pow2(cdiv(HIST_BINS, n_prog)), PDL=pdl, launch_pdl=pdl > 0,
                                    num_warps=4)  # fmt: skip
    return out


SMALL_N = 1024
"""Up to this many scores :func:`select_topk` uses the one-program :func:`topk_select` (one warp)."""


def select_topk(scores, k, *, out, copies=1, copy_offset=0, workspace=None, hist_ready=False, radix=None):
    """The decode step's selection: fixed-size top-k of ``scores`` written into ``out``, graph-safe, no host sync.

    * ``N <= SMALL_N`` (heads): :func:`topk_select`, one launch, indices ascending, offset copies included.
    * larger N (neurons), 16-bit scores where the Triton kernels can run: :func:`radix_select`, exact, one launch
      once the histogram is there -- ``hist_ready=True`` when the scores' GEMV filled ``workspace["hist"]``
      (``lowrank_gemv(hist=)``, as the decode step does), else it is built here with torch ops first.
    * otherwise (fp32 scores, plain CPU): ``torch.topk(sorted=False)`` written straight into ``out``.

    Neuron indices come in no particular order: the gathers take any order, and skipping the sort is the point
    (measured at N=20480, k=2048 on an H200, graph replay: topk+sort 74 us, topk alone 41 us; a one-program
    top-k 73 us, so :func:`topk_select` is kept for short vectors, N=40: 3.3 us vs 11.8 us for topk+sort).

    Args:
        scores: ``[1, N]``, ``[B, N]`` or ``[N]`` float scores (a batch is reduced by its max first).
        out: int64 ``[copies * k]`` contiguous.
        workspace: a :func:`radix_workspace` for the radix path (None: a fresh one per call).
        radix: None picks as above; False forces ``torch.topk`` for long vectors (A/B timing).
    """
    n = scores.shape[-1]
    if n <= SMALL_N:
        return topk_select(scores, k, out=out, copies=copies, copy_offset=copy_offset)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"select_topk: k must be a Python int in [1, {n}] (fixed output size), got {k!r}.")
    check_out("select_topk", out, shape=(copies * k,), dtype=torch.int64, device=scores.device)
    s1 = scores if scores.dim() == 1 else scores[0] if scores.shape[0] == 1 else scores.amax(0)
    if radix is not False and radix_ok(s1):
        ws = workspace if workspace is not None else radix_workspace(s1.device)
        if not hist_ready:
            ws["hist"].copy_(radix_histogram_ref(s1))
        return radix_select(s1.contiguous(), k, out=out, workspace=ws, copies=copies, copy_offset=copy_offset)
    if hist_ready:
        raise ValueError("select_topk: hist_ready=True but these scores take the torch.topk path (not 16-bit, or "
                         "no Triton on this device), which would leave the workspace's histogram dirty.")
    first = out[:k]
    torch.topk(s1, k, sorted=False, out=(torch.empty(k, dtype=s1.dtype, device=s1.device), first))
    for c in range(1, copies):
        torch.add(first, c * copy_offset, out=out[c * k:(c + 1) * k])
    return out


def radix_ok(scores) -> bool:
    """Does :func:`select_topk` take the radix path for these (long) scores? 16-bit, and the kernel can launch
    on their device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if not HAS_TRITON or scores.dtype not in (torch.float16, torch.bfloat16):
        return False
    return scores.device.type == "cuda" or (scores.device.type == "cpu" and is_interpreted(_radix_select_kernel))
