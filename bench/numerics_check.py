"""How far are the fp16 decode paths from an fp32 reference, next to torch's own fp16 forward? (GPU diagnostic)

Random-weight OPT (default opt-6.7b shape, so that an fp32 copy fits beside the fp16 model). The fp32 model's greedy
decode (model.forward with a KV cache) is the reference; every fp16 path decodes the same tokens, and per step the
error is max |logits - ref| / max |ref|. The yardstick (flash-attention idiom) is the fp16 model.forward itself: a
fused kernel that rounds differently is fine when its error is of the same size. Paths: ours-dense as shipped (the
q/k/v finish inside the decode attention, the attention's projections and the up projection as gathers over every
row), with ``qkv_post`` + attention + combine kernels (``fuse_attn=False``), with the MLP as a norm kernel and cuBLAS
GEMVs (``dense_mlp="cublas"``), and with the attention's projections by cuBLAS (``dense_attn="cublas"``).
The sparse kernels at the model's shapes (layer 0): the o_proj of half of the heads and ``sparse_mlp`` at 10% of the
neurons, each against an fp32 reference from the same fp16 inputs, next to torch fp16.

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
    for name, kw in {"ours-dense (fused attention)": {},
                     "ours-dense (qkv_post + attention + combine)": dict(fuse_attn=False),
                     "ours-dense (cuBLAS MLP)": dict(dense_mlp="cublas"),
                     "ours-dense (cuBLAS attention)": dict(dense_attn="cublas")}.items():
        dec = FastDecoder(m16, None, batch=1, max_len=T + n + 1, kv_policy="all", **kw)
        dec.prefill(ids)
        res["paths"][name] = [rel(dec.decode_step(toks[t]), ref[t + 1]) for t in range(n)]
        del dec
    for name, errs in res["paths"].items():
        print(f"{name:48s} max rel {max(errs):.2e}  per step {' '.join(f'{e:.1e}' for e in errs)}", flush=True)
    res["kernels"] = kernels_at_scale(m16, T + n)
    for name, e in res["kernels"].items():
        print(f"{name:48s} rel {e:.2e}", flush=True)
    write_json_atomic(os.path.join(args.out, f"numerics_{args.model}.json"), res, indent=1)


@torch.no_grad()
def kernels_at_scale(m, seq_len: int) -> dict:
    """Relative error (max |out - ref| / max |ref|, ref in fp32 from the same fp16 inputs) of the sparse o_proj and
    MLP block at layer 0's real shapes, next to the same computation in torch fp16."""
    from dejavu import kernels as K

    s, blk, dev = m.spec, m.layers[0], m.device
    g = torch.Generator(device=dev).manual_seed(0)
    B, H, hd, d = 1, s.n_heads, s.head_dim, s.d_model
    heads = torch.randperm(H, generator=g, device=dev)[:H // 2]
    q = torch.randn(B, H // 2, hd, generator=g, device=dev).half()
    kc = torch.randn(B, s.n_kv_heads, seq_len, hd, generator=g, device=dev).half()
    vc = torch.randn_like(kc)
    lens = torch.full((B,), seq_len, dtype=torch.int32, device=dev)
    x = torch.randn(B, d, generator=g, device=dev).half()

    def rel(a, r):
        return ((a.float() - r).abs().max() / r.abs().max()).item()

    out = {}
    a = K.sparse_decode_attention(q, kc, vc, lens, heads, s.group_size)
    wo_t, bo = blk.attn.wo_t, blk.attn.bo
    ref = K.head_gather_down_ref(a.float(), wo_t.float(), heads, hd, None if bo is None else bo.float(), x.float())
    out["o_proj (head_gather_down)"] = rel(K.head_gather_down(a, wo_t, heads, hd, bo, x), ref)
    out["o_proj torch fp16"] = rel(K.head_gather_down_ref(a, wo_t, heads, hd, bo, x), ref)
    mlp = blk.mlp
    idx = torch.randperm(s.ffn_dim, generator=g, device=dev)[:s.ffn_dim // 10]
    f32 = [None if t is None else t.float() for t in (mlp.w1, mlp.w2t, mlp.b1, mlp.b2, mlp.w3)]
    ref = K.sparse_mlp_ref(x.float(), f32[0], f32[1], idx, f32[2], f32[3], x.float(), w3=f32[4])
    ws = K.mlp_workspace(d, dev, B)
    out["sparse_mlp (block kernel)"] = rel(K.sparse_mlp(x, mlp.w1, mlp.w2t, idx, mlp.b1, mlp.b2, x, w3=mlp.w3,
                                                        workspace=ws), ref)
    out["sparse_mlp torch fp16"] = rel(K.sparse_mlp_ref(x, mlp.w1, mlp.w2t, idx, mlp.b1, mlp.b2, x, w3=mlp.w3), ref)
    return out


if __name__ == "__main__":
    main()
