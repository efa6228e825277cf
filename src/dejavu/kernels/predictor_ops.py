"""The predictor step of Deja Vu decoding: low-rank scores, then a fixed-size batch top-k.

Per layer, a small low-rank predictor scores every neuron (or head) from the current hidden
state, ``scores = x @ a @ b + bias`` with ``a: [d, r]``, ``b: [r, N]`` and ``r << d``. The
union over the batch of the highest-scoring entries becomes the index vector the sparse
kernels consume.

Why no Triton here: the two products are tiny GEMMs (``[B, d] x [d, r]`` then
``[B, r] x [r, N]``); their cost is reading ``a`` and ``b`` once, which cuBLAS already does at
bandwidth for B <= 16, and the intermediate ``[B, r]`` is a few KiB, so fusing would save no
bytes. A single fused kernel would in fact read *more*: every output tile needs all of
``x @ a``, so without a grid-wide barrier each program would recompute it and re-read ``a``.
Two matmuls (the second an ``addmm`` with the bias fused) are the right call; the cost that
remains is one extra launch, which CUDA graphs make ~1 us.

:func:`batch_topk` keeps the output shape fixed (``k``) and never syncs with the host, so
a decode step that uses it can be captured in a CUDA graph: per-neuron max over the batch
(a neuron is kept if *any* sequence wants it), ``topk``, then an ascending sort so the
kernels read weight rows in address order.
"""

from __future__ import annotations

import torch

from ._checks import check_batch, check_tensor


def lowrank_scores(x, a, b, bias=None):
    """Predictor scores ``x @ a @ b (+ bias)`` -> ``[B, N]`` (two cuBLAS matmuls, see module doc).

    Args:
        x: ``[B, d]`` hidden states, B <= 16; a: ``[d, r]``; b: ``[r, N]`` (both contiguous);
        bias: optional ``[N]``. All the same dtype and device.
    """
    op = "lowrank_scores"
    check_tensor(op, "a", a, ndim=2, contiguous=True)
    like = dict(dtype=a.dtype, dtype_of="the predictor weights", device=a.device, device_of="the predictor weights")
    check_tensor(op, "b", b, ndim=2, shape=(a.shape[1], None), contiguous=True, **like)
    check_tensor(op, "x", x, ndim=2, shape=(None, a.shape[0]), **like)
    check_batch(op, x.shape[0])
    if bias is None:
        return (x @ a) @ b
    check_tensor(op, "bias", bias, ndim=1, shape=(b.shape[1],), contiguous=True, **like)
    return torch.addmm(bias, x @ a, b)


def lowrank_scores_ref(x, a, b, bias=None):
    """Reference for :func:`lowrank_scores`, associating the other way: ``x @ (a @ b)``."""
    y = x @ (a @ b)
    return y + bias if bias is not None else y


def batch_topk(scores, k):
    """Indices of the ``k`` best entries of the per-column max over the batch, ascending.

    Args:
        scores: ``[B, N]`` (or ``[N]``) predictor scores.
        k: number of entries to keep, ``1 <= k <= N`` (a Python int: fixed output shape).

    Returns:
        ``[k]`` int64, sorted ascending, no duplicates, on ``scores.device``. No host sync:
        safe inside CUDA-graph capture; pass the result with ``validate=False``.
    """
    op = "batch_topk"
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2) or not scores.is_floating_point():
        raise ValueError(f"{op}: scores must be a floating tensor of shape [B, N] or [N].")
    n = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{op}: k must be a Python int in [1, {n}] (fixed output size), got {k!r}.")
    per_item = scores.amax(dim=0) if scores.dim() == 2 else scores
    top = torch.topk(per_item, k, sorted=False).indices
    return torch.sort(top).values


def batch_topk_ref(scores, k):
    """Reference for :func:`batch_topk` (full sort instead of topk)."""
    per_item = scores.amax(dim=0) if scores.dim() == 2 else scores
    return torch.argsort(per_item, descending=True)[:k].sort().values


def predictor_bytes(d, r, N, dtype=torch.float16, bias=True):
    """Bytes one predictor reads per decode step: ``a`` (d x r), ``b`` (r x N), ``bias`` (N)."""
    if isinstance(dtype, str):
        dtype = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[dtype]  # fmt: skip
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (d * r + r * N + (N if bias else 0)) * itemsize

