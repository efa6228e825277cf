"""norm_fused, qkv_post and embed_fused (the launch-saving kernels) against their torch references; gather_down v2's
single-launch split-k is deterministic and self-resetting (interpreter on CPU)."""

import pytest
import torch

pytest.importorskip("triton")

from dejavu.kernels import fused_ops as FO  # noqa: E402
from dejavu.kernels import gather_down, gather_down_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_fused(kind, dtype):
    g = torch.Generator().manual_seed(0)
    B, d = 3, 80
    x, w, b, rb = (torch.randn(*s, generator=g).to(DEV, dtype) for s in ((B, d), (d,), (d,), (d,)))
    bias = b if kind == "layernorm" else None
    outs = []
    for fn in (FO.norm_fused, FO.norm_fused_ref):
        y, init = torch.empty_like(x), torch.empty_like(x)
        fn(x, kind, w, bias, 1e-5, out=y, init=init, init_bias=rb)
        outs.append((y, init))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=tol, atol=tol)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("rope,holes,group", [(False, True, 1), (True, True, 2), (True, False, 2)])
def test_qkv_post(rope, holes, group):
    g = torch.Generator().manual_seed(1)
    B, Hkv, S, hd, kq = 2, 4, 8, 16, 3
    kkv = 2
    qkv = torch.randn(B, kq + 2 * kkv, hd, generator=g).to(DEV)
    hidx = torch.tensor([0, 3, 5], device=DEV) if group == 2 else torch.tensor([0, 1, 3], device=DEV)[:kq]
    kvidx = torch.tensor([0, 2], device=DEV)
    pos = torch.tensor([3, 6], device=DEV)
    cos, sin = (torch.randn(B, hd, generator=g).to(DEV) for _ in range(2)) if rope else (None, None)
    res = []
    for fn in (FO.qkv_post, FO.qkv_post_ref):
        kc, vc = torch.zeros(B, Hkv, S, hd, device=DEV), torch.zeros(B, Hkv, S, hd, device=DEV)
        valid = torch.ones(B, Hkv, S, dtype=torch.bool, device=DEV) if holes else None
        q = torch.zeros(B, kq, hd, device=DEV) if rope else None
        fn(qkv, kq, kkv, q, kc, vc, kvidx, pos, cos=cos, sin=sin, valid=valid, hidx=hidx, group=group)
        res.append((q, kc, vc, valid))
    for a, b in zip(*res):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,d,pos_kind", [(1, 80, "learned"), (3, 1100, "learned"), (2, 1100, None), (1, 80, "rope"),
                                          (3, 1100, "rope")])
def test_embed_fused(dtype, B, d, pos_kind):
    """The step's embedding equals the torch lookups exactly: token row + learned position row (one rounding), the
    token row alone, or the token row and a position table's row (RoPE cos | sin, narrower or wider than d: 2 x 72
    against 80, 2 x 64 against 1100); d = 1100 spans two column blocks."""
    g = torch.Generator().manual_seed(4)
    V, P = 50, 12
    dp = {"learned": d, "rope": 144 if d == 80 else 128, None: d}[pos_kind]
    wte, wpe = torch.randn(V, d, generator=g).to(DEV, dtype), torch.randn(P, dp, generator=g).to(DEV, dtype)
    tok = torch.randint(0, V, (B,), generator=g).to(DEV)
    pos = torch.randint(0, P, (B,), generator=g).to(DEV) if pos_kind else None
    wpe = wpe if pos_kind else None
    res = []
    for fn in (FO.embed_fused, FO.embed_fused_ref):
        out = torch.empty(B, d, dtype=dtype, device=DEV)
        pos_out = torch.empty(B, dp, dtype=dtype, device=DEV) if pos_kind == "rope" else None
        fn(tok, wte, pos, wpe, out=out, pos_out=pos_out)
        res.append((out, pos_out))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=0)
    if pos_kind == "rope":
        torch.testing.assert_close(res[0][1], res[1][1], rtol=0, atol=0)
        assert torch.equal(res[0][1], wpe[pos])


