"""The attention's output projection and the sparse MLP block after it, in one launch (ticketed work items).

At batch 1 each kernel of the decode step costs a few microseconds before its bytes (bench/NOTES.md v24: 4.9 us
for the o_proj column gather, 8.3 for the MLP block), and a PDL hand-off between two kernels waits for the whole
first grid to complete. Here one grid runs both, its work handed out by tickets (an atomic counter, so in the order
programs take them):

1. tickets ``< n_o`` are o_proj items: one column slab of ``a @ wo_t[rows of the selected heads]`` over one split
   of its rows (the FMA body of :func:`~dejavu.kernels.head_sparse.head_gather_down`), added into the fp32
   ``o_sums`` with atomics; then one arrival per item (every thread fenced, barrier, a release add);
2. the MLP items are the programs of :func:`~dejavu.kernels.mlp_block.sparse_mlp`, with x made from ``o_sums``
   (``XSum(o_sums, bo, x_res)``; the first item writes it): each waits (one thread polling) until all ``n_o``
   o_proj items have arrived, then runs the block.

By default (``PERSISTENT``) the grid has one program an MLP item: every program takes o_proj tickets until none is
left, and its first ticket past them names its MLP item. Otherwise every program takes one ticket: an o_proj item or
an MLP item. Either way a program waits only once every o_proj ticket is taken, by programs already running that wait
on nothing in this launch: no deadlock, whatever the number of programs an SM holds, and under the interpreter
(programs run one after another) the wait is already over. The last program past the wait resets the counters for
the next launch. The fp32 sums' order depends on the programs' timing, as in the two kernels.

Measured (H200, bench/NOTES.md v25): 17% faster than the two kernels where the pair runs alone on OPT-13B (12%
slower on OPT-30B), and slower in the decode step on every model tried (+3.6% to +22%), where the light o_proj's
programs are placed beside the attention's and the predictors' and the MLP block's during the o_proj; so
``FastDecoder.fuse_oproj_mlp`` is off.
"""

from __future__ import annotations

import torch

from . import _checks
from ._checks import (
    cdiv,
    check_tensor,
    check_zero,
    fence_gpu,
    is_interpreted,
    jit,
    next_pow2,
    num_sms,
    pdl_sync,
    tl,
    zero_slice,
)
from .gather_mlp import XSum, _counters, _down_h_step, _down_w_step
from .head_sparse import check_heads_down, head_gather_down_ref
from .mlp_block import _mlp_launch, _mlp_program, _pdl_mode, sparse_mlp_ref

O_COLS = 512
"""Output columns of one o_proj item (its [B, 16, O_COLS] fp32 accumulator: 32 registers a thread at B = 1 over the
block's 8 warps, as the unfused o_proj's 256 columns over 4). A/B knob, read at launch time."""
O_ITEMS_PER_SM = 1
"""Without PERSISTENT: o_proj items per SM the split count aims for (the unfused o_proj aims for 2 programs of 4
warps). A/B knob, read at launch time."""
O_STAGES = 3
"""Pipeline stages of an o_proj item's row loop. A/B knob."""
PERSISTENT = True
"""One program an MLP item, each taking o_proj items until none is left before its MLP item (the o_proj split into
about as many items as programs), instead of a program for each item of either kind (False). H200, OPT-13B (0.1, 0.5),
graph replay of 12 layers' o_proj and MLP block alone (``bench/oproj_mlp_micro.py``): 29.48 us a layer against 36.28
(the pair: 35.69; bench/NOTES.md v25). A/B knob, read at launch time."""
MAXNREG = None
"""Register cap of the launch (None: the compiler's choice). 128 lets two 8-warp programs share an SM (the MLP block's
one loop has no spills there, mlp_block.ONE_LOOP_MAXNREG), so that without PERSISTENT the MLP items wait beside the
o_proj items; it measured slower (bench/NOTES.md v25). A/B knob, read at launch time."""


