"""lowrank_scores / batch_topk / predictor_bytes (plain torch: these run without Triton)."""

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, check_against, make_gen, randn

from dejavu.kernels import batch_topk, batch_topk_ref, lowrank_scores, lowrank_scores_ref, predictor_bytes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lowrank_scores(with_bias, B, dtype):
    d, r, n = 72, 12, 200
    g = make_gen("lowrank", B, dtype, with_bias)
    x, a = randn(B, d, dtype=dtype, gen=g), randn(d, r, dtype=dtype, gen=g, scale=0.2)
    b = randn(r, n, dtype=dtype, gen=g)
    bias = randn(n, dtype=dtype, gen=g) if with_bias else None
    res = lowrank_scores(x, a, b, bias)
    assert res.shape == (B, n) and res.dtype == dtype
    check_against(res, lowrank_scores_ref, (x, a, b, bias), dtype=dtype)


@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("k", [1, 67, 200])
def test_batch_topk(k, B):
    n = 200
    scores = randn(B, n, gen=make_gen("topk", B, k))
    idx = batch_topk(scores, k)
    assert idx.shape == (k,) and idx.dtype == torch.int64 and idx.device == scores.device
    assert torch.equal(idx, batch_topk_ref(scores, k))
    assert bool((idx.diff() > 0).all()), "sorted ascending, no duplicates"
    # every kept neuron scores at least as high (for some sequence) as every dropped one
    best = scores.amax(0)
    dropped = torch.ones(n, dtype=torch.bool, device=scores.device)
    dropped[idx] = False
    if dropped.any():
        assert best[idx].min() >= best[dropped].max()


def test_batch_topk_1d_and_low_precision():
    s = randn(50, dtype=torch.bfloat16, gen=make_gen("1d"))
    assert torch.equal(batch_topk(s, 7), batch_topk_ref(s, 7))
    s2 = randn(4, 50, dtype=torch.float16, gen=make_gen("2d16"))
    assert torch.equal(batch_topk(s2, 10), batch_topk_ref(s2, 10))


@pytest.mark.needs_kernels
def test_batch_topk_feeds_gather_without_validation():
    """The index vector from batch_topk is valid by construction: validate=False is safe."""
    pytest.importorskip("triton")
    from dejavu.kernels import gather_up, gather_up_ref

    g = make_gen("pipeline")
    x, w, bias = randn(3, 40, gen=g), randn(90, 40, gen=g), randn(90, gen=g)
    a, b = randn(40, 8, gen=g), randn(8, 90, gen=g)
    idx = batch_topk(lowrank_scores(x, a, b), 20)
    y = gather_up(x, w, idx, bias, validate=False)
    check_against(y, gather_up_ref, (x, w, idx, bias), dtype=torch.float32)


def test_predictor_bytes():
    assert predictor_bytes(5120, 1024, 20480) == (5120 * 1024 + 1024 * 20480 + 20480) * 2
    assert predictor_bytes(8, 2, 4, torch.float32, bias=False) == (16 + 8) * 4
    assert predictor_bytes(8, 2, 4, "bf16") == (16 + 8 + 4) * 2


def test_rejects_bad_inputs():
    g = make_gen("bad-pred")
    x, a, b = randn(2, 16, gen=g), randn(16, 4, gen=g), randn(4, 30, gen=g)
    cases = [
        (lambda: lowrank_scores(x, a, b[:3]), "dimension 0"),
        (lambda: lowrank_scores(x[:, :15], a, b), "dimension 1"),
        (lambda: lowrank_scores(x.half(), a, b), "dtype"),
        (lambda: lowrank_scores(x.to("meta"), a, b), "meta"),
        (lambda: lowrank_scores(x.repeat(9, 1)[:17], a, b), "batch size 17"),
        (lambda: lowrank_scores(x, a.t().contiguous().t(), b), "contiguous"),
        (lambda: lowrank_scores(x, a, b, torch.ones(29, device=DEVICE)), "bias"),
        (lambda: batch_topk(x, 0), "k must be"),
        (lambda: batch_topk(x, 17), "k must be"),
        (lambda: batch_topk(x, 2.0), "k must be"),
        (lambda: batch_topk(x.long(), 2), "floating"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
