"""Decode attention over the selected query heads only (flash-decoding, GQA-aware).

At decode time each sequence adds one token; attention for a query head is a GEMV against
that sequence's cached keys, a softmax, and a GEMV against its cached values. Deja Vu skips
the unselected heads entirely, so this kernel takes the queries of the *selected* heads
(``q`` is ``[B, kh, hd]`` in ``head_idx`` order) and reads, for query head ``h``, the KV head
``h // group_size`` of a static cache ``[B, H_kv, S_max, hd]``; ``seq_lens[b]`` positions are
valid (the current token included, already written into the cache).

Parallelism: with few heads and a small batch there are only ``B * kh`` (query head,
sequence) pairs, far fewer than SMs, so the sequence axis is split too (flash-decoding):

* stage 1, grid ``(B * kh, num_splits)``: each program takes an equal share of
  ``seq_lens[b]`` (computed on the device, so no host sync and CUDA-graph safe), runs an
  online softmax in fp32 (exp2 domain) over ``BLOCK_S``-position tiles and writes its
  normalised partial output and log-sum-exp;
* stage 2, grid ``(B * kh,)``: combines the partials in a fixed order (deterministic).

With ``num_splits == 1`` stage 1 writes the output directly and stage 2 is skipped.

Holes (``kv_valid``): a runtime that computes K/V only for the KV heads its selected query
heads need (kv_policy "selected") leaves cache entries that were never written. The optional
``kv_valid [B, H_kv, S_max]`` mask (bool or uint8) marks the written ones; masked positions get
a score of -inf, except the query's own position ``seq_lens[b] - 1``, which is always seen (so
every softmax row has at least one term). A tile, or a whole split, may then hold no valid
position: the online softmax keeps its exp2 arguments finite (the running max is clamped to 0
while it is still -inf), so such tiles add exactly nothing and an empty split gets weight 0.

Fused q/k/v finish (:func:`qkv_decode_attention`, the decode step's path at batch 1): the same kernel reads the raw
fused projection ``[B, kh + 2 kkv, hd]`` instead of ``q`` and also does what ``fused_ops.qkv_post`` did in a launch
of its own: RoPE on q and K, the K/V rows written into the cache at the current position, the hole mask there.
Nothing inside the launch waits for those writes: every program reads cache positions below the current one only,
and the split that holds the current position takes its K/V from the projection (rounded as the cache stores them).
"""

import math

import torch

from ._checks import (
    INDEX_DTYPES,
    cdiv,
    check_batch,
    check_index,
    check_launch_device,
    check_out,
    check_tensor,
    jit,
    next_pow2,
    num_sms,
    pdl_sync,
    require_triton,
    should_validate,
    tl,
    use_pdl,
)
from .fused_ops import qkv_post_ref, rope_row, rope_tables

LOG2E = 1.4426950408889634


