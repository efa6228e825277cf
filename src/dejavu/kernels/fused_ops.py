"""Small fused kernels that take launches off the decode step's critical path (v2).

At batch <= 16 a decode step is ~10 big weight streams per layer plus many tiny ops (norms, bias adds, RoPE,
cache writes); in a CUDA graph each tiny op still costs ~2 us (launch, ramp, dependency gap), so 10 of them per
layer is ~1 ms per token on a 40-layer model. These kernels fold them:

* :func:`norm_fused`: LayerNorm / RMSNorm of ``x [B, d]`` (fp32 statistics, the model's rounding), and in the same
  pass an optional ``init = x + bias`` (the residual + output bias a following in-place ``addmm_`` accumulates
  into, so the dense o_proj / fc2 need no bias-add or copy kernel).
* :func:`qkv_post`: after the fused q/k/v projection ``qkv [B, kq + 2 kkv, hd]`` (q heads, then K heads, then V
  heads): RoPE on q and K, q to a contiguous buffer, K/V written into the static cache at each sequence's
  position, and the cache's hole mask for that position (``kv_valid``: KV heads needed by the selected query
  heads). Replaces two bmm, two or three ``index_put`` and the mask ops.

* :func:`embed_fused`: the decode step's first op, the token embedding row of each sequence plus (OPT) its learned
  position's row, or (RoPE) the row of a precomputed cos | sin table at its position, in one launch instead of
  two lookups and an add (OPT) or a copy and seven elementwise kernels building the RoPE tables (Llama).

All have plain torch references (``*_ref``) used by the CPU runtime backend and the tests.
"""

from __future__ import annotations

import torch

from ._checks import cdiv, jit, next_pow2, pdl_sync, require_triton, tl, use_pdl

NORM_KINDS = ("layernorm", "rmsnorm")


@jit
def _norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, rb_ptr, init_ptr, D, eps, stride_x, stride_y, stride_i,
                 IS_LN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_INIT: tl.constexpr,
                 HAS_RB: tl.constexpr, ROUND_MID: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One row per program: y = norm(x) (* w) (+ b); init = x (+ rb)."""
    pdl_sync(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x_raw = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
    x = x_raw.to(tl.float32)
    if IS_LN:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        y = xc * (1.0 / tl.sqrt(var + eps))
    else:
        ms = tl.sum(x * x, axis=0) / D
        y = x * (1.0 / tl.sqrt(ms + eps))
        if ROUND_MID:  # the model's RMSNorm casts to the input dtype before the weight multiply
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=m)
    if HAS_INIT:
        r = x
        if HAS_RB:
            r = r + tl.load(rb_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(init_ptr + row * stride_i + offs, r.to(init_ptr.dtype.element_ty), mask=m)


def norm_fused(x, kind, weight=None, bias=None, eps=1e-5, *, out, init=None, init_bias=None, round_mid=True):
    """``out = norm(x) * weight + bias``; if ``init`` is given, also ``init = x + init_bias`` (one launch).

    x ``[B, d]`` (last dim contiguous); kind "layernorm" or "rmsnorm"; ``round_mid``: RMSNorm rounds the
    normalized value to x's dtype before the weight multiply (as the model's ``Norm`` does).
    """
    require_triton("norm_fused")
    if kind not in NORM_KINDS:
        raise ValueError(f"norm_fused: kind must be one of {NORM_KINDS}, got {kind!r}")
    B, D = x.shape
    block = max(16, next_pow2(D))
    nw = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    pdl = use_pdl(_norm_kernel, x.device)
    _norm_kernel[(B,)](
        x, weight if weight is not None else x, bias if bias is not None else x, out,
        init_bias if init_bias is not None else x, init if init is not None else out,
        D, float(eps), x.stride(0), out.stride(0), init.stride(0) if init is not None else 0,
        IS_LN=kind == "layernorm", HAS_W=weight is not None, HAS_B=bias is not None, HAS_INIT=init is not None,
        HAS_RB=init_bias is not None, ROUND_MID=bool(round_mid), BLOCK=block, PDL=pdl, launch_pdl=pdl > 0, num_warps=nw,
    )  # fmt: skip
    return out


def norm_fused_ref(x, kind, weight=None, bias=None, eps=1e-5, *, out, init=None, init_bias=None, round_mid=True):
    if kind == "layernorm":
        y = F_layer_norm(x, weight, bias, eps)
    else:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = y.to(x.dtype) if round_mid else y
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
    out.copy_(y)
    if init is not None:
        init.copy_(x + init_bias if init_bias is not None else x)
    return out


def F_layer_norm(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


@jit
def rope_tables(cos_ptr, sin_ptr, offs, mask, HAS_ROPE: tl.constexpr):
    """This sequence's RoPE tables [BLOCK_H] in fp32 (``cos_ptr`` / ``sin_ptr`` already at its row); zeros without
    (unused then)."""
    cos = offs.to(tl.float32) * 0.0
    sin = cos
    if HAS_ROPE:
        cos = tl.load(cos_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return cos, sin


@jit
def rope_row(ptr, offs, mask, cos, sin, HD, HAS_ROPE: tl.constexpr):
    """One head row at ``ptr`` in fp32, rotated (``x * cos + rotate_half(x) * sin``) when HAS_ROPE."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        half = HD // 2
        xr = tl.load(ptr + tl.where(offs < half, offs + half, offs - half), mask=mask, other=0.0).to(tl.float32)
        x = x * cos + tl.where(offs < half, -1.0, 1.0) * xr * sin
    return x


