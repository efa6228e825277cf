"""sparse_mlp (the whole sparse MLP block in one launch) against the unfused torch references.

Odd d (not a multiple of the up chunk, the down slab or the epilogue chunk), k = 1 / some / all, batches 1, 2, 3
and 16, ReLU with biases and residual (OPT) and SwiGLU (LLaMA), folded norms, and the workspace left clean for the
next launch.
"""

import functools

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, check_against, make_gen, poisoned, rand_index, randn  # noqa: E402

from dejavu.kernels import XSum, fold_norm, mlp_workspace, sparse_mlp, sparse_mlp_ref, x_sum_ref  # noqa: E402
from dejavu.kernels import _checks  # noqa: E402
from dejavu.kernels import mlp_block as SM  # noqa: E402

pytestmark = pytest.mark.needs_kernels

# (d, N, k); d = 4100: several down slabs and epilogue chunks (a chunk's read-then-zero needs the barrier on a GPU)
CASES = [(72, 40, 1), (72, 40, 40), (300, 130, 45), (600, 37, 13), (4100, 40, 17)]


def _weights(d, n, dtype, g, swiglu):
    w1 = randn(n, d, dtype=dtype, gen=g, scale=0.2)
    w3 = randn(n, d, dtype=dtype, gen=g, scale=0.2) if swiglu else None
    w2t = randn(n, d, dtype=dtype, gen=g, scale=0.2)
    return w1, w3, w2t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("swiglu", [False, True], ids=["relu", "swiglu"])
@pytest.mark.parametrize("d,n,k", CASES)
def test_sparse_mlp(d, n, k, swiglu, B, dtype):
    g = make_gen("sparse_mlp", d, n, k, swiglu, B, dtype)
    x = randn(B, d, dtype=dtype, gen=g)
    w1, w3, w2t = _weights(d, n, dtype, g, swiglu)
    b1 = None if swiglu else randn(n, dtype=dtype, gen=g)
    b2, res = (randn(d, dtype=dtype, gen=g), randn(B, d, dtype=dtype, gen=g)) if (k + B) % 2 else (None, None)
    idx = rand_index(n, k, gen=g, dtype=torch.int32 if B == 2 else torch.int64)
    ws = mlp_workspace(d, DEVICE, B)
    out = poisoned((B, d), dtype)
    # prewait (a no-op without PDL; on a Hopper GPU at B <= 2 the first up chunk read before the wait): half the cases
    got = sparse_mlp(x, w1, w2t, idx, b1, b2, res, w3=w3, workspace=ws, out=out, prewait=(k + B) % 2 == 0)
    assert got is out
    check_against(got, sparse_mlp_ref, (x, w1, w2t, idx, b1, b2, res), {"w3": w3}, dtype=dtype)
    assert not ws["acc"].any() and not ws["cnt"].any(), "the kernel must leave its workspace zeroed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_mlp_batch_16_and_reused_workspace(dtype):
    d, n, k, B = 200, 90, 33, 16
    g = make_gen("sparse_mlp16", dtype)
    w1, _, w2t = _weights(d, n, dtype, g, False)
    b1, b2 = randn(n, dtype=dtype, gen=g), randn(d, dtype=dtype, gen=g)
    ws = mlp_workspace(d, DEVICE)  # one workspace, two launches in a row (as the decode step shares it)
    for step in range(2):
        x, res = randn(B, d, dtype=dtype, gen=g), randn(B, d, dtype=dtype, gen=g)
        idx = rand_index(n, k, gen=g)
        got = sparse_mlp(x, w1, w2t, idx, b1, b2, res, workspace=ws, out=poisoned((B, d), dtype))
        check_against(got, sparse_mlp_ref, (x, w1, w2t, idx, b1, b2, res), dtype=dtype)
        assert not ws["acc"].any() and not ws["cnt"].any(), f"workspace not zeroed after launch {step}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [2, 3])
