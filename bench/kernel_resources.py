"""Registers, shared memory and programs per SM of the decode step's kernels (offline sm_90 compile, no GPU needed).

The B=1 launch configurations of one sparse (0.1, 0.5) OPT-13B layer, as the runtime's heuristics pick them, compiled
with PDL (as launched on Hopper) by this machine's Triton: a middle layer, whose q/k/v gather finishes the MLP block
before it and whose o_proj and MLP block leave their sums unfinished (``defer_mlp_finish``, ``defer_oproj_finish``,
v10); the MLP block also with the register cap of the ``mlp_maxnreg_128`` A/B (bench/NOTES.md, v7) and in the
schedule its rule does not pick here (``mlp_block.one_loop``, v23), and the o_proj and MLP block in one launch
(``kernels.oproj_mlp``, off in the runtime, v25). Prints a table
and writes ``kernel_resources_sm90.json`` to ``--out``.

    PYTHONPATH=src python bench/kernel_resources.py --out results/bench/profile
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from dejavu.atomic import write_text_atomic
from dejavu.kernels import decode_attention as A
from dejavu.kernels import gather_mlp as G
from dejavu.kernels import mlp_block as MB
from dejavu.kernels import oproj_block as OM
from dejavu.kernels import predictor_ops as P
from dejavu.kernels._checks import cdiv, next_pow2
from dejavu.kernels.offline import compile_for, programs_per_sm, resources

F16, F32, I32, I64, U8 = torch.float16, torch.float32, torch.int32, torch.int64, torch.uint8
D, FFN, H, HD, S = 5120, 20480, 40, 128, 256  # OPT-13B, cache of 256 positions
KH, KM, R = H // 2, FFN // 10, 320  # (0.1, 0.5); predictor rank d/16


def cases():
    cpu = torch.device("cpu")
    rows = G._rows_config(1, 3 * KH * HD, D, False, cpu)
    cap = {"maxnreg": rows.pop("maxnreg")} if "maxnreg" in rows else {}  # a launch option, as the launcher passes it
    yield "q/k/v gather", G._gather_rows_kernel, dict(
        x_ptr=F16, w_ptr=F16, w2_ptr=F16, idx_ptr=I64, bias_ptr=F32, out_ptr=F16, g_ptr=F16, rg_ptr=F32, xs_ptr=F32,
        xb_ptr=F16, xr_ptr=F16, xo_ptr=F16, xob_ptr=F16, B=1, n_out=3 * KH * HD, D=D, eps=1e-5, stride_xb=D,
        stride_xd=1, stride_wn=D, stride_w2n=D, stride_ob=3 * KH * HD, stride_xr=D, ROWS_PER_IDX=HD, ACT=0, NORM=1,
        HAS_BIAS=True, DOT_FP32=False, X_SUM=True, HAS_XB=True, X_OUT2=False, HAS_XOB=False,
        PREWAIT=True, **rows), cap  # (prewait_gathers="rows": every layer's but layer 0's, v28)
    attn = A._attn_config(1, KH, S, HD, 2, cpu, None)
    yield "decode attention (fused q/k/v finish)", A._decode_attn_kernel, dict(
        q_ptr=F16, k_ptr=F16, v_ptr=F16, seq_lens_ptr=I64, head_idx_ptr=I64, out_ptr=F16, part_o_ptr=F32,
        part_lse_ptr=F32, valid_ptr=U8, kvidx_ptr=I64, cos_ptr=F16, sin_ptr=F16, KH=KH, KKV=KH, NJ=KH,
        H_KV=H, HD=HD, group_size=1, qk_scale=0.1, stride_qb=3 * KH * HD, stride_qh=HD, stride_kb=H * S * HD,
        stride_kh=S * HD, stride_ks=HD, stride_vb=H * S * HD, stride_vh=S * HD, stride_vs=HD, stride_ob=KH * HD,
        stride_oh=HD, stride_mb=H * S, stride_mh=S, stride_cb=HD, BLOCK_KV=64, BLOCK_KQ=32, HAS_VALID=True,
        FROM_QKV=True, HAS_ROPE=False, PREWAIT=True, **attn), {}
    down = G._down_config(1, KH * HD, D, cpu, None)
    splits, rps, _ = down.pop("splits"), down.pop("rows_per_split"), down.pop("fused")
    yield "o_proj (head_gather_down)", G._gather_down_kernel, dict(
        h_ptr=F16, w_ptr=F16, idx_ptr=I64, bias_ptr=F16, res_ptr=F16, out_ptr=F32, out2_ptr=F16, bias2_ptr=F16,
        part_ptr=F32, cnt_ptr=I32, zero_ptr=F32, B=1, n_in=KH * HD, D=D, rows_per_split=rps, n_splits=splits,
        n_zero=D, stride_hb=KH * HD, stride_hg=HD, stride_hr=1, stride_wn=D, stride_rb=D, stride_ob=D, stride_o2b=D,
        ROWS_PER_IDX=HD, HAS_BIAS=False, HAS_RES=False, OUT2=False, HAS_BIAS2=False, WRITE_PARTIAL=False,
        FUSED_REDUCE=False, FENCE=False, ACCUMULATE=True, ZERO=True, BLOCK_S=1, BLOCK_R=1,
        PREWAIT=True, BLOCK_Z=next_pow2(cdiv(D, splits * cdiv(D, down["BLOCK_D"]))), DOT_FP32=False, **down), {}
    mlp = MB._mlp_config(1, KM, D, False, cpu)
    mlp_args = dict(
        x_ptr=F16, w1_ptr=F16, w3_ptr=F16, w2t_ptr=F16, idx_ptr=I64, b1_ptr=F32, b2_ptr=F16, res_ptr=F16, out_ptr=F16,
        acc_ptr=F32, cnt_ptr=I32, g_ptr=F16, rg_ptr=F32, zero_ptr=F32, xs_ptr=F32, xb_ptr=F16, xr_ptr=F16, B=1, K=KM,
        D=D, eps=1e-5, n_zero=D, stride_xb=D, stride_xd=1, stride_w1n=D, stride_w3n=D, stride_w2n=D, stride_rb=D,
        stride_ob=D, stride_xr=D, ACT=1, NORM=1, HAS_B1=True, HAS_B2=False, HAS_RES=False, DOT_FP32=False,
        FENCE=False, FINISH=False, ZERO=True, BLOCK_Z=next_pow2(cdiv(D, cdiv(KM, mlp["BLOCK_N"]))), X_SUM=True,
        HAS_XB=True, PREWAIT=False, **mlp)
    yield f"MLP block (sparse_mlp), {'one loop' if mlp['ONE_LOOP'] else 'two loops'}", MB._sparse_mlp_kernel, \
        mlp_args, {}
    yield "MLP block, maxnreg=128", MB._sparse_mlp_kernel, mlp_args, {"maxnreg": 128}
    if mlp["ONE_LOOP"]:  # also the schedule the rule picks for more programs than SMs (bench/NOTES.md v23)
        saved, MB.ONE_LOOP = MB.ONE_LOOP, False
        try:
            two = MB._mlp_config(1, KM, D, False, cpu)
        finally:
            MB.ONE_LOOP = saved
        yield "MLP block, two loops", MB._sparse_mlp_kernel, dict(mlp_args, **two), {}
    items = OM._oproj_items(KH * HD, D, OM._items_target(cdiv(KM, mlp["BLOCK_N"]), cpu))
    yield "o_proj + MLP block (oproj_mlp)", OM._oproj_mlp_kernel, dict(
        mlp_args, a_ptr=F16, wo_ptr=F16, hidx_ptr=I64, sums_ptr=F32, zo_ptr=F32, tick_ptr=I32, n_in=KH * HD,
        rows_per_split=items["rows_per_split"], n_od=items["n_od"], n_o=items["n_o"], n_zo=D, stride_ab=KH * HD,
        stride_ag=HD, stride_ar=1, stride_won=D, HEAD_DIM=HD, BLOCK_J=items["BLOCK_J"], BLOCK_DO=items["BLOCK_DO"],
        BLOCK_ZO=next_pow2(cdiv(D, items["n_o"])), ZERO_O=True, STAGES_O=OM.O_STAGES, SPIN=True,
        PERSISTENT=OM.PERSISTENT, FENCE=True), \
        {"maxnreg": OM.MAXNREG} if OM.MAXNREG else {}
    # the head scores from the head predictor's product on x (runs_as_product: model dtype, int8 sets too); the MLP
    # predictor's first factor on x; its neuron scores on that (OPT-13B's tuned 32 rows a program)
    for name, n, d, kind, int8s in (("head scores (product)", H, D, "product", (False,)),
                                    ("MLP predictor first factor", R, D, "first", (False, True)),
                                    ("neuron scores", FFN, R, "scores", (False, True))):
        for int8 in int8s:
            on_x, scores = kind != "scores", kind != "first"
            yield name + (", int8 rows" if int8 else ""), P._lowrank_gemv_kernel, dict(
                x_ptr=F16 if on_x else F32, w_ptr=torch.int8 if int8 else F16, scale_ptr=F32, bias_ptr=F16,
                out_ptr=F16 if scores else F32, hist_ptr=I32, B=1, N=n, D=d, stride_xb=d, stride_wn=d, stride_ob=n,
                eps=1e-6, NORM=on_x, SCALE=int8, HAS_BIAS=scores, BATCH_MAX=scores, HIST=kind == "scores",
                LOOP=False, **P._gemv_config(1, n, d)), {}
    yield "radix select", P._radix_select_kernel, dict(
        s_ptr=F16, hist_ptr=I32, cnt_ptr=I32, out_ptr=I64, N=FFN, k=KM, copy_off=0, n_prog=FFN // 1024, COPIES=1,
        BINS=P.HIST_BINS, SUB=16, CHUNK=1024, SHARE=256, NUM_STAGES=1, num_warps=4), {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = []
    for name, kernel, kargs, opts in cases():
        kargs = dict(kargs, PDL=True)
        warps, stages = kargs.pop("num_warps"), kargs.pop("NUM_STAGES")
        if "NUM_STAGES" in kernel.arg_names:
            kargs["NUM_STAGES"] = stages
        res = resources(compile_for(kernel, kargs, warps, stages, launch_pdl=True, **opts))
        rows.append({"kernel": name, "triton_name": kernel.__name__, "warps": warps, **res, **opts,
                     **programs_per_sm(res["regs"], warps, res["smem"])})
        r = rows[-1]
        print(f"{name:40s} {warps} warps  {r['regs']:3d} regs  {r['stack']:3d} B stack  {r['smem']:6d} B smem  -> "
              f"{r['programs']} per SM (regs {r['by_regs']}, warps {r['by_warps']}, smem {r['by_smem']})")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernel_resources_sm90.json")
    write_text_atomic(path, json.dumps({"target": "sm_90", "triton": triton.__version__, "torch": torch.__version__,
                                        "command": "PYTHONPATH=src python bench/kernel_resources.py --out DIR",
                                        "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
