"""The sparse MLP block in one launch (kernels.sparse_mlp) against the up + down gather pair, as the step runs them
(GPU diagnostic for bench/NOTES.md).

A chain of 40 layers' MLP blocks (distinct weights per layer, so HBM and not L2; x_{l+1} = block_l(x_l)) is captured
in one CUDA graph per variant and replayed; per layer: median replay time / 40, against the bytes' roofline (copy
bandwidth measured in the same run). Variants: the two gathers, the fused block at its default tiles and at a
few alternatives (``--alt tiles``: neurons per program, slab width, stages, warps; ``--alt epilogue``: the width of
the last program's epilogue steps; ``--alt stages``: pipeline depth and chunk widths; ``--alt dot``: the tensor-core
path at B = 1, the batch padded to 16; ``--alt warps``: 16 warps a program; ``--alt none``), and at density 1 the
dense runtime's cuBLAS MLP. Batch 1, fp16, densities ``--densities`` (default 0.1), shapes
``--shapes``.

    PYTHONPATH=src python bench/mlp_micro.py --out $OUT/mlp [--alt epilogue] [--shapes opt-13b,opt-30b]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from dejavu import kernels as K
from dejavu.atomic import write_json_atomic
from dejavu.bench.report import slug
from dejavu.bench.kernel_sweep import measure_copy_bandwidth
from dejavu.kernels import mlp_block as MB

SHAPES = {"opt-13b": (5120, 20480, False), "llama-2-7b": (4096, 11008, True),
          "opt-30b": (7168, 28672, False)}  # d, N, SwiGLU
LAYERS = 40
ALT = [dict(BLOCK_N=n, BLOCK_O=o, NUM_STAGES=st, num_warps=w)
       for n, o, st, w in [(8, 256, 3, 4), (16, 256, 3, 4), (32, 256, 3, 4), (16, 512, 3, 4), (16, 128, 3, 4),
                           (16, 256, 2, 4), (16, 256, 4, 4), (32, 256, 3, 8), (16, 512, 3, 8)]]
ALTS = {"tiles": ALT, "epilogue": [dict(BLOCK_F=f) for f in (1024, 2048, 4096, 8192)],
        "stages": [dict(NUM_STAGES=st, BLOCK_D=bd, BLOCK_O=bo) for st, bd, bo in
                   [(2, 512, 512), (4, 512, 512), (5, 512, 512), (4, 256, 1024), (6, 256, 256), (4, 1024, 512)]],
        "dot": [dict(BLOCK_B=16, BLOCK_N=n, BLOCK_D=bd, BLOCK_O=bo, BLOCK_F=512, USE_DOT=True, NUM_STAGES=st,
                     num_warps=w)
                for n, bd, bo, st, w in [(16, 128, 128, 3, 4), (16, 256, 256, 3, 4), (16, 512, 512, 3, 4),
                                         (16, 256, 256, 4, 8), (32, 256, 256, 3, 4), (16, 512, 512, 3, 8),
                                         (32, 512, 512, 3, 8), (16, 128, 512, 4, 4)]],
        "warps": [dict(BLOCK_N=n, BLOCK_D=bd, BLOCK_O=bo, NUM_STAGES=st, num_warps=w)
                  for n, bd, bo, st, w in [(16, 512, 512, 4, 16), (16, 256, 512, 4, 16), (32, 512, 512, 4, 16),
                                           (16, 1024, 512, 4, 16), (16, 512, 1024, 4, 16), (16, 512, 512, 3, 16)]],
        "none": []}


def graph_ms(fn, reps: int = 30) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    for i in range(reps):
        ev[i].record()
        g.replay()
    ev[reps].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(ev, ev[1:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--densities", default="0.1", help="comma-separated MLP densities")
    ap.add_argument("--alt", default="tiles", choices=sorted(ALTS), help="which alternative configs to time too")
    ap.add_argument("--shapes", default="opt-13b,llama-2-7b", help=f"comma-separated subset of {sorted(SHAPES)}")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    bw = measure_copy_bandwidth(dev)
    densities = [float(v) for v in args.densities.split(",")]
    res = {"gpu": torch.cuda.get_device_name(), "copy_bw_gbps": bw / 1e9, "densities": densities, "shapes": {}}
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    for (name, (d, n, swiglu)), density in ((s, dd) for s in shapes.items() for dd in densities):
        k = max(1, round(density * n))
        mats = 3 if swiglu else 2
        w = [[torch.randn(n, d, device=dev, dtype=torch.float16, generator=gen) * 0.02 for _ in range(mats)]
             for _ in range(LAYERS)]
        b1 = None if swiglu else torch.randn(n, device=dev, dtype=torch.float16, generator=gen) * 0.02
        idx = [torch.randperm(n, device=dev, generator=gen)[:k] for _ in range(LAYERS)]
        xs = [torch.randn(1, d, device=dev, dtype=torch.float16, generator=gen) for _ in range(LAYERS + 1)]
        ws = K.mlp_workspace(d, dev, 1)

        def pair():
            for l in range(LAYERS):
                wl = w[l]
                h = K.gather_swiglu(xs[l], wl[0], wl[2], idx[l], validate=False) if swiglu else \
                    K.gather_up(xs[l], wl[0], idx[l], b1, "relu", validate=False)
                K.gather_down(h, wl[1], idx[l], None, xs[l], validate=False, out=xs[l + 1])

        def cublas():  # the dense runtime's MLP (density 1): cuBLAS GEMVs, the activation, addmm with the residual
            for l in range(LAYERS):
                wl = w[l]
                if swiglu:
                    act = torch.nn.functional.silu(torch.nn.functional.linear(xs[l], wl[0])) * \
                        torch.nn.functional.linear(xs[l], wl[2])
                else:
                    act = torch.nn.functional.linear(xs[l], wl[0], b1).relu_()
                torch.addmm(xs[l], act, wl[1], out=xs[l + 1])

        def fused():
            for l in range(LAYERS):
                wl = w[l]
                K.sparse_mlp(xs[l], wl[0], wl[1], idx[l], b1, None, xs[l], w3=wl[2] if swiglu else None,
                             workspace=ws, validate=False, out=xs[l + 1])

        roof_us = mats * k * d * 2 / bw * 1e6
        rows = {"roofline_us": roof_us, "k": k, "records": []}
        orig = MB._mlp_config
        cands = [("pair", pair, None), ("fused", fused, None)] + \
            ([("cublas dense", cublas, None)] if k == n else []) + \
            [(f"fused {c}", fused, c) for c in ALTS[args.alt]]
        for label, fn, cfg in cands:
            try:
                if cfg is not None:
                    MB._mlp_config = lambda *a, cfg=cfg: {**orig(*a), **cfg}
                us = graph_ms(fn) * 1e3 / LAYERS
                rows["records"].append({"variant": label, "us_per_layer": us, "x_roof": us / roof_us})
                print(f"{name} {density} {label:60s} {us:7.2f} us/layer  x{us / roof_us:.2f} roof", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                rows["records"].append({"variant": label, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            finally:
                MB._mlp_config = orig
        res["shapes"][f"{name} {density}"] = rows
        w.clear()  # free this shape's weights before the next
        torch.cuda.empty_cache()
    write_json_atomic(os.path.join(args.out, f"mlp_micro_{slug(torch.cuda.get_device_name())}.json"), res, indent=1)


if __name__ == "__main__":
    main()