@pytest.mark.parametrize("kind,swiglu", [("layernorm", False), ("rmsnorm", False), ("rmsnorm", True)])
def test_sparse_mlp_folded_norm(kind, swiglu, B, dtype):
    d, n, k = 300, 64, 20
    g = make_gen("sparse_mlp_norm", kind, swiglu, B, dtype)
    x = (randn(B, d, gen=g) + 0.5).to(dtype)  # off-centre: the layernorm's mean term matters
    w1, w3, w2t = _weights(d, n, dtype, g, swiglu)
    b1 = None if swiglu else randn(n, dtype=dtype, gen=g)
    gain = (1.0 + 0.3 * randn(d, gen=g)).to(dtype)
    shift = randn(d, dtype=dtype, gen=g, scale=0.5) if kind == "layernorm" else None
    fold = fold_norm(w1, kind, gain, shift, 1e-5, b1)
    b2 = randn(d, dtype=dtype, gen=g)
    idx = rand_index(n, k, gen=g)
    got = sparse_mlp(x, w1, w2t, idx, None, b2, x, w3=w3, norm=fold)
    check_against(got, sparse_mlp_ref, (x, w1, w2t, idx, None, b2, x), {"w3": w3, "norm": fold}, dtype=dtype)


@pytest.mark.usefixtures("fma_batch_2")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("swiglu", [False, True], ids=["relu", "swiglu"])
def test_sparse_mlp_unfinished(swiglu, B, dtype):
    """finish=False: the fp32 sums stay in the workspace (returned as a [B, d] view), nothing is finished, and
    ``zero`` is cleared; finishing them as the next gather does (XSum) gives the finished block's output."""
    d, n, k = 600, 37, 13
    g = make_gen("sparse_mlp_unfinished", swiglu, B, dtype)
    x = randn(B, d, dtype=dtype, gen=g)
    w1, w3, w2t = _weights(d, n, dtype, g, swiglu)
    b1 = None if swiglu else randn(n, dtype=dtype, gen=g)
    idx = rand_index(n, k, gen=g)
    ws, other = mlp_workspace(d, DEVICE, B), torch.full((B * d + 5,), 7.0, device=DEVICE)
    sums = sparse_mlp(x, w1, w2t, idx, b1, w3=w3, workspace=ws, finish=False, zero=other)
    assert sums.dtype == torch.float32 and sums.shape == (B, d) and sums.data_ptr() == ws["acc"].data_ptr()
    assert not other.any() and not ws["cnt"].any()
    check_against(sums.to(dtype), sparse_mlp_ref, (x, w1, w2t, idx, b1), {"w3": w3}, dtype=dtype)
    b2, res = randn(d, dtype=dtype, gen=g), randn(B, d, dtype=dtype, gen=g)
    finished = sparse_mlp(x, w1, w2t, idx, b1, b2, res, w3=w3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x_sum_ref(XSum(sums, b2, res), dtype), finished, rtol=tol, atol=tol)


def test_sparse_mlp_unfinished_rejects():
    a, _ = _args()
    ws = mlp_workspace(64, DEVICE, 2)
    with pytest.raises(ValueError, match="finish=False"):
        sparse_mlp(**a, b2=torch.zeros(64, dtype=torch.float16, device=DEVICE), finish=False)
    with pytest.raises(ValueError, match="own workspace"):
        sparse_mlp(**a, workspace=ws, zero=ws["acc"])


