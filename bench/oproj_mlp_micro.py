"""The o_proj and the sparse MLP block in one launch (kernels.oproj_mlp) against the two launches, as the step runs
them (GPU diagnostic for bench/NOTES.md v25).

A chain of 12 layers (distinct weights per layer, so HBM and not L2) of the unfinished o_proj
(``head_gather_down(finish=False)``) and the fused MLP block making x from its sums (``sparse_mlp(x_sum=...)``), each
o_proj clearing the sums of the one before it as in the step, is captured in one CUDA graph per variant and replayed;
per layer: the median replay time / 12 against the bytes' roofline (copy bandwidth measured in the same run). Alone,
without the step's attention before it, its predictors beside it and the next q/k/v gather after it. Variants: the
pair, each half alone, and the fused launch in its forms (``oproj_block.PERSISTENT``, ``MAXNREG``, ``O_COLS``).
Batch 1, fp16, (MLP, head) density (0.1, 0.5).

    PYTHONPATH=src python bench/oproj_mlp_micro.py --out $OUT/micro [--shapes opt-13b,opt-30b]
"""

from __future__ import annotations

import argparse
import os

import torch
from mlp_micro import graph_ms

from dejavu import kernels as K
from dejavu.atomic import write_json_atomic
from dejavu.bench.kernel_sweep import measure_copy_bandwidth
from dejavu.bench.report import slug
from dejavu.kernels import oproj_block as OB

SHAPES = {"opt-13b": (5120, 20480, 40), "opt-30b": (7168, 28672, 56), "opt-6.7b": (4096, 16384, 32)}  # d, N, H
HD, LAYERS, MLP_DENSITY, HEAD_DENSITY = 128, 12, 0.1, 0.5
FORMS = [("fused (default: persistent)", ()), ("fused, ticketed", ((OB, "PERSISTENT", False),)),
         ("fused, ticketed, 128 registers", ((OB, "PERSISTENT", False), (OB, "MAXNREG", 128))),
         ("fused, persistent, 128 registers", ((OB, "MAXNREG", 128),)),
         ("fused, persistent, 1024 columns", ((OB, "O_COLS", 1024),))]


def _timed(fn, knobs=()) -> float:
    """us a layer of ``fn``'s graph, the knobs set while it is captured."""
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in knobs]
    try:
        for mod, name, value in knobs:
            setattr(mod, name, value)
        return graph_ms(fn) * 1e3 / LAYERS
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="opt-13b,opt-30b", help=f"comma-separated subset of {sorted(SHAPES)}")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    bw = measure_copy_bandwidth(dev)
    res = {"gpu": torch.cuda.get_device_name(), "copy_bw_gbps": bw / 1e9, "layers": LAYERS,
           "point": [MLP_DENSITY, HEAD_DENSITY], "command": "PYTHONPATH=src python bench/oproj_mlp_micro.py --out DIR",
           "shapes": {}}  # fmt: skip
    gen = torch.Generator(device=dev).manual_seed(0)
    for name in args.shapes.split(","):
        d, n, heads = SHAPES[name]
        kh, km = round(HEAD_DENSITY * heads), round(MLP_DENSITY * n)

        def rnd(*shape, scale=0.02):
            return torch.randn(*shape, device=dev, dtype=torch.float16, generator=gen) * scale

        lay = [(rnd(heads * HD, d), rnd(n, d), rnd(n, d), torch.randperm(heads, device=dev, generator=gen)[:kh],
                torch.randperm(n, device=dev, generator=gen)[:km]) for _ in range(LAYERS)]  # fmt: skip
        a, x_res, b1 = rnd(1, kh, HD, scale=1.0), rnd(1, d, scale=1.0), rnd(n, scale=0.1)
        sums = [torch.zeros(1, d, device=dev) for _ in range(2)]
        mid, out, ws = torch.zeros_like(x_res), torch.zeros_like(x_res), K.mlp_workspace(d, dev, 1)

        def oproj(l):
            wo_t, _, _, hidx, _ = lay[l]
            K.head_gather_down(a, wo_t, hidx, HD, out=sums[l % 2], finish=False, zero=sums[(l + 1) % 2].view(-1),
                               validate=False, prewait=True)  # fmt: skip

        def mlp(l):
            _, w1, w2t, _, nidx = lay[l]
            K.sparse_mlp(mid, w1, w2t, nidx, b1, None, mid, out=out, workspace=ws,
                         x_sum=K.XSum(sums[l % 2], None, x_res), validate=False)  # fmt: skip

        def pair():
            for l in range(LAYERS):
                oproj(l)
                mlp(l)

        def fused():
            for l in range(LAYERS):
                wo_t, w1, w2t, hidx, nidx = lay[l]
                K.oproj_mlp(a, wo_t, hidx, HD, sums[l % 2], mid, w1, w2t, nidx, b1, None, mid, x_res=x_res, out=out,
                            workspace=ws, zero_o=sums[(l + 1) % 2].view(-1), validate=False)  # fmt: skip

        o_bytes, m_bytes = kh * HD * d * 2, 2 * km * d * 2
        rows = {"d": d, "k_heads": kh, "k_mlp": km, "roofline_us": {
            "o_proj": o_bytes / bw * 1e6, "mlp": m_bytes / bw * 1e6, "both": (o_bytes + m_bytes) / bw * 1e6},
            "records": []}  # fmt: skip
        cands = [("pair", pair, ()), ("o_proj alone", lambda: [oproj(l) for l in range(LAYERS)], ()),
                 ("MLP block alone", lambda: [mlp(l) for l in range(LAYERS)], ())]
        cands += [(label, fused, knobs) for label, knobs in FORMS] + [("pair, again", pair, ())]
        for label, fn, knobs in cands:
            us = _timed(fn, knobs)
            rows["records"].append({"variant": label, "us_per_layer": round(us, 2)})
            print(f"{name} {label:40s} {us:7.2f} us/layer", flush=True)
        res["shapes"][name] = rows
        lay.clear()
        torch.cuda.empty_cache()
    write_json_atomic(os.path.join(args.out, f"oproj_mlp_micro_{slug(torch.cuda.get_device_name())}.json"), res,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
