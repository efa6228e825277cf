"""Where does one graphed decode step spend its time? (GPU diagnostic for bench/NOTES.md)

For OPT-13B-shaped random fp16 weights at batch 1: ours-dense and ours-sparse (0.1, 0.5), plus sparse variants that
isolate one design choice each (``a+b`` combines variants, e.g. ``fork_start+side_pdl_on``):

* ``dense_attn_cublas``: ours-dense with its attention as a norm kernel and cuBLAS q/k/v and o_proj GEMVs
  (``FastDecoder(dense_attn="cublas")``) instead of the sparse path's gathers over every head with the norm folded
  into the q/k/v gather (``dense``);
* ``add_launch``: ours-dense with x_next = mid + b2 (the residual cuBLAS adds fc2 into) made by an elementwise
  launch instead of the o_proj's epilogue (``FastDecoder.oproj_writes_next`` off; only with ``finish_o``, since by
  default the up gather writes it: ``dense+finish_o+add_launch`` against ``dense+finish_o``);
* ``dense_cublas``: ours-dense with its MLP parts as a norm kernel, cuBLAS GEMVs and activation kernels
  (``FastDecoder(dense_mlp="cublas")``) instead of the up projection as a row gather over every neuron with the
  norm folded in (``dense``);
* ``nopred``: selections fixed, predictor calls skipped; ``inline``: lookahead predictors on the main stream;
* ``unfused``: the norms as kernels of their own instead of folded into the gathers; ``fold_forced``: folded norms
  at B > 2 too;
* ``torch_topk``: neuron top-k by torch.topk instead of the radix select; ``radix_torch_hist``: the radix select's
  histogram built by torch ops instead of the scores GEMV's epilogue;
* ``unfused_mlp``: the sparse MLP as the up and down gathers instead of one ``sparse_mlp`` launch;
  ``unfused_attn``: ``qkv_post`` before the decode attention instead of ``qkv_decode_attention``;
  ``epilogue_2048``: the MLP block's last program finishing 2048 columns per step instead of one pass;
* launch heuristics: ``attn_split_<n>`` (attention splits of at least n positions:
  ``decode_attention.SPLIT_MIN_POSITIONS``), ``down_ctas_<n>`` (o_proj's split count aiming at n
  programs per SM: ``gather_mlp.DOWN_PROGRAMS_PER_SM``), ``mlp_maxnreg_128`` (the MLP block capped at 128 registers
  a thread: ``mlp_block.MAXNREG``), ``mlp_cols_<n>`` (the MLP block's down phase in steps of n output columns:
  ``mlp_block.DOWN_COLS``), ``mlp_rows_<n>`` (the MLP block's neurons a program at B <= 2: ``mlp_block.ROWS``),
  ``mlp_one_loop`` / ``mlp_two_loops`` (the MLP block's two phases forced into one pipelined loop, or each in its
  own: ``mlp_block.ONE_LOOP``; by default its rule ``mlp_block.one_loop`` picks),
  ``attn_pipelined`` (the decode attention's tile loop 3 stages deep even where each split holds one tile:
  ``decode_attention.ONE_TILE_UNPIPELINED`` off), ``gemv_cap_<n>`` (the predictors' GEMVs on at most n programs,
  each looping over its row blocks: ``predictor_ops.GEMV_MAX_PROGRAMS``), ``gemv_rows_<n>`` (n rows a program in
  the neuron-scores GEMV: ``predictor_ops.GEMV_LONG_ROWS``), ``gemv_short_<n>`` (n rows a program in the first
  factors' and head scores' GEMVs instead of 4: ``GEMV_SHORT_ROWS``), ``rows_tile_<k>_<d>`` (the q/k/v gather's
  FMA tile at B <= 2: ``gather_mlp.ROWS_FMA_TILE``), ``rows_narrow`` (no 16-row tiles at B = 1:
  ``gather_mlp.ROWS_WIDE`` off, the v8 rule), ``rows_wide_window`` (16-row tiles only where they make 2-4 programs
  per SM, v9-v18's rule: ``gather_mlp.ROWS_WIDE_MAX`` = 4), ``reduce_serial`` (the column gathers' fused split-k
  reduction loading one split's partials per memory round trip, as up to v17: ``gather_mlp.REDUCE_BLOCK_S`` = 1),
  ``reduce_padded_rows`` (that reduction over the tensor-core tile's 16 rows, not the batch's, as up to v18:
  ``gather_mlp.REDUCE_BATCH_ROWS`` off);
* programmatic dependent launch (PDL): ``nopdl_<kernel>`` (one main-stream kernel without it:
  ``kernels._checks.PDL_EXCLUDE``), ``side_pdl_<on|off|first|heads|scores|mlp>`` (the side stream's predictor
  launches with it, or without it for all / the first factors' GEMV / the head scores and top-k / the neuron scores
  GEMV / the neuron scores and top-k: ``FastDecoder.side_pdl``); where a kernel signals its successor's launch
  (``kernels._checks.use_pdl``'s modes): ``signal_exit_<rows|attn|combine|oproj|mlp|gemv>`` (not at all: the
  successor launches as its programs exit, ``PDL_LATE``), ``oproj_signal_after_loop`` (the column gathers after
  their main loop, ``PDL_MID``), ``mlp_signal_early`` (the MLP block right after its wait instead of after its up
  phase: ``mlp_block.SIGNAL_AFTER_UP`` off);
* the side stream: ``fork_<start|qkv|attn|oproj>`` (the prediction of layer l+1 forked at the start of layer l or
  after its q/k/v gather / attention / o_proj: ``FastDecoder.fork_at``; the default at B <= 2 is ``attn`` with
  ``side_pdl_off``, at B > 2 ``start`` with ``side_pdl_on``);
* where a producer's finishing pass runs (default: in its consumer, as it loads the producer's output):
  ``finish_mlp`` (each MLP block adds its bias and residual itself: ``FastDecoder.defer_mlp_finish`` off),
  ``finish_o`` (each o_proj sums its split-k partials itself, instead of the fused MLP block or, in the dense step,
  the up gather: ``FastDecoder.defer_oproj_finish`` off);
* where kernels read their selection and first weight chunk before their PDL wait (``FastDecoder.prewait_gathers``;
  by default the q/k/v gathers but layer 0's, "rows"): ``prewait_gathers`` (the MLP blocks too), ``prewait_rows``
  (the default), ``prewait_mlp`` (only the MLP blocks), ``prewait_off`` (neither, as up to v27);
* the step's start: ``l0_inline`` (layer 0's heads and neurons both chosen on the main stream before its q/k/v
  gather, one stacked first factor: ``FastDecoder.split_first_prediction`` off), ``embed_nopdl`` (the step's
  embedding launched without PDL), ``embed_torch`` (the embedding by torch ops instead of
  ``fused_ops.embed_fused``: lookups and an add, or the RoPE tables built by the model's ``rope()``); its end:
  ``head_cublas`` (the final norm kernel and a cuBLAS LM head instead of one row gather over the vocabulary with the
  norm folded: ``FastDecoder.fold_final_norm`` off);
* ``fma_max_2``: batch 2 on the kernels' CUDA-core FMA paths, with the runtime features built on them, as up to v14
  (``kernels._checks.FMA_MAX_BATCH`` = 2, set while the decoder is built and captured), instead of the tensor-core
  paths of batch > 2;
* stream priorities: ``side_priority_0`` (the side stream at priority 0, the step's, as up to v23:
  ``fast_decode.SIDE_PRIORITY``), ``sparse_high_priority`` (the side stream replaced by one of priority -1 after the
  decoder is built, whatever its MLP blocks; by default only where one runs its capped one loop), ``main_priority``
  (the step captured on a stream of priority -1: ``FastDecoder.capture_priority``);
* ``mlp_v23``: the MLP block's v23 rule, two loops where its programs outnumber the SMs, instead of the one loop
  capped at 128 registers (``mlp_block.ONE_LOOP_MAXNREG`` = None);
* ``pred_int8``: the predictors rounded to int8 rows (``PredictorSet.quantize_int8``), which the step's GEMVs read
  as int8 with an fp32 scale a row (half the predictor bytes); joined to others with '+', name it first;
* ``pred_int8_half_rank``: int8 rows, the MLP predictors at half the rank (d/32): the bytes that int4 rows at rank
  d/16 would read, a proxy for what they could save in the step (not a trained set); name it first too;
* ``pred_factored``: the head predictors scored from their two factors, as up to v26, instead of from their product
  (``fast_decode.PREDICTOR_PRODUCTS`` off while the decoder is built); ``mlp_first_early``: with head products, the
  MLP predictor's first factor before the head product instead of after the head selection
  (``fast_decode.MLP_FIRST_AFTER_HEADS`` off); ``products_b16``: head products at every batch size
  (``fast_decode.PRODUCTS_MAX_BATCH`` = 16; by default up to batch 4);
* ``fuse_tail``: the unfinished o_proj and the MLP block in one launch (``FastDecoder.fuse_oproj_mlp``,
  ``kernels.oproj_mlp``), with its tiles' knobs ``tail_cols_{256,1024}`` (``oproj_block.O_COLS``),
  ``tail_items_{2,3}`` (``O_ITEMS_PER_SM``), ``tail_stages_{2,4}`` (``O_STAGES``), ``tail_cap_128`` (``MAXNREG``),
  ``tail_ticketed`` (``PERSISTENT`` off), joined to it with '+'.

A variant named again (``--variants sparse,X,sparse``) gets a decoder of its own, reported as ``sparse#2``: the first
variant built in a process ran 0.2-1.1% slower than identical later ones (bench/NOTES.md v21), so an A/B compares
against the repeat.

Per variant: median graph-replay time (``--rounds`` interleaved rounds of 60 replays), and a torch.profiler trace of
graph replays, reduced to the kernel time per step by kernel name and stream, the gap (span minus busy time) on the
main stream, and the middle replay's timeline ([kernel, stream, start us, duration us], from its first kernel's
start). With programmatic dependent launch on, a kernel's traced duration includes the time its programs wait for
the previous kernel.

    PYTHONPATH=src python bench/profile_step.py --out $OUT/profile [--model opt-13b] [--variants dense,sparse]
    DEJAVU_PDL=0 ... --tag _pdl0   # the same without programmatic dependent launch
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from dejavu.atomic import write_json_atomic
from dejavu.bench.decode import build_random_model, random_predictors
from dejavu.bench.hf_baseline import prompt_ids
from dejavu.kernels import _checks as C
from dejavu.kernels import decode_attention as DA
from dejavu.kernels import gather_mlp as GM
from dejavu.kernels import mlp_block as MB
from dejavu.kernels import oproj_block as OB
from dejavu.kernels import predictor_ops as PO
from dejavu.kernels.fused_ops import embed_fused, embed_fused_ref
from dejavu.runtime import fast_decode as FD
from dejavu.runtime.fast_decode import FORK_POINTS, SIDE_PDL_OFF, FastDecoder, _TritonOps


def replay_ms(dec: FastDecoder, n: int = 60) -> float:
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    tok = torch.zeros(dec.batch, dtype=torch.long, device="cuda")
    pos0 = dec._pos.clone()
    for i in range(n):
        dec._pos.copy_(pos0)
        ev[i].record()
        dec._graph.replay()
    ev[n].record()
    torch.cuda.synchronize()
    del tok
    return statistics.median(a.elapsed_time(b) for a, b in zip(ev, ev[1:]))


def trace(dec: FastDecoder, steps: int = 5) -> dict:
    pos0 = dec._pos.clone()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec._pos.copy_(pos0)
            dec._graph.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    os.unlink(path)
    ks = [e for e in ev if e.get("cat") == "kernel"]
    if not ks:
        return {"error": "no kernel events in the trace"}
    ks.sort(key=lambda e: e["ts"])
    by_stream = defaultdict(list)
    for e in ks:
        by_stream[e.get("args", {}).get("stream", -1)].append(e)
    main = max(by_stream, key=lambda s: len(by_stream[s]))
    per_name = defaultdict(lambda: [0.0, 0])
    for e in ks:
        key = f"{'main' if e['args'].get('stream') == main else 'side'}:{e['name'][:60]}"
        per_name[key][0] += e["dur"] / steps
        per_name[key][1] += 1 / steps
    m = by_stream[main]
    span = (m[-1]["ts"] + m[-1]["dur"] - m[0]["ts"]) / steps
    busy = sum(e["dur"] for e in m) / steps
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(m, m[1:])]
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:25]
    n = len(ks) // steps  # one replay's kernels (every replay launches the same ones): the middle replay's timeline
    mid = ks[(steps // 2) * n:(steps // 2 + 1) * n]
    t0 = mid[0]["ts"] if mid else 0.0
    timeline = [[e["name"][:40], "main" if e["args"].get("stream") == main else f"s{e['args'].get('stream')}",
                 round(e["ts"] - t0, 2), round(e["dur"], 2)] for e in mid]
    return {"main_span_us": span, "main_busy_us": busy, "main_kernels": len(m) / steps,
            "side_busy_us": sum(e["dur"] for s, es in by_stream.items() if s != main for e in es) / steps,
            "median_gap_us": statistics.median(gaps) if gaps else 0.0,
            "kernels": [{"name": k, "us_per_step": round(v[0], 2), "count": round(v[1], 1)} for k, v in top],
            "timeline": timeline}


class _TorchEmbed(_TritonOps):
    """The Triton ops, but the step's embedding by torch (``embed_torch``: three launches for OPT; for Llama the
    token row's copy and the RoPE tables built by the model's rope(), plus the cat into the step's row)."""

    def embed(self, tok, wte, pos, wpe, out, pos_out=None):
        if pos_out is not None:  # the RoPE tables built per step by the model's rope(), as before the table
            out.copy_(torch.nn.functional.embedding(tok, wte))
            cos, sin = self.model.rope(pos, out.dtype)
            return torch.cat((cos, sin), -1, out=pos_out)
        return embed_fused_ref(tok, wte, pos, wpe, out=out)