def _check_x_sum(d, n, k, kind, swiglu, finish, B, dtype, tag):
    """The block with x made from the unfinished o_proj's sums (XSum) against the reference; the workspace left
    clean."""
    g = make_gen(tag, d, kind, swiglu, finish, B, dtype)
    w1, w3, w2t = _weights(d, n, dtype, g, swiglu)
    b1 = None if swiglu else randn(n, dtype=dtype, gen=g)
    gain = (1.0 + 0.3 * randn(d, gen=g)).to(dtype)
    shift = randn(d, dtype=dtype, gen=g, scale=0.5) if kind == "layernorm" else None
    fold = fold_norm(w1, kind, gain, shift, 1e-5, b1)
    bo = None if swiglu else randn(d, dtype=dtype, gen=g)
    xs = XSum(randn(B, d, gen=g), bo, (randn(B, d, gen=g) + 0.5).to(dtype))
    b2 = None if swiglu else randn(d, dtype=dtype, gen=g)
    idx = rand_index(n, k, gen=g)
    x = poisoned((B, d), dtype)
    ws = mlp_workspace(d, DEVICE, B)
    got = sparse_mlp(x, w1, w2t, idx, None, b2 if finish else None, x if finish else None, w3=w3, norm=fold,
                     x_sum=xs, finish=finish, workspace=ws, out=poisoned((B, d), dtype))  # fmt: skip
    made = x_sum_ref(xs, dtype)
    assert torch.equal(x, made), "x must be written exactly as the o_proj would have stored it"
    if finish:
        check_against(got, sparse_mlp_ref, (made, w1, w2t, idx, None, b2, made), {"w3": w3, "norm": fold},
                      dtype=dtype)  # fmt: skip
        assert not ws["acc"].any() and not ws["cnt"].any()
    else:
        check_against(got.to(dtype), sparse_mlp_ref, (made, w1, w2t, idx), {"w3": w3, "norm": fold}, dtype=dtype)


@pytest.mark.usefixtures("fma_batch_2")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("finish", [True, False], ids=["finished", "unfinished"])
@pytest.mark.parametrize("kind,swiglu", [("layernorm", False), ("rmsnorm", True)])
def test_sparse_mlp_x_sum(kind, swiglu, finish, B, dtype):
    """x made from the unfinished o_proj before the block (XSum): every program makes it, program 0 writes it
    into x exactly as the o_proj would have stored it, and the block's residual may be that x (OPT: layernorm
    folded, biases; LLaMA: rmsnorm folded, SwiGLU)."""
    _check_x_sum(600, 37, 13, kind, swiglu, finish, B, dtype, "sparse_mlp_xsum")


@pytest.mark.usefixtures("fma_batch_2")
def test_sparse_mlp_x_sum_rejects():
    a, _ = _args()
    x = a["x"]
    xs = XSum(torch.zeros(2, 64, device=DEVICE), None, x)
    with pytest.raises(ValueError, match="residual is read"):
        sparse_mlp(**a, x_sum=xs)
    ok = XSum(xs.sums, None, x.clone())
    with pytest.raises(ValueError, match="another buffer"):
        sparse_mlp(**a, x_sum=ok, out=x)
    with pytest.raises(ValueError, match="row gathers only"):
        sparse_mlp(**a, x_sum=XSum(xs.sums, None, x.clone(), torch.zeros_like(x)))
    with pytest.raises(ValueError, match=r"batch <= \d"):
        x3 = randn(3, 64, dtype=torch.float16)
        sparse_mlp(**dict(a, x=x3), x_sum=XSum(torch.zeros(3, 64, device=DEVICE), None, x3.clone()))


