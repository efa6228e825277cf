"""Micro-benchmark of the predictor top-k (GPU diagnostic for bench/NOTES.md): where do topk_select's microseconds go?

N = 20480 scores (OPT-13B neurons), k = 2048, batch 1, CUDA-graph replay medians. Rows: torch topk + sort (the old
path), torch topk alone, ``topk_select`` at several warp counts, and two stripped variants of its kernel (bisection
only; compaction only) to split its time between the two phases. Then the neuron selection chain per batch size:
scores GEMV (with / without the histogram epilogue), + radix select, against + torch.topk.

    PYTHONPATH=src python bench/select_micro.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from dejavu.kernels import predictor_ops as P


@triton.jit
def _bisect_only(s_ptr, t_ptr, N, k, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(t_ptr, P._kth_largest_key(P._order_key(s), valid, k))


@triton.jit
def _compact_only(s_ptr, out_ptr, N, thr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    take = valid & (s > thr)
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + pos, offs.to(tl.int64), mask=take)


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def main():
    print(torch.cuda.get_device_name())
    for n, k in ((20480, 2048), (28672, 2867), (40, 20)):
        s = torch.randn(1, n, device="cuda")
        out = torch.empty(k, dtype=torch.int64, device="cuda")
        t = torch.empty(1, dtype=torch.int32, device="cuda")
        block = triton.next_power_of_2(n)
        thr = float(s.flatten().kthvalue(n - k + 1).values)
        rows = {"torch topk+sort": lambda: torch.topk(s[0], k, sorted=False).indices.sort().values,
                "torch topk(sorted=False)": lambda: torch.topk(s[0], k, sorted=False)}
        for w in (1, 4, 8, 16, 32):
            if w == 1 and block > 1024:
                continue

            def f(w=w):
                P._topk_select_kernel[(1,)](s, out, 1, n, k, s.stride(0), 0, COPIES=1, BLOCK=block, PDL=False,
                                            num_warps=w)
            rows[f"topk_select warps={w}"] = f
            rows[f"  bisect only warps={w}"] = lambda w=w: _bisect_only[(1,)](s, t, n, k, BLOCK=block, num_warps=w)
            rows[f"  compact only warps={w}"] = lambda w=w: _compact_only[(1,)](s, out, n, thr, BLOCK=block,
                                                                                  num_warps=w)
        print(f"== N={n} k={k}")
        for name, fn in rows.items():
            try:
                print(f"   {bench(fn):8.2f} us  {name}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"   failed: {name}: {type(e).__name__}: {str(e)[:100]}")
    neuron_chain()


def neuron_chain():
    """The decode step's neuron selection at OPT-13B shape (r=320, N=20480, k=2048), fp16, per batch size: the
    scores GEMV with and without the histogram epilogue, the radix select, and torch.topk on the same scores."""
    r, n, k = 320, 20480, 2048
    w = torch.randn(n, r, device="cuda", dtype=torch.float16) * 0.05
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    ws = P.radix_workspace("cuda")
    out = torch.empty(k, dtype=torch.int64, device="cuda")
    for B in (1, 2, 4, 16):
        xa = torch.randn(B, r, device="cuda")
        sc = torch.empty(1, n, device="cuda", dtype=torch.float16)
        def gemv(hist=None, xa=xa, sc=sc):
            return P.lowrank_gemv(xa, w, bias, batch_max=True, out_dtype=torch.float16, out=sc, hist=hist)

        rows = {
            "scores gemv": gemv,
            "scores gemv + hist": lambda: gemv(ws["hist"]),
            "gemv + hist + radix_select": lambda sc=sc: (gemv(ws["hist"]), P.radix_select(sc, k, out=out,
                                                                                         workspace=ws)),
            "gemv + torch.topk": lambda sc=sc: (gemv(), P.select_topk(sc, k, out=out, radix=False)),
        }
        print(f"== neuron selection B={B} (N={n}, r={r}, k={k})")
        for name, fn in rows.items():
            ws["hist"].zero_()
            print(f"   {bench(fn):8.2f} us  {name}", flush=True)
        ws["hist"].zero_()


if __name__ == "__main__":
    main()
