"""Does a kernel launched early by programmatic dependent launch (PDL) slow down the kernel it waits for? (GPU
diagnostic for bench/NOTES.md v16)

A is ``gather_down`` over 20480 rows (OPT-13B's fc2 at density 1) or ``head_gather_down`` over every head (its
o_proj), launched with PDL as the decode step launches them, so that A lets its successor start as soon as all of A's
programs run. B, right after it, is either the q/k/v gather over every head (960 programs, the dense step's next
kernel) or a kernel that only waits for A and then reads a few values (``n`` programs, ``width`` fp32 each), each with
and without PDL. A CUDA graph of 40 (A, B) pairs is replayed; printed: us per pair (median of 5 replays) and A alone.
(In the decode step the ``gather_down`` fc2 turned out to be slowed by its own programs, placed early beside the up
gather, not by its successor's: bench/NOTES.md v17.)

    PYTHONPATH=src python bench/pdl_successor.py
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

from dejavu.kernels import _checks as C
from dejavu.kernels import gather_down, head_gather_down, head_gather_gemv


@triton.jit
def _waiter(x_ptr, n, PDL: tl.constexpr, WIDTH: tl.constexpr):
    """Wait for the kernel before (with PDL), then read WIDTH values (registers) and store nothing (a masked store
    that never fires keeps the reads)."""
    C.pdl_sync(PDL)
    offs = tl.program_id(0) * WIDTH + tl.arange(0, WIDTH)
    v = tl.load(x_ptr + offs % n)
    s = tl.sum(v * v, axis=0)
    tl.store(x_ptr + tl.program_id(0) % n, s, mask=s == 12345.0)


def main():
    dev = "cuda"
    torch.manual_seed(0)
    f16 = dict(device=dev, dtype=torch.float16)
    h, w2t, idx = torch.randn(1, 20480, **f16), torch.randn(20480, 5120, **f16) * 0.02, torch.arange(20480, device=dev)
    bias, res, out = torch.randn(5120, **f16), torch.randn(1, 5120, **f16), torch.empty(1, 5120, **f16)
    a, wo_t, hidx = torch.randn(1, 40, 128, **f16), torch.randn(5120, 5120, **f16) * 0.02, torch.arange(40, device=dev)
    x, wqkv, qidx = torch.randn(1, 5120, **f16), torch.randn(15360, 5120, **f16) * 0.02, torch.arange(120, device=dev)
    buf = torch.randn(1 << 20, device=dev)

    def run(kind, succ, pdl, width=256):
        def first():
            if kind == "fc2":
                gather_down(h, w2t, idx, bias, res, out=out)
            else:
                head_gather_down(a, wo_t, hidx, 128, bias, res, out=out)

        def second():
            if succ == "qkv":  # the real next kernel; PDL off by name for it alone
                if not pdl:
                    C.PDL_EXCLUDE.add("_gather_rows_kernel")
                head_gather_gemv(x, wqkv, qidx, 128, validate=False)
                C.PDL_EXCLUDE.discard("_gather_rows_kernel")
            elif succ:
                _waiter[(succ,)](buf, buf.numel(), PDL=pdl, WIDTH=width, num_warps=4, launch_pdl=pdl)

        for _ in range(2):
            first()
            second()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(40):
                first()
                second()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) * 1000 / 40)
        return statistics.median(ts)

    print(torch.cuda.get_device_name())
    for kind in ("fc2", "oproj"):
        print(f"{kind}: A alone {run(kind, 0, False):.1f} us")
        r0, r1 = run(kind, "qkv", False), run(kind, "qkv", True)
        print(f"{kind}: + dense q/k/v gather (960 programs): no PDL {r0:7.1f}  PDL {r1:7.1f} us per pair")
        for n in (132, 528, 2000):
            for width in (256, 8192):
                r0, r1 = run(kind, n, False, width), run(kind, n, True, width)
                print(f"{kind}: + waiter {n:5d} programs, {width:5d}-wide: no PDL {r0:7.1f}  PDL {r1:7.1f} us per pair")


if __name__ == "__main__":
    main()
