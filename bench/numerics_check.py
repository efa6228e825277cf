"""How far are the fp16 decode paths from an fp32 reference, next to torch's own fp16 forward? (GPU diagnostic)

Random-weight OPT (default opt-6.7b shape, so that an fp32 copy fits beside the fp16 model). The fp32 model's greedy
decode (model.forward with a KV cache) is the reference; every fp16 path decodes the same tokens, and per step the
error is max |logits - ref| / max |ref|. The yardstick (flash-attention idiom) is the fp16 model.forward itself: a
fused kernel that rounds differently is fine when its error is of the same size. Paths: ours-dense with the MLP
block kernel (the default at B <= 2), with cuBLAS MLP GEMVs (``fuse_mlp=False``), and with the norms as kernels.

    PYTHONPATH=src python bench/numerics_check.py --out $OUT/numerics [--model opt-6.7b] [--steps 8]
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from dejavu.atomic import write_json_atomic
from dejavu.bench.decode import bench_spec, build_random_model
from dejavu.bench.hf_baseline import prompt_ids
from dejavu.runtime.fast_decode import FastDecoder


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    spec = bench_spec(args.model)
    m16 = build_random_model(spec)
    m32 = copy.deepcopy(m16).float()
    T, n = 32, args.steps
    ids = prompt_ids(spec.vocab_size, 1, T, "cuda", seed=5)
    cache = m32.new_cache(1, T + n + 1)
    ref = [m32(ids, 0, cache, sparsity=None)[:, -1]]
    toks = [ref[0].argmax(-1)]
    for t in range(n):
        ref.append(m32(toks[-1][:, None], T + t, cache, sparsity=None)[:, -1])
        toks.append(ref[-1].argmax(-1))
    del m32, cache
    torch.cuda.empty_cache()

    def rel(a, r):
        return ((a.float() - r).abs().max() / r.abs().max()).item()

    res = {"gpu": torch.cuda.get_device_name(), "model": args.model, "steps": n, "paths": {}}
    cache = m16.new_cache(1, T + n + 1)
    m16(ids, 0, cache, sparsity=None)
    res["paths"]["torch fp16 forward"] = [rel(m16(toks[t][:, None], T + t, cache, sparsity=None)[:, -1], ref[t + 1])
                                          for t in range(n)]
    for name, kw in {"ours-dense (MLP block kernel, norms folded)": {},
                     "ours-dense (MLP block kernel, norm kernels)": dict(fuse_norm=False),
                     "ours-dense (cuBLAS MLP)": dict(fuse_mlp=False)}.items():
        dec = FastDecoder(m16, None, batch=1, max_len=T + n + 1, kv_policy="all", **kw)
        dec.prefill(ids)
        res["paths"][name] = [rel(dec.decode_step(toks[t]), ref[t + 1]) for t in range(n)]
        del dec
    for name, errs in res["paths"].items():
        print(f"{name:48s} max rel {max(errs):.2e}  per step {' '.join(f'{e:.1e}' for e in errs)}", flush=True)
    write_json_atomic(os.path.join(args.out, f"numerics_{args.model}.json"), res, indent=1)


if __name__ == "__main__":
    main()
