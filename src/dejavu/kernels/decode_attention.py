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

LOG2E = 1.4426950408889634


@jit
def _decode_attn_kernel(
    # pointers
    q_ptr,  # [B, KH, HD]
    k_ptr,  # [B, H_kv, S_max, HD]
    v_ptr,  # [B, H_kv, S_max, HD]
    seq_lens_ptr,  # [B] int32/int64
    head_idx_ptr,  # [KH]
    out_ptr,  # [B, KH, HD] (num_splits == 1)
    part_o_ptr,  # [B * KH, NUM_SPLITS, HD] fp32 (num_splits > 1)
    part_lse_ptr,  # [B * KH, NUM_SPLITS] fp32, log2 domain
    valid_ptr,  # [B, H_kv, S_max] uint8 (HAS_VALID), else a dummy
    # sizes
    KH,
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
    # meta-parameters
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    HAS_VALID: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (sequence, selected head, split) per program; online softmax over its positions."""
    pdl_sync(PDL)
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // KH
    j = pid_bh % KH

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    kv_head = tl.load(head_idx_ptr + j).to(tl.int64) // group_size
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_S) * BLOCK_S  # whole tiles per split
    s_lo = pid_s * chunk
    s_hi = tl.minimum(s_lo + chunk, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HD
    q = tl.load(q_ptr + b * stride_qb + j * stride_qh + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    q = q * qk_scale  # scores come out in log2 units: exp2 below is exp of the scaled score
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh
    m_base = valid_ptr + b.to(tl.int64) * stride_mb + kv_head * stride_mh

    m_i = float("-inf")  # running max (log2 units)
    l_i = 0.0  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s0 in tl.range(s_lo, s_hi, BLOCK_S, num_stages=NUM_STAGES):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < s_hi
        kv_mask = s_mask[:, None] & h_mask[None, :]
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_h[None, :], mask=kv_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_S]
        scores = tl.where(s_mask, scores, float("-inf"))
        if HAS_VALID:  # holes are skipped; the current position (seq_len - 1) is always seen
            ok = tl.load(m_base + offs_s, mask=s_mask, other=0) != 0
            scores = tl.where(ok | (offs_s == seq_len - 1), scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))  # -inf while only holes were seen
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps exp2 arguments finite
        else:
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))  # finite: every tile has a valid position
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(scores - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_h[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.maximum(l_i, 1e-30)
        tl.store(out_ptr + b * stride_ob + j * stride_oh + offs_h, o.to(out_ptr.dtype.element_ty), mask=h_mask)
    else:
        # An empty split (s_lo >= seq_len) stores o = 0 and lse = -inf: weight 0 in stage 2.
        o = acc / tl.maximum(l_i, 1e-30)
        part = pid_bh * NUM_SPLITS + pid_s
        tl.store(part_o_ptr + part * HD + offs_h, o, mask=h_mask)
        tl.store(part_lse_ptr + part, tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf")))


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


def _attn_config(batch: int, kh: int, s_max: int, hd: int, elem: int, device: torch.device, num_splits) -> dict:
    """Tiles and split count: aim for ~2 programs per SM, never more splits than tiles.

    A K (or V) tile is held to 16 KiB (64 positions x 128 dims in fp16), 3 stages deep.
    """
    block_h = max(16, next_pow2(hd))
    block_s = max(16, min(64, 16384 // (block_h * elem)))
    if num_splits is None:
        num_splits = min(cdiv(2 * num_sms(device), batch * kh), cdiv(s_max, block_s), 64)
    num_splits = max(1, int(num_splits))
    return dict(NUM_SPLITS=num_splits, BLOCK_S=block_s, BLOCK_H=block_h, NUM_STAGES=3, num_warps=4)


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
    check_tensor(op, "k_cache", k_cache, ndim=4, last_dim_contiguous=True)
    check_launch_device(op, _decode_attn_kernel, k_cache)
    B, H_kv, S_max, hd = k_cache.shape
    like = dict(dtype=k_cache.dtype, dtype_of="the caches", device=k_cache.device, device_of="the caches")
    check_tensor(op, "v_cache", v_cache, ndim=4, shape=tuple(k_cache.shape), last_dim_contiguous=True, **like)
    check_tensor(op, "q", q, ndim=3, shape=(B, None, hd), last_dim_contiguous=True, **like)
    check_batch(op, B)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{op}: group_size must be a positive int (H // H_kv), got {group_size!r}.")
    check_index(op, "head_idx", head_idx, n=H_kv * group_size, device=k_cache.device, validate=validate,
                what="heads")  # fmt: skip
    if q.shape[1] != head_idx.shape[0]:
        raise ValueError(f"{op}: q has {q.shape[1]} heads but head_idx selects {head_idx.shape[0]}.")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype not in INDEX_DTYPES or tuple(seq_lens.shape) != (B,) \
            or seq_lens.device != k_cache.device or not seq_lens.is_contiguous():
        raise ValueError(f"{op}: seq_lens must be a contiguous int32 (or int64) tensor of shape ({B},) on "
                         f"{k_cache.device}; got {seq_lens!r:.80}.")  # fmt: skip
    if should_validate(validate):
        lo, hi = torch.stack([seq_lens.min(), seq_lens.max()]).tolist()
        if lo < 1 or hi > S_max:
            raise ValueError(f"{op}: seq_lens must lie in [1, S_max={S_max}] (the current token is in the cache); "
                             f"got values in [{lo}, {hi}].")  # fmt: skip
    if kv_valid is not None:
        if not isinstance(kv_valid, torch.Tensor) or kv_valid.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"{op}: kv_valid must be a bool or uint8 tensor [B, H_kv, S_max] (True = entry written); "
                             f"got {type(kv_valid).__name__} {getattr(kv_valid, 'dtype', '')}.")  # fmt: skip
        check_tensor(op, "kv_valid", kv_valid.view(torch.uint8), ndim=3, dtype=torch.uint8, dtype_of="masks",
                     device=k_cache.device, device_of="the caches", shape=(B, H_kv, S_max),
                     last_dim_contiguous=True)  # fmt: skip
        kv_valid = kv_valid.view(torch.uint8)  # same bytes; Triton loads it as a plain byte mask
    kh = head_idx.shape[0]
    if out is None:
        out = torch.empty((B, kh, hd), dtype=q.dtype, device=q.device)
    else:
        check_out(op, out, shape=(B, kh, hd), dtype=q.dtype, device=q.device)

    cfg = _attn_config(B, kh, S_max, hd, q.element_size(), q.device, num_splits)
    num_warps, splits = cfg.pop("num_warps"), cfg["NUM_SPLITS"]
    part_o = torch.empty((B * kh, splits, hd), dtype=torch.float32, device=q.device) if splits > 1 else out
    part_lse = torch.empty((B * kh, splits), dtype=torch.float32, device=q.device) if splits > 1 else out
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(hd)) * LOG2E
    mask = kv_valid if kv_valid is not None else seq_lens  # dummy pointer when there is no mask
    pdl = use_pdl(_decode_attn_kernel, q.device)
    _decode_attn_kernel[(B * kh, splits)](
        q, k_cache, v_cache, seq_lens, head_idx, out, part_o, part_lse, mask,
        kh, hd, group_size, qk_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        mask.stride(0) if kv_valid is not None else 0, mask.stride(1) if kv_valid is not None else 0,
        num_warps=num_warps, num_stages=cfg["NUM_STAGES"], HAS_VALID=kv_valid is not None, PDL=pdl, launch_pdl=pdl,
        **cfg,
    )  # fmt: skip
    if splits > 1:
        _decode_attn_combine_kernel[(B * kh,)](
            part_o, part_lse, out, kh, hd, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, BLOCK_SPLITS=next_pow2(splits), BLOCK_H=cfg["BLOCK_H"], PDL=pdl, launch_pdl=pdl,
            num_warps=4,
        )  # fmt: skip
    return out


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
