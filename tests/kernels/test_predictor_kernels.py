"""Triton predictor kernels (lowrank_gemv, topk_select) against their torch references."""

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, make_gen, randn

from dejavu.kernels import lowrank_gemv, lowrank_gemv_ref, select_topk, topk_select, topk_select_ref
from dejavu.kernels.predictor_ops import HIST_BINS, HIST_LEN, radix_histogram_ref, radix_select, radix_workspace
from dejavu.predictors.model import quantize_rows

pytestmark = pytest.mark.needs_kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("N,D", [(1, 7), (13, 64), (37, 577), (4100, 24)])
@pytest.mark.parametrize("norm,with_bias", [(False, False), (True, True)])
def test_lowrank_gemv(norm, with_bias, N, D, B, dtype):
    g = make_gen("gemv", B, N, D, dtype, norm, with_bias)
    x = randn(B, D, dtype=dtype, gen=g, scale=3.0)
    w = randn(N, D, dtype=dtype, gen=g, scale=0.1)
    bias = randn(N, dtype=dtype, gen=g) if with_bias else None
    out = lowrank_gemv(x, w, bias, norm=norm)
    assert out.shape == (B, N) and out.dtype == torch.float32
    exact = lowrank_gemv_ref(x.double(), w.double(), bias.double() if with_bias else None, norm=norm)
    err = (out.double().cpu() - exact.cpu()).abs().max().item()
    assert err <= 2e-5 * max(1.0, exact.abs().max().item()), err


@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("N,D", [(1, 7), (37, 577), (4100, 24)])
@pytest.mark.parametrize("norm,x_dtype,bias_dtype,batch_max", [
    (True, torch.float16, None, False),  # a first factor: the model's x, normalized, no bias
    (False, torch.float32, torch.float16, True),  # a second factor: the first's fp32 output, bias, batch max
    (False, torch.float32, torch.bfloat16, False), (False, torch.float16, torch.float32, True)])
def test_lowrank_gemv_int8_rows(norm, x_dtype, bias_dtype, batch_max, N, D, B):
    """int8 rows with an fp32 scale per row (the predictors' int8 form): equal to the float64 reference on the same
    stored values, and to the float kernel on the dequantized rows."""
    g = make_gen("gemv-int8", B, N, D, x_dtype, norm, bias_dtype, batch_max)
    x = randn(B, D, dtype=x_dtype, gen=g, scale=3.0)
    q, s = quantize_rows(randn(N, D, gen=g, scale=0.1))
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    bias = randn(N, dtype=bias_dtype, gen=g) if bias_dtype is not None else None
    out = lowrank_gemv(x, q, bias, scale=s, norm=norm, batch_max=batch_max)
    assert out.shape == (1 if batch_max else B, N) and out.dtype == torch.float32
    exact = lowrank_gemv_ref(x.double(), q.double(), bias.double() if bias is not None else None, scale=s.double(),
                             norm=norm, batch_max=batch_max)  # fmt: skip
    tol = 2e-5 * max(1.0, exact.abs().max().item())
    assert (out.double().cpu() - exact.cpu()).abs().max().item() <= tol
    deq = lowrank_gemv(x, (q.float() * s[:, None]), bias.float() if bias is not None else None, norm=norm,
                       batch_max=batch_max)  # fmt: skip
    assert (out - deq).abs().max().item() <= tol


def test_lowrank_gemv_int8_rejects():
    g = make_gen("gemv-int8-bad")
    x = randn(2, 16, gen=g)
    q, s = quantize_rows(randn(8, 16, gen=g))
    with pytest.raises(ValueError, match="scale"):
        lowrank_gemv(x, q)  # int8 rows without their scales
    with pytest.raises(ValueError, match="scale"):
        lowrank_gemv(x, q.float(), scale=s)  # a float w takes none
    with pytest.raises(ValueError, match="scale"):
        lowrank_gemv(x, q, scale=s.half())
    with pytest.raises(ValueError, match="scale"):
        lowrank_gemv(x, q, scale=s[:7].contiguous())
    with pytest.raises(ValueError, match="bias"):
        lowrank_gemv(x, q, torch.zeros(8, dtype=torch.int8, device=DEVICE), scale=s)


