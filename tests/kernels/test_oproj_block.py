"""oproj_mlp (the o_proj column gather and the sparse MLP block in one launch, ticketed work items) against the
torch references: the o_proj's fp32 sums, x made from them exactly as the MLP block makes it, the block's output
(finished or left as sums), what it clears, and its counters left zero for the next launch."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, check_against, make_gen, poisoned, rand_index, randn  # noqa: E402

from dejavu.kernels import XSum, fold_norm, head_gather_down_ref, mlp_workspace, sparse_mlp_ref, x_sum_ref  # noqa: E402
from dejavu.kernels import gather_mlp as GM  # noqa: E402
from dejavu.kernels import mlp_block as SM  # noqa: E402
from dejavu.kernels import oproj_block as OM  # noqa: E402
from dejavu.kernels import oproj_mlp, oproj_mlp_ref  # noqa: E402

pytestmark = pytest.mark.needs_kernels


def _case(d, n, k, H, hd, kh, kind, swiglu, B, dtype, tag):
    g = make_gen(tag, d, n, k, H, kh, kind, swiglu, B, dtype)
    a = randn(B, kh, hd, dtype=dtype, gen=g)
    wo_t = randn(H * hd, d, dtype=dtype, gen=g, scale=0.2)
    head_idx = rand_index(H, kh, gen=g, dtype=torch.int32 if kh % 2 else torch.int64)
    w1, w2t = randn(n, d, dtype=dtype, gen=g, scale=0.2), randn(n, d, dtype=dtype, gen=g, scale=0.2)
    w3 = randn(n, d, dtype=dtype, gen=g, scale=0.2) if swiglu else None
    b1 = None if swiglu else randn(n, dtype=dtype, gen=g)
    gain = (1.0 + 0.3 * randn(d, gen=g)).to(dtype)
    shift = randn(d, dtype=dtype, gen=g, scale=0.5) if kind == "layernorm" else None
    fold = fold_norm(w1, kind, gain, shift, 1e-5, b1)
    bo = None if swiglu else randn(d, dtype=dtype, gen=g)
    b2 = None if swiglu else randn(d, dtype=dtype, gen=g)
    x_res = (randn(B, d, gen=g) + 0.5).to(dtype)
    return dict(a=a, wo_t=wo_t, head_idx=head_idx, head_dim=hd, w1=w1, w2t=w2t, idx=rand_index(n, k, gen=g)), \
        dict(w3=w3, norm=fold, bo=bo, x_res=x_res), b2  # fmt: skip


def _run(d, n, k, H, hd, kh, kind, swiglu, finish, B, dtype, tag="oproj_mlp"):
    t, kw, b2 = _case(d, n, k, H, hd, kh, kind, swiglu, B, dtype, tag)
    o_sums = torch.zeros(B, d, device=DEVICE)
    other_o, other_m = torch.full((B * d + 3,), 7.0, device=DEVICE), torch.full((2 * B * d,), 5.0, device=DEVICE)
    x, ws = poisoned((B, d), dtype), mlp_workspace(d, DEVICE, B)
    got = oproj_mlp(**t, o_sums=o_sums, x=x, b2=b2 if finish else None, residual=x if finish else None,
                    workspace=ws, out=poisoned((B, d), dtype), finish=finish, zero_o=other_o, zero=other_m, **kw)
    # the o_proj's sums, and x made from them as the block makes it (exactly)
    check_against(o_sums.to(dtype), head_gather_down_ref, (t["a"], t["wo_t"], t["head_idx"], hd), dtype=dtype)
    made = x_sum_ref(XSum(o_sums, kw["bo"], kw["x_res"]), dtype)
    assert torch.equal(x, made), "x must be written exactly as the o_proj's finish would have stored it"
    mlp = (made, t["w1"], t["w2t"], t["idx"], None)
    mkw = {"w3": kw["w3"], "norm": kw["norm"]}
    if finish:
        check_against(got, sparse_mlp_ref, (*mlp, b2, made), mkw, dtype=dtype)
        assert not ws["acc"].any() and not ws["cnt"].any(), "the finished block leaves its workspace zeroed"
    else:
        assert got.dtype == torch.float32 and got.data_ptr() == ws["acc"].data_ptr()
        check_against(got.to(dtype), sparse_mlp_ref, mlp, mkw, dtype=dtype)
    assert not other_o.any() and not other_m.any(), "zero_o and zero must be cleared"
    for buf, _ in GM._COUNTERS.values():
        assert not buf.any(), "the launch must leave its ticket counters zero for the next one"
    return got


@pytest.mark.usefixtures("fma_batch_2")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("finish", [True, False], ids=["finished", "unfinished"])
@pytest.mark.parametrize("kind,swiglu", [("layernorm", False), ("rmsnorm", True)])
def test_oproj_mlp(kind, swiglu, finish, B, dtype):
    """OPT (layernorm folded, biases, ReLU) and LLaMA (rmsnorm folded, SwiGLU), d over two o_proj slabs and two up
    chunks, several MLP items."""
    _run(600, 37, 13, 6, 24, 4, kind, swiglu, finish, B, dtype)


@pytest.mark.parametrize("one_loop", [True, False], ids=["one_loop", "two_loops"])
@pytest.mark.parametrize("cols,per_sm,persistent", [(64, 1, False), (16, 4, False), (64, 1, True)])
@pytest.mark.parametrize("d,n,k,kh", [(72, 40, 1, 1), (300, 130, 130, 5), (1100, 40, 33, 3)])
def test_oproj_mlp_items(d, n, k, kh, cols, per_sm, persistent, one_loop, monkeypatch):
    """Odd d, k = 1 and k = all, one selected head or all of them; many o_proj items (narrow slabs, several
    splits: the knobs O_COLS and O_ITEMS_PER_SM), a program for each item or programs taking o_proj items until
    none is left (PERSISTENT; with k = 1 one program takes them all), and the MLP block's two schedules
    (mlp_block.ONE_LOOP): the tiling changes, not the result (fp32)."""
    monkeypatch.setattr(OM, "O_COLS", cols)
    monkeypatch.setattr(OM, "O_ITEMS_PER_SM", per_sm)
    monkeypatch.setattr(OM, "PERSISTENT", persistent)
    monkeypatch.setattr(SM, "ONE_LOOP", one_loop)
    _run(d, n, k, 5, 16, kh, "layernorm", False, True, 1, torch.float32, "oproj_mlp_items")


def test_oproj_mlp_items_split():
    """_oproj_items: whole 16-row steps a split, every row in some item, no more items than aimed for."""
    for n_in, d, target in [(2560, 5120, 132), (16, 72, 132), (4000, 7168, 264), (128 * 7, 4096, 103), (64, 72, 1)]:
        it = OM._oproj_items(n_in, d, target)
        assert it["rows_per_split"] % it["BLOCK_J"] == 0
        splits = it["n_o"] // it["n_od"]
        assert (splits - 1) * it["rows_per_split"] < n_in <= splits * it["rows_per_split"]
        assert it["n_od"] * it["BLOCK_DO"] >= d
        assert it["n_o"] <= max(target, it["n_od"]), "no more items than the target (one split at least)"


def test_oproj_mlp_ref_writes_x():
    """The reference writes x (the o_proj's finished output) and runs the block on it."""
    t, kw, b2 = _case(72, 40, 9, 5, 16, 2, "layernorm", False, 1, torch.float32, "oproj_mlp_ref")
    x = poisoned((1, 72), torch.float32)
    y = oproj_mlp_ref(t["a"], t["wo_t"], t["head_idx"], 16, x, t["w1"], t["w2t"], t["idx"], None, b2, x, **kw)
    mid = head_gather_down_ref(t["a"], t["wo_t"], t["head_idx"], 16, kw["bo"], kw["x_res"])
    assert torch.equal(x, mid)
    torch.testing.assert_close(y, sparse_mlp_ref(mid, t["w1"], t["w2t"], t["idx"], None, b2, mid, w3=kw["w3"],
                                                 norm=kw["norm"]))  # fmt: skip


def test_oproj_mlp_rejects():
    t, kw, _ = _case(64, 32, 8, 4, 16, 2, "rmsnorm", True, 1, torch.float16, "oproj_mlp_bad")
    x, sums = torch.zeros(1, 64, dtype=torch.float16, device=DEVICE), torch.zeros(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="o_sums"):
        oproj_mlp(**t, o_sums=sums.half(), x=x, **kw)
    with pytest.raises(ValueError, match="o_sums"):
        oproj_mlp(**t, o_sums=torch.zeros(1, 32, device=DEVICE), x=x, **kw)
    with pytest.raises(ValueError, match="must not be this launch's own o_sums"):
        oproj_mlp(**t, o_sums=sums, x=x, zero_o=sums.view(-1), **kw)
    with pytest.raises(ValueError, match="head_idx selects"):
        oproj_mlp(**dict(t, a=t["a"][:, :1]), o_sums=sums, x=x, **kw)
    with pytest.raises(ValueError, match="another buffer"):
        oproj_mlp(**t, o_sums=sums, x=x, out=x, **kw)
    with pytest.raises(ValueError, match=r"batch 2 is above"):
        x2 = torch.zeros(2, 64, dtype=torch.float16, device=DEVICE)
        oproj_mlp(**dict(t, a=t["a"].expand(2, -1, -1)), o_sums=sums.expand(2, -1).contiguous(), x=x2,
                  **dict(kw, x_res=x2.clone()))  # fmt: skip
