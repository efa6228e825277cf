"""head_gather_gemv / head_gather_down / kv_heads_for against their torch references."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, check_against, make_gen, poisoned, rand_index, randn  # noqa: E402

from dejavu.kernels import (  # noqa: E402
    NormFold,
    XSum,
    fold_norm,
    head_gather_down,
    head_gather_down_ref,
    head_gather_gemv,
    head_gather_gemv_ref,
    kv_heads_for,
    norm_ref,
    x_sum_ref,
)

pytestmark = pytest.mark.needs_kernels

SHAPES = [(72, 6, 16), (40, 5, 24)]  # (d, H, head_dim): head_dim 24 is not a power of two
CASES = [(d, H, hd, kh) for d, H, hd in SHAPES for kh in sorted({1, H // 2, H})]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("d,H,hd,kh", CASES)
def test_head_gather_gemv(d, H, hd, kh, B, dtype):
    g = make_gen("qkv", d, H, hd, kh, B, dtype)
    x, w = randn(B, d, dtype=dtype, gen=g), randn(H * hd, d, dtype=dtype, gen=g)
    bias = randn(H * hd, dtype=dtype, gen=g)
    head_idx = rand_index(H, kh, gen=g, dtype=torch.int32 if B != 3 else torch.int64)
    b = bias if (kh + B) % 2 else None
    out = poisoned((B, kh, hd), dtype)
    res = head_gather_gemv(x, w, head_idx, hd, b, out=out, prewait=b is None)  # (prewait: as head_gather_down's)
    assert res is out
    check_against(res, head_gather_gemv_ref, (x, w, head_idx, hd, b), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_head_gather_gemv_folded_norm(kind, B, dtype):
    """The block's input norm folded into the q/k/v gather == norm, then the gather (per-row constants expanded
    per head inside the kernel)."""
    d, H, hd, kh = 200, 6, 24, 4
    g = make_gen("qkv-norm", kind, B, dtype)
    x = (randn(B, d, gen=g) + 0.5).to(dtype)
    w, bias = randn(H * hd, d, dtype=dtype, gen=g, scale=0.2), randn(H * hd, dtype=dtype, gen=g)
    gain = (1.0 + 0.3 * randn(d, gen=g)).to(dtype)
    shift = randn(d, dtype=dtype, gen=g, scale=0.5) if kind == "layernorm" else None
    head_idx = rand_index(H, kh, gen=g)
    res = head_gather_gemv(x, w, head_idx, hd, norm=fold_norm(w, kind, gain, shift, 1e-5, bias),
                           out=poisoned((B, kh, hd), dtype))

    def ref(x, w, gain, shift, bias):
        h = norm_ref(x, NormFold(kind, gain, shift, 1e-5, bias, None, None))
        return head_gather_gemv_ref(h, w, head_idx, hd, bias)

    check_against(res, ref, (x, w, gain, shift, bias), dtype=dtype)


@pytest.mark.usefixtures("fma_batch_2")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("kind,has_b2", [("layernorm", True), ("rmsnorm", False)])
def test_head_gather_gemv_x_sum(kind, has_b2, B, dtype):
    """x made from an unfinished MLP block (XSum): the projection of norm((sums + b2) + residual), rounded to the
    dtype as the block would store it, and that x written into the x argument."""
    d, H, hd, kh = 600, 6, 24, 4  # d over one 512-wide chunk
    g = make_gen("qkv-xsum", kind, has_b2, B, dtype)
    sums = randn(B, d, gen=g)
    b2 = randn(d, dtype=dtype, gen=g) if has_b2 else None
    res = (randn(B, d, gen=g) + 0.5).to(dtype)
    w, bias = randn(H * hd, d, dtype=dtype, gen=g, scale=0.2), randn(H * hd, dtype=dtype, gen=g)
    gain = (1.0 + 0.3 * randn(d, gen=g)).to(dtype)
    shift = randn(d, dtype=dtype, gen=g, scale=0.5) if kind == "layernorm" else None
    head_idx = rand_index(H, kh, gen=g)
    x = poisoned((B, d), dtype)
    xs = XSum(sums, b2, res)
    got = head_gather_gemv(x, w, head_idx, hd, norm=fold_norm(w, kind, gain, shift, 1e-5, bias), x_sum=xs,
                           out=poisoned((B, kh, hd), dtype))  # fmt: skip
    assert torch.equal(x, x_sum_ref(xs, dtype)), "x must be written exactly as the block would have stored it"

    def ref(sums, res, w, gain, shift, bias, *b2):
        xx = ((sums + b2[0]) if b2 else sums) + res
        h = norm_ref(xx.to(w.dtype), NormFold(kind, gain, shift, 1e-5, bias, None, None))
        return head_gather_gemv_ref(h, w, head_idx, hd, bias)

    check_against(got, ref, (sums, res, w, gain, shift, bias) + ((b2,) if has_b2 else ()), dtype=dtype)


def test_head_gather_gemv_x_sum_rejects():
    d, H, hd = 64, 4, 16
    w = randn(H * hd, d, dtype=torch.float16)
    idx = torch.tensor([0, 2], device=DEVICE)
    ok = XSum(torch.zeros(1, d, device=DEVICE), None, torch.zeros(1, d, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match=r"batch <= \d"):
        xs3 = XSum(torch.zeros(3, d, device=DEVICE), None, torch.zeros(3, d, dtype=torch.float16, device=DEVICE))
        head_gather_gemv(torch.zeros(3, d, dtype=torch.float16, device=DEVICE), w, idx, hd, x_sum=xs3)
    with pytest.raises(ValueError, match="x_sum.sums"):
        bad = XSum(ok.sums.half(), None, ok.residual)
        head_gather_gemv(torch.zeros(1, d, dtype=torch.float16, device=DEVICE), w, idx, hd, x_sum=bad)
    with pytest.raises(ValueError, match="XSum"):
        head_gather_gemv(torch.zeros(1, d, dtype=torch.float16, device=DEVICE), w, idx, hd, x_sum=(ok.sums,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("d,H,hd,kh", CASES)
def test_head_gather_down(d, H, hd, kh, B, dtype):
    g = make_gen("o", d, H, hd, kh, B, dtype)
    a, wo_t = randn(B, kh, hd, dtype=dtype, gen=g), randn(H * hd, d, dtype=dtype, gen=g)
    bias, residual = randn(d, dtype=dtype, gen=g), randn(B, d, dtype=dtype, gen=g)
    head_idx = rand_index(H, kh, gen=g, dtype=torch.int32 if B != 3 else torch.int64)
    b, r = (bias, residual) if (kh + B) % 2 else (None, None)
    # prewait (a no-op without PDL; on a Hopper GPU the first step's reads before the wait): half the cases
    res = head_gather_down(a, wo_t, head_idx, hd, b, r, out=poisoned((B, d), dtype), prewait=(kh + B) % 2 == 0)
    check_against(res, head_gather_down_ref, (a, wo_t, head_idx, hd, b, r), dtype=dtype)


def test_head_gather_down_strided_and_split():
    """Attention output laid out [B, hd, kh] and transposed; forced split-k."""
    d, H, hd, kh, B = 72, 6, 16, 4, 3
    g = make_gen("o-strided")
    a = randn(B, hd, kh, gen=g).transpose(1, 2)  # [B, kh, hd], last stride kh
    wo_t, idx = randn(H * hd, d, gen=g), rand_index(H, kh, gen=g)
    for split_k in (None, 3):
        res = head_gather_down(a, wo_t, idx, hd, split_k=split_k)
        check_against(res, head_gather_down_ref, (a, wo_t, idx, hd), dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_head_gather_down_unfinished(split_k, B, dtype):
    """finish=False: the product added into fp32 sums with atomics (whatever the split count), ``zero`` cleared;
    finishing the sums as the MLP block does (XSum) gives the finished projection with bias and residual."""
    d, H, hd, kh = 600, 6, 24, 4  # d over two column slabs
    g = make_gen("o-unfinished", split_k, B, dtype)
    a, wo_t = randn(B, kh, hd, dtype=dtype, gen=g), randn(H * hd, d, dtype=dtype, gen=g, scale=0.2)
    idx = rand_index(H, kh, gen=g)
    sums, other = torch.zeros(B, d, device=DEVICE), torch.full((B * d + 3,), 7.0, device=DEVICE)
    got = head_gather_down(a, wo_t, idx, hd, out=sums, split_k=split_k, finish=False, zero=other, prewait=True)
    assert got is sums and not other.any()
    check_against(sums.to(dtype), head_gather_down_ref, (a, wo_t, idx, hd), dtype=dtype)
    bias, res = randn(d, dtype=dtype, gen=g), randn(B, d, dtype=dtype, gen=g)
    finished = head_gather_down(a, wo_t, idx, hd, bias, res, split_k=split_k)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x_sum_ref(XSum(sums, bias, res), dtype), finished, rtol=tol, atol=tol)


def test_head_gather_down_unfinished_rejects():
    d, H, hd, B = 64, 4, 16, 2
    a, wo_t = randn(B, 2, hd, dtype=torch.float16), randn(H * hd, d, dtype=torch.float16)
    idx = torch.tensor([0, 2], device=DEVICE)
    sums = torch.zeros(B, d, device=DEVICE)
    with pytest.raises(ValueError, match="finish=False"):
        head_gather_down(a, wo_t, idx, hd, finish=False)
    with pytest.raises(ValueError, match="finish=False"):
        head_gather_down(a, wo_t, idx, hd, torch.zeros(d, dtype=torch.float16, device=DEVICE), out=sums,
                         finish=False)  # fmt: skip
    with pytest.raises(ValueError, match="out"):
        head_gather_down(a, wo_t, idx, hd, out=sums.half(), finish=False)
    with pytest.raises(ValueError, match="own output"):
        head_gather_down(a, wo_t, idx, hd, out=sums, finish=False, zero=sums.view(-1))
    with pytest.raises(ValueError, match="zero"):
        head_gather_down(a, wo_t, idx, hd, out=sums, finish=False, zero=torch.zeros(4, 4, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("schedule", ["split", "slab"])
def test_head_gather_down_out2(schedule, split_k, B, dtype, monkeypatch):
    """out2 = out + bias2, rounded as torch.add rounds it (bit for bit from the kernel's own out), on both split-k
    reductions (in the launch: "split"; a second kernel: "slab"), with and without bias2; out as without out2."""
    from dejavu.kernels import gather_mlp as GM

    monkeypatch.setattr(GM, "DOWN_SCHEDULE", schedule)
    d, H, hd, kh = 600, 6, 24, 4  # d over two column slabs
    g = make_gen("o-out2", schedule, split_k, B, dtype)
    a, wo_t = randn(B, kh, hd, dtype=dtype, gen=g), randn(H * hd, d, dtype=dtype, gen=g, scale=0.2)
    idx = rand_index(H, kh, gen=g)
    bias, res, bias2 = randn(d, dtype=dtype, gen=g), randn(B, d, dtype=dtype, gen=g), randn(d, dtype=dtype, gen=g)
    alone = head_gather_down(a, wo_t, idx, hd, bias, res, split_k=split_k)
    for b2 in (bias2, None):
        out2 = poisoned((B, d), dtype)
        out = head_gather_down(a, wo_t, idx, hd, bias, res, split_k=split_k, out2=out2, bias2=b2, prewait=True)
        torch.testing.assert_close(out, alone, rtol=0, atol=0)
        assert torch.equal(out2, out + b2 if b2 is not None else out)


def test_head_gather_down_out2_rejects():
    d, H, hd, B = 64, 4, 16, 2
    a, wo_t = randn(B, 2, hd, dtype=torch.float16), randn(H * hd, d, dtype=torch.float16)
    idx = torch.tensor([0, 2], device=DEVICE)
    out, b2 = torch.empty(B, d, dtype=torch.float16, device=DEVICE), torch.zeros(d, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="bias2"):
        head_gather_down(a, wo_t, idx, hd, bias2=b2)
    with pytest.raises(ValueError, match="another buffer"):
        head_gather_down(a, wo_t, idx, hd, out=out, out2=out)
    with pytest.raises(ValueError, match="out2"):
        head_gather_down(a, wo_t, idx, hd, out2=torch.empty(B, d, device=DEVICE))  # fp32
    with pytest.raises(ValueError, match="out2"):
        head_gather_down(a, wo_t, idx, hd, out2=torch.empty(B + 1, d, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="bias2"):
        head_gather_down(a, wo_t, idx, hd, out2=out, bias2=b2[:-1])
    with pytest.raises(ValueError, match="finish=True"):
        head_gather_down(a, wo_t, idx, hd, out=torch.zeros(B, d, device=DEVICE), finish=False, out2=out)


def test_default_alloc_and_views():
    d, H, hd, kh, B = 40, 5, 24, 2, 2
    g = make_gen("alloc")
    x, w, idx = randn(B, d, gen=g), randn(H * hd, d, gen=g), rand_index(H, kh, gen=g)
    q = head_gather_gemv(x, w, idx, hd)
    assert q.shape == (B, kh, hd) and q.is_contiguous()
    check_against(q, head_gather_gemv_ref, (x, w, idx, hd), dtype=torch.float32)


def test_kv_heads_for():
    idx = torch.tensor([7, 0, 5, 6, 1], device=DEVICE)
    assert kv_heads_for(idx, 4).tolist() == [0, 1]
    assert kv_heads_for(idx, 2).tolist() == [0, 2, 3]
    assert kv_heads_for(idx.int(), 1).tolist() == [0, 1, 5, 6, 7]
    assert kv_heads_for(idx.int(), 1).dtype == torch.int32
    with pytest.raises(ValueError, match="group_size"):
        kv_heads_for(idx, 0)
    with pytest.raises(ValueError, match="int32/int64"):
        kv_heads_for(idx.float(), 2)


def test_gqa_kv_projection_roundtrip():
    """k_proj gathered by kv_heads_for equals the dense k_proj restricted to those KV heads."""
    d, H_kv, group, hd = 40, 3, 4, 16
    g = make_gen("gqa")
    x, wk = randn(2, d, gen=g), randn(H_kv * hd, d, gen=g)
    q_heads = torch.tensor([11, 2, 3], device=DEVICE)
    kv = kv_heads_for(q_heads, group)
    assert kv.tolist() == [0, 2]
    k = head_gather_gemv(x, wk, kv, hd)
    dense = (x.double() @ wk.double().T).view(2, H_kv, hd)[:, kv.long()]
    torch.testing.assert_close(k.double(), dense, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def test_rejects_bad_inputs():
    d, H, hd = 40, 5, 8
    g = make_gen("bad-heads")
    x, w = randn(2, d, dtype=torch.float16, gen=g), randn(H * hd, d, dtype=torch.float16, gen=g)
    a = randn(2, 2, hd, dtype=torch.float16, gen=g)
    idx = torch.tensor([4, 1], device=DEVICE)
    cases = [
        (lambda: head_gather_gemv(x, w, torch.tensor([5, 1], device=DEVICE), hd), "out of bounds"),
        (lambda: head_gather_gemv(x, w, torch.tensor([1, 1], device=DEVICE), hd), "duplicated"),
        (lambda: head_gather_gemv(x, w, idx, 7), "head_dim"),
        (lambda: head_gather_gemv(x.float(), w, idx, hd), "dtype"),
        (lambda: head_gather_gemv(x.to("meta"), w, idx, hd), "meta"),
        (lambda: head_gather_gemv(x.repeat(9, 1)[:17], w, idx, hd), "batch size 17"),
        (lambda: head_gather_gemv(x, w, idx, hd, bias=torch.ones(d - 1, dtype=x.dtype, device=DEVICE)), "bias"),
        (lambda: head_gather_down(a, w, torch.tensor([5, 1], device=DEVICE), hd), "out of bounds"),
        (lambda: head_gather_down(a, w, torch.tensor([3, 3], device=DEVICE), hd), "duplicated"),
        (lambda: head_gather_down(a, w, idx[:1], hd), "heads"),
        (lambda: head_gather_down(a[..., :4], w, idx, hd), "dimension 2"),
        (lambda: head_gather_down(a.float(), w, idx, hd), "dtype"),
        (lambda: head_gather_down(a.repeat(9, 1, 1)[:17], w, idx, hd), "batch size 17"),
        (lambda: head_gather_down(a, w, idx.float(), hd), "int32 or int64"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