@pytest.mark.parametrize("B", [1, 5, 16])
def test_lowrank_gemv_batch_max(B):
    """batch_max: one row, the max over the batch (what the batch top-k ranks), from the epilogue."""
    g = make_gen("gemv-max", B)
    x, w, bias = randn(B, 33, gen=g), randn(70, 33, gen=g), randn(70, gen=g)
    out = lowrank_gemv(x, w, bias, norm=True, batch_max=True)
    assert out.shape == (1, 70)
    ref = lowrank_gemv_ref(x, w, bias, norm=True, batch_max=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, lowrank_gemv_ref(x, w, bias, norm=True).amax(0, keepdim=True))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_lowrank_gemv_low_precision_out(out_dtype):
    """fp32 accumulation, rounded once on store: equals the fp32 reference cast to out_dtype (up to 1 ulp)."""
    g = make_gen("gemv-out", out_dtype)
    x, w, bias = randn(2, 40, gen=g), randn(300, 40, gen=g), randn(300, gen=g)
    out = lowrank_gemv(x, w, bias, batch_max=True, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (1, 300)
    ref = lowrank_gemv_ref(x, w, bias, batch_max=True)
    torch.testing.assert_close(out.float(), ref.to(out_dtype).float(), rtol=1e-2, atol=1e-2)
    assert (out.float() == ref.to(out_dtype).float()).float().mean() > 0.95


def test_lowrank_gemv_strided_input_and_out():
    """The first factor's output is sliced per predictor: a column slice (row stride > width) is a valid x."""
    g = make_gen("gemv-slice")
    wide = randn(4, 50, gen=g)
    x = wide[:, 10:30]
    w, bias = randn(9, 20, gen=g), randn(9, gen=g)
    out = torch.full((4, 9), float("nan"), device=DEVICE)
    assert lowrank_gemv(x, w, bias, out=out) is out
    torch.testing.assert_close(out, lowrank_gemv_ref(x, w, bias), rtol=1e-5, atol=1e-5)


def _check_selection(scores, k, idx):
    n = scores.shape[-1]
    assert idx.shape == (k,) and idx.dtype == torch.int64
    assert bool((idx.diff() > 0).all()), "ascending, no duplicates"
    assert 0 <= int(idx.min()) and int(idx.max()) < n
    best = (scores.amax(0) if scores.dim() == 2 else scores).float()
    dropped = torch.ones(n, dtype=torch.bool, device=scores.device)
    dropped[idx] = False
    if dropped.any():
        assert best[idx].min() >= best[dropped].max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("N,k", [(1, 1), (9, 1), (9, 9), (40, 20), (1000, 1), (1000, 333), (1000, 1000),
                                 (20480, 2048)])
def test_topk_select_matches_reference(N, k, B, dtype):
    s = randn(B, N, dtype=dtype, gen=make_gen("sel", N, k, B, dtype), scale=4.0)
    idx = topk_select(s, k)
    _check_selection(s, k, idx)
    assert torch.equal(idx, topk_select_ref(s, k))


@pytest.mark.parametrize("N,k", [(64, 5), (64, 40), (300, 150)])
def test_topk_select_ties_and_signs(N, k):
    """Many equal scores (integers, negatives, +-0, -inf): exactly k kept, ties resolved to the lowest indices."""
    g = make_gen("ties", N, k)
    s = torch.randint(-3, 3, (2, N), generator=g).float()
    s[0, :4] = torch.tensor([-0.0, 0.0, float("-inf"), -1e30])
    s = s.to(DEVICE)
    idx = topk_select(s, k)
    _check_selection(s, k, idx)
    assert torch.equal(idx, topk_select_ref(s, k))
    const = torch.full((N,), -2.5, device=DEVICE)
    assert torch.equal(topk_select(const, k), torch.arange(k, device=DEVICE))


def test_topk_select_copies_into_a_slice():
    """Three offset copies written straight into a slice of a bigger static index (fused q/k/v rows, MHA)."""
    H, k = 12, 5
    s = randn(3, H, gen=make_gen("copies"))
    buf = torch.full((3 * k + 2,), -1, dtype=torch.int64, device=DEVICE)
    topk_select(s, k, out=buf[1:1 + 3 * k], copies=3, copy_offset=H)
    sel = topk_select_ref(s, k)
    assert torch.equal(buf[1:1 + 3 * k], torch.cat([sel, sel + H, sel + 2 * H]))
    assert int(buf[0]) == -1 and int(buf[-1]) == -1, "wrote outside its slice"
    assert torch.equal(topk_select_ref(s, k, copies=3, copy_offset=H), buf[1:1 + 3 * k])


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("N,k,copies", [(40, 7, 3), (1024, 100, 1), (1025, 1, 1), (5000, 700, 2), (5000, 5000, 1)])
def test_select_topk_dispatch(N, k, copies, B):
    """The decode step's selection: the same set as the reference on both paths (one program for N <= 1024,
    unsorted torch.topk above), offset copies included."""
    s = randn(B, N, gen=make_gen("dispatch", N, k, B), scale=2.0)
    out = torch.full((copies * k,), -1, dtype=torch.int64, device=DEVICE)
    assert select_topk(s, k, out=out, copies=copies, copy_offset=N) is out
    ref = topk_select_ref(s, k)
    for c in range(copies):
        assert torch.equal(out[c * k:(c + 1) * k].sort().values, ref + c * N)
    if N <= 1024:
        assert bool((out[:k].diff() > 0).all()), "the one-program path writes ascending indices"


def _same_top_values(s, out, k):
    """out holds k distinct valid indices whose values are the k largest of s (ties at the threshold: any)."""
    assert out.shape == (k,) and len(set(out.tolist())) == k and 0 <= int(out.min()) and int(out.max()) < s.numel()
    top = torch.sort(s.float().flatten(), descending=True).values[:k]
    assert torch.equal(torch.sort(s.float().flatten()[out], descending=True).values, top)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,k", [(1025, 1), (2000, 700), (3000, 3000), (5000, 2500), (20480, 2048)])
def test_radix_select(N, k, dtype):
    """Exact top-k of 16-bit scores (one launch after the histogram): the k largest values, ties at the threshold
    included (repeated values, both signs, +-0, -inf), and the workspace -- both histogram levels and the
    counters -- left zeroed for the next call."""
    g = make_gen("radix", N, k, dtype)
    s = randn(N, gen=g, scale=2.0).to(dtype)
    s[:: 7] = s[3]  # a value repeated ~N/7 times
    s[1::11] = 0.0
    s[2::13] = -0.0
    s[5] = float("-inf")
    ws = radix_workspace(DEVICE)
    for copies in (1, 3):  # twice on the same workspace
        out = torch.full((copies * k,), -1, dtype=torch.int64, device=DEVICE)
        ws["hist"].copy_(radix_histogram_ref(s))
        assert radix_select(s, k, out=out, workspace=ws, copies=copies, copy_offset=N) is out
        _same_top_values(s, out[:k], k)
        for c in range(1, copies):
            assert torch.equal(out[c * k:(c + 1) * k], out[:k] + c * N)
        assert int(ws["hist"].abs().sum()) == 0 and int(ws["counters"].abs().sum()) == 0, "workspace left dirty"


@pytest.mark.parametrize("B", [1, 4])
def test_scores_gemv_histogram_then_select(B):
    """The decode step's pair: the scores' GEMV counts its stored 16-bit outputs into the histogram (== the torch
    histogram of what it wrote), and select_topk(hist_ready=True) then needs no other launch."""
    g = make_gen("gemv-hist", B)
    x, w, bias = randn(B, 40, gen=g, dtype=torch.float16), randn(3000, 40, gen=g, dtype=torch.float16), None
    ws = radix_workspace(DEVICE)
    sc = lowrank_gemv(x, w, bias, batch_max=True, out_dtype=torch.float16, hist=ws["hist"])
    assert torch.equal(ws["hist"], radix_histogram_ref(sc)) and int(ws["hist"].sum()) == 2 * 3000  # both levels
    out = torch.empty(300, dtype=torch.int64, device=DEVICE)
    select_topk(sc, 300, out=out, workspace=ws, hist_ready=True)
    _same_top_values(sc, out, 300)
    assert int(ws["hist"].abs().sum()) == 0


@pytest.mark.parametrize("cap", [1, 3, 7])
@pytest.mark.parametrize("batch_max", [False, True])
def test_lowrank_gemv_capped_grid(cap, batch_max, monkeypatch):
    """GEMV_MAX_PROGRAMS: fewer programs than row blocks, each looping over its share, give the same outputs and
    the same histogram (every row block done exactly once, whatever the cap)."""
    from dejavu.kernels import predictor_ops as PO

    g = make_gen("gemv-cap", cap, batch_max)
    x, w, bias = randn(3, 40, gen=g, dtype=torch.float16), randn(4100, 40, gen=g, dtype=torch.float16), None
    want = lowrank_gemv(x, w, bias, norm=True, batch_max=batch_max, out_dtype=torch.float16)
    monkeypatch.setattr(PO, "GEMV_MAX_PROGRAMS", cap)
    ws = radix_workspace(DEVICE)
    got = torch.full_like(want, float("nan"))  # a row block no program took stays NaN
    lowrank_gemv(x, w, bias, norm=True, batch_max=batch_max, out_dtype=torch.float16,
                 hist=ws["hist"] if batch_max else None, out=got)
    assert torch.equal(got, want)
    if batch_max:
        assert torch.equal(ws["hist"], radix_histogram_ref(got))


@pytest.mark.parametrize("B", [1, 2, 4, 16])
def test_scores_histogram_at_decode_shapes(B):
    """The decode step's tile shapes (N >= 4096: 16 rows per program; r = 320): every stored score is counted once,
    whatever the batch tile, and the selection holds the k largest (OPT-13B's N on a GPU)."""
    n = 20480 if DEVICE == "cuda" else 4200
    g = make_gen("gemv-hist-decode", B)
    x, w = randn(B, 320, gen=g, dtype=torch.float16), randn(n, 320, gen=g, dtype=torch.float16, scale=0.1)
    bias = randn(n, gen=g, dtype=torch.float16)
    ws = radix_workspace(DEVICE)
    sc = lowrank_gemv(x, w, bias, batch_max=True, out_dtype=torch.float16, hist=ws["hist"])
    assert torch.equal(ws["hist"], radix_histogram_ref(sc)), "histogram counts differ from the stored scores"
    k = n // 10
    out = torch.empty(k, dtype=torch.int64, device=DEVICE)
    select_topk(sc, k, out=out, workspace=ws, hist_ready=True)
    _same_top_values(sc, out, k)


@pytest.mark.parametrize("rows", [16, 32, 64])
@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("int8", [False, True])
def test_lowrank_gemv_long_rows(rows, B, int8, monkeypatch):
    """The neuron-scores GEMV at 16, 32 or 64 rows a program (GEMV_LONG_ROWS; 32 is OPT-13B's tuned count): the
    float64 reference's scores on the same stored values, a ragged last row block (N = 4100), and a histogram of
    exactly what was stored."""
    from dejavu.kernels import predictor_ops as PO

    monkeypatch.setattr(PO, "GEMV_LONG_ROWS", rows)
    assert PO._gemv_config(B, 4100, 320)["BLOCK_N"] == rows
    g = make_gen("gemv-rows", rows, B, int8)
    x = randn(B, 320, gen=g, dtype=torch.float32, scale=3.0)
    w, s = randn(4100, 320, gen=g, dtype=torch.float16, scale=0.1), None
    if int8:
        w, s = quantize_rows(w)
    bias = randn(4100, gen=g, dtype=torch.float16)
    ws = radix_workspace(DEVICE)
    sc = lowrank_gemv(x, w, bias, scale=s, batch_max=True, out_dtype=torch.float16, hist=ws["hist"])
    exact = lowrank_gemv_ref(x.double(), w.double(), bias.double(), scale=s.double() if int8 else None,
                             batch_max=True)  # fmt: skip
    assert (sc.double().cpu() - exact.cpu()).abs().max().item() <= 1e-3 * max(1.0, exact.abs().max().item())
    assert torch.equal(ws["hist"], radix_histogram_ref(sc))


def test_gemv_rows_tuned_by_shape(monkeypatch):
    """16 rows a program for long outputs unless GEMV_LONG_ROWS_TUNED names the (N, d) (OPT-13B's neuron scores:
    32); GEMV_LONG_ROWS forces a count everywhere; short outputs take GEMV_SHORT_ROWS."""
    from dejavu.kernels import predictor_ops as PO

    assert PO._gemv_config(1, 20480, 320)["BLOCK_N"] == 32
    assert PO._gemv_config(4, 20480, 320)["BLOCK_N"] == 32
    assert PO._gemv_config(1, 28672, 448)["BLOCK_N"] == PO._gemv_config(1, 11008, 256)["BLOCK_N"] == 16
    assert PO._gemv_config(1, 640, 5120)["BLOCK_N"] == 4
    monkeypatch.setattr(PO, "GEMV_LONG_ROWS", 16)
    assert PO._gemv_config(1, 20480, 320)["BLOCK_N"] == 16


def test_radix_bad_input():
    s16 = randn(2000).half()
    out = torch.empty(10, dtype=torch.int64, device=DEVICE)
    ws = radix_workspace(DEVICE)
    x, w = randn(2, 8, dtype=torch.float16), randn(5, 8, dtype=torch.float16)
    cases = [
        (lambda: radix_select(s16.float(), 10, out=out, workspace=ws), "float16/bfloat16"),
        (lambda: radix_select(s16[None].repeat(2, 1), 10, out=out, workspace=ws), "reduce a batch first"),
        (lambda: radix_select(s16, 0, out=out, workspace=ws), "k must be"),
        (lambda: radix_select(s16, 10, out=out, workspace={"hist": ws["hist"]}), "radix_workspace"),
        (lambda: radix_select(s16, 10, out=out, workspace={"hist": ws["hist"][:9], "counters": ws["counters"]}),
         "hist"),
        (lambda: radix_select(s16, 10, out=out[:9], workspace=ws), "out must be"),
        (lambda: lowrank_gemv(x, w, hist=ws["hist"], out_dtype=torch.float16), "batch_max=True"),
        (lambda: lowrank_gemv(x, w, hist=ws["hist"], batch_max=True), "float16/bfloat16"),
        (lambda: lowrank_gemv(x, w, hist=ws["hist"].long(), batch_max=True, out_dtype=torch.float16), "hist"),
        (lambda: select_topk(randn(2000), 10, out=out, workspace=ws, hist_ready=True), "hist_ready"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    assert HIST_BINS == 4096 and HIST_LEN == 4096 + 65536


def test_predictor_kernels_bad_input():
    x, w = randn(2, 8), randn(5, 8)
    cases = [
        (lambda: lowrank_gemv(x, w.t().contiguous().t()), "contiguous"),
        (lambda: lowrank_gemv(x[:, :7], w), "dimension 1"),
        (lambda: lowrank_gemv(x.repeat(9, 1), w), "batch size 18"),
        (lambda: lowrank_gemv(x, w, torch.ones(4, device=DEVICE)), "bias"),
        (lambda: lowrank_gemv(x, w, out=torch.empty(2, 5, dtype=torch.float16, device=DEVICE)), "out must be"),
        (lambda: lowrank_gemv(x, w, out_dtype=torch.int32), "out_dtype"),
        (lambda: topk_select(x, 0), "k must be"),
        (lambda: topk_select(x, 9), "k must be"),
        (lambda: topk_select(x.long(), 2), "floating"),
        (lambda: topk_select(x, 2, copies=0), "copies"),
        (lambda: topk_select(x, 2, out=torch.empty(3, dtype=torch.int64, device=DEVICE)), "out must be"),
        (lambda: select_topk(randn(2000), 2001, out=torch.empty(2001, dtype=torch.int64, device=DEVICE)),
         "k must be"),
        (lambda: select_topk(randn(2000), 5, out=torch.empty(4, dtype=torch.int64, device=DEVICE)), "out must be"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
