"""Fast decode runtime: static KV cache, dense prefill, sparse decode with the whole step in one CUDA graph.

Why this shape (gpt-fast style, ``prefill`` / ``decode_step`` / ``generate``): at batch <= 16 a decode step is a chain
of GEMVs whose time is the time to stream the weights once, plus one launch per kernel. Deja Vu cuts the bytes; the
CUDA graph cuts the launches (a 40-layer step is ~1000 kernels), which is what makes the byte savings show up as time.
A graph needs static shapes, so every sparse part reads a *fixed* number of rows per layer: ``k = round(density * N)``
(>= 1) top-scoring heads / neurons of the batch (scores reduced to their max over the batch, then
``select_topk``, i.e. the union of what the sequences want, cut to k). Positions and lengths live in device tensors
updated inside the graph, so one captured step replays for every token.

Per layer l (``_block``), with ``x`` the residual stream entering the block:
  norm1 -> q (selected heads, ``head_gather_gemv``; OPT bias) and K/V (see kv_policy) -> RoPE (Llama) ->
  write K/V at the current position -> ``sparse_decode_attention`` over the selected heads (at batch 1 these
  three are one launch, ``qkv_decode_attention``; ``fuse_attn``) -> ``head_gather_down`` with the residual fused
  -> norm2 -> the MLP block. At batch 1 a sparse MLP block is one launch, ``sparse_mlp`` (up rows, ReLU /
  SwiGLU, down rows, bias and residual; ``fuse_mlp``); above, ``gather_up`` (OPT: bias + ReLU) or ``gather_swiglu``
  then ``gather_down`` with bias and residual fused. At batch 1 each norm before a gather is also folded into it
  (``fuse_norm``, ``kernels.fold_norm``): a sparse layer is then five kernels (q/k/v gather, attention, split
  combine, o_proj, MLP block). On Hopper every Triton kernel is launched with programmatic dependent launch
  (``kernels._checks.use_pdl``; the MLP block lets the next kernel launch only once past its up phase,
  ``mlp_block.SIGNAL_AFTER_UP``). Two switches, on by default where they apply, move a producer's finishing pass
  (bias, residual, cast) into its consumer, which streams all of that activation anyway (``kernels.XSum``):
  ``defer_oproj_finish`` (o_proj's split-k reduction, into the MLP block, or into the dense MLP's up gather, which
  then also writes the residual cuBLAS adds fc2 into) and ``defer_mlp_finish`` (the MLP block's, into the next
  layer's q/k/v gather). A middle layer then has no last-program pass on its critical path. ``fuse_oproj_mlp`` (off:
  slower in the step, bench/NOTES.md v25) runs the unfinished o_proj and the MLP block as one launch
  (``kernels.oproj_mlp``).
  "At batch 1" is ``kernels._checks.FMA_MAX_BATCH``, the kernels' CUDA-core path; batch 2 runs as batch > 2, on the
  tensor-core paths (measured: bench/NOTES.md v15).
A part at density 1 reads every row. At batch 1, by default, it runs the sparse path's gathers over every row where
that measured faster than cuBLAS in the step: the attention's projections (``dense_attn``, the norm folded into the
q/k/v gather) and the MLP's up projection (``dense_mlp``, the norm folded in, the activation fused; the down
projection stays cuBLAS); above batch 1, or with "cublas", it uses cuBLAS GEMVs. A layer at density 1 runs no
predictor. ``predictors=None`` is the all-dense runtime ("ours-dense": same graph, dense GEMVs, the
decode-attention kernel over all heads), our stand-in for FasterTransformer / gpt-fast.

Predictors (``policy.PredictorPolicy`` semantics): with lookahead, layer l+1's heads and neurons are scored from
layer l's input; layer 0 from its own. On CUDA that lookahead runs on a side stream (forked and joined inside the
graph), so it overlaps layer l instead of sitting on the critical path, which is the point of lookahead; it forks
after layer l's attention at batch 1 and at its start above (``fork_at``, measured), and the heads are joined
before layer l+1's q/k/v gather, the neurons before its up gather. The neuron top-k is a radix select
fed by the scores GEMV's histogram at batch 1, ``torch.topk`` above (measured, see ``_topk``). Layer 0's
prediction has no layer before it to hide behind: its heads are chosen on the main stream and its neurons on a
stream of their own, beside layer 0's q/k/v gather and attention (``split_first_prediction``). Without
lookahead the heads are scored from the layer input and the neurons from the residual after attention, inline.

kv_policy:
  "all"      K/V for every KV head at every step (complete cache; costs the full k/v projections).
  "selected" K/V only for the KV heads the selected query heads need; the other heads' entries at this position
             are marked as holes in ``KVCache.valid`` and attention skips them (``kv_valid``). Graph-friendly GQA:
             the query heads are chosen freely (top-k, as in the reference policy); the KV heads computed are a
             fixed-size set of ``min(k, H_kv)`` heads: every needed one (those rank first) padded with unneeded
             ones. The padding heads' K/V is computed and written but still marked as a hole, so the cache holds
             exactly what the reference (``DecoderLM`` with kv_policy="selected") holds. With MHA (OPT) the KV heads
             are exactly the selected heads, no padding.

RoPE: the step's (cos | sin) row per sequence is gathered from a table of every position (built once by the model's
own ``rope()``, so the same values) by the step's embedding launch (``kernels.fused_ops.embed_fused``), and applied
to q and K inside the decode attention (``qkv_post`` when unfused), not by elementwise kernels in every layer.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import kernels as K
from ..kernels import _checks as KC
from ..kernels import fused_ops as FO
from ..models.decoder import KV_POLICIES, DecoderLM, KVCache
from ..predictors.model import quantize_rows
from .policy import k_for, per_layer


SIDE_PRIORITY = -1
"""CUDA priority of the side stream that runs the lookahead predictions where some layer's MLP block runs its one loop
capped at 128 registers (its programs outnumber the SMs: ``mlp_block.launch_maxnreg``); elsewhere 0, the priority the
step is captured at (``FastDecoder.capture_priority``; lower is more urgent). Ahead of the step, the neuron-scores
GEMV's programs are placed beside the MLP block instead of beside the next q/k/v gather, which the capped loop's
shorter block would otherwise hand it. H200, batch 1, both changes against v23's two loops at priority 0
(bench/NOTES.md v24): OPT-13B (0.25, 0.5) 3.564 -> 3.294 ms, OPT-6.7B (0.25, 0.5) 1.869 -> 1.757, (0.5, 1) -0.6% to
-1.3%; the capped loop alone had been mixed (v23: -5.5% and +9%), and the priority alone, where no block is capped,
moved the step by -0.3% to +1.1%, so there the side stream stays at 0. Read when a decoder is built; 0 keeps every
side stream at the step's priority."""


PREDICTOR_PRODUCTS = True
"""Score a predictor that reads fewer bytes as the product of its factors (``kernels.runs_as_product``: the head
predictors) from that product, in one GEMV, instead of from its factors. Same map; OPT-13B reads 0.4 MB a layer
instead of 1.65 (int8 factors) or 3.3 (fp16), and the head selection, which the next layer's q/k/v gather waits on,
is two launches away from the stream instead of three. Only up to ``PRODUCTS_MAX_BATCH`` sequences. Read when a
decoder is built; False keeps the factors (A/B: ``bench/profile_step.py``'s ``pred_factored``)."""
PRODUCTS_MAX_BATCH = 4
"""The largest batch whose decoders score a predictor from its product (``PREDICTOR_PRODUCTS``). H200, int8 rows, the
product against the factors (bench/NOTES.md v27, v28): batch 1 OPT-13B (0.1, 0.5) -3.0% to -3.4% (with its 32-row
neuron scores), LLaMA-2-7B -1.6%, OPT-30B -0.6%; batch 2 OPT-13B -1.9%, batch 4 -1.6% (twice); batch 16 OPT-13B
+12%: there the head product and the MLP predictor's first factor, two GEMVs of 40 steps along d each (16-sequence
tiles), run one after the other on the neuron selection's path instead of as one stacked GEMV. Read when a decoder
is built (A/B: ``products_b16``, products at every batch)."""
MLP_FIRST_AFTER_HEADS = True
"""Where a layer's heads are scored from their predictor's product and its MLP predictor is factored, the MLP's first
factor runs after the head selection (the selection the next q/k/v gather waits on is then two launches from the
stream), instead of before the head product. A/B knob, read at capture: ``bench/profile_step.py``'s
``mlp_first_early``."""

def distinct_streams(device, n: int, priority: int = 0, avoid=(), make=None) -> list:
    """``n`` CUDA streams whose handles differ from each other's and from those of the streams in ``avoid`` (None
    entries ignored). ``torch.cuda.Stream()`` hands out the streams of a process-wide pool, 32 a priority in turn,
    so two calls can return the same stream, and ``torch.cuda.graph`` captures on one pool stream a process unless
    given its own. A decoder whose side stream was its capture stream ran its lookahead predictors in series with
    the step: OPT-13B at B=16 (0.1, 0.5) on an H200, the 15th decoder of a bench process, 7.62 against 4.88 ms for the
    next identical one (bench/NOTES.md v22). ``make(priority)`` makes a stream (default: ``torch.cuda.Stream``)."""
    make = make or (lambda prio: torch.cuda.Stream(device, priority=prio))
    taken = {s.cuda_stream for s in avoid if s is not None}
    n_avoid, out = len(taken), []
    for _ in range(64 * (n + n_avoid)):  # a pool of 32 repeats itself within 32 draws
        s = make(priority)
        if s.cuda_stream not in taken:
            taken.add(s.cuda_stream)
            out.append(s)
            if len(out) == n:
                return out
    raise RuntimeError(f"no {n} CUDA streams of priority {priority} distinct from {n_avoid} others: the stream "
                       "pool returned only streams already in use")