@pytest.mark.parametrize("rows", [8, 32])
@pytest.mark.parametrize("swiglu", [False, True], ids=["relu", "swiglu"])
def test_sparse_mlp_rows_knob(rows, swiglu, monkeypatch):
    """The A/B knob mlp_block.ROWS (neurons a program at B <= 2) changes the tiling, not the result."""
    monkeypatch.setattr(SM, "ROWS", rows)
    assert SM._mlp_config(1, 64, 600, swiglu, torch.device("cpu"))["BLOCK_N"] == rows
    d, n, k = 600, 70, 45
    g = make_gen("sparse_mlp_rows", rows, swiglu)
    x = randn(1, d, gen=g)
    w1, w3, w2t = _weights(d, n, torch.float32, g, swiglu)
    b1 = None if swiglu else randn(n, gen=g)
    idx = rand_index(n, k, gen=g)
    got = sparse_mlp(x, w1, w2t, idx, b1, w3=w3)
    check_against(got, sparse_mlp_ref, (x, w1, w2t, idx, b1), {"w3": w3}, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("finish", [True, False], ids=["finished", "unfinished"])
@pytest.mark.parametrize("kind,swiglu", [("layernorm", False), ("rmsnorm", True)])
@pytest.mark.parametrize("d,n,k", [(300, 40, 17), (1100, 40, 33)])
@pytest.mark.usefixtures("fma_batch_2")
def test_sparse_mlp_one_loop(d, n, k, kind, swiglu, finish, B, dtype, monkeypatch):
    """mlp_block.ONE_LOOP forced (both phases in one pipelined loop, SwiGLU too) changes the schedule, not the
    result: as test_sparse_mlp_x_sum, with one up chunk (d = 300) or several (d = 1100)."""
    monkeypatch.setattr(SM, "ONE_LOOP", True)
    _check_x_sum(d, n, k, kind, swiglu, finish, B, dtype, "sparse_mlp_one_loop")


@pytest.mark.parametrize("one", [True, False], ids=["one_loop", "two_loops"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("swiglu", [False, True], ids=["relu", "swiglu"])
@pytest.mark.parametrize("d,n,k", [(600, 70, 45), (1100, 40, 1), (520, 33, 33)])
def test_sparse_mlp_loops_forced(d, n, k, swiglu, dtype, one, monkeypatch):
    """Either schedule of the FMA path, forced by mlp_block.ONE_LOOP for both activations, gives the reference's
    result with its bias, residual and finish (one up chunk or several; k = 1; k = n)."""
    monkeypatch.setattr(SM, "ONE_LOOP", one)
    assert SM._mlp_config(1, k, d, swiglu, torch.device("cpu"))["ONE_LOOP"] is one
    g = make_gen("sparse_mlp_loops", d, k, swiglu, dtype, one)
    x = randn(1, d, dtype=dtype, gen=g)
    w1, w3, w2t = _weights(d, n, dtype, g, swiglu)
    b1 = None if swiglu else randn(n, dtype=dtype, gen=g)
    b2, res = randn(d, dtype=dtype, gen=g), randn(1, d, dtype=dtype, gen=g)
    idx = rand_index(n, k, gen=g)
    got = sparse_mlp(x, w1, w2t, idx, b1, b2, res, w3=w3)
    check_against(got, sparse_mlp_ref, (x, w1, w2t, idx, b1, b2, res), {"w3": w3}, dtype=dtype)


def test_sparse_mlp_one_loop_rule(monkeypatch):
    """ONE_LOOP = None: one loop for ReLU blocks, capped at ONE_LOOP_MAXNREG registers where the 16-neuron programs
    outnumber the SMs (OPT-30B at density 0.1 on 132 SMs: 180 programs) and uncapped where they fit one to an SM
    (OPT-13B and OPT-6.7B at 0.1); two loops for SwiGLU. With no cap, v23's rule: two loops where the programs
    outnumber the SMs. MAXNREG caps any schedule. True / False force it; the tensor-core path (B above FMA_MAX_BATCH)
    always runs two loops."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(SM, "num_sms", lambda device: 132)
    monkeypatch.setattr(SM, "ONE_LOOP", None)
    cfg = functools.partial(SM._mlp_config, device=cpu)

    def cap(k, swiglu=False):
        got = SM.launch_maxnreg(cfg(1, k, 5120, swiglu)["ONE_LOOP"], k, 16, cpu)
        assert SM.register_cap(1, k, 5120, swiglu, cpu) == got
        return got

    assert cfg(1, 2048, 5120, False)["ONE_LOOP"] and cfg(1, 1638, 4096, False)["ONE_LOOP"]
    assert cfg(1, 132 * 16, 5120, False)["ONE_LOOP"] and cfg(1, 132 * 16 + 1, 5120, False)["ONE_LOOP"]
    assert cap(132 * 16) is None and cap(132 * 16 + 1) == 128 and cap(2867) == 128
    assert not cfg(1, 1101, 4096, True)["ONE_LOOP"] and cap(4000, swiglu=True) is None
    assert cfg(1, 2048, 5120, False)["BLOCK_O"] == cfg(1, 2048, 5120, False)["BLOCK_D"]
    assert not cfg(16, 2048, 5120, False)["ONE_LOOP"] and SM.register_cap(16, 4000, 5120, False, cpu) is None
    monkeypatch.setattr(SM, "ONE_LOOP_MAXNREG", None)  # v23's rule
    assert cfg(1, 132 * 16, 5120, False)["ONE_LOOP"] and not cfg(1, 132 * 16 + 1, 5120, False)["ONE_LOOP"]
    assert not cfg(1, 2867, 7168, False)["ONE_LOOP"] and cap(2867) is None
    monkeypatch.setattr(SM, "MAXNREG", 96)
    assert cap(2867) == 96 and cap(64) == 96
    monkeypatch.setattr(SM, "MAXNREG", None)
    for forced in (True, False):
        monkeypatch.setattr(SM, "ONE_LOOP", forced)
        assert cfg(1, 2867, 7168, True)["ONE_LOOP"] is forced and cfg(1, 64, 512, False)["ONE_LOOP"] is forced


@pytest.mark.parametrize("fma_max", [1, 2])
def test_sparse_mlp_config(fma_max, monkeypatch):
    """B <= FMA_MAX_BATCH (1 by default; 2 as an A/B knob): CUDA-core FMA, the accumulators [B, BLOCK_N, BLOCK_D]
    (twice for SwiGLU) and [B, BLOCK_N, BLOCK_O] within 64 fp32 registers a thread; above: tensor cores (tl.dot needs
    16 rows and 16 neurons)."""
    monkeypatch.setattr(_checks, "FMA_MAX_BATCH", fma_max)
    for B in (1, 2, 3, 16):
        for swiglu in (False, True):
            c = SM._mlp_config(B, 2048, 5120, swiglu, torch.device("cpu"))
            assert c["BLOCK_B"] >= B and c["USE_DOT"] == (B > fma_max)
            if B > fma_max:
                assert c["BLOCK_B"] >= 16 and c["BLOCK_N"] >= 16
                continue
            assert c["BLOCK_B"] * c["BLOCK_N"] * c["BLOCK_D"] * (2 if swiglu else 1) <= 64 * 32 * c["num_warps"]
            assert c["BLOCK_B"] * c["BLOCK_N"] * c["BLOCK_O"] <= 64 * 32 * c["num_warps"]


@pytest.mark.parametrize("plain, after_up, want", [(1, True, 3), (1, False, 1), (0, True, 0), (2, True, 2),
                                                    (3, False, 3)])
def test_sparse_mlp_pdl_mode(plain, after_up, want, monkeypatch):
    """The block signals the next launch after its up phase (mode 3) where PDL's plain mode would apply, unless the
    knob is off; no PDL stays off, and a kernel-name knob (PDL_LATE: 2, PDL_MID: 3) wins."""
    monkeypatch.setattr(SM, "use_pdl", lambda kernel, device: plain)
    monkeypatch.setattr(SM, "SIGNAL_AFTER_UP", after_up)
    assert SM._pdl_mode(torch.device("cuda", 0)) == want


def _args(dtype=torch.float16):
    g = make_gen("sparse_mlp_bad")
    d, n = 64, 32
    w1, w3, w2t = _weights(d, n, dtype, g, True)
    return dict(x=randn(2, d, dtype=dtype, gen=g), w1=w1, w2t=w2t, idx=rand_index(n, 8, gen=g)), w3


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, w3: a.update(w2t=a["w2t"].T.contiguous()), "w2t"),
        (lambda a, w3: a.update(w2t=a["w2t"][:, :32].contiguous()), "transposed down weight"),
        (lambda a, w3: a.update(x=a["x"].float()), "x"),
        (lambda a, w3: a.update(idx=torch.tensor([0, 0, 3], device=DEVICE)), "duplicate"),
        (lambda a, w3: a.update(idx=torch.tensor([0, 32], device=DEVICE)), "out of bounds"),
        (lambda a, w3: a.update(w3=w3, b1=torch.zeros(32, dtype=torch.float16, device=DEVICE)), "no up bias"),
        (lambda a, w3: a.update(workspace={"acc": torch.zeros(10, device=DEVICE)}), "mlp_workspace"),
        (lambda a, w3: a.update(x=randn(17, 64, dtype=torch.float16)), "17"),
    ],
)
def test_sparse_mlp_rejects(mutate, match):
    a, w3 = _args()
    mutate(a, w3)
    with pytest.raises(ValueError, match=match):
        sparse_mlp(**a)