def test_embed_fused_bad_input():
    """A token id out of range gives a NaN row (no host check inside a graph), its neighbours untouched; malformed
    arguments are ValueErrors naming the fix."""
    wte, wpe = torch.randn(10, 32, device=DEV), torch.randn(8, 32, device=DEV)
    tok, pos = torch.tensor([3, 10, -1], device=DEV), torch.tensor([0, 1, 2], device=DEV)
    out = FO.embed_fused(tok, wte, pos, wpe, out=torch.empty(3, 32, device=DEV))
    assert out[1:].isnan().all() and torch.equal(out[0], wte[3] + wpe[0])
    for kw, msg in ((dict(tok=tok[:, None]), "1-D"), (dict(pos=pos.float()), "pos must be a 1-D"),
                    (dict(wte=wte[0]), "2-D table"), (dict(out=torch.empty(3, 32, dtype=torch.float16, device=DEV)),
                    "out must be"), (dict(wpe=None), "together"), (dict(pos=pos[:2]), "pos must be"),
                    (dict(wpe=torch.randn(8, 16, device=DEV)), "pos must be"),
                    (dict(pos_out=torch.empty(3, 31, device=DEV)), "pos_out must be"),
                    (dict(pos=None, wpe=None, pos_out=torch.empty(3, 32, device=DEV)), "pos_out needs")):
        args = dict(tok=tok, wte=wte, pos=pos, wpe=wpe, out=torch.empty(3, 32, device=DEV)) | kw
        with pytest.raises(ValueError, match=msg):
            FO.embed_fused(args.pop("tok"), args.pop("wte"), args.pop("pos"), args.pop("wpe"), **args)


@pytest.mark.parametrize("batch_rows", [False, True])
@pytest.mark.parametrize("block_s", [None, 1, 2, 4])
@pytest.mark.parametrize("B", [1, 3])
def test_gather_down_fused_reduce_tiles(monkeypatch, block_s, B, batch_rows):
    """The last program's sum of the split partials, loaded block_s splits at a time (5 splits: a partial last tile
    for 2 and 4; 1 is one split per round trip; None the launcher's choice), over the batch tile's rows or (B = 3 on
    the tensor-core path: 4 of 16) the batch's, against the reference."""
    from dejavu.kernels import gather_mlp as GM

    monkeypatch.setattr(GM, "REDUCE_BLOCK_S", block_s)
    monkeypatch.setattr(GM, "REDUCE_BATCH_ROWS", batch_rows)
    g = torch.Generator().manual_seed(3)
    N, d, k = 400, 70, 300  # 5 splits of 64 rows on both paths (16-row steps at B = 1, 64 above)
    w = torch.randn(N, d, generator=g).to(DEV)
    idx = torch.randperm(N, generator=g)[:k].sort().values.to(DEV)
    h = torch.randn(B, k, generator=g).to(DEV)
    res, bias = torch.randn(B, d, generator=g).to(DEV), torch.randn(d, generator=g).to(DEV)
    out = gather_down(h, w, idx, bias, res, split_k=5)
    torch.testing.assert_close(out, gather_down_ref(h, w, idx, bias, res), rtol=1e-4, atol=1e-4)


def test_gather_down_split_deterministic_and_reusable():
    g = torch.Generator().manual_seed(2)
    N, d, k, B = 512, 96, 320, 1
    w = torch.randn(N, d, generator=g).to(DEV)
    idx = torch.randperm(N, generator=g)[:k].sort().values.to(DEV)
    h = torch.randn(B, k, generator=g).to(DEV)
    res, bias = torch.randn(B, d, generator=g).to(DEV), torch.randn(d, generator=g).to(DEV)
    ref = gather_down_ref(h, w, idx, bias, res)
    a = gather_down(h, w, idx, bias, res, split_k=5)
    b = gather_down(h, w, idx, bias, res, split_k=5)  # counters were reset by the first launch
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(a, b)