BACKENDS = ("triton", "torch")
FORK_POINTS = ("start", "qkv", "attn", "oproj")
"""FastDecoder.fork_at: the side stream's prediction of layer l+1 forks from x_l at the start of layer l (its first
kernel then shares the previous MLP block as predecessor with the q/k/v gather), or after layer l's q/k/v gather,
attention (with its combine) or o_proj."""
DENSE_MLP = ("cublas", "up_gather")
"""FastDecoder(dense_mlp=...): how an MLP part at density 1 runs: "cublas" (norm kernel, cuBLAS GEMVs, activation
kernels), or "up_gather" at batch 1 (the up projection as the sparse path's row gather over every neuron, with the
norm folded in and ReLU / SwiGLU fused, then the residual copy and the cuBLAS down projection; "cublas" above)."""
DENSE_ATTN = ("cublas", "qkv_gather")
"""FastDecoder(dense_attn=...): how attention's projections run where every head is read: "cublas" (norm kernel,
cuBLAS q/k/v and o_proj GEMVs), or "qkv_gather" at batch 1 (the sparse path's q/k/v row gather and o_proj column
gather over every head, the norm folded into the first)."""
SIDE_PDL_OFF = {"on": (), "off": ("first", "heads", "scores", "select"), "first": ("first",), "heads": ("heads",),
                "scores": ("scores",), "mlp": ("scores", "select")}
"""FastDecoder.side_pdl -> the parts of a side-stream prediction launched without PDL (the first factors, the head
scores and top-k, the neuron scores, the neuron top-k)."""
PREWAIT_FORMS = (False, True, "rows", "mlp")
"""FastDecoder.prewait_gathers: which kernels read their selection and first weight chunk before their PDL wait: none,
the q/k/v gathers and the MLP blocks, the gathers only (the default), the blocks only."""


@dataclass
class FastGeneration:
    tokens: torch.Tensor  # (B, T + n_new): prompt then greedy continuation
    step_ms: list[float]  # time of each decode step (n_new - 1 of them; the first new token comes from prefill)
    prefill_ms: float
    extra: dict = field(default_factory=dict)


class _TritonOps:
    """The fused kernels; indices are built by construction (select_topk), so no validation syncs."""

    def rows(self, x, w, idx, hd, bias, norm=None, x_sum=None, prewait=False):  # -> [B, k, hd]; norm: x raw stream
        return K.head_gather_gemv(x, w, idx, hd, bias, norm=norm, validate=False, x_sum=x_sum, prewait=prewait)

    def oproj(self, a, wo_t, idx, hd, bias, res, out, finish=True, zero=None, prewait=False, out2=None, bias2=None):
        return K.head_gather_down(a, wo_t, idx, hd, bias, res, validate=False, out=out, finish=finish, zero=zero,
                                  prewait=prewait, out2=out2, bias2=bias2)  # fmt: skip

    def up(self, x, w1, w3, idx, bias, norm=None, x_sum=None):  # -> [B, k]
        if w3 is None:
            return K.gather_up(x, w1, idx, bias, act="relu", norm=norm, validate=False, x_sum=x_sum)
        return K.gather_swiglu(x, w1, w3, idx, norm=norm, validate=False, x_sum=x_sum)

    def down(self, h, w2t, idx, bias, res, out):
        return K.gather_down(h, w2t, idx, bias, res, validate=False, out=out)

    def mlp(self, x, w1, w3, w2t, idx, b1, b2, res, out, norm, ws, finish=True, zero=None, x_sum=None,
            prewait=False):  # one launch  # fmt: skip
        return K.sparse_mlp(x, w1, w2t, idx, b1, b2, res, w3=w3, norm=norm, workspace=ws, validate=False, out=out,
                            finish=finish, zero=zero, x_sum=x_sum, prewait=prewait)  # fmt: skip

    def oproj_mlp(self, a, wo_t, hidx, hd, sums, zero_o, bo, x_res, x, w1, w3, w2t, idx, b2, res, out, norm, ws,
                  finish=True, zero=None):  # fmt: skip
        # one launch: the unfinished o_proj into sums, then the block on x made from them
        return K.oproj_mlp(a, wo_t, hidx, hd, sums, x, w1, w2t, idx, None, b2, res, bo=bo, x_res=x_res, w3=w3,
                           norm=norm, workspace=ws, validate=False, out=out, finish=finish, zero_o=zero_o, zero=zero)

    def attn(self, q, kc, vc, lens, idx, group, valid):
        return K.sparse_decode_attention(q, kc, vc, lens, idx, group, kv_valid=valid, validate=False)

    def qkv_attn(self, qkv, kvidx, kc, vc, pos, idx, group, cos, sin, valid):  # -> [B, kh, hd]
        # prewait: the kernel before it on the stream is the q/k/v gather (or cuBLAS), which writes qkv only
        return K.qkv_decode_attention(qkv, kvidx, kc, vc, pos, idx, group, cos=cos, sin=sin, kv_valid=valid,
                                      validate=False, prewait=True)  # fmt: skip

    def norm(self, x, kind, w, b, eps, out, init=None, init_bias=None):
        return FO.norm_fused(x, kind, w, b, eps, out=out, init=init, init_bias=init_bias)

    def embed(self, tok, wte, pos, wpe, out, pos_out=None):  # one launch: token row (+ learned position row)
        return FO.embed_fused(tok, wte, pos, wpe, out=out, pos_out=pos_out)

    def head(self, x, w, idx, norm):  # the LM head with the final norm folded: every row, no activation
        return K.gather_up(x, w, idx, act="none", norm=norm, validate=False)

    def post(self, *a, **kw):
        return FO.qkv_post(*a, **kw)

    def factor(self, x, w, bias, norm, out, batch_max=False, hist=None, scale=None):  # -> [B, n] ([1, n]), out's dtype
        return K.lowrank_gemv(x, w, bias, scale=scale, norm=norm, batch_max=batch_max, out_dtype=out.dtype, out=out,
                              hist=hist)

    def select(self, scores, k, out, copies=1, offset=0, ws=None, hist_ready=False, radix=None):
        # top-k -> out (int64; heads ascending); ws: a radix workspace, its histogram filled by the scores' GEMV
        # when hist_ready
        return K.select_topk(scores, k, out=out, copies=copies, copy_offset=offset, workspace=ws,
                             hist_ready=hist_ready, radix=radix)


class _TorchOps:
    """The same step on the plain-torch references (CPU tests, debugging)."""

    def rows(self, x, w, idx, hd, bias, norm=None, x_sum=None, prewait=False):  # (no PDL here)
        if x_sum is not None:  # x made from the unfinished MLP block before, and written
            K.x_sum_write_ref(x_sum, x)
        if norm is not None:
            x, bias = K.norm_ref(x, norm), norm.linear_bias
        return K.head_gather_gemv_ref(x, w, idx, hd, bias)

    def oproj(self, a, wo_t, idx, hd, bias, res, out, prewait=False, out2=None, bias2=None):
        out.copy_(K.head_gather_down_ref(a, wo_t, idx, hd, bias, res))
        if out2 is not None:
            out2.copy_(out if bias2 is None else out + bias2)
        return out

    def up(self, x, w1, w3, idx, bias, norm=None, x_sum=None):
        if x_sum is not None:  # x made from the unfinished o_proj before, and written (with x_sum.out2)
            K.x_sum_write_ref(x_sum, x)
        if norm is not None:
            x, bias = K.norm_ref(x, norm), norm.linear_bias
        return K.gather_up_ref(x, w1, idx, bias, act="relu") if w3 is None else K.gather_swiglu_ref(x, w1, w3, idx)

    def down(self, h, w2t, idx, bias, res, out):
        return out.copy_(K.gather_down_ref(h, w2t, idx, bias, res))

    def mlp(self, x, w1, w3, w2t, idx, b1, b2, res, out, norm, ws, prewait=False):
        return out.copy_(K.sparse_mlp_ref(x, w1, w2t, idx, b1, b2, res, w3=w3, norm=norm))

    def attn(self, q, kc, vc, lens, idx, group, valid):
        return K.sparse_decode_attention_ref(q, kc, vc, lens, idx, group, kv_valid=valid)

    def qkv_attn(self, qkv, kvidx, kc, vc, pos, idx, group, cos, sin, valid):
        return K.qkv_decode_attention_ref(qkv, kvidx, kc, vc, pos, idx, group, cos=cos, sin=sin, kv_valid=valid)

    def norm(self, x, kind, w, b, eps, out, init=None, init_bias=None):
        return FO.norm_fused_ref(x, kind, w, b, eps, out=out, init=init, init_bias=init_bias)

    def embed(self, tok, wte, pos, wpe, out, pos_out=None):
        return FO.embed_fused_ref(tok, wte, pos, wpe, out=out, pos_out=pos_out)

    def head(self, x, w, idx, norm):
        return K.gather_up_ref(K.norm_ref(x, norm), w, idx, norm.linear_bias, act="none")

    def post(self, *a, **kw):
        return FO.qkv_post_ref(*a, **kw)

    def factor(self, x, w, bias, norm, out, batch_max=False, hist=None, scale=None):
        return out.copy_(K.lowrank_gemv_ref(x, w, bias, scale=scale, norm=norm, batch_max=batch_max,
                                            out_dtype=out.dtype))

    def select(self, scores, k, out, copies=1, offset=0, ws=None, hist_ready=False, radix=None):
        return out.copy_(K.topk_select_ref(scores, k, copies=copies, copy_offset=offset))