@jit
def _kv_tile(k_base, v_base, m_base, s0, s_end, offs_h, h_mask, stride_ks, stride_vs, BLOCK_S: tl.constexpr,
             HAS_VALID: tl.constexpr):  # fmt: skip
    """The K and V tiles ``[BLOCK_S, BLOCK_H]`` of positions [s0, s0 + BLOCK_S) below ``s_end`` (zeros beyond), and
    which of them count (``ok``: written, per the hole mask, or in range without one)."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    s_mask = offs_s < s_end
    kv_mask = s_mask[:, None] & h_mask[None, :]
    k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_h[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_h[None, :], mask=kv_mask, other=0.0)
    if HAS_VALID:
        ok = tl.load(m_base + offs_s, mask=s_mask, other=0) != 0
    else:
        ok = s_mask
    return k, v, ok, offs_s, s_mask


@jit
def _online_softmax(k, v, ok, offs_s, s_mask, q, m_i, l_i, acc, seq_len, HAS_VALID: tl.constexpr):
    """One tile of the online softmax (log2 units): running max ``m_i``, sum ``l_i``, output ``acc``. Positions out
    of range and holes score -inf; the current position (``seq_len - 1``) is always seen. A tile with nothing to see
    (an empty split, only holes) adds exactly nothing: the max is clamped to 0 while it is -inf, so exp2 stays
    finite."""
    scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_S]
    keep = s_mask
    if HAS_VALID:
        keep = s_mask & (ok | (offs_s == seq_len - 1))
    scores = tl.where(keep, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(scores - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
    return m_new, l_i, acc


@jit
def _decode_attn_kernel(
    # pointers
    q_ptr,  # [B, KH, HD] queries; FROM_QKV: the raw projection [B, KH + 2 KKV, HD] (q heads, K heads, V heads)
    k_ptr,  # [B, H_kv, S_max, HD]
    v_ptr,  # [B, H_kv, S_max, HD]
    seq_lens_ptr,  # [B] int32/int64; FROM_QKV: the positions being decoded (seq_len = pos + 1)
    head_idx_ptr,  # [KH]
    out_ptr,  # [B, KH, HD] (num_splits == 1)
    part_o_ptr,  # [B * KH, NUM_SPLITS, HD] fp32 (num_splits > 1)
    part_lse_ptr,  # [B * KH, NUM_SPLITS] fp32, log2 domain
    valid_ptr,  # [B, H_kv, S_max] uint8 (HAS_VALID), else a dummy
    kvidx_ptr,  # [KKV] KV heads of the projection's K/V rows (FROM_QKV), else a dummy
    cos_ptr,  # [B, HD] RoPE tables (HAS_ROPE), else dummies
    sin_ptr,
    # sizes
    KH,
    KKV,  # FROM_QKV: K/V heads in the projection
    NJ,  # programs per sequence on axis 0: KH, or max(KH, KKV) with FROM_QKV
    H_KV,
    HD,
    group_size,
    qk_scale,  # softmax scale * log2(e)
    # strides (last stride of every tensor is 1)
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_cb,
    # meta-parameters
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr,  # >= KKV and >= H_kv (FROM_QKV)
    BLOCK_KQ: tl.constexpr,  # >= KH (FROM_QKV with HAS_VALID)
    NUM_STAGES: tl.constexpr,
    HAS_VALID: tl.constexpr,
    FROM_QKV: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PREWAIT: tl.constexpr,  # with PDL: all but the projection read before the wait (qkv_decode_attention(prewait))
    PDL: tl.constexpr,
):
    """One (sequence, selected head, split) per program; online softmax over its positions.

    FROM_QKV (``qkv_decode_attention``): the program also finishes the projection. Split 0 of program j < KKV writes
    K/V head j (RoPE'd) into the cache at pos, split 0 of program 0 the hole mask at pos; every program reads only
    cache positions below pos, and the split that holds pos adds that position from the projection itself (the
    cache-rounded values), so no program waits for another's write. Every load that depends on no other load is
    issued up front (the selected head, the current position's K/V from the projection, what the cache writes need:
    masked loads, no branches) and the cache writes come last, so their memory round trips overlap instead of
    queueing behind each other (bench/NOTES.md v10-v11). PREWAIT: everything the kernel before this one does not
    write (the selection, the positions, the RoPE tables and the first tile of the cache below pos) is read before
    the PDL wait, while that kernel still runs; only the projection's rows are read after it."""
    if not PREWAIT:
        pdl_sync(PDL)
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // NJ
    j = pid_bh % NJ

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HD
    # -- what the kernel before this one does not write (PREWAIT: read before the PDL wait): the selection, the
    # positions, the RoPE tables, the cache below pos and its first tile --------------------------------------------
    head = tl.load(head_idx_ptr + j, mask=j < KH, other=0)
    if FROM_QKV:
        pos = tl.load(seq_lens_ptr + b).to(tl.int32)
        seq_len = pos + 1
        qkv_base = q_ptr + b * stride_qb
        cos, sin = rope_tables(cos_ptr + b * stride_cb, sin_ptr + b * stride_cb, offs_h, h_mask, HAS_ROPE)
        # where the cache writes go (split 0 of program j < KKV: K/V head j of the projection -> cache[b, kvidx[j],
        # pos]; split 0 of program 0: the hole mask there); their values are loaded after the wait
        w_on = (pid_s == 0) & (j < KKV)
        kvh_w = tl.load(kvidx_ptr + j, mask=w_on, other=0).to(tl.int64)
        w_mask = offs_h < tl.where(w_on, HD, 0)  # (masks from limits: scalar & vector trips the interpreter)
        if HAS_VALID:  # valid[b, h, pos] = some selected query head reads KV head h
            offs_kv = tl.arange(0, BLOCK_KV)
            offs_q = tl.arange(0, BLOCK_KQ)
            m_on = (pid_s == 0) & (j == 0)
            hq = tl.load(head_idx_ptr + offs_q, mask=offs_q < tl.where(m_on, KH, 0), other=-1).to(tl.int32)
            grp = tl.where(hq >= 0, hq // group_size, -1)
            need = tl.max((grp[None, :] == offs_kv[:, None]).to(tl.int32), axis=1)
    else:
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    kv_head = head.to(tl.int64) // group_size
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_S) * BLOCK_S  # whole tiles per split
    s_lo = pid_s * chunk
    s_hi = tl.minimum(s_lo + chunk, seq_len)
    if FROM_QKV:
        s_cache = tl.minimum(s_hi, pos)  # the cache holds positions < pos; pos comes from the projection
        # the current position's K/V head slot t in the projection (the split that holds pos adds it)
        holds = (pos >= s_lo) & (pos < s_hi) & (j < KH)
        offs_t = tl.arange(0, BLOCK_KV)
        kv_all = tl.load(kvidx_ptr + offs_t, mask=offs_t < tl.where(holds, KKV, 0), other=-1).to(tl.int64)
        t = tl.sum(tl.where(kv_all == kv_head, offs_t, 0), axis=0)
        n_mask = offs_h < tl.where(holds, HD, 0)
    else:
        s_cache = s_hi
    s_cache = tl.where(j < KH, s_cache, s_lo)  # programs j >= KH (K/V writers only) read no cache
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh
    m_base = valid_ptr + b.to(tl.int64) * stride_mb + kv_head * stride_mh
    k0, v0, ok0, offs_s0, s_mask0 = _kv_tile(k_base, v_base, m_base, s_lo, s_cache, offs_h, h_mask, stride_ks,
                                             stride_vs, BLOCK_S, HAS_VALID)  # fmt: skip
    if PREWAIT:
        pdl_sync(PDL)

    # -- what the kernel before this one wrote: the projection ------------------------------------------------------
    if FROM_QKV:
        kw = rope_row(qkv_base + (KH + j) * stride_qh, offs_h, w_mask, cos, sin, HD, HAS_ROPE)
        vw = tl.load(qkv_base + (KH + KKV + j) * stride_qh + offs_h, mask=w_mask, other=0.0)
    if j < KH:
        if FROM_QKV:
            q = rope_row(qkv_base + j * stride_qh, offs_h, h_mask, cos, sin, HD, HAS_ROPE)
            q = q.to(q_ptr.dtype.element_ty).to(tl.float32)  # the model's rounding of q (as qkv_post stores it)
            kn = rope_row(qkv_base + (KH + t) * stride_qh, offs_h, n_mask, cos, sin, HD, HAS_ROPE)
            vn = tl.load(qkv_base + (KH + KKV + t) * stride_qh + offs_h, mask=n_mask, other=0.0)
        else:
            q = tl.load(q_ptr + b * stride_qb + j * stride_qh + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        q = q * qk_scale  # scores come out in log2 units: exp2 below is exp of the scaled score

        m_i = tl.full([], float("-inf"), tl.float32)  # running max (log2 units)
        l_i = tl.full([], 0.0, tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        m_i, l_i, acc = _online_softmax(k0, v0, ok0, offs_s0, s_mask0, q, m_i, l_i, acc, seq_len, HAS_VALID)
        for s0 in tl.range(s_lo + BLOCK_S, s_cache, BLOCK_S, num_stages=NUM_STAGES):
            k, v, ok, offs_s, s_mask = _kv_tile(k_base, v_base, m_base, s0, s_cache, offs_h, h_mask, stride_ks,
                                                stride_vs, BLOCK_S, HAS_VALID)  # fmt: skip
            m_i, l_i, acc = _online_softmax(k, v, ok, offs_s, s_mask, q, m_i, l_i, acc, seq_len, HAS_VALID)

        if FROM_QKV:
            if holds:  # this split holds the current position: K/V from the projection
                k1 = kn.to(k_ptr.dtype.element_ty).to(tl.float32)  # as the cache stores it
                v1 = vn.to(v_ptr.dtype.element_ty).to(tl.float32)
                sc = tl.sum(k1 * q, axis=0)
                m_new = tl.maximum(m_i, sc)  # finite
                alpha = tl.exp2(m_i - m_new)
                p1 = tl.exp2(sc - m_new)
                l_i = l_i * alpha + p1
                acc = acc * alpha + p1 * v1
                m_i = m_new

        if NUM_SPLITS == 1:
            o = acc / tl.maximum(l_i, 1e-30)
            tl.store(out_ptr + b * stride_ob + j * stride_oh + offs_h, o.to(out_ptr.dtype.element_ty), mask=h_mask)
        else:
            # An empty split (s_lo >= seq_len) stores o = 0 and lse = -inf: weight 0 in stage 2.
            o = acc / tl.maximum(l_i, 1e-30)
            part = (b * KH + j) * NUM_SPLITS + pid_s
            tl.store(part_o_ptr + part * HD + offs_h, o, mask=h_mask)
            tl.store(part_lse_ptr + part, tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf")))

    if FROM_QKV:  # the cache writes at pos: no program of this launch reads position pos from the cache
        tl.store(k_ptr + b.to(tl.int64) * stride_kb + kvh_w * stride_kh + pos * stride_ks + offs_h,
                 kw.to(k_ptr.dtype.element_ty), mask=w_mask)  # fmt: skip
        tl.store(v_ptr + b.to(tl.int64) * stride_vb + kvh_w * stride_vh + pos * stride_vs + offs_h,
                 vw.to(v_ptr.dtype.element_ty), mask=w_mask)  # fmt: skip
        if HAS_VALID:
            tl.store(valid_ptr + b * stride_mb + offs_kv * stride_mh + pos, need.to(tl.uint8),
                     mask=offs_kv < tl.where(m_on, H_KV, 0))  # fmt: skip


@jit
def _decode_attn_combine_kernel(
    # pointers
    part_o_ptr,  # [B * KH, NUM_SPLITS, HD] fp32
    part_lse_ptr,  # [B * KH, NUM_SPLITS] fp32
    out_ptr,  # [B, KH, HD]
    # sizes
    KH,
    HD,
    # strides
    stride_ob,
    stride_oh,
    # meta-parameters
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    """out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s."""
    pdl_sync(PDL)
    pid_bh = tl.program_id(0)
    b = pid_bh // KH
    j = pid_bh % KH
    offs_sp = tl.arange(0, BLOCK_SPLITS)
    sp_mask = offs_sp < NUM_SPLITS
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HD

    lse = tl.load(part_lse_ptr + pid_bh * NUM_SPLITS + offs_sp, mask=sp_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # only if seq_len == 0 (rejected by validation)
    w = tl.exp2(lse - m)  # [BLOCK_SPLITS], 0 for empty splits
    o = tl.load(part_o_ptr + (pid_bh * NUM_SPLITS + offs_sp)[:, None] * HD + offs_h[None, :],
                mask=sp_mask[:, None] & h_mask[None, :], other=0.0)  # fmt: skip
    out = tl.sum(w[:, None] * o, axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    tl.store(out_ptr + b * stride_ob + j * stride_oh + offs_h, out.to(out_ptr.dtype.element_ty), mask=h_mask)


SPLIT_MIN_POSITIONS = 0
"""Fewest cache positions a split of the decode attention covers (0: one tile). A/B knob, read at launch time."""
ONE_TILE_UNPIPELINED = True
"""Where every split covers at most one tile of the cache (``cdiv(S_max, splits) <= BLOCK_S``), the tile loop is not
software-pipelined (1 stage instead of 3): its 3-stage buffers, 66 KiB of shared memory a program, would go unused
(the fused path peels the first tile; unfused, the loop runs once). H200, same process: the decode step 0.1-1.9%
faster at B=1 on the four bench models, 2.5% at B=4 (bench/NOTES.md v13). A/B knob, read at launch time;
``bench/profile_step.py``'s ``attn_pipelined`` turns it off."""


def _attn_config(batch: int, kh: int, s_max: int, hd: int, elem: int, device: torch.device, num_splits) -> dict:
    """Tiles and split count: aim for ~2 programs per SM, never more splits than tiles.

    A K (or V) tile is held to 16 KiB (64 positions x 128 dims in fp16), 3 stages deep where a split covers more
    than one tile; with one tile a split, 1 stage (ONE_TILE_UNPIPELINED).
    """
    block_h = max(16, next_pow2(hd))
    block_s = max(16, min(64, 16384 // (block_h * elem)))
    if num_splits is None:
        per_split = max(block_s, SPLIT_MIN_POSITIONS)
        num_splits = min(cdiv(2 * num_sms(device), batch * kh), cdiv(s_max, per_split), 64)
    num_splits = max(1, int(num_splits))
    stages = 1 if ONE_TILE_UNPIPELINED and cdiv(s_max, num_splits) <= block_s else 3
    return dict(NUM_SPLITS=num_splits, BLOCK_S=block_s, BLOCK_H=block_h, NUM_STAGES=stages, num_warps=4)


def _check_common(op, q_like, q_name, k_cache, v_cache, head_idx, group_size, validate):
    """The checks both launchers share: caches, the query tensor, batch, group size, selected heads."""
    check_tensor(op, "k_cache", k_cache, ndim=4, last_dim_contiguous=True)
    check_launch_device(op, _decode_attn_kernel, k_cache)
    B, H_kv, S_max, hd = k_cache.shape
    like = dict(dtype=k_cache.dtype, dtype_of="the caches", device=k_cache.device, device_of="the caches")
    check_tensor(op, "v_cache", v_cache, ndim=4, shape=tuple(k_cache.shape), last_dim_contiguous=True, **like)
    check_tensor(op, q_name, q_like, ndim=3, shape=(B, None, hd), last_dim_contiguous=True, **like)
    check_batch(op, B)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{op}: group_size must be a positive int (H // H_kv), got {group_size!r}.")
    check_index(op, "head_idx", head_idx, n=H_kv * group_size, device=k_cache.device, validate=validate,
                what="heads")  # fmt: skip


def _check_valid_mask(op, kv_valid, k_cache):
    if kv_valid is None:
        return None
    B, H_kv, S_max, _ = k_cache.shape
    if not isinstance(kv_valid, torch.Tensor) or kv_valid.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"{op}: kv_valid must be a bool or uint8 tensor [B, H_kv, S_max] (True = entry written); "
                         f"got {type(kv_valid).__name__} {getattr(kv_valid, 'dtype', '')}.")  # fmt: skip
    check_tensor(op, "kv_valid", kv_valid.view(torch.uint8), ndim=3, dtype=torch.uint8, dtype_of="masks",
                 device=k_cache.device, device_of="the caches", shape=(B, H_kv, S_max),
                 last_dim_contiguous=True)  # fmt: skip
    return kv_valid.view(torch.uint8)  # same bytes; Triton loads it as a plain byte mask


def _check_lengths(op, name, t, B, device, lo_ok, hi_ok, what, validate):
    if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES or tuple(t.shape) != (B,) \
            or t.device != device or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous int32 (or int64) tensor of shape ({B},) on "
                         f"{device}; got {t!r:.80}.")  # fmt: skip
    if should_validate(validate):
        lo, hi = torch.stack([t.min(), t.max()]).tolist()
        if lo < lo_ok or hi > hi_ok:
            raise ValueError(f"{op}: {name} must lie in [{lo_ok}, {hi_ok}] ({what}); got values in [{lo}, {hi}].")


def _launch(op, qsrc, k_cache, v_cache, lens, head_idx, group_size, scale, kv_valid, out, num_splits, kvidx=None,
            cos=None, sin=None, prewait=False):  # fmt: skip
    B, H_kv, S_max, hd = k_cache.shape
    kh = head_idx.shape[0]
    kkv = kvidx.shape[0] if kvidx is not None else 0
    if out is None:
        out = torch.empty((B, kh, hd), dtype=k_cache.dtype, device=k_cache.device)
    else:
        check_out(op, out, shape=(B, kh, hd), dtype=k_cache.dtype, device=k_cache.device)
    cfg = _attn_config(B, kh, S_max, hd, k_cache.element_size(), k_cache.device, num_splits)
    num_warps, splits = cfg.pop("num_warps"), cfg["NUM_SPLITS"]
    dev = k_cache.device
    part_o = torch.empty((B * kh, splits, hd), dtype=torch.float32, device=dev) if splits > 1 else out
    part_lse = torch.empty((B * kh, splits), dtype=torch.float32, device=dev) if splits > 1 else out
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(hd)) * LOG2E
    mask = kv_valid if kv_valid is not None else lens  # dummy pointer when there is no mask
    from_qkv = kvidx is not None
    nj = max(kh, kkv) if from_qkv else kh
    pdl = use_pdl(_decode_attn_kernel, dev)
    _decode_attn_kernel[(B * nj, splits)](
        qsrc, k_cache, v_cache, lens, head_idx, out, part_o, part_lse, mask,
        kvidx if from_qkv else head_idx, cos if cos is not None else qsrc, sin if sin is not None else qsrc,
        kh, kkv, nj, H_kv, hd, group_size, qk_scale,
        qsrc.stride(0), qsrc.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        mask.stride(0) if kv_valid is not None else 0, mask.stride(1) if kv_valid is not None else 0,
        cos.stride(0) if cos is not None else 0,
        num_warps=num_warps, num_stages=cfg["NUM_STAGES"], HAS_VALID=kv_valid is not None, FROM_QKV=from_qkv,
        HAS_ROPE=cos is not None, BLOCK_KV=max(16, next_pow2(max(kkv, H_kv))), BLOCK_KQ=max(16, next_pow2(kh)),
        PREWAIT=pdl and prewait, PDL=pdl, launch_pdl=pdl > 0, **cfg,
    )  # fmt: skip
    if splits == 1:
        return out
    pdl_c = use_pdl(_decode_attn_combine_kernel, dev)  # its own: PDL_EXCLUDE / PDL_LATE name it apart
    _decode_attn_combine_kernel[(B * kh,)](
        part_o, part_lse, out, kh, hd, out.stride(0), out.stride(1),
        NUM_SPLITS=splits, BLOCK_SPLITS=next_pow2(splits), BLOCK_H=cfg["BLOCK_H"], PDL=pdl_c, launch_pdl=pdl_c > 0,
        num_warps=4,
    )  # fmt: skip
    return out


def sparse_decode_attention(q, k_cache, v_cache, seq_lens, head_idx, group_size, scale=None, *, kv_valid=None,
                            validate=True, out=None, num_splits=None):  # fmt: skip
    """Decode attention for the selected query heads -> ``[B, kh, hd]``.

    Args:
        q: ``[B, kh, hd]`` queries of the selected heads (RoPE applied), ``head_idx`` order.
        k_cache, v_cache: ``[B, H_kv, S_max, hd]`` static caches (last dim contiguous).
        seq_lens: ``[B]`` int32 (or int64) valid lengths, 1 <= seq_lens[b] <= S_max.
        head_idx: ``[kh]`` selected query heads; head ``h`` reads KV head ``h // group_size``.
        group_size: query heads per KV head (1 for MHA such as OPT).
        scale: softmax scale, default ``hd ** -0.5``.
        kv_valid: optional ``[B, H_kv, S_max]`` bool/uint8 mask of cache entries that hold real K/V
            (holes left by kv_policy "selected"); masked positions are skipped, except each query's
            own position ``seq_lens[b] - 1``. None: every position below ``seq_lens`` is valid.
        validate: check head_idx / seq_lens values (one host sync; skipped under capture).
        num_splits: sequence splits per (sequence, head); None: heuristic.
    """
    op = "sparse_decode_attention"
    require_triton(op)
    _check_common(op, q, "q", k_cache, v_cache, head_idx, group_size, validate)
    B, H_kv, S_max, hd = k_cache.shape
    if q.shape[1] != head_idx.shape[0]:
        raise ValueError(f"{op}: q has {q.shape[1]} heads but head_idx selects {head_idx.shape[0]}.")
    _check_lengths(op, "seq_lens", seq_lens, B, k_cache.device, 1, S_max, "the current token is in the cache",
                   validate)  # fmt: skip
    kv_valid = _check_valid_mask(op, kv_valid, k_cache)
    return _launch(op, q, k_cache, v_cache, seq_lens, head_idx, group_size, scale, kv_valid, out, num_splits)


def qkv_decode_attention(qkv, kvidx, k_cache, v_cache, pos, head_idx, group_size, scale=None, *, cos=None,
                         sin=None, kv_valid=None, validate=True, out=None, num_splits=None, prewait=False):  # fmt: skip
    """The fused q/k/v projection's finish and the decode attention in one launch -> ``[B, kh, hd]``.

    Does what :func:`~dejavu.kernels.fused_ops.qkv_post` and :func:`sparse_decode_attention` do one after the other
    (the same values; the current position's K/V enter the softmax from the projection, as the cache stores them):
    RoPE on q and K, K/V head t of the projection written into the cache at ``[b, kvidx[t], pos[b]]``, the hole
    mask at ``pos`` (``kv_valid``: True for the KV heads the selected query heads read, False for the others), and
    attention of query head ``head_idx[j]`` (row j of ``qkv``) over positions ``0..pos[b]``.

    Args:
        qkv: ``[B, kh + 2 * kkv, hd]`` the projection: q rows of the selected heads, then K rows, then V rows.
        kvidx: ``[kkv]`` the KV heads of the K/V rows; it must hold every ``head_idx[j] // group_size``.
        pos: ``[B]`` int32/int64 positions being decoded, 0 <= pos[b] < S_max.
        cos, sin: ``[B, hd]`` RoPE tables at ``pos`` (both or neither).
        prewait: a promise that the kernel before this one in the stream writes only ``qkv``, and that everything
            else this kernel reads was complete before that kernel started (the decode step: the q/k/v gather, and
            the selection joined before it). Launched with programmatic dependent launch, the kernel then reads
            everything else it needs (the selection, ``pos``, the RoPE tables, the first tile of the cache below
            ``pos``) before its PDL wait, while that kernel still runs (bench/NOTES.md v12: the decode step 0.5-3.3%
            faster on the four bench models). Without PDL (CPU, interpreter, before Hopper) it changes nothing.
        Others as in :func:`sparse_decode_attention`.
    """
    op = "qkv_decode_attention"
    require_triton(op)
    _check_common(op, qkv, "qkv", k_cache, v_cache, head_idx, group_size, validate)
    B, H_kv, S_max, hd = k_cache.shape
    check_index(op, "kvidx", kvidx, n=H_kv, device=k_cache.device, validate=validate, what="KV heads")
    kh, kkv = head_idx.shape[0], kvidx.shape[0]
    if qkv.shape[1] != kh + 2 * kkv:
        raise ValueError(f"{op}: qkv has {qkv.shape[1]} heads, expected kh + 2 * kkv = {kh} + 2 * {kkv}; it must "
                         f"hold the selected q heads, then K and V rows of the kvidx heads.")  # fmt: skip
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: pass both cos and sin (RoPE) or neither.")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(op, name, t, ndim=2, shape=(B, hd), device=k_cache.device, device_of="the caches",
                         last_dim_contiguous=True)  # fmt: skip
        if cos.stride(0) != sin.stride(0):
            raise ValueError(f"{op}: cos and sin must share a layout; call .contiguous() on both.")
    _check_lengths(op, "pos", pos, B, k_cache.device, 0, S_max - 1, "a free cache slot", validate)
    if should_validate(validate):
        missing = torch.isin(head_idx.long() // group_size, kvidx.long(), invert=True).sum().item()
        if missing:
            raise ValueError(f"{op}: kvidx lacks the KV heads of {missing} selected query heads (head // "
                             f"group_size); add them (kv_heads_for(head_idx, group_size) gives the minimal set).")
    kv_valid = _check_valid_mask(op, kv_valid, k_cache)
    lens = pos  # the kernel reads pos and attends over pos + 1 positions
    return _launch(op, qkv, k_cache, v_cache, lens, head_idx, group_size, scale, kv_valid, out, num_splits,
                   kvidx=kvidx, cos=cos, sin=sin, prewait=bool(prewait))  # fmt: skip


def qkv_decode_attention_ref(qkv, kvidx, k_cache, v_cache, pos, head_idx, group_size, scale=None, *, cos=None,
                             sin=None, kv_valid=None):  # fmt: skip
    """Reference for :func:`qkv_decode_attention`: ``qkv_post_ref`` then :func:`sparse_decode_attention_ref`."""
    B, _, hd = qkv.shape
    kh, kkv = head_idx.shape[0], kvidx.shape[0]
    q = torch.empty((B, kh, hd), dtype=qkv.dtype, device=qkv.device)
    qkv_post_ref(qkv, kh, kkv, q, k_cache, v_cache, kvidx, pos, cos=cos, sin=sin, valid=kv_valid, hidx=head_idx,
                 group=group_size)  # fmt: skip
    return sparse_decode_attention_ref(q, k_cache, v_cache, pos + 1, head_idx, group_size, scale, kv_valid=kv_valid)


def sparse_decode_attention_ref(q, k_cache, v_cache, seq_lens, head_idx, group_size, scale=None, kv_valid=None):
    """Reference: gather the KV heads, masked softmax (at least fp32), weighted sum of values.

    ``kv_valid`` ``[B, H_kv, S_max]``: holes are masked, the query's own position never is.
    """
    B, kh, hd = q.shape
    S_max = k_cache.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(hd)
    kv = head_idx.long() // group_size
    k, v = k_cache[:, kv], v_cache[:, kv]  # [B, kh, S_max, hd]
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhd,bhsd->bhs", q, k).to(acc_dtype) * scale
    pos = torch.arange(S_max, device=q.device)[None, :]
    lens = seq_lens.to(q.device).long()[:, None]
    valid = (pos < lens)[:, None, :]  # [B, 1, S]
    if kv_valid is not None:
        written = kv_valid[:, kv].bool()  # [B, kh, S]
        valid = valid & (written | (pos == lens - 1)[:, None, :])
    scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhs,bhsd->bhd", p.to(v.dtype), v).to(q.dtype)
