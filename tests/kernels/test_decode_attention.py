"""sparse_decode_attention against its torch reference (MHA and GQA, split and unsplit)."""

import math

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, LOW_PRECISION, assert_matches, make_gen, poisoned, randn  # noqa: E402

from dejavu.kernels import (  # noqa: E402
    qkv_decode_attention,
    qkv_decode_attention_ref,
    sparse_decode_attention,
    sparse_decode_attention_ref,
)

pytestmark = pytest.mark.needs_kernels

# (B, H_kv, group_size, S_max, head_dim, kh)
CONFIGS = [
    (1, 4, 1, 150, 32, 1),  # MHA, one selected head, 3 tiles
    (3, 2, 3, 97, 24, 4),  # GQA, head_dim not a power of two
    (16, 2, 2, 40, 16, 4),  # full batch, short cache
]


def _inputs(B, H_kv, group, S, hd, kh, dtype, key):
    g = make_gen("attn", B, H_kv, group, S, hd, kh, dtype, key)
    q = randn(B, kh, hd, dtype=dtype, gen=g)
    k_cache, v_cache = randn(B, H_kv, S, hd, dtype=dtype, gen=g), randn(B, H_kv, S, hd, dtype=dtype, gen=g)
    seq_lens = torch.randint(1, S + 1, (B,), generator=g, dtype=torch.int32)
    seq_lens[0] = S  # full cache
    if B > 1:
        seq_lens[1] = 1  # only the current token
    head_idx = torch.randperm(H_kv * group, generator=g)[:kh]
    return q, k_cache, v_cache, seq_lens.to(DEVICE), head_idx.to(DEVICE)


def _poison_tail(cache, seq_lens):
    """NaN in every cache slot past seq_len: the kernel must never read them."""
    c = cache.clone()
    for b, n in enumerate(seq_lens.tolist()):
        c[b, :, n:] = float("nan")
    return c


