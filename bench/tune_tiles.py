"""Tile A/B for the two gather kernels at the decode step's real shapes (GPU diagnostic for bench/NOTES.md).

The launchers take their tiles from ``gather_mlp._rows_config`` / ``_down_config`` (plain module-level heuristics);
this script swaps in candidate configs one at a time and times each case with CUDA-graph replay over rotated weight
copies (HBM, not L2), as the kernel sweep does. Cases (batch 1, fp16) are what one sparse (0.1, 0.5) layer of OPT-13B
/ OPT-30B launches: the fused q/k/v head gather, gather_up (fc1), the o_proj head_gather_down and gather_down (fc2).

    PYTHONPATH=src python bench/tune_tiles.py --out $OUT/tiles [--family dot] [--cases 13b.o(20 heads),...]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from dejavu import kernels as K
import triton.testing

from dejavu.bench.kernel_sweep import _copies_needed, _rotating, measure_copy_bandwidth
from dejavu.kernels import gather_mlp as GM
from dejavu.kernels._checks import cdiv, num_sms

CASES = {  # name: (kind, d, rows per index, selected indices, total indices)
    "13b.qkv(60 heads)": ("rows", 5120, 128, 60, 120),
    "13b.fc1(2048)": ("rows", 5120, 1, 2048, 20480),
    "13b.o(20 heads)": ("down", 5120, 128, 20, 40),
    "13b.fc2(2048)": ("down", 5120, 1, 2048, 20480),
    "30b.fc1(2867)": ("rows", 7168, 1, 2867, 28672),
    "30b.o(28 heads)": ("down", 7168, 128, 28, 56),
    "30b.fc2(2867)": ("down", 7168, 1, 2867, 28672),
}


def rows_configs(family: str = "fma"):
    if family == "dot":  # the tensor-core path at B = 1 (the batch padded to 16 rows of zeros)
        return [dict(BLOCK_B=16, BLOCK_K=bk, BLOCK_D=bd, USE_DOT=True, NUM_STAGES=st, num_warps=w)
                for bk, bd, w, st in [(16, 128, 4, 4), (32, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 4),
                                      (16, 512, 4, 3), (64, 128, 4, 4), (32, 256, 8, 4), (16, 256, 4, 5),
                                      (16, 256, 8, 4), (64, 256, 8, 3)]]
    out = []
    for bk, bd, w in [(4, 512, 4), (8, 512, 4), (8, 256, 4), (16, 256, 4), (16, 512, 8), (8, 1024, 8), (4, 1024, 4),
                      (2, 1024, 4)]:
        for st in (3, 4):
            out.append(dict(BLOCK_B=1, BLOCK_K=bk, BLOCK_D=bd, USE_DOT=False, NUM_STAGES=st, num_warps=w))
    return out


def down_configs(family: str = "fma"):
    if family == "dot":
        return [dict(BLOCK_B=16, BLOCK_J=bj, BLOCK_D=bd, USE_DOT=True, NUM_STAGES=st, num_warps=w, spm=spm)
                for bj, bd, w, st, spm in [(64, 128, 4, 4, 2), (32, 128, 4, 4, 2), (64, 256, 4, 4, 2),
                                           (32, 256, 4, 4, 2), (128, 128, 4, 4, 2), (64, 128, 4, 4, 1),
                                           (64, 256, 8, 4, 2), (16, 256, 4, 4, 2), (64, 128, 4, 4, 4),
                                           (32, 512, 8, 3, 2)]]
    out = []
    for bj, bd, w in [(32, 256, 4), (16, 512, 4), (64, 128, 4), (32, 512, 8), (64, 256, 8), (16, 256, 4),
                      (8, 512, 4)]:
        for st in (3, 4):
            for spm in (1, 2, 4):
                out.append(dict(BLOCK_B=1, BLOCK_J=bj, BLOCK_D=bd, USE_DOT=False, NUM_STAGES=st, num_warps=w,
                                spm=spm))
    return out


def down_factory(cfg):
    def f(batch, n_in, d, device, split_k):
        c = dict(cfg)
        spm = c.pop("spm")
        n_d = cdiv(d, c["BLOCK_D"])
        split = max(1, min(cdiv(spm * num_sms(device), n_d), cdiv(n_in, 2 * c["BLOCK_J"])))
        rps = cdiv(cdiv(n_in, split), c["BLOCK_J"]) * c["BLOCK_J"]
        return dict(c, splits=cdiv(n_in, rps), rows_per_split=rps, fused=True)
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--family", default="fma", choices=("fma", "dot"),
                    help="candidate tiles: the CUDA-core FMA path or the tensor-core path (batch padded to 16)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    bw = measure_copy_bandwidth(dev)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    res = {"gpu": torch.cuda.get_device_name(), "copy_bw_gbps": bw / 1e9, "cases": {}}
    orig_rows, orig_down = GM._rows_config, GM._down_config
    gen = torch.Generator(device=dev).manual_seed(0)
    for name in args.cases.split(","):
        kind, d, R, k, n = CASES[name]
        rows = n * R
        nbytes = k * R * d * 2
        ncop = _copies_needed(nbytes, rows * d * 2, l2, 3 << 30)
        mats = [torch.randn(rows, d, device=dev, dtype=torch.float16, generator=gen) * 0.02 for _ in range(ncop)]
        idx = torch.randperm(n, device=dev, generator=gen)[:k].sort().values
        x = torch.randn(1, d, device=dev, dtype=torch.float16, generator=gen)
        if kind == "rows":
            def make(i):
                return (lambda: K.head_gather_gemv(x, mats[i], idx, R, None, validate=False)) if R > 1 else \
                    (lambda: K.gather_up(x, mats[i], idx, None, "relu", validate=False))
            cands = [None] + rows_configs(args.family)
        else:
            h = torch.randn(1, k, R, device=dev, dtype=torch.float16, generator=gen) if R > 1 else \
                torch.randn(1, k, device=dev, dtype=torch.float16, generator=gen)

            def make(i):
                return (lambda: K.head_gather_down(h, mats[i], idx, R, None, x, validate=False)) if R > 1 else \
                    (lambda: K.gather_down(h, mats[i], idx, None, x, validate=False))
            cands = [None] + down_configs(args.family)
        roof = nbytes / bw * 1e6
        rec = []
        for c in cands:
            try:
                if kind == "rows":
                    GM._rows_config = orig_rows if c is None else (lambda *a, c=c: dict(c))
                else:
                    GM._down_config = orig_down if c is None else down_factory(c)
                fn = _rotating(make, ncop)
                fn()
                torch.cuda.synchronize()
                g_us = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
                rec.append({"cfg": "current" if c is None else c, "graph_us": g_us, "x_roof": g_us / roof})
            except Exception as e:  # noqa: BLE001 - a config that does not compile is just skipped
                rec.append({"cfg": c, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            finally:
                GM._rows_config, GM._down_config = orig_rows, orig_down
        ok = sorted([r for r in rec if "graph_us" in r], key=lambda r: r["graph_us"])
        res["cases"][name] = {"roofline_us": roof, "records": rec}
        cur = next(r for r in rec if r["cfg"] == "current")
        print(f"== {name}: roofline {roof:.2f} us, current {cur.get('graph_us', float('nan')):.2f} us", flush=True)
        for r in ok[:4]:
            print(f"   {r['graph_us']:7.2f} us  x{r['x_roof']:.2f}  {r['cfg']}")
        mats.clear()  # free the weight copies before the next case
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, f"tune_tiles_{args.family}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
