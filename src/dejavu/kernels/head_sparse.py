"""Head-sparse attention projections (GQA-aware) for decoding.

Deja Vu's attention sparsity keeps a few query heads per layer. For those heads only, the
block needs

* the q/k/v projection rows of the selected heads: ``W[h*hd:(h+1)*hd]`` of the ``[H*hd, d]``
  ``nn.Linear`` weight, i.e. a gather of *row blocks*;
* the output projection columns of the selected heads: with ``wo_t = o_proj.weight.T``
  (contiguous, ``[H*hd, d]``) the column block of head ``h`` is again a row block.

Both are exactly the MLP gathers of :mod:`dejavu.kernels.gather_mlp` with ``ROWS_PER_IDX =
head_dim``: an index selects ``head_dim`` consecutive rows, expanded *inside* the kernel
(``row = idx[c // hd] * hd + c % hd``), so no expanded index tensor is built per call (that
would be an extra launch + allocation for every projection). The access pattern is the same
as, or better than, the neuron gather (longer runs of contiguous rows), so the kernels are
shared rather than duplicated.

With grouped-query attention (``group_size = H / H_kv`` query heads per KV head) the k/v
projections are gathered with :func:`kv_heads_for`, the sorted KV heads needed by the
selected query heads.
"""

from __future__ import annotations

import torch

from ._checks import check_batch, check_index, check_launch_device, check_out, check_tensor, require_triton
from .gather_mlp import (
    ACT_NONE,
    _check_bias,
    _check_down_epilogue,
    _check_norm,
    _check_out2,
    _check_rows_inputs,
    _check_x_sum,
    _gather_down_kernel,
    _launch_gather_down,
    _launch_gather_rows,
)


def _check_head_dim(op, head_dim, n_rows):
    if not isinstance(head_dim, int) or head_dim < 1 or n_rows % head_dim:
        raise ValueError(
            f"{op}: head_dim={head_dim!r} must be a positive int dividing the weight's "
            f"{n_rows} rows (H * head_dim)."
        )


def head_gather_gemv(x, w, head_idx, head_dim, bias=None, *, norm=None, validate=True, out=None, x_sum=None,
                     prewait=False):  # fmt: skip
    """Projection rows of the selected heads: ``x @ w[rows(head_idx)].T (+ bias)``.

    Args:
        x: ``[B, d]`` activations (B <= 16), same dtype as ``w``.
        w: ``[H*head_dim, d]`` contiguous (``q_proj`` / ``k_proj`` / ``v_proj`` weight).
        head_idx: ``[kh]`` int32/int64 selected heads (for k/v under GQA: ``kv_heads_for``).
        head_dim: rows per head.
        bias: optional full ``[H*head_dim]`` bias (OPT has one; LLaMA does not).
        norm: optional :class:`~dejavu.kernels.gather_mlp.NormFold` of the block's input norm, folded for ``w``:
            x is then the raw residual stream (the projection's bias comes from the fold).
        x_sum: optional :class:`~dejavu.kernels.gather_mlp.XSum` (the FMA path): x is not read but made from the
            unfinished MLP block before this projection and written into ``x`` (the layer's residual stream).
        prewait: a promise that the kernel before this one in the stream writes neither ``head_idx`` nor ``w``. With
            programmatic dependent launch (FMA path), the selection and the first weight chunk are then read before the
            PDL wait, while that kernel still runs.

    Returns:
        ``[B, kh, head_dim]``, heads in ``head_idx`` order.
    """
    op = "head_gather_gemv"
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        _check_head_dim(op, head_dim, w.shape[0])
    B, _ = _check_rows_inputs(op, x, w, head_idx, rows_per_idx=head_dim, validate=validate, what="heads")
    _check_bias(op, "bias", bias, w, w.shape[0])
    _check_norm(op, norm, w, x, bias)
    _check_x_sum(op, x_sum, x)
    kh = head_idx.shape[0]
    if out is None:
        out = torch.empty((B, kh, head_dim), dtype=x.dtype, device=x.device)
    else:
        check_out(op, out, shape=(B, kh, head_dim), dtype=x.dtype, device=x.device)
    _launch_gather_rows(x, w, w, head_idx, bias, ACT_NONE, head_dim, out.view(B, kh * head_dim), norm, x_sum,
                        prewait=bool(prewait))  # fmt: skip
    return out


def head_gather_gemv_ref(x, w, head_idx, head_dim, bias=None):
    """Reference for :func:`head_gather_gemv`."""
    rows = head_rows(head_idx, head_dim)
    y = x @ w[rows].T
    if bias is not None:
        y = y + bias[rows]
    return y.view(x.shape[0], head_idx.shape[0], head_dim)


