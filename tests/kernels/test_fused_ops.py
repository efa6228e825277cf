"""norm_fused and qkv_post (the v2 launch-saving kernels) against their torch references; gather_down v2's
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