@jit
def _qkv_post_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_ptr, v_ptr, kvidx_ptr, pos_ptr, valid_ptr, hidx_ptr,
                     KQ, KKV, HD, H_KV, group,
                     s_qb, s_qh, s_cb, s_oqb, s_oqh, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb, s_mh,
                     HAS_ROPE: tl.constexpr, WRITE_Q: tl.constexpr, HAS_VALID: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_KQ: tl.constexpr,
                     PDL: tl.constexpr):  # fmt: skip
    """Grid (B, KQ + KKV + 1). j < KQ: q head j; j < KQ + KKV: K/V head j - KQ; last: the hole mask."""
    pdl_sync(PDL)
    b = tl.program_id(0)
    j = tl.program_id(1)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    hm = offs < HD
    cos, sin = rope_tables(cos_ptr + b * s_cb, sin_ptr + b * s_cb, offs, hm, HAS_ROPE)
    base = qkv_ptr + b * s_qb
    if j < KQ:
        if WRITE_Q:
            x = rope_row(base + j * s_qh, offs, hm, cos, sin, HD, HAS_ROPE)
            tl.store(q_out_ptr + b * s_oqb + j * s_oqh + offs, x.to(q_out_ptr.dtype.element_ty), mask=hm)
    elif j < KQ + KKV:
        t = j - KQ
        kvh = tl.load(kvidx_ptr + t).to(tl.int64)
        x = rope_row(base + (KQ + t) * s_qh, offs, hm, cos, sin, HD, HAS_ROPE)
        tl.store(k_ptr + b * s_kb + kvh * s_kh + pos * s_ks + offs, x.to(k_ptr.dtype.element_ty), mask=hm)
        v = tl.load(base + (KQ + KKV + t) * s_qh + offs, mask=hm, other=0.0)
        tl.store(v_ptr + b * s_vb + kvh * s_vh + pos * s_vs + offs, v.to(v_ptr.dtype.element_ty), mask=hm)
    else:
        if HAS_VALID:  # valid[b, h, pos] = any selected query head maps to KV head h
            offs_kv = tl.arange(0, BLOCK_KV)
            offs_q = tl.arange(0, BLOCK_KQ)
            hq = tl.load(hidx_ptr + offs_q, mask=offs_q < KQ, other=-1).to(tl.int32)
            grp = tl.where(hq >= 0, hq // group, -1)
            hit = (grp[None, :] == offs_kv[:, None]).to(tl.int32)
            need = tl.max(hit, axis=1)
            tl.store(valid_ptr + b * s_mb + offs_kv * s_mh + pos, need.to(tl.uint8), mask=offs_kv < H_KV)


def qkv_post(qkv, kq, kkv, q_out, k_cache, v_cache, kvidx, pos, *, cos=None, sin=None, valid=None, hidx=None,
             group=1):
    """Finish the fused q/k/v projection ``qkv [B, kq + 2*kkv, hd]`` in one launch.

    RoPE (``cos``/``sin`` [B, hd]) on the q and K heads; q -> ``q_out [B, kq, hd]`` (skipped when ``q_out`` is
    None: then the caller reads q from ``qkv`` directly, no RoPE); K/V head t -> cache entry
    ``[b, kvidx[t], pos[b]]``; with ``valid`` [B, H_kv, S] (bool) also the hole mask at ``pos``: True for the KV
    heads that the selected query heads ``hidx`` (group ``group``) read, False for the others.
    """
    require_triton("qkv_post")
    B, n, hd = qkv.shape
    if n != kq + 2 * kkv:
        raise ValueError(f"qkv_post: qkv has {n} heads, expected kq + 2*kkv = {kq + 2 * kkv}")
    if q_out is None and cos is not None:
        raise ValueError("qkv_post: RoPE needs q_out")
    Hkv = k_cache.shape[1]
    vm = valid.view(torch.uint8) if valid is not None else None
    dummy = qkv
    pdl = use_pdl(_qkv_post_kernel, qkv.device)
    _qkv_post_kernel[(B, kq + kkv + 1)](
        qkv, cos if cos is not None else dummy, sin if sin is not None else dummy,
        q_out if q_out is not None else dummy, k_cache, v_cache, kvidx, pos,
        vm if vm is not None else dummy, hidx if hidx is not None else kvidx,
        kq, kkv, hd, Hkv, group,
        qkv.stride(0), qkv.stride(1), cos.stride(0) if cos is not None else 0,
        q_out.stride(0) if q_out is not None else 0, q_out.stride(1) if q_out is not None else 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        vm.stride(0) if vm is not None else 0, vm.stride(1) if vm is not None else 0,
        HAS_ROPE=cos is not None, WRITE_Q=q_out is not None, HAS_VALID=vm is not None,
        BLOCK_H=max(16, next_pow2(hd)), BLOCK_KV=max(16, next_pow2(Hkv)), BLOCK_KQ=max(16, next_pow2(kq)),
        PDL=pdl, launch_pdl=pdl > 0, num_warps=1,
    )  # fmt: skip
    return q_out


def qkv_post_ref(qkv, kq, kkv, q_out, k_cache, v_cache, kvidx, pos, *, cos=None, sin=None, valid=None, hidx=None,
                 group=1):
    from ..models.decoder import rotate_half

    B = qkv.shape[0]
    q, k, v = qkv[:, :kq], qkv[:, kq:kq + kkv], qkv[:, kq + kkv:]
    if cos is not None:
        c, s = cos[:, None], sin[:, None]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
    if q_out is not None:
        q_out.copy_(q)
    bi = torch.arange(B, device=qkv.device)
    k_cache[bi[:, None], kvidx[None, :], pos[:, None]] = k
    v_cache[bi[:, None], kvidx[None, :], pos[:, None]] = v
    if valid is not None:
        # index_fill_, not `need[i] = True`: a Python-scalar index_put copies from the host, illegal in graph capture
        need = torch.zeros(k_cache.shape[1], dtype=torch.bool, device=qkv.device)
        need.index_fill_(0, hidx.long() // group, True)
        valid[bi, :, pos] = need.expand(B, -1)
    return q_out


@jit
def _embed_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr, out_ptr, pout_ptr, V, D, DP, stride_te, stride_pe, stride_o,
                  stride_po, POS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Grid (B, cdiv(max(D, DP), BLOCK)): columns of out[b] = wte[tok[b]] (POS 1: + wpe[pos[b]], summed in fp32 and
    rounded once, as torch.add of the two rows; POS 2: pout[b] = wpe[pos[b]], DP wide); a token id outside [0, V)
    makes the row NaN."""
    pdl_sync(PDL)
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    tok = tl.load(tok_ptr + b).to(tl.int64)
    ok = (tok >= 0) & (tok < V)
    e = tl.load(wte_ptr + tl.where(ok, tok, 0) * stride_te + offs, mask=m, other=0.0).to(tl.float32)
    if POS != 0:
        pos = tl.load(pos_ptr + b).to(tl.int64)
        if POS == 1:
            e += tl.load(wpe_ptr + pos * stride_pe + offs, mask=m, other=0.0).to(tl.float32)
        else:
            mp = offs < DP
            tl.store(pout_ptr + b * stride_po + offs, tl.load(wpe_ptr + pos * stride_pe + offs, mask=mp), mask=mp)
    e = tl.where(ok, e, float("nan"))
    tl.store(out_ptr + b * stride_o + offs, e.to(out_ptr.dtype.element_ty), mask=m)


def _check_embed(op, tok, wte, pos, wpe, out, pos_out):
    for name, t in (("tok", tok), ("pos", pos)):
        if t is not None and (t.dim() != 1 or t.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"{op}: {name} must be a 1-D int32/int64 tensor (one id per sequence), got "
                             f"{tuple(t.shape)} {t.dtype}")  # fmt: skip
    for name, t in (("wte", wte), ("wpe", wpe)):
        if t is not None and t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D table [rows, width], got {tuple(t.shape)}")
    B, D = tok.shape[0], wte.shape[1]
    if out.shape != (B, D) or out.dtype != wte.dtype or out.stride(-1) != 1:
        raise ValueError(f"{op}: out must be a [{B}, {D}] {wte.dtype} tensor with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype}")  # fmt: skip
    if (pos is None) != (wpe is None):
        raise ValueError(f"{op}: pass pos and a position table wpe together, or neither")
    if wpe is not None:
        P, DP = wpe.shape
        if pos.shape != tok.shape or wpe.dtype != wte.dtype or (pos_out is None and DP != D):
            raise ValueError(f"{op}: pos must be [{B}] and wpe [P, {D}] {wte.dtype} (or any width with pos_out), got "
                             f"{tuple(pos.shape)} and {tuple(wpe.shape)} {wpe.dtype}")  # fmt: skip
        if pos_out is not None and (pos_out.shape != (B, DP) or pos_out.dtype != wpe.dtype or pos_out.stride(-1) != 1):
            raise ValueError(f"{op}: pos_out must be a [{B}, {DP}] {wpe.dtype} tensor with contiguous rows, got "
                             f"{tuple(pos_out.shape)} {pos_out.dtype}")  # fmt: skip
    elif pos_out is not None:
        raise ValueError(f"{op}: pos_out needs pos and wpe")
    if any(t.device != wte.device for t in (tok, out) + ((pos, wpe) if wpe is not None else ())):
        raise ValueError(f"{op}: all tensors must be on {wte.device}")
    if wte.stride(-1) != 1 or (wpe is not None and wpe.stride(-1) != 1):
        raise ValueError(f"{op}: the embedding tables need contiguous rows (.contiguous())")


def embed_fused(tok, wte, pos=None, wpe=None, *, out, pos_out=None):
    """The decode step's start in one launch: ``out[b] = wte[tok[b]] + wpe[pos[b]]`` (learned positions, OPT), or
    ``out[b] = wte[tok[b]]`` and ``pos_out[b] = wpe[pos[b]]`` (``pos_out`` given: a position table of any width, e.g.
    the RoPE cos | sin rows, precomputed per position), or ``out[b] = wte[tok[b]]`` (no ``pos``).

    ``tok`` [B] token ids, ``wte`` [V, d]; ``pos`` [B], ``wpe`` [P, width], rows already offset as the model indexes
    them. The sum is fp32, rounded once to the tables' dtype (as ``torch.add`` of the two rows). Inside a CUDA graph
    the ids cannot be checked on the host: a token id outside ``[0, V)`` gives a NaN row (and so NaN logits) instead
    of a read out of bounds; positions are the caller's (the decoder bounds them).
    """
    require_triton("embed_fused")
    _check_embed("embed_fused", tok, wte, pos, wpe, out, pos_out)
    B, D = out.shape
    DP = wpe.shape[1] if wpe is not None else 0
    block = max(16, min(1024, next_pow2(max(D, DP))))
    pdl = use_pdl(_embed_kernel, wte.device)
    _embed_kernel[(B, cdiv(max(D, DP), block))](
        tok, pos if pos is not None else tok, wte, wpe if wpe is not None else wte, out,
        pos_out if pos_out is not None else out, wte.shape[0], D, DP, wte.stride(0),
        wpe.stride(0) if wpe is not None else 0, out.stride(0), pos_out.stride(0) if pos_out is not None else 0,
        POS=0 if wpe is None else (2 if pos_out is not None else 1), BLOCK=block, PDL=pdl, launch_pdl=pdl > 0,
        num_warps=4,
    )  # fmt: skip
    return out


def embed_fused_ref(tok, wte, pos=None, wpe=None, *, out, pos_out=None):
    _check_embed("embed_fused_ref", tok, wte, pos, wpe, out, pos_out)
    e = torch.nn.functional.embedding(tok, wte)
    if wpe is None:
        return out.copy_(e)
    p = torch.nn.functional.embedding(pos, wpe)
    if pos_out is not None:
        pos_out.copy_(p)
        return out.copy_(e)
    return torch.add(e, p, out=out)