def head_gather_down(a, wo_t, head_idx, head_dim, bias=None, residual=None, *, validate=True, out=None,
                     split_k=None, finish=True, zero=None, prewait=False, out2=None, bias2=None):  # fmt: skip
    """Output projection restricted to the selected heads -> ``[B, d]``.

    ``out[b] = sum_j a[b, j] . wo_t[head_idx[j]*hd : (head_idx[j]+1)*hd] (+ bias) (+ residual)``

    Args:
        a: ``[B, kh, head_dim]`` attention output of the selected heads (any strides).
        wo_t: ``[H*head_dim, d]`` contiguous, ``o_proj.weight.T`` (stored once at load).
        head_idx: ``[kh]`` selected query heads, same order as ``a``'s second axis.
        bias: optional ``[d]``; residual: optional ``[B, d]``; split_k: see ``gather_down``.
        finish: False leaves the product unfinished: ``out`` (required) is an fp32 contiguous ``[B, d]`` holding
            zeros, to which every program adds its part with atomics (no split-k pass, no last program); bias and
            residual must be None (the consumer adds them: ``sparse_mlp(x_sum=XSum(out, bias, residual))``). The
            sum's order then depends on the programs' timing.
        zero: an fp32 contiguous tensor the launch sets to 0 after waiting for its predecessor (e.g. sums an
            earlier launch left and whose consumer has run); not ``out``.
        prewait: a promise that ``head_idx`` and ``wo_t`` were complete before the kernel preceding this one in the
            stream started (the decode step: the selection is joined before the q/k/v gather, two kernels earlier).
            With programmatic dependent launch, the first step's selection and weights are then read before the PDL
            wait.
        out2: a second ``[B, d]`` output, ``out + bias2`` (``bias2``: optional ``[d]``), rounded as
            ``torch.add(out, bias2)`` rounds it: the dense decode step's next residual, into which cuBLAS then adds
            the MLP's down projection, written here instead of by an elementwise launch of its own.
    """
    op = "head_gather_down"
    B, D = check_heads_down(op, a, wo_t, head_idx, head_dim, validate)
    _check_down_epilogue(op, bias, residual, wo_t, B, D)
    if not finish:
        if bias is not None or residual is not None or out is None:
            raise ValueError(f"{op}: finish=False adds the unfinished product into out: pass out (fp32 [B, d], "
                             "zeroed) and bias=None, residual=None (the consumer adds them, XSum).")  # fmt: skip
        check_tensor(op, "out", out, ndim=2, dtype=torch.float32, device=wo_t.device, shape=(B, D), contiguous=True)
    elif out is None:
        out = torch.empty((B, D), dtype=wo_t.dtype, device=wo_t.device)
    else:
        check_out(op, out, shape=(B, D), dtype=wo_t.dtype, device=wo_t.device)
    if out2 is not None and not finish:
        raise ValueError(f"{op}: out2 is written from the finished output; it needs finish=True.")
    _check_out2(op, out2, bias2, out, wo_t, B, D)
    strides = (a.stride(0), a.stride(1), a.stride(2))
    return _launch_gather_down(a, strides, wo_t, head_idx, bias, residual, head_dim, out, split_k, finish, zero, op,
                               prewait=bool(prewait), out2=out2, bias2=bias2)  # fmt: skip


def check_heads_down(op, a, wo_t, head_idx, head_dim, validate) -> tuple[int, int]:
    """The output projection's inputs (:func:`head_gather_down`; also :func:`~dejavu.kernels.oproj_block.oproj_mlp`)
    -> (B, d)."""
    require_triton(op)
    check_tensor(op, "wo_t", wo_t, ndim=2, contiguous=True)
    check_launch_device(op, _gather_down_kernel, wo_t)
    _check_head_dim(op, head_dim, wo_t.shape[0])
    check_tensor(op, "a", a, ndim=3, dtype=wo_t.dtype, device=wo_t.device, shape=(None, None, head_dim))
    check_batch(op, a.shape[0])
    check_index(op, "head_idx", head_idx, n=wo_t.shape[0] // head_dim, device=wo_t.device, validate=validate,
                what="heads")  # fmt: skip
    if a.shape[1] != head_idx.shape[0]:
        raise ValueError(f"{op}: a has {a.shape[1]} heads but head_idx selects {head_idx.shape[0]}; a must hold "
                         f"exactly the selected heads, in head_idx order.")  # fmt: skip
    return a.shape[0], wo_t.shape[1]


def head_gather_down_ref(a, wo_t, head_idx, head_dim, bias=None, residual=None):
    """Reference for :func:`head_gather_down`."""
    B = a.shape[0]
    y = a.reshape(B, -1) @ wo_t[head_rows(head_idx, head_dim)]
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    return y


def head_rows(head_idx, head_dim):
    """Expanded row indices ``[kh * head_dim]`` (int64) of the selected heads (torch helper)."""
    offs = torch.arange(head_dim, device=head_idx.device)
    return (head_idx.long()[:, None] * head_dim + offs[None, :]).reshape(-1)


def kv_heads_for(head_idx, group_size):
    """Sorted unique KV heads read by the selected query heads (``h // group_size``).

    With MHA (``group_size == 1``) this is just ``head_idx`` sorted. Small torch op; its output
    size depends on the data, so call it outside CUDA-graph capture (or keep a fixed-size
    KV selection in the runtime).
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"kv_heads_for: group_size must be a positive int (H // H_kv), got {group_size!r}.")
    if not isinstance(head_idx, torch.Tensor) or head_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError("kv_heads_for: head_idx must be an int32/int64 tensor of query-head indices.")
    return torch.unique(torch.div(head_idx, group_size, rounding_mode="floor"), sorted=True)