class _NoPdlEmbed(_TritonOps):
    """The Triton ops, the step's embedding launched without PDL (``embed_nopdl``)."""

    def embed(self, tok, wte, pos, wpe, out, pos_out=None):
        with C.pdl_suspended():
            return embed_fused(tok, wte, pos, wpe, out=out, pos_out=pos_out)


def _setup(dec: FastDecoder, name: str) -> None:
    """The decoder-side part of variant ``name`` (before prefill and capture)."""
    if name == "nopred":
        dec._predict = lambda *a, **k: None
    if name.startswith("fork_"):  # A/B: where in layer l the side stream forks off to predict layer l+1
        dec.fork_at = name[len("fork_"):]
    if name.startswith("side_pdl_"):  # A/B: which of the side stream's launches skip PDL
        dec.side_pdl = name[len("side_pdl_"):]
    if name == "sparse_high_priority":  # A/B: schedule the predictors' blocks ahead of the main stream's
        dec._side = torch.cuda.Stream(dec.device, priority=-1)
    if name == "main_priority":  # A/B: the main stream's blocks ahead of the predictors' (captured at priority -1)
        dec.capture_priority = -1
    if name == "finish_mlp":  # A/B: each MLP block finishes its own sums (not the next layer's q/k/v gather)
        dec.defer_mlp_finish = False
    if name == "finish_o":  # A/B: each o_proj finishes its own sums (not its layer's MLP block or up gather)
        dec.defer_oproj_finish = False
    if name == "fuse_tail":  # A/B: the unfinished o_proj and the MLP block in one launch (oproj_mlp)
        dec.fuse_oproj_mlp = True
    if name == "prewait_gathers":  # A/B: the q/k/v gathers (but layer 0's) and MLP blocks read early
        dec.prewait_gathers = True
    if name in ("prewait_rows", "prewait_mlp"):  # A/B: only the gathers (the default), or only the blocks
        dec.prewait_gathers = name[len("prewait_"):]
    if name == "prewait_off":  # A/B: no early reads (v27's step)
        dec.prewait_gathers = False
    if name == "torch_topk":  # A/B: the neuron top-k by torch.topk instead of the radix select
        dec._topk = "torch"
    if name == "radix_torch_hist":  # A/B: radix select, its histogram built by torch ops instead of the GEMV
        dec._topk = "radix-torch"
    if name == "l0_inline":  # A/B: layer 0's whole prediction on the main stream, one stacked first factor
        dec.split_first_prediction = False
    if name == "embed_nopdl":  # A/B: the step's embedding launched without PDL
        dec.ops = _NoPdlEmbed()
    if name == "head_cublas":  # A/B: the final norm kernel and a cuBLAS LM head instead of the folded row gather
        dec.fold_final_norm = False
    if name == "embed_torch":  # A/B: the step's embedding as torch lookups and an add instead of one launch
        dec.ops = _TorchEmbed()
        dec.ops.model = dec.model
    if name == "add_launch":  # A/B: the dense MLP part's x_next = mid + b2 by an elementwise launch, not the o_proj
        dec.oproj_writes_next = False
    if name == "fold_forced":  # A/B: folded norms also at B > 2 (the tensor-core path), which the runtime skips
        dec.fuse_norm = True
        dec._fold1, dec._fold2 = dec._fold_norms()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="opt-13b")
    ap.add_argument("--point", default="0.1,0.5")
    ap.add_argument("--variants", default="dense,sparse,nopred,inline",
                    help="comma-separated subset of dense,dense_cublas,dense_attn_cublas,sparse,unfused,nopred,inline,"
                         "sparse_high_priority,torch_topk,fold_forced,radix_torch_hist,unfused_mlp,unfused_attn,"
                         "epilogue_2048,"
                         "attn_split_128,attn_split_256,down_ctas_1,down_ctas_4,"
                         "side_pdl_{on,off,first,heads,scores,mlp},"
                         "nopdl_{rows,attn,combine,oproj,mlp},signal_exit_{rows,attn,combine,oproj,mlp,gemv},"
                         "oproj_signal_after_loop,mlp_signal_early,mlp_maxnreg_128,gemv_cap_{32,64,132,264,396,528},"
                         "gemv_rows_{16,32,64},gemv_short_{2,8},"
                         "rows_tile_{16_256,16_512,8_256},mlp_cols_{256,1024},mlp_rows_{8,32},mlp_one_loop,mlp_two_loops,"
                         "rows_narrow,rows_wide_window,reduce_serial,reduce_padded_rows,fork_{start,qkv,attn,oproj},main_priority,"
                         "finish_mlp,finish_o,"
                         "prewait_gathers,prewait_rows,prewait_mlp,prewait_off,attn_pipelined,"
                         "l0_inline,embed_nopdl,embed_torch,head_cublas,fma_max_2,"
                         "side_priority_0,mlp_v23,fuse_tail,tail_cols_{256,1024},tail_items_{2,3},tail_stages_{2,4},"
                         "tail_cap_128,tail_ticketed,pred_int8 / pred_int8_half_rank (first when joined: its "
                         "predictors),pred_factored,mlp_first_early,products_b16; "
                         "join several with '+'; a variant named again gets a decoder of its own, reported as "
                         "name#2, ... (bench/NOTES.md v21: the first variant built in a process ran 0.2-1.1%% slower "
                         "than identical later ones; name the baseline first and again last)")
    ap.add_argument("--tag", default="", help="suffix of the output file name (e.g. _pdl0 for an A/B run)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per variant (median)")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from dejavu.bench.decode import bench_spec

    md, hd = (float(v) for v in args.point.split(","))
    spec = bench_spec(args.model)
    model = build_random_model(spec)
    preds = random_predictors(model.spec)
    firsts = {v.split("+")[0] for v in args.variants.split(",")}
    preds8 = copy.deepcopy(preds).quantize_int8() if "pred_int8" in firsts else None  # a copy only where asked for
    preds8h = None
    if "pred_int8_half_rank" in firsts:  # the MLP predictors' bytes of int4 rows at rank d/16: rank d/32 as int8
        half = preds.meta["mlp_rank"] // 2
        preds8h = random_predictors(model.spec, mlp_rank=half).quantize_int8()
    ids = prompt_ids(spec.vocab_size, args.batch, 128, "cuda")
    res = {"gpu": torch.cuda.get_device_name(), "model": args.model, "point": [md, hd], "batch": args.batch,
           "pdl": os.environ.get("DEJAVU_PDL", "1") != "0"}
    variants = {
        "dense": dict(predictors=None, mlp_density=1.0, head_density=1.0, kv_policy="all"),
        "dense_cublas": dict(predictors=None, mlp_density=1.0, head_density=1.0, kv_policy="all", dense_mlp="cublas"),
        "dense_attn_cublas": dict(predictors=None, mlp_density=1.0, head_density=1.0, kv_policy="all",
                                  dense_attn="cublas"),
        "sparse": dict(predictors=preds, mlp_density=md, head_density=hd),
        "pred_int8": dict(predictors=preds8, mlp_density=md, head_density=hd),
        "pred_int8_half_rank": dict(predictors=preds8h, mlp_density=md, head_density=hd),
        "unfused": dict(predictors=preds, mlp_density=md, head_density=hd, fuse_norm=False),
        "nopred": dict(predictors=preds, mlp_density=md, head_density=hd),
        "inline": dict(predictors=preds, mlp_density=md, head_density=hd, overlap=False),
        "sparse_high_priority": dict(predictors=preds, mlp_density=md, head_density=hd),
        "torch_topk": dict(predictors=preds, mlp_density=md, head_density=hd),
        "fold_forced": dict(predictors=preds, mlp_density=md, head_density=hd),
        "radix_torch_hist": dict(predictors=preds, mlp_density=md, head_density=hd),
        "unfused_mlp": dict(predictors=preds, mlp_density=md, head_density=hd, fuse_mlp=False),
        "unfused_attn": dict(predictors=preds, mlp_density=md, head_density=hd, fuse_attn=False),
        "epilogue_2048": dict(predictors=preds, mlp_density=md, head_density=hd),
        **{f"side_pdl_{m}": dict(predictors=preds, mlp_density=md, head_density=hd)
           for m in SIDE_PDL_OFF},
        "main_priority": dict(predictors=preds, mlp_density=md, head_density=hd),
        **{name: dict(predictors=preds, mlp_density=md, head_density=hd)
           for name in ("finish_mlp", "finish_o", "fuse_tail", "prewait_gathers", "prewait_rows", "prewait_mlp",
                        "prewait_off", "l0_inline", "embed_nopdl", "embed_torch", "head_cublas")},
        "add_launch": dict(predictors=None, mlp_density=1.0, head_density=1.0, kv_policy="all"),
        **{f"fork_{m}": dict(predictors=preds, mlp_density=md, head_density=hd) for m in FORK_POINTS},
    }
    knobs = {  # A/B of launch heuristics, set while the step is captured: (module, name, value)
        "attn_split_128": (DA, "SPLIT_MIN_POSITIONS", 128), "attn_split_256": (DA, "SPLIT_MIN_POSITIONS", 256),
        "down_ctas_1": (GM, "DOWN_PROGRAMS_PER_SM", 1), "down_ctas_4": (GM, "DOWN_PROGRAMS_PER_SM", 4),
        "mlp_maxnreg_128": (MB, "MAXNREG", 128), "attn_pipelined": (DA, "ONE_TILE_UNPIPELINED", False),
    }
    knobs.update({f"gemv_cap_{n}": (PO, "GEMV_MAX_PROGRAMS", n) for n in (32, 64, 132, 264, 396, 528)})
    knobs.update({f"gemv_rows_{n}": (PO, "GEMV_LONG_ROWS", n) for n in (16, 32, 64)})
    knobs.update({f"gemv_short_{n}": (PO, "GEMV_SHORT_ROWS", n) for n in (2, 8)})
    knobs.update({f"mlp_cols_{n}": (MB, "DOWN_COLS", n) for n in (256, 1024)})
    knobs.update({f"mlp_rows_{n}": (MB, "ROWS", n) for n in (8, 32)})
    knobs["mlp_one_loop"] = (MB, "ONE_LOOP", True)
    knobs["mlp_two_loops"] = (MB, "ONE_LOOP", False)
    knobs["rows_narrow"] = (GM, "ROWS_WIDE", False)
    knobs["rows_wide_window"] = (GM, "ROWS_WIDE_MAX", 4)
    knobs["reduce_serial"] = (GM, "REDUCE_BLOCK_S", 1)
    knobs["reduce_padded_rows"] = (GM, "REDUCE_BATCH_ROWS", False)
    knobs["mlp_signal_early"] = (MB, "SIGNAL_AFTER_UP", False)
    knobs.update({f"rows_tile_{k}_{d}": (GM, "ROWS_FMA_TILE", (k, d)) for k, d in ((16, 256), (16, 512), (8, 256))})
    knobs.update({f"nopdl_{k}": (C, "PDL_EXCLUDE", {v}) for k, v in (
        ("rows", "_gather_rows_kernel"), ("attn", "_decode_attn_kernel"), ("combine", "_decode_attn_combine_kernel"),
        ("oproj", "_gather_down_kernel"), ("mlp", "_sparse_mlp_kernel"))})
    knobs.update({f"signal_exit_{k}": (C, "PDL_LATE", {v}) for k, v in (
        ("rows", "_gather_rows_kernel"), ("attn", "_decode_attn_kernel"), ("combine", "_decode_attn_combine_kernel"),
        ("oproj", "_gather_down_kernel"), ("mlp", "_sparse_mlp_kernel"), ("gemv", "_lowrank_gemv_kernel"))})
    knobs["oproj_signal_after_loop"] = (C, "PDL_MID", {"_gather_down_kernel"})
    # the fused o_proj + MLP block's tiles (with fuse_tail: e.g. fuse_tail+tail_cols_256)
    knobs.update({f"tail_cols_{n}": (OB, "O_COLS", n) for n in (256, 1024)})
    knobs.update({f"tail_items_{n}": (OB, "O_ITEMS_PER_SM", n) for n in (2, 3)})
    knobs.update({f"tail_stages_{n}": (OB, "O_STAGES", n) for n in (2, 4)})
    knobs["tail_cap_128"] = (OB, "MAXNREG", 128)
    knobs["tail_ticketed"] = (OB, "PERSISTENT", False)
    variants.update({name: dict(predictors=preds, mlp_density=md, head_density=hd) for name in knobs})
    # knobs read when the decoder is built (and by the kernels at capture): set around construction and capture
    build_knobs = {"fma_max_2": (C, "FMA_MAX_BATCH", 2), "side_priority_0": (FD, "SIDE_PRIORITY", 0),
                   "mlp_v23": (MB, "ONE_LOOP_MAXNREG", None),  # (mlp_v23 also decides the side stream's priority)
                   "pred_factored": (FD, "PREDICTOR_PRODUCTS", False),  # head predictors from their factors (v26)
                   "mlp_first_early": (FD, "MLP_FIRST_AFTER_HEADS", False),
                   "products_b16": (FD, "PRODUCTS_MAX_BATCH", 16)}
    variants.update({name: dict(predictors=preds, mlp_density=md, head_density=hd) for name in build_knobs})
    knobs.update(build_knobs)
    chosen = args.variants.split(",")  # a variant may combine several, joined by "+" (e.g. fork_qkv+side_pdl_off)
    unknown = {p for name in chosen for p in name.split("+")} - set(variants)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)} (or join them with '+')")
    if any({"pred_int8", "pred_int8_half_rank"} & set(name.split("+")[1:]) for name in chosen):  # only first
        ap.error("pred_int8 chooses the decoder's predictors: name it first (e.g. pred_int8+fork_qkv)")
    decs = {}
    for i, name in enumerate(chosen):
        parts = name.split("+")
        if name in chosen[:i]:  # a repeat (e.g. the baseline first and last): its own decoder, named name#n
            name = f"{name}#{chosen[:i + 1].count(name)}"
        merged = {}  # knobs that set one name: the last wins, but sets of kernel names (PDL_*) are joined
        for mod, attr, value in (knobs[p] for p in parts if p in knobs):
            prev = merged.get((mod, attr))
            merged[(mod, attr)] = prev | value if isinstance(prev, set) and isinstance(value, set) else value
        set_knobs = [(mod, attr, value) for (mod, attr), value in merged.items()]
        saved = [getattr(mod, attr) for mod, attr, _ in set_knobs]
        for p in parts:
            if p in build_knobs:
                setattr(*build_knobs[p])
        try:
            dec = FastDecoder(model, batch=args.batch, max_len=200, **variants[parts[0]])
        finally:
            for (mod, attr, _), value in zip(set_knobs, saved):
                setattr(mod, attr, value)
        for part in parts:
            _setup(dec, part)
        dec.prefill(ids)
        epi = MB.EPILOGUE_COLS
        if "epilogue_2048" in parts:  # A/B: the MLP block's epilogue in 2048-column steps (read at capture)
            MB.EPILOGUE_COLS = 2048
        for mod, attr, value in set_knobs:
            setattr(mod, attr, value)
        try:
            dec.capture()
        finally:
            MB.EPILOGUE_COLS = epi
            for (mod, attr, _), value in zip(set_knobs, saved):
                setattr(mod, attr, value)
        decs[name] = dec
    times = {name: [] for name in decs}
    for _ in range(args.rounds):  # interleaved, so a drift of the card's clocks hits every variant alike
        for name, dec in decs.items():
            times[name].append(replay_ms(dec))
    for name, dec in decs.items():
        ms = statistics.median(times[name])
        t = trace(dec)
        res[name] = {"replay_ms": ms, "replay_ms_rounds": times[name], "bytes": dec.bytes_per_token(),
                     "kernels_per_layer": dec.describe()["kernels_per_layer"], **t}
        print(f"== {name}: replay {ms:.3f} ms (rounds {', '.join(f'{v:.3f}' for v in times[name])}); main span "
              f"{t.get('main_span_us', 0):.0f} us, busy {t.get('main_busy_us', 0):.0f} us, "
              f"{t.get('main_kernels', 0):.0f} kernels, median gap {t.get('median_gap_us', 0):.2f} us; side busy "
              f"{t.get('side_busy_us', 0):.0f} us", flush=True)
        for k in t.get("kernels", [])[:14]:
            print(f"   {k['us_per_step']:9.1f} us  x{k['count']:<6} {k['name']}")
    point = "" if args.point == "0.1,0.5" else "_p" + args.point.replace(",", "_")
    stem = os.path.join(args.out, f"profile_{args.model}{point}_b{args.batch}{args.tag}")
    path, n = stem + ".json", 1
    while os.path.exists(path):  # a second run of the same model, point, batch and tag in one directory: keep both
        n += 1
        path = f"{stem}_{n}.json"
    write_json_atomic(path, res)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