@jit
def _oproj_mlp_kernel(
    # the o_proj items
    a_ptr, wo_ptr, hidx_ptr, sums_ptr, zo_ptr, tick_ptr, n_in, rows_per_split, n_od, n_o, n_zo,
    stride_ab, stride_ag, stride_ar, stride_won,
    # the MLP items: _sparse_mlp_kernel's arguments, in its order
    x_ptr, w1_ptr, w3_ptr, w2t_ptr, idx_ptr, b1_ptr, b2_ptr, res_ptr, out_ptr, acc_ptr, cnt_ptr, g_ptr, rg_ptr,
    zero_ptr, xs_ptr, xb_ptr, xr_ptr, B, K, D, eps, n_zero, stride_xb, stride_xd, stride_w1n, stride_w3n, stride_w2n,
    stride_rb, stride_ob, stride_xr,
    # meta-parameters: the o_proj items'
    HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_ZO: tl.constexpr,
    ZERO_O: tl.constexpr, STAGES_O: tl.constexpr, SPIN: tl.constexpr, PERSISTENT: tl.constexpr,
    # the MLP items'
    ACT: tl.constexpr, NORM: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_F: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, NUM_STAGES: tl.constexpr,
    FENCE: tl.constexpr, FINISH: tl.constexpr, ZERO: tl.constexpr, BLOCK_Z: tl.constexpr, X_SUM: tl.constexpr,
    HAS_XB: tl.constexpr, PREWAIT: tl.constexpr, ONE_LOOP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """o_sums += a @ wo_t[rows]; then the MLP block on x = round(o_sums + bo + x_res). Grid: (n_o + MLP items,), or
    PERSISTENT (MLP items,): every program takes o_proj items until none is left, then the MLP item its next ticket
    names. ``tick_ptr``: [3] int32, zero between launches: tickets, o_proj arrivals, programs past their wait."""
    tl.static_assert(X_SUM and not USE_DOT and not PREWAIT, "the MLP items make x from the o_proj's sums (FMA path)")
    pdl_sync(PDL)
    t = tl.atomic_add(tick_ptr, 1, sem="relaxed", scope="gpu")
    while t < n_o:  # PERSISTENT: until every o_proj item is taken; else one (the grid has a program for each)
        _oproj_item(a_ptr, wo_ptr, hidx_ptr, sums_ptr, t % n_od, t // n_od, B, n_in, D, rows_per_split, stride_ab,
                    stride_ag, stride_ar, stride_won, HEAD_DIM, BLOCK_B, BLOCK_J, BLOCK_DO, STAGES_O)  # fmt: skip
        if ZERO_O:
            zero_slice(zo_ptr, n_zo, t, BLOCK_ZO)
        # threadfence-reduction pattern: every thread's atomics performed GPU-wide, barrier, one release arrival
        fence_gpu(FENCE)
        tl.debug_barrier()
        tl.atomic_add(tick_ptr + 1, 1, sem="release", scope="gpu")
        if PERSISTENT:
            t = tl.atomic_add(tick_ptr, 1, sem="relaxed", scope="gpu")
        else:
            t = n_o + tl.num_programs(0)  # (past every item: this program ends here)
    m = t - n_o  # unique: the program's first ticket past the o_proj items
    n_m = tl.cdiv(K, BLOCK_N)
    n_past = tl.num_programs(0) if PERSISTENT else n_m  # the programs that get here
    if m < n_past:
        if SPIN:  # (under the interpreter every o_proj item has run: programs run in order)
            _wait_count(tick_ptr + 1, n_o)
        tl.debug_barrier()  # every thread waits for thread 0's acquire; all are past it before the counters reset
        fence_gpu(FENCE)
        past = tl.atomic_add(tick_ptr + 2, 1, sem="acq_rel", scope="gpu")
        if past == n_past - 1:  # every ticket taken, every o_proj item arrived and every program past its wait
            tl.atomic_xchg(tick_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(tick_ptr + 1, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(tick_ptr + 2, 0, sem="relaxed", scope="gpu")
    if m < n_m:
        _mlp_program(m, n_m, x_ptr, w1_ptr, w3_ptr, w2t_ptr, idx_ptr, b1_ptr, b2_ptr, res_ptr, out_ptr, acc_ptr,
                     cnt_ptr, g_ptr, rg_ptr, zero_ptr, xs_ptr, xb_ptr, xr_ptr, B, K, D, eps, n_zero, stride_xb,
                     stride_xd, stride_w1n, stride_w3n, stride_w2n, stride_rb, stride_ob, stride_xr, ACT, NORM, HAS_B1,
                     HAS_B2, HAS_RES, BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_O, BLOCK_F, USE_DOT, DOT_FP32, NUM_STAGES,
                     FENCE, FINISH, ZERO, BLOCK_Z, X_SUM, HAS_XB, PREWAIT, ONE_LOOP, PDL)  # fmt: skip


@jit
def _wait_count(ptr, n):
    """Thread 0 of the program reads the int32 at ``ptr`` (``ld.acquire.gpu``) until it is at least ``n``, sleeping
    ~128 ns between reads; the caller's barrier holds the other threads. (One reader a program instead of every
    thread: no faster in the step, bench/NOTES.md v25, but it keeps the polling off the o_proj items' L2 traffic.)"""
    tl.inline_asm_elementwise(
        """{
        .reg .pred %wp<2>;
        .reg .b32 %wv<2>;
        mov.u32 %wv0, %tid.x;
        setp.ne.u32 %wp0, %wv0, 0;
        @%wp0 bra WAIT_DONE_${:uid};
        WAIT_POLL_${:uid}:
        ld.acquire.gpu.global.b32 %wv1, [$1];
        setp.ge.s32 %wp1, %wv1, $2;
        @%wp1 bra WAIT_DONE_${:uid};
        nanosleep.u32 128;
        bra.uni WAIT_POLL_${:uid};
        WAIT_DONE_${:uid}:
        mov.u32 $0, 0;
        }""",
        "=r,l,r", [ptr, n], dtype=tl.int32, is_pure=False, pack=1)


@jit
def _oproj_item(a_ptr, wo_ptr, hidx_ptr, sums_ptr, pid_d, pid_s, B, n_in, D, rows_per_split, stride_ab, stride_ag,
                stride_ar, stride_won, HEAD_DIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                BLOCK_DO: tl.constexpr, STAGES_O: tl.constexpr):  # fmt: skip
    """sums[:, slab pid_d] += a[:, rows of split pid_s] @ wo_t[those rows, slab pid_d] (FMA, fp32 atomics)."""
    offs_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_mask = offs_d < D
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    j_lo = pid_s * rows_per_split
    j_hi = tl.minimum(j_lo + rows_per_split, n_in)
    acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_DO], dtype=tl.float32)
    for j0 in tl.range(j_lo, j_hi, BLOCK_J, num_stages=STAGES_O):
        w, grp, within, j_mask = _down_w_step(wo_ptr, hidx_ptr, j0, j_hi, offs_d, d_mask, stride_won, HEAD_DIM,
                                              BLOCK_J)  # fmt: skip
        acc = _down_h_step(acc, w, a_ptr, grp, within, j_mask, offs_b, b_mask, stride_ab, stride_ag, stride_ar, False,
                           False)  # fmt: skip
    part = tl.sum(acc, axis=1)  # [BLOCK_B, BLOCK_DO]
    tl.atomic_add(sums_ptr + offs_b[:, None] * D + offs_d[None, :], part, mask=b_mask[:, None] & d_mask[None, :],
                  sem="relaxed", scope="gpu")  # fmt: skip


def _items_target(n_m: int, device: torch.device) -> int:
    """How many o_proj items :func:`_oproj_items` aims for: one a program with PERSISTENT (``n_m`` MLP items), else
    O_ITEMS_PER_SM an SM."""
    return n_m if PERSISTENT else O_ITEMS_PER_SM * num_sms(device)


def _oproj_items(n_in: int, d: int, target: int) -> dict:
    """The o_proj items' tiles: O_COLS-column slabs, the rows split so that at most ``target`` items (rounded down,
    so that no SM is given one item more than the others), whole 16-row steps a split."""
    block_j, block_do = 16, max(16, min(O_COLS, next_pow2(d)))
    n_od = cdiv(d, block_do)
    splits = max(1, min(target // n_od, cdiv(n_in, 2 * block_j)))
    rows_per_split = cdiv(cdiv(n_in, splits), block_j) * block_j
    return dict(BLOCK_J=block_j, BLOCK_DO=block_do, n_od=n_od, rows_per_split=rows_per_split,
                n_o=n_od * cdiv(n_in, rows_per_split))  # fmt: skip


def oproj_mlp(a, wo_t, head_idx, head_dim, o_sums, x, w1, w2t, idx, b1=None, b2=None, residual=None, *, bo=None,
              x_res, w3=None, norm=None, workspace=None, validate=True, out=None, finish=True, zero_o=None,
              zero=None):  # fmt: skip
    """``head_gather_down(a, wo_t, head_idx, head_dim, out=o_sums, finish=False, zero=zero_o)`` and then
    ``sparse_mlp(x, w1, w2t, idx, b1, b2, residual, ..., x_sum=XSum(o_sums, bo, x_res), zero=zero)``, in one launch.

    ``o_sums``: fp32 contiguous ``[B, d]`` holding zeros, into which the o_proj adds its product (left there, as
    ``head_gather_down(finish=False)`` leaves it). ``x``: written with the residual after attention,
    ``round(o_sums + bo + x_res)``, which the block reads (``residual`` may be this ``x``). The other arguments are
    :func:`~dejavu.kernels.mlp_block.sparse_mlp`'s (``finish=False`` leaves the block's sums in its workspace, and
    returns them). ``zero_o`` / ``zero``: fp32 tensors the o_proj items / the MLP items set to 0. Batch <= the FMA
    paths' (``_checks.FMA_MAX_BATCH``).
    """
    op = "oproj_mlp"
    B, D = check_heads_down(op, a, wo_t, head_idx, head_dim, validate)
    if B > _checks.FMA_MAX_BATCH:
        raise ValueError(f"{op}: batch {B} is above the FMA paths' {_checks.FMA_MAX_BATCH}; run head_gather_down "
                         "and sparse_mlp apart.")  # fmt: skip
    check_tensor(op, "o_sums", o_sums, ndim=2, dtype=torch.float32, device=wo_t.device, shape=(B, D), contiguous=True)
    check_tensor(op, "x", x, ndim=2, dtype=wo_t.dtype, device=wo_t.device, shape=(B, D))
    if bo is not None:
        check_tensor(op, "bo", bo, ndim=1, dtype=wo_t.dtype, device=wo_t.device, shape=(D,), contiguous=True)
    result, n_m, args, meta = _mlp_launch(op, x, w1, w2t, idx, b1, b2, residual, w3, norm, workspace, validate, out,
                                          finish, zero, XSum(o_sums, bo, x_res))  # fmt: skip
    n_in = head_idx.shape[0] * head_dim
    items = _oproj_items(n_in, D, _items_target(n_m, wo_t.device))
    n_o = items["n_o"]
    n_zo, block_zo = check_zero(op, zero_o, o_sums, "o_sums", n_o)
    pdl = _pdl_mode(wo_t.device, _oproj_mlp_kernel)  # (the MLP items signal after their up phase, as the block)
    interp = is_interpreted(_oproj_mlp_kernel)
    cap = None if interp else MAXNREG
    _oproj_mlp_kernel[(n_m if PERSISTENT else n_o + n_m,)](
        a, wo_t, head_idx, o_sums, zero_o if zero_o is not None else o_sums, _counters(wo_t.device, 3), n_in,
        items["rows_per_split"], items["n_od"], n_o, n_zo, a.stride(0), a.stride(1), a.stride(2), wo_t.stride(0),
        *args, HEAD_DIM=head_dim, BLOCK_J=items["BLOCK_J"], BLOCK_DO=items["BLOCK_DO"], BLOCK_ZO=block_zo,
        ZERO_O=n_zo > 0, STAGES_O=O_STAGES, SPIN=not interp, PERSISTENT=PERSISTENT, **meta, PREWAIT=False, PDL=pdl,
        launch_pdl=pdl > 0, **({"maxnreg": cap} if cap else {}),
    )  # fmt: skip
    return result


def oproj_mlp_ref(a, wo_t, head_idx, head_dim, x, w1, w2t, idx, b1=None, b2=None, residual=None, *, bo=None, x_res,
                  w3=None, norm=None):  # fmt: skip
    """Reference for :func:`oproj_mlp` (finished): writes ``x`` = the o_proj's output (+ bo + x_res), rounded as
    stored, and returns the block's output on it (``residual`` may be ``x``, read after it is written)."""
    x.copy_(head_gather_down_ref(a, wo_t, head_idx, head_dim, bo, x_res))
    return sparse_mlp_ref(x, w1, w2t, idx, b1, b2, residual, w3=w3, norm=norm)


__all__ = ["oproj_mlp", "oproj_mlp_ref"]