def _check(out, q, k_cache, v_cache, seq_lens, head_idx, group, scale=None):
    args = (q, k_cache, v_cache, seq_lens, head_idx, group, scale)
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    exact = sparse_decode_attention_ref(*up)
    lowp = sparse_decode_attention_ref(*args) if q.dtype in LOW_PRECISION else None
    assert_matches(out, exact, lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("B,H_kv,group,S,hd,kh", CONFIGS)
def test_sparse_decode_attention(B, H_kv, group, S, hd, kh, num_splits, dtype):
    q, k_cache, v_cache, seq_lens, head_idx = _inputs(B, H_kv, group, S, hd, kh, dtype, num_splits)
    out = poisoned((B, kh, hd), dtype)
    res = sparse_decode_attention(q, _poison_tail(k_cache, seq_lens), _poison_tail(v_cache, seq_lens), seq_lens,
                                  head_idx, group, num_splits=num_splits, out=out)  # fmt: skip
    assert res is out
    _check(res, q, k_cache, v_cache, seq_lens, head_idx, group)


@pytest.mark.parametrize("s_max,splits,stages", [(256, 4, 1), (200, 4, 1), (257, 4, 3), (2048, 8, 3), (64, 1, 1)])
def test_config_pipelines_only_multi_tile_splits(monkeypatch, s_max, splits, stages):
    """The tile loop is software-pipelined (3 stages: 66 KiB of staged K/V tiles at 64 x 128 fp16, offline sm_90)
    only where a split covers more than one tile; one tile a split (the bench's 256-position caches at 4 splits) gets
    1 stage and 1-2 KiB of shared memory. ONE_TILE_UNPIPELINED off (the A/B knob) keeps 3 everywhere."""
    from dejavu.kernels import decode_attention as DA

    cfg = DA._attn_config(1, 20, s_max, 128, 2, torch.device("cpu"), splits)
    assert (cfg["NUM_SPLITS"], cfg["BLOCK_S"], cfg["NUM_STAGES"]) == (splits, 64, stages)
    monkeypatch.setattr(DA, "ONE_TILE_UNPIPELINED", False)
    assert DA._attn_config(1, 20, s_max, 128, 2, torch.device("cpu"), splits)["NUM_STAGES"] == 3


def test_scale_int64_lengths_and_many_splits():
    """Custom scale, int64 seq_lens, more splits than tiles (empty splits), default alloc."""
    B, H_kv, group, S, hd, kh = 2, 2, 2, 70, 16, 3
    q, k_cache, v_cache, seq_lens, head_idx = _inputs(B, H_kv, group, S, hd, kh, torch.float32, "scale")
    for splits in (8, None):
        res = sparse_decode_attention(q, k_cache, v_cache, seq_lens.long(), head_idx, group, scale=0.3,
                                      num_splits=splits)  # fmt: skip
        _check(res, q, k_cache, v_cache, seq_lens, head_idx, group, scale=0.3)


def test_matches_dense_attention_on_selected_heads():
    """Same as full (dense) attention restricted to the selected heads, with static cache shapes."""
    B, H, hd, S = 2, 4, 16, 33
    g = make_gen("dense")
    q_all = randn(B, H, hd, gen=g)
    k, v = randn(B, H, S, hd, gen=g), randn(B, H, S, hd, gen=g)
    seq_lens = torch.tensor([S, 20], dtype=torch.int32, device=DEVICE)
    heads = torch.tensor([3, 1], device=DEVICE)
    res = sparse_decode_attention(q_all[:, heads], k, v, seq_lens, heads, 1)
    for b, n in enumerate(seq_lens.tolist()):
        p = torch.softmax((q_all[b, :, None, :] @ k[b, :, :n].transpose(-1, -2)).squeeze(1) / math.sqrt(hd), dim=-1)
        dense = (p[:, None, :] @ v[b, :, :n]).squeeze(1)  # [H, hd]
        torch.testing.assert_close(res[b], dense[heads], rtol=1e-5, atol=1e-5)


def test_rejects_bad_inputs():
    B, H_kv, group, S, hd, kh = 2, 2, 2, 20, 16, 2
    q, k, v, sl, hi = _inputs(B, H_kv, group, S, hd, kh, torch.float16, "bad")
    cases = [
        (lambda: sparse_decode_attention(q, k, v, sl, torch.tensor([4, 0], device=DEVICE), group), "out of bounds"),
        (lambda: sparse_decode_attention(q, k, v, sl, torch.tensor([1, 1], device=DEVICE), group), "duplicated"),
        (lambda: sparse_decode_attention(q, k, v, torch.zeros_like(sl), hi, group), "seq_lens"),
        (lambda: sparse_decode_attention(q, k, v, sl + S, hi, group), "seq_lens"),
        (lambda: sparse_decode_attention(q, k, v, sl.float(), hi, group), "seq_lens"),
        (lambda: sparse_decode_attention(q.float(), k, v, sl, hi, group), "dtype"),
        (lambda: sparse_decode_attention(q, k, v.float(), sl, hi, group), "dtype"),
        (lambda: sparse_decode_attention(q, k, v[:, :, :10], sl, hi, group), "dimension 2"),
        (lambda: sparse_decode_attention(q.to("meta"), k, v, sl, hi, group), "meta"),
        (lambda: sparse_decode_attention(q[:, :1], k, v, sl, hi, group), "heads"),
        (lambda: sparse_decode_attention(q, k, v, sl, hi, 0), "group_size"),
        (lambda: sparse_decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, sl, hi, group),
         "stride 1"),  # fmt: skip
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    big = lambda t: t.repeat(9, *([1] * (t.dim() - 1)))[:17]  # noqa: E731
    with pytest.raises(ValueError, match="batch size 17"):
        sparse_decode_attention(big(q), big(k), big(v), big(sl), hi, group)


# ---- kv_valid: holes left by kv_policy="selected" ------------------------------------------------


def _holes(B, H_kv, S, seq_lens, key, dtype=torch.bool):
    """Random holes, plus one KV head whose history is all holes except the current position, and (if long
    enough) a whole run of holes spanning several tiles, so that entire tiles / splits see no valid position."""
    g = make_gen("holes", B, H_kv, S, key)
    valid = torch.rand(B, H_kv, S, generator=g) > 0.4
    valid[:, 0] = False  # only the current position remains for KV head 0
    if S > 100:
        valid[:, -1, 5:100] = False
    for b, n in enumerate(seq_lens.tolist()):
        valid[b, :, n - 1] = valid[b, :, n - 1] & (torch.rand(H_kv, generator=g) > 0.5)  # may be a hole: still seen
    return valid.to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("B,H_kv,group,S,hd,kh", CONFIGS)
def test_kv_valid_mask(B, H_kv, group, S, hd, kh, num_splits, dtype):
    q, k_cache, v_cache, seq_lens, head_idx = _inputs(B, H_kv, group, S, hd, kh, dtype, ("holes", num_splits))
    valid = _holes(B, H_kv, S, seq_lens, (group, num_splits), dtype=torch.bool if num_splits != 3 else torch.uint8)
    k_p, v_p = _poison_tail(k_cache, seq_lens), _poison_tail(v_cache, seq_lens)
    res = sparse_decode_attention(q, k_p, v_p, seq_lens, head_idx, group, kv_valid=valid, num_splits=num_splits)
    args = (q, k_cache, v_cache, seq_lens, head_idx, group, None)
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    exact = sparse_decode_attention_ref(*up, kv_valid=valid)
    lowp = sparse_decode_attention_ref(*args, kv_valid=valid) if dtype in LOW_PRECISION else None
    assert_matches(res, exact, lowp)
    # the mask matters: without it the answer differs
    assert not torch.allclose(res.double().cpu(), sparse_decode_attention_ref(*up).cpu(), atol=1e-3)


def test_kv_valid_all_true_equals_no_mask_and_holes_equal_dropped_positions():
    B, H_kv, group, S, hd, kh = 2, 2, 1, 70, 16, 2
    q, k, v, sl, hi = _inputs(B, H_kv, group, S, hd, kh, torch.float32, "holes-eq")
    ones = torch.ones(B, H_kv, S, dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(sparse_decode_attention(q, k, v, sl, hi, group, kv_valid=ones),
                               sparse_decode_attention(q, k, v, sl, hi, group), rtol=1e-6, atol=1e-6)
    # a hole is the same as removing the position: compare against attention over the kept positions only
    valid = _holes(B, H_kv, S, sl, "eq")
    res = sparse_decode_attention(q, k, v, sl, hi, group, kv_valid=valid, num_splits=4)
    for b, n in enumerate(sl.tolist()):
        for j, h in enumerate(hi.tolist()):
            keep = valid[b, h, :n].clone()
            keep[n - 1] = True
            kk, vv = k[b, h, :n][keep], v[b, h, :n][keep]
            p = torch.softmax(kk @ q[b, j] / math.sqrt(hd), dim=0)
            torch.testing.assert_close(res[b, j], p @ vv, rtol=1e-5, atol=1e-5)


def test_kv_valid_rejects_bad_masks():
    B, H_kv, group, S, hd, kh = 2, 2, 2, 20, 16, 2
    q, k, v, sl, hi = _inputs(B, H_kv, group, S, hd, kh, torch.float16, "bad-mask")
    good = torch.ones(B, H_kv, S, dtype=torch.bool, device=DEVICE)
    strided = torch.ones(B, H_kv, 2 * S, dtype=torch.bool, device=DEVICE)[..., ::2]
    for bad, match in [(good.float(), "bool or uint8"), (good[:, :1], "dimension 1"), (good[0], "3 dimensions"),
                       (strided, "stride 1")]:
        with pytest.raises(ValueError, match=match):
            sparse_decode_attention(q, k, v, sl, hi, group, kv_valid=bad)


# ---- qkv_decode_attention: the q/k/v finish fused into the attention ----------------------------------------

# (B, H_kv, group, S, hd, kh, kv set: "need" = the needed KV heads (padded to kh under GQA), "all")
QKV_CONFIGS = [
    (1, 4, 1, 150, 32, 2, "need"),  # MHA with holes: K/V rows of exactly the selected heads
    (2, 2, 3, 97, 24, 4, "need"),  # GQA: 2 KV rows serve 4 query heads; head_dim not a power of two
    (3, 4, 2, 40, 16, 1, "all"),  # kv_policy "all": more K/V rows (4) than query heads (1)
]


def _qkv_inputs(B, H_kv, group, S, hd, kh, kv, dtype, key):
    g = make_gen("qkv", B, H_kv, group, S, hd, kh, kv, dtype, key)
    head_idx = torch.randperm(H_kv * group, generator=g)[:kh]
    need = torch.unique(head_idx // group)
    if kv == "all":
        kvidx = torch.arange(H_kv)
    else:  # the needed heads first, padded with unneeded ones up to min(kh, H_kv) (the runtime's fixed-size set)
        rest = torch.tensor([h for h in range(H_kv) if h not in need.tolist()], dtype=torch.long)
        kvidx = torch.cat([need, rest[:max(0, min(kh, H_kv) - need.numel())]])
    qkv = randn(B, kh + 2 * kvidx.numel(), hd, dtype=dtype, gen=g)
    k_cache, v_cache = randn(B, H_kv, S, hd, dtype=dtype, gen=g), randn(B, H_kv, S, hd, dtype=dtype, gen=g)
    pos = torch.randint(0, S, (B,), generator=g)
    pos[0] = S - 1  # the last slot
    if B > 1:
        pos[1] = 0  # the first token
    ang = torch.rand(B, hd // 2, generator=g) * 6.3  # RoPE tables: the same angle in both halves
    cos, sin = (f(torch.cat([ang, ang], 1)).to(dtype=dtype, device=DEVICE) for f in (torch.cos, torch.sin))
    return qkv, kvidx.to(DEVICE), k_cache, v_cache, pos.to(DEVICE), head_idx.to(DEVICE), cos, sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope,holes", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("B,H_kv,group,S,hd,kh,kv", QKV_CONFIGS)
def test_qkv_decode_attention(B, H_kv, group, S, hd, kh, kv, num_splits, rope, holes, dtype):
    """Output, cache writes and hole mask equal qkv_post + sparse_decode_attention (the reference); positions past
    pos are poisoned (never read), and the cache entries at pos of the K/V heads are poisoned before (the kernel
    must take them from the projection, not from the cache). ``prewait`` as the decode step passes it (a no-op
    without PDL, i.e. here under the interpreter; on a Hopper GPU the reads before the wait)."""
    qkv, kvidx, k_cache, v_cache, pos, head_idx, cos, sin = _qkv_inputs(B, H_kv, group, S, hd, kh, kv, dtype,
                                                                         (num_splits, rope, holes))  # fmt: skip
    cs = dict(cos=cos, sin=sin) if rope else {}
    valid = _holes(B, H_kv, S, pos + 1, (group, num_splits, "qkv")) if holes else None
    k_p, v_p = _poison_tail(k_cache, pos), _poison_tail(v_cache, pos)  # slots >= pos
    vm = valid.clone() if holes else None
    out = poisoned((B, kh, hd), dtype)
    res = qkv_decode_attention(qkv, kvidx, k_p, v_p, pos, head_idx, group, kv_valid=vm, num_splits=num_splits,
                               out=out, prewait=True, **cs)  # fmt: skip
    assert res is out
    exact = qkv_decode_attention_ref(qkv.double(), kvidx, k_cache.double(), v_cache.double(), pos, head_idx, group,
                                     kv_valid=valid.clone() if holes else None,
                                     **{n: t.double() for n, t in cs.items()})  # fmt: skip
    k_l, v_l, va_l = k_cache.clone(), v_cache.clone(), valid.clone() if holes else None
    ref_l = qkv_decode_attention_ref(qkv, kvidx, k_l, v_l, pos, head_idx, group, kv_valid=va_l, **cs)
    assert_matches(res, exact, ref_l if dtype in LOW_PRECISION else None)
    # what the step leaves in the cache: the K/V rows at pos (RoPE'd in fp32, then rounded), the hole mask
    bi, kv = torch.arange(B, device=DEVICE)[:, None], kvidx[None, :].long()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for got, ref in ((k_p, k_l), (v_p, v_l)):
        torch.testing.assert_close(got[bi, kv, pos[:, None]], ref[bi, kv, pos[:, None]], rtol=tol, atol=tol)
    if holes:
        assert torch.equal(vm, va_l)


def test_qkv_decode_attention_rejects_bad_inputs():
    B, H_kv, group, S, hd, kh = 2, 4, 2, 20, 16, 2
    qkv, kvidx, k, v, pos, hi, cos, sin = _qkv_inputs(B, H_kv, group, S, hd, kh, "need", torch.float16, "bad")
    other = torch.tensor([h for h in range(H_kv) if h not in kvidx.tolist()][:kvidx.numel()], device=DEVICE)
    cases = [
        (lambda: qkv_decode_attention(qkv, other, k, v, pos, hi, group), "lacks the KV heads"),
        (lambda: qkv_decode_attention(qkv[:, :-1], kvidx, k, v, pos, hi, group), "expected kh"),
        (lambda: qkv_decode_attention(qkv, kvidx, k, v, pos + S, hi, group), "free cache slot"),
        (lambda: qkv_decode_attention(qkv, kvidx, k, v, pos.float(), hi, group), "pos must be"),
        (lambda: qkv_decode_attention(qkv, kvidx, k, v, pos, hi, group, cos=cos), "both cos and sin"),
        (lambda: qkv_decode_attention(qkv, kvidx, k, v, pos, hi, group, cos=cos[:1], sin=sin[:1]), "dimension 0"),
        (lambda: qkv_decode_attention(qkv, kvidx * 0, k, v, pos, hi, group), "duplicated"),
        (lambda: qkv_decode_attention(qkv.float(), kvidx, k, v, pos, hi, group), "dtype"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