class FastDecoder:
    """Static-cache, graph-captured (sparse) decoding of one DecoderLM at a fixed batch size.

    ``prefill(ids)`` then ``decode_step(tokens)`` per token, or ``generate(ids, n_new)``. ``decode_step`` returns a
    static buffer when graphed: consume (or clone) it before the next step.
    """

    def __init__(self, model: DecoderLM, predictors=None, mlp_density=1.0, head_density=1.0, batch: int = 1,
                 max_len: int = 256, kv_policy: str = "selected", use_graph: bool = True, backend: str = "triton",
                 overlap: bool = True, fuse_norm: bool = True, fuse_mlp: bool = True, fuse_attn: bool = True,
                 dense_mlp: str = "up_gather", dense_attn: str = "qkv_gather"):  # fmt: skip
        s = model.spec
        L, H, Hkv, N = s.n_layers, s.n_heads, s.n_kv_heads, s.ffn_dim
        if not 1 <= int(batch) <= K.MAX_BATCH:
            raise ValueError(f"batch={batch}: the decode kernels serve 1..{K.MAX_BATCH} sequences (memory-bound "
                             f"GEMV regime); split larger batches")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be >= 2 (prompt + at least one token)")
        if s.pos_kind == "learned" and max_len > s.max_positions:
            raise ValueError(f"max_len={max_len} exceeds the model's {s.max_positions} learned positions")
        if kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if dense_mlp not in DENSE_MLP:
            raise ValueError(f"dense_mlp must be one of {DENSE_MLP}, got {dense_mlp!r}")
        if dense_attn not in DENSE_ATTN:
            raise ValueError(f"dense_attn must be one of {DENSE_ATTN}, got {dense_attn!r}")
        if backend == "triton" and not K.HAS_TRITON:
            raise ValueError("backend='triton' needs Triton (pip install triton); use backend='torch'")
        md, hd_ = per_layer(mlp_density, L, "mlp_density"), per_layer(head_density, L, "head_density")
        if predictors is None and min(md + hd_) < 1.0:
            raise ValueError("densities < 1 need predictors (predictors=None is the all-dense runtime)")
        self.model, self.spec, self.predictors = model, s, predictors
        self.batch, self.max_len, self.kv_policy, self.backend = int(batch), int(max_len), kv_policy, backend
        self.device, self.dtype = model.device, model.dtype
        self.mlp_density, self.head_density = md, hd_
        self.k_mlp = [k_for(d, N) for d in md]  # rows read per layer (N = dense)
        self.k_heads = [k_for(d, H) for d in hd_]
        scheme = predictors.input_scheme if predictors is not None else "lookahead"
        if scheme not in ("lookahead", "same"):
            raise ValueError(f"FastDecoder supports predictors with input scheme 'lookahead' or 'same', not "
                             f"{scheme!r}; re-run `dejavu calibrate --predictor-input lookahead`")
        self.lookahead = scheme == "lookahead"
        cuda = self.device.type == "cuda"
        self.use_graph = bool(use_graph) and cuda
        self.ops = _TritonOps() if backend == "triton" else _TorchOps()
        B, hd, d = self.batch, s.head_dim, s.d_model
        # the kernels' CUDA-core FMA paths serve B <= FMA_MAX_BATCH; the features built on them follow (measured there)
        self._fma = fma = B <= KC.FMA_MAX_BATCH  # read once: the knob may change after construction
        g = s.group_size
        # fixed KV-head count per layer: all, or min(k, H_kv) under "selected" (MHA: exactly the selected heads)
        self.k_kv = [Hkv if (kv_policy == "all" or kh == H) else (kh if g == 1 else min(kh, Hkv))
                     for kh in self.k_heads]
        self.holes = [kv_policy == "selected" and kh < H for kh in self.k_heads]
        self.caches = [KVCache(B, Hkv, self.max_len, hd, self.dtype, self.device) for _ in range(L)]
        dev = dict(device=self.device)
        self._tok = torch.zeros(B, dtype=torch.long, **dev)  # graph input
        self._pos = torch.zeros(B, dtype=torch.long, **dev)  # position of the token being decoded
        self._bi = torch.arange(B, **dev)
        self._all_heads = torch.arange(H, **dev)
        self._x = [torch.zeros(B, d, dtype=self.dtype, **dev) for _ in range(L + 1)]  # residual stream per layer
        self._mid = torch.zeros(B, d, dtype=self.dtype, **dev)  # residual after attention
        # selections, written by the predictors (possibly on the side stream), read by the block. Per layer one
        # combined q/k/v head index into the fused [q; k; v] weight (rows in units of hd): q heads, H + KV heads,
        # H + H_kv + KV heads; the q part doubles as the selected-head index, the raw KV heads are _kvidx.
        self._qkvidx, self._kvidx, self._hidx = [], [], []
        for l, (kh, kk) in enumerate(zip(self.k_heads, self.k_kv)):
            kv = torch.arange(kk, **dev)
            idx = torch.cat([torch.arange(kh, **dev), H + kv, H + Hkv + kv])
            self._qkvidx.append(idx)
            self._hidx.append(idx[:kh])
            self._kvidx.append(idx[:kh] if (g == 1 and self.holes[l]) else kv)  # MHA: KV heads == q heads
        self._nidx = [torch.arange(km, **dev) for km in self.k_mlp]
        # the sparse MLP block in one launch (kernels.sparse_mlp) at B = 1. Not at density 1: in the OPT-13B step on an
        # H200 (profile_step, same call) ours-dense took 7.84 ms with it against 7.40 with cuBLAS (bench/NOTES.md, v5)
        self._fused_mlp = [bool(fuse_mlp) and fma and km < N for km in self.k_mlp]
        # dense MLP parts: cuBLAS GEMVs, or (dense_mlp="up_gather", B = 1) the up projection as the row gather over
        # every neuron, so the norm before it folds in and the activation fuses, then cuBLAS down. Not the down
        # projection as a gather too (OPT-13B on an H200: 133 us in the step against cuBLAS's 55), nor at B = 2
        # (the gather 280 us against 55) (bench/NOTES.md v15)
        self.dense_mlp = dense_mlp
        self._up_gather = [km == N and dense_mlp == "up_gather" and B == 1 for km in self.k_mlp]
        self._cublas_mlp = [km == N and not ug for km, ug in zip(self.k_mlp, self._up_gather)]
        # dense attention parts: cuBLAS, or (dense_attn="qkv_gather", B = 1) the sparse path's gathers over every head
        self.dense_attn = dense_attn
        self._qkv_gather = [kh == H and dense_attn == "qkv_gather" and B == 1 for kh in self.k_heads]
        # two workspaces, layer l using l % 2: with defer_mlp_finish one holds layer l's unfinished sums while the
        # other is cleared
        fused_blocks = backend == "triton" and any(self._fused_mlp)
        self._mlp_ws = [K.mlp_workspace(d, self.device, B) for _ in range(2)] if fused_blocks else None
        # per layer, fp32 sums of an unfinished o_proj (defer_oproj_finish): [L, B * d], zero between uses
        self._o_ws = torch.zeros(L, B * d, dtype=torch.float32, **dev) \
            if backend == "triton" and any(self._fused_mlp + self._up_gather) else None  # fmt: skip
        # the q/k/v finish (RoPE, cache write, hole mask) inside the decode attention (kernels.qkv_decode_attention):
        # one launch fewer per layer. Only at B = 1: OPT-13B (0.1, 0.5) on an H200, same calls, B=1 3.155 / 3.138
        # against 3.289 / 3.282 ms per step, but B=4 4.436 against 4.263 (bench/NOTES.md, v6)
        self.fuse_attn = bool(fuse_attn) and fma
        self._all_kv = torch.arange(Hkv, **dev)
        self._kv_offs = torch.tensor([[H], [H + Hkv]], **dev)
        self._wqkv, self._bqkv = self._fuse_qkv()
        # folded norms only on the gathers' CUDA-core path (B = 1); see _fold_norms
        self.fuse_norm = bool(fuse_norm) and fma
        self._fold1, self._fold2 = self._fold_norms() if self.fuse_norm else ([None] * L, [None] * L)
        # the final norm folded into the LM head too (a row gather over the whole vocabulary instead of the norm kernel
        # and cuBLAS; fold_final_norm, read at capture; bench/NOTES.md v14)
        nf, V = model.norm_f, s.vocab_size
        self.fold_final_norm = True
        self._fold_f = K.fold_norm(model.lm_head.weight, nf.kind, nf.weight, nf.bias, nf.eps) \
            if self.fuse_norm and nf.weight is not None else None  # fmt: skip
        self._vocab = torch.arange(V, **dev) if self._fold_f is not None else None
        # RoPE: the model's (cos | sin) rows for every position, computed once by its own rope() (so the same values),
        # and this step's row, gathered by the step's embedding launch instead of built by seven elementwise kernels
        self._rope_table = self._rope_row = None
        if s.pos_kind == "rope":
            self._rope_table = torch.cat(model.rope(torch.arange(self.max_len, **dev), self.dtype), -1).contiguous()
            self._rope_row = torch.zeros(B, 2 * hd, dtype=self.dtype, **dev)
        self._h = torch.zeros(B, d, dtype=self.dtype, **dev)  # normed activations (reused by both norms)
        self._q = {kh: torch.zeros(B, kh, hd, dtype=self.dtype, **dev)  # RoPE'd q (qkv_post's output)
                   for kh in (set() if self.fuse_attn else set(self.k_heads))}
        self.predictor_products = PREDICTOR_PRODUCTS and B <= PRODUCTS_MAX_BATCH
        self._pred = self._prepare_predictors(predictors) if predictors is not None else None
        # predictor outputs: first-factor activations per width (fp32); scores per output size, in the model's dtype
        # as the reference LowRank stores them (16-bit keys also halve torch.topk's radix passes), already reduced to
        # the max over the batch (what the batch top-k ranks) by the second factor's epilogue
        # (widths: both predictors' first factors stacked, or one predictor's alone where only its half runs)
        widths = set()
        for e in filter(None, self._pred or []):
            widths |= {e["a_t"].shape[0]} if "a_t" in e else set()
            widths |= {e[kind][1] - e[kind][0] for kind in ("head", "mlp") if kind in e and e[kind][0] is not None}
        self._xa = {r: torch.zeros(B, r, dtype=torch.float32, **dev) for r in widths}
        self._scores = {n: torch.zeros(1, n, dtype=self.dtype, **dev) for n in (H, N)}
        # how the neuron top-k runs: "radix-gemv" (16-bit scores, Triton: the scores GEMV fills the histogram in
        # its epilogue, one radix_select launch finishes, against ~13 launches of torch.topk; one workspace for all
        # layers, whose selections run one after another on one stream), "radix-torch" (the histogram by torch
        # ops) or "torch" (torch.topk). A/B in bench/profile_step.py, OPT-13B (0.1, 0.5), H200, graph replay:
        # B=1 3.30 / 4.09 / 3.57 ms, B=4 5.26 / 4.35 / 4.22 ms (bench/NOTES.md, v4): the radix select only at
        # B = 1, where it wins; at B=4 it loses inside the graph though it wins alone
        self._radix = None
        if backend == "triton" and predictors is not None and N > K.predictor_ops.SMALL_N and min(md) < 1.0 \
                and fma and K.predictor_ops.radix_ok(self._scores[N]):
            self._radix = K.predictor_ops.radix_workspace(self.device)
        self._topk = "radix-gemv" if self._radix is not None else "torch"
        overlap = cuda and overlap and self.lookahead and predictors is not None
        # lookahead predictors run here, on streams of this decoder's own (distinct_streams says why), ahead of the
        # step where an MLP block runs its capped one loop (SIDE_PRIORITY says why)
        side_prio = SIDE_PRIORITY if overlap and self._capped_mlp() else 0
        self._side = distinct_streams(self.device, 1, side_prio)[0] if overlap else None
        # layer 0 has no layer before it to hide its prediction behind: its heads are chosen on the main stream (their
        # own first factor, or their product), and its neurons, needed only before its MLP block, on a stream of their
        # own with their own buffers (it may overlap the side stream's prediction of layer 1) and its own copy of x0,
        # joined before that block (split_first_prediction, read at capture; bench/NOTES.md v14)
        self.split_first_prediction = True
        l0 = self._pred[0] if self._pred is not None else {}
        self._side0 = self._bufs0 = None
        if overlap and "mlp" in l0:
            lo, hi = l0["mlp"][:2]
            self._side0 = distinct_streams(self.device, 1, avoid=(self._side,))[0]
            self._bufs0 = {"x": torch.zeros(B, d, dtype=self.dtype, **dev),
                           "xa": {} if lo is None else {hi - lo: torch.zeros(B, hi - lo, dtype=torch.float32, **dev)},
                           "scores": torch.zeros(1, N, dtype=self.dtype, **dev),
                           "ws": K.predictor_ops.radix_workspace(self.device) if self._radix is not None else None}
        # side -> main joins, per layer: its heads are needed before its q/k/v gather, its neurons only before its
        # up gather, so the neuron half of the chain gets the attention half of the layer as extra slack
        self._heads_ready = [torch.cuda.Event() for _ in range(L)] if overlap else None
        self._mlp_ready = [torch.cuda.Event() for _ in range(L)] if overlap else None
        # where in layer l the side stream forks off to predict layer l+1 (FORK_POINTS), and which of its launches
        # use PDL (SIDE_PDL_OFF: with it a kernel's programs are placed early and wait for their predecessor on SM
        # slots the main stream's kernels need; without it each launch's latency lands on the side chain). Forked
        # at the layer's start, the chain's first kernel and the q/k/v gather both follow the MLP block, and the
        # gather then starts ~4 us after the block ends instead of early; forked after the attention, with PDL off
        # on the side, the B=1 step took 5-13% less on the H200 (OPT-6.7B/13B/30B), while at B=4 any later fork lost
        # (bench/profile_step.py fork_* variants, bench/NOTES.md v8)
        self.fork_at, self.side_pdl = ("attn", "off") if fma else ("start", "on")
        # priority of the stream the step is captured on (CUDA: lower is more urgent; the side stream has 0), so
        # that the main stream's programs are placed ahead of the predictors' where both wait for SM slots
        self.capture_priority = 0
        # the fused MLP block of layer l leaves its fp32 sums unfinished and layer l+1's q/k/v gather adds the bias
        # and residual as it streams x, writing x_{l+1} (kernels.XSum), so the block's last-program pass is off the
        # critical path (read at capture; see _deferred for where it applies). o_proj likewise leaves its fp32 sums
        # (atomics, no split-k pass) and the fused MLP block makes the residual after attention from them as it
        # streams it (_deferred_o). H100, OPT-13B (0.1, 0.5): 3.420 ms, 3.324 with the first, 3.357 with the
        # second, 3.258 with both (bench/NOTES.md v10). The dense step's up gather makes mid and x_next = mid + b2
        # likewise (up_gather): H200, ours-dense OPT-13B 7.044 against 7.181 ms, LLaMA-2-7B 3.789 / 3.863, with the
        # 16-row tiles that halve the programs reading the sums (gather_mlp.ROWS_WIDE_MAX; bench/NOTES.md v19)
        self.defer_mlp_finish = True
        self.defer_oproj_finish = True
        # where the o_proj leaves its sums for the fused MLP block (defer_oproj_finish), both run as one launch of
        # ticketed work items, o_proj items first (kernels.oproj_mlp; A/B, read at capture; bench/NOTES.md v25)
        self.fuse_oproj_mlp = False
        # the q/k/v gathers (but layer 0's, whose heads the kernel right before it chooses) read their selection and
        # first weight chunk before their PDL wait ("rows"; True: the MLP blocks too; read at capture; lookahead
        # only). Both kinds moved the H200 step by -1.6% to +2.4% by model in v13, when neither alone was uniform
        # either; on v27's step the gathers alone gained on all four bench models (OPT-13B, OPT-30B, LLaMA-2-7B,
        # OPT-6.7B: -0.2% to -1.6% over three calls) while the blocks lost up to 4.7% on LLaMA-2-7B (bench/NOTES.md v28)
        self.prewait_gathers = "rows"
        # a dense MLP part after the sparse path's o_proj (dense_mlp="up_gather", qkv_gather): the o_proj's epilogue
        # also writes x_next = mid + b2, into which cuBLAS adds fc2, instead of an elementwise launch of its own
        # (A/B, read at capture; bench/profile_step.py's add_launch), where the o_proj finishes its own sums (not
        # deferred into the up gather, which then writes x_next)
        self.oproj_writes_next = True
        self._graph, self._graph_out, self._capture_stream, self._len = None, None, None, 0

    # ---- setup ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _fuse_qkv(self):
        """One [(H + 2 H_kv) hd, d] weight (and bias) per layer, so q/k/v is one GEMV (dense) or one gather launch.

        No extra memory: the model's wq / wk / wv (bq / bk / bv) are re-pointed, layer by layer, to row slices of
        the fused buffer (same values; the model's own forward and prefill keep working). A model already fused
        (a second FastDecoder on it) is detected by storage adjacency and reused as is."""
        out_w, out_b = [], []
        for blk in self.model.layers:
            at = blk.attn
            ws = [at.wq, at.wk, at.wv]
            bs = [at.bq, at.bk, at.bv] if at.bq is not None else None
            out_w.append(self._fuse_params(ws))
            out_b.append(self._fuse_params(bs) if bs is not None else None)
        return out_w, out_b

    @torch.no_grad()
    def _fold_norms(self):
        """Per layer, the block's two norms folded into the sparse gathers that read their outputs (None where the
        part is dense, the norm has no gain, or a layernorm precedes a SwiGLU): the gather then reads the raw
        residual stream and normalizes in its epilogue, so a sparse part runs no norm kernel.

        Only at batch 1 (the gathers' CUDA-core path): on the tensor-core path (B > 1) the gain multiply puts x
        through registers before tl.dot, and OPT-13B (0.1, 0.5) at B=4 measured 10.9 ms per step against 7.8 ms
        dense (H200), where the norm kernel + plain gather had given 1.5x over dense (bench/NOTES.md, v4)."""
        f1, f2 = [], []
        for l, blk in enumerate(self.model.layers):
            n1, n2, mlp = blk.norm1, blk.norm2, blk.mlp
            ok1 = (self.k_heads[l] < self.spec.n_heads or self._qkv_gather[l]) and n1.weight is not None
            ok2 = not self._cublas_mlp[l] and n2.weight is not None and \
                (mlp.w3 is None or n2.kind == "rmsnorm")
            f1.append(K.fold_norm(self._wqkv[l], n1.kind, n1.weight, n1.bias, n1.eps, self._bqkv[l]) if ok1 else None)
            f2.append(K.fold_norm(mlp.w1, n2.kind, n2.weight, n2.bias, n2.eps, mlp.b1) if ok2 else None)
        return f1, f2

    @staticmethod
    def _fuse_params(ps):
        base = ps[0].data
        n = sum(p.shape[0] for p in ps)
        st = base.untyped_storage()
        adjacent, off = True, base.storage_offset()
        for p in ps:
            if not p.data.is_contiguous() or p.data.untyped_storage().data_ptr() != st.data_ptr() \
                    or p.data.storage_offset() != off:
                adjacent = False
                break
            off += p.numel()
        if adjacent:
            return base.as_strided((n,) + tuple(base.shape[1:]), base.stride())
        fused = torch.cat([p.data for p in ps], 0)
        r = 0
        for p in ps:
            p.data = fused[r:r + p.shape[0]]
            r += p.shape[0]
        return fused

    def _prepare_predictors(self, p):
        """Row-per-output copies in the model's dtype: the first factors of the head and the MLP predictor of a layer
        stacked, ``a_t = [a_h; a_m]`` ([r_h + r_m, d]: both read the same input, one GEMV), and each second factor
        ``b`` ([n, r], ``nn.Linear`` layout) with its bias. Entries: kind -> (lo, hi, b, bias, b_scale), lo:hi its
        columns of the first factor's output; ``a_scale``. A set marked int8 (``PredictorSet.quantize_int8``) is
        stored as int8 rows with their fp32 scales (``quantize_rows``), which the GEMVs multiply in; otherwise the
        scales are None. A predictor that reads fewer bytes as its product (``kernels.runs_as_product``: a head
        predictor) is kept as ``b @ a`` ([n, d], made in float64 from the stored factors, then the model's dtype),
        scored from the stream in one GEMV: (None, None, b @ a, bias, None), and has no rows in ``a_t``."""
        p.check_model(self.spec)
        kw = dict(device=self.device, dtype=self.dtype)

        def rows(w):  # -> (weight as the GEMV reads it, its scale or None)
            return quantize_rows(w.detach().to(self.device)) if p.int8 else (w.detach().to(**kw).contiguous(), None)

        out = []
        for l in range(self.spec.n_layers):
            ent, firsts = {}, []
            for kind, mod, k, n in (("head", p.head[l], self.k_heads[l], self.spec.n_heads),
                                    ("mlp", p.neuron[l], self.k_mlp[l], self.spec.ffn_dim)):
                if k >= n:  # dense layers run no predictor and keep no copy
                    continue
                bias = mod.b.bias.detach().to(**kw).contiguous()
                r = mod.a.weight.shape[0]
                if self.predictor_products and K.runs_as_product(self.spec.d_model, r, n, self.dtype, p.int8):
                    w = mod.b.weight.detach().double() @ mod.a.weight.detach().double()
                    ent[kind] = (None, None, w.to(**kw).contiguous(), bias, None)
                else:
                    lo = sum(f.shape[0] for f in firsts)
                    firsts.append(mod.a.weight)
                    b, b_scale = rows(mod.b.weight)
                    ent[kind] = (lo, lo + r, b, bias, b_scale)
            if firsts:
                ent["a_t"], ent["a_scale"] = rows(torch.cat(firsts, 0))
            out.append(ent)
        return out

    # ---- bytes ------------------------------------------------------------------------------------------------------
    def bytes_per_token(self, dense: bool = False) -> int:
        """Weight bytes one decode step reads: selected rows (at the configured k) + dense parts + biases + norms +
        the predictors of the layers that run them + LM head (+ the embedding row). KV-cache reads: ``kv_bytes``."""
        s = self.spec
        d, hd, H, Hkv, N = s.d_model, s.head_dim, s.n_heads, s.n_kv_heads, s.ffn_dim
        nw = 2 if s.norm_kind == "layernorm" else 1
        elem_size = torch.empty((), dtype=self.dtype).element_size()
        n = d * (2 if s.pos_kind == "learned" else 1) + nw * d + s.vocab_size * d  # embed row(s), norm_f, LM head
        if not dense and self._split0():  # layer 0's split neuron half embeds the token (and position) itself
            n += d * (2 if s.pos_kind == "learned" else 1)
        if not dense and self._fold_head() and self._fold_f.rowsum is not None:
            n += s.vocab_size * 8 // elem_size  # the folded layernorm's two fp32 constants per vocabulary row
        meta = self.predictors.meta if self.predictors is not None else None
        pred = 0  # bytes: int8 factors are not in elem_size units
        for l in range(s.n_layers):
            kh, km, kkv = (H, N, Hkv) if dense else (self.k_heads[l], self.k_mlp[l], self.k_kv[l])
            n += 2 * nw * d
            n += 2 * kh * hd * d + (kh * hd if s.attn_bias else 0) + (d if s.out_bias else 0)  # q, o
            n += 2 * kkv * hd * d + (2 * kkv * hd if s.attn_bias else 0)  # k, v
            n += (3 if s.mlp_kind == "swiglu" else 2) * km * d + ((km + d) if s.mlp_bias else 0)
            if not dense:  # a folded layernorm reads two fp32 constants per selected row instead of the bias
                for fold, rows, has_b in ((self._fold1[l], (kh + 2 * kkv) * hd, s.attn_bias),
                                          (self._fold2[l], km, s.mlp_bias)):
                    if fold is not None and fold.rowsum is not None:
                        n += rows * (8 // elem_size - (1 if has_b else 0))
            if not dense and meta is not None:
                for k, full, r in ((kh, H, meta["head_rank"]), (km, N, meta["mlp_rank"])):
                    if k < full:
                        pred += K.predictor_bytes(d, r, full, self.dtype, int8=self.predictors.int8,
                                                  products=self.predictor_products)
        return n * elem_size + pred

    def dense_bytes_per_token(self) -> int:
        return self.bytes_per_token(dense=True)

    def kv_bytes(self, seq_len: int) -> int:
        """KV-cache bytes the attention reads in one step at context ``seq_len`` (each selected head reads its
        KV head's K and V; heads of one GQA group do not share loads)."""
        s = self.spec
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.batch * sum(self.k_heads) * seq_len * s.head_dim * 2 * elem

    def describe(self) -> dict:
        deferred_o = self._deferred_o()
        return {"batch": self.batch, "max_len": self.max_len, "kv_policy": self.kv_policy, "backend": self.backend,
                "graph": self.use_graph, "overlap": self._side is not None, "lookahead": self.lookahead,
                "fork_at": self.fork_at, "side_pdl": self.side_pdl, "prewait_gathers": self.prewait_gathers,
                "defer_mlp_finish": any(self._deferred()), "defer_oproj_finish": any(deferred_o),
                "fuse_oproj_mlp": any(self._fused_tail()),
                "fuse_norm": self.fuse_norm, "fuse_mlp": any(self._fused_mlp), "fuse_attn": self.fuse_attn,
                "neuron_topk": self._topk, "split_first_prediction": self._split0(), "dense_mlp": self.dense_mlp,
                "dense_attn": self.dense_attn,
                "oproj_writes_next": any(self._oproj_writes_next(l, on) for l, on in enumerate(deferred_o)),
                "fold_final_norm": self._fold_head(),
                "predictor_weights": None if self._pred is None else "int8" if self.predictors.int8 else
                str(self.dtype).removeprefix("torch."),
                "predictor_products": [kind for kind in ("head", "mlp")
                                       if any(e.get(kind, (0,))[0] is None for e in self._pred or [])],
                "k_heads": self.k_heads, "k_mlp": self.k_mlp, "k_kv": self.k_kv,
                "kernels_per_layer": self._kernel_summary()}

    def _kernel_summary(self) -> dict:
        per = self.kernels_per_layer()
        kinds = {}
        for p in per:
            key = f"main {p['main']}, side {p['side']}"
            kinds[key] = kinds.get(key, 0) + 1
        # + embed, norm_f (unless folded), LM head, pos
        return {"layers": kinds, "main_total": sum(p["main"] for p in per) + (3 if self._fold_head() else 4)}

    # ---- prefill ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Dense forward over the prompt ids (B, T) into this runtime's cache -> last-position logits (B, V).

        The model's own forward writes the KVCache objects (whose buffers the graph reads), so prefill and the
        reference agree by construction; every prompt position is valid (K/V for all heads).
        """
        self._check_ids(ids)
        T = ids.shape[1]
        if T > self.max_len - 1:
            raise ValueError(f"prompt of {T} tokens leaves no room in max_len={self.max_len}")
        logits = self.model(ids, 0, self.caches, sparsity=None, kv_policy="all")[:, -1]
        self._pos.fill_(T)
        self._len = T
        return logits

    # ---- decode -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at the next position -> logits (B, V). Graph replay when captured (captures on first use)."""
        if tokens.shape != (self.batch,):
            raise ValueError(f"tokens must have shape ({self.batch},), got {tuple(tokens.shape)}")
        if tokens.device.type == "cpu":  # free to check on the host; on the device it would sync every step, and an
            # id out of range gives NaN logits there instead (kernels.fused_ops.embed_fused)
            V = self.spec.vocab_size
            bad = (tokens < 0) | (tokens >= V)
            if bad.any():
                raise ValueError(f"token ids must be in [0, {V}) (the model's vocabulary), got {tokens[bad].tolist()}")
        if self._len >= self.max_len:
            raise ValueError(f"KV cache full: {self._len} positions used of max_len={self.max_len}")
        self._tok.copy_(tokens)
        if self.use_graph:
            if self._graph is None:
                self.capture()
            self._graph.replay()
            out = self._graph_out
        else:
            out = self._step()
        self._len += 1
        return out

    @torch.no_grad()
    def capture(self, warmup: int = 2):
        """Capture one decode step in a CUDA graph, on a stream of this decoder's own that is none of its side
        streams (distinct_streams). Warm-up runs (Triton JIT, cuBLAS handles, allocator) happen on that stream
        first; each rewinds the position, so they only write the next slot, which the real step rewrites before
        anything reads it."""
        if not self.use_graph:
            raise ValueError("capture() needs CUDA and use_graph=True")
        if self._len >= self.max_len:
            raise ValueError("KV cache full: no slot for the capture warm-up")
        pos0 = self._pos.clone()
        stream = distinct_streams(self.device, 1, self.capture_priority, avoid=(self._side, self._side0))[0]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
                self._pos.copy_(pos0)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            out = self._step()
        self._pos.copy_(pos0)  # capture does not execute, but be explicit
        self._graph, self._graph_out, self._capture_stream = g, out, stream

    def _step(self) -> torch.Tensor:
        """One decode step on static buffers: self._tok at self._pos -> logits (B, V); advances self._pos."""
        if self.fork_at not in FORK_POINTS:
            raise ValueError(f"fork_at must be one of {FORK_POINTS}, got {self.fork_at!r}")
        if self.side_pdl not in SIDE_PDL_OFF:
            raise ValueError(f"side_pdl must be one of {tuple(SIDE_PDL_OFF)}, got {self.side_pdl!r}")
        if self.prewait_gathers not in PREWAIT_FORMS:
            raise ValueError(f"prewait_gathers must be one of {PREWAIT_FORMS}, got {self.prewait_gathers!r}")
        m, L = self.model, self.spec.n_layers
        pos = self._pos
        x0 = self._x[0]
        main = torch.cuda.current_stream(self.device) if self._side is not None else None
        split0 = self._split0()
        if split0:
            # layer 0's neurons beside its heads, q/k/v gather and attention, joined before its MLP block. The branch
            # makes its own copy of x0 (its own embedding launch) and so depends on nothing in the step: forked after
            # the main stream's embedding instead, its first kernel started only once layer 0's gather was running,
            # 28 us late, and layer 0 ended later on three of four models (H200, bench/NOTES.md v14)
            self._side0.wait_stream(main)
            with torch.cuda.stream(self._side0):
                x0b = self._bufs0["x"]
                lp = m.pos_embed.weight if m.pos_embed is not None else None
                self.ops.embed(self._tok, m.embed.weight, pos if lp is not None else None, lp, x0b)
                self._predict(0, x0b, heads=False, mlp=True, side=True, bufs=self._bufs0)
                self._mlp_ready[0].record(self._side0)
        # one launch: x0 = token row (+ learned position row), and with RoPE this step's (cos | sin) row of the table
        wpe = m.pos_embed.weight if m.pos_embed is not None else self._rope_table
        self.ops.embed(self._tok, m.embed.weight, pos if wpe is not None else None, wpe, x0, self._rope_row)
        # valid cache length incl. this token, for the unfused attention (the fused one reads pos itself)
        lens = None if self.fuse_attn else (pos + 1).to(torch.int32)
        hd = self.spec.head_dim  # (cos, sin) [B, hd] views, applied in qkv_post / the attention; or None
        rope = (self._rope_row[:, :hd], self._rope_row[:, hd:]) if self._rope_row is not None else None
        if split0:
            self._predict(0, x0, heads=True, mlp=False)
        elif self.lookahead:
            self._predict(0, x0, heads=True, mlp=True)
        forked = set()  # layers whose selection runs on the side stream in this step (joins only wait on these)
        defer = self._deferred()
        # unfinished o_projs: each adds into its layer's sums and clears those of the one before it (cyclic: the last
        # one's, consumed in the previous step), whose MLP block has run by then
        o_layers = [l for l, on in enumerate(self._deferred_o()) if on]
        o_defer = {l: (self._o_ws[l].view(self.batch, -1), self._o_ws[o_layers[i - 1]])
                   for i, l in enumerate(o_layers)}  # fmt: skip
        fused_tail = self._fused_tail()
        for l in range(L):
            if l in forked:
                main.wait_event(self._heads_ready[l])  # layer l's heads are chosen (they ran during layer l-1)
            fork = None
            if self.lookahead and l + 1 < L:
                if main is not None:
                    if self._pred[l + 1]:  # fork only for layers that run a predictor
                        fork = functools.partial(self._fork, l + 1)
                        forked.add(l + 1)
                else:
                    self._predict(l + 1, self._x[l], heads=True, mlp=True)
            elif not self.lookahead:
                self._predict(l, self._x[l], heads=True, mlp=False)
            # prewait_gathers: not layer 0's q/k/v gather, whose selection the step's first prediction (main stream)
            # may write in the kernel right before it
            neurons_side = l in forked or (split0 and l == 0)
            self._block(l, lens, rope, mlp_ready=self._mlp_ready[l] if neurons_side else None, fork=fork,
                        finish_in=l > 0 and defer[l - 1], finish_out=not defer[l], o_defer=o_defer.get(l),
                        fused_tail=fused_tail[l],
                        rows_prewait=self.prewait_gathers in (True, "rows") and self.lookahead and l > 0)  # fmt: skip
        if forked:
            main.wait_stream(self._side)
        if split0:
            main.wait_stream(self._side0)
        nf = m.norm_f
        if self._fold_head():
            logits = self.ops.head(self._x[L], m.lm_head.weight, self._vocab, self._fold_f)
        else:
            h = self.ops.norm(self._x[L], nf.kind, nf.weight, nf.bias, nf.eps, self._h)
            logits = F.linear(h, m.lm_head.weight)
        pos.add_(1)
        return logits

    def _fold_head(self) -> bool:
        """Does the LM head gather run the final norm (``fold_final_norm``)?"""
        return self.fold_final_norm and self._fold_f is not None

    def _split0(self) -> bool:
        """Is layer 0's prediction split (its neurons on their own stream; ``split_first_prediction``)?"""
        return self.lookahead and self.split_first_prediction and self._side0 is not None

    def _deferred(self) -> list[bool]:
        """Per layer: does its MLP block leave its sums for the next layer's q/k/v gather (defer_mlp_finish)? Only
        where both layers run the fused block (the next one clears the consumed workspace), the next q/k/v gather
        is the sparse one with its norm folded (it reads all of x), and nothing reads x_{l+1} before that gather:
        a side stream forking after it (not ``start``), lookahead predictors. Never the last layer."""
        L, H = self.spec.n_layers, self.spec.n_heads
        ok = (self.defer_mlp_finish and self._mlp_ws is not None and self._side is not None and self.lookahead
              and self.fork_at != "start" and self._fma)  # fmt: skip
        return [ok and l + 1 < L and self._fused_mlp[l] and self._fused_mlp[l + 1] and self._fold1[l + 1] is not None
                and self.k_heads[l + 1] < H for l in range(L)]  # fmt: skip

    def _oproj_writes_next(self, l: int, deferred: bool) -> bool:
        """Does layer l's o_proj also write x_next = mid + b2 (oproj_writes_next)? Where the MLP part is the dense
        up_gather and the o_proj is the column gather with its epilogue (not cuBLAS; not ``deferred``, an unfinished
        o_proj of _deferred_o, whose up gather writes x_next instead)."""
        return self.oproj_writes_next and self._up_gather[l] and self._attn_gathers(l) and not deferred

    def _capped_mlp(self) -> bool:
        """Whether some layer's fused MLP block will launch with a register cap (``mlp_block.launch_maxnreg``: its one
        loop where the programs outnumber the SMs), which decides the side stream's priority (SIDE_PRIORITY)."""
        if self.backend != "triton" or self.device.type != "cuda" or not K.HAS_TRITON:
            return False
        swiglu, d = self.spec.mlp_kind == "swiglu", self.spec.d_model
        return any(K.mlp_block.register_cap(self.batch, km, d, swiglu, self.device) is not None
                   for km, fused in zip(self.k_mlp, self._fused_mlp) if fused)  # fmt: skip

    def _attn_gathers(self, l: int) -> bool:
        """Are layer l's attention projections the gathers (q/k/v row gather, o_proj column gather), not cuBLAS? The
        sparse heads', or every head's at B = 1 (dense_attn="qkv_gather")."""
        return self.k_heads[l] < self.spec.n_heads or self._qkv_gather[l]

    def _deferred_o(self) -> list[bool]:
        """Per layer: does its o_proj leave its sums for its MLP part (defer_oproj_finish)? Where the MLP part
        reads all of the residual after attention with its norm folded, and nothing else reads it (lookahead
        predictors, B = 1): the fused sparse MLP block after the sparse o_proj, or the dense MLP's up gather
        (up_gather) after the o_proj gather, which then also writes x_next = mid + b2 for cuBLAS's fc2. Each
        unfinished o_proj clears the previous one's sums, so it takes at least two such layers (else none)."""
        H = self.spec.n_heads
        ok = self.defer_oproj_finish and self._o_ws is not None and self.lookahead and self._fma
        on = [ok and self._fold2[l] is not None and ((self.k_heads[l] < H and self._fused_mlp[l])
                                                      or (self._up_gather[l] and self._attn_gathers(l)))
              for l in range(self.spec.n_layers)]  # fmt: skip
        return on if sum(on) >= 2 else [False] * len(on)

    def _fused_tail(self) -> list[bool]:
        """Per layer: do its unfinished o_proj (_deferred_o) and its fused MLP block run as one launch
        (``fuse_oproj_mlp``, ``kernels.oproj_mlp``)? (_deferred_o with a fused block implies the sparse o_proj.)"""
        return [on and self.fuse_oproj_mlp and self._fused_mlp[l] for l, on in enumerate(self._deferred_o())]

    def _fork(self, l: int):
        """Layer l's lookahead prediction on the side stream, from x_{l-1} (written before this point of the main
        stream); records when its heads and its neurons are chosen."""
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            self._predict(l, self._x[l - 1], heads=True, mlp=True, heads_done=self._heads_ready[l], side=True)
            self._mlp_ready[l].record(self._side)

    def _launch(self, side: bool, part: str):
        """Launch context of one part of a side-stream prediction: without PDL if ``side_pdl`` says so."""
        return KC.pdl_suspended() if side and part in SIDE_PDL_OFF[self.side_pdl] else contextlib.nullcontext()

    def _predict(self, l: int, x: torch.Tensor, heads: bool, mlp: bool, heads_done=None, side: bool = False,
                 bufs=None):  # fmt: skip
        """Score layer l's heads / neurons from x (B, d) and write its fixed-size selections in place.

        One GEMV for the first factors with LowRank's RMS normalization fused (fp32 out): both predictors' stacked,
        or only the one predictor's rows where only its half runs; one GEMV per second factor (+ bias, max over the
        batch in its epilogue), then the top-k (``select_topk``). A predictor kept as its product (a head predictor,
        ``PREDICTOR_PRODUCTS``) is one GEMV on x, normalization, bias and batch max fused, then its top-k. The head
        selection goes straight into the combined q/k/v index (MHA with K/V holes: three offset copies in the same
        launch), the neuron selection into the layer's index (unsorted: the gathers take any order). ``heads_done``:
        an event recorded on the current stream once the head selection is written (before the neuron half).
        ``bufs``: the neuron half's own first factor, scores and radix buffers (``_bufs0``), for a call that may
        overlap another prediction."""
        ent = self._pred[l] if self._pred is not None else {}
        do_h, do_m = heads and "head" in ent, mlp and "mlp" in ent
        if not (do_h or do_m):
            if heads_done is not None:
                heads_done.record()
            return
        ops = self.ops
        bufs = bufs or {"xa": self._xa, "scores": self._scores[self.spec.ffn_dim], "ws": self._radix}
        # the first factors of the predictors that run here and are not kept as their product: one GEMV, first; after
        # the head selection where the heads are scored from their product (MLP_FIRST_AFTER_HEADS)
        factored = [kind for kind, on in (("head", do_h), ("mlp", do_m)) if on and ent[kind][0] is not None]
        late = do_h and ent["head"][0] is None and MLP_FIRST_AFTER_HEADS
        xa, off = (None, 0) if late or not factored else self._first_factors(ent, x, factored, side, bufs)

        def scores(kind, out, hist=None):  # -> [1, n]: the second factor on xa, or the product on x (normalized)
            lo, hi, b, bias, b_scale = ent[kind]
            src, norm = (x, True) if lo is None else (xa[:, lo - off:hi - off], False)
            return ops.factor(src, b, bias, norm, out, batch_max=True, hist=hist, scale=b_scale)

        if do_h:
            kh, idx = self.k_heads[l], self._qkvidx[l]
            with self._launch(side, "heads"):
                sc = scores("head", self._scores[self.spec.n_heads])
                if self.holes[l] and self.spec.group_size == 1:  # [q; k; v] rows of the same heads
                    ops.select(sc, kh, idx, copies=3, offset=self.spec.n_heads)
                else:
                    ops.select(sc, kh, idx[:kh])  # == self._hidx[l]
                    if self.holes[l]:
                        kv = self._select_kv(l, idx[:kh])
                        torch.add(kv[None, :], self._kv_offs, out=idx[kh:].view(2, -1))
        if heads_done is not None:
            heads_done.record()
        if do_m:
            if late and factored:
                xa, off = self._first_factors(ent, x, factored, side, bufs)
            ws, how = bufs["ws"], self._topk
            with self._launch(side, "scores"):
                sc = scores("mlp", bufs["scores"], hist=ws["hist"] if how == "radix-gemv" else None)
            with self._launch(side, "select"):
                ops.select(sc, self.k_mlp[l], self._nidx[l], ws=ws, hist_ready=how == "radix-gemv",
                           radix=how != "torch")

    def _first_factors(self, ent, x, factored, side, bufs):
        """The first factors of the ``factored`` predictors of a layer entry on x, in one GEMV with LowRank's RMS
        normalization fused: -> (xa [B, width] fp32, off: the first column's offset in the stacked ``a_t``)."""
        a, a_scale, off = ent["a_t"], ent["a_scale"], 0
        if len(factored) == 1:  # one predictor's first factor only: its rows of a_t, its columns of the output
            off, hi = ent[factored[0]][:2]
            a, a_scale = a[off:hi], a_scale[off:hi] if a_scale is not None else None
        with self._launch(side, "first"):
            return self.ops.factor(x, a, None, True, bufs["xa"][a.shape[0]], scale=a_scale), off

    def _select_kv(self, l, heads):
        """GQA: a fixed-size KV set, the needed KV heads first, padded with unneeded ones (-> self._kvidx[l])."""
        g, Hkv = self.spec.group_size, self.spec.n_kv_heads
        need = torch.zeros(Hkv, dtype=torch.float32, device=self.device).index_fill_(0, heads // g, 1.0)
        if self.k_kv[l] < Hkv:
            self._kvidx[l].copy_(torch.sort(torch.topk(need, self.k_kv[l]).indices).values)
        return self._kvidx[l]

    def _block(self, l: int, lens, rope, mlp_ready=None, fork=None, finish_in=False, finish_out=True, o_defer=None,
               fused_tail=False, rows_prewait=False):  # fmt: skip
        """Layer l on the main stream; ``fork`` (the side stream's prediction of layer l+1) is called at the point
        ``fork_at`` names. ``finish_in``: layer l-1's MLP block left its sums unfinished, so this layer's q/k/v gather
        makes x_l (and this layer's MLP block clears that workspace); ``finish_out=False``: this layer's block leaves
        its own sums for layer l+1 (defer_mlp_finish). ``o_defer``: (sums, other) when the o_proj leaves its sums
        (zeroed ``[B, d]`` fp32) for the MLP block, which makes and writes the residual after attention from them;
        the o_proj clears ``other`` (defer_oproj_finish); ``fused_tail``: with o_defer, the o_proj and the MLP block
        run as one launch (fuse_oproj_mlp). ``rows_prewait``: the q/k/v gather may read its selection before its PDL
        wait (prewait_gathers)."""
        point = self.fork_at if fork is not None else None
        if point == "start":
            fork()
        s, m, ops = self.spec, self.model, self.ops
        blk = m.layers[l]
        at, mlp, cache = blk.attn, blk.mlp, self.caches[l]
        B, H, Hkv, hd = self.batch, s.n_heads, s.n_kv_heads, s.head_dim
        x, x_next, mid = self._x[l], self._x[l + 1], self._mid
        kh, kkv = self.k_heads[l], self.k_kv[l]
        dense_heads, dense_mlp, up_gather = not self._attn_gathers(l), self._cublas_mlp[l], self._up_gather[l]
        n1, n2, fold1, fold2 = blk.norm1, blk.norm2, self._fold1[l], self._fold2[l]
        # norm1 (unless folded into the q/k/v gather); a dense o_proj accumulates in place into mid, so
        # mid = x + bo is written here in the same pass
        if fold1 is None:
            h = ops.norm(x, n1.kind, n1.weight, n1.bias, n1.eps, self._h, init=mid if dense_heads else None,
                         init_bias=at.bo)
        if dense_heads:  # then every KV head too
            qkv = F.linear(h, self._wqkv[l], self._bqkv[l]).view(B, H + 2 * Hkv, hd)
            hidx, kvidx = self._all_heads, self._all_kv
        else:
            hidx, kvidx = self._hidx[l], self._kvidx[l]
            if fold1 is None:
                qkv = ops.rows(h, self._wqkv[l], self._qkvidx[l], hd, self._bqkv[l],
                               prewait=rows_prewait)  # (B, kh + 2 kkv, hd)  # fmt: skip
            else:  # finish_in: x_l = (sums of layer l-1's MLP block + its b2) + its residual, made and written here
                x_sum = K.XSum(self._mlp_ws[(l - 1) % 2]["acc"][:B * s.d_model].view(B, -1), m.layers[l - 1].mlp.b2,
                               mid) if finish_in else None  # fmt: skip
                qkv = ops.rows(x, self._wqkv[l], self._qkvidx[l], hd, None, norm=fold1, x_sum=x_sum,
                               prewait=rows_prewait)  # fmt: skip
        if point == "qkv":
            fork()
        valid = cache.valid if self.holes[l] else None
        cos, sin = rope if rope is not None else (None, None)
        if self.fuse_attn:
            a = ops.qkv_attn(qkv, kvidx, cache.k, cache.v, self._pos, hidx, s.group_size, cos, sin, valid)
        else:
            q_out = self._q[kh] if rope is not None else None
            ops.post(qkv, kh, kkv, q_out, cache.k, cache.v, kvidx, self._pos, cos=cos, sin=sin, valid=valid,
                     hidx=hidx, group=s.group_size)  # fmt: skip
            q = q_out if q_out is not None else qkv[:, :kh]
            a = ops.attn(q, cache.k, cache.v, lens, hidx, s.group_size, valid)  # (B, kh, hd)
        if point == "attn":
            fork()
        # o_proj's prewait: the kernels just before it (attention, combine) write only a, and the selection was joined
        # before the q/k/v gather, which has completed once they run
        # and x_next = mid + b2, into which cuBLAS adds fc2
        next_by_oproj = self._oproj_writes_next(l, o_defer is not None)
        if dense_heads:
            mid.addmm_(a.reshape(B, H * hd), at.wo_t)
        elif fused_tail:  # launched with the MLP block below (kernels.oproj_mlp)
            pass
        elif o_defer is not None:  # mid = (sums + bo) + x, made by the MLP block
            ops.oproj(a, at.wo_t, hidx, hd, None, None, o_defer[0], finish=False, zero=o_defer[1], prewait=True)
        else:
            ops.oproj(a, at.wo_t, hidx, hd, at.bo, x, mid, prewait=True,
                      **({"out2": x_next, "bias2": mlp.b2} if next_by_oproj else {}))  # fmt: skip
        if point == "oproj":
            fork()
        # norm2 (unless folded into the up gather); a dense fc2 accumulates in place into x_next = mid + b2,
        # written here
        if fold2 is None:
            h2 = ops.norm(mid, n2.kind, n2.weight, n2.bias, n2.eps, self._h, init=x_next if dense_mlp else None,
                          init_bias=mlp.b2)
        if not self.lookahead:
            self._predict(l, mid, heads=False, mlp=True)
        if dense_mlp:
            if mlp.w3 is None:
                act = F.linear(h2, mlp.w1, mlp.b1).relu_()
            else:
                act = F.silu(F.linear(h2, mlp.w1)) * F.linear(h2, mlp.w3)
            x_next.addmm_(act, mlp.w2t)
        elif up_gather:  # every neuron's up row (norm folded, activation fused), then x_next = mid + b2 + act @ w2t
            xin, b1 = (h2, mlp.b1) if fold2 is None else (mid, None)
            # o_defer: mid = (sums + bo) + x and x_next = mid + b2, both made and written by the up gather
            x_sum = K.XSum(o_defer[0], at.bo, x, x_next, mlp.b2) if o_defer is not None else None
            act = ops.up(xin, mlp.w1, mlp.w3, self._nidx[l], b1, norm=fold2, x_sum=x_sum)
            if not next_by_oproj and x_sum is None:  # (else the o_proj or the up gather has written x_next)
                if mlp.b2 is None:
                    x_next.copy_(mid)
                else:
                    torch.add(mid, mlp.b2, out=x_next)
            x_next.addmm_(act, mlp.w2t)
        else:
            if mlp_ready is not None:  # the lookahead neuron selection of this layer is written
                torch.cuda.current_stream(self.device).wait_event(mlp_ready)
            nidx = self._nidx[l]
            xin, b1 = (h2, mlp.b1) if fold2 is None else (mid, None)
            if self._fused_mlp[l]:  # deferring (Triton ops only): leave the sums / clear the consumed workspace
                defer = ({"finish": finish_out, "zero": self._mlp_ws[(l - 1) % 2]["acc"] if finish_in else None}
                         if finish_in or not finish_out else {})  # fmt: skip
                ws = self._mlp_ws[l % 2] if self._mlp_ws is not None else None
                b2, res = (mlp.b2, mid) if finish_out else (None, None)
                if fused_tail:  # the o_proj's items, then the block's on mid made from their sums, in one launch
                    ops.oproj_mlp(a, at.wo_t, hidx, hd, o_defer[0], o_defer[1], at.bo, x, xin, mlp.w1, mlp.w3,
                                  mlp.w2t, nidx, b2, res, x_next, fold2, ws, **defer)  # fmt: skip
                else:
                    if o_defer is not None:  # and make mid from the o_proj's sums
                        defer["x_sum"] = K.XSum(o_defer[0], at.bo, x)
                    ops.mlp(xin, mlp.w1, mlp.w3, mlp.w2t, nidx, b1, b2, res, x_next, fold2, ws,
                            prewait=self.prewait_gathers in (True, "mlp") and self.lookahead,
                            **defer)  # fmt: skip
            else:
                act = ops.up(xin, mlp.w1, mlp.w3, nidx, b1, norm=fold2)
                ops.down(act, mlp.w2t, nidx, mlp.b2, mid, x_next)

    def kernels_per_layer(self) -> list[dict]:
        """Kernel launches per layer of one graphed step (static count of this code path, B and backend aside):
        'main' on the critical path, 'side' the lookahead predictor for the next layer (overlapped)."""
        s, out = self.spec, []
        bias = s.attn_bias
        deferred_o, fused_tail = self._deferred_o(), self._fused_tail()
        for l in range(s.n_layers):
            dense_h, dense_m = not self._attn_gathers(l), self._cublas_mlp[l]
            n = 0 if self._fold1[l] is not None else 1  # norm1 (+ residual init), unless folded
            n += (2 if bias else 1) if dense_h else 1  # fused qkv GEMV (+ cuBLAS bias copy at M = 1) / one gather
            n += 2 if self.fuse_attn else 3  # [qkv_post (RoPE, q, K/V cache write, hole mask)], attention, combine
            n += 0 if fused_tail[l] else 1  # o_proj: in-place addmm_ (dense) / head_gather_down (fused bias +
            # residual), or in one launch with the MLP block (fuse_oproj_mlp)
            n += 0 if self._fold2[l] is not None else 1  # norm2 (+ residual init), unless folded
            if dense_m:
                n += (3 if s.mlp_bias else 2) + 1 if s.mlp_kind == "relu" else 5  # fc1 (+bias copy), relu, fc2
            elif self._up_gather[l]:  # the up gather over every neuron, [the residual copy (+ b2)], fc2
                n += 2 if self._oproj_writes_next(l, deferred_o[l]) or deferred_o[l] else 3
            else:  # sparse_mlp, or gather_up / gather_swiglu + gather_down (split-k reduced in the same launch)
                n += 1 if self._fused_mlp[l] else 2
            side = 0
            ent = self._pred[l] if self._pred is not None else {}
            if ent:
                # first factors with the RMS norm fused: those of the factored predictors in one GEMV, or one each
                # where the halves run apart (without lookahead; layer 0's split); none where both are products
                apart = not self.lookahead or (l == 0 and self._split0())
                factored = sum(1 for kind in ("head", "mlp") if kind in ent and ent[kind][0] is not None)
                side = min(factored, 2 if apart else 1)
                side += 1 if l == 0 and self._split0() else 0  # the split neuron half's own embedding launch
                if "head" in ent:
                    side += 2  # second factor (or the product), top-k (MHA: q/k/v index copies in the same launch)
                    side += 5 if (self.holes[l] and s.group_size > 1) else 0  # KV set: fill, topk, sort, copy, add
                if "mlp" in ent:
                    # second factor; top-k: one launch (short vectors, or radix select after the histogram the
                    # second factor fills), torch.topk: 13 launches at N = 20480 with 16-bit scores (profiled), the
                    # A/B "radix-torch": radix select after ~15 torch ops building the histogram (counted in the
                    # code, not profiled)
                    small = self.spec.ffn_dim <= K.predictor_ops.SMALL_N  # topk_select: one launch
                    side += 1 + (1 if small else {"radix-gemv": 1, "radix-torch": 16, "torch": 13}[self._topk])
            out.append({"main": n, "side": side})
        return out

    # ---- generate ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, ids: torch.Tensor, n_new: int) -> FastGeneration:
        """Greedy: prefill (first new token) + n_new - 1 decode steps (graph replays), each step timed.

        CUDA: one event per step boundary, read after the loop (no sync inside it); CPU: wall clock per step.
        """
        self._check_ids(ids)
        B, T = ids.shape
        if n_new < 1:
            raise ValueError("n_new must be >= 1")
        if T + n_new > self.max_len:
            raise ValueError(f"prompt ({T}) + n_new ({n_new}) exceeds max_len={self.max_len}")
        self._pos.zero_()
        self._len = 0
        if self.use_graph and self._graph is None:
            self.capture()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        tok = self.prefill(ids).argmax(-1)
        if cuda:
            torch.cuda.synchronize(self.device)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        out = [ids, tok[:, None]]
        marks = []
        for _ in range(n_new - 1):
            marks.append(self._mark(cuda))
            tok = self.decode_step(tok).argmax(-1)
            out.append(tok[:, None])
        marks.append(self._mark(cuda))
        if cuda:
            torch.cuda.synchronize(self.device)
            step_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        else:
            step_ms = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
        return FastGeneration(torch.cat(out, 1), step_ms, prefill_ms)

    @staticmethod
    def _mark(cuda: bool):
        if not cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _check_ids(self, ids):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"ids must be a (batch={self.batch}, T) tensor of token ids, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.device != self.device:
            raise ValueError(f"ids are on {ids.device}, the model on {self.device}")
