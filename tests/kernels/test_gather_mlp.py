"""gather_up / gather_swiglu / gather_down against their torch references.

Shapes are small and deliberately odd (not multiples of any block size); d=600 makes the
B <= 2 path (512-wide d chunks) and d=200 the B > 2 path (128-wide chunks) loop over d with
a masked tail. Batches 1 and 3/16 take the two code paths (FMA vs. tensor-core dot).
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, check_against, make_gen, poisoned, rand_index, randn  # noqa: E402

from dejavu.kernels import (  # noqa: E402
    NormFold,
    XSum,
    fold_norm,
    gather_down,
    gather_down_ref,
    gather_swiglu,
    gather_swiglu_ref,
    gather_up,
    gather_up_ref,
    norm_ref,
    x_sum_ref,
)
from dejavu.kernels import gather_mlp as G  # noqa: E402

pytestmark = pytest.mark.needs_kernels

SHAPES = [(72, 200), (600, 37), (200, 130)]  # (d, N)
BATCHES = [1, 3, 16]


def ks_for(n):
    return sorted({1, n // 3 + 1, n})


CASES = [(d, n, k) for d, n in SHAPES for k in ks_for(n)]


def _idx_dtype(B):
    return torch.int64 if B == 3 else torch.int32  # cover both index dtypes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("d,n,k", CASES)
def test_gather_up(d, n, k, B, dtype):
    g = make_gen("up", d, n, k, B, dtype)
    x, w, bias = randn(B, d, dtype=dtype, gen=g), randn(n, d, dtype=dtype, gen=g), randn(n, dtype=dtype, gen=g)
    idx = rand_index(n, k, gen=g, dtype=_idx_dtype(B))
    # alternate the two epilogues: relu + bias (OPT fc1) and a plain gather
    act, b = ("relu", bias) if (k + B) % 2 else ("none", None)
    out = poisoned((B, k), dtype)
    res = gather_up(x, w, idx, b, act, out=out)
    assert res is out
    check_against(res, gather_up_ref, (x, w, idx, b, act), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("d,n,k", CASES)
def test_gather_swiglu(d, n, k, B, dtype):
    g = make_gen("swiglu", d, n, k, B, dtype)
    x = randn(B, d, dtype=dtype, gen=g)
    wg, wu = randn(n, d, dtype=dtype, gen=g, scale=0.2), randn(n, d, dtype=dtype, gen=g, scale=0.2)
    idx = rand_index(n, k, gen=g, dtype=_idx_dtype(B))
    res = gather_swiglu(x, wg, wu, idx, out=poisoned((B, k), dtype))
    check_against(res, gather_swiglu_ref, (x, wg, wu, idx), dtype=dtype)


def _norm_params(kind, d, dtype, g):
    gain = (1.0 + 0.3 * randn(d, gen=g)).to(dtype)
    shift = randn(d, dtype=dtype, gen=g, scale=0.5) if kind == "layernorm" else None
    return gain, shift


def _normed_up_ref(x, w, idx, gain, shift, bias, act, kind):
    return gather_up_ref(norm_ref(x, NormFold(kind, gain, shift, 1e-5, bias, None, None)), w, idx, bias, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("d,n,k", [(600, 37, 13), (200, 130, 130), (72, 200, 1)])
def test_gather_up_folded_norm(d, n, k, kind, B, dtype):
    """norm(x) then the gather == the gather with the norm folded in (x off-centre: the layernorm's mean term)."""
    g = make_gen("up-norm", d, n, k, kind, B, dtype)
    x = (randn(B, d, gen=g) + 0.5).to(dtype)
    w, bias = randn(n, d, dtype=dtype, gen=g, scale=0.2), randn(n, dtype=dtype, gen=g)
    gain, shift = _norm_params(kind, d, dtype, g)
    idx = rand_index(n, k, gen=g, dtype=_idx_dtype(B))
    fold = fold_norm(w, kind, gain, shift, 1e-5, bias)
    res = gather_up(x, w, idx, act="relu", norm=fold, out=poisoned((B, k), dtype))
    check_against(res, _normed_up_ref, (x, w, idx, gain, shift, bias, "relu", kind), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
def test_gather_swiglu_folded_rmsnorm(B, dtype):
    d, n, k = 600, 130, 45
    g = make_gen("swiglu-norm", B, dtype)
    x = randn(B, d, dtype=dtype, gen=g, scale=3.0)
    wg, wu = randn(n, d, dtype=dtype, gen=g, scale=0.2), randn(n, d, dtype=dtype, gen=g, scale=0.2)
    gain, _ = _norm_params("rmsnorm", d, dtype, g)
    idx = rand_index(n, k, gen=g)
    res = gather_swiglu(x, wg, wu, idx, norm=fold_norm(wg, "rmsnorm", gain, eps=1e-5))

    def ref(x, wg, wu, idx, gain):
        return gather_swiglu_ref(norm_ref(x, NormFold("rmsnorm", gain, None, 1e-5, None, None, None)), wg, wu, idx)

    check_against(res, ref, (x, wg, wu, idx, gain), dtype=dtype)


@pytest.mark.usefixtures("fma_batch_2")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("swiglu,has_bias,has_b2", [(False, True, True), (False, False, False), (True, False, True)])
def test_up_gathers_x_sum_out2(swiglu, has_bias, has_b2, B, dtype):
    """The dense step's up gather after an unfinished o_proj: x is made from XSum (sums + bias + residual, rounded),
    written into x, and x + bias2 into out2 (rounded as torch.add rounds it); the activations are those of the
    norm folded over that x. OPT: layernorm + ReLU; SwiGLU: rmsnorm."""
    d, n, k = 600, 130, 45  # d over one 512-wide chunk; k not a multiple of the row tile
    kind = "rmsnorm" if swiglu else "layernorm"
    g = make_gen("up-xsum", swiglu, has_bias, has_b2, B, dtype)
    sums = randn(B, d, gen=g)
    bo = randn(d, dtype=dtype, gen=g) if has_bias else None
    res = (randn(B, d, gen=g) + 0.5).to(dtype)
    b2 = randn(d, dtype=dtype, gen=g) if has_b2 else None
    w, w3 = randn(n, d, dtype=dtype, gen=g, scale=0.2), randn(n, d, dtype=dtype, gen=g, scale=0.2)
    b1 = None if swiglu else randn(n, dtype=dtype, gen=g)
    gain, shift = _norm_params(kind, d, dtype, g)
    idx = rand_index(n, k, gen=g)
    x, out2 = poisoned((B, d), dtype), poisoned((B, d), dtype)
    xs = XSum(sums, bo, res, out2, b2)
    fold = fold_norm(w, kind, gain, shift, 1e-5, b1)
    if swiglu:
        got = gather_swiglu(x, w, w3, idx, norm=fold, x_sum=xs, out=poisoned((B, k), dtype))
    else:
        got = gather_up(x, w, idx, act="relu", norm=fold, x_sum=xs, out=poisoned((B, k), dtype))
    made = x_sum_ref(xs, dtype)
    assert torch.equal(x, made), "x must be written exactly as the o_proj would have stored it"
    assert torch.equal(out2, made if b2 is None else made + b2), "out2 = x + bias2, rounded as torch.add rounds"

    def ref(sums, res, w, w3, gain, shift, *opt):
        bo, b1 = (opt[0] if has_bias else None), (opt[-1] if not swiglu else None)
        xx = ((sums + bo) if bo is not None else sums) + res
        h = norm_ref(xx.to(w.dtype), NormFold(kind, gain, shift, 1e-5, b1, None, None))
        return gather_swiglu_ref(h, w, w3, idx) if swiglu else gather_up_ref(h, w, idx, b1, "relu")

    opt = ((bo,) if has_bias else ()) + ((b1,) if not swiglu else ())
    check_against(got, ref, (sums, res, w, w3, gain, shift) + opt, dtype=dtype)


def test_up_gathers_x_sum_rejects():
    d, n = 64, 20
    f16 = dict(dtype=torch.float16, device=DEVICE)
    w, idx = randn(n, d, dtype=torch.float16), torch.arange(4, device=DEVICE)
    x, res = torch.zeros(1, d, **f16), torch.zeros(1, d, **f16)
    sums = torch.zeros(1, d, device=DEVICE)
    with pytest.raises(ValueError, match="bias2 is added into"):
        gather_up(x, w, idx, x_sum=XSum(sums, None, res, None, torch.zeros(d, **f16)))
    with pytest.raises(ValueError, match="buffer of its own"):
        gather_up(x, w, idx, x_sum=XSum(sums, None, res, x))
    with pytest.raises(ValueError, match="x_sum.out2"):
        gather_swiglu(x, w, w, idx, x_sum=XSum(sums, None, res, torch.zeros(1, d + 1, **f16)))
    with pytest.raises(ValueError, match=r"batch <= \d"):
        x3 = torch.zeros(3, d, **f16)
        gather_up(x3, w, idx, x_sum=XSum(torch.zeros(3, d, device=DEVICE), None, x3.clone()))


@pytest.mark.parametrize("fma_max", [1, 2])
def test_fma_max_batch_picks_the_path(fma_max, monkeypatch):
    """kernels._checks.FMA_MAX_BATCH (1 by default): the gathers' CUDA-core FMA path up to it, the tensor-core path
    (batch padded to 16) above; read at launch time."""
    monkeypatch.setattr(G._checks, "FMA_MAX_BATCH", fma_max)
    cpu = torch.device("cpu")
    for B in (1, 2, 3):
        rows, down = G._rows_config(B, 2048, 5120, False, cpu), G._down_config(B, 2048, 5120, cpu, None)
        assert rows["USE_DOT"] == down["USE_DOT"] == (B > fma_max), (B, rows, down)
        assert rows["BLOCK_B"] == (16 if B > fma_max else B)


@pytest.mark.usefixtures("fma_batch_2")
def test_rows_config_wide_tiles(monkeypatch):
    """ROWS_WIDE: 16-row programs at B = 1 where they make at least 2 programs per SM (at most ROWS_WIDE_MAX; SwiGLU's
    two matrices at most 4), else the 8- / 4-row ones (B = 2 on the FMA path by the knob); the fp32 accumulator stays
    within 64 registers a thread."""
    cpu = torch.device("cpu")
    sms = G.num_sms(cpu)
    for wide, most in ((False, 16), (True, 16), (True, None), (True, 4)):
        monkeypatch.setattr(G, "ROWS_WIDE", wide)
        monkeypatch.setattr(G, "ROWS_WIDE_MAX", most)
        for B in (1, 2):
            for two in (False, True):
                for n_out in (7680, 6144, 3840, 10752, 12288, 1536, 20480, 11008, 50272):  # q/k/v, up, head rows
                    c = G._rows_config(B, n_out, 5120, two, cpu)
                    n16, cap = -(-n_out // 16), 4 if two else most
                    want = wide and B == 1 and 2 * sms <= n16 and (cap is None or n16 <= cap * sms)
                    assert (c["BLOCK_K"] == 16) == want, (wide, most, B, two, n_out, c)
                    assert c.get("maxnreg") == (128 if want else None), c  # 4 programs an SM
                    assert c["BLOCK_B"] * c["BLOCK_K"] * c["BLOCK_D"] * (2 if two else 1) <= 64 * 32 * c["num_warps"]
    monkeypatch.setattr(G, "ROWS_WIDE_MAX", 16)  # the default. 132 SMs: OPT-13B's q/k/v at 0.5 and dense fc1, OPT-30B's
    # q/k/v at 0.5 and the LLaMA-2-7B LM head (15.2 programs an SM) 16 rows; OPT's LM head (50272 rows, 23.8 an SM)
    # and LLaMA-2-7B's dense SwiGLU up gather (688 programs of 16: 5.2 an SM) 8 rows
    assert [G._rows_config(1, n, d, two, cpu)["BLOCK_K"] for n, d, two in (
        (7680, 5120, False), (20480, 5120, False), (10752, 7168, False), (32000, 4096, False), (50272, 5120, False),
        (11008, 4096, True))] == [16, 16, 16, 16, 8, 8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_16_row_tile_with_its_register_cap(dtype, monkeypatch):
    """The 16-row FMA tile that ROWS_WIDE picks at B = 1 (16 x 512, two d chunks here), launched with its register
    cap as the GPU launches it: the result is the reference's."""
    orig = G._rows_config
    monkeypatch.setattr(G, "_rows_config", lambda *a: {**orig(*a), "BLOCK_K": 16, "BLOCK_D": 512, "maxnreg": 128})
    g = make_gen("up16", dtype)
    x, w, bias = randn(1, 600, dtype=dtype, gen=g), randn(130, 600, dtype=dtype, gen=g), randn(130, dtype=dtype, gen=g)
    idx = rand_index(130, 37, gen=g, dtype=_idx_dtype(1))
    check_against(gather_up(x, w, idx, bias, "relu"), gather_up_ref, (x, w, idx, bias, "relu"), dtype=dtype)


def test_fold_norm_rejects():
    x, w, idx = _up_inputs(dtype=torch.float32)
    gain = torch.ones(w.shape[1], device=DEVICE)
    fold = fold_norm(w, "layernorm", gain)
    cases = [
        (lambda: fold_norm(w, "batchnorm", gain), "kind must be one of"),
        (lambda: fold_norm(w, "rmsnorm", gain, gain), "no shift"),
        (lambda: fold_norm(w, "layernorm", gain[:-1]), "weight"),
        (lambda: gather_up(x, w, idx, torch.ones(w.shape[0], device=DEVICE), norm=fold), "pass the projection's bias"),
        (lambda: gather_up(x, w, idx, norm=(gain, None)), "NormFold"),
        (lambda: gather_up(x, w, idx, norm=fold_norm(w[:30], "layernorm", gain)), "norm.rowsum"),
        (lambda: gather_swiglu(x, w, w, idx, norm=fold), "only an rmsnorm"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("d,n,k", CASES)
def test_gather_down(d, n, k, B, dtype):
    g = make_gen("down", d, n, k, B, dtype)
    h, w2t = randn(B, k, dtype=dtype, gen=g), randn(n, d, dtype=dtype, gen=g)
    bias, residual = randn(d, dtype=dtype, gen=g), randn(B, d, dtype=dtype, gen=g)
    idx = rand_index(n, k, gen=g, dtype=_idx_dtype(B))
    b, r = (bias, residual) if (k + B) % 2 else (None, None)
    res = gather_down(h, w2t, idx, b, r, out=poisoned((B, d), dtype))
    check_against(res, gather_down_ref, (h, w2t, idx, b, r), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2, 16])
@pytest.mark.parametrize("split_k", [2, 3, 7])
def test_gather_down_split_k(split_k, B, dtype):
    """The two-stage (split-k) path: fp32 partials reduced in a fixed order, then the epilogue."""
    d, n, k = 72, 300, 290
    g = make_gen("down-split", split_k, B, dtype)
    h, w2t = randn(B, k, dtype=dtype, gen=g), randn(n, d, dtype=dtype, gen=g)
    bias, residual = randn(d, dtype=dtype, gen=g), randn(B, d, dtype=dtype, gen=g)
    idx = rand_index(n, k, gen=g)
    res = gather_down(h, w2t, idx, bias, residual, split_k=split_k, out=poisoned((B, d), dtype))
    check_against(res, gather_down_ref, (h, w2t, idx, bias, residual), dtype=dtype)
    again = gather_down(h, w2t, idx, bias, residual, split_k=split_k)
    assert torch.equal(res, again), "split-k reduction must be deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_two_and_default_alloc(dtype):
    """B=2 (padded FMA tile), out=None allocation, and the up -> down chain of an OPT MLP."""
    B, d, n, k = 2, 72, 200, 50
    g = make_gen("chain", dtype)
    x, w1 = randn(B, d, dtype=dtype, gen=g), randn(n, d, dtype=dtype, gen=g, scale=0.2)
    b1 = randn(n, dtype=dtype, gen=g)
    w2t, b2 = randn(n, d, dtype=dtype, gen=g, scale=0.2), randn(d, dtype=dtype, gen=g)
    idx = rand_index(n, k, gen=g).sort().values
    h = gather_up(x, w1, idx, b1)
    assert h.shape == (B, k) and h.dtype == dtype and h.device.type == DEVICE
    y = gather_down(h, w2t, idx, b2, x)
    check_against(y, lambda *a: gather_down_ref(gather_up_ref(*a[:4]), *a[4:]), (x, w1, idx, b1, w2t, idx, b2, x),
                  dtype=dtype)  # fmt: skip


def test_strided_activations():
    """x / h need not be contiguous: their strides are passed to the kernels."""
    g = make_gen("strided")
    B, d, n, k = 3, 72, 200, 40
    xs = randn(d, B, gen=g).t()  # [B, d] with strides (1, B)
    w, idx = randn(n, d, gen=g), rand_index(n, k, gen=g)
    check_against(gather_up(xs, w, idx, act="none"), gather_up_ref, (xs, w, idx, None, "none"), dtype=torch.float32)
    hs = randn(k, B, gen=g).t()
    check_against(gather_down(hs, w, idx), gather_down_ref, (hs, w, idx), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# bad inputs: ValueError naming the problem
# ---------------------------------------------------------------------------------------------


def _up_inputs(B=2, dtype=torch.float16):
    g = make_gen("bad", B)
    return randn(B, 24, dtype=dtype, gen=g), randn(40, 24, dtype=dtype, gen=g), rand_index(40, 8, gen=g)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, w, i: (x, w, torch.cat([i[:-1], i.new_tensor([40])])), "out of bounds"),
        (lambda x, w, i: (x, w, torch.cat([i[:-1], i.new_tensor([-1])])), "out of bounds"),
        (lambda x, w, i: (x, w, torch.cat([i, i[:1]])), "duplicated"),
        (lambda x, w, i: (x.float(), w, i), "dtype"),
        (lambda x, w, i: (x, w, i.float()), "int32 or int64"),
        (lambda x, w, i: (x, w, i[None]), "1-D"),
        (lambda x, w, i: (x.to("meta"), w, i), "meta"),
        (lambda x, w, i: (x[:, :20], w, i), "dimension 1"),
        (lambda x, w, i: (x[0], w, i), "2 dimensions"),
        (lambda x, w, i: (x, w.t().contiguous().t(), i), "contiguous"),
        (lambda x, w, i: (x.repeat(9, 1), w, i), "batch size 18"),
        (lambda x, w, i: (x.double(), w.double(), i), "float16, bfloat16 and float32"),
    ],
    ids=["idx>=N", "idx<0", "dup", "dtype", "idx-dtype", "idx-rank", "device", "shape", "rank", "noncontig", "batch",
         "fp64"],  # fmt: skip
)
def test_gather_up_rejects(mutate, match):
    x, w, idx = mutate(*_up_inputs())
    with pytest.raises(ValueError, match=match):
        gather_up(x, w, idx)


def test_batch_17_rejected_everywhere():
    x, w, idx = _up_inputs(B=17)
    h = randn(17, idx.numel(), dtype=x.dtype)
    for call in (lambda: gather_up(x, w, idx), lambda: gather_swiglu(x, w, w, idx), lambda: gather_down(h, w, idx)):
        with pytest.raises(ValueError, match="batch size 17"):
            call()


def test_other_launchers_reject():
    x, w, idx = _up_inputs()
    h = randn(2, idx.numel(), dtype=x.dtype)
    dup = torch.cat([idx, idx[:1]])
    cases = [
        (lambda: gather_swiglu(x, w, w.float(), idx), "w_up has dtype"),
        (lambda: gather_swiglu(x, w, w[:30], idx), "dimension 0"),
        (lambda: gather_swiglu(x, w, w, dup), "duplicated"),
        (lambda: gather_down(h, w, idx[:1].repeat(8)), "duplicated"),
        (lambda: gather_down(h[:, :-1], w, idx), "columns"),
        (lambda: gather_down(h, w, idx, bias=torch.ones(23, dtype=x.dtype, device=DEVICE)), "bias"),
        (lambda: gather_down(h, w, idx, residual=torch.ones(3, 24, dtype=x.dtype, device=DEVICE)), "residual"),
        (lambda: gather_down(h, w, idx + 40, validate=True), "out of bounds"),
        (lambda: gather_up(x, w, idx, act="gelu"), "act"),
        (lambda: gather_up(x, w, idx, bias=torch.ones(40, device=DEVICE)), "bias has dtype"),
        (lambda: gather_up(x, w, idx, out=torch.empty(2, 9, dtype=x.dtype, device=DEVICE)), "out must be"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_validate_false_skips_data_checks():
    """validate=False trusts the indices (no host sync); duplicates then act as repeated rows."""
    x, w, idx = _up_inputs(dtype=torch.float32)
    dup = torch.cat([idx, idx[:2]])
    y = gather_up(x, w, dup, act="none", validate=False)
    check_against(y, gather_up_ref, (x, w, dup, None, "none"), dtype=torch.float32)
